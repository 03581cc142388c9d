"""Newton's method for nonlinear recurrences (rnnkit.ops.newton) beyond the shared family checks:
the T-iteration guarantee, diagnostics, failure paths, damping, initial guesses, the implicit
gradient, and the matrix scan's own edges."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rnnkit.errors import ConvergenceError, InputError
from rnnkit.ops import NewtonInfo, matrix_scan, newton_recurrence
from rnnkit.ops.classic_rnn import gru_cell
from rnnkit.ops.newton import default_tol, newton_recurrence_recurrent, stall_tol
from tests.helpers import assert_close

f64 = torch.float64


def _elman(h, x_t, w_ih, w_hh):
    return torch.tanh(F.linear(x_t, w_ih) + F.linear(h, w_hh))


def _problem(B=2, T=12, D=3, S=4, scale=1.5, seed=0, dtype=f64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=gen, dtype=dtype)
    w_ih = torch.randn(S, D, generator=gen, dtype=dtype)
    w_hh = torch.randn(S, S, generator=gen, dtype=dtype) * scale / S**0.5
    h0 = torch.randn(B, S, generator=gen, dtype=dtype)
    return x, h0, (w_ih, w_hh)


def test_iterate_is_exact_up_to_step_k_after_k_iterations() -> None:
    """DEER's guarantee: the k-th iterate equals the sequential solution at steps < k, so T
    iterations always suffice; a strongly recurrent cell keeps the later steps inexact meanwhile."""
    x, h0, params = _problem(T=10, scale=3.0)
    ref = newton_recurrence_recurrent(_elman, x, h0, params)
    T = x.shape[1]
    later_wrong = 0
    for k in range(1, T + 1):
        info = NewtonInfo()
        try:
            newton_recurrence(_elman, x, h0, params, max_iters=k, tol=1e-300, info=info)
        except ConvergenceError as error:
            assert error.info is info
        assert info.iterations == k
        assert_close(info.iterate[:, :k], ref[:, :k], what=f"iterate {k}, steps < {k}")
        later_wrong += bool(k < T and (info.iterate[:, k:] - ref[:, k:]).abs().max() > 1e-6)
    assert later_wrong > 0, "the test problem converges too fast to show the bound"
    h = newton_recurrence(_elman, x, h0, params, max_iters=T)
    assert_close(h, ref)


@pytest.mark.parametrize("mode", ["newton", "quasi"])
def test_diagnostics(mode: str) -> None:
    x, h0, params = _problem(T=40, scale=0.9)
    info = NewtonInfo()
    newton_recurrence(_elman, x, h0, params, mode=mode, info=info)
    assert info.converged and info.mode == mode and info.tol == default_tol(f64)
    assert len(info.residuals) == info.iterations + 1
    assert info.residuals[-1] <= info.tol < info.residuals[0]
    assert 1 <= info.iterations <= x.shape[1]


def test_exact_newton_converges_faster_than_quasi() -> None:
    x, h0, params = _problem(T=60, scale=0.9)
    exact, quasi = NewtonInfo(), NewtonInfo()
    newton_recurrence(_elman, x, h0, params, mode="newton", info=exact)
    newton_recurrence(_elman, x, h0, params, mode="quasi", info=quasi)
    assert exact.iterations < quasi.iterations


def test_not_converged_raises_with_diagnostics() -> None:
    x, h0, params = _problem(T=30, scale=2.0)
    with pytest.raises(ConvergenceError, match=r"not converged within max_iters = 2 .*residual") as caught:
        newton_recurrence(_elman, x, h0, params, max_iters=2)
    info = caught.value.info
    assert isinstance(info, NewtonInfo) and not info.converged and len(info.residuals) == 3


def test_overflow_raises_instead_of_returning_nan() -> None:
    """Strong recurrent weights: the products of Jacobians in the first linear scan overflow fp32.
    Plain Newton without its fallback (``damping=0``) reports it; the default adaptive trust region
    damps the step instead, and what it cannot solve in time still raises."""
    x, h0, params = _problem(T=60, scale=50.0, dtype=torch.float32)
    with pytest.raises(ConvergenceError, match="overflowed"):
        newton_recurrence(_elman, x, h0, params, max_iters=5, damping=0.0)
    info = NewtonInfo()
    with pytest.raises(ConvergenceError, match="not converged within max_iters = 5"):
        newton_recurrence(_elman, x, h0, params, max_iters=5, info=info)
    assert info.rejected > 0 and info.damped > 0 and all(map(math.isfinite, info.residuals))


def test_trust_region_solves_what_overflows_plain_newton() -> None:
    """The overflowing problem above, solved by the default within ``T`` updates: each rejected full
    step is retried damped past the converged prefix, so the prefix still grows by a step per update."""
    x, h0, params = _problem(T=60, scale=50.0, dtype=torch.float32)
    ref = newton_recurrence_recurrent(_elman, x, h0, params)
    info = NewtonInfo()
    h = newton_recurrence(_elman, x, h0, params, info=info)
    assert info.converged and info.rejected > 0 and info.damped > 0 and info.iterations <= x.shape[1]
    assert_close(h, ref)


def test_hopeless_overflow_raises() -> None:
    """A cell whose state grows without bound overflows fp32 at every damping: a clear error."""
    x = torch.ones(1, 200, 1)
    with pytest.raises(ConvergenceError, match="overflowed even with damping"):
        newton_recurrence(lambda h, x_t: 1e3 * h + x_t, x, None, state_size=1)


def test_default_tolerance_stops_at_the_round_off_floor() -> None:
    """A user ``tol`` below fp32's reach fails; the default accepts the round-off floor, but only
    within ``stall_tol``, and only once the residual stops falling."""
    x, h0, params = _problem(T=30, scale=1.2, dtype=torch.float32)
    with pytest.raises(ConvergenceError, match="not converged"):
        newton_recurrence(_elman, x, h0, params, tol=1e-12)
    assert stall_tol(torch.float32) == 256 * torch.finfo(torch.float32).eps
    assert stall_tol(f64) == default_tol(f64)  # fp64 reaches its target: no round-off stop
    info = NewtonInfo()
    newton_recurrence(_elman, x, h0, params, info=info)
    assert info.converged and info.residuals[-1] <= stall_tol(torch.float32)
    assert info.stalled == (info.residuals[-1] > info.tol)


def test_damping_converges_to_the_same_solution() -> None:
    x, h0, params = _problem(T=30, scale=1.2)
    ref = newton_recurrence_recurrent(_elman, x, h0, params)
    plain, damped = NewtonInfo(), NewtonInfo()
    newton_recurrence(_elman, x, h0, params, info=plain)
    h = newton_recurrence(_elman, x, h0, params, damping=1.0, max_iters=500, info=damped)
    assert_close(h, ref)
    assert damped.iterations > plain.iterations


def test_warm_start_from_the_solution_needs_no_iteration() -> None:
    x, h0, params = _problem(T=30, scale=0.9)
    info = NewtonInfo()
    h = newton_recurrence(_elman, x, h0, params, info=info)
    again = NewtonInfo()
    h2 = newton_recurrence(_elman, x, h0, params, init=h.detach(), info=again)
    assert again.iterations == 0 and again.converged
    assert_close(h2, h)
    state_init = NewtonInfo()
    newton_recurrence(_elman, x, h0, params, init="state", info=state_init)
    assert state_init.converged


def test_implicit_gradient_uses_no_backprop_through_iterations() -> None:
    """The gradient graph holds one cell evaluation, whatever the number of iterations: the graph of
    backprop through the iterations would grow with them."""
    x, h0, params = _problem(T=50, scale=0.9)
    params = tuple(p.requires_grad_() for p in params)
    calls = {"n": 0}

    def counting(h, x_t, *p):
        if torch.is_grad_enabled():
            calls["n"] += 1
        return _elman(h, x_t, *p)

    info = NewtonInfo()
    h = newton_recurrence(counting, x, h0, params, info=info)
    assert info.iterations > 2 and calls["n"] == 1
    h.sum().backward()
    fresh = tuple(p.detach().requires_grad_() for p in params)
    grads = torch.autograd.grad(newton_recurrence_recurrent(_elman, x, h0, fresh).sum(), fresh)
    for p, g in zip(params, grads):
        assert_close(p.grad, g, kind="grad", what="parameter gradient")


def test_gru_gradients_match_the_loop_in_fp64() -> None:
    gen = torch.Generator().manual_seed(3)
    B, T, D, S = 3, 40, 4, 5
    x = torch.randn(B, T, D, dtype=f64, generator=gen, requires_grad=True)
    h0 = torch.randn(B, S, dtype=f64, generator=gen, requires_grad=True)
    params = [torch.randn(3 * S, n, dtype=f64, generator=gen).mul(0.4).requires_grad_() for n in (D, S)]
    params += [torch.randn(3 * S, dtype=f64, generator=gen).mul(0.4).requires_grad_() for _ in range(2)]

    def cell(h, x_t, *p):
        return gru_cell(x_t, h, *p)

    weights = torch.randn(B, T, S, dtype=f64, generator=gen)
    lengths = torch.tensor([T, 17, 1])
    results = []
    for fn in (newton_recurrence, newton_recurrence_recurrent):
        h = fn(cell, x, h0, tuple(params), lengths=lengths)
        results.append((h, torch.autograd.grad((h * weights).sum(), [x, h0, *params])))
    (h, grads), (h_ref, grads_ref) = results
    assert_close(h, h_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, kind="grad")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mode": "no-such-mode"}, "mode: expected one of"),
    ({"tol": 0.0}, "tol: expected a number > 0"),
    ({"max_iters": -1}, "max_iters: expected an int >= 0"),
    ({"damping": -1.0}, "damping: expected a number >= 0"),
    ({"init": "ones"}, "init: expected one of"),
    ({"init": torch.zeros(2, 3, 4)}, r"init: expected a guess of shape \(B, T, S\)"),
    ({"block_size": 3}, "block_size: expected a divisor"),
    ({"info": {}}, "info: expected a NewtonInfo"),
    ({"params": [torch.zeros(1)], "h0": torch.zeros(2, 4, dtype=torch.float32)}, "h0: expected dtype"),
    ({"h0": None}, "state_size: expected the state width"),
    ({"h0": torch.zeros(3, 4, dtype=f64)}, r"h0: expected shape \(B, S\)"),
])
def test_bad_arguments(kwargs, match) -> None:
    x, h0, params = _problem(T=12)
    args = {"h0": h0, "params": params} | kwargs
    with pytest.raises(InputError, match=match):
        newton_recurrence(_elman, x, args.pop("h0"), args.pop("params"), **args)


def test_bad_cell_and_x() -> None:
    x, h0, params = _problem()
    with pytest.raises(InputError, match="cell: expected a callable"):
        newton_recurrence("tanh", x, h0, params)
    with pytest.raises(InputError, match="x: expected a floating-point tensor"):
        newton_recurrence(_elman, x.long(), h0, params)


def test_matrix_scan_bad_arguments() -> None:
    A, b = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3)
    with pytest.raises(InputError, match=r"A: expected a tensor of shape \(B, T, \*S, K, K\)"):
        matrix_scan(torch.randn(2, 5, 3, 2), b)
    with pytest.raises(InputError, match=r"b: expected shape"):
        matrix_scan(A, torch.randn(2, 5, 2))
    with pytest.raises(InputError, match=r"h0: expected shape"):
        matrix_scan(A, b, torch.randn(2, 2))
    with pytest.raises(InputError, match="mode: expected one of"):
        matrix_scan(A, b, mode="fused")


@pytest.mark.parametrize("mode", ["parallel", "chunk"])
def test_matrix_scan_long_and_uneven(mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(2, 203, 4, 4, dtype=f64, generator=gen) * 0.45
    b = torch.randn(2, 203, 4, dtype=f64, generator=gen)
    h0 = torch.randn(2, 4, dtype=f64, generator=gen)
    ref = matrix_scan(A, b, h0, mode="recurrent")
    assert_close(matrix_scan(A, b, h0, mode=mode, chunk_size=16), ref)
