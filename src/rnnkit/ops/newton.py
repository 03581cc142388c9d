"""Nonlinear recurrences ``h_t = f(h_{t-1}, x_t)`` solved for all ``t`` at once by Newton's method.

DEER (Lim et al., "Parallelizing non-linear sequential models over the sequence length", ICLR 2024)
and its successors (quasi-DEER and ELK, Gonzalez et al., NeurIPS 2024; ParaRNN, Danieli et al. 2025)
treat the whole state sequence ``h = (h_0, ..., h_{T-1})`` as the root of the residual
``r_t(h) = h_t - f(h_{t-1}, x_t)``. One Newton iteration linearises ``f`` around the current guess
``h^k`` and solves the resulting *linear* recurrence with a parallel scan:

    h^{k+1}_t = J_t h^{k+1}_{t-1} + c_t,   J_t = df/dh (h^k_{t-1}, x_t),   c_t = f(h^k_{t-1}, x_t) - J_t h^k_{t-1}

One public entry, :func:`newton_recurrence`, with three forms:

- ``recurrent``: :func:`newton_recurrence_recurrent`, the plain loop ``h_t = f(h_{t-1}, x_t)``,
  autograd through it. The definition.
- ``newton``: exact Newton (DEER). The Jacobian's structure is declared by ``block_size``: ``1``
  for a diagonal Jacobian (ParaGRU: each step is :func:`rnnkit.ops.linear_scan`), ``K`` for
  ``K x K`` blocks of consecutive state entries (ParaLSTM's ``(h, c)`` pairs) and None for a
  dense one (Elman, GRU, LSTM): those steps are :func:`rnnkit.ops.matrix_scan`. Cost per
  iteration: ``K`` forward-mode Jacobian-vector products of ``f`` over all ``B T`` steps at once
  (``K = S``, the state size, when dense) and a matrix scan of ``O(T S^3)`` work and ``O(T S^2)``
  memory when dense (``O(T S K^2)`` for blocks, ``O(T S)`` when diagonal): a dense Jacobian makes
  each iteration ``S`` times the sequential loop's ``O(T S^2)`` work, which is why ParaRNN restricts
  the cells to diagonal or small blocks.
- ``quasi``: quasi-DEER: the diagonal of the Jacobian only, so every step is a linear scan. Each
  iteration is cheaper and convergence is linear rather than quadratic; the final gradient still
  uses the exact Jacobian.

**Convergence.** Whatever the Jacobian (exact, its diagonal, damped or not), ``h^{k+1}_0 = f(h_{-1},
x_0)`` is exact after one iteration, and if ``h^k`` is exact up to step ``t - 1`` so is ``h^{k+1}`` up
to step ``t``: undamped, the iterate is exact at steps ``< k`` after ``k`` iterations, so ``T``
iterations always suffice (DEER's guarantee; the default ``max_iters``). Near the solution exact
Newton converges quadratically, so it usually stops far earlier.

The solver stops when the scaled residual ``max |h^k - f(h^k_{-1}, x)| / max(1, max |f|)`` (relative
to the state's magnitude) is at most ``tol``. The default (``tol=None``) is dtype-aware: the target
:func:`default_tol` (``1e-12`` in fp64, ``1e-6`` in fp32, ``1e-3`` in half precision), or, where
round-off keeps the residual above that target, the round-off floor: the solve also stops once the
residual is within :func:`stall_tol` (``STALL_EPS = 256`` machine epsilons, ``3.1e-5`` in fp32; in
fp64 it equals the target, so fp64 always reaches ``1e-12``) and neither of the last two updates
lowered it below the best before them (``info.stalled``). The floor exists because the parallel scan
sums products of Jacobians: where those grow, its round-off is relative to them rather than to the
state. An explicit ``tol`` is held exactly. Failing that within ``max_iters`` updates, or on an
overflow that the trust region below cannot prevent, the solver raises
:class:`~rnnkit.errors.ConvergenceError` with the diagnostics, never a silent wrong answer. With
quadratic convergence, the iteration that brings the residual under ``1e-12`` leaves an error at the
level of fp64 round-off, which is how ``newton`` meets the suite's ``1e-10`` fp64 tolerance.

**Adaptive trust region** (the default, ``damping=None``): plain Newton, except that a full step whose
residual is non-finite or more than ``1000`` times ``max(1, residual)`` before it (products of
Jacobians with norms above 1 overflowed, or nearly so) is rejected and retried from the same
linearisation with the damping below at ``lam = 1, 10, 100, ...`` (``ADAPTIVE_DAMPING``), back to
``lam = 0`` on the next update. The damping applies only after each sequence's first step whose
residual exceeds the tolerance: the converged prefix and that step are solved undamped, so each
update still extends the exact prefix by one step and ``T`` updates still suffice. Past ``lam = 1e8``
a finite step is accepted (the prefix still grows) and an overflow raises. ``info.rejected`` and
``info.damped`` count the rejected tries and the damped updates. ``damping=0`` is plain DEER with no
fallback.

**Fixed damping** (ELK-style): ``damping = lam > 0`` solves each step as a Kalman filter with the
previous iterate as an observation of precision ``lam`` at a fixed gain,
``h^{k+1}_t = (J_t h^{k+1}_{t-1} + c_t + lam h^k_t) / (1 + lam)``: a trust region that shrinks the
scan's matrices by ``1 / (1 + lam)``, so products of Jacobians with norms above 1 cannot blow up the
iterate. The fixed point is unchanged; applied at every step, it trades the ``T``-iteration bound for
stability (the default ``max_iters`` is then ``max(T, DAMPED_MAX_ITERS)``).

**Gradients** (implicit function theorem): at the solution ``h*``, the gradient of a loss with
``dL/dh = g`` is ``lambda^T df/d(theta, x, h0)`` with ``lambda_t = g_t + J_{t+1}^T lambda_{t+1}``:
one reverse (adjoint) scan with the Jacobians at ``h*``, and one vector-Jacobian product of ``f``
over all steps at once, never backpropagation through the iterations. The output is
``f(h*_{t-1}, x_t)`` evaluated with autograd (equal to ``h*`` to the solver's tolerance), and a
custom autograd function turns its incoming gradient ``g`` into ``lambda``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.autograd.function import once_differentiable

from rnnkit.errors import (
    ConvergenceError,
    InputError,
    check_choice,
    check_lengths,
    check_positive_int,
    check_tensor,
)
from rnnkit.ops._forms import is_empty_batch
from rnnkit.ops.matrix_scan import matrix_scan
from rnnkit.ops.padding import freeze_padding, valid_mask
from rnnkit.ops.scan import linear_scan

#: Forms :func:`newton_recurrence` accepts, ``recurrent`` (the definition) first.
NEWTON_MODES = ("recurrent", "newton", "quasi")
#: The default ``max_iters`` floor with damping: a damped iteration contracts the error by about
#: ``lam / (1 + lam)`` per iteration near the solution, so ``lam = 10`` needs ~300 to go from 1 to 1e-12.
DAMPED_MAX_ITERS = 1000
#: The adaptive trust region (``damping=None``): the first damping tried after a rejected step, the
#: factor it grows by on each further rejection, the largest it reaches before a growing residual is
#: accepted or an overflow is reported, and the growth of the residual (relative to ``max(1, r)``)
#: beyond which a step is rejected: far above Newton's ordinary overshoots, which it recovers from.
ADAPTIVE_DAMPING = (1.0, 10.0, 1e8, 1e3)
#: The round-off stop of the default tolerance, in units of the dtype's machine epsilon.
STALL_EPS = 256
#: Initial guesses by name: every step zero, or every step the initial state.
NEWTON_INITS = ("zeros", "state")

#: ``cell(h_prev (N, S), x_t (N, *X), *params) -> h_t (N, S)`` for any number of rows ``N``.
Cell = Callable[..., torch.Tensor]


@dataclass
class NewtonInfo:
    """What a Newton solve did: filled in by :func:`newton_recurrence` when passed as ``info=``.

    Attributes:
        iterations: Newton updates performed (0 when the initial guess already solved it).
        residuals: the scaled residual of the initial guess and after each update (``iterations + 1``
            entries while the solve succeeds).
        converged: whether the solve stopped at a solution: the last residual is within ``tol``,
            or (``stalled``) within :func:`stall_tol` where round-off stopped its decrease.
        stalled: converged at the round-off floor rather than within ``tol``.
        tol: the tolerance the solve used.
        rejected: steps the adaptive trust region rejected (the residual grew or overflowed).
        damped: accepted updates taken with a damping above 0.
        mode: ``"newton"`` or ``"quasi"``.
        iterate: the last iterate ``(B, T, S)`` (detached): the solution, or where a failed solve
            stopped.
    """

    iterations: int = 0
    residuals: list[float] = field(default_factory=list)
    converged: bool = False
    stalled: bool = False
    tol: float = 0.0
    rejected: int = 0
    damped: int = 0
    mode: str = ""
    iterate: torch.Tensor | None = None


def default_tol(dtype: torch.dtype) -> float:
    """The default target tolerance for ``dtype`` (module docstring): about ``1e4`` ulp of 1 in
    fp64 and ``8`` in fp32, below the suite's bounds; :func:`stall_tol` bounds what the default
    accepts where round-off keeps the residual above it."""
    if dtype == torch.float64:
        return 1e-12
    if dtype == torch.float32:
        return 1e-6
    return 1e-3


def stall_tol(dtype: torch.dtype) -> float:
    """The largest scaled residual the default tolerance accepts once Newton stops reducing it:
    ``STALL_EPS`` machine epsilons of ``dtype`` (``3.1e-5`` in fp32, ``5.7e-14`` in fp64, where it
    sits below :func:`default_tol` and so never applies), at least :func:`default_tol`."""
    return max(default_tol(dtype), STALL_EPS * torch.finfo(dtype).eps)


# ----------------------------------------------------------------------------------- validation
def _check_inputs(cell, x, h0, params, lengths, state_size):
    if not callable(cell):
        raise InputError(f"cell: expected a callable cell(h_prev, x_t, *params), got {type(cell).__name__}")
    x = check_tensor("x", x)
    if not x.is_floating_point():
        raise InputError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2 or x.shape[1] < 1:
        raise InputError(f"x: expected a tensor of shape (B, T, *X) with T >= 1, got shape {tuple(x.shape)}")
    if not isinstance(params, (tuple, list)):
        raise InputError(f"params: expected a tuple of the cell's parameters, got {type(params).__name__}")
    if h0 is None:
        if state_size is None:
            raise InputError("state_size: expected the state width S when h0 is None, got None")
        check_positive_int("state_size", state_size)
        h0 = x.new_zeros(x.shape[0], state_size)
    else:
        h0 = check_tensor("h0", h0)
        if h0.dim() != 2 or h0.shape[0] != x.shape[0]:
            raise InputError(f"h0: expected shape (B, S) with B = {x.shape[0]}, got {tuple(h0.shape)}")
        if h0.dtype != x.dtype or h0.device != x.device:
            raise InputError(f"h0: expected dtype {x.dtype} on {x.device} (those of x), got {h0.dtype} on {h0.device}")
        if state_size is not None and state_size != h0.shape[1]:
            raise InputError(f"state_size: expected h0's width {h0.shape[1]} or None, got {state_size}")
    return x, h0, tuple(params), check_lengths(lengths, x.shape[0], x.shape[1], x.device)


def _check_block_size(block_size, S: int) -> int:
    if block_size is None:
        return S
    check_positive_int("block_size", block_size)
    if S % block_size:
        raise InputError(f"block_size: expected a divisor of the state width S = {S} (or None), got {block_size}")
    return block_size


# ----------------------------------------------------------------------------------- the definition
def newton_recurrence_recurrent(cell, x, h0=None, params=(), *, lengths=None, state_size=None):
    """The plain loop that defines :func:`newton_recurrence`: ``h_t = cell(h_{t-1}, x_t, *params)``.

    Args and returns as :func:`newton_recurrence`.
    """
    x, h0, params, lengths = _check_inputs(cell, x, h0, params, lengths, state_size)
    h, hs = h0, []
    for t, x_t in enumerate(x.unbind(1)):
        h = freeze_padding(t, lengths, cell(h, x_t, *params), h)
        hs.append(h)
    return torch.stack(hs, 1)


# ----------------------------------------------------------------------------------- the solver
class _Step:
    """The masked cell over all ``N = B T`` steps at once and its Jacobian w.r.t. the state."""

    def __init__(self, cell: Cell, x: torch.Tensor, params: tuple, valid: torch.Tensor | None, K: int) -> None:
        B, T = x.shape[:2]
        self.cell, self.params, self.K = cell, params, K
        self.x = x.reshape(B * T, *x.shape[2:])
        self.valid = None if valid is None else valid.reshape(B * T, 1)

    def __call__(self, prev: torch.Tensor) -> torch.Tensor:
        """``f(prev_t, x_t)`` at valid steps, ``prev_t`` at padding; ``prev`` ``(N, S)``."""
        out = self.cell(prev, self.x, *self.params)
        return out if self.valid is None else torch.where(self.valid, out, prev)

    def jacobian(self, prev: torch.Tensor, diagonal_only: bool) -> torch.Tensor:
        """``(N, S / K, K, K)`` blocks of ``df/dprev`` (the blocks' diagonals ``(N, S)`` when
        ``diagonal_only``): ``K`` Jacobian-vector products, tangent ``j`` one at entry ``j`` of
        every block, which gives column ``j`` of every block when the Jacobian is block-diagonal."""
        N, S = prev.shape
        K, M = self.K, S // self.K
        tangents = torch.eye(K, dtype=prev.dtype, device=prev.device).repeat(1, M)  # (K, S)
        tangents = tangents[:, None, :].expand(K, N, S)
        cols = torch.func.vmap(lambda v: torch.func.jvp(self, (prev,), (v,))[1])(tangents)  # (K, N, S)
        blocks = cols.reshape(K, N, M, K).permute(1, 2, 3, 0)  # (N, M, K rows, K columns)
        return torch.diagonal(blocks, dim1=-2, dim2=-1).reshape(N, S) if diagonal_only else blocks


def _apply(J: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``J h`` for diagonal ``J`` ``(..., S)`` or blocks ``(..., M, K, K)``, ``h`` ``(..., S)``."""
    if J.dim() == h.dim():
        return J * h
    return (J @ h.reshape(*J.shape[:-1], 1)).reshape(h.shape)


