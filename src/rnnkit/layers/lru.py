"""Linear Recurrent Unit: h_t = lambda * h_{t-1} + gamma * (B x_t),  y_t = Re(C h_t) + D * x_t.

``lambda = exp(-exp(nu) + i exp(theta))`` is complex and diagonal, so |lambda| < 1 for any
parameters. Orvieto, Smith, Gu, Fernando, Gulcehre, Pascanu & De, "Resurrecting Recurrent Neural
Networks for Long Sequences", ICML 2023 (arXiv:2303.06349), Sec. 3 and Appendix A.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rnnkit.errors import InputError, check_positive_int
from rnnkit.layers._diagonal import DiagonalRecurrence, check_float, scan, to_complex, to_real
from rnnkit.layers.registry import make_config, register


@dataclass
class LRUConfig:
    """LRU options."""

    d_model: int  # H: input and output width
    d_state: int = 64  # N: complex state size
    r_min: float = 0.9  # inner radius of the ring |lambda| is drawn from at initialisation
    r_max: float = 0.999  # outer radius (close to 1: long memory)
    max_phase: float = 2 * math.pi  # arg(lambda) drawn from [0, max_phase)

    def __post_init__(self) -> None:
        check_positive_int("d_model", self.d_model)
        check_positive_int("d_state", self.d_state)
        check_float("r_min", self.r_min, 0.0, 1.0)
        check_float("r_max", self.r_max, 0.0, 1.0, open_low=True)
        if self.r_max >= 1.0 or self.r_min >= self.r_max:
            raise InputError(f"r_min, r_max: expected 0 <= r_min < r_max < 1, got {self.r_min}, {self.r_max}")
        check_float("max_phase", self.max_phase, 0.0, 2 * math.pi, open_low=True)


def lru_lambda_parts(nu_log: torch.Tensor, theta_log: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The real and imaginary parts (N,) of ``lambda = exp(-exp(nu_log) + i exp(theta_log))``,
    ``|lambda| (cos, sin)(arg lambda)``."""
    modulus, phase = torch.exp(-torch.exp(nu_log)), torch.exp(theta_log)
    return modulus * torch.cos(phase), modulus * torch.sin(phase)


def lru_lambda(nu_log: torch.Tensor, theta_log: torch.Tensor) -> torch.Tensor:
    """``lambda = exp(-exp(nu_log) + i exp(theta_log))`` (N,) complex (paper eq. 6)."""
    return torch.complex(*lru_lambda_parts(nu_log, theta_log))


