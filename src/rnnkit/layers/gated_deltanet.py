"""Gated DeltaNet: the delta rule with a data-dependent scalar decay per head (Mamba-2's gate).

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        o_t = S_t^T q_t   (per head)
    alpha_t = exp(-exp(A_log) * softplus(W_a x_t + dt_bias))

Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule" (ICLR 2025),
Eq. 10 and Sec. 3.4: the DeltaNet block (short convolutions, SiLU, L2-normalised q and k,
``beta = sigmoid(W_beta x)``) with the gate of Mamba-2 (Dao & Gu 2024) and an output gate
``RMSNorm(o) * SiLU(W_g x)``. As in Mamba-2, ``A`` starts uniform in ``[1, 16]`` (kept as ``A_log``)
and ``dt_bias`` is the inverse softplus of ``dt`` drawn log-uniformly in ``[0.001, 0.1]``. The value
width per head is ``2 K`` by default (``expand_v = 2``), as in the paper's models.
``allow_neg_eigval=True`` takes ``beta`` in ``(0, 2)`` (Grazzi et al. 2025), see :mod:`deltanet`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import InputError
from rnnkit.layers.deltanet import DeltaNetConfig, DeltaRuleLayer
from rnnkit.layers.registry import make_config, register


@dataclass
class GatedDeltaNetConfig(DeltaNetConfig):
    """Gated DeltaNet options: those of :class:`DeltaNetConfig` with the paper's defaults."""

    expand_v: float = 2.0  # V = 2 K
    use_gate: bool = True  # output gate SiLU(W_g x)
    dt_min: float = 0.001  # dt is initialised log-uniform in [dt_min, dt_max] (Mamba-2)
    dt_max: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("dt_min", "dt_max"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise InputError(f"{name}: expected a positive number, got {value!r}")
        if not self.dt_min <= self.dt_max:
            raise InputError(f"dt_min, dt_max: expected dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")


@register(
    "gated_deltanet",
    description="Gated DeltaNet (Yang et al. 2025): delta rule with a Mamba-2 decay gate",
    test_configs={
        "default": {"num_heads": 2, "head_dim": 3, "chunk_size": 16},
        "neg-eigval": {"num_heads": 1, "head_dim": 4, "expand_v": 1.0, "conv_size": 3,
                       "allow_neg_eigval": True, "use_gate": False, "chunk_size": 16},
    },
)
class GatedDeltaNet(DeltaRuleLayer):
    """Gated DeltaNet layer (Yang et al. 2025), optionally with negative eigenvalues.

    Args:
        d_model, num_heads, head_dim, expand_v, conv_size, allow_neg_eigval, use_gate, norm_eps,
        chunk_size: as :class:`~rnnkit.layers.deltanet.DeltaNet` (defaults ``expand_v=2``,
        ``use_gate=True``).
        dt_min, dt_max: range of the log-uniform initial ``dt`` (Mamba-2).

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state
    :class:`~rnnkit.layers.deltanet.DeltaNetState`.

    Example:
        >>> layer = GatedDeltaNet(d_model=64, num_heads=4)
        >>> y, state = layer(torch.randn(2, 100, 64))     # y (2, 100, 64), state.S (2, 4, 16, 32)
    """

    def __init__(self, **config) -> None:
        super().__init__(make_config(GatedDeltaNetConfig, "gated_deltanet", config))
        H = self.num_heads
        self.decay_proj = nn.Linear(self.d_input, H, bias=False)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        cfg = self.config
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())  # A in [1, 16], kept in log
            log_dt = torch.empty_like(self.dt_bias).uniform_(math.log(cfg.dt_min), math.log(cfg.dt_max))
            dt = log_dt.exp().clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus

    def _log_decay(self, x):
        # Heads first, in a contiguous tensor, before the softplus: its backward on a transposed
        # gradient breaks torch.compile's AOTAutograd (a stride its meta function does not predict).
        z = (self.decay_proj(x) + self.dt_bias).transpose(1, 2).contiguous()  # (B, H, T)
        return -self.A_log.exp()[:, None] * F.softplus(z)  # (B, H, T), <= 0
