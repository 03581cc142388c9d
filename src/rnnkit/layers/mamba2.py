"""The Mamba-2 block (Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient
Algorithms Through Structured State Space Duality", section 7 and Fig. 6), with its SSD recurrence

    [z, x, B, C, dt~] = W_in u_t           [x, B, C] = silu(conv4([x, B, C]))
    dt_h = softplus(dt~_h + dt_bias_h)      A_h = -exp(A_log_h)          (one scalar decay per head)
    S_t = exp(dt_h A_h) S_{t-1} + B_t (dt_h x_t^(h))^T                   S (N, P) per head
    y_t^(h) = S_t^T C_t + D_h x_t^(h)
    out_t = W_out RMSNorm(y_t ⊙ silu(z_t))                                (gated RMSNorm)

with B and C shared by all heads (one group). The SSD recurrence is the scalar-decay gated linear
attention of :mod:`rnnkit.ops.gated_linear_attention` with ``q = C``, ``k = B``, ``v = dt x`` and
``log_decay = dt A``; its chunk form is the paper's SSD algorithm (section 6). Initialisation as the
paper's code: ``A_log = log U(1, 16)``, ``dt`` log-uniform in ``[1e-3, 1e-1]`` stored through the
inverse softplus in ``dt_bias``, ``D = 1``, convolution and projections as ``torch.nn``.

``allow_neg_eigval=True`` takes the decay ``2 exp(dt_h A_h) - 1`` in ``(-1, 1)`` (Grazzi et al. 2025,
"Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues"), given to the kernel as its
log-magnitude and sign (:func:`~rnnkit.layers._multihead.signed_decay`), which every form takes
(near a decay of 0 the chunk form's fp32 gradient loses accuracy, as :mod:`rnnkit.layers.gla` says).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import InputError, check_bool, check_positive_int
from rnnkit.layers._multihead import HeadNorm, MultiHeadRecurrence, ShortConv, signed_decay
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.gated_linear_attention import DEFAULT_CHUNK, gated_linear_attention


class Mamba2State(NamedTuple):
    """``conv`` (B, E + 2N, W-1) convolution history; ``ssm`` (B, H, N, P) the SSD state."""

    conv: torch.Tensor
    ssm: torch.Tensor


@dataclass
class Mamba2Config:
    """Options of :class:`Mamba2`."""

    d_model: int  # input and output width D
    d_state: int = 64  # N, the state size per head (shared B, C)
    expand: float = 2.0  # inner width E = expand * D
    head_dim: int = 64  # P; H = E / P heads
    conv_size: int = 4  # width of the causal convolution over [x, B, C]
    dt_min: float = 1e-3  # initial dt range (log-uniform)
    dt_max: float = 1e-1
    chunk_size: int = DEFAULT_CHUNK  # C of the chunk mode
    allow_neg_eigval: bool = False  # decay 2 exp(dt A) - 1 in (-1, 1) (Grazzi et al. 2025)

    def __post_init__(self) -> None:
        check_positive_int("d_model", self.d_model)
        check_positive_int("d_state", self.d_state)
        check_positive_int("head_dim", self.head_dim)
        if not isinstance(self.expand, (int, float)) or self.expand <= 0:
            raise InputError(f"expand: expected a positive number, got {self.expand!r}")
        inner = round(self.expand * self.d_model)
        if inner < self.head_dim or inner % self.head_dim:
            raise InputError(
                f"head_dim: expected a divisor of the inner width round(expand * d_model) = {inner}, got {self.head_dim}"
            )
        check_positive_int("conv_size", self.conv_size, minimum=2)
        if not 0 < self.dt_min <= self.dt_max:
            raise InputError(f"dt_min, dt_max: expected 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        check_positive_int("chunk_size", self.chunk_size)
        check_bool("allow_neg_eigval", self.allow_neg_eigval)


@register(
    "mamba2",
    description="Mamba-2 block (Dao & Gu 2024): SSD with scalar decay per head, conv, gated RMSNorm",
    test_configs={"default": {"d_state": 3, "expand": 1.2, "head_dim": 2, "conv_size": 2, "chunk_size": 16},
                  # dt in [0.1, 1]: decays 2 exp(dt A) - 1 of either sign
                  "neg-eigval": {"d_state": 2, "expand": 1.2, "head_dim": 2, "conv_size": 2, "chunk_size": 16,
                                 "dt_min": 0.1, "dt_max": 1.0, "allow_neg_eigval": True}},
)
class Mamba2(MultiHeadRecurrence):
    """Mamba-2 block (see the module docstring for the math and reference).

    Args: the fields of :class:`Mamba2Config`.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state :class:`Mamba2State`.

    Example:
        >>> layer = Mamba2(d_model=64, d_state=16, head_dim=32)
        >>> y, state = layer(torch.randn(2, 100, 64))    # y (2, 100, 64); state.ssm (2, 4, 16, 32)
    """

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = c = make_config(Mamba2Config, "mamba2", config)
        self.d_input = self.d_output = c.d_model
        E = self.inner = round(c.expand * c.d_model)
        H = self.num_heads = E // c.head_dim
        N = c.d_state
        self.in_proj = nn.Linear(c.d_model, 2 * E + 2 * N + H, bias=False)  # z, x, B, C, dt
        self.conv = ShortConv(E + 2 * N, c.conv_size)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        self.norm = HeadNorm(1, E, kind="rms", gate_first=True)
        self.out_proj = nn.Linear(E, c.d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        c = self.config
        with torch.no_grad():
            dt = torch.exp(torch.rand(self.num_heads) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
            self.A_log.copy_(torch.log(torch.empty(self.num_heads).uniform_(1, 16)))
            self.D.fill_(1.0)

    def _init_state(self, batch_size, device, dtype):
        c = self.config
        return Mamba2State(
            self.conv.init_state(batch_size, device=device, dtype=dtype),
            torch.zeros(batch_size, self.num_heads, c.d_state, c.head_dim, device=device, dtype=dtype),
        )

    def _forward(self, x, state, lengths, mode):
        c = self.config
        Bsz, T, _ = x.shape
        E, N, H, P = self.inner, c.d_state, self.num_heads, c.head_dim
        z, xbc, dt = self.in_proj(x).split([E, E + 2 * N, H], -1)
        xbc, conv_state = self.conv(xbc, state.conv, lengths)  # (B, T, E + 2N)
        xs, Bm, Cm = xbc.split([E, N, N], -1)
        dt = F.softplus(dt + self.dt_bias).transpose(1, 2)  # (B, H, T)
        log_decay = dt * -torch.exp(self.A_log)[:, None]  # (B, H, T) = dt * A
        sign = None
        if c.allow_neg_eigval:
            log_decay, sign = signed_decay(log_decay)
        xh = xs.view(Bsz, T, H, P).transpose(1, 2)  # (B, H, T, P)
        q = Cm[:, None].expand(Bsz, H, T, N)  # (B, H, T, N): C shared by the heads
        k = Bm[:, None].expand(Bsz, H, T, N)  # (B, H, T, N)
        y, ssm = gated_linear_attention(q, k, xh * dt[..., None], log_decay, state.ssm, lengths, mode=mode,
                                        chunk_size=c.chunk_size, decay_sign=sign)
        # The skip D x formed in x's (B, T, H, P) layout and y added into it: the sum is then (B, T, E)
        # as it stands, where y + D x in y's (B, H, T, P) layout needed one more copy to merge the heads.
        y = (xs.view(Bsz, T, H, P) * self.D[:, None]).add_(y.transpose(1, 2)).view(Bsz, T, E)
        return self.out_proj(self.norm(y, z)), Mamba2State(conv_state, ssm)
