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
initialised as ``torch.nn.Linear``. It is the reference point every recurrent layer is compared
with: memory and per-step cost grow with the context instead of staying constant.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from rnnkit.errors import check_positive_int
from rnnkit.layers._multihead import MultiHeadRecurrence, check_head_config, merge_heads, split_heads
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.gated_linear_attention import DEFAULT_CHUNK
from rnnkit.ops.sliding_window_attention import (
    WindowState,
    empty_window,
    sliding_window_attention_chunk,
    sliding_window_attention_parallel,
    sliding_window_attention_recurrent,
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

    def __post_init__(self) -> None:
        self.head_dim = check_head_config(self.d_model, self.num_heads, self.head_dim)
        if self.window is not None:
            check_positive_int("window", self.window)
        check_positive_int("max_len", self.max_len)
        check_positive_int("chunk_size", self.chunk_size)


@register(
    "attention",
    description="Causal softmax attention (Vaswani et al. 2017), optional sliding window; state = KV cache",
    test_configs={
        "full": {"num_heads": 1, "head_dim": 2, "max_len": 300, "chunk_size": 16},
        "window": {"num_heads": 2, "head_dim": 2, "window": 5, "chunk_size": 16},
    },
)
class Attention(MultiHeadRecurrence):
    """Multi-head causal softmax attention with a KV-cache state (see the module docstring).

    Args: the fields of :class:`AttentionConfig`.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state :class:`~rnnkit.ops.sliding_window_attention.WindowState`
    ``k`` (B, H, S, K), ``v`` (B, H, S, K), ``valid`` (B, S) with ``S = w - 1`` or ``max_len``.

    Example:
        >>> layer = Attention(d_model=64, num_heads=4, window=128)
        >>> y, cache = layer(torch.randn(2, 100, 64))    # y (2, 100, 64); cache.k (2, 4, 127, 16)
        >>> layer.state_size_at(100), layer.state_size     # (12900, 16383): 100 of 127 slots used
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
        return empty_window(batch_size, c.num_heads, self.span, c.head_dim, c.head_dim, device, dtype)

    def state_size_at(self, length: int) -> int:
        """Floats of the KV cache once ``length`` steps have been read: ``min(length, S)`` slots of
        ``H (K + V)`` keys and values plus the slot's validity flag (``S = w - 1`` or ``max_len``),
        so ``state_size`` (the preallocated capacity) once the cache is full."""
        check_positive_int("length", length, minimum=0)
        c = self.config
        slots = min(length, self.span - 1)
        return slots * (2 * c.num_heads * c.head_dim + 1)

    def _forward(self, x, state, lengths, mode):
        c = self.config
        q, k, v = (split_heads(t, c.num_heads) for t in self.qkv_proj(x).chunk(3, -1))  # (B, H, T, K)
        state = WindowState(*state)
        if mode == "chunk":
            y, state = sliding_window_attention_chunk(q, k, v, self.span, state, lengths, chunk_size=c.chunk_size)
        elif mode == "parallel":
            y, state = sliding_window_attention_parallel(q, k, v, self.span, state, lengths)
        else:
            y, state = sliding_window_attention_recurrent(q, k, v, self.span, state, lengths)
        return self.o_proj(merge_heads(y)), state
