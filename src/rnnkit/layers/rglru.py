"""RG-LRU and the Hawk recurrent block (Griffin).

    r_t = sigma(W_a x_t + b_a),  i_t = sigma(W_x x_t + b_x),  a_t = sigma(Lambda)^(c r_t)
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)

De, Smith, Fernando, Botev, Cristian-Muraru, Gu, Haroun, Berrada, Chen, Srinivasan, Desjardins,
Doucet, Budden, Teh, Pascanu, de Freitas & Gulcehre, "Griffin: Mixing Gated Linear Recurrences with
Local Attention for Efficient Language Models", 2024 (arXiv:2402.19427), Sec. 2.4 (RG-LRU, eq. 1-4)
and Sec. 2.3 / Fig. 2 (the recurrent block that Hawk stacks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from rnnkit.errors import InputError, check_positive_int
from rnnkit.layers._conv import ShortConv
from rnnkit.layers._diagonal import DiagonalRecurrence, check_float, scan
from rnnkit.layers.registry import make_config, register


@dataclass
class RGLRUConfig:
    """RG-LRU options."""

    d_model: int  # D: input, state and output width
    num_heads: int = 1  # the gate weights W_a, W_x are block-diagonal with this many blocks
    c: float = 8.0  # the fixed exponent scale of eq. 3
    a_min: float = 0.9  # a^c is drawn uniformly from [a_min, a_max] at initialisation
    a_max: float = 0.999

    def __post_init__(self) -> None:
        check_positive_int("d_model", self.d_model)
        check_positive_int("num_heads", self.num_heads)
        if self.d_model % self.num_heads:
            raise InputError(f"num_heads: expected a divisor of d_model={self.d_model}, got {self.num_heads}")
        check_float("c", self.c, 0.0, math.inf, open_low=True)
        check_float("a_min", self.a_min, 0.0, 1.0, open_low=True)
        check_float("a_max", self.a_max, self.a_min, 1.0)
        if self.a_max >= 1.0:
            raise InputError(f"a_max: expected a number below 1, got {self.a_max}")


def lecun_normal_(weight: torch.Tensor, fan_in: int) -> torch.Tensor:
    """N(0, 1/fan_in) in place (LeCun normal)."""
    return nn.init.normal_(weight, std=1 / math.sqrt(fan_in))


@register(
    "rglru",
    description="RG-LRU (De et al. 2024, Griffin): real gated linear recurrence, a = sigma(Lambda)^(c r_t)",
    test_configs={"default": {}, "tight": {"c": 2.0, "a_min": 0.3, "a_max": 0.6}},
)
class RGLRU(DiagonalRecurrence):
    """Real-Gated Linear Recurrent Unit (Griffin, Sec. 2.4).

    .. math::
        r_t = \\sigma(W_a x_t + b_a), \\quad i_t = \\sigma(W_x x_t + b_x), \\quad
        a_t = \\sigma(\\Lambda)^{c r_t}, \\quad
        h_t = a_t \\odot h_{t-1} + \\sqrt{1 - a_t^2} \\odot (i_t \\odot x_t), \\quad y_t = h_t

    ``log a_t = -c r_t softplus(-Lambda)`` is computed in log space, and ``sqrt(1 - a_t^2)`` as
    ``sqrt(-expm1(2 log a_t))``, which stays accurate as ``a_t -> 1``.

    Initialisation (Sec. 2.4): ``Lambda`` such that ``a^c = sigma(Lambda)^c`` is uniform in
    ``[a_min, a_max] = [0.9, 0.999]``; ``c = 8``. The gate weights are block-diagonal over
    ``num_heads`` blocks (as in the paper) with LeCun-normal weights (variance 1/fan_in) and zero
    biases.

    Args:
        d_model: D.
        num_heads: blocks of the gate weights (divides D).
        c: exponent scale.
        a_min, a_max: range of ``a^c`` at initialisation.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state ``h`` ``(B, D)``.

    Modes: ``recurrent`` (the loop over :meth:`step`), ``parallel``, ``chunk``, ``fused`` (the forms
    of :func:`rnnkit.ops.linear_scan`).

    Example:
        >>> layer = RGLRU(d_model=16, num_heads=4)
        >>> y, h = layer(torch.randn(4, 100, 16))   # y (4, 100, 16), h (4, 16)
    """

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = cfg = make_config(RGLRUConfig, "rglru", config)
        self.d_input = self.d_output = D = cfg.d_model
        Dh = D // cfg.num_heads
        self.gate_weight = nn.Parameter(torch.empty(2, cfg.num_heads, Dh, Dh))  # [W_a, W_x], block-diagonal
        self.gate_bias = nn.Parameter(torch.empty(2, D))  # [b_a, b_x]
        self.Lambda = nn.Parameter(torch.empty(D))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.config
        lecun_normal_(self.gate_weight, cfg.d_model // cfg.num_heads)
        nn.init.zeros_(self.gate_bias)
        a_c = torch.empty(cfg.d_model, dtype=torch.float64).uniform_(cfg.a_min, cfg.a_max)
        a = a_c ** (1 / cfg.c)
        self.Lambda.copy_(torch.log(a) - torch.log1p(-a))  # sigma(Lambda) = a

    def _init_state(self, batch_size, device, dtype):
        return torch.zeros(batch_size, self.config.d_model, device=device, dtype=dtype)

    def coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``a_t`` and ``b_t = sqrt(1 - a_t^2) i_t x_t`` for x ``(..., D)`` -> two ``(..., D)``."""
        H, D = self.config.num_heads, self.config.d_model
        if H == 1:  # one matmul with the bias added inside it
            gates = F.linear(x, self.gate_weight.view(2 * D, D), self.gate_bias.view(2 * D))
        else:
            gates = torch.einsum("...hi,ghoi->...gho", x.unflatten(-1, (H, -1)), self.gate_weight).flatten(-3)
            gates = gates + self.gate_bias.view(2 * D)
        rates = torch.sigmoid(gates).unflatten(-1, (2, D))  # (..., 2, D): [r_t, i_t]
        scale = -self.config.c * F.softplus(-self.Lambda)  # (D,): log a_t = r_t * scale
        if torch.is_grad_enabled() and not (torch.compiler.is_compiling() or torch.compiler.is_exporting()
                                            or torch._C._are_functorch_transforms_active()):
            # The hand-written backward is for plain autograd; torch.func's transforms (RTRL's
            # Jacobians) and the tracers differentiate the plain ops below.
            return _GatedInput.apply(rates, x, scale)
        # Indexed, not unbound: inductor's backward of unbind here drops part of x's gradient.
        r, i = rates[..., 0, :], rates[..., 1, :]  # (..., D) each
        log_a = r * scale  # log sigma(Lambda)^(c r)
        return torch.exp(log_a), torch.sqrt(-torch.expm1(2 * log_a)) * (i * x)

    def _step(self, x_t, state):
        a, b = self.coefficients(x_t)
        h = a * state + b
        return h, h

    def _scan_forward(self, x, state, lengths, mode):
        a, b = self.coefficients(x)  # (B, T, D) each
        h = scan(a, b, state, lengths, mode)
        return h, h[:, -1]


