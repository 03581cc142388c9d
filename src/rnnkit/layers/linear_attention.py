"""Linear attention as a recurrence (Katharopoulos et al. 2020, "Transformers are RNNs", eq. 16-20).

    S_t = S_{t-1} + phi(k_t) v_t^T        z_t = z_{t-1} + phi(k_t)
    o_t = S_t^T phi(q_t) / (z_t^T phi(q_t) + eps)   (or S_t^T phi(q_t) / sqrt(K) without normaliser)
    y_t = W_o [o_t^(1); ...; o_t^(H)]

per head, with ``q = W_q x``, ``k = W_k x``, ``v = W_v x`` and a feature map ``phi`` (identity,
``elu+1`` as in the paper, relu, or the 2nd-order Taylor map of Based). The normaliser ``z`` rides
along as an extra column of ones in ``v``, so the three forms are those of
:mod:`rnnkit.ops.gated_linear_attention` with zero log-decay. Projections are initialised as
``torch.nn.Linear`` (the paper uses the transformer's standard initialisation).

``use_short_conv=True`` (not in the paper; off by default) puts a causal depthwise convolution of width
``conv_size`` on q, k and v before ``phi``, without an activation of its own (``phi`` stays the only
nonlinearity): the short convolution that Arora et al. (2023, "Zoology", section 4; Based) show
linear-attention-style layers need for associative recall. The state is then
:class:`~rnnkit.layers._multihead.ConvState` (``S``, the last ``W - 1`` projections).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rnnkit.errors import InputError, check_choice, check_positive_int
from rnnkit.layers._multihead import (
    FEATURE_MAPS,
    ConvState,
    MultiHeadRecurrence,
    ShortConv,
    check_head_config,
    feature_dim,
    feature_map,
    merge_heads,
    short_conv_qkv,
    split_heads,
)
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.gated_linear_attention import DEFAULT_CHUNK, gated_linear_attention


@dataclass
class LinearAttentionConfig:
    """Options of :class:`LinearAttention`."""

    d_model: int  # input and output width D
    num_heads: int = 4  # H
    head_dim: int | None = None  # K = V per head; default d_model // num_heads
    feature_map: str = "elu+1"  # phi: "identity", "elu+1" (the paper), "relu", "taylor"
    normalize: bool = True  # divide by z_t^T phi(q_t) (the paper); needs a non-negative phi
    eps: float = 1e-6  # added to the normaliser
    chunk_size: int = DEFAULT_CHUNK  # C of the chunk mode
    use_short_conv: bool = False  # a short causal convolution on q, k, v before phi (not in the paper)
    conv_size: int = 4  # W of the short convolution (>= 2)

    def __post_init__(self) -> None:
        self.head_dim = check_head_config(self.d_model, self.num_heads, self.head_dim)
        check_choice("feature_map", self.feature_map, FEATURE_MAPS)
        for name in ("normalize", "use_short_conv"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        check_positive_int("conv_size", self.conv_size, minimum=2)
        if self.normalize and self.feature_map == "identity":
            raise InputError(
                "feature_map: expected a non-negative map ('elu+1', 'relu', 'taylor') with normalize=True, "
                "got 'identity' (its normaliser can cross zero)"
            )
        if not isinstance(self.eps, (int, float)) or self.eps <= 0:
            raise InputError(f"eps: expected a positive number, got {self.eps!r}")


@register(
    "linear_attention",
    description="Linear attention (Katharopoulos et al. 2020), multi-head, feature maps identity/elu+1",
    test_configs={
        "elu": {"num_heads": 2, "head_dim": 3},
        "identity-unnormalized": {"num_heads": 1, "head_dim": 4, "feature_map": "identity", "normalize": False,
                                  "chunk_size": 16},
        "short-conv": {"num_heads": 1, "head_dim": 3, "use_short_conv": True, "conv_size": 3, "chunk_size": 16},
    },
)
class LinearAttention(MultiHeadRecurrence):
    """Multi-head linear attention (see the module docstring for the math and reference).

    Args: the fields of :class:`LinearAttentionConfig`.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state ``(B, H, F, V + n)`` with ``F`` the feature
    width (``K``, or ``1 + K + K^2`` for ``taylor``) and ``n = 1`` when normalised: the last column
    is then the normaliser ``z``; with ``use_short_conv``,
    :class:`~rnnkit.layers._multihead.ConvState` (``S`` as above, ``conv`` (B, 3 H K, W - 1)).

    Example:
        >>> layer = LinearAttention(d_model=64, num_heads=4)
        >>> y, S = layer(torch.randn(2, 100, 64))          # y (2, 100, 64), S (2, 4, 16, 17)
        >>> y_t, S = layer.step(torch.randn(2, 64), S)
    """

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = c = make_config(LinearAttentionConfig, "linear_attention", config)
        self.d_input = self.d_output = c.d_model
        inner = c.num_heads * c.head_dim
        self.q_proj = nn.Linear(c.d_model, inner, bias=False)
        self.k_proj = nn.Linear(c.d_model, inner, bias=False)
        self.v_proj = nn.Linear(c.d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, c.d_model, bias=False)
        self.feature_width = feature_dim(c.feature_map, c.head_dim)
        # One depthwise convolution over [q | k | v] = one per projection; linear, so phi stays the map.
        self.conv = ShortConv(3 * inner, c.conv_size, activation="identity", bias=False) if c.use_short_conv else None

    def _init_state(self, batch_size, device, dtype):
        c = self.config
        S = torch.zeros(batch_size, c.num_heads, self.feature_width, c.head_dim + int(c.normalize),
                        device=device, dtype=dtype)
        if self.conv is None:
            return S
        return ConvState(S, self.conv.init_state(batch_size, device=device, dtype=dtype))

    def _forward(self, x, state, lengths, mode):
        c = self.config
        projected = (self.q_proj(x), self.k_proj(x), self.v_proj(x))  # (B, T, H*K), (B, T, H*K), (B, T, H*V)
        (q, k, v), S, history = short_conv_qkv(self.conv, projected, state, lengths)
        q = feature_map(c.feature_map, split_heads(q, c.num_heads))  # (B, H, T, F)
        k = feature_map(c.feature_map, split_heads(k, c.num_heads))  # (B, H, T, F)
        v = split_heads(v, c.num_heads)  # (B, H, T, V)
        if c.normalize:
            v = torch.cat([v, torch.ones_like(v[..., :1])], -1)  # (B, H, T, V+1): last column accumulates z
        else:
            q = q * self.feature_width**-0.5
        log_decay = q.new_zeros(q.shape[:3])  # (B, H, T): no forgetting
        o, S = gated_linear_attention(q, k, v, log_decay, S, lengths, mode=mode, chunk_size=c.chunk_size)
        if c.normalize:
            o = o[..., :-1] / (o[..., -1:] + c.eps)  # (B, H, T, V)
        return self.o_proj(merge_heads(o)), S if history is None else ConvState(S, history)
