"""The ``newton`` mode of the nonlinear cells (Elman, GRU, LSTM, ParaGRU, ParaLSTM): their shared
options and the call into :func:`rnnkit.ops.newton_recurrence`.

``mode="newton"`` solves the whole sequence by Newton iterations over parallel scans (DEER; see
:mod:`rnnkit.ops.newton` for the method, its cost and its guarantees). It computes the function of
``recurrent`` to the solver's tolerance, so the contract suite holds it to the same bounds as every
other mode: the default tolerance (``1e-12`` in fp64, ``1e-6`` in fp32, or fp32's round-off floor
where the scan's round-off keeps the residual above that) sits below them, and exact Newton's
quadratic convergence takes the last iterate to round-off. By default a full step that overflows is
retried damped (the adaptive trust region of :mod:`rnnkit.ops.newton`). The diagnostics of the last
call are in the layer's ``newton_info`` (:class:`rnnkit.ops.NewtonInfo`); a solve that does not
converge raises :class:`rnnkit.ConvergenceError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rnnkit.errors import InputError, check_choice, check_positive_int
from rnnkit.ops.newton import NEWTON_INITS, NewtonInfo, newton_recurrence

#: Initial guesses a layer takes: the op's, and ``"previous"``, the layer's last solution when its
#: shape, dtype and device match (warm starts across training steps), else zeros.
LAYER_INITS = NEWTON_INITS + ("previous",)


@dataclass(kw_only=True)
class NewtonOptions:
    """Options of ``mode="newton"`` (keyword-only fields of the layer's config)."""

    newton_tol: float | None = None  # stopping tolerance on the scaled residual; None: by dtype
    newton_max_iters: int | None = None  # most Newton updates; None: T undamped (always enough)
    newton_damping: float | None = None  # None: adaptive trust region; a number >= 0: fixed ELK damping
    newton_quasi: bool = False  # quasi-DEER: iterate with the Jacobian's diagonal only
    newton_init: str = "zeros"  # initial guess: "zeros", "state" or "previous"

    def __post_init__(self) -> None:
        tol = self.newton_tol
        if tol is not None and (not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0):
            raise InputError(f"newton_tol: expected a number > 0 or None, got {tol!r}")
        if self.newton_max_iters is not None:
            check_positive_int("newton_max_iters", self.newton_max_iters, minimum=0)
        damping = self.newton_damping
        if damping is not None and (not isinstance(damping, (int, float)) or isinstance(damping, bool) or not damping >= 0):
            raise InputError(f"newton_damping: expected a number >= 0 or None, got {damping!r}")
        if not isinstance(self.newton_quasi, bool):
            raise InputError(f"newton_quasi: expected a bool, got {self.newton_quasi!r}")
        check_choice("newton_init", self.newton_init, LAYER_INITS)


@torch.compiler.disable  # the loop stops on a residual it reads: one graph break, documented
def solve_newton(
    layer: torch.nn.Module,
    cell: Callable[..., torch.Tensor],
    x: torch.Tensor,
    h0: torch.Tensor,
    params: tuple,
    lengths: torch.Tensor | None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Every state ``(B, T, S)`` of ``h_t = cell(h_{t-1}, x_t, *params)`` by Newton's method with the
    options of ``layer.config`` (:class:`NewtonOptions`); stores the diagnostics in
    ``layer.newton_info`` and, for ``newton_init="previous"``, the solution for the next call."""
    if torch.compiler.is_exporting():
        raise InputError("mode: 'newton' cannot be exported (its iteration count depends on the values); "
                         "expected another mode, got 'newton'")
    options: NewtonOptions = layer.config
    init: str | torch.Tensor = options.newton_init
    if init == "previous":
        previous = getattr(layer, "_newton_previous", None)
        B, T, S = x.shape[0], x.shape[1], h0.shape[1]
        fits = previous is not None and previous.shape == (B, T, S) and previous.dtype == h0.dtype
        init = previous if fits and previous.device == h0.device else "zeros"
    info = NewtonInfo()
    h = newton_recurrence(
        cell, x, h0, params, lengths=lengths, mode="quasi" if options.newton_quasi else "newton",
        block_size=block_size, tol=options.newton_tol, max_iters=options.newton_max_iters,
        damping=options.newton_damping, init=init, info=info,
    )
    layer.newton_info = info
    if options.newton_init == "previous":
        layer._newton_previous = info.iterate
    return h
