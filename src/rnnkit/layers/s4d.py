"""S4D: per channel, a diagonal state space model discretised by zero-order hold (ZOH).

    h_t = exp(dt A) h_{t-1} + (exp(dt A) - 1) / A * x_t,     y_t = 2 Re(C h_t) + D x_t

Gu, Goel, Gupta & Re, "On the Parameterization and Initialization of Diagonal State Space Models",
NeurIPS 2022 (arXiv:2206.11893): the S4D-Lin and S4D-Inv initialisations (Sec. 4, eq. 8-9), ZOH
(Sec. 3), and the convolution view y = K * x with the Vandermonde kernel K_l = 2 Re(C dB dA^l).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rnnkit.errors import check_choice
from rnnkit.layers._diagonal import (
    SCAN_MODES,
    DiagonalRecurrence,
    check_ssm_options,
    log_uniform,
    scan,
    to_complex,
    to_real,
    zoh_parts,
)
from rnnkit.layers.registry import make_config, register


@dataclass
class S4DConfig:
    """S4D options."""

    d_model: int  # H: channels, each an independent single-input single-output SSM
    d_state: int = 64  # N: real state order per channel, kept as N/2 complex conjugate-pair modes
    init: str = "lin"  # "lin" (S4D-Lin, A_n = -1/2 + i pi n) or "inv" (S4D-Inv)
    dt_min: float = 0.001  # log dt is drawn uniformly from [log dt_min, log dt_max] per channel
    dt_max: float = 0.1

    def __post_init__(self) -> None:
        check_ssm_options(self.d_model, self.d_state, self.dt_min, self.dt_max)
        check_choice("init", self.init, ("lin", "inv"))


def s4d_init_A(n_modes: int, d_state: int, init: str) -> torch.Tensor:
    """The diagonal ``A`` (M,) complex of S4D-Lin or S4D-Inv (paper eq. 8 and 9), ``M = N/2``."""
    n = torch.arange(n_modes, dtype=torch.float64)
    if init == "lin":
        imag = math.pi * n
    else:
        imag = d_state / math.pi * (d_state / (2 * n + 1) - 1)
    return torch.complex(torch.full_like(n, -0.5), imag)


@register(
    "s4d",
    description="S4D (Gu et al. 2022): diagonal SSM per channel, ZOH, S4D-Lin/Inv init, FFT convolution mode",
    test_configs={"lin": {"d_state": 4}, "inv": {"d_state": 2, "init": "inv", "dt_min": 0.01, "dt_max": 0.5}},
)
class S4D(DiagonalRecurrence):
    """S4D diagonal state space model (Gu et al. 2022), one SISO SSM per channel.

    For each channel ``h`` of ``H`` and mode ``n`` of ``M = N/2`` (the other half of the spectrum is
    the complex conjugate, hence the factor 2 and the real part in the output):

    .. math::
        \\bar A = e^{\\Delta A}, \\quad \\bar B = (e^{\\Delta A} - 1) / A, \\quad
        s_t = \\bar A s_{t-1} + \\bar B x_t, \\quad y_t = 2\\,\\mathrm{Re}(C s_t) + D x_t

    Parameters and initialisation (Sec. 4 and the paper's reference code): ``A = -exp(log_A_real) +
    i A_imag`` with S4D-Lin ``A_n = -1/2 + i pi n`` or S4D-Inv ``A_n = -1/2 + i (N/pi)(N/(2n+1) - 1)``;
    ``B = 1`` (per channel only the products ``C_n B_n`` matter, so ``B`` is folded into ``C``);
    ``C ~ CN(0, 1)``; ``log dt ~ U(log dt_min, log dt_max)`` per channel; ``D ~ N(0, 1)``.

    Args:
        d_model: H, channels (input and output width).
        d_state: N, the real state order of each channel (even; N/2 complex modes are kept).
        init: ``"lin"`` or ``"inv"``.
        dt_min, dt_max: range of the initial step sizes.

    Shapes: x ``(B, T, H)`` -> y ``(B, T, H)``; state ``(B, H, N/2, 2)``: the complex modes as (real,
    imaginary) pairs.

    Modes: ``recurrent`` (the loop over :meth:`step`), ``parallel``, ``chunk``, ``fused`` (the forms
    of :func:`rnnkit.ops.linear_scan`) and ``conv``: ``y = K * x`` by FFT with the kernel
    ``K_l = 2 Re(C dB dA^l)``, plus the free response ``2 Re(C dA^{t+1} s_0)`` to the initial
    state; the final state is the closed form ``s_L = dA^L s_0 + sum_{t<L} dA^{L-1-t} dB x_t``
    (one matrix product against the same Vandermonde powers). ``auto`` picks ``conv``: on the CPU it
    trains 5x faster than the fused scan at B=16, T=1000, H=64, N=64.

    Example:
        >>> layer = S4D(d_model=16, d_state=64, init="inv")
        >>> y, s = layer(torch.randn(4, 1000, 16), mode="conv")   # y (4, 1000, 16), s (4, 16, 32, 2)
    """

    autocast_safe = False  # its scan/convolution kernels take one dtype; see Recurrence.autocast_safe

    MODES = ("recurrent",) + SCAN_MODES + ("conv",)

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = cfg = make_config(S4DConfig, "s4d", config)
        self.d_input = self.d_output = cfg.d_model
        H, M = cfg.d_model, cfg.d_state // 2
        self.log_dt = nn.Parameter(torch.empty(H))
        self.log_A_real = nn.Parameter(torch.empty(H, M))
        self.A_imag = nn.Parameter(torch.empty(H, M))
        self.C_re = nn.Parameter(torch.empty(H, M))
        self.C_im = nn.Parameter(torch.empty(H, M))
        self.D = nn.Parameter(torch.empty(H))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.config
        M = cfg.d_state // 2
        self.log_dt.copy_(log_uniform(cfg.d_model, cfg.dt_min, cfg.dt_max))
        A = s4d_init_A(M, cfg.d_state, cfg.init)
        self.log_A_real.copy_(torch.log(-A.real).expand(cfg.d_model, M))  # keeps Re(A) < 0 while training
        self.A_imag.copy_(A.imag.expand(cfg.d_model, M))
        nn.init.normal_(self.C_re, std=math.sqrt(0.5))  # C ~ CN(0, 1)
        nn.init.normal_(self.C_im, std=math.sqrt(0.5))
        nn.init.normal_(self.D)

    def _init_state(self, batch_size, device, dtype):
        return torch.zeros(batch_size, self.config.d_model, self.config.d_state // 2, 2, device=device, dtype=dtype)

    def discretise_parts(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """:meth:`discretise` as (real, imaginary) pairs, in real arithmetic (:func:`zoh_parts`)."""
        return zoh_parts(-torch.exp(self.log_A_real), self.A_imag, torch.exp(self.log_dt)[:, None])

    def discretise(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ZOH: ``dt A`` (H, M), ``dA = exp(dt A)`` (H, M) and ``dB = (dA - 1) / A`` (H, M), complex."""
        return tuple(torch.complex(*parts) for parts in self.discretise_parts())

    def _C(self) -> torch.Tensor:
        return torch.complex(self.C_re, self.C_im)  # (H, M)

    def _step(self, x_t, state):
        # The complex products written out on (real, imaginary) parts, like discretise_parts.
        _, (dA_re, dA_im), (dB_re, dB_im) = self.discretise_parts()  # (H, M) each
        s_re, s_im = state.unbind(-1)  # (B, H, M)
        u = x_t[..., None]  # (B, H, 1)
        new_re = dA_re * s_re - dA_im * s_im + dB_re * u
        new_im = dA_re * s_im + dA_im * s_re + dB_im * u
        y_t = 2 * (self.C_re * new_re - self.C_im * new_im).sum(-1) + self.D * x_t  # (B, H)
        return y_t, torch.stack([new_re, new_im], -1)

    def _scan_forward(self, x, state, lengths, mode):
        if mode == "conv":
            return self._conv_forward(x, state, lengths)
        _, dA, dB = self.discretise()
        b = dB * x[..., None]  # (B, T, H, M) complex
        s = scan(dA.expand_as(b), b, to_complex(state), lengths, mode)  # (B, T, H, M)
        y = 2 * (self._C() * s).sum(-1).real + self.D * x  # (B, T, H)
        return y, to_real(s[:, -1])

    def _conv_forward(self, x, state, lengths):
        B, T, H = x.shape
        M = self.config.d_state // 2
        dtA, dA, dB = self.discretise()
        s0 = to_complex(state)  # (B, H, M)
        # The free response to the initial state, 2 Re(C dA^{t+1} s0), is 2 Re(V dA^t) with V = C dA s0,
        # so the kernel, the free response and the final state all take the powers dA^t, t < T.
        W, V = self._C() * dB, self._C() * dA * s0  # (H, M), (B, H, M)
        # Vandermonde powers dA^l = exp(l dtA), l = 0..T-1, in real arithmetic: a real exp and a
        # cos/sin pair vectorise far better on the CPU than a complex exp, and nothing builds up in l.
        # Stacked as [Re; Im] (H, 2M, T), so that each sum 2 Re(sum_m z_m dA_m^l) = 2 sum_m (Re z_m
        # Re dA_m^l - Im z_m Im dA_m^l) is one matmul with contiguous operands (einsums over the
        # real and imaginary views took PyTorch's slow strided batched path: benchmarks/layer_profile.py).
        l = torch.arange(T, device=x.device, dtype=x.dtype)
        decay = torch.exp(dtA.real[..., None] * l)  # (H, M, T)
        angle = dtA.imag[..., None] * l
        powers = (torch.stack([torch.cos(angle), torch.sin(angle)], 1) * decay[:, None]).view(H, 2 * M, T)

        # y = K * x with K_l = 2 Re(sum_m W_m dA_m^l), by FFT zero-padded to 2T (linear, not
        # circular, convolution).
        kernel = 2 * (_re_im_rows(W)[:, None] @ powers)[:, 0]  # (H, T)
        n_fft = 2 * T
        x_f = torch.fft.rfft(x.transpose(1, 2), n=n_fft)  # (B, H, n_fft/2+1)
        y = torch.fft.irfft(x_f * torch.fft.rfft(kernel, n=n_fft), n=n_fft)[..., :T]  # (B, H, T)
        free = 2 * (_re_im_rows(V).transpose(0, 1).contiguous() @ powers)  # (H, B, T)
        y = _TimeMajor.apply(y + free.transpose(0, 1)) + self.D * x  # (B, T, H)

        # Final state s_L = dA^L s0 + sum_{l<L} dA^l dB x_{L-1-l}: read each sequence backwards from
        # its last valid step (steps before its start wrap onto its zeroed padding, so add nothing).
        L = torch.full((B,), T, device=x.device) if lengths is None else lengths
        idx = (L[:, None] - 1 - torch.arange(T, device=x.device)[None, :]) % T  # (B, T)
        x_rev = x.gather(1, idx[..., None].expand(-1, -1, H))  # (B, T, H): x_{L-1-l}
        x_rev = x_rev.permute(2, 0, 1).contiguous()  # (H, B, T): bmm would otherwise copy per channel
        u = (x_rev @ powers.transpose(1, 2)).transpose(0, 1)  # (B, H, 2M): [Re | Im] of sum_l dA^l x_{L-1-l}
        steps = L.to(x.dtype)[:, None, None]  # (B, 1, 1)
        decay_L = torch.exp(dtA.real * steps)  # (B, H, M): dA^L in the powers' arithmetic
        dA_L = torch.complex(decay_L * torch.cos(dtA.imag * steps), decay_L * torch.sin(dtA.imag * steps))
        s_final = dA_L * s0 + dB * torch.complex(u[..., :M], u[..., M:])  # (B, H, M)
        return y, to_real(s_final)

    def _auto_mode(self, x: torch.Tensor) -> str:
        return "conv"


def _re_im_rows(z: torch.Tensor) -> torch.Tensor:
    """Complex ``(..., M)`` -> real ``(..., 2M)`` ``[Re z | -Im z]``: its product with powers stacked
    as ``[Re p; Im p]`` is ``Re(sum_m z_m p_m)``."""
    return torch.cat([z.real, -z.imag], -1)


class _TimeMajor(torch.autograd.Function):
    """``y`` (B, H, T) -> a contiguous (B, T, H) copy, whose backward copies the gradient back to a
    contiguous (B, H, T). The plain transposed view would hand the free response's batched matmul a
    gradient whose per-channel matrices lie one float apart (batch stride 1), a layout PyTorch's
    CPU ``bmm`` computes element by element: the costliest op of the layer's training step by far
    (``benchmarks/layer_profile.py --layers s4d``)."""

    @staticmethod
    def forward(ctx, y):
        return y.transpose(1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return grad.transpose(1, 2).contiguous()
