"""What the test-time-training memories share (``ttt_linear``, ``ttt_mlp``, ``titans``): a small
network per head whose weights are the state, trained on each token by one step of gradient descent
on a self-supervised loss, with the mini-batch size part of the recurrence.

The inner network is an MLP ``z = mlp_W(x)`` of ``depth`` linear layers (with or without biases), exact
GELU between them, followed by a head: ``f(x) = x + LN(z)`` (TTT's LayerNorm + residual, ``ln`` given)
or ``f(x) = z`` (Titans' memory, ``ln`` None). The loss of token ``t`` is ``l_t(W) = 1/2 ||f(k_t) -
v_t||^2``, its gradient ``G_t(W)`` (one tensor per weight) written out analytically (the MLP's
backward pass; no ``torch.autograd.grad``), so that autograd of the outer model differentiates
through the inner updates like any other arithmetic.

**The recurrence, per head, with mini-batch size ``b``.** The state keeps ``W0`` (the weights at the
start of the current mini-batch), ``W`` (the current weights), for the momentum update ``S`` (the
momentum), and ``c``, the steps already read in the current mini-batch. At each step:

    u_t = lr_t G_t(W0)                                   gradient at the mini-batch-start weights
    plain:     W <- W - u_t                              (TTT)
    momentum:  S <- eta_t S - u_t;  W <- (1 - alpha_t) W + S          (Titans)
    y_t = f_W(q_t)                                       read out with the updated weights
    c <- c + 1;  if c = b:  W0 <- W, c <- 0              the mini-batch ends

With ``b = 1``, ``W0 = W`` at every step and this is per-token gradient descent ``W_t = W_{t-1} -
lr_t G_t(W_{t-1})``; with ``b > 1`` it is the mini-batch gradient descent of Sun et al. 2024 (section
2.4: every gradient of a mini-batch at the weights it started from, each output with the weights
after its own token's update) and Titans' chunked training (Behrouz et al. 2025, section 3.2). The
state has a constant size: ``W0 - W`` is the pending mini-batch's accumulated update. The layers keep
``W0`` and ``W`` in their state counted from the learned initial weights (:class:`TTTState`); the
functions here take and return them whole.

**``recurrent``** runs that loop step by step. **``chunk``** computes the same recurrence one
mini-batch at a time without materialising a weight per token: the gradients of a mini-batch are
all taken at ``W0``, so the layer inputs ``X`` and output gradients ``delta`` of its ``b`` tokens come
from one batched forward and backward pass, and the weights that token ``t`` reads out with are

    W_t = D_t W + E_t S - sum_{s <= t} C[t, s] lr_s X_s^T delta_s

(plain: ``D = 1``, ``E = 0``, ``C[t, s] = 1``; momentum: ``D``, ``E``, ``C`` are the two nested linear
scans of ``S`` and ``W`` over the mini-batch in closed form, products of ``eta`` and ``1 - alpha``
taken as exponentials of differences of cumulative log sums, never divided). So the read-out
``q_t W_t`` is the dual form of Sun et al.: ``D_t q_t W + E_t q_t S - (C ⊙ q X^T) delta`` for each
layer in turn, and the carry to the next mini-batch is the last row. Memory is linear in ``T``:
per mini-batch ``(b, b)`` matrices and one weight set, never a ``(T, K, K)`` tensor of weights.

A state whose ``c`` is not zero (a sequence continued mid-mini-batch) and padded batches are handled
by shifting each sequence within a grid of at most ``ceil((T + b - 1) / b)`` mini-batches so that its
mini-batches line up with the grid; the slots before its start and after its length are identity
steps (``lr = 0``, ``eta = 1``, ``alpha = 0``, no write of ``S`` into ``W``) (:func:`chunk_grid`). The
number of grid mini-batches is read from the offsets and lengths when running eagerly (no mini-batch
of identity steps is computed) and bounded without reading them while ``torch.compile`` or
``torch.export`` traces, so both modes trace without a graph break.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import InputError
from rnnkit.layers._multihead import MultiHeadRecurrence, split_heads
from rnnkit.ops.padding import freeze, step_valid

Weights = tuple[torch.Tensor, ...]  # per layer W (B, H, in, out), then its bias (B, H, out) if any


class InnerSpec(NamedTuple):
    """The inner network and its update: ``depth`` linear layers, ``bias`` on each, ``momentum``
    (Titans' momentum and decay) or plain gradient descent, and the mini-batch size ``b``."""

    depth: int
    bias: bool
    momentum: bool
    mini_batch: int


class Gates(NamedTuple):
    """Per-token scalars per head, each ``(B, H, T)``: the inner learning rate ``lr``, and for the
    momentum update ``log eta`` (momentum) and ``log (1 - alpha)`` (what the decay keeps)."""

    lr: torch.Tensor
    log_eta: torch.Tensor | None = None
    log_keep: torch.Tensor | None = None


class LNHead(NamedTuple):
    """TTT's output head ``f(x) = x + LN(z)``: LayerNorm weight and bias ``(H, K)`` and its epsilon."""

    weight: torch.Tensor
    bias: torch.Tensor
    eps: float


# --------------------------------------------------------------------------- option checks
def check_positive_number(name: str, value: object) -> None:
    """A finite number > 0, named in the error."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
        raise InputError(f"{name}: expected a positive number, got {value!r}")


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InputError(f"{name}: expected a bool, got {value!r}")


def silu_views(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values ``(B, H, T, K)`` of a fast-weight memory from the projections ``qkv``
    ``(B, T, 3HK)`` = ``[q | k | v]``: SiLU of each, queries and keys L2-normalised per head (Titans'
    section 4.4; LaCT's layers)."""
    q, k, v = (split_heads(F.silu(t), num_heads) for t in qkv.chunk(3, -1))
    return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v


# --------------------------------------------------------------------------- the inner network
def _layers(weights: Weights, spec: InnerSpec) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``[(W, b or None)]`` per layer from the flat weight tuple."""
    if spec.bias:
        return [(weights[2 * i], weights[2 * i + 1]) for i in range(spec.depth)]
    return [(w, None) for w in weights]


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """Derivative of the exact GELU ``z Phi(z)``: ``Phi(z) + z phi(z)``."""
    return 0.5 * (1.0 + torch.erf(z * 0.5**0.5)) + z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _mlp(layers, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's input ``X_l`` and pre-activation ``Z_l`` for ``x`` ``(B, H, n, in)``."""
    inputs, pre = [], []
    h = x
    for i, (w, b) in enumerate(layers):
        inputs.append(h)
        z = h @ w
        if b is not None:
            z = z + b[..., None, :]
        pre.append(z)
        if i + 1 < len(layers):
            h = F.gelu(z)
    return inputs, pre


def _head(z: torch.Tensor, x: torch.Tensor, ln: LNHead | None):
    """``f``'s output for the last pre-activation ``z`` and the network's input ``x``, and what the
    LayerNorm's backward needs (``zhat``, ``1 / sigma``)."""
    if ln is None:
        return z, None
    centred = z - z.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + ln.eps)
    zhat = centred * rstd
    return x + zhat * ln.weight[:, None] + ln.bias[:, None], (zhat, rstd)


