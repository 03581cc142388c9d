"""Long short-term memory with a forget gate, optional peepholes and an optional output projection.

    i_t = σ(W_ii x_t + W_hi h_{t-1} + p_i ⊙ c_{t-1} + b_i)      f_t = σ(W_if x_t + W_hf h_{t-1} + p_f ⊙ c_{t-1} + b_f)
    g_t = tanh(W_ig x_t + W_hg h_{t-1} + b_g)                  c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t
    o_t = σ(W_io x_t + W_ho h_{t-1} + p_o ⊙ c_t + b_o)          h_t = W_hr (o_t ⊙ tanh(c_t))

Hochreiter & Schmidhuber, "Long Short-Term Memory" (1997); the forget gate of Gers, Schmidhuber &
Cummins (2000); peepholes (p_i, p_f, p_o) of Gers, Schraudolph & Schmidhuber (2002); the projection
W_hr of Sak, Senior & Beaufays (2014). Without peepholes this is exactly ``torch.nn.LSTM`` (same
parameter names, so its state dicts load); the forget-gate bias starts at 1 (Gers et al. 2000;
Jozefowicz, Zaremba & Sutskever 2015) and everything else at U(-1/sqrt(H), 1/sqrt(H)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rnnkit.errors import InputError, check_positive_int
from rnnkit.layers._classic import ClassicConfig, ClassicRNN
from rnnkit.layers._newton import solve_newton
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.classic_rnn import LSTMState, lstm, lstm_cell, lstm_sequence



@dataclass
class LSTMConfig(ClassicConfig):
    """LSTM options (see :class:`ClassicConfig` for the shared ones)."""

    peephole: bool = False  # diagonal peephole connections from the cell to the i, f, o gates
    proj_size: int = 0  # R > 0 projects h to R features (must be < hidden_size, as in torch.nn.LSTM)
    forget_bias: float = 1.0  # initial value of the forget-gate bias (b_ih + b_hh)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.peephole, bool):
            raise InputError(f"peephole: expected a bool, got {self.peephole!r}")
        check_positive_int("proj_size", self.proj_size, minimum=0)
        if self.proj_size >= self.hidden_size:
            raise InputError(
                f"proj_size: expected 0 or a value < hidden_size = {self.hidden_size}, got {self.proj_size}"
            )
        if not isinstance(self.forget_bias, (int, float)) or isinstance(self.forget_bias, bool):
            raise InputError(f"forget_bias: expected a number, got {self.forget_bias!r}")


@register(
    "lstm",
    description="LSTM with forget gate (1997/2000), optional peepholes and projection",
    test_configs={
        "default": {"hidden_size": 6},
        "rnnkit": {"hidden_size": 6, "kernel": "rnnkit"},
        "peephole": {"hidden_size": 6, "peephole": True},
        "proj": {"hidden_size": 6, "proj_size": 3},
        "proj-rnnkit": {"hidden_size": 6, "proj_size": 3, "kernel": "rnnkit"},
        "peephole-proj-nobias": {"hidden_size": 4, "proj_size": 3, "peephole": True, "bias": False},
    },
)
class LSTM(ClassicRNN):
    """LSTM layer (see the module docstring for the equations and references).

    Args:
        d_model: input width D.
        hidden_size: cell width H (default D).
        peephole: add peephole connections (then rnnkit's own kernel runs; torch.nn has none).
        proj_size: R > 0 projects the output to R features.
        forget_bias: initial forget-gate bias.
        bias: learn biases.
        kernel: fused-mode kernel, ``"auto"``, ``"torch"`` or ``"rnnkit"``.
        newton_*: options of ``mode="newton"`` (:class:`rnnkit.layers._newton.NewtonOptions`).

    Shapes: x ``(B, T, D)`` -> y ``(B, T, R)``; state :class:`LSTMState` ``h`` (B, R), ``c`` (B, H).

    Example:
        >>> layer = LSTM(d_model=16, hidden_size=32, peephole=True)
        >>> y, (h, c) = layer(torch.randn(4, 10, 16))   # y (4, 10, 32)
    """

    GATES = 4

    def __init__(self, **config) -> None:
        config = make_config(LSTMConfig, "lstm", config)
        super().__init__(config, output_size=config.proj_size or None)
        hidden = config.hidden_size
        if config.peephole:
            self.weight_peephole_l0 = nn.Parameter(torch.empty(3, hidden))
        else:
            self.register_parameter("weight_peephole_l0", None)
        if config.proj_size:
            self.weight_hr_l0 = nn.Parameter(torch.empty(config.proj_size, hidden))
        else:
            self.register_parameter("weight_hr_l0", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.bias_ih_l0 is not None:
            hidden = self.hidden_size
            with torch.no_grad():
                # The two biases add up; put the whole forget bias in b_ih so the sum is exact.
                self.bias_ih_l0[hidden : 2 * hidden].fill_(self.config.forget_bias)
                self.bias_hh_l0[hidden : 2 * hidden].zero_()

    def torch_kind(self) -> str | None:
        return None if self.config.peephole else "lstm"

    def flat_weights(self) -> list[torch.Tensor]:
        weights = super().flat_weights()
        return weights + [self.weight_hr_l0] if self.weight_hr_l0 is not None else weights

    def _params(self):
        return super()._params() + (self.weight_peephole_l0, self.weight_hr_l0)

    def _init_state(self, batch_size, device, dtype):
        return LSTMState(
            torch.zeros(batch_size, self.d_output, device=device, dtype=dtype),
            torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype),
        )

    def _recurrent(self, x, state, lengths):
        w_ih, w_hh, b_ih, b_hh, peephole, w_hr = self._params()
        return lstm(x, state, w_ih, w_hh, b_ih, b_hh, peephole=peephole, weight_hr=w_hr, lengths=lengths,
                    mode="recurrent")

    def _cell(self, s, x_t, *params):
        # The flat state is (h, c) side by side: (N, R + H).
        h, c = s.split([self.d_output, self.hidden_size], -1)
        state = lstm_cell(x_t, LSTMState(h, c), *params)
        return torch.cat([state.h, state.c], -1)

    def _newton(self, x, state, lengths):
        states = solve_newton(self, self._cell, x, torch.cat([state.h, state.c], -1), self._params(), lengths)
        h, c = states.split([self.d_output, self.hidden_size], -1)
        return h, LSTMState(h[:, -1], c[:, -1])

    def _native(self, x, state, mask):
        xp = self.input_projection(x, fold_hidden_bias=True)  # (T, B, 4H)
        y, h, c = lstm_sequence(xp, state.h, state.c, self.weight_hh_l0, self.weight_peephole_l0, self.weight_hr_l0, mask)
        return y, LSTMState(h, c)

    def _step(self, x_t, state):
        state = lstm_cell(x_t, state, *self._params())
        return state.h, state
