"""S5: one multi-input multi-output (MIMO) diagonal state space model over all channels, ZOH with a
timescale per state, run by a parallel scan.

    x_t = exp(dt Lambda) x_{t-1} + Lambda^{-1} (exp(dt Lambda) - 1) B~ u_t,   y_t = 2 Re(C~ x_t) + D u_t

Smith, Warrington & Linderman, "Simplified State Space Layers for Sequence Modeling", ICLR 2023
(arXiv:2208.04933): the MIMO SSM (Sec. 3), the diagonalised HiPPO-N initialisation, optionally as
``blocks`` copies on the diagonal (Sec. 4.3, Appendix B.1.1), ZOH with a learnt step per state
(Sec. 4.3) and the parallel scan (Sec. 3.3), here :func:`rnnkit.ops.linear_scan`. Conjugate
symmetry: half of the modes are kept and the output takes twice the real part (Sec. 4.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rnnkit.errors import InputError, check_positive_int
from rnnkit.layers._diagonal import (
    DiagonalRecurrence,
    check_ssm_options,
    log_uniform,
    scan,
    to_complex,
    to_real,
    zoh_parts,
)
from rnnkit.layers._hippo import hippo_normal_modes
from rnnkit.layers.registry import make_config, register


@dataclass
class S5Config:
    """S5 options."""

    d_model: int  # H: input and output channels, all mixed through one state
    d_state: int = 64  # P: real state size (P/2 complex modes, each with its conjugate implied)
    blocks: int = 1  # J: HiPPO-N of size P/J repeated J times on the diagonal
    dt_min: float = 0.001  # log dt is drawn uniformly from [log dt_min, log dt_max] per mode
    dt_max: float = 0.1

    def __post_init__(self) -> None:
        check_ssm_options(self.d_model, self.d_state, self.dt_min, self.dt_max)
        check_positive_int("blocks", self.blocks)
        if self.d_state % (2 * self.blocks):
            raise InputError(
                f"d_state: expected a multiple of 2 * blocks = {2 * self.blocks} (conjugate pairs in each block), "
                f"got {self.d_state}"
            )


@register(
    "s5",
    description="S5 (Smith et al. 2023): MIMO diagonal SSM, HiPPO-N init, ZOH per-state timescales, parallel scan",
    test_configs={"default": {"d_state": 4}, "blocks": {"d_state": 8, "blocks": 2, "dt_min": 0.01, "dt_max": 0.5}},
)
class S5(DiagonalRecurrence):
    """S5 (Smith et al. 2023): a MIMO diagonal SSM with ``P/2`` complex modes shared by the channels.

    .. math::
        \\bar\\Lambda = e^{\\Delta \\Lambda}, \\quad \\bar B = \\Lambda^{-1}(\\bar\\Lambda - I) \\tilde B,
        \\quad x_t = \\bar\\Lambda x_{t-1} + \\bar B u_t, \\quad y_t = 2\\,\\mathrm{Re}(\\tilde C x_t) + D u_t

    with ``Delta`` one step per mode. Initialisation (Sec. 4.3 and Appendix B.1): ``Lambda`` the
    eigenvalues of HiPPO-N with positive imaginary part (``Re Lambda = -1/2``, kept negative as
    ``-exp(log_A_real)``), in ``blocks`` diagonal copies of size ``P / blocks`` with eigenvectors
    ``V``; ``B~ = V^* B`` with ``B ~ N(0, 1/H)`` (``P x H``) and ``C~ = C V`` with ``C ~ N(0, 1/P)``
    (``H x P``), lecun-normal; ``log Delta ~ U(log dt_min, log dt_max)`` per mode; ``D ~ N(0, 1)``.

    Args:
        d_model: H, input and output width.
        d_state: P, the real state size (a multiple of ``2 * blocks``).
        blocks: J, the number of HiPPO-N blocks on the diagonal of the initial ``Lambda``.
        dt_min, dt_max: range of the initial step sizes.

    Shapes: x ``(B, T, H)`` -> y ``(B, T, H)``; state ``(B, P/2, 2)``: the complex modes as (real,
    imaginary) pairs.

    Modes: ``recurrent`` (the loop over :meth:`step`), ``parallel``, ``chunk``, ``fused``: those
    forms of :func:`rnnkit.ops.linear_scan` over the ``(B, T, P/2)`` complex inputs ``B_bar u_t``
    (``auto``: the scan's own choice).

    Example:
        >>> layer = S5(d_model=16, d_state=64, blocks=4)
        >>> y, s = layer(torch.randn(4, 1000, 16))   # y (4, 1000, 16), s (4, 32, 2)
    """

    autocast_safe = False  # its complex scan takes one dtype; see Recurrence.autocast_safe

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = cfg = make_config(S5Config, "s5", config)
        self.d_input = self.d_output = H = cfg.d_model
        M = cfg.d_state // 2
        self.log_dt = nn.Parameter(torch.empty(M))
        self.log_A_real = nn.Parameter(torch.empty(M))
        self.A_imag = nn.Parameter(torch.empty(M))
        self.B_re, self.B_im = nn.Parameter(torch.empty(M, H)), nn.Parameter(torch.empty(M, H))
        self.C_re, self.C_im = nn.Parameter(torch.empty(H, M)), nn.Parameter(torch.empty(H, M))
        self.D = nn.Parameter(torch.empty(H))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.config
        H, P, J = cfg.d_model, cfg.d_state, cfg.blocks
        M = P // 2
        self.log_dt.copy_(log_uniform(M, cfg.dt_min, cfg.dt_max))
        lam, V = hippo_normal_modes(P // J)  # (P/2J,), (P/J, P/2J)
        B = torch.randn(J, P // J, H, dtype=torch.float64) / math.sqrt(H)
        C = torch.randn(J, H, P // J, dtype=torch.float64) / math.sqrt(P)
        B_tilde = (V.conj().T @ B.to(V.dtype)).reshape(M, H)  # each block's V^* B
        C_tilde = (C.to(V.dtype) @ V).transpose(0, 1).reshape(H, M)  # each block's C V
        lam = lam.repeat(J)
        self.log_A_real.copy_(torch.log(-lam.real))
        self.A_imag.copy_(lam.imag)
        self.B_re.copy_(B_tilde.real)
        self.B_im.copy_(B_tilde.imag)
        self.C_re.copy_(C_tilde.real)
        self.C_im.copy_(C_tilde.imag)
        nn.init.normal_(self.D)

    def _init_state(self, batch_size, device, dtype):
        return torch.zeros(batch_size, self.config.d_state // 2, 2, device=device, dtype=dtype)

    def discretise_parts(self):
        """``dA`` (M,) and ``B_bar`` (M, H) as (real, imaginary) pairs, in real arithmetic."""
        _, dA, (f_re, f_im) = zoh_parts(-torch.exp(self.log_A_real), self.A_imag, torch.exp(self.log_dt))
        f_re, f_im = f_re[:, None], f_im[:, None]
        return dA, (f_re * self.B_re - f_im * self.B_im, f_re * self.B_im + f_im * self.B_re)

    def _read(self, s_re: torch.Tensor, s_im: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``2 Re(C~ s) + D x`` from the state's parts ``(..., M)`` and the input ``(..., H)``."""
        return 2 * (s_re @ self.C_re.T - s_im @ self.C_im.T) + self.D * x

    def _step(self, x_t, state):
        (dA_re, dA_im), (dB_re, dB_im) = self.discretise_parts()
        s_re, s_im = state.unbind(-1)  # (B, M)
        new_re = dA_re * s_re - dA_im * s_im + x_t @ dB_re.T
        new_im = dA_re * s_im + dA_im * s_re + x_t @ dB_im.T
        return self._read(new_re, new_im, x_t), torch.stack([new_re, new_im], -1)

    def _scan_forward(self, x, state, lengths, mode):
        (dA_re, dA_im), (dB_re, dB_im) = self.discretise_parts()
        b = torch.complex(x @ dB_re.T, x @ dB_im.T)  # (B, T, M)
        s = scan(torch.complex(dA_re, dA_im).expand_as(b), b, to_complex(state), lengths, mode)  # (B, T, M)
        return self._read(s.real, s.imag, x), to_real(s[:, -1])