def _scan(J: torch.Tensor, c: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """``h_t = J_t h_{t-1} + c_t`` for diagonal ``J`` ``(B, T, S)`` or blocks ``(B, T, M, K, K)``."""
    if J.dim() == c.dim():
        return linear_scan(J, c, h0)
    B, T, M, K, _ = J.shape
    h = matrix_scan(J, c.reshape(B, T, M, K), None if h0 is None else h0.reshape(B, M, K))
    return h.reshape(c.shape)


def _shift(h0: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``(h0, h_0, ..., h_{T-2})``: the state each step reads."""
    return torch.cat([h0[:, None], h[:, :-1]], 1)


def _evaluate(step: _Step, h0: torch.Tensor, h: torch.Tensor):
    """The cell at every step of the iterate ``h`` ``(B, T, S)``: the states it read ``(B T, S)``,
    ``f`` ``(B, T, S)``, the residual per step ``(B, T)`` and in all, both scaled by
    ``max(1, max |f|)``."""
    B, T, S = h.shape
    prev = _shift(h0, h).reshape(B * T, S)
    f = step(prev).reshape(B, T, S)
    if not f.numel():
        return prev, f, f.new_zeros(B, T), 0.0
    scale = max(1.0, float(f.abs().max()))
    per_step = (h - f).abs().amax(-1) / scale
    return prev, f, per_step, float(per_step.max())


def _stalled(residuals: list[float], floor: float | None) -> bool:
    """Round-off reached: the residual is within ``floor`` and neither of the last two updates
    lowered it below the best before them (a converging iteration, linear or quadratic, keeps
    lowering it; round-off makes it fluctuate)."""
    r = residuals
    return floor is not None and len(r) >= 3 and r[-1] <= floor and min(r[-2:]) >= min(r[:-2])


def _unconverged_tail(per_step: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(B, T)``: True at the steps after each sequence's first step with a residual above
    ``threshold`` (the steps before it and that step itself are left undamped)."""
    bad = per_step > threshold
    first = torch.where(bad.any(1), bad.to(torch.int8).argmax(1), bad.shape[1])
    steps = torch.arange(bad.shape[1], device=bad.device)
    return steps[None] > first[:, None]


def _update(J, c, h, h0, lam, tail):
    """The next iterate from the linearisation ``(J, c)`` at ``h``, damped by ``lam`` at the steps
    ``tail`` marks ``(B, T)`` (None: at every step)."""
    if lam:
        weight = torch.full_like(c[..., 0], lam) if tail is None else tail.to(c.dtype) * lam  # (B, T)
        d = 1 + weight
        J = J / d.view(*d.shape, *([1] * (J.dim() - 2)))
        c = (c + weight[..., None] * h) / d[..., None]
    return _scan(J, c, h0)


def _overflow(k: int, residual: float, info: NewtonInfo, how: str) -> ConvergenceError:
    return ConvergenceError(
        f"newton: the residual became {residual} after {k} iterations (the iterate overflowed{how}); "
        "use a larger damping or mode='recurrent'", info)


def _solve(step: _Step, h0, guess, mode, tol, floor, max_iters, damping, info: NewtonInfo):
    """Newton iterations from ``guess`` ``(B, T, S)``; returns the solution and the exact Jacobian
    blocks (or diagonal, when ``K = 1``) at it. ``damping`` None is the adaptive trust region (module
    docstring); ``floor`` None disables the round-off stop. Runs without autograd."""
    B, T, S = guess.shape
    quasi = mode == "quasi" and step.K > 1
    adaptive = damping is None
    lam = 0.0 if adaptive else damping
    h = guess
    prev, f, per_step, residual = _evaluate(step, h0, h)
    for k in range(max_iters + 1):
        info.residuals.append(residual)
        info.iterations, info.iterate = k, h
        if not math.isfinite(residual):
            raise _overflow(k, residual, info, "")
        J = step.jacobian(prev, diagonal_only=quasi or step.K == 1)
        stalled = residual > tol and _stalled(info.residuals, floor)
        if residual <= tol or stalled:
            info.converged, info.stalled = True, stalled
            if quasi:  # the gradient needs the exact Jacobian at the solution
                J = step.jacobian(prev, diagonal_only=False)
            return h, J.reshape(B, T, *J.shape[1:])
        if k == max_iters:
            break
        J = J.reshape(B, T, *J.shape[1:])
        c = f - _apply(J, prev.view(B, T, S))
        tail = _unconverged_tail(per_step, max(tol, floor or 0.0)) if adaptive else None
        while True:
            new = _update(J, c, h, h0, lam, tail)
            evaluated = _evaluate(step, h0, new)
            if not adaptive or evaluated[3] <= ADAPTIVE_DAMPING[3] * max(1.0, residual):
                break
            info.rejected += 1
            lam = ADAPTIVE_DAMPING[0] if not lam else lam * ADAPTIVE_DAMPING[1]
            if lam > ADAPTIVE_DAMPING[2]:
                if math.isfinite(evaluated[3]):
                    break  # the undamped prefix still grows by a step: T updates still suffice
                raise _overflow(k + 1, evaluated[3], info, f" even with damping {ADAPTIVE_DAMPING[2]:g}")
        if adaptive:
            info.damped += bool(lam)
            lam = 0.0
        h = new
        prev, f, per_step, residual = evaluated
    raise ConvergenceError(
        f"newton: not converged within max_iters = {max_iters} iterations (residual {info.residuals[-1]:.3e} > "
        f"tol = {tol:.3e}; residuals {['%.1e' % r for r in info.residuals[-5:]]}); raise max_iters (T = {T} "
        "always suffices without a fixed damping), loosen tol, or use mode='recurrent'", info)


class _Adjoint(torch.autograd.Function):
    """Identity forward; backward ``g -> lambda``, ``lambda_t = g_t + J_{t+1}^T lambda_{t+1}``."""

    @staticmethod
    def forward(ctx, f, J):
        ctx.save_for_backward(J)
        return f.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (J,) = ctx.saved_tensors
        Jt = J if J.dim() == g.dim() else J.transpose(-1, -2)
        # lambda runs backwards in time: the scan over the flipped sequence, J_{t+1}^T at step t.
        nxt = torch.cat([Jt[:, 1:], torch.zeros_like(Jt[:, :1])], 1)
        lam = _scan(nxt.flip(1).contiguous(), g.flip(1).contiguous(), None).flip(1)
        return lam, None


def _guess(init, B, T, h0):
    if isinstance(init, torch.Tensor):
        if tuple(init.shape) != (B, T, h0.shape[1]) or init.dtype != h0.dtype or init.device != h0.device:
            raise InputError(
                f"init: expected a guess of shape (B, T, S) = {(B, T, h0.shape[1])}, dtype {h0.dtype} on {h0.device}, "
                f"got shape {tuple(init.shape)}, dtype {init.dtype} on {init.device}")
        return init.detach()
    check_choice("init", init, NEWTON_INITS)
    return h0.detach()[:, None].expand(B, T, -1).contiguous() if init == "state" else h0.new_zeros(B, T, h0.shape[1])


def newton_recurrence(
    cell: Cell,
    x: torch.Tensor,
    h0: torch.Tensor | None = None,
    params: tuple = (),
    *,
    lengths: torch.Tensor | None = None,
    mode: str = "newton",
    block_size: int | None = None,
    state_size: int | None = None,
    tol: float | None = None,
    max_iters: int | None = None,
    damping: float | None = None,
    init: str | torch.Tensor = "zeros",
    info: NewtonInfo | None = None,
) -> torch.Tensor:
    """All states of ``h_t = cell(h_{t-1}, x_t, *params)``, by the loop or by Newton's method.

    Args:
        cell: ``cell(h_prev, x_t, *params) -> h_t`` with ``h_prev`` ``(N, S)``, ``x_t`` ``(N, *X)`` for
            any number of rows ``N`` (the solver evaluates all ``B T`` steps as one batch), built
            from torch operations that ``torch.func.jvp`` differentiates.
        x: ``(B, T, *X)`` per-step inputs.
        h0: ``(B, S)`` initial state, or None for zeros (then ``state_size`` gives ``S``).
        params: the cell's parameters (gradients reach them), passed on positionally.
        lengths: optional ``(B,)`` in ``[1, T]``; the state is frozen at steps ``t >= length``
            (and ``x`` there is never read).
        mode: ``"recurrent"``, ``"newton"`` or ``"quasi"`` (module docstring).
        block_size: the Jacobian ``dh_t/dh_{t-1}`` is block-diagonal with blocks of this many
            consecutive state entries (1: diagonal); None: dense. A wrong declaration gives a wrong
            Jacobian: Newton then converges slowly or not at all (never to a wrong answer, since
            the stopping test uses the cell itself), and the gradient is wrong.
        state_size: ``S`` when ``h0`` is None.
        tol: stopping tolerance on the scaled residual; None: :func:`default_tol` of ``x``'s dtype,
            or :func:`stall_tol` once round-off stops the residual's decrease (module docstring).
        max_iters: most Newton updates; None: ``T``, which always suffices without a fixed damping,
            and ``max(T, DAMPED_MAX_ITERS)`` with one (which converges linearly, with no such bound).
        damping: None (default): plain Newton with the adaptive trust region, which damps a step only
            where the full one overflows or increases the residual; a number ``lam >= 0``: a fixed
            ELK-style damping of every step, 0 being plain Newton with no fallback (module docstring).
        init: the initial guess: ``"zeros"``, ``"state"`` (``h0`` at every step) or a ``(B, T, S)``
            tensor (e.g. the solution of the previous training step).
        info: a :class:`NewtonInfo` to fill with the diagnostics (iterations, residuals).

    Returns:
        ``h`` ``(B, T, S)``: every state; ``h[:, -1]`` is each sequence's final state.

    Raises:
        InputError: bad arguments or an unknown ``mode``.
        ConvergenceError: the Newton solve did not reach ``tol`` within ``max_iters``, or its
            iterate overflowed (with the adaptive trust region: even at its largest damping).

    Example:
        >>> W, U = torch.randn(8, 3) / 3, torch.randn(8, 8) / 4
        >>> cell = lambda h, x_t, W, U: torch.tanh(x_t @ W.T + h @ U.T)
        >>> info = NewtonInfo()
        >>> h = newton_recurrence(cell, torch.randn(2, 50, 3), None, (W, U), state_size=8, info=info)
        >>> info.iterations, h.shape                       # (a few, torch.Size([2, 50, 8]))
    """
    check_choice("mode", mode, NEWTON_MODES)
    x, h0, params, lengths = _check_inputs(cell, x, h0, params, lengths, state_size)
    B, T, S = x.shape[0], x.shape[1], h0.shape[1]
    K = _check_block_size(block_size, S)
    floor = None
    if tol is None:
        tol, floor = default_tol(x.dtype), stall_tol(x.dtype)
    elif not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
        raise InputError(f"tol: expected a number > 0 or None, got {tol!r}")
    if damping is not None and (not isinstance(damping, (int, float)) or isinstance(damping, bool) or not damping >= 0):
        raise InputError(f"damping: expected a number >= 0 or None, got {damping!r}")
    if max_iters is None:
        max_iters = T if not damping else max(T, DAMPED_MAX_ITERS)
    check_positive_int("max_iters", max_iters, minimum=0)
    info = NewtonInfo() if info is None else info
    if not isinstance(info, NewtonInfo):
        raise InputError(f"info: expected a NewtonInfo or None, got {type(info).__name__}")
    info.iterations, info.residuals, info.converged, info.tol, info.mode, info.iterate = 0, [], False, float(tol), mode, None
    info.stalled, info.rejected, info.damped = False, 0, 0
    guess = _guess(init, B, T, h0)
    if mode == "recurrent" or is_empty_batch(x):
        return newton_recurrence_recurrent(cell, x, h0, params, lengths=lengths)
    valid = None
    if lengths is not None:
        valid = valid_mask(lengths, T)  # (B, T)
        # Padding is never read: zeros there keep NaN or Inf out of the Jacobians and the gradients.
        x = torch.where(valid.view(B, T, *([1] * (x.dim() - 2))), x, torch.zeros((), dtype=x.dtype, device=x.device))
    step = _Step(cell, x, params, valid, K)
    with torch.no_grad():
        h, J = _solve(step, h0.detach(), guess, mode, tol, floor, max_iters, damping, info)
    # One evaluation with autograd at the solution: its gradient w.r.t. params, x and h0 (through
    # step 0) is the vector-Jacobian product, and _Adjoint hands it lambda instead of g.
    f = step(_shift(h0, h).reshape(B * T, S)).reshape(B, T, S)
    return _Adjoint.apply(f, J)


__all__ = ["NEWTON_INITS", "NEWTON_MODES", "NewtonInfo", "default_tol", "newton_recurrence",
           "newton_recurrence_recurrent", "stall_tol"]