def _loss_grads(layers, x: torch.Tensor, target: torch.Tensor, ln: LNHead | None):
    """Inputs ``X_l`` and output gradients ``delta_l = dl/dZ_l`` of every layer, for the tokens ``x``
    ``(B, H, n, K)`` and their targets, ``l = 1/2 ||f(x) - target||^2`` summed over tokens."""
    inputs, pre = _mlp(layers, x)
    out, norm = _head(pre[-1], x, ln)
    delta = out - target
    if ln is not None:
        zhat, rstd = norm
        g = delta * ln.weight[:, None]
        delta = rstd * (g - g.mean(-1, keepdim=True) - zhat * (g * zhat).mean(-1, keepdim=True))
    deltas = [delta]
    for i in range(len(layers) - 1, 0, -1):
        delta = (delta @ layers[i][0].transpose(-1, -2)) * _gelu_grad(pre[i - 1])
        deltas.insert(0, delta)
    return inputs, deltas


def _apply(ln: LNHead | None, layers, q: torch.Tensor) -> torch.Tensor:
    """``f_W(q)`` for ``q`` ``(B, H, n, K)``."""
    return _head(_mlp(layers, q)[1][-1], q, ln)[0]


def _scaled_grads(inputs, deltas, coef: torch.Tensor, spec: InnerSpec) -> Weights:
    """``sum_s coef_s X_s^T delta_s`` (and ``sum_s coef_s delta_s`` for biases) per layer, in the
    flat weight order; ``coef`` ``(B, H, n)``."""
    out = []
    for x, d in zip(inputs, deltas):
        d = d * coef[..., None]
        out.append(x.transpose(-1, -2) @ d)
        if spec.bias:
            out.append(d.sum(-2))
    return tuple(out)


