"""Titans' neural memory combined with attention (Behrouz, Zhong & Mirrokni 2025, "Titans: Learning to
Memorize at Test Time", section 4): memory as a gate, as a layer and as a context.

- **Memory as a gate** (MAG, section 4.2): one layer with two branches reading the same input, causal
  sliding-window attention ``y = SWA(x)`` and the neural memory ``m = M(x)`` (the ``titans`` layer),
  combined by a gate, ``o = W_o (norm_y(y) * sigmoid(norm_m(m)))``, with ``norm_y``, ``norm_m``
  RMSNorms with learned vector weights (the paper normalises both branches with learned
  vector-valued weights and then applies a non-linearity; here the memory branch gates the
  attention branch): :class:`TitansMAG`, registered as ``titans_mag``.
- **Memory as a layer** (MAL, section 4.3): the memory layer and then sliding-window attention, as
  two blocks of a stack. That is the layer pattern ``titans,attention:window=w``
  (:mod:`rnnkit.layers.pattern`), cycled to the depth, e.g. ``SequenceModel(block="residual",
  layer="titans,attention:window=512", num_layers=8)`` or ``rnnkit train --model
  titans,attention:window=512``; no class of its own.

- **Memory as a context** (MAC, section 4.1): the sequence is cut into segments of ``segment_size``
  tokens. For each token, the memory as it was at its segment's start is read with the token's query
  (retrieval, no update), and attention over the segment sees ``N_p`` learned persistent tokens, the
  retrieved tokens and the segment's own tokens; the attention output ``y`` is what the memory then
  learns from (the ``titans`` recurrence on ``y``, with its mini-batch equal to the segment, so the
  state's mini-batch-start memory is the memory at the segment's start), and the output is ``y``
  gated by the memory's read-out of ``y``, as in MAG: :class:`TitansMAC`, registered as
  ``titans_mac``. Causally: the paper prepends a segment's retrieved tokens as a whole, so a token
  would see the retrieval of later tokens of its segment; here token ``i`` of a segment attends to
  the persistent tokens and to the retrieved and own tokens ``0..i`` of its segment (rotary
  positions within the segment), so ``step`` equals ``forward``. Its state holds the memory and the
  keys and values of the current segment so far: constant in ``T``, linear in ``segment_size``.

MAC's ``chunk`` mode computes a segment at a time: the retrievals of all its tokens from the memory at
the segment's start, the segment's causal attention in one product, and the memory's update by the
``titans`` chunk form on the segment's attention outputs (one mini-batch); ``recurrent`` is the token
loop, the definition.

Left out: the persistent tokens of MAG and MAL (the learned initial memory of ``titans`` plays that
part for the memory branch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from rnnkit.errors import check_positive_int
from rnnkit.layers._fast_weights import TitansState, _apply, _layers, _position, check_positive_number, tracing
from rnnkit.layers._multihead import HeadNorm, check_head_config, merge_heads, split_heads
from rnnkit.layers.attention import RotaryCacheState, rotate
from rnnkit.layers.base import Recurrence
from rnnkit.layers.registry import build, make_config, register
from rnnkit.ops.gated_linear_attention import DEFAULT_CHUNK
from rnnkit.ops.padding import freeze, step_valid

__all__ = ["MACState", "MAGState", "TitansMAC", "TitansMACConfig", "TitansMAG", "TitansMAGConfig"]


class BranchGate(nn.Module):
    """``o = W_o (RMSNorm(y) * sigmoid(RMSNorm(m)))``: the attention read-out ``y`` gated by the memory's
    ``m`` (each ``(..., D)``), both normalised with learned vector weights."""

    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.attention_norm = HeadNorm(1, d_model, kind="rms", eps=eps)
        self.memory_norm = HeadNorm(1, d_model, kind="rms", eps=eps)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        nn.init.normal_(self.out_proj.weight, std=0.02)

    def forward(self, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.attention_norm(y) * torch.sigmoid(self.memory_norm(m)))


@dataclass
class TitansMAGConfig:
    """Options of :class:`TitansMAG`: the attention branch's and the memory branch's (as ``titans``)."""

    d_model: int  # input and output width D
    num_heads: int = 4  # H, of both branches
    head_dim: int | None = None  # K per head; default D // H
    window: int = 64  # w: the attention branch attends over the current step and the w - 1 before it
    chunk_size: int = DEFAULT_CHUNK  # queries per block of the attention's chunk mode
    memory_depth: int = 2  # as titans
    expansion: int = 2  # as titans
    mini_batch_size: int = 16  # as titans
    base_lr: float = 1.0  # as titans
    norm_eps: float = 1e-5  # epsilon of the two branches' RMSNorms

    def __post_init__(self) -> None:
        self.head_dim = check_head_config(self.d_model, self.num_heads, self.head_dim)
        check_positive_int("window", self.window)
        check_positive_number("norm_eps", self.norm_eps)
        # The branches' own options are checked by the branches' configurations (errors name them).


class MAGState(NamedTuple):
    """State of :class:`TitansMAG`: ``memory`` the memory branch's
    :class:`~rnnkit.layers._fast_weights.TitansState`, ``cache`` the attention branch's
    :class:`~rnnkit.layers.attention.RotaryCacheState` (the last ``w - 1`` keys and values)."""

    memory: TitansState
    cache: RotaryCacheState


@register(
    "titans_mag",
    description="Titans memory as a gate (Behrouz et al. 2025): sliding-window attention gated by the neural memory",
    test_configs={
        "default": {"num_heads": 2, "head_dim": 3, "window": 4, "chunk_size": 16, "mini_batch_size": 4},
        "linear-memory": {"num_heads": 1, "head_dim": 4, "window": 2, "chunk_size": 16, "memory_depth": 1,
                          "mini_batch_size": 1},
    },
)
class TitansMAG(Recurrence):
    """Titans' memory as a gate (module docstring): ``o = W_o (norm(SWA(x)) * sigmoid(norm(M(x))))``.

    Args: the fields of :class:`TitansMAGConfig`.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state :class:`MAGState`: the memory's
    :class:`~rnnkit.layers._fast_weights.TitansState` (``3HP + 1`` floats, ``P`` the memory's weights
    per head) and the attention's KV cache (``(w - 1)(2HK + 1) + 1`` floats). Modes: ``recurrent``
    (both branches step by step, the definition), ``chunk`` (both branches' chunked forms; the
    default for more than one step).

    Example:
        >>> layer = TitansMAG(d_model=64, num_heads=4, window=128)
        >>> y, state = layer(torch.randn(2, 300, 64))     # y (2, 300, 64)
        >>> y_t, state = layer.step(torch.randn(2, 64), state)
    """

    MODES = ("recurrent", "chunk")

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = c = make_config(TitansMAGConfig, "titans_mag", config)
        D, H, K = c.d_model, c.num_heads, c.head_dim
        self.d_input = self.d_output = D
        self.attention = build("attention", d_model=D, num_heads=H, head_dim=K, window=c.window,
                               chunk_size=c.chunk_size)
        self.memory = build("titans", d_model=D, num_heads=H, head_dim=K, memory_depth=c.memory_depth,
                            expansion=c.expansion, mini_batch_size=c.mini_batch_size, base_lr=c.base_lr)
        self.gate = BranchGate(D, c.norm_eps)

    def _auto_mode(self, x: torch.Tensor) -> str:
        return "recurrent" if x.shape[1] == 1 else "chunk"

    def _init_state(self, batch_size, device, dtype):
        return MAGState(self.memory.init_state(batch_size, device=device, dtype=dtype),
                        self.attention.init_state(batch_size, device=device, dtype=dtype))

    def state_size_at(self, length: int) -> int:
        """The memory's constant state and the attention cache at ``length`` steps."""
        return self.memory.state_size + self.attention.state_size_at(length)

    def _forward(self, x, state, lengths, mode):
        y, cache = self.attention(x, state.cache, lengths, mode)
        m, memory = self.memory(x, state.memory, lengths, mode)
        return self.gate(y, m), MAGState(memory, cache)

    def _step(self, x_t, state):
        y, cache = self.attention.step(x_t, state.cache)
        m, memory = self.memory.step(x_t, state.memory)
        return self.gate(y, m), MAGState(memory, cache)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self.config).items())


