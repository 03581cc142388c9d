"""Causal softmax attention (Vaswani et al. 2017, "Attention Is All You Need", multi-head scaled
dot-product attention with a causal mask) as a recurrence whose state is the key/value cache:

    y_t = W_o [softmax_s(q_t^(h) . k_s^(h) / sqrt(K)) v_s^(h)]_h     over s in (t - w, t]

With ``window=w`` it is sliding-window attention (Beltagy et al. 2020, "Longformer"; Child et al.
2019) and the cache holds the last ``w - 1`` steps. With ``window=None`` the cache has room for
``max_len`` steps: exact full causal attention for every sequence (history included) of up to
``max_len`` steps, after which the oldest steps leave the cache. The cache is preallocated with a
validity flag per slot, so the state has a fixed shape (the contract's split-sequence and padding
checks apply unchanged) and ``state_size`` is the cache's capacity in floats; ``state_size_at(T)``
is the cache at length ``T``, ``min(T, S) (2 H K + 1)`` floats: it grows with the context, where a
recurrence's state does not (the x-axis of a recall-vs-state-size comparison). Projections are
initialised as ``torch.nn.Linear``.

Positions (``rope=True``, the default): rotary position embeddings (Su et al. 2021, "RoFormer", base
10000) rotate each head's query and key at absolute position ``p`` by angles ``p * 10000^(-2i/K)``,
so ``q_t . k_s`` depends on the positions only through ``t - s``. Feature ``i`` is paired with
``i + K/2`` (the same map as RoFormer's adjacent pairs up to a fixed permutation of the projection's
features; an odd ``K`` leaves its last feature unrotated). The cache stores keys already rotated and
the state carries the absolute position of the next step (one float per sequence in the state's
dtype: exact up to 2^24 steps in fp32, 2^53 in fp64, but only 2,048 in fp16 and 256 in bf16, so run
long contexts with an fp32 state, e.g. under autocast), so split calls, ``step``, a rolling window and ragged
``lengths`` see the same positions as one full forward. Angles are computed in fp64 and only their
cosines and sines cast to the compute dtype. ``rope=False`` is NoPE: the causal mask is the only
source of order. It is the reference point every recurrent layer is compared
with: memory and per-step cost grow with the context instead of staying constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from rnnkit.errors import InputError, check_positive_int
from rnnkit.layers._multihead import MultiHeadRecurrence, check_head_config, merge_heads, split_heads
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.gated_linear_attention import DEFAULT_CHUNK
from rnnkit.ops.sliding_window_attention import (
    WindowState,
    empty_window,
    sliding_window_attention,
)


@dataclass
class AttentionConfig:
    """Options of :class:`Attention`."""

    d_model: int  # input and output width D
    num_heads: int = 4  # H
    head_dim: int | None = None  # K = V per head; default d_model // H
    window: int | None = None  # w: keys per query (the current one included); None = full (up to max_len)
    max_len: int = 2048  # cache capacity in steps when window is None
    chunk_size: int = DEFAULT_CHUNK  # C, queries per block in the chunk mode
    rope: bool = True  # rotary position embeddings on q and k (Su et al. 2021); False = no positions

    def __post_init__(self) -> None:
        self.head_dim = check_head_config(self.d_model, self.num_heads, self.head_dim)
        if self.window is not None:
            check_positive_int("window", self.window)
        check_positive_int("max_len", self.max_len)
        check_positive_int("chunk_size", self.chunk_size)
        if not isinstance(self.rope, bool):
            raise InputError(f"rope: expected a bool, got {self.rope!r}")


ROPE_BASE = 10000.0  # RoFormer's base


class RotaryCacheState(NamedTuple):
    """The KV cache of :class:`Attention` with ``rope=True``: :class:`WindowState`'s rotated keys ``k``
    (B, H, S, K), values ``v`` (B, H, S, V), ``valid`` (B, S), and ``position`` (B, 1), the absolute
    position of each sequence's next step."""

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    position: torch.Tensor


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float = ROPE_BASE) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021): ``x`` (B, H, T, K) with feature pairs
    ``(i, i + K/2)`` rotated by ``positions`` (B, T) times ``base^(-2i/K)``; the angles are computed in
    fp64, so the rotation stays accurate at positions where fp32 angles would not."""
    half = x.shape[-1] // 2
    if half == 0:
        return x
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) * 2 / x.shape[-1])
    angles = positions.to(torch.float64)[:, None, :, None] * inv_freq  # (B, 1, T, K/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], -1)


def empty_cache(batch_size: int, num_heads: int, span: int, head_dim: int, rope: bool, device, dtype):
    """The empty KV cache of ``span - 1`` slots: a :class:`RotaryCacheState` at position 0 (``rope``)
    or a :class:`WindowState`."""
    cache = empty_window(batch_size, num_heads, span, head_dim, head_dim, device, dtype)
    if not rope:
        return cache
    return RotaryCacheState(*cache, torch.zeros(batch_size, 1, device=device, dtype=dtype))


def cached_attention(q, k, v, cache, lengths, mode: str, span: int, chunk_size: int, rope: bool):
    """Causal attention of ``q``, ``k``, ``v`` ``(B, H, T, K)`` over the keys of the last ``span`` steps,
    the cache's included, in ``mode`` (a form of :func:`sliding_window_attention`); with ``rope`` the
    cache is a :class:`RotaryCacheState` and the queries and keys are first rotated by their absolute
    positions.

    Returns ``y`` ``(B, H, T, K)`` and the cache after each sequence's last valid step.
    """
    if rope:
        position = cache[3]
        positions = position.to(torch.float64) + torch.arange(q.shape[2], device=q.device, dtype=torch.float64)
        q, k = rotate(q, positions), rotate(k, positions)
        steps = lengths[:, None].to(position.dtype) if lengths is not None else q.shape[2]
    y, window = sliding_window_attention(q, k, v, span, WindowState(*cache[:3]), lengths, mode=mode,
                                         chunk_size=chunk_size)
    return y, (RotaryCacheState(*window, position + steps) if rope else window)


@register(
    "attention",
    description="Causal softmax attention (Vaswani et al. 2017), optional sliding window; state = KV cache",
    test_configs={
        "full": {"num_heads": 1, "head_dim": 2, "max_len": 300, "chunk_size": 16},
        "window": {"num_heads": 2, "head_dim": 2, "window": 5, "chunk_size": 16},
        "nope": {"num_heads": 2, "head_dim": 2, "window": 5, "chunk_size": 16, "rope": False},
    },
)
class Attention(MultiHeadRecurrence):
    """Multi-head causal softmax attention with a KV-cache state (see the module docstring).

    Args: the fields of :class:`AttentionConfig`.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state :class:`RotaryCacheState` (``rope=True``) or
    :class:`~rnnkit.ops.sliding_window_attention.WindowState` (``rope=False``): ``k`` (B, H, S, K),
    ``v`` (B, H, S, K), ``valid`` (B, S) with ``S = w - 1`` or ``max_len``, and ``position`` (B, 1).

    Example:
        >>> layer = Attention(d_model=64, num_heads=4, window=128)
        >>> y, cache = layer(torch.randn(2, 100, 64))    # y (2, 100, 64); cache.k (2, 4, 127, 16)
        >>> layer.state_size_at(100), layer.state_size     # (12901, 16384): 100 of 127 slots used
    """

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = c = make_config(AttentionConfig, "attention", config)
        self.d_input = self.d_output = c.d_model
        # A cache of S slots plus the current step: window S + 1.
        self.span = c.window if c.window is not None else c.max_len + 1
        self.qkv_proj = nn.Linear(c.d_model, 3 * c.num_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.d_model, bias=False)

    def _init_state(self, batch_size, device, dtype):
        c = self.config
        return empty_cache(batch_size, c.num_heads, self.span, c.head_dim, c.rope, device, dtype)

    def state_size_at(self, length: int) -> int:
        """Floats of the KV cache once ``length`` steps have been read: ``min(length, S)`` slots of
        ``H (K + V)`` keys and values plus the slot's validity flag (``S = w - 1`` or ``max_len``), and
        with ``rope`` the position counter, so ``state_size`` (the capacity) once the cache is full."""
        check_positive_int("length", length, minimum=0)
        c = self.config
        slots = min(length, self.span - 1)
        return slots * (2 * c.num_heads * c.head_dim + 1) + int(c.rope)

    def _forward(self, x, state, lengths, mode):
        c = self.config
        q, k, v = (split_heads(t, c.num_heads) for t in self.qkv_proj(x).chunk(3, -1))  # (B, H, T, K)
        y, state = cached_attention(q, k, v, state, lengths, mode, self.span, c.chunk_size, c.rope)
        return self.o_proj(merge_heads(y)), state
