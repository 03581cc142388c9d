"""Gated linear attention (Yang et al. 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training", eq. 3 and section 4.1):

    alpha_t = sigmoid(W_a2 W_a1 x_t + b_a)^(1/tau)            (B, H, K) data-dependent forget gate
    S_t = (alpha_t 1^T) ⊙ S_{t-1} + k_t v_t^T                 o_t = S_t^T q_t   (q scaled by K^-1/2)
    y_t = W_o (swish(W_r x_t) ⊙ RMSNorm_h(o_t))

with a low-rank gate projection (rank 16) and temperature ``tau = 16`` so that the gates start close
to 1 (long memory), key width ``d_model / 2`` and value width ``d_model`` over all heads (the paper's
``d_k = d/2``, ``d_v = d``). The gate lives in log space, ``log alpha = logsigmoid(.) / tau``, and
the three forms are :mod:`rnnkit.ops.gated_linear_attention` with per-key-dimension decay.
Projections are Xavier-uniform with gain ``2^-2.5`` as in the authors' flash-linear-attention code.

``use_short_conv=True`` (flash-linear-attention's option of the same name, off by default there and
here) puts a causal depthwise convolution of width ``conv_size`` with SiLU on q, k and v, as DeltaNet
has; the state is then :class:`~rnnkit.layers._multihead.ConvState` (``S``, the last ``W - 1``
projections). A short convolution lets each key see its neighbours, which associative recall needs
(Arora et al. 2023, "Zoology", section 4).

``allow_neg_eigval=True`` takes the decay ``2 alpha_t - 1`` in ``(-1, 1)`` instead of ``alpha_t``
(Grazzi et al. 2025, "Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues"), given
to the kernel as its log-magnitude and sign (:func:`~rnnkit.layers._multihead.signed_decay`).
Where a decay is near 0, the parallel and chunk forms' fp32 gradient of it is less accurate than
the loop's: they form ``dL/d log|a|`` (which vanishes like ``|a|``) as a difference of terms of the
state's size, and ``d log|a| / da = 1 / a`` multiplies its rounding error by ``1 / |a|``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import InputError, check_bool, check_positive_int
from rnnkit.layers._multihead import (
    ConvState,
    HeadNorm,
    MultiHeadRecurrence,
    ShortConv,
    check_head_config,
    merge_heads,
    short_conv_qkv,
    signed_decay,
    split_heads,
)
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.gated_linear_attention import DEFAULT_CHUNK, gated_linear_attention, gated_linear_attention_step


@dataclass
class GLAConfig:
    """Options of :class:`GLA`."""

    d_model: int  # input and output width D
    num_heads: int = 4  # H
    key_dim: int | None = None  # K per head; default d_model // (2 H) (the paper's d_k = d / 2), at least 1
    value_dim: int | None = None  # V per head; default d_model // H
    gate_rank: int = 16  # rank of the gate projection W_a2 W_a1
    gate_temperature: float = 16.0  # tau: log alpha = logsigmoid(.) / tau
    chunk_size: int = DEFAULT_CHUNK  # C of the chunk mode (a power of two)
    use_short_conv: bool = False  # a SiLU short convolution on q, k, v (fla's option, off there too)
    conv_size: int = 4  # W of the short convolution (>= 2)
    allow_neg_eigval: bool = False  # decay 2 alpha - 1 in (-1, 1) (Grazzi et al. 2025)

    def __post_init__(self) -> None:
        self.value_dim = check_head_config(self.d_model, self.num_heads, self.value_dim, "value_dim")
        check_bool("use_short_conv", self.use_short_conv)
        check_bool("allow_neg_eigval", self.allow_neg_eigval)
        check_positive_int("conv_size", self.conv_size, minimum=2)
        if self.key_dim is None:
            self.key_dim = max(1, self.d_model // (2 * self.num_heads))
        check_positive_int("key_dim", self.key_dim)
        check_positive_int("gate_rank", self.gate_rank)
        if not isinstance(self.gate_temperature, (int, float)) or self.gate_temperature <= 0:
            raise InputError(f"gate_temperature: expected a positive number, got {self.gate_temperature!r}")
        check_positive_int("chunk_size", self.chunk_size)
        if self.chunk_size & (self.chunk_size - 1):
            raise InputError(f"chunk_size: expected a power of two, got {self.chunk_size}")


@register(
    "gla",
    description="Gated linear attention (Yang et al. 2024): data-dependent per-key-dim gates, low-rank",
    test_configs={
        "default": {"num_heads": 2, "key_dim": 2, "value_dim": 3, "gate_rank": 2, "chunk_size": 16},
        "short-conv": {"num_heads": 1, "key_dim": 2, "value_dim": 3, "gate_rank": 2, "chunk_size": 16,
                       "use_short_conv": True, "conv_size": 3},
        # temperature 1/4: at init alpha ~ 0.5^4, decays 2 alpha - 1 ~ -0.9, whose signs alternate the
        # state (the module docstring says why decays near 0 are left out of an fp32 comparison)
        "neg-eigval": {"num_heads": 2, "key_dim": 2, "value_dim": 3, "gate_rank": 2, "chunk_size": 16,
                       "gate_temperature": 0.25, "allow_neg_eigval": True},
    },
)
class GLA(MultiHeadRecurrence):
    """Gated linear attention layer (see the module docstring for the math and reference).

    Args: the fields of :class:`GLAConfig`.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state ``(B, H, K, V)``, or with ``use_short_conv``
    :class:`~rnnkit.layers._multihead.ConvState` (``S`` (B, H, K, V), ``conv`` (B, H (2K + V), W - 1)).

    Example:
        >>> layer = GLA(d_model=64, num_heads=4)
        >>> y, S = layer(torch.randn(2, 100, 64))      # y (2, 100, 64), S (2, 4, 8, 16)
        >>> y, state = GLA(d_model=64, use_short_conv=True)(torch.randn(2, 100, 64))  # state.conv (2, 128, 3)
    """

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = c = make_config(GLAConfig, "gla", config)
        self.d_input = self.d_output = c.d_model
        H, K, V = c.num_heads, c.key_dim, c.value_dim
        self.q_proj = nn.Linear(c.d_model, H * K, bias=False)
        self.k_proj = nn.Linear(c.d_model, H * K, bias=False)
        self.v_proj = nn.Linear(c.d_model, H * V, bias=False)
        self.gate_down = nn.Linear(c.d_model, c.gate_rank, bias=False)  # W_a1
        self.gate_up = nn.Linear(c.gate_rank, H * K, bias=True)  # W_a2, b_a
        self.r_proj = nn.Linear(c.d_model, H * V, bias=False)  # output gate W_r
        self.o_proj = nn.Linear(H * V, c.d_model, bias=False)
        self.norm = HeadNorm(H, V, kind="rms")
        # One depthwise convolution over [q | k | v] = one per projection (no bias, as in fla).
        self.conv = ShortConv(H * (2 * K + V), c.conv_size, activation="silu", bias=False) if c.use_short_conv else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.gate_down, self.gate_up, self.r_proj, self.o_proj):
            nn.init.xavier_uniform_(lin.weight, gain=2**-2.5)
        nn.init.zeros_(self.gate_up.bias)

    def _init_state(self, batch_size, device, dtype):
        c = self.config
        S = torch.zeros(batch_size, c.num_heads, c.key_dim, c.value_dim, device=device, dtype=dtype)
        if self.conv is None:
            return S
        return ConvState(S, self.conv.init_state(batch_size, device=device, dtype=dtype))

    def _forward(self, x, state, lengths, mode):
        c = self.config
        projected = (self.q_proj(x), self.k_proj(x), self.v_proj(x))  # (B, T, H*K), (B, T, H*K), (B, T, H*V)
        (q, k, v), S, history = short_conv_qkv(self.conv, projected, state, lengths)
        q = split_heads(q, c.num_heads) * c.key_dim**-0.5  # (B, H, T, K)
        k = split_heads(k, c.num_heads)  # (B, H, T, K)
        v = split_heads(v, c.num_heads)  # (B, H, T, V)
        gate = F.logsigmoid(self.gate_up(self.gate_down(x))) / c.gate_temperature  # (B, T, H*K), log alpha
        log_decay = split_heads(gate, c.num_heads)  # (B, H, T, K)
        sign = None
        if c.allow_neg_eigval:
            log_decay, sign = signed_decay(log_decay)
        o, S = gated_linear_attention(q, k, v, log_decay, S, lengths, mode=mode, chunk_size=c.chunk_size,
                                      decay_sign=sign)
        y = self.norm(merge_heads(o), self.r_proj(x))  # swish(W_r x) ⊙ RMSNorm(o)
        return self.o_proj(y), S if history is None else ConvState(S, history)

    def _step(self, x_t, state):
        # The recurrent form's update at one step, without its time axis (head splits, the op's
        # checks, a stack of one output): the decoding path (benchmarks/decode_speed.py --profile).
        # The short convolution's history and signed decays take the general one-step forward.
        c = self.config
        if self.conv is not None or c.allow_neg_eigval:
            return super()._step(x_t, state)
        B, H, K, V = x_t.shape[0], c.num_heads, c.key_dim, c.value_dim
        q = self.q_proj(x_t).view(B, H, K) * K**-0.5
        k = self.k_proj(x_t).view(B, H, K)
        v = self.v_proj(x_t).view(B, H, V)
        log_decay = (F.logsigmoid(self.gate_up(self.gate_down(x_t))) / c.gate_temperature).view(B, H, K)
        o, S = gated_linear_attention_step(q, k, v, log_decay, state)  # (B, H, V)
        return self.o_proj(self.norm(o.reshape(B, H * V), self.r_proj(x_t))), S
