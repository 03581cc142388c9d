"""Based (Arora et al. 2024, "Simple linear attention language models balance the recall-throughput
tradeoff"): the two sequence mixers of the Based architecture in one layer, outputs summed,

    o_t = S_t^T phi(q_t) / (z_t^T phi(q_t) + eps)     S_t = S_{t-1} + phi(k_t) v_t^T, z_t = z_{t-1} + phi(k_t)
    a_t = sum_{s in (t-w, t]} softmax_s(q'_t . k'_s / sqrt(K)) v'_s
    y_t = W_o [o_t + a_t]   (heads merged)

with ``phi`` the 2nd-order Taylor feature map ``phi(x) . phi(y) = 1 + s + s^2/2``, ``s = x.y/sqrt(d)``,
on small projected features (``d = 16`` in the paper, section 4), giving global linear-attention
recall from a fixed-size state, and exact softmax attention over a short sliding window (64 in
the paper) for local precision. The window's keys and values are part of the state, so memory
stays constant per sequence. Projections initialised as ``torch.nn.Linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from rnnkit.errors import InputError, check_positive_int
from rnnkit.layers._multihead import MultiHeadRecurrence, check_head_config, feature_dim, feature_map, merge_heads, split_heads
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.gated_linear_attention import DEFAULT_CHUNK, gated_linear_attention
from rnnkit.ops.sliding_window_attention import (
    WindowState,
    empty_window,
    sliding_window_attention,
)


class BasedState(NamedTuple):
    """``kv`` (B, H, F, V+1) linear-attention state (last column: normaliser); the window's
    ``win_k`` (B, H, w-1, K), ``win_v`` (B, H, w-1, V), ``win_valid`` (B, w-1)."""

    kv: torch.Tensor
    win_k: torch.Tensor
    win_v: torch.Tensor
    win_valid: torch.Tensor


@dataclass
class BasedConfig:
    """Options of :class:`Based`."""

    d_model: int  # input and output width D
    num_heads: int = 4  # H
    head_dim: int | None = None  # K = V per head for values and window attention; default d_model // H
    feature_dim: int = 16  # d, the projected width the Taylor map expands to 1 + d + d^2
    window: int = 64  # w, keys per query of the sliding-window attention (the current one included)
    eps: float = 1e-6  # added to the linear-attention normaliser
    chunk_size: int = DEFAULT_CHUNK  # C of the chunk mode

    def __post_init__(self) -> None:
        self.head_dim = check_head_config(self.d_model, self.num_heads, self.head_dim)
        check_positive_int("feature_dim", self.feature_dim)
        check_positive_int("window", self.window)
        if not isinstance(self.eps, (int, float)) or self.eps <= 0:
            raise InputError(f"eps: expected a positive number, got {self.eps!r}")
        check_positive_int("chunk_size", self.chunk_size)


@register(
    "based",
    description="Based (Arora et al. 2024): Taylor linear attention + sliding-window softmax attention",
    test_configs={"default": {"num_heads": 1, "head_dim": 2, "feature_dim": 2, "window": 4, "chunk_size": 16}},
)
class Based(MultiHeadRecurrence):
    """Based layer (see the module docstring for the math and reference).

    Args: the fields of :class:`BasedConfig`.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state :class:`BasedState`.

    Example:
        >>> layer = Based(d_model=64, num_heads=4, feature_dim=8, window=32)
        >>> y, state = layer(torch.randn(2, 100, 64))    # y (2, 100, 64); state.kv (2, 4, 73, 17)
    """

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = c = make_config(BasedConfig, "based", config)
        self.d_input = self.d_output = c.d_model
        H, K, d = c.num_heads, c.head_dim, c.feature_dim
        self.fq_proj = nn.Linear(c.d_model, H * d, bias=False)  # linear-attention features
        self.fk_proj = nn.Linear(c.d_model, H * d, bias=False)
        self.qkv_proj = nn.Linear(c.d_model, 3 * H * K, bias=False)  # window attention q, k and shared v
        self.o_proj = nn.Linear(H * K, c.d_model, bias=False)
        self.feature_width = feature_dim("taylor", d)

    def _init_state(self, batch_size, device, dtype):
        c = self.config
        z = dict(device=device, dtype=dtype)
        kv = torch.zeros(batch_size, c.num_heads, self.feature_width, c.head_dim + 1, **z)
        return BasedState(kv, *empty_window(batch_size, c.num_heads, c.window, c.head_dim, c.head_dim, **z))

    def _forward(self, x, state, lengths, mode):
        c = self.config
        H = c.num_heads
        fq = feature_map("taylor", split_heads(self.fq_proj(x), H))  # (B, H, T, F)
        fk = feature_map("taylor", split_heads(self.fk_proj(x), H))  # (B, H, T, F)
        q, k, v = (split_heads(t, H) for t in self.qkv_proj(x).chunk(3, -1))  # (B, H, T, K)
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)  # (B, H, T, V+1): last column accumulates z
        o, kv = gated_linear_attention(fq, fk, v1, fq.new_zeros(fq.shape[:3]), state.kv, lengths, mode=mode,
                                       chunk_size=c.chunk_size)
        o = o[..., :-1] / (o[..., -1:] + c.eps)  # (B, H, T, V)
        window = WindowState(state.win_k, state.win_v, state.win_valid)
        a, window = sliding_window_attention(q, k, v, c.window, window, lengths, mode=mode, chunk_size=c.chunk_size)
        return self.o_proj(merge_heads(o + a)), BasedState(kv, *window)
