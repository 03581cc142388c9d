"""The sLSTM cell of xLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory", section 2.2,
eq. 8-17): a scalar-memory LSTM with exponential gating, a normaliser state and a stabiliser state,
and block-diagonal (multi-head) recurrent weights.

    [z~, i~, f~, o~] = W x_t + R h_{t-1} + b          R block-diagonal: H heads of K x K per gate
    m_t = max(log f_t + m_{t-1}, i~)                  log f_t = logsigmoid(f~) (or f~: exponential forget gate)
    i'_t = exp(i~ - m_t)        f'_t = exp(log f_t + m_{t-1} - m_t)
    c_t = f'_t c_{t-1} + i'_t tanh(z~)               n_t = f'_t n_{t-1} + i'_t
    h_t = sigmoid(o~) c_t / n_t                       y_t = GroupNorm_heads(h_t) (``norm=True``)

``c`` and ``n`` are the paper's cell and normaliser scaled by ``exp(-m_t)``; their ratio, and so
``h``, is the paper's. The recurrence mixes memory only within a head: ``h`` feeds back through
``R``, one ``K x K`` block per head and gate. The zero state is "nothing read": ``n = 0`` marks it and
its ``m`` is read as minus infinity (:func:`~rnnkit.ops.padding.lowest_where_empty`), so the
first step's stabiliser is ``i~`` and ``n >= 1`` from then on (the step that sets the maximum adds 1).

The state is ``(h, c, n, m)``, ``4 H K`` floats. The gates depend on ``h_{t-1}`` through a
nonlinearity, so no scan or chunked form exists; as for the classic cells, the modes are
``recurrent`` (the loop with autograd, the definition) and ``fused`` (the same loop with a
hand-written backward pass), both from :mod:`rnnkit.ops.slstm`, and ``auto`` runs ``fused``. The
paper's block puts a causal convolution before the input and forget gates and a gated MLP after
the cell; in rnnkit the residual block supplies the MLP and the layer is the cell with its group
norm. Initialisation: input weights as ``torch.nn.Linear``, recurrent blocks ``U(-1/sqrt(K),
1/sqrt(K))``, forget-gate biases ``linspace(3, 6)`` over the units (long memory at the start, as the
paper's code), the other biases 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rnnkit.errors import InputError, check_choice
from rnnkit.layers._multihead import HeadNorm, check_head_config
from rnnkit.layers.base import Recurrence
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.slstm import SLSTMState, slstm


@dataclass
class SLSTMConfig:
    """Options of :class:`SLSTM`."""

    d_model: int  # input width D
    num_heads: int = 4  # H: blocks of the recurrent matrices
    head_dim: int | None = None  # K per head; the cell width is H K (default K = d_model // H)
    forget_gate: str = "sigmoid"  # "sigmoid" (log f = logsigmoid(f~)) or "exp" (log f = f~)
    norm: bool = True  # per-head group norm of the output (the paper's block)

    def __post_init__(self) -> None:
        self.head_dim = check_head_config(self.d_model, self.num_heads, self.head_dim)
        check_choice("forget_gate", self.forget_gate, ("sigmoid", "exp"))
        if not isinstance(self.norm, bool):
            raise InputError(f"norm: expected a bool, got {self.norm!r}")


@register(
    "slstm",
    description="sLSTM (Beck et al. 2024): exponential gating, normaliser and stabiliser, block-diagonal heads",
    test_configs={
        "default": {"num_heads": 1},
        "heads-exp": {"num_heads": 2, "head_dim": 3, "forget_gate": "exp"},
        "no-norm": {"num_heads": 1, "norm": False},
    },
)
class SLSTM(Recurrence):
    """xLSTM's scalar LSTM (see the module docstring).

    Args: the fields of :class:`SLSTMConfig`.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, H K)``; state :class:`SLSTMState`, four ``(B, H K)`` tensors.

    Example:
        >>> layer = SLSTM(d_model=64, num_heads=4)
        >>> y, (h, c, n, m) = layer(torch.randn(2, 100, 64))   # y (2, 100, 64)
    """

    MODES = ("recurrent", "fused")

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = c = make_config(SLSTMConfig, "slstm", config)
        H, K = c.num_heads, c.head_dim
        self.d_input, self.d_output = c.d_model, H * K
        self.input_proj = nn.Linear(c.d_model, 4 * H * K)  # gates z, i, f, o
        self.recurrent = nn.Parameter(torch.empty(4, H, K, K))
        self.norm = HeadNorm(H, K, kind="layer") if c.norm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        H, K = self.config.num_heads, self.config.head_dim
        self.input_proj.reset_parameters()
        bound = 1.0 / math.sqrt(K)
        with torch.no_grad():
            nn.init.uniform_(self.recurrent, -bound, bound)
            bias = self.input_proj.bias.view(4, H * K)
            bias.zero_()
            bias[2] = torch.linspace(3.0, 6.0, H * K)

    def _init_state(self, batch_size, device, dtype):
        return SLSTMState(*(torch.zeros(batch_size, self.d_output, device=device, dtype=dtype) for _ in range(4)))

    def _autocast_safe(self, x: torch.Tensor, mode: str | None) -> bool:
        # The fused backward is written for one dtype: under autocast it runs in the parameters' dtype.
        return mode != "fused"

    def _forward(self, x, state, lengths, mode):
        B, T, _ = x.shape
        c = self.config
        pre_x = self.input_proj(x).view(B, T, 4, c.num_heads, c.head_dim)
        y, state = slstm(pre_x, SLSTMState(*state), self.recurrent, exp_forget=c.forget_gate == "exp",
                         lengths=lengths, mode=mode)  # y (B, T, H K)
        return (self.norm(y) if self.norm is not None else y), state

    def _step(self, x_t, state):
        y, state = self._forward(x_t[:, None], state, None, "recurrent")
        return y[:, 0], state