def _expand(g: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """A per-(B, H) scalar ``g`` viewed to broadcast over ``leaf`` ``(B, H, ...)``."""
    return g.view(*g.shape, *([1] * (leaf.dim() - g.dim())))


def _where(cond: torch.Tensor, a: Weights, b: Weights) -> Weights:
    """Per sequence (``cond`` ``(B,)``): ``a`` where True, else ``b``."""
    return tuple(torch.where(cond.view(-1, *([1] * (x.dim() - 1))), x, y) for x, y in zip(a, b))


def _position(count: torch.Tensor, b: int) -> torch.Tensor:
    """The state's step count as a whole number in ``[0, b)`` (same dtype). A count that is not finite
    (a state the caller did not validate) reads as 0, so the call still runs."""
    return torch.remainder(torch.nan_to_num(count.round(), nan=0.0, posinf=0.0, neginf=0.0), b)


def count_like(steps: torch.Tensor, count: torch.Tensor, b: int) -> torch.Tensor:
    """The whole numbers ``steps`` ``(B,)`` as a count in ``count``'s dtype, connected to the count a
    call started from with a zero gradient: the recurrent form's count (a rounding of it) is such an
    output of the autograd graph too, so both forms return the same kind of tensor."""
    return steps.to(count.dtype) + 0 * _position(count, b)


# --------------------------------------------------------------------------- recurrent: the definition
def fast_weights_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: Gates,
    carry: tuple,
    lengths: torch.Tensor | None,
    spec: InnerSpec,
    ln: LNHead | None,
):
    """The per-step loop of the module docstring.

    Args:
        q, k, v: ``(B, H, T, K)`` read-out input, training input and target of the inner loss (TTT's
            residual head reconstructs ``v`` from ``k``, i.e. the MLP fits ``v - k``).
        gates: per-token ``(B, H, T)`` scalars.
        carry: ``(start, weights, momentum, count)``: the state's ``W0``, ``W`` and ``S`` (None without
            momentum), and ``(B,)`` the steps read in the current mini-batch (rounded; a float leaf).
        lengths: ``(B,)`` or None; padded steps leave the state as it was.

    Returns:
        ``y`` ``(B, H, T, K)`` and the final ``(start, weights, momentum, count)``.
    """
    start, weights, momentum, count = carry
    b = spec.mini_batch
    count = _position(count, b)
    ys = []
    for t in range(q.shape[2]):
        inputs, deltas = _loss_grads(_layers(start, spec), k[:, :, t : t + 1], v[:, :, t : t + 1], ln)
        lr = gates.lr[:, :, t : t + 1]  # (B, H, 1): the one token's coefficient
        u = _scaled_grads(inputs, deltas, lr, spec)
        if momentum is None:
            new_w, new_m = tuple(w - g for w, g in zip(weights, u)), None
        else:
            eta, keep = gates.log_eta[:, :, t].exp(), gates.log_keep[:, :, t].exp()  # (B, H)
            new_m = tuple(_expand(eta, s) * s - g for s, g in zip(momentum, u))
            new_w = tuple(_expand(keep, w) * w + s for w, s in zip(weights, new_m))
        ys.append(_apply(ln, _layers(new_w, spec), q[:, :, t : t + 1]))
        new_count = count + 1
        full = new_count >= b
        new_start = _where(full, new_w, start)
        new_count = torch.where(full, torch.zeros_like(new_count), new_count)
        valid = step_valid(t, lengths)
        start, weights, count = freeze(valid, new_start, start), freeze(valid, new_w, weights), freeze(valid, new_count, count)
        if momentum is not None:
            momentum = freeze(valid, new_m, momentum)
    return torch.cat(ys, 2), (start, weights, momentum, count)