class _GatedInput(torch.autograd.Function):
    """``a = exp(r * scale)`` and ``b = sqrt(1 - a^2) * i * x`` from the gates' rates
    ``(..., 2, D)`` (``[r, i]``), the input ``(..., D)`` and ``scale`` ``(D,)``, with the backward
    written out: autograd through the eight elementwise ops saves and re-reads a ``(..., D)`` tensor
    per op, where this saves five and computes each gradient in a few passes
    (``benchmarks/layer_profile.py --layers hawk``). The same arithmetic as the plain ops of
    :meth:`RGLRU.coefficients`; with ``s = sqrt(1 - a^2)``, ``ds / dlog a = -a^2 / s``.
    """

    @staticmethod
    def forward(ctx, rates, x, scale):
        r, i = rates[..., 0, :], rates[..., 1, :]
        log_a = r * scale
        a = torch.exp(log_a)
        s = log_a.mul_(2).expm1_().neg_().sqrt_()  # sqrt(-expm1(2 log a)), accurate as a -> 1
        ctx.save_for_backward(rates, x, scale, a, s)
        return a, torch.mul(i, x).mul_(s)

    @staticmethod
    @once_differentiable
    def backward(ctx, da, db):
        rates, x, scale, a, s = ctx.saved_tensors
        r, i = rates[..., 0, :], rates[..., 1, :]
        d_rates = torch.empty_like(rates)
        # dlog a = da * a + (db * i * x) * (-a^2 / s); db i and db s are reused below.
        db_i = db * i
        dlog_a = torch.mul(db_i, x).mul_(a).div_(s).neg_()
        if da is not None:
            dlog_a.add_(da)
        dlog_a.mul_(a)
        torch.mul(dlog_a, scale, out=d_rates[..., 0, :])
        db_s = db * s
        torch.mul(db_s, x, out=d_rates[..., 1, :])
        dx = db_s.mul_(i)
        dscale = torch.mul(dlog_a, r).reshape(-1, r.shape[-1]).sum(0)
        return d_rates, dx, dscale