@dataclass
class TitansMACConfig:
    """Options of :class:`TitansMAC`."""

    d_model: int  # input and output width D
    num_heads: int = 4  # H, of the attention and the memory
    head_dim: int | None = None  # K per head; default D // H
    segment_size: int = 64  # S: tokens per segment (and the memory's mini-batch)
    persistent: int = 4  # N_p: learned persistent tokens every query attends to (0: none)
    memory_depth: int = 2  # as titans
    expansion: int = 2  # as titans
    base_lr: float | None = None  # as titans; None: 1 / segment_size (see TitansMAC)
    norm_eps: float = 1e-5  # epsilon of the gate's RMSNorms

    def __post_init__(self) -> None:
        self.head_dim = check_head_config(self.d_model, self.num_heads, self.head_dim)
        check_positive_int("segment_size", self.segment_size)
        if self.base_lr is None:
            self.base_lr = 1.0 / self.segment_size
        check_positive_int("persistent", self.persistent, minimum=0)
        check_positive_number("norm_eps", self.norm_eps)


class MACState(NamedTuple):
    """State of :class:`TitansMAC`: ``memory`` the memory's
    :class:`~rnnkit.layers._fast_weights.TitansState` (its ``start`` is the memory at the current
    segment's start, its ``count`` the steps of the segment read), and the attention keys ``keys``
    and values ``values`` ``(B, H, 2(S - 1), K)`` of the segment's steps so far, the retrieved token
    of step ``i`` in slot ``2i`` and the step's own in ``2i + 1`` (slots past ``2 count`` are unused)."""

    memory: TitansState
    keys: torch.Tensor
    values: torch.Tensor