# --------------------------------------------------------------------------- chunk: mini-batch at a time
def tracing() -> bool:
    """Whether ``torch.compile`` or ``torch.export`` is tracing: no tensor value may be read then."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


class ChunkGrid(NamedTuple):
    """Sequences laid out on a grid of ``chunks`` whole chunks of ``size`` slots, each shifted by the
    steps its current chunk has already read (``offset``), so that the chunk boundaries of every
    sequence fall on the grid's. Slots before a sequence's start and after its length are inactive.

    Attributes:
        offset: ``(B,)`` steps of the current chunk read before this call, in ``[0, size)``.
        length: ``(B,)`` valid steps of this call.
        active: ``(B, chunks * size)`` True at the slots that hold a step of the sequence.
        index: ``(B, H, chunks * size)`` the step each slot reads (clamped into ``[0, T)``).
        chunks: the number of chunks.
        size: the chunk size.
        identity: every slot holds the step of its own index (no offset, no padding, whole chunks),
            known only when running eagerly: ``take`` and ``back`` then return their input.
    """

    offset: torch.Tensor
    length: torch.Tensor
    active: torch.Tensor
    index: torch.Tensor
    chunks: int
    size: int
    identity: bool = False

    def take(self, t: torch.Tensor, fill: float | None = None) -> torch.Tensor:
        """``t`` ``(B, H, T, ...)`` on the grid, ``(B, H, chunks * size, ...)``; with ``fill`` the
        inactive slots hold it (an identity step), else a copy of a step of the sequence."""
        if self.identity:
            return t
        extra = t.shape[3:]
        index = self.index.view(*self.index.shape, *([1] * len(extra))).expand(*self.index.shape, *extra)
        out = t.gather(2, index)
        if fill is None:
            return out
        active = self.active.view(self.active.shape[0], 1, -1, *([1] * len(extra)))
        return torch.where(active, out, torch.full((), fill, dtype=t.dtype, device=t.device))

    def back(self, y: torch.Tensor, steps: int) -> torch.Tensor:
        """The grid's ``y`` ``(B, H, chunks * size, K)`` at the sequence's own ``steps`` positions,
        ``(B, H, steps, K)``; a padded step past the grid reads its last slot (its output is padding)."""
        B, H, slots, K = y.shape
        if self.identity and steps == slots:
            return y
        where = (self.offset[:, None] + torch.arange(steps, device=y.device)).clamp(max=slots - 1)
        return y.gather(2, where[:, None, :, None].expand(B, H, steps, K))


def chunk_grid(count: torch.Tensor, lengths: torch.Tensor | None, heads: int, steps: int, size: int) -> ChunkGrid:
    """The :class:`ChunkGrid` of a call of ``steps`` steps (``lengths`` ``(B,)`` or None) from states
    that have read ``count`` ``(B,)`` steps of their current chunk of ``size``.

    The number of chunks is read from the offsets and lengths, except while tracing, where it is the
    bound ``ceil((steps + size - 1) / size)`` that any offset fits in (no tensor value is read)."""
    device = count.device
    B = count.shape[0]
    offset = _position(count, size).long()
    length = lengths.long() if lengths is not None else torch.full((B,), steps, dtype=torch.long, device=device)
    identity = False
    if tracing() or B == 0:
        chunks = (steps + 2 * size - 2) // size
    else:
        chunks = int(((offset + length).max() + size - 1) // size)
        identity = chunks * size == steps and not bool(offset.any()) and bool((length == steps).all())
    grid = torch.arange(chunks * size, device=device)
    source = grid[None, :] - offset[:, None]  # (B, chunks * size): the step in each slot
    active = (source >= 0) & (source < length[:, None])
    index = source.clamp(0, steps - 1)[:, None, :].expand(B, heads, -1)
    return ChunkGrid(offset, length, active, index, chunks, size, identity)


def _decay_matrix(log_cum: torch.Tensor) -> torch.Tensor:
    """``exp(L_t - L_s)`` for ``s <= t``, zero above the diagonal; ``log_cum`` ``(..., n)`` cumulative
    log products, so entry ``[t, s]`` is the product of the factors at steps ``s+1 .. t``."""
    n = log_cum.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=log_cum.device).tril()
    diff = (log_cum[..., :, None] - log_cum[..., None, :]).masked_fill(~causal, -math.inf)
    return diff.exp()


def _coefficients(gates: Gates, active: torch.Tensor):
    """``(D, E, C, P, Pm)`` of one mini-batch for the momentum update (module docstring), from gates
    ``(B, H, n)`` and ``active`` ``(B, 1, n)`` (float, 0 at identity steps). ``C`` and ``Pm``
    include each column's learning rate."""
    log_eta = gates.log_eta.cumsum(-1)
    log_keep = gates.log_keep.cumsum(-1)
    P, Pm = log_eta.exp(), _decay_matrix(log_eta)  # S_t = P_t S - sum_s Pm[t, s] u_s
    Dm = _decay_matrix(log_keep)  # W_t = sum_{r <= t} Dm[t, r] (active_r S_r) + D_t W
    E = (Dm @ (active * P)[..., None])[..., 0]
    C = Dm @ (active[..., None] * Pm)
    lr = gates.lr[..., None, :]
    return log_keep.exp(), E, C * lr, P, Pm * lr


