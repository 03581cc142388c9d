"""Long short-term memory with a forget gate, optional peepholes and an optional output projection.

    i_t = σ(W_ii x_t + W_hi h_{t-1} + p_i ⊙ c_{t-1} + b_i)      f_t = σ(W_if x_t + W_hf h_{t-1} + p_f ⊙ c_{t-1} + b_f)
    g_t = tanh(W_ig x_t + W_hg h_{t-1} + b_g)                  c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t
    o_t = σ(W_io x_t + W_ho h_{t-1} + p_o ⊙ c_t + b_o)          h_t = W_hr (o_t ⊙ tanh(c_t))

Hochreiter & Schmidhuber, "Long Short-Term Memory" (1997); the forget gate of Gers, Schmidhuber &
Cummins (2000); peepholes (p_i, p_f, p_o) of Gers, Schraudolph & Schmidhuber (2002); the projection
W_hr of Sak, Senior & Beaufays (2014). Without peepholes this is exactly ``torch.nn.LSTM`` (same
parameter names, so its state dicts load); the forget-gate bias starts at 1 (Gers et al. 2000;
Jozefowicz, Zaremba & Sutskever 2015) and everything else at U(-1/sqrt(H), 1/sqrt(H)).

The variants of Greff, Srivastava, Koutník, Steunebrink & Schmidhuber (2017, "LSTM: A Search Space
Odyssey") are options, each one change to the equations above (and combinable):

- ``input_gate=False`` (NIG): ``i_t = 1``; ``forget_gate=False`` (NFG): ``f_t = 1``;
  ``output_gate=False`` (NOG): ``o_t = 1``;
- ``input_activation=False`` (NIAF): ``g_t = W_ig x_t + W_hg h_{t-1} + b_g`` (no tanh);
  ``output_activation=False`` (NOAF): ``h_t = W_hr (o_t ⊙ c_t)``;
- ``coupled=True`` (CIFG): ``f_t = 1 - i_t``, no forget-gate parameters (its input-gate bias starts at
  ``-forget_bias``, so ``f`` starts where a separate forget gate would);
- ``gate_recurrence=True`` (FGR): each sigmoid gate also reads every gate's activation of the previous
  step, ``+ W_gg [i_{t-1}, f_{t-1}, o_{t-1}]``; the state then carries them (:class:`LSTMGateState`).

The paper's vanilla LSTM has peepholes (``peephole=True`` here) and its NP variant is this layer's
default. A removed gate has no parameters: ``weight_ih_l0`` and ``weight_hh_l0`` stack only the gates
present, in the order i, f, g, o, and ``weight_peephole_l0`` one row per sigmoid gate present. A variant
runs the ``recurrent`` mode only (so ``auto`` takes the PyTorch loop): neither PyTorch's fused kernel
nor rnnkit's (:mod:`rnnkit.ops.classic_rnn`) computes them, and asking for one of those kernels
(``kernel="torch"`` or ``"rnnkit"``) with a variant is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import InputError, check_positive_int
from rnnkit.layers._classic import ClassicConfig, ClassicRNN
from rnnkit.layers._newton import solve_newton
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.classic_rnn import LSTMState, lstm, lstm_cell, lstm_sequence, run_cell

#: The options of Greff et al.'s variants and their vanilla values.
VARIANT_OPTIONS = {"input_gate": True, "forget_gate": True, "output_gate": True, "input_activation": True,
                   "output_activation": True, "coupled": False, "gate_recurrence": False}


class LSTMGateState(NamedTuple):
    """State of an LSTM with ``gate_recurrence``: ``h`` (B, R), ``c`` (B, H) and ``gates`` (B, S H), the
    previous step's sigmoid-gate activations (the S of i, f, o that have parameters)."""

    h: torch.Tensor
    c: torch.Tensor
    gates: torch.Tensor


