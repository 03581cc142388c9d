"""Gated recurrent unit, in ``torch.nn.GRU``'s formulation (reset gate applied after W_hn):

    r_t = σ(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)        z_t = σ(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
    n_t = tanh(W_in x_t + b_in + r_t ⊙ (W_hn h_{t-1} + b_hn))        h_t = (1 - z_t) ⊙ n_t + z_t ⊙ h_{t-1}

Cho et al., "Learning Phrase Representations using RNN Encoder-Decoder for Statistical Machine
Translation" (2014), Eq. 5-8, with the reset gate placed as in cuDNN and ``torch.nn.GRU`` (same
parameter names, so its state dicts load). Initialisation U(-1/sqrt(H), 1/sqrt(H)) as torch.nn.GRU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rnnkit.layers._classic import ClassicConfig, ClassicRNN
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.classic_rnn import gru, gru_cell, gru_sequence


@dataclass
class GRUConfig(ClassicConfig):
    """GRU options: only the shared ones (see :class:`ClassicConfig`)."""


@register(
    "gru",
    description="GRU (Cho et al. 2014), torch.nn.GRU formulation",
    test_configs={
        "default": {"hidden_size": 6},
        "torch": {"hidden_size": 6, "kernel": "torch"},
        "rnnkit-nobias": {"kernel": "rnnkit", "bias": False},
        "damped": {"hidden_size": 6, "newton_damping": 0.5},
    },
)
class GRU(ClassicRNN):
    """GRU layer (see the module docstring for the equations and reference).

    Args:
        d_model: input width D.
        hidden_size: H (default D).
        bias: learn biases.
        kernel: fused-mode kernel, ``"auto"`` (rnnkit's own on CPU, where it is faster than
            torch.nn.GRU; cuDNN on GPU), ``"torch"`` or ``"rnnkit"``.
        newton_*: options of ``mode="newton"`` (:class:`rnnkit.layers._newton.NewtonOptions`).

    Shapes: x ``(B, T, D)`` -> y ``(B, T, H)``; state ``h`` ``(B, H)``.

    Example:
        >>> layer = GRU(d_model=16, hidden_size=32)
        >>> y, h = layer(torch.randn(4, 10, 16))   # y (4, 10, 32), h (4, 32)
    """

    GATES = 3
    TORCH_KERNEL_ON_CPU = False  # rnnkit's loop trains faster there (benchmarks/classic_speed.py)

    def __init__(self, **config) -> None:
        super().__init__(make_config(GRUConfig, "gru", config))
        self.reset_parameters()

    def torch_kind(self) -> str | None:
        return "gru"

    def _recurrent(self, x, state, lengths):
        return gru(x, state, *self._params(), lengths=lengths, mode="recurrent")

    def _native(self, x, state, mask):
        xp = self.input_projection(x, fold_hidden_bias=False)  # (T, B, 3H); b_hn is gated by r
        return gru_sequence(xp, state, self.weight_hh_l0, self.bias_hh_l0, mask)

    def _cell(self, h, x_t, *params):
        return gru_cell(x_t, h, *params)

    def _step(self, x_t, state):
        h = gru_cell(x_t, state, *self._params())
        return h, h