def _augment(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., n, in)`` with a column of ones appended, ``(..., n, in + 1)``: a layer's input
    against its weight matrix with the bias as the last row."""
    return F.pad(x, (0, 1), value=1.0)


def _ln_head(z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """``x + LN(z) w + beta`` for ``z`` and ``x`` ``(BH, n, K)`` and the LayerNorm's ``w`` and ``beta``
    ``(BH, 1, K)``, and ``(zhat, 1 / sigma)``: the operations of :func:`_head` in the same order, so
    that both forms round alike (gradients through the LayerNorm cancel to values small enough for
    another rounding to show)."""
    centred = z - z.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    zhat = centred * rstd
    return x + zhat * weight + bias, zhat, rstd


def _ln_loss_grad(z: torch.Tensor, x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``dl/dz`` of ``l = 1/2 ||x + LN(z) w + beta - target||^2`` (shapes of :func:`_ln_head`), as
    :func:`_loss_grads` takes it."""
    out, zhat, rstd = _ln_head(z, x, weight, bias, eps)
    g = (out - target) * weight
    return rstd * (g - g.mean(-1, keepdim=True) - zhat * (g * zhat).mean(-1, keepdim=True))


class _Mix(torch.autograd.Function):
    """``a x + c y`` (``c y`` optional) for weights ``x``, ``y`` ``(BH, in, out)`` and scalars ``a``,
    ``c`` ``(BH, 1, 1)``: the momentum update's decays. Its backward takes each scalar's gradient as
    one dot product over the weights instead of autograd's product and separate reduction, each
    once per mini-batch and layer."""

    @staticmethod
    def forward(ctx, a, x, c=None, y=None):
        ctx.save_for_backward(a, x, c, y)
        return a * x if c is None else torch.addcmul(a * x, c, y)

    @staticmethod
    def backward(ctx, grad):
        a, x, c, y = ctx.saved_tensors
        flat = grad.flatten(1)

        def scalar(w: torch.Tensor) -> torch.Tensor:
            return torch.linalg.vecdot(flat, w.flatten(1)).view(-1, 1, 1)

        needs = ctx.needs_input_grad
        grads = [scalar(x) if needs[0] else None, grad * a if needs[1] else None, None, None]
        if c is not None:
            grads[2:] = [scalar(y) if needs[2] else None, grad * c if needs[3] else None]
        return tuple(grads)