class HawkState(NamedTuple):
    """State of a Hawk block: the causal conv's last ``W - 1`` inputs and the RG-LRU state."""

    conv: torch.Tensor  # (B, E, W-1)
    h: torch.Tensor  # (B, E)


@dataclass
class HawkConfig:
    """Hawk recurrent-block options."""

    d_model: int  # D: block input and output width
    d_rnn: int | None = None  # E: recurrence width; default round(4 D / 3) as in Griffin
    conv_width: int = 4  # W: temporal convolution width
    num_heads: int = 1  # block-diagonal gate blocks of the RG-LRU (divides E)
    c: float = 8.0
    a_min: float = 0.9
    a_max: float = 0.999

    def __post_init__(self) -> None:
        check_positive_int("d_model", self.d_model)
        if self.d_rnn is None:
            self.d_rnn = max(1, round(4 * self.d_model / 3))
        check_positive_int("d_rnn", self.d_rnn)
        check_positive_int("conv_width", self.conv_width, minimum=2)


@register(
    "hawk",
    description="Hawk block (De et al. 2024): GeLU gate x (linear -> causal conv -> RG-LRU), projected back",
    test_configs={"default": {"d_rnn": 6}, "w2-heads": {"d_rnn": 4, "conv_width": 2, "num_heads": 2}},
)
class Hawk(DiagonalRecurrence):
    """The Griffin/Hawk recurrent block (Sec. 2.3, Fig. 2) around an :class:`RGLRU`.

    .. math::
        g_t = \\mathrm{GeLU}(W_g x_t), \\quad u = \\mathrm{Conv1D}_W(W_u x), \\quad
        h = \\mathrm{RGLRU}(u), \\quad y_t = W_o (g_t \\odot h_t)

    The convolution is causal and depthwise (width ``W = 4``); its last ``W - 1`` inputs are part of
    the state, so :meth:`step` and split sequences continue exactly. Hawk is a stack of residual
    blocks of this mixer and an MLP: ``SequenceModel(block="residual", layer="hawk")``.
    The linear layers use LeCun-normal weights (variance 1/fan_in); the RG-LRU is initialised as in
    :class:`RGLRU`.

    Args:
        d_model: D.
        d_rnn: E, the recurrence width (default ``round(4 D / 3)``).
        conv_width: W.
        num_heads, c, a_min, a_max: RG-LRU options.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state :class:`HawkState` ``(conv (B, E, W-1), h (B, E))``.

    Modes: those of :class:`RGLRU`.

    Example:
        >>> block = Hawk(d_model=16)
        >>> y, state = block(torch.randn(4, 100, 16))   # y (4, 100, 16); state.h (4, 21)
    """

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = cfg = make_config(HawkConfig, "hawk", config)
        self.d_input = self.d_output = D = cfg.d_model
        E = cfg.d_rnn
        self.in_proj = nn.Linear(D, 2 * E)  # [W_g; W_u]
        self.conv = ShortConv(E, cfg.conv_width, activation="identity")
        self.rglru = RGLRU(d_model=E, num_heads=cfg.num_heads, c=cfg.c, a_min=cfg.a_min, a_max=cfg.a_max)
        self.out_proj = nn.Linear(E, D)
        with torch.no_grad():
            for lin in (self.in_proj, self.out_proj):
                lecun_normal_(lin.weight, lin.in_features)
                nn.init.zeros_(lin.bias)

    def _init_state(self, batch_size, device, dtype):
        E = self.config.d_rnn
        return HawkState(self.conv.init_state(batch_size, device=device, dtype=dtype),
                         torch.zeros(batch_size, E, device=device, dtype=dtype))

    def _branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, u = self.in_proj(x).chunk(2, -1)  # (..., E) each
        return F.gelu(g), u

    def _step(self, x_t, state):
        g, u = self._branches(x_t)  # (B, E)
        u, window = self.conv.step(u, state.conv)
        h, _ = self.rglru._step(u, state.h)
        return self.out_proj(g * h), HawkState(window, h)

    def _scan_forward(self, x, state, lengths, mode):
        g, u = self._branches(x)  # (B, T, E)
        u, window = self.conv(u, state.conv, lengths)
        h, h_last = self.rglru._scan_forward(u, state.h, lengths, mode)
        return self.out_proj(g * h), HawkState(window, h_last)
