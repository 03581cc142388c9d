"""What the classic cells (Elman, LSTM, GRU) share: parameters under PyTorch's names, kernel choice.

Each classic layer has three modes:

- ``recurrent``: the plain per-step loop in the layer's file, autograd through it (the definition);
- ``newton``: the whole sequence by Newton iterations over dense matrix scans (DEER;
  :mod:`rnnkit.layers._newton`), options ``newton_*`` in the config;
- ``fused``: a whole-sequence kernel, either PyTorch's own (``kernel="torch"``: oneDNN on CPU,
  cuDNN on GPU, only for configurations ``torch.nn`` supports) or rnnkit's hand-differentiated loop
  (``kernel="rnnkit"``: any configuration, e.g. LSTM peepholes). ``kernel="auto"`` picks the faster
  one measured by ``benchmarks/classic_speed.py`` for the device.

Under autocast, PyTorch's LSTM kernel needs oneDNN support for the low precision on the CPU
(:func:`rnnkit.ops.torch_rnn.runs_under_autocast`). Where there is none, the kernel runs in the
parameters' dtype with autocast off, as rnnkit's own kernel always does, and a warning says so once:
such a CPU trains the layer in fp32 instead of failing.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import InputError, check_choice, check_positive_int
from rnnkit.layers._newton import NewtonOptions, solve_newton
from rnnkit.layers.base import Recurrence, State, length_mask
from rnnkit.ops import torch_rnn as torch_kernels

KERNELS = ("auto", "torch", "rnnkit")


@dataclass
class CellConfig(NewtonOptions):
    """Options of every nonlinear cell with a ``newton`` mode (the ``newton_*`` ones: :class:`NewtonOptions`)."""

    d_model: int  # input width D_in
    hidden_size: int | None = None  # H; defaults to d_model
    bias: bool = True  # learn b_ih and b_hh (PyTorch keeps both)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("d_model", self.d_model)
        if self.hidden_size is None:
            self.hidden_size = self.d_model
        check_positive_int("hidden_size", self.hidden_size)
        if not isinstance(self.bias, bool):
            raise InputError(f"bias: expected a bool, got {self.bias!r}")


@dataclass
class ClassicConfig(CellConfig):
    """Options every classic cell shares: :class:`CellConfig`'s and the fused kernel."""

    kernel: str = "auto"  # fused-mode kernel: "auto", "torch" (torch.nn's) or "rnnkit" (own loop)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("kernel", self.kernel, KERNELS)


def time_major_mask(lengths: torch.Tensor | None, max_len: int) -> torch.Tensor | None:
    """``(T, B, 1)`` bool validity mask for the time-major kernels, or None."""
    if lengths is None:
        return None
    return length_mask(lengths, max_len).t().unsqueeze(-1)


def _warn_fp32_fallback(layer: str, dtype: torch.dtype) -> None:
    warnings.warn(
        f"{layer}: PyTorch's fused kernel cannot run under {dtype} autocast on this CPU (oneDNN has "
        "no kernel for that precision here); the layer computes in its parameters' dtype instead",
        RuntimeWarning,
    )


