"""minGRU: a GRU whose gate and candidate depend on the input only, so the state update is a linear scan.

    z_t = σ(W_z x_t + b_z)      h~_t = g(W_h x_t + b_h)      h_t = (1 - z_t) ⊙ h_{t-1} + z_t ⊙ h~_t

Feng, Tung, Ahmed, Bengio & Hajimirsadeghi, "Were RNNs All We Needed?" (2024), sec. 3.1 (eq. for
minGRU) and the log-space version of appendix B, whose activation ``g(x) = x + 1/2`` for ``x >= 0``
and ``σ(x)`` otherwise keeps ``h~_t > 0`` so that the scan can run on logarithms (Heinsen 2023).
Both linear maps start as ``torch.nn.Linear`` does (U(-1/sqrt(D), 1/sqrt(D))), as in the paper's
reference implementation, which prescribes no special initialisation.

The helpers here (``g``, ``log_g``, :class:`MinRNN`) are shared with ``minlstm.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import InputError, check_positive_int
from rnnkit.layers.base import Recurrence
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.padding import freeze_padding
from rnnkit.ops.scan import fused_available, linear_scan, linear_scan_log


def g(x: torch.Tensor) -> torch.Tensor:
    """The paper's positive activation: ``x + 1/2`` for ``x >= 0``, ``σ(x)`` below (continuous at 0)."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def softplus(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + e^x)`` to full precision (``F.softplus`` returns ``x`` above 20, off by ~2e-9)."""
    return torch.logaddexp(x, x.new_zeros(()))


def log_g(x: torch.Tensor) -> torch.Tensor:
    """``log g(x)`` without forming ``g``: ``log(x + 1/2)`` for ``x >= 0``, ``-softplus(-x)`` below."""
    # relu keeps the unused branch finite, so no NaN reaches the gradient through torch.where.
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -softplus(-x))


@dataclass
class MinGRUConfig:
    """minGRU options."""

    d_model: int  # input width D
    hidden_size: int | None = None  # state and output width H; defaults to d_model
    bias: bool = True  # learn b_z and b_h
    chunk_size: int = 64  # steps per chunk of the `chunk` mode
    log_block_size: int = 64  # steps per block of the log-space `parallel` mode (bounds fp32 cancellation)

    def __post_init__(self) -> None:
        check_positive_int("d_model", self.d_model)
        if self.hidden_size is None:
            self.hidden_size = self.d_model
        check_positive_int("hidden_size", self.hidden_size)
        if not isinstance(self.bias, bool):
            raise InputError(f"bias: expected a bool, got {self.bias!r}")
        check_positive_int("chunk_size", self.chunk_size)
        check_positive_int("log_block_size", self.log_block_size)


