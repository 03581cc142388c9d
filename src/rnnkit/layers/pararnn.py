"""ParaGRU and ParaLSTM: the GRU and the LSTM with diagonal recurrent weights, so that Newton's method
solves them over the whole sequence with cheap structured scans.

    ParaGRU:   r_t = σ(W_r x_t + a_r ⊙ h_{t-1} + b_r)    z_t = σ(W_z x_t + a_z ⊙ h_{t-1} + b_z)
               n_t = tanh(W_n x_t + b_n + r_t ⊙ (a_n ⊙ h_{t-1} + b_hn))    h_t = (1 - z_t) ⊙ n_t + z_t ⊙ h_{t-1}
    ParaLSTM:  i, f, o = σ(W_{i,f,o} x_t + a_{i,f,o} ⊙ h_{t-1} + b_{i,f,o})    g = tanh(W_g x_t + a_g ⊙ h_{t-1} + b_g)
               c_t = f ⊙ c_{t-1} + i ⊙ g    h_t = o ⊙ tanh(c_t)

Danieli et al., "ParaRNN: Unlocking Parallel Training of Nonlinear RNNs for Large Language Models"
(2025): with diagonal recurrent weights ``a`` every channel depends only on its own past, so the
Jacobian ``dh_t/dh_{t-1}`` is diagonal (ParaGRU: each Newton step is one
:func:`rnnkit.ops.linear_scan`) or made of ``2 x 2`` blocks, one per channel's ``(h, c)`` (ParaLSTM:
a block :func:`rnnkit.ops.matrix_scan`). The input weights ``W`` stay dense; channels mix across
layers. ``W`` and the biases start at U(-1/sqrt(H), 1/sqrt(H)) as in ``torch.nn.GRU``; a diagonal
weight stands in for a whole row of a dense ``W_hh`` (whose effect is of order one), so ``a`` starts
at U(-1, 1); ParaLSTM's forget bias starts at 1 (Gers et al. 2000).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import InputError
from rnnkit.layers._classic import CellConfig
from rnnkit.layers._newton import solve_newton
from rnnkit.layers.base import Recurrence
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.classic_rnn import LSTMState
from rnnkit.ops.padding import freeze_padding


@dataclass
class ParaConfig(CellConfig):
    """ParaGRU's options: those of :class:`CellConfig` (width, bias, the ``newton_*`` options)."""


@dataclass
class ParaLSTMConfig(ParaConfig):
    """ParaLSTM's options: ParaGRU's and the initial forget-gate bias."""

    forget_bias: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.forget_bias, (int, float)) or isinstance(self.forget_bias, bool):
            raise InputError(f"forget_bias: expected a number, got {self.forget_bias!r}")


def _hidden_biases(bias_hh: torch.Tensor | None, gates: int) -> tuple:
    return (0.0,) * gates if bias_hh is None else bias_hh.chunk(gates, -1)


def paragru_cell(h, x_t, weight_ih, weight_hh, bias_ih, bias_hh):
    """One ParaGRU step: ``h`` ``(N, H)``, ``x_t`` ``(N, D)`` -> next ``h``; ``weight_hh`` ``(3, H)``."""
    return paragru_update(h, F.linear(x_t, weight_ih, bias_ih), weight_hh, bias_hh)


def paragru_update(h, projected, weight_hh, bias_hh):
    """:func:`paragru_cell` from the input's projection ``W x_t + b`` ``(N, 3H)``, which a loop over
    the sequence computes for every step in one product."""
    xr, xz, xn = projected.chunk(3, -1)
    br, bz, bn = _hidden_biases(bias_hh, 3)
    r = torch.sigmoid(xr + weight_hh[0] * h + br)
    z = torch.sigmoid(xz + weight_hh[1] * h + bz)
    n = torch.tanh(xn + r * (weight_hh[2] * h + bn))
    return (1 - z) * n + z * h


