"""Mamba: a selective state space model, with input-dependent step size, input and output maps.

    u = SiLU(conv(W_in x)),  delta_t = softplus(W_dt (W_r u_t) + b_dt),  B_t = W_B u_t,  C_t = W_C u_t
    h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,   y_t = (C_t . h_t + D u_t) * SiLU(z_t)

Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023
(arXiv:2312.00752), Sec. 3 (Algorithm 2, the selective SSM), Sec. 3.4 and Fig. 3 (the block), and
Sec. 3.6 / Appendix (initialisation: S4D-Real A, delta from [0.001, 0.1]).
``allow_neg_eigval=True`` takes the transition ``2 exp(delta_t A) - 1`` in ``(-1, 1)`` (Grazzi,
Siems, Zela, Franke, Hutter & Pontil, "Unlocking State-Tracking in Linear RNNs Through Negative
Eigenvalues", ICLR 2025, Sec. 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import check_bool, check_positive_int
from rnnkit.layers._conv import ShortConv
from rnnkit.layers._diagonal import DiagonalRecurrence, check_float
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.selective_scan import resolve_mode, selective_scan, selective_scan_step


@dataclass
class MambaConfig:
    """Mamba block options (defaults as in the paper's reference implementation)."""

    d_model: int  # D: block input and output width
    d_state: int = 16  # N: state size per channel
    d_conv: int = 4  # W: causal depthwise convolution width
    expand: int = 2  # E = expand * D inner channels
    dt_rank: int | None = None  # R: rank of the delta projection; default ceil(D / 16)
    dt_min: float = 0.001  # initial delta drawn log-uniformly from [dt_min, dt_max]
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4  # smallest initial delta
    steps_per_block: int = 64  # training: steps per recomputed block (per checkpoint of the fused scan)
    allow_neg_eigval: bool = False  # transition 2 exp(delta A) - 1 in (-1, 1) (Grazzi et al. 2025)

    #: Former option names, still accepted so that saved configurations load.
    RENAMED: ClassVar[dict[str, str]] = {"chunk_size": "steps_per_block"}

    def __post_init__(self) -> None:
        check_positive_int("d_model", self.d_model)
        check_positive_int("d_state", self.d_state)
        check_positive_int("d_conv", self.d_conv, minimum=2)
        check_positive_int("expand", self.expand)
        if self.dt_rank is None:
            self.dt_rank = math.ceil(self.d_model / 16)
        check_positive_int("dt_rank", self.dt_rank)
        check_float("dt_min", self.dt_min, 0.0, math.inf, open_low=True)
        check_float("dt_max", self.dt_max, self.dt_min, math.inf)
        check_float("dt_init_floor", self.dt_init_floor, 0.0, math.inf, open_low=True)
        check_positive_int("steps_per_block", self.steps_per_block)
        check_bool("allow_neg_eigval", self.allow_neg_eigval)


class MambaState(NamedTuple):
    """State of a Mamba block: the conv's last ``W - 1`` inputs and the SSM state."""

    conv: torch.Tensor  # (B, E, W-1)
    h: torch.Tensor  # (B, E, N)


@register(
    "mamba",
    description="Mamba (Gu & Dao 2023): selective SSM, causal conv, SiLU gate; fused CPU scan, (B,T,E,N) never exists",
    test_configs={"default": {"d_state": 3, "expand": 1, "steps_per_block": 16},
                  "w2-r2": {"d_state": 2, "d_conv": 2, "dt_rank": 2, "steps_per_block": 64},
                  # dt in [0.5, 2]: decays 2 exp(dt A) - 1 of either sign
                  "neg-eigval": {"d_state": 2, "expand": 1, "steps_per_block": 16, "dt_min": 0.5, "dt_max": 2.0,
                                 "allow_neg_eigval": True}},
)
class Mamba(DiagonalRecurrence):
    """The Mamba block (Gu & Dao 2023, Fig. 3): projections, causal conv, selective SSM, SiLU gate.

    For inner channel ``e`` of ``E`` and state index ``n`` of ``N``:

    .. math::
        [u; z] = W_{in} x, \\quad u = \\mathrm{SiLU}(\\mathrm{Conv1D}_W(u)), \\quad
        \\Delta_t = \\mathrm{softplus}(W_\\Delta W_R u_t + b_\\Delta), \\quad B_t = W_B u_t, \\quad C_t = W_C u_t

        h_t = e^{\\Delta_t A} \\odot h_{t-1} + \\Delta_t B_t u_t, \\quad
        y_t = W_{out}((C_t \\cdot h_t + D \\odot u_t) \\odot \\mathrm{SiLU}(z_t))

    Initialisation as in the paper and its reference code: ``A = -exp(A_log)`` with the S4D-Real
    ``A_{e,n} = -(n + 1)``; ``D = 1``; ``W_Delta ~ U(-R^{-1/2}, R^{-1/2})``; ``b_Delta`` the inverse
    softplus of ``delta ~ exp(U(log dt_min, log dt_max))`` (floored at ``dt_init_floor``) so the
    initial step sizes span ``[0.001, 0.1]``; the other layers PyTorch's defaults.
    ``in_proj``, ``x_proj`` and ``out_proj`` have no bias, the conv has one (the paper's defaults).

    Memory: the expanded state ``(B, T, E, N)`` is never formed for the whole sequence. The
    ``fused`` scan keeps each channel's state in registers and saves it every ``steps_per_block``
    steps for its backward, which recomputes the steps in between; the block forms process time in
    blocks of ``steps_per_block`` steps carrying the state, each recomputed in the backward pass
    (activation checkpointing), so at most one block's ``(B, block, E, N)`` exists at a time. Either
    way only the ``(B, T, E)``-sized inputs of the scan and one ``(B, E, N)`` state per block are kept
    (``benchmarks/mamba_memory.py`` measures it).

    Args:
        d_model: D. d_state: N. d_conv: W. expand: E / D. dt_rank: R (default ``ceil(D / 16)``).
        dt_min, dt_max, dt_init_floor: initial step sizes. steps_per_block: time block of the
        training forms (the fused scan's checkpoint interval). allow_neg_eigval: the transition
        ``2 exp(delta A) - 1`` (negative eigenvalues), which the fused kernel does not compute: this
        instance then has no ``fused`` mode and ``auto`` runs ``chunk``.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state :class:`MambaState` ``(conv (B, E, W-1),
    h (B, E, N))``.

    Modes: ``recurrent`` (the loop over :meth:`step`), ``parallel``, ``chunk``, ``fused``: those forms
    of :func:`rnnkit.ops.selective_scan` (``fused``, its compiled CPU kernel with the step-size
    softplus, skip and gate inside, is ``auto`` on the CPU; the others scan time blocks by that form
    of :func:`rnnkit.ops.linear_scan`). The convolution runs through :func:`rnnkit.ops.short_conv`
    (its compiled kernel on the CPU) in every mode but ``recurrent``.

    Example:
        >>> block = Mamba(d_model=16)
        >>> y, state = block(torch.randn(4, 1000, 16))   # y (4, 1000, 16); state.h (4, 32, 16)
    """

    autocast_safe = False  # its scan/convolution kernels take one dtype; see Recurrence.autocast_safe

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = cfg = make_config(MambaConfig, "mamba", config)
        self.d_input = self.d_output = D = cfg.d_model
        E, N, R = cfg.expand * D, cfg.d_state, cfg.dt_rank
        self.in_proj = nn.Linear(D, 2 * E, bias=False)
        self.conv = ShortConv(E, cfg.d_conv, activation="silu")
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E)
        self.A_log = nn.Parameter(torch.empty(E, N))
        self.D = nn.Parameter(torch.empty(E))
        self.out_proj = nn.Linear(E, D, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        cfg = self.config
        E, N, R = cfg.expand * cfg.d_model, cfg.d_state, cfg.dt_rank
        bound = R**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(torch.rand(E) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp_min(cfg.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.A_log.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).expand(E, N))  # S4D-Real
        nn.init.ones_(self.D)

    def _init_state(self, batch_size, device, dtype):
        cfg = self.config
        E = cfg.expand * cfg.d_model
        return MambaState(self.conv.init_state(batch_size, device=device, dtype=dtype),
                          torch.zeros(batch_size, E, cfg.d_state, device=device, dtype=dtype))

    @property
    def modes(self) -> tuple[str, ...]:
        """The class's modes, without ``fused`` where the compiled kernel is unavailable or with
        ``allow_neg_eigval`` (the kernel's transition is ``exp(delta A)``)."""
        modes = super().modes
        return tuple(m for m in modes if m != "fused") if self.config.allow_neg_eigval else modes

    def _auto_mode(self, x: torch.Tensor) -> str:
        # The selective scan's own choice: its compiled kernel on the CPU (any floating dtype) where
        # the library built, else chunk.
        return "chunk" if self.config.allow_neg_eigval else resolve_mode("auto", x.device)

    def _ssm_inputs(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``W_Delta W_R u`` ``(..., E)`` (delta before its bias and softplus), B ``(..., N)``, C
        ``(..., N)`` from the conv output u ``(..., E)``."""
        R, N = self.config.dt_rank, self.config.d_state
        dt, Bm, Cm = self.x_proj(u).split([R, N, N], -1)
        return F.linear(dt, self.dt_proj.weight), Bm, Cm

    def _step(self, x_t, state):
        u, z = self.in_proj(x_t).chunk(2, -1)  # (B, E) each
        u, window = self.conv.step(u, state.conv)  # SiLU(conv(u))
        delta, Bm, Cm = self._ssm_inputs(u)  # (B, E), (B, N), (B, N)
        delta = F.softplus(delta + self.dt_proj.bias)
        A = -torch.exp(self.A_log)  # (E, N)
        y, h = selective_scan_step(delta, Bm, Cm, u, A, state.h, D=self.D, z_t=z,
                                   allow_neg_eigval=self.config.allow_neg_eigval)  # (B, E), (B, E, N)
        return self.out_proj(y), MambaState(window, h)

    def _scan_forward(self, x, state, lengths, mode):
        # Two products with the halves of W_in, not one split in two: the gradients of u and z then
        # reach x without being concatenated into a (B, T, 2E) tensor first.
        w_u, w_z = self.in_proj.weight.chunk(2, 0)
        u, z = F.linear(x, w_u), F.linear(x, w_z)  # (B, T, E) each
        u, window = self.conv(u, state.conv, lengths)  # SiLU(conv(u)), (B, T, E)
        delta, Bm, Cm = self._ssm_inputs(u)  # (B, T, E), (B, T, N), (B, T, N)
        A = -torch.exp(self.A_log)  # (E, N)
        # The scan adds dt_proj's bias and takes the softplus (inside the kernel, when fused).
        y, h = selective_scan(delta, Bm, Cm, u, A, state.h, D=self.D, z=z, delta_bias=self.dt_proj.bias,
                              delta_softplus=True, lengths=lengths, mode=mode,
                              steps_per_block=self.config.steps_per_block,
                              allow_neg_eigval=self.config.allow_neg_eigval)  # (B, T, E), (B, E, N)
        return self.out_proj(y), MambaState(window, h)