@register(
    "titans_mac",
    description="Titans memory as a context (Behrouz et al. 2025): segment attention over memory read-outs",
    test_configs={
        # base_lr 0.1: from the random-normal memory weights some suites start from, a two-layer memory
        # at larger rates grows without bound within a few segments, where two evaluation orders
        # (compiled and eager) part by more than fp32's rounding.
        "default": {"num_heads": 2, "head_dim": 2, "segment_size": 3, "persistent": 2, "base_lr": 0.1},
        "linear-memory-no-persistent": {"num_heads": 1, "head_dim": 3, "segment_size": 1, "persistent": 0,
                                        "memory_depth": 1},
    },
)
class TitansMAC(Recurrence):
    """Titans' memory as a context (module docstring).

    Args: the fields of :class:`TitansMACConfig`.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state :class:`MACState`: the memory's
    :class:`~rnnkit.layers._fast_weights.TitansState` (``3HP + 1`` floats, ``P`` the memory's weights
    per head) and the segment's keys and values (``4(S - 1)HK`` floats).

    The memory's inner learning rate defaults to ``1 / segment_size`` rather than ``titans``' 1: the
    memory takes a segment's gradients at the segment-start weights and adds them up, and the
    attention outputs of one segment it learns from are alike, so at ``base_lr = 1`` those steps add
    to ``segment_size`` times one step and the memory diverges.

    Modes: ``recurrent`` (token by token) and ``chunk`` (``auto``; a segment at a time, see the module
    docstring). ``chunk`` needs every sequence of the batch at the same place in its segment (a fresh
    state, or one left by a call without ``lengths``); a state whose sequences are at different places
    runs the token loop.

    Example:
        >>> layer = TitansMAC(d_model=64, num_heads=4, segment_size=32)
        >>> y, state = layer(torch.randn(2, 100, 64))     # y (2, 100, 64); state.keys (2, 4, 62, 16)
        >>> y_t, state = layer.step(torch.randn(2, 64), state)
    """

    MODES = ("recurrent", "chunk")
    # The memory's loop takes one dtype throughout: under autocast the layer runs in the parameters'.
    autocast_safe = False

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = c = make_config(TitansMACConfig, "titans_mac", config)
        D, H, K = c.d_model, c.num_heads, c.head_dim
        self.d_input = self.d_output = D
        self.memory = build("titans", d_model=D, num_heads=H, head_dim=K, memory_depth=c.memory_depth,
                            expansion=c.expansion, mini_batch_size=c.segment_size, base_lr=c.base_lr)
        self.persistent = nn.Parameter(torch.randn(c.persistent, D))  # N_p tokens, (N_p, D)
        self.qkv_proj = nn.Linear(D, 3 * H * K, bias=False)  # [q | k | v] of the attention
        self.o_proj = nn.Linear(H * K, D, bias=False)
        self.gate = BranchGate(D, c.norm_eps)

    def _init_state(self, batch_size, device, dtype):
        c = self.config
        slots = torch.zeros(batch_size, c.num_heads, 2 * (c.segment_size - 1), c.head_dim, device=device, dtype=dtype)
        return MACState(self.memory.init_state(batch_size, device=device, dtype=dtype), slots, slots.clone())

    def _forward(self, x, state, lengths, mode):
        S = self.config.segment_size
        if mode == "chunk" and torch.compiler.is_exporting():
            # An exported program would fix the segment boundaries of the state it was traced with.
            raise NotImplementedError("titans_mac: the chunk mode places its segments by the state's step "
                                      "count, which a traced program cannot read; export mode='recurrent'")
        position = _position(state.memory.count[:, 0], S)  # (B,) place in the current segment
        if mode == "chunk" and not tracing() and bool((position == position[0]).all()):
            ys, start, place = [], 0, int(position[0])
            while start < x.shape[1]:
                n = min(S - place, x.shape[1] - start)
                steps = None if lengths is None else (lengths - start).clamp(0, n)
                y, state = self._segment(x[:, start : start + n], state, position, steps)
                ys.append(y)
                start, place, position = start + n, 0, torch.zeros_like(position)
            return torch.cat(ys, 1), state
        ys = []
        for t in range(x.shape[1]):
            y_t, new = self._advance(x[:, t], state)
            state = freeze(step_valid(t, lengths), new, state)
            ys.append(y_t)
        return torch.stack(ys, 1), state

    def _step(self, x_t, state):
        return self._advance(x_t, state)

    def _views(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The attention's ``q``, ``k``, ``v`` ``(B, H, n, K)`` of ``tokens`` ``(B, n, D)``."""
        return tuple(split_heads(t, self.config.num_heads) for t in self.qkv_proj(tokens).chunk(3, -1))

    def _segment(self, x: torch.Tensor, state: MACState, position: torch.Tensor, steps: torch.Tensor | None):
        """``n`` steps of one segment at once: ``x`` ``(B, n, D)``, every sequence at ``position`` (B,)
        (all equal) in its segment with ``n`` at most the rest of the segment, ``steps`` (B,) the valid
        steps of each sequence (None: all). Returns ``(B, n, D)`` and the state after each sequence's
        valid steps; a sequence with none keeps its state."""
        c = self.config
        B, n, _ = x.shape
        memory, slots, place = self.memory, 2 * (c.segment_size - 1), int(position[0])
        # Retrieval: every token's query against the memory at the segment's start.
        start = tuple(w + w0 for w, w0 in zip(state.memory.start, memory.inner))
        retrieved = memory._output(_apply(None, _layers(start, memory.spec), memory._inner_inputs(x)[0]), x)
        q, k_x, v_x = self._views(x)  # (B, H, n, K)
        _, k_r, v_r = self._views(retrieved)
        positions = position[:, None] + torch.arange(n, device=x.device, dtype=position.dtype)  # (B, n)
        q, k_x, k_r = (rotate(t, positions) for t in (q, k_x, k_r))
        _, k_p, v_p = (t.expand(B, -1, -1, -1) for t in self._views(self.persistent[None]))  # (B, H, N_p, K)
        # Step i's retrieved and own key in slots 2i and 2i + 1, as the state stores them.
        new_k, new_v = (torch.stack([r, own], 3).flatten(2, 3) for r, own in ((k_r, k_x), (v_r, v_x)))
        old_used = torch.arange(slots, device=x.device) < 2 * place  # (2(S - 1),)
        # Slots of earlier segments' steps hold whatever a state brought in: zeroed, not only masked.
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        old_v = torch.where(old_used[:, None], state.values, zero)
        keys, values = torch.cat([k_p, state.keys, new_k], 2), torch.cat([v_p, old_v, new_v], 2)
        step = torch.arange(n, device=x.device)
        sees_new = torch.arange(2 * n, device=x.device)[None, :] // 2 <= step[:, None]  # (n, 2n)
        visible = torch.cat([torch.ones(n, c.persistent, dtype=torch.bool, device=x.device),
                             old_used.expand(n, -1), sees_new], 1)  # (n, N_p + 2(S - 1) + 2n)
        scores = (q @ keys.transpose(-1, -2)) / math.sqrt(c.head_dim)  # (B, H, n, N)
        weights = torch.softmax(scores.masked_fill(~visible, -math.inf), -1)
        y = self.o_proj(merge_heads(weights @ values))  # (B, n, D)
        # The memory learns from the attention's outputs, the segment being one of its mini-batches.
        full = steps is None or bool((steps == n).all())
        m, memory_state = memory._forward(y, state.memory, None if full else steps.clamp(min=1), "chunk")
        out = self.gate(y, m)
        # The state's slots gain the valid steps' pairs that fit (a segment's last step stores none).
        written = torch.full((B,), n, device=x.device) if steps is None else steps
        slot = torch.arange(slots, device=x.device)
        writes = (slot >= 2 * place) & (slot[None, :] < 2 * (place + written[:, None]))  # (B, 2(S - 1))
        writes = writes[:, None, :, None]

        def stored(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            aligned = torch.cat([old[:, :, : 2 * place], new, old[:, :, 2 * place + 2 * n :]], 2)[:, :, :slots]
            return torch.where(writes, aligned, old)

        new_state = MACState(memory_state, stored(state.keys, new_k), stored(state.values, new_v))
        if not full:
            new_state = freeze(steps > 0, new_state, state)
        return out, new_state

    def _advance(self, x_t: torch.Tensor, state: MACState) -> tuple[torch.Tensor, MACState]:
        """One step: ``x_t`` ``(B, D)`` -> ``(B, D)`` and the next state."""
        c = self.config
        B, S, memory = x_t.shape[0], c.segment_size, self.memory
        x1 = x_t[:, None]  # (B, 1, D)
        position = _position(state.memory.count[:, 0], S)  # (B,) steps of the segment already read
        # Retrieval: the memory at the segment's start read with the token's query, no update.
        start = tuple(w + w0 for w, w0 in zip(state.memory.start, memory.inner))
        read = _apply(None, _layers(start, memory.spec), memory._inner_inputs(x1)[0])  # (B, H, 1, K)
        retrieved = memory._output(read, x1)  # (B, 1, D)
        # Attention of the token over the persistent tokens, the segment so far, its retrieval and itself.
        q, k_x, v_x = self._views(x1)
        _, k_r, v_r = self._views(retrieved)
        positions = position[:, None]  # (B, 1): the step's place in its segment
        q, k_x, k_r = (rotate(t, positions) for t in (q, k_x, k_r))
        _, k_p, v_p = (t.expand(B, -1, -1, -1) for t in self._views(self.persistent[None]))  # (B, H, N_p, K)
        keys = torch.cat([k_p, state.keys, k_r, k_x], 2)  # (B, H, N_p + 2(S - 1) + 2, K)
        values = torch.cat([v_p, state.values, v_r, v_x], 2)
        slot = torch.arange(2 * (S - 1), device=x_t.device)
        used = slot[None, :] < 2 * position[:, None]  # (B, 2(S - 1))
        always = torch.ones(B, c.persistent, dtype=torch.bool, device=x_t.device)
        valid = torch.cat([always, used, torch.ones(B, 2, dtype=torch.bool, device=x_t.device)], 1)[:, None, None]
        scores = (q @ keys.transpose(-1, -2)) / math.sqrt(c.head_dim)  # (B, H, 1, N)
        weights = torch.softmax(scores.masked_fill(~valid, -math.inf), -1)
        # Unused slots hold whatever a state brought in: where, not a zero weight, keeps them out.
        values = torch.where(valid[:, :, 0, :, None], values, torch.zeros((), dtype=values.dtype, device=values.device))
        y = self.o_proj(merge_heads(weights @ values))  # (B, 1, D)
        # The memory learns from the attention's output and reads it out after its update.
        m, memory_state = memory._forward(y, state.memory, None, "recurrent")
        out = self.gate(y, m)[:, 0]
        # The segment's keys and values gain this step's pair; a full segment starts empty.
        index = 2 * position.long()[:, None, None, None]  # (B, 1, 1, 1)
        here = slot[None, None, :, None]
        new_keys = torch.where(here == index, k_r, torch.where(here == index + 1, k_x, state.keys))
        new_values = torch.where(here == index, v_r, torch.where(here == index + 1, v_x, state.values))
        return out, MACState(memory_state, new_keys, new_values)