def paralstm_cell(s, x_t, weight_ih, weight_hh, bias_ih, bias_hh):
    """One ParaLSTM step on the interleaved state ``s`` ``(N, 2H)`` = ``(h_1, c_1, h_2, c_2, ...)``
    (each channel's pair adjacent: the Jacobian's ``2 x 2`` blocks); ``weight_hh`` ``(4, H)``."""
    return paralstm_update(s, F.linear(x_t, weight_ih, bias_ih), weight_hh, bias_hh)


def paralstm_update(s, projected, weight_hh, bias_hh):
    """:func:`paralstm_cell` from the input's projection ``W x_t + b`` ``(N, 4H)``."""
    pairs = s.unflatten(-1, (-1, 2))  # (N, H, 2)
    h, c = pairs[..., 0], pairs[..., 1]
    xi, xf, xg, xo = projected.chunk(4, -1)
    bi, bf, bg, bo = _hidden_biases(bias_hh, 4)
    i = torch.sigmoid(xi + weight_hh[0] * h + bi)
    f = torch.sigmoid(xf + weight_hh[1] * h + bf)
    g = torch.tanh(xg + weight_hh[2] * h + bg)
    o = torch.sigmoid(xo + weight_hh[3] * h + bo)
    c = f * c + i * g
    return torch.stack([o * torch.tanh(c), c], -1).flatten(-2)


