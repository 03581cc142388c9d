"""minLSTM: an LSTM whose gates depend on the input only, normalised so the state stays time-independent in scale.

    f_t = σ(W_f x_t + b_f)    i_t = σ(W_i x_t + b_i)    h~_t = g(W_h x_t + b_h)
    f'_t = f_t / (f_t + i_t)   i'_t = i_t / (f_t + i_t)   h_t = f'_t ⊙ h_{t-1} + i'_t ⊙ h~_t

Feng, Tung, Ahmed, Bengio & Hajimirsadeghi, "Were RNNs All We Needed?" (2024), sec. 3.2 (the
normalised gates f', i') and appendix B (the log-space form, with ``g`` from ``mingru.py`` keeping
``h~_t > 0``). In log space ``log f'_t = -softplus(d_t)`` and ``log i'_t = -softplus(-d_t)`` with
``d_t = softplus(-k_f) - softplus(-k_i) = log i_t - log f_t``. The linear maps start as
``torch.nn.Linear`` does (U(-1/sqrt(D), 1/sqrt(D))), as in the paper's reference implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rnnkit.layers.mingru import MinGRUConfig, MinRNN, g, log_g, min_rnn_loop, softplus
from rnnkit.layers.registry import make_config, register


@dataclass
class MinLSTMConfig(MinGRUConfig):
    """minLSTM options: the same fields as :class:`MinGRUConfig`."""


def minlstm_cell(k_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """One minLSTM step from ``k_t = [W_f; W_i; W_h] x_t + b`` (B, 3H) and ``h`` (B, H)."""
    k_f, k_i, k_h = k_t.chunk(3, -1)  # (B, H) each
    f, i = torch.sigmoid(k_f), torch.sigmoid(k_i)
    return f / (f + i) * h + i / (f + i) * g(k_h)


def minlstm_recurrent(x, h0, weight, bias=None, lengths=None):
    """The plain loop that defines minLSTM.

    Args:
        x: ``(B, T, D)``; h0: ``(B, H)``; weight: ``(3H, D)`` rows ``[W_f; W_i; W_h]``; bias: ``(3H,)``
            or None; lengths: ``(B,)`` or None.

    Returns:
        ``y`` ``(B, T, H)`` (the states) and the final state ``(B, H)`` (at each last valid step).
    """
    return min_rnn_loop(minlstm_cell, F.linear(x, weight, bias), h0, lengths)


@register(
    "minlstm",
    description="minLSTM (Feng et al. 2024): normalised input-only gates, parallel log-space scan",
    test_configs={"default": {"hidden_size": 6, "chunk_size": 16, "log_block_size": 8}, "nobias": {"hidden_size": 4, "bias": False}},
)
class MinLSTM(MinRNN):
    """minLSTM layer (module docstring: equations and reference).

    Args:
        d_model: input width D.
        hidden_size: state and output width H (default D).
        bias: learn biases.
        chunk_size: steps per chunk of the ``chunk`` mode.
        log_block_size: steps per block of the log-space ``parallel`` mode.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, H)``; state ``h`` ``(B, H)`` (y is the state sequence).

    Example:
        >>> layer = MinLSTM(d_model=16, hidden_size=32)
        >>> y, h = layer(torch.randn(4, 100, 16))   # y (4, 100, 32), h (4, 32)
    """

    GATES = 3
    cell = staticmethod(minlstm_cell)

    def __init__(self, **config) -> None:
        super().__init__(make_config(MinLSTMConfig, "minlstm", config))

    def _gate_difference(self, k):
        k_f, k_i, k_h = k.chunk(3, -1)  # (B, T, H) each
        # d = log i - log f, computed from softplus so neither log underflows.
        return softplus(-k_f) - softplus(-k_i), k_h

    def _coefficients(self, k):
        d, k_h = self._gate_difference(k)
        # f' = f / (f + i) = σ(-d), i' = σ(d).
        return torch.sigmoid(-d), torch.sigmoid(d) * g(k_h)

    def _log_coefficients(self, k):
        d, k_h = self._gate_difference(k)
        return -softplus(d), -softplus(-d) + log_g(k_h)


__all__ = ["MinLSTM", "MinLSTMConfig", "minlstm_cell", "minlstm_recurrent"]