@register(
    "lru",
    description="LRU (Orvieto et al. 2023): complex diagonal linear recurrence, ring init, gamma normalisation",
    test_configs={"default": {"d_state": 3}, "wide-ring": {"d_state": 4, "r_min": 0.0, "r_max": 0.5, "max_phase": 0.3}},
)
class LRU(DiagonalRecurrence):
    """Linear Recurrent Unit (Orvieto et al. 2023).

    .. math::
        h_t = \\lambda \\odot h_{t-1} + \\gamma \\odot (B x_t), \\qquad y_t = \\mathrm{Re}(C h_t) + D \\odot x_t

    with ``lambda = exp(-exp(nu) + i exp(theta))`` (the exponential parametrisation, eq. 6) and the
    normalisation ``gamma = exp(gamma_log)`` learned from ``sqrt(1 - |lambda|^2)`` (Sec. 3.4).

    Initialisation as in the paper (Sec. 3.3 and Appendix A): ``|lambda|`` uniform on the ring
    ``[r_min, r_max]`` of the complex plane (``|lambda|^2`` uniform between ``r_min^2`` and ``r_max^2``,
    ``nu = log(-log|lambda|)``), phase uniform in ``[0, max_phase)``, ``gamma_log = log sqrt(1 -
    |lambda|^2)``, ``B``: real and imaginary parts N(0, 1/(2H)); ``C``: real and imaginary parts N(0, 1/N);
    ``D ~ N(0, 1)``. The paper tunes the ring per task; the defaults ``r_min=0.9, r_max=0.999`` are
    its long-range setting.

    Args:
        d_model: H, input and output width.
        d_state: N, complex state size.
        r_min, r_max: ring radii, ``0 <= r_min < r_max < 1``.
        max_phase: largest initial phase, in ``(0, 2 pi]``.

    Shapes: x ``(B, T, H)`` -> y ``(B, T, H)``; state ``(B, N, 2)``: the complex ``h`` as (real,
    imaginary) pairs, so that it shares the layer's real dtype.

    Modes: ``recurrent`` (the loop over :meth:`step`) and ``parallel``, ``chunk``, ``fused``, the
    forms of :func:`rnnkit.ops.linear_scan` on complex ``a_t = lambda``, ``b_t = gamma B x_t``.

    Example:
        >>> layer = LRU(d_model=16, d_state=32)
        >>> y, h = layer(torch.randn(4, 100, 16))   # y (4, 100, 16), h (4, 32, 2)
    """

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = cfg = make_config(LRUConfig, "lru", config)
        self.d_input = self.d_output = cfg.d_model
        H, N = cfg.d_model, cfg.d_state
        self.nu_log = nn.Parameter(torch.empty(N))
        self.theta_log = nn.Parameter(torch.empty(N))
        self.gamma_log = nn.Parameter(torch.empty(N))
        self.B_re = nn.Parameter(torch.empty(N, H))
        self.B_im = nn.Parameter(torch.empty(N, H))
        self.C_re = nn.Parameter(torch.empty(H, N))
        self.C_im = nn.Parameter(torch.empty(H, N))
        self.D = nn.Parameter(torch.empty(H))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.config
        H, N = cfg.d_model, cfg.d_state
        # |lambda|^2 uniform in [r_min^2, r_max^2]: lambda uniform over the ring's area.
        u1, u2 = torch.rand(N), torch.rand(N)
        r2 = u1 * (cfg.r_max**2 - cfg.r_min**2) + cfg.r_min**2
        self.nu_log.copy_(torch.log(-0.5 * torch.log(r2)))  # |lambda| = exp(-exp(nu_log)) = sqrt(r2)
        self.theta_log.copy_(torch.log(cfg.max_phase * u2.clamp_min(1e-12)))
        self.gamma_log.copy_(0.5 * torch.log1p(-r2))  # log sqrt(1 - |lambda|^2)
        nn.init.normal_(self.B_re, std=1 / math.sqrt(2 * H))
        nn.init.normal_(self.B_im, std=1 / math.sqrt(2 * H))
        nn.init.normal_(self.C_re, std=1 / math.sqrt(N))
        nn.init.normal_(self.C_im, std=1 / math.sqrt(N))
        nn.init.normal_(self.D)

    def _init_state(self, batch_size, device, dtype):
        return torch.zeros(batch_size, self.config.d_state, 2, device=device, dtype=dtype)

    def _input_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Real and imaginary parts of ``gamma * (B x)``: x (..., H) real -> two (..., N)."""
        gamma = torch.exp(self.gamma_log)
        return x @ self.B_re.T * gamma, x @ self.B_im.T * gamma

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """``gamma * (B x)``: x (..., H) real -> (..., N) complex."""
        return torch.complex(*self._input_parts(x))

    def _readout(self, h_re: torch.Tensor, h_im: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``Re(C h) + D x``: the parts of h (..., N), x (..., H) -> (..., H)."""
        return h_re @ self.C_re.T - h_im @ self.C_im.T + self.D * x

    def _step(self, x_t, state):
        # The complex product written out on (real, imaginary) parts: the same arithmetic, in ops
        # that every export target has (ONNX has no complex tensors).
        lam_re, lam_im = lru_lambda_parts(self.nu_log, self.theta_log)  # (N,)
        s_re, s_im = state.unbind(-1)  # (B, N)
        u_re, u_im = self._input_parts(x_t)
        h_re = lam_re * s_re - lam_im * s_im + u_re
        h_im = lam_re * s_im + lam_im * s_re + u_im
        return self._readout(h_re, h_im, x_t), torch.stack([h_re, h_im], -1)

    def _scan_forward(self, x, state, lengths, mode):
        b = self._input(x)  # (B, T, N) complex
        a = lru_lambda(self.nu_log, self.theta_log).expand_as(b)  # (B, T, N)
        h = scan(a, b, to_complex(state), lengths, mode)  # (B, T, N)
        return self._readout(h.real, h.imag, x), to_real(h[:, -1])