class _ParaRNN(Recurrence):
    """What ParaGRU and ParaLSTM share: parameters, the reference loop, the Newton mode."""

    MODES = ("recurrent", "newton")
    GATES = 3
    #: Consecutive state entries per block of the Jacobian (1: diagonal).
    BLOCK = 1

    def __init__(self, config: ParaConfig) -> None:
        super().__init__()
        self.config = config
        H = self.hidden_size = config.hidden_size
        self.d_input, self.d_output = config.d_model, H
        self.weight_ih = nn.Parameter(torch.empty(self.GATES * H, config.d_model))
        self.weight_hh = nn.Parameter(torch.empty(self.GATES, H))
        if config.bias:
            self.bias_ih = nn.Parameter(torch.empty(self.GATES * H))
            self.bias_hh = nn.Parameter(torch.empty(self.GATES * H))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """U(-1/sqrt(H), 1/sqrt(H)) for ``W`` and the biases, U(-1, 1) for the diagonal ``a``."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in (self.weight_ih, self.bias_ih, self.bias_hh):
            if p is not None:
                nn.init.uniform_(p, -bound, bound)
        nn.init.uniform_(self.weight_hh, -1.0, 1.0)

    def _params(self) -> tuple:
        return self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh

    def _auto_mode(self, x: torch.Tensor) -> str:
        # On the CPU the loop is the faster form (benchmarks/newton_speed.py measures both).
        return "newton" if x.device.type != "cpu" and x.shape[1] > 1 else "recurrent"

    def _autocast_safe(self, x: torch.Tensor, mode: str | None) -> bool:
        return mode != "newton"  # its tolerance is for the parameters' dtype

    # The flat state (N, S) that the cell and Newton's method work on, and back.
    def _flat(self, state) -> torch.Tensor:
        return state

    def _unflat(self, s: torch.Tensor):
        return s

    def _output(self, s: torch.Tensor) -> torch.Tensor:
        return s

    def _forward(self, x, state, lengths, mode):
        s0 = self._flat(state)
        if mode == "newton":
            states = solve_newton(self, self._cell, x, s0, self._params(), lengths, block_size=self.BLOCK)
        else:
            weight_ih, weight_hh, bias_ih, bias_hh = self._params()
            projected = F.linear(x, weight_ih, bias_ih)  # (B, T, G H): every step's input at once
            s, steps = s0, []
            for t, p_t in enumerate(projected.unbind(1)):
                s = freeze_padding(t, lengths, self._update(s, p_t, weight_hh, bias_hh), s)
                steps.append(s)
            states = torch.stack(steps, 1)
        return self._output(states), self._unflat(states[:, -1])

    def _step(self, x_t, state):
        s = self._cell(self._flat(state), x_t, *self._params())
        return self._output(s), self._unflat(s)

    def extra_repr(self) -> str:
        return f"{self.d_input}, {self.hidden_size}, " + ", ".join(
            f"{k}={v!r}" for k, v in vars(self.config).items() if k not in ("d_model", "hidden_size")
        )


@register(
    "paragru",
    description="ParaGRU (Danieli et al. 2025): GRU with diagonal recurrent weights, Newton-parallel",
    test_configs={
        "default": {"hidden_size": 6},
        "nobias": {"bias": False},
    },
)
class ParaGRU(_ParaRNN):
    """ParaGRU layer (see the module docstring for the equations and reference).

    Args:
        d_model: input width D.
        hidden_size: H (default D).
        bias: learn biases.
        newton_*: options of ``mode="newton"`` (:class:`rnnkit.layers._newton.NewtonOptions`).

    Shapes: x ``(B, T, D)`` -> y ``(B, T, H)``; state ``h`` ``(B, H)``.

    Example:
        >>> layer = ParaGRU(d_model=16, hidden_size=32)
        >>> y, h = layer(torch.randn(4, 10, 16), mode="newton")   # y (4, 10, 32), h (4, 32)
    """

    GATES = 3

    def __init__(self, **config) -> None:
        super().__init__(make_config(ParaConfig, "paragru", config))

    def _cell(self, h, x_t, *params):
        return paragru_cell(h, x_t, *params)

    def _update(self, h, projected, weight_hh, bias_hh):
        return paragru_update(h, projected, weight_hh, bias_hh)

    def _init_state(self, batch_size, device, dtype):
        return torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)


@register(
    "paralstm",
    description="ParaLSTM (Danieli et al. 2025): LSTM with diagonal recurrent weights, Newton-parallel",
    test_configs={
        "default": {"hidden_size": 6},
        "nobias": {"bias": False},
        "quasi": {"hidden_size": 4, "newton_quasi": True},
    },
)
class ParaLSTM(_ParaRNN):
    """ParaLSTM layer (see the module docstring for the equations and reference).

    Args:
        d_model: input width D.
        hidden_size: H (default D).
        bias: learn biases.
        forget_bias: initial forget-gate bias.
        newton_*: options of ``mode="newton"`` (:class:`rnnkit.layers._newton.NewtonOptions`).

    Shapes: x ``(B, T, D)`` -> y ``(B, T, H)``; state :class:`LSTMState` ``h`` (B, H), ``c`` (B, H).

    Example:
        >>> layer = ParaLSTM(d_model=16, hidden_size=32)
        >>> y, (h, c) = layer(torch.randn(4, 10, 16), mode="newton")   # y (4, 10, 32)
    """

    GATES = 4
    BLOCK = 2

    def __init__(self, **config) -> None:
        super().__init__(make_config(ParaLSTMConfig, "paralstm", config))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.bias_ih is not None:
            H = self.hidden_size
            with torch.no_grad():
                self.bias_ih[H : 2 * H].fill_(self.config.forget_bias)
                self.bias_hh[H : 2 * H].zero_()

    def _cell(self, s, x_t, *params):
        return paralstm_cell(s, x_t, *params)

    def _update(self, s, projected, weight_hh, bias_hh):
        return paralstm_update(s, projected, weight_hh, bias_hh)

    def _flat(self, state):
        return torch.stack([state.h, state.c], -1).flatten(-2)

    def _unflat(self, s):
        pairs = s.unflatten(-1, (-1, 2))
        return LSTMState(pairs[..., 0], pairs[..., 1])

    def _output(self, s):
        return s.unflatten(-1, (-1, 2))[..., 0]

    def _init_state(self, batch_size, device, dtype):
        zeros = torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)
        return LSTMState(zeros, zeros.clone())