def mingru_cell(k_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """One minGRU step from the input projection ``k_t = [W_z; W_h] x_t + b`` (B, 2H) and ``h`` (B, H)."""
    k_z, k_h = k_t.chunk(2, -1)  # (B, H) each
    z = torch.sigmoid(k_z)
    return (1 - z) * h + z * g(k_h)


def min_rnn_loop(cell, k: torch.Tensor, h0: torch.Tensor, lengths: torch.Tensor | None):
    """``cell`` stepped over the projections ``k`` (B, T, G*H); the state is frozen past ``lengths``."""
    h, ys = h0, []
    for t, k_t in enumerate(k.unbind(1)):
        h = freeze_padding(t, lengths, cell(k_t, h), h)
        ys.append(h)
    return torch.stack(ys, 1), h


def mingru_recurrent(x, h0, weight, bias=None, lengths=None):
    """The plain loop that defines minGRU.

    Args:
        x: ``(B, T, D)``; h0: ``(B, H)``; weight: ``(2H, D)`` rows ``[W_z; W_h]``; bias: ``(2H,)`` or
            None; lengths: ``(B,)`` or None.

    Returns:
        ``y`` ``(B, T, H)`` (the states) and the final state ``(B, H)`` (at each last valid step).
    """
    return min_rnn_loop(mingru_cell, F.linear(x, weight, bias), h0, lengths)


class MinRNN(Recurrence):
    """What minGRU and minLSTM share: ``h_t = a_t ⊙ h_{t-1} + b_t`` with ``a``, ``b`` from ``x_t`` alone.

    Subclasses define one input projection ``self.linear`` (D -> G*H) and map its output ``k``
    ``(..., G*H)`` to the scan's coefficients in two ways that agree: ``_coefficients(k) -> (a, b)``
    and ``_log_coefficients(k) -> (log a, log b)``. Modes:

    - ``recurrent``: ``cell`` stepped over time (:func:`min_rnn_loop`); the definition;
    - ``parallel``: the paper's log-space scan (:func:`rnnkit.ops.linear_scan_log`, in chunks of
      ``log_block_size`` steps to bound fp32 cancellation);
    - ``chunk``: :func:`rnnkit.ops.linear_scan` in its chunked form;
    - ``fused``: the compiled CPU scan (only offered when it compiled on this machine).
    """

    autocast_safe = False  # its scan kernels take one dtype; see Recurrence.autocast_safe

    #: Number of H-wide blocks in the input projection.
    GATES = 2
    MODES = ("recurrent", "parallel", "chunk", "fused")

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.d_input = config.d_model
        self.d_output = self.hidden_size = config.hidden_size
        self.linear = nn.Linear(config.d_model, self.GATES * config.hidden_size, bias=config.bias)

    @property
    def modes(self) -> tuple[str, ...]:
        return self.MODES if fused_available() else tuple(m for m in self.MODES if m != "fused")

    def _auto_mode(self, x: torch.Tensor) -> str:
        if x.device.type == "cpu":
            return "fused" if "fused" in self.modes and fused_available(x.dtype) else "chunk"
        return "parallel"  # the accelerator form of the paper

    # ------------------------------------------------------------------ subclass hooks
    #: One step ``(k_t (B, G*H), h (B, H)) -> h`` as the paper writes it, e.g. :func:`mingru_cell`
    #: (set with ``staticmethod`` by each subclass).
    cell: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def _coefficients(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _log_coefficients(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # ------------------------------------------------------------------ contract
    def _init_state(self, batch_size, device, dtype):
        return torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)

    def _forward(self, x, state, lengths, mode):
        k = self.linear(x)  # (B, T, G*H)
        if mode == "recurrent":
            return min_rnn_loop(self.cell, k, state, lengths)
        if mode == "parallel":
            log_a, log_b = self._log_coefficients(k)  # (B, T, H) each
            h = linear_scan_log(log_a, log_b, state, lengths=lengths, block_size=self.config.log_block_size)
        else:
            a, b = self._coefficients(k)  # (B, T, H) each
            h = linear_scan(a, b, state, lengths=lengths, mode=mode, chunk_size=self.config.chunk_size)
        return h, h[:, -1]  # past a sequence's length the scan carries its state unchanged

    def _step(self, x_t, state):
        h = self.cell(self.linear(x_t), state)
        return h, h

    def extra_repr(self) -> str:
        c = self.config
        return f"{c.d_model}, {c.hidden_size}, bias={c.bias}, chunk_size={c.chunk_size}, log_block_size={c.log_block_size}"


@register(
    "mingru",
    description="minGRU (Feng et al. 2024): input-only gates, parallel log-space scan",
    test_configs={"default": {"hidden_size": 6, "chunk_size": 16, "log_block_size": 8}, "nobias": {"hidden_size": 4, "bias": False}},
)
class MinGRU(MinRNN):
    """minGRU layer (module docstring: equations and reference).

    Args:
        d_model: input width D.
        hidden_size: state and output width H (default D).
        bias: learn biases.
        chunk_size: steps per chunk of the ``chunk`` mode.
        log_block_size: steps per block of the log-space ``parallel`` mode.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, H)``; state ``h`` ``(B, H)`` (y is the state sequence).

    Example:
        >>> layer = MinGRU(d_model=16, hidden_size=32)
        >>> y, h = layer(torch.randn(4, 100, 16))   # y (4, 100, 32), h (4, 32); mode="auto"
    """

    GATES = 2
    cell = staticmethod(mingru_cell)

    def __init__(self, **config) -> None:
        super().__init__(make_config(MinGRUConfig, "mingru", config))

    def _coefficients(self, k):
        k_z, k_h = k.chunk(2, -1)  # (B, T, H) each
        # 1 - σ(k) = σ(-k), exact for large k where 1 - σ(k) would round to 0.
        return torch.sigmoid(-k_z), torch.sigmoid(k_z) * g(k_h)

    def _log_coefficients(self, k):
        k_z, k_h = k.chunk(2, -1)
        # log(1 - z) = -softplus(k), log z = -softplus(-k) (appendix B, listing "log-space minGRU").
        return -softplus(k_z), -softplus(-k_z) + log_g(k_h)


__all__ = ["MinGRU", "MinGRUConfig", "MinRNN", "g", "log_g", "mingru_cell", "mingru_recurrent"]