class ClassicRNN(Recurrence):
    """Shared parameters and dispatch of the classic cells; see the module docstring."""

    MODES = ("recurrent", "newton", "fused")
    #: Gate blocks stacked in ``weight_ih_l0`` (1 Elman, 3 GRU, 4 LSTM).
    GATES: ClassVar[int] = 1
    #: Whether ``kernel="auto"`` takes PyTorch's kernel on the CPU (on accelerators it always does:
    #: cuDNN's fused kernels beat a per-step loop there).
    TORCH_KERNEL_ON_CPU: ClassVar[bool] = True

    def __init__(self, config: ClassicConfig, output_size: int | None = None, gates: int | None = None) -> None:
        # gates: blocks of weight_ih_l0 when a configuration has fewer than GATES (LSTM variants)
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.hidden_size = hidden
        self.d_input = config.d_model
        self.d_output = output_size or hidden
        gates = (gates or self.GATES) * hidden
        self.weight_ih_l0 = nn.Parameter(torch.empty(gates, config.d_model))
        self.weight_hh_l0 = nn.Parameter(torch.empty(gates, self.d_output))
        if config.bias:
            self.bias_ih_l0 = nn.Parameter(torch.empty(gates))
            self.bias_hh_l0 = nn.Parameter(torch.empty(gates))
        else:
            self.register_parameter("bias_ih_l0", None)
            self.register_parameter("bias_hh_l0", None)

    def reset_parameters(self) -> None:
        """PyTorch's initialisation, U(-1/sqrt(H), 1/sqrt(H)) for every parameter."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    # ---------------------------------------------------------------- kernel choice
    def torch_kind(self) -> str | None:
        """Name of the ``torch._VF`` kernel for this configuration, or None if torch has none."""
        raise NotImplementedError

    def prefers_torch_kernel(self, device: torch.device) -> bool:
        """Whether ``kernel="auto"`` uses PyTorch's kernel (when available) on ``device``."""
        return device.type != "cpu" or self.TORCH_KERNEL_ON_CPU

    def fused_kernel(self, device: torch.device) -> str:
        """``"torch"`` or ``"rnnkit"``: the kernel mode ``fused`` runs on ``device``."""
        kernel = self.config.kernel
        if kernel == "torch":
            if self.torch_kind() is None:
                raise InputError(
                    f"kernel: expected 'auto' or 'rnnkit' for this {type(self).__name__} configuration "
                    "(torch.nn has no kernel for it), got 'torch'"
                )
            return "torch"
        if kernel == "auto" and self.torch_kind() is not None and self.prefers_torch_kernel(device):
            return "torch"
        return "rnnkit"

    def _torch_kernel_takes_autocast(self, device: torch.device) -> bool:
        """False when autocast is on and PyTorch's kernel has no kernel for its dtype on ``device``."""
        if device.type == "meta" or not torch.is_autocast_enabled(device.type):
            return True
        dtype = torch.get_autocast_dtype(device.type)
        return torch_kernels.runs_under_autocast(self.torch_kind(), device.type, dtype)

    def _params(self) -> tuple[torch.Tensor | None, ...]:
        """The cell's parameters in the order its reference functions take them."""
        return self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0

    def _init_state(self, batch_size, device, dtype):
        return torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)

    def flat_weights(self) -> list[torch.Tensor]:
        """Parameters in ``nn.LSTM._flat_weights`` order (layer 0)."""
        weights = [self.weight_ih_l0, self.weight_hh_l0]
        if self.bias_ih_l0 is not None:
            weights += [self.bias_ih_l0, self.bias_hh_l0]
        return weights

    def input_projection(self, x: torch.Tensor, fold_hidden_bias: bool) -> torch.Tensor:
        """``(T, B, G*H)`` time-major ``x W_ih^T + b_ih`` (``+ b_hh`` when it is not gated)."""
        bias = self.bias_ih_l0
        if bias is not None and fold_hidden_bias:
            bias = bias + self.bias_hh_l0
        return F.linear(x.transpose(0, 1), self.weight_ih_l0, bias)

    # ---------------------------------------------------------------- dispatch
    def _forward(self, x, state, lengths, mode):
        if mode == "recurrent":
            return self._recurrent(x, state, lengths)
        if mode == "newton":
            return self._newton(x, state, lengths)
        if self.fused_kernel(x.device) == "torch":
            hx = (state,) if isinstance(state, torch.Tensor) else tuple(state)
            y, final = torch_kernels.torch_rnn(
                self.torch_kind(), x, hx, self.flat_weights(), self.bias_ih_l0 is not None, lengths
            )
            return y, final[0] if isinstance(state, torch.Tensor) else type(state)(*final)
        y, final = self._native(x, state, time_major_mask(lengths, x.shape[1]))
        return y.transpose(0, 1), final  # (B, T, D_out)

    def _autocast_safe(self, x: torch.Tensor, mode: str | None) -> bool:
        # torch's fused kernels and the reference loop take autocast's dtypes; rnnkit's own kernel is
        # hand-differentiated in one dtype, so it runs in the parameters' dtype with autocast off.
        if mode in (None, "recurrent"):
            return True
        if mode == "newton":  # its tolerance is for the parameters' dtype
            return False
        if self.fused_kernel(x.device) != "torch":
            return False
        if self._torch_kernel_takes_autocast(x.device):
            return True
        _warn_fp32_fallback(type(self).__name__, torch.get_autocast_dtype(x.device.type))
        return False

    def _recurrent(self, x: torch.Tensor, state: State, lengths: torch.Tensor | None):
        raise NotImplementedError

    def _cell(self, h: torch.Tensor, x_t: torch.Tensor, *params: torch.Tensor | None) -> torch.Tensor:
        """One step on the flat state ``h`` ``(N, S)`` with ``x_t`` ``(N, D)``: what Newton solves."""
        raise NotImplementedError

    def _newton(self, x: torch.Tensor, state: State, lengths: torch.Tensor | None):
        """``newton`` mode for a tensor state (Elman, GRU): the states are the outputs."""
        states = solve_newton(self, self._cell, x, state, self._params(), lengths)
        return states, states[:, -1]

    def _native(self, x: torch.Tensor, state: State, mask: torch.Tensor | None):
        """rnnkit's kernel; returns time-major ``y`` (T, B, D_out) and the final state."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.d_input}, {self.hidden_size}, " + ", ".join(
            f"{k}={v!r}" for k, v in vars(self.config).items() if k not in ("d_model", "hidden_size")
        )
