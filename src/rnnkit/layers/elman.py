"""Elman recurrent network: h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), act = tanh or ReLU.

Elman, "Finding Structure in Time", Cognitive Science 14 (1990). Parameters and their
initialisation, U(-1/sqrt(H), 1/sqrt(H)), follow ``torch.nn.RNN`` so its state dicts load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rnnkit.errors import check_choice
from rnnkit.layers._classic import ClassicConfig, ClassicRNN
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.classic_rnn import elman, elman_cell, elman_sequence


@dataclass
class ElmanConfig(ClassicConfig):
    """Elman options (see :class:`ClassicConfig` for the shared ones)."""

    nonlinearity: str = "tanh"  # "tanh" or "relu"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("nonlinearity", self.nonlinearity, ("tanh", "relu"))


@register(
    "elman",
    description="Elman RNN (1990), tanh or ReLU",
    test_configs={
        "tanh": {"hidden_size": 6},
        "relu": {"nonlinearity": "relu"},
        "tanh-rnnkit": {"hidden_size": 6, "kernel": "rnnkit"},
        "relu-rnnkit-nobias": {"nonlinearity": "relu", "kernel": "rnnkit", "bias": False},
        "tanh-quasi": {"hidden_size": 6, "newton_quasi": True},
    },
)
class Elman(ClassicRNN):
    """Elman RNN, h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh).

    Args:
        d_model: input width D.
        hidden_size: H (default D).
        nonlinearity: ``"tanh"`` or ``"relu"``.
        bias: learn biases.
        kernel: fused-mode kernel, ``"auto"`` (rnnkit's own on CPU, where it is faster than
            torch.nn.RNN; cuDNN on GPU), ``"torch"`` or ``"rnnkit"``.
        newton_*: options of ``mode="newton"`` (:class:`rnnkit.layers._newton.NewtonOptions`).

    Shapes: x ``(B, T, D)`` -> y ``(B, T, H)``; state ``h`` ``(B, H)``.

    Example:
        >>> layer = Elman(d_model=16, hidden_size=32)
        >>> y, h = layer(torch.randn(4, 10, 16))   # y (4, 10, 32), h (4, 32)
    """

    GATES = 1
    TORCH_KERNEL_ON_CPU = False  # rnnkit's loop trains faster there (benchmarks/classic_speed.py)

    def __init__(self, **config) -> None:
        super().__init__(make_config(ElmanConfig, "elman", config))
        self.reset_parameters()

    def torch_kind(self) -> str | None:
        return "rnn_relu" if self.config.nonlinearity == "relu" else "rnn_tanh"

    def _recurrent(self, x, state, lengths):
        return elman(x, state, *self._params(), nonlinearity=self.config.nonlinearity, lengths=lengths,
                     mode="recurrent")

    def _native(self, x, state, mask):
        xp = self.input_projection(x, fold_hidden_bias=True)  # (T, B, H)
        return elman_sequence(xp, state, self.weight_hh_l0, self.config.nonlinearity == "relu", mask)

    def _cell(self, h, x_t, *params):
        return elman_cell(x_t, h, *params, self.config.nonlinearity)

    def _step(self, x_t, state):
        h = elman_cell(x_t, state, *self._params(), self.config.nonlinearity)
        return h, h
