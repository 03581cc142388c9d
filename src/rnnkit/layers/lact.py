"""LaCT: large-chunk test-time training, a SwiGLU network per head whose weights learn once per chunk.

    y_i = f_{W_c}(q_i)  for every token i of chunk c            apply: the weights before the chunk
    W_{c+1} = norm(W_c - g_c),  g_c = sum_{i in c} eta_i grad_W l(W_c; k_i, v_i)     update, once
    f_W(x) = (silu(x W1) * (x W3)) W2,   l(W; k, v) = -<f_W(k), v>                    (per head)

Zhang, Bi, Hong, Zhang, Luan, Yang, Sunkavalli, Freeman & Tan, "Test-Time Training Done Right"
(2025, arXiv 2505.23884). The fast weights are a SwiGLU MLP per head, ``W1``, ``W3`` ``(K, E)`` and
``W2`` ``(E, K)`` with ``E = expansion * K``, learned initial values ``N(0, 1/fan_in)``. The sequence
is cut into chunks of ``chunk_size`` tokens (hundreds to thousands in the paper, which is what makes
the update's matrix products large enough to use the hardware). Every token of a chunk reads out with
the weights the chunk started from (apply, then update), so the output of a token never depends on
itself or on later tokens. At the chunk's end the weights take one step down the gradient of the
chunk's summed dot-product loss, each weight matrix with its own per-token learned rate ``eta_i =
softplus(w . x_i + b)`` (three per head; ``b`` starts at ``softplus^-1(base_lr)``), written out
analytically (the SwiGLU's backward pass, never ``torch.autograd.grad``; autograd of the outer model
differentiates through the updates). Then:

- ``momentum=True``: ``M_c = m_c M_{c-1} + g_c`` and the step is ``M_c`` instead of ``g_c``, with ``m_c``
  the mean over the chunk of a per-token, per-head ``sigmoid(w . x_i + b)`` (the paper's code);
- ``muon=True``: the step is orthogonalised by ``muon_steps`` Newton-Schulz iterations (Muon; Jordan
  et al. 2024), ``X <- a X + (b A + c A^2) X``, ``A = X X^T``, from ``X`` = the step over its Frobenius
  norm, with Muon's fixed coefficients ``(a, b, c) = (3.4445, -4.7750, 2.0315)`` (the paper's code
  runs five iterations of tuned per-iteration coefficients). The orthogonalised step replaces the
  gradient's scale: the rates weight the tokens against each other;
- weight normalisation, always: every output unit's weight vector (a column of the ``(in, out)``
  matrix, i.e. a row of the paper's ``(out, in)`` one) is rescaled to the norm it has in the learned
  initial weights, ``W[:, j] <- W[:, j] / (||W[:, j]|| + 1e-5) * ||W_init[:, j]||``. The paper's code
  rescales to the norms of the weights a sequence starts from, which are the learned initial ones.

Queries, keys and values are the SiLU of one linear projection each, queries and keys L2-normalised
per head; the read-out goes through a per-head RMSNorm, optionally times a per-head ``silu(w . x)``
scale (``use_gate``), and the output projection.

**The window-attention branch** (``window=w``): the paper pairs the large chunks with sliding-window
softmax attention in the same layer, for the dependencies inside a chunk that the chunk's own
update cannot serve (its tokens read out before it). With ``window`` set, the layer's ``q``, ``k``,
``v`` projections (before the SiLU) also feed causal attention over the last ``w`` steps with rotary
positions (:func:`rnnkit.layers.attention.cached_attention`), and its output is added to the
normalised TTT read-out before the output projection, as in the paper's language model. Without it
the layer is the TTT branch alone, and a stack can still alternate it with ``attention:window=w``
blocks through a layer pattern.

**State and modes.** The state holds the weights (counted from the learned initial ones, so a fresh
state is zeros), the current chunk's keys, values, rates (and momentum gates) read so far, the steps
read in the chunk (``count``), with ``momentum`` the last step ``M``, and with ``window`` the
attention's KV cache: ``3HKE + CH(2K + 3) + 1`` floats (plus ``3HKE + CH`` with momentum and
``(w - 1)(2HK + 1) + 1`` with a window), constant in ``T``. ``recurrent`` (the definition; ``step``)
reads each token out, writes its key, value and rates into the chunk, and when the chunk is full takes
its gradient and updates; ``chunk`` (the default) does a whole chunk at once: one batched read-out and
the same update. Both take the chunk's gradient with the same arithmetic on the same chunk tensors, and
the state keeps the weights as they were computed (counted from the initial ones, never rounded
through a round trip), so within a call the two modes' weights agree to the bit. That matters because
the update can be chaotic: with ``muon`` every step has unit spectral size on weights of unit column
norm, and on a small head fed short chunks a rounding difference (two summation orders of the
gradient, or a step's projections computed for one step instead of many) grows from chunk to chunk.
Accumulating the gradient token by token would keep the state at ``6HKE + 1`` floats whatever ``C``,
at that price. Memory of ``chunk`` is linear in ``T``, with no weight per token. A state in mid-chunk
and padded batches line up on a grid of chunks (:func:`rnnkit.layers._fast_weights.chunk_grid`); a
padded step writes nothing and a chunk that the padding leaves unfinished stays in the state.

Left out: the paper's learned per-channel scale and offset of the fast queries and keys, rotary
positions on the TTT branch (its code notes that it works without them too), low-rank fast weights,
and the QK-norm of the attention branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import check_positive_int
from rnnkit.layers._fast_weights import (
    _expand, _position, check_bool, check_positive_number, chunk_grid, count_like, silu_views, tracing,
)
from rnnkit.layers._multihead import HeadNorm, MultiHeadRecurrence, check_head_config, merge_heads, split_heads
from rnnkit.layers.attention import cached_attention, empty_cache
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.gated_linear_attention import DEFAULT_CHUNK
from rnnkit.ops.padding import freeze, step_valid

__all__ = ["LaCT", "LaCTConfig", "LaCTState", "newton_schulz"]

#: Muon's quintic Newton-Schulz coefficients (Jordan et al. 2024).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NORM_EPS = 1e-5  # added to a column's norm in the weight normalisation (the paper's code)
NS_EPS = 1e-7  # added to the Frobenius norm that scales the Newton-Schulz start


@dataclass
class LaCTConfig:
    """LaCT options."""

    d_model: int  # input and output width D
    num_heads: int = 4  # H
    head_dim: int | None = None  # K, the fast network's input and output width per head; default D // H
    expansion: int = 2  # the fast network's hidden width is E = expansion * K
    chunk_size: int = 256  # C: tokens per fast-weight update
    base_lr: float = 1e-3  # the per-token rates start at softplus(b) = base_lr
    momentum: bool = False  # step with momentum over chunks, M_c = m_c M_{c-1} + g_c
    muon: bool = False  # orthogonalise each step by Newton-Schulz iterations
    muon_steps: int = 5  # Newton-Schulz iterations with muon
    window: int | None = None  # w: add sliding-window attention over the last w steps; None: TTT alone
    use_gate: bool = False  # scale each head's normed read-out by silu(w . x)
    norm_eps: float = 1e-5  # epsilon of the read-out's RMSNorm

    def __post_init__(self) -> None:
        self.head_dim = check_head_config(self.d_model, self.num_heads, self.head_dim)
        check_positive_int("expansion", self.expansion)
        check_positive_int("chunk_size", self.chunk_size)
        check_positive_number("base_lr", self.base_lr)
        for name in ("momentum", "muon", "use_gate"):
            check_bool(name, getattr(self, name))
        check_positive_int("muon_steps", self.muon_steps)
        if self.window is not None:
            check_positive_int("window", self.window)
        check_positive_number("norm_eps", self.norm_eps)


class LaCTState(NamedTuple):
    """State of :class:`LaCT` (module docstring).

    Attributes:
        weights: ``(W1 (B, H, K, E), W2 (B, H, E, K), W3 (B, H, K, E))``, the fast weights minus the
            learned initial ones.
        chunk: the current chunk's steps read so far, in slots ``0 .. count - 1`` (the others zero
            once a chunk has been completed): keys ``(B, H, C, K)``, values ``(B, H, C, K)``, rates
            ``(B, H, C, 3)``, and with ``momentum`` the momentum gates ``(B, H, C)``.
        momentum: ``(M1, M2, M3)``, the last step, with ``momentum=True``; ``()`` without.
        cache: with ``window``, the attention's
            :class:`~rnnkit.layers.attention.RotaryCacheState`; ``()`` without.
        count: ``(B, 1)`` the steps read in the current chunk (whole numbers in the state's dtype).
    """

    weights: tuple
    chunk: tuple
    momentum: tuple
    cache: tuple
    count: torch.Tensor


class Spec(NamedTuple):
    """The recurrence's constants: chunk size, momentum, Newton-Schulz iterations (0: no Muon)."""

    chunk_size: int
    momentum: bool
    muon_steps: int


class Carry(NamedTuple):
    """What the recurrence carries: ``weights`` (minus the initial ones), ``chunk`` and ``momentum`` as
    :class:`LaCTState`, ``count`` ``(B,)``."""

    weights: tuple
    chunk: tuple
    count: torch.Tensor
    momentum: tuple


class Initial(NamedTuple):
    """The learned initial fast weights ``(1, H, in, out)`` each, and their column norms ``(1, H, 1,
    out)``, which every update renormalises to."""

    weights: tuple
    norms: tuple

    def add(self, delta: tuple) -> tuple:
        """The absolute weights of ``delta``, weights counted from the initial ones. Only an update
        changes ``delta``: a state passed from call to call is never rounded by a round trip through
        the absolute weights, so calls of any lengths (``step`` included) see the same weights."""
        return tuple(d + w for d, w in zip(delta, self.weights))


# --------------------------------------------------------------------------- the fast network
def read_out(weights: tuple, x: torch.Tensor) -> torch.Tensor:
    """``f_W(x) = (silu(x W1) * (x W3)) W2`` for ``x`` ``(B, H, n, K)`` -> ``(B, H, n, K)``."""
    w1, w2, w3 = weights
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def inner_gradient(weights: tuple, k: torch.Tensor, v: torch.Tensor, rates: torch.Tensor) -> tuple:
    """``sum_i rates_i grad_W l(W; k_i, v_i)`` with ``l = -<f_W(k), v>``, for each of ``(W1, W2, W3)``
    with its own rate: ``k``, ``v`` ``(B, H, n, K)``, ``rates`` ``(B, H, n, 3)``; a token of rate 0
    adds nothing.

    With ``a = k W1``, ``u = k W3``, ``h = silu(a) * u`` and ``dh = -v W2^T`` (the loss's gradient
    w.r.t. ``h``): ``grad W2 = -h^T v``, ``grad W3 = k^T (dh * silu(a))``, ``grad W1 = k^T (dh * u *
    silu'(a))``, ``silu'(a) = sigma(a) (1 + a (1 - sigma(a)))``; each sum over the tokens weighted by
    their rates."""
    w1, w2, w3 = weights
    a, u = k @ w1, k @ w3  # (B, H, n, E)
    sig = torch.sigmoid(a)
    act = a * sig
    dh = -(v @ w2.transpose(-1, -2))
    r1, r2, r3 = (r[..., None] for r in rates.unbind(-1))  # (B, H, n, 1) each
    g1 = (k * r1).transpose(-1, -2) @ (dh * u * sig * (1 + a * (1 - sig)))
    g2 = -((act * u) * r2).transpose(-1, -2) @ v
    g3 = (k * r3).transpose(-1, -2) @ (dh * act)
    return g1, g2, g3


def _norm(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """The 2-norm over ``dims`` (kept), with a zero gradient (not NaN) where ``x`` is all zero there:
    a sequence that does not update in a chunk computes an update of zeros that is then discarded."""
    return x.pow(2).sum(dims, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny).sqrt()


def newton_schulz(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Muon's orthogonalisation of ``g`` ``(..., m, n)``: ``steps`` quintic Newton-Schulz iterations from
    ``g`` over its Frobenius norm, which push its singular values towards 1 while keeping its
    singular vectors (Muon's coefficients trade exact convergence for few iterations: the values end
    near 1, not at it). Iterates on the wide orientation, so the Gram matrix is the smaller one."""
    tall = g.shape[-2] > g.shape[-1]
    x = g.transpose(-1, -2) if tall else g
    x = x / (_norm(x, (-2, -1)) + NS_EPS)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.transpose(-1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.transpose(-1, -2) if tall else x


def update(delta: tuple, chunk: tuple, momentum: tuple, initial: Initial, spec: Spec) -> tuple[tuple, tuple]:
    """The weights (counted from the initial ones) and momentum after the update of a full ``chunk``
    (module docstring): its gradient, the step (momentum, Muon), the weights moved against it and
    renormalised to the initial column norms."""
    weights = initial.add(delta)
    step = inner_gradient(weights, *chunk[:3])
    if spec.momentum:
        mean = chunk[3].mean(-1)  # (B, H): the chunk's mean momentum gate
        step = momentum = tuple(_expand(mean, m) * m + g for m, g in zip(momentum, step))
    if spec.muon_steps:
        step = tuple(newton_schulz(s, spec.muon_steps) for s in step)
    new = []
    for w, s, n, w0 in zip(weights, step, initial.norms, initial.weights):
        w = w - s
        new.append(w * (n / (_norm(w, (-2,)) + NORM_EPS)) - w0)
    return tuple(new), momentum


def close_chunk(carry: Carry, initial: Initial, spec: Spec) -> Carry:
    """The carry after its full chunk's update: new weights and momentum, an empty chunk."""
    weights, momentum = update(carry.weights, carry.chunk, carry.momentum, initial, spec)
    return Carry(weights, tuple(torch.zeros_like(b) for b in carry.chunk), torch.zeros_like(carry.count), momentum)


# --------------------------------------------------------------------------- the two forms
def lact_recurrent(q, k, v, rates, gates, carry: Carry, lengths, spec: Spec, initial: Initial):
    """The definition, token by token: read out with the chunk's weights, write the token into the
    chunk, update when the chunk is full.

    Args:
        q, k, v: ``(B, H, T, K)``.
        rates: ``(B, H, T, 3)`` the per-token rates of ``W1``, ``W2``, ``W3``.
        gates: ``(B, H, T)`` the momentum gates, or None without momentum.
        carry: the :class:`Carry` before the first step.
        lengths: ``(B,)`` or None; a padded step leaves the carry as it was.
        spec: the :class:`Spec`.
        initial: the learned initial weights and their column norms.

    Returns:
        ``y`` ``(B, H, T, K)`` and the final :class:`Carry`.
    """
    carry = carry._replace(count=_position(carry.count, spec.chunk_size))
    steps = (k, v, rates) + ((gates,) if gates is not None else ())
    slots = torch.arange(spec.chunk_size, device=q.device)
    ys = []
    for t in range(q.shape[2]):
        ys.append(read_out(initial.add(carry.weights), q[:, :, t : t + 1]))
        here = slots == carry.count.long()[:, None]  # (B, C): this step's slot
        chunk = []
        for buffer, series in zip(carry.chunk, steps):
            at = _slots(here, buffer)
            chunk.append(torch.where(at, series[:, :, t : t + 1], buffer))
        new = carry._replace(chunk=tuple(chunk), count=carry.count + 1)
        full = new.count >= spec.chunk_size
        # Eagerly, the update (Newton-Schulz iterations included) is computed only at the steps where
        # some sequence fills its chunk; a trace cannot read that and computes it at every step.
        if tracing() or bool(full.any()):
            new = freeze(full, close_chunk(new, initial, spec), new)
        carry = freeze(step_valid(t, lengths), new, carry)
    return torch.cat(ys, 2), carry


def lact_chunk(q, k, v, rates, gates, carry: Carry, lengths, spec: Spec, initial: Initial):
    """The same function as :func:`lact_recurrent` (same arguments and results), a chunk at a time:
    the chunk's read-outs in one batched product, and the update of :func:`update` on the same chunk
    tensors as the recurrent form's."""
    T = q.shape[2]
    C = spec.chunk_size
    grid = chunk_grid(carry.count, lengths, q.shape[1], T, C)
    # Slots off the sequence hold zeros, as a chunk's unwritten slots do.
    series = [grid.take(t, 0.0) for t in (k, v, rates) + ((gates,) if gates is not None else ())]
    qg = grid.take(q)
    slots = torch.arange(C, device=q.device)
    before = slots[None, :] < grid.offset[:, None]  # (B, C): slots read before this call
    final_count = torch.remainder(grid.offset + grid.length, C)
    final_chunk = (grid.offset + grid.length) // C  # the chunk that holds each sequence's next step
    kept = carry.chunk  # the chunk each sequence ends with (before masking its unwritten slots)
    weights, momentum = carry.weights, carry.momentum
    ys = []
    for m in range(grid.chunks):
        s = slice(m * C, (m + 1) * C)
        ys.append(read_out(initial.add(weights), qg[:, :, s]))
        chunk = tuple(t[:, :, s].contiguous() for t in series)
        if m == 0:  # its first slots are the ones the state brought
            chunk = tuple(torch.where(_slots(before, b), b, c) for b, c in zip(carry.chunk, chunk))
        kept = tuple(torch.where(_batch(final_chunk == m, c), c, old) for c, old in zip(chunk, kept))
        full = (m + 1) * C - grid.offset <= grid.length  # the chunk's last slot holds a step of the sequence
        new_weights, new_momentum = update(weights, chunk, momentum, initial, spec)
        weights, momentum = freeze(full, new_weights, weights), freeze(full, new_momentum, momentum)
    # Slots past the count hold zeros once a chunk has been completed, else what the state held.
    written = slots[None, :] < final_count[:, None]
    chunk = tuple(
        torch.where(_slots(written, c), c, torch.where(_batch(final_chunk > 0, c), torch.zeros_like(c), b))
        for c, b in zip(kept, carry.chunk)
    )
    count = count_like(final_count, carry.count, C)
    return grid.back(torch.cat(ys, 2), T), Carry(weights, chunk, count, momentum)


def _slots(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-slot mask ``(B, C)`` viewed to broadcast over a chunk tensor ``(B, H, C, ...)``."""
    return mask.view(mask.shape[0], 1, mask.shape[1], *([1] * (like.dim() - 3)))


def _batch(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sequence mask ``(B,)`` viewed to broadcast over ``like`` ``(B, ...)``."""
    return mask.view(mask.shape[0], *([1] * (like.dim() - 1)))


# --------------------------------------------------------------------------- the layer
@register(
    "lact",
    description="LaCT (Zhang et al. 2025): a SwiGLU fast network updated once per large chunk, optional window attention",
    test_configs={
        "default": {"num_heads": 2, "head_dim": 3, "expansion": 2, "chunk_size": 4, "base_lr": 0.5},
        # Muon's unit-size steps on so small a network make the recurrence chaotic when the chunks are
        # short (module docstring): chunks of 24 keep the contract's sequences to a few updates.
        "momentum-muon-gate": {"num_heads": 2, "head_dim": 2, "expansion": 2, "chunk_size": 24, "base_lr": 0.5,
                               "momentum": True, "muon": True, "use_gate": True},
        "window": {"num_heads": 2, "head_dim": 2, "expansion": 1, "chunk_size": 5, "base_lr": 0.5, "window": 4},
    },
)
class LaCT(MultiHeadRecurrence):
    """LaCT (Zhang et al. 2025): per head, a SwiGLU network ``f_W`` that reads out each chunk's tokens
    and then learns from them in one update (module docstring).

    Args: the fields of :class:`LaCTConfig`.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state :class:`LaCTState`: ``weights`` ``(W1 (B, H, K,
    E), W2 (B, H, E, K), W3 (B, H, K, E))``, ``chunk`` (keys and values ``(B, H, C, K)``, rates ``(B,
    H, C, 3)``, gates ``(B, H, C)`` with ``momentum``), ``count`` ``(B, 1)``, ``momentum`` three more
    weight-shaped matrices with ``momentum``, ``cache`` the attention's KV cache (``k``, ``v`` ``(B,
    H, w - 1, K)``, ``valid`` ``(B, w - 1)``, ``position`` ``(B, 1)``) with ``window``: ``3HKE +
    CH(2K + 3) + 1`` floats, ``+ 3HKE + CH`` with momentum, ``+ (w - 1)(2HK + 1) + 1`` with a window.
    Modes: ``recurrent`` (token by token, the definition), ``chunk`` (a chunk at a time; the default).

    Example:
        >>> layer = LaCT(d_model=64, num_heads=4, chunk_size=128, window=128)
        >>> y, state = layer(torch.randn(2, 300, 64))    # y (2, 300, 64); state.weights[0] (2, 4, 16, 32)
        >>> y_t, state = layer.step(torch.randn(2, 64), state)
    """

    MODES = ("recurrent", "chunk")
    # The fast-weight loop takes one dtype throughout: under autocast it runs in the parameters'.
    autocast_safe = False

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = c = make_config(LaCTConfig, "lact", config)
        D, H, K = c.d_model, c.num_heads, c.head_dim
        E = c.expansion * K
        self.num_heads, self.head_dim = H, K
        self.d_input = self.d_output = D
        self.spec = Spec(c.chunk_size, c.momentum, c.muon_steps if c.muon else 0)
        self.fast = nn.ParameterList([nn.Parameter(torch.zeros(H, *shape)) for shape in ((K, E), (E, K), (K, E))])
        self.qkv_proj = nn.Linear(D, 3 * H * K, bias=False)  # [q | k | v]
        self.lr_proj = nn.Linear(D, 3 * H)  # per head, the rates of W1, W2, W3
        self.momentum_proj = nn.Linear(D, H) if c.momentum else None
        self.scale_proj = nn.Linear(D, H) if c.use_gate else None
        self.norm = HeadNorm(H, K, kind="rms", eps=c.norm_eps)
        self.out_proj = nn.Linear(H * K, D, bias=False)
        self.span = c.window  # attention over the current step and the w - 1 before it
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Projections ``N(0, 0.02^2)`` with zero biases; the rates' bias ``softplus^-1(base_lr)`` so every
        rate starts near ``base_lr``; the initial fast weights ``N(0, 1/fan_in)`` (the paper's code)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        with torch.no_grad():
            lr = self.config.base_lr
            self.lr_proj.bias.fill_(lr + math.log(-math.expm1(-lr)))  # softplus^-1, stable for any lr > 0
        for p in self.fast:
            nn.init.normal_(p, std=p.shape[1] ** -0.5)

    def _init_state(self, batch_size, device, dtype):
        c = self.config
        B, H, C, K = batch_size, c.num_heads, c.chunk_size, c.head_dim

        def zeros(*shape) -> torch.Tensor:
            return torch.zeros(*shape, device=device, dtype=dtype)

        weights = tuple(zeros(B, *p.shape) for p in self.fast)
        chunk = (zeros(B, H, C, K), zeros(B, H, C, K), zeros(B, H, C, 3)) + ((zeros(B, H, C),) if c.momentum else ())
        momentum = tuple(zeros(B, *p.shape) for p in self.fast) if c.momentum else ()
        cache = empty_cache(B, H, self.span, K, True, device, dtype) if self.span else ()
        return LaCTState(weights, chunk, momentum, cache, zeros(B, 1))

    def state_size_at(self, length: int) -> int:
        """Floats of state after ``length`` steps: ``state_size``, except that with ``window`` the
        attention's KV cache fills up to ``w - 1`` steps (as :meth:`Attention.state_size_at`)."""
        check_positive_int("length", length, minimum=0)
        if not self.span:
            return self.state_size
        empty_slots = self.span - 1 - min(length, self.span - 1)
        return self.state_size - empty_slots * (2 * self.num_heads * self.head_dim + 1)

    def _forward(self, x, state, lengths, mode):
        c = self.config
        H = c.num_heads
        qkv = self.qkv_proj(x)  # (B, T, 3HK)
        q, k, v = silu_views(qkv, H)  # (B, H, T, K) each
        rates = F.softplus(self.lr_proj(x)).unflatten(-1, (H, 3)).transpose(1, 2)  # (B, H, T, 3)
        gates = torch.sigmoid(self.momentum_proj(x)).transpose(1, 2) if c.momentum else None  # (B, H, T)
        init = tuple(p[None] for p in self.fast)  # (1, H, in, out): the state counts the weights from these
        initial = Initial(init, tuple(_norm(p, (-2,)) for p in init))
        carry = Carry(state.weights, state.chunk, state.count[:, 0], state.momentum)
        run = lact_chunk if mode == "chunk" else lact_recurrent
        y, carry = run(q, k, v, rates, gates, carry, lengths, self.spec, initial)
        scale = self.scale_proj(x).repeat_interleave(c.head_dim, -1) if self.scale_proj is not None else None
        out = self.norm(merge_heads(y), scale)  # (B, T, HK)
        cache = ()
        if self.span:
            aq, ak, av = (split_heads(t, H) for t in qkv.chunk(3, -1))
            attended, cache = cached_attention(aq, ak, av, state.cache, lengths, mode, self.span, DEFAULT_CHUNK, True)
            out = out + merge_heads(attended)
        return self.out_proj(out), LaCTState(carry.weights, carry.chunk, carry.momentum, cache, carry.count[:, None])

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self.config).items())