def fast_weights_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: Gates,
    carry: tuple,
    lengths: torch.Tensor | None,
    spec: InnerSpec,
    ln: LNHead | None,
):
    """The same recurrence as :func:`fast_weights_recurrent` (same arguments and results), one
    mini-batch at a time in the dual form (module docstring).

    The sequential loop runs on ``(B*H, ...)`` tensors, one ``bmm`` per product, with each layer's
    bias kept as the last row of its weight matrix (inputs carry a column of ones), so a
    mini-batch's update of a layer is a single ``baddbmm``. Everything that does not depend on the
    carried weights is computed for all mini-batches at once before the loop: the gates'
    coefficients, the first layer's inputs scaled by them, its ``C ⊙ q k^T`` products and the
    head's constant terms."""
    start, weights, momentum, count = carry
    B, H, T, K = q.shape
    BH = B * H
    b = spec.mini_batch
    device = q.device
    grid = chunk_grid(count, lengths, H, T, b)
    n_mb = grid.chunks
    last_mb = (grid.offset + grid.length - 1) // b  # the mini-batch holding each sequence's last step
    final_count = torch.remainder(grid.offset + grid.length, b)
    # Without lengths every sequence ends in one of two mini-batches (its offset is below b), known
    # from the shapes alone; only those need the per-sequence capture of the start weights.
    ends = range(n_mb) if lengths is not None else {(T - 1) // b, (T + b - 2) // b}

    def per_mb(t: torch.Tensor) -> torch.Tensor:  # (B, H, T', ...) -> (B*H, n_mb, b, ...)
        return t.reshape(BH, n_mb, b, *t.shape[3:])

    def rows(t: torch.Tensor) -> torch.Tensor:  # (B, H, n_mb, ...) -> (B*H, n_mb, ...)
        return t.reshape(BH, *t.shape[2:])

    qg, kg, vg = (per_mb(grid.take(t)) for t in (q, k, v))  # (BH, n_mb, b, K)
    qa, ka = (_augment(t) if spec.bias else t for t in (qg, kg))
    # Every mini-batch's coefficients depend on the gates alone (module docstring).
    # Identity steps off the sequence: lr = 0, eta = 1, nothing decays.
    if momentum is None:
        C = torch.ones(b, b, dtype=q.dtype, device=device).tril() * per_mb(grid.take(gates.lr, 0.0))[..., None, :]
    else:
        on_grid = (grid.take(g, 0.0).unflatten(2, (n_mb, b)) for g in gates)
        active = grid.active[:, None].to(q.dtype).unflatten(2, (n_mb, b))  # (B, 1, n_mb, b)
        D, E, C, P, Pm = (rows(t) for t in _coefficients(Gates(*on_grid), active))
    c_last = C[..., -1, :, None]  # (BH, n_mb, b, 1): each token's share in the mini-batch's update
    mix0 = C * (qa @ ka.mT)  # the first layer's C ⊙ q k^T, (BH, n_mb, b, b)
    # The read-out's first-layer input: the queries, scaled by D with momentum.
    qd = qa if momentum is None else D[..., None] * qa
    per_step = {"ka": ka, "qd": qd, "C": C, "c": c_last, "mix0": mix0, "kc": (ka * c_last).mT}
    if momentum is not None:
        pm_last = Pm[..., -1, :, None]
        per_step.update(pm=pm_last, kp=(ka * pm_last).mT, Eq=E[..., None] * qa,
                        D=D[..., None], E=E[..., None],
                        keep=D[..., -1, None, None], into=E[..., -1, None, None], carry=P[..., -1, None, None])
    per_step["v"] = vg
    if ln is not None:
        per_step["k"], per_step["q"] = kg, qg
        gamma, beta = (p[None, :, None].expand(B, H, 1, K).reshape(BH, 1, K) for p in (ln.weight, ln.bias))
    steps = [dict(zip(per_step, parts)) for parts in zip(*(t.unbind(1) for t in per_step.values()))]

    def inner(ws: Weights | None) -> list[torch.Tensor] | None:  # (B, H, ...) tuple -> (BH, in(+1), out) per layer
        if ws is None:
            return None
        mats = []
        for w, bias in _layers(ws, spec):
            if bias is not None:
                w = torch.cat([w, bias[..., None, :]], -2)
            mats.append(w.reshape(BH, *w.shape[2:]))
        return mats

    def outer(mats: list[torch.Tensor] | None) -> Weights | None:  # the inverse of inner
        if mats is None:
            return None
        out = []
        for w in mats:
            w = w.reshape(B, H, *w.shape[1:])
            out += [w[..., :-1, :], w[..., -1, :]] if spec.bias else [w]
        return tuple(out)

    def where(cond: torch.Tensor, x: list[torch.Tensor], y: list[torch.Tensor]) -> list[torch.Tensor]:
        cond = cond.repeat_interleave(H).view(BH, 1, 1)
        return [torch.where(cond, a, c) for a, c in zip(x, y)]

    cur, mom = inner(weights), inner(momentum)
    base = captured = inner(start)
    depth = len(cur)
    ys = []
    for m, st in enumerate(steps):
        # The loss's layer inputs X_l (with a ones column for the bias) and output gradients at the
        # mini-batch-start weights `base`.
        xs, zs = [st["ka"]], []
        z = torch.bmm(st["ka"], base[0])
        for i in range(1, depth):
            zs.append(z)
            h = F.gelu(z)
            h = _augment(h) if spec.bias else h
            xs.append(h)
            z = torch.bmm(h, base[i])
        if ln is None:
            delta = z - st["v"]
        else:
            delta = _ln_loss_grad(z, st["k"], st["v"], gamma, beta, ln.eps)
        deltas = [delta]
        for i in range(depth - 1, 0, -1):
            w = base[i][:, :-1] if spec.bias else base[i]
            delta = torch.ops.aten.gelu_backward(torch.bmm(delta, w.mT), zs[i - 1])
            deltas.insert(0, delta)
        # Read-out with each token's own weights (dual form), layer by layer.
        for i in range(depth):
            if i == 0:
                mix, he = st["mix0"], None if mom is None else st["Eq"]
                z = torch.bmm(st["qd"], cur[0])
            else:
                hq = _augment(F.gelu(z)) if spec.bias else F.gelu(z)
                mix = st["C"] * torch.bmm(hq, xs[i].mT)
                hd, he = (hq, None) if mom is None else (st["D"] * hq, st["E"] * hq)
                z = torch.bmm(hd, cur[i])
            if he is not None:
                z = torch.baddbmm(z, he, mom[i])
            z = torch.baddbmm(z, mix, deltas[i], alpha=-1.0)
        ys.append(z if ln is None else _ln_head(z, st["q"], gamma, beta, ln.eps)[0])
        # The mini-batch's end: carry the last token's weights.
        scaled = [st["kc"]] + [(x * st["c"]).mT for x in xs[1:]]
        if mom is None:
            cur = [torch.baddbmm(w, x, d, alpha=-1.0) for w, x, d in zip(cur, scaled, deltas)]
        else:
            into = [st["kp"]] + [(x * st["pm"]).mT for x in xs[1:]]
            cur = [torch.baddbmm(_Mix.apply(st["keep"], w, st["into"], s), x, d, alpha=-1.0)
                   for w, s, x, d in zip(cur, mom, scaled, deltas)]
            mom = [torch.baddbmm(_Mix.apply(st["carry"], s), x, d, alpha=-1.0) for s, x, d in zip(mom, into, deltas)]
        if m in ends:
            captured = where(last_mb == m, base, captured)
        base = cur
    y = grid.back(torch.stack(ys, 1).view(B, H, n_mb * b, -1), T)
    start = where(final_count == 0, cur, captured)
    return y, (outer(start), outer(cur), outer(mom), count_like(final_count, count, b))


# --------------------------------------------------------------------------- the layers' base class
class TTTState(NamedTuple):
    """State of a TTT layer, inner weights counted from the learned initial ones (so a fresh state is
    zeros and the initial weights get their gradient whatever state a call starts from): ``start``
    the inner weights at the start of the current mini-batch, ``weights`` the current ones, each
    minus the initial weights (a tuple with one ``(B, H, in, out)`` matrix and ``(B, H, out)`` bias
    per inner layer; ``start - weights`` is the pending mini-batch's update), and ``count`` ``(B, 1)``
    the steps read in the current mini-batch (whole numbers, kept in the state's dtype)."""

    start: tuple
    weights: tuple
    count: torch.Tensor


class TitansState(NamedTuple):
    """State of the Titans memory: as :class:`TTTState`, plus ``momentum`` (``S``, shaped like
    ``weights``, zero at the start)."""

    start: tuple
    weights: tuple
    momentum: tuple
    count: torch.Tensor


class FastWeightLayer(MultiHeadRecurrence):
    """Base of the test-time-training layers: modes ``recurrent`` (the definition) and ``chunk`` (the
    dual form, one mini-batch at a time), learned initial inner weights ``inner`` (one parameter per
    inner tensor, ``(H, in, out)`` or ``(H, out)``), and the state of :class:`TTTState` or
    :class:`TitansState`.

    Subclasses set ``spec`` (:class:`InnerSpec`) and ``inner`` and implement ``_inner_inputs(x) ->
    (q, k, v, gates)`` (each ``(B, H, T, K)``, :class:`Gates`), ``_output(y, x)`` (``y`` ``(B, H, T, K)``
    -> ``(B, T, D)``) and ``_ln()`` (the :class:`LNHead` or None).
    """

    MODES = ("recurrent", "chunk")
    # The inner loop takes one dtype throughout: under autocast it runs in the parameters' (the
    # reference implementations keep the inner loop in fp32 too).
    autocast_safe = False
    spec: InnerSpec
    inner: nn.ParameterList

    def _init_state(self, batch_size, device, dtype):
        def zeros() -> tuple:
            return tuple(torch.zeros(batch_size, *p.shape, device=device, dtype=dtype) for p in self.inner)

        count = torch.zeros(batch_size, 1, device=device, dtype=dtype)
        if self.spec.momentum:
            return TitansState(zeros(), zeros(), zeros(), count)
        return TTTState(zeros(), zeros(), count)

    def _forward(self, x, state, lengths, mode):
        q, k, v, gates = self._inner_inputs(x)
        run = fast_weights_chunk if mode == "chunk" else fast_weights_recurrent
        momentum = state.momentum if self.spec.momentum else None
        init = tuple(p[None] for p in self.inner)  # the state counts the weights from these

        def absolute(part: Weights) -> Weights:
            return tuple(w + w0 for w, w0 in zip(part, init))

        carry = (absolute(state.start), absolute(state.weights), momentum, state.count[:, 0])
        y, (start, weights, momentum, count) = run(q, k, v, gates, carry, lengths, self.spec, self._ln())
        start, weights = (tuple(w - w0 for w, w0 in zip(part, init)) for part in (start, weights))
        count = count[:, None]
        new = TitansState(start, weights, momentum, count) if self.spec.momentum else TTTState(start, weights, count)
        return self._output(y, x), new

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self.config).items())