@dataclass
class LSTMConfig(ClassicConfig):
    """LSTM options (see :class:`ClassicConfig` for the shared ones)."""

    peephole: bool = False  # diagonal peephole connections from the cell to the i, f, o gates
    proj_size: int = 0  # R > 0 projects h to R features (must be < hidden_size, as in torch.nn.LSTM)
    forget_bias: float = 1.0  # initial value of the forget-gate bias (b_ih + b_hh)
    # Greff et al. (2017)'s variants (see the module docstring)
    input_gate: bool = True  # False: NIG, i = 1
    forget_gate: bool = True  # False: NFG, f = 1
    output_gate: bool = True  # False: NOG, o = 1
    input_activation: bool = True  # False: NIAF, no tanh on g
    output_activation: bool = True  # False: NOAF, no tanh on c in the output
    coupled: bool = False  # True: CIFG, f = 1 - i
    gate_recurrence: bool = False  # True: FGR, the gates read the previous step's gates

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in VARIANT_OPTIONS:
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if self.coupled and not (self.input_gate and self.forget_gate):
            raise InputError(
                f"coupled: expected input_gate=True and forget_gate=True with coupled=True (CIFG computes f from i), "
                f"got input_gate={self.input_gate}, forget_gate={self.forget_gate}"
            )
        if self.is_variant and self.kernel != "auto":
            raise InputError(
                f"kernel: expected 'auto' for an LSTM variant (no fused kernel computes {self.variant_options}), "
                f"got {self.kernel!r}"
            )
        if not isinstance(self.peephole, bool):
            raise InputError(f"peephole: expected a bool, got {self.peephole!r}")
        check_positive_int("proj_size", self.proj_size, minimum=0)
        if self.proj_size >= self.hidden_size:
            raise InputError(
                f"proj_size: expected 0 or a value < hidden_size = {self.hidden_size}, got {self.proj_size}"
            )
        if not isinstance(self.forget_bias, (int, float)) or isinstance(self.forget_bias, bool):
            raise InputError(f"forget_bias: expected a number, got {self.forget_bias!r}")

    @property
    def variant_options(self) -> dict[str, bool]:
        """The variant options that differ from the vanilla LSTM."""
        return {k: getattr(self, k) for k, v in VARIANT_OPTIONS.items() if getattr(self, k) != v}

    @property
    def is_variant(self) -> bool:
        return bool(self.variant_options)

    @property
    def gate_names(self) -> tuple[str, ...]:
        """The gate blocks with parameters, in the order i, f, g, o."""
        present = {"i": self.input_gate, "f": self.forget_gate and not self.coupled, "g": True, "o": self.output_gate}
        return tuple(name for name, kept in present.items() if kept)


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
        # Greff et al. (2017)'s variants, with peepholes as the paper's vanilla LSTM
        "nig": {"hidden_size": 4, "peephole": True, "input_gate": False},
        "nfg": {"hidden_size": 4, "peephole": True, "forget_gate": False},
        "nog": {"hidden_size": 4, "peephole": True, "output_gate": False},
        "niaf": {"hidden_size": 4, "peephole": True, "input_activation": False},
        "noaf": {"hidden_size": 4, "peephole": True, "output_activation": False},
        "cifg": {"hidden_size": 4, "peephole": True, "coupled": True},
        "fgr": {"hidden_size": 4, "peephole": True, "gate_recurrence": True},
        "cifg-fgr-proj-nobias": {"hidden_size": 4, "proj_size": 3, "coupled": True, "gate_recurrence": True,
                                 "bias": False},
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
        input_gate, forget_gate, output_gate, input_activation, output_activation, coupled,
            gate_recurrence: Greff et al. (2017)'s variants (module docstring); a variant runs
            ``recurrent`` only.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, R)``; state :class:`LSTMState` ``h`` (B, R), ``c`` (B, H)
    (:class:`LSTMGateState` with ``gates`` (B, S H) too, with ``gate_recurrence``).

    Example:
        >>> layer = LSTM(d_model=16, hidden_size=32, peephole=True)
        >>> y, (h, c) = layer(torch.randn(4, 10, 16))   # y (4, 10, 32)
    """

    GATES = 4

    def __init__(self, **config) -> None:
        config = make_config(LSTMConfig, "lstm", config)
        super().__init__(config, output_size=config.proj_size or None, gates=len(config.gate_names))
        hidden = config.hidden_size
        self.sigmoid_gates = tuple(name for name in config.gate_names if name != "g")  # S of them
        if config.peephole:
            self.weight_peephole_l0 = nn.Parameter(torch.empty(len(self.sigmoid_gates), hidden))
        else:
            self.register_parameter("weight_peephole_l0", None)
        if config.gate_recurrence:
            width = len(self.sigmoid_gates) * hidden
            self.weight_gg_l0 = nn.Parameter(torch.empty(width, width))
        else:
            self.register_parameter("weight_gg_l0", None)
        if config.proj_size:
            self.weight_hr_l0 = nn.Parameter(torch.empty(config.proj_size, hidden))
        else:
            self.register_parameter("weight_hr_l0", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        c = self.config
        # CIFG's f = 1 - i = sigmoid(-i~): an input-gate bias of -forget_bias starts f where a forget gate would.
        gate, sign = ("i", -1.0) if c.coupled else ("f", 1.0)
        if self.bias_ih_l0 is not None and gate in c.gate_names:
            hidden = self.hidden_size
            rows = slice(c.gate_names.index(gate) * hidden, (c.gate_names.index(gate) + 1) * hidden)
            with torch.no_grad():
                # The two biases add up; put the whole forget bias in b_ih so the sum is exact.
                self.bias_ih_l0[rows].fill_(sign * c.forget_bias)
                self.bias_hh_l0[rows].zero_()

    @property
    def modes(self) -> tuple[str, ...]:
        return ("recurrent",) if self.config.is_variant else type(self).MODES

    def torch_kind(self) -> str | None:
        return None if self.config.peephole or self.config.is_variant else "lstm"

    def flat_weights(self) -> list[torch.Tensor]:
        weights = super().flat_weights()
        return weights + [self.weight_hr_l0] if self.weight_hr_l0 is not None else weights

    def _params(self):
        return super()._params() + (self.weight_peephole_l0, self.weight_hr_l0)

    def _init_state(self, batch_size, device, dtype):
        h = torch.zeros(batch_size, self.d_output, device=device, dtype=dtype)
        c = torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)
        if self.config.gate_recurrence:
            return LSTMGateState(h, c, torch.zeros(batch_size, len(self.sigmoid_gates) * self.hidden_size,
                                                   device=device, dtype=dtype))
        return LSTMState(h, c)

    def variant_cell(self, x_t: torch.Tensor, state) -> LSTMState | LSTMGateState:
        """One step of any configuration, variants included: ``x_t`` (B, D) and the state -> the next state."""
        c = self.config
        w_ih, w_hh, b_ih, b_hh, peephole, w_hr = self._params()
        pre = F.linear(x_t, w_ih, b_ih) + F.linear(state.h, w_hh, b_hh)  # (B, G H)
        blocks = dict(zip(c.gate_names, pre.chunk(len(c.gate_names), 1)))
        if c.gate_recurrence:
            from_gates = F.linear(state.gates, self.weight_gg_l0).chunk(len(self.sigmoid_gates), 1)
            blocks.update({name: blocks[name] + extra for name, extra in zip(self.sigmoid_gates, from_gates)})
        peep = dict(zip(self.sigmoid_gates, peephole)) if peephole is not None else {}

        def gate(name: str, cell: torch.Tensor) -> torch.Tensor | None:
            if name not in blocks:
                return None
            return torch.sigmoid(blocks[name] + peep[name] * cell if name in peep else blocks[name])

        i, f = gate("i", state.c), gate("f", state.c)
        if c.coupled:
            f = 1 - i
        g = torch.tanh(blocks["g"]) if c.input_activation else blocks["g"]
        cell = (state.c if f is None else f * state.c) + (g if i is None else i * g)
        o = gate("o", cell)
        h = torch.tanh(cell) if c.output_activation else cell
        h = h if o is None else o * h
        if w_hr is not None:
            h = F.linear(h, w_hr)
        if c.gate_recurrence:
            activations = {"i": i, "f": f, "o": o}
            return LSTMGateState(h, cell, torch.cat([activations[name] for name in self.sigmoid_gates], 1))
        return LSTMState(h, cell)

    def _recurrent(self, x, state, lengths):
        if self.config.is_variant:
            return run_cell(self.variant_cell, x, state, lengths)
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
        state = self.variant_cell(x_t, state) if self.config.is_variant else lstm_cell(x_t, state, *self._params())
        return state.h, state
