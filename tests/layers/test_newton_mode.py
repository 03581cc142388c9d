"""``mode="newton"`` of the nonlinear cells beyond the contract suite (which holds it to
``recurrent``): diagnostics, the failure path, warm starts, options, and ParaGRU/ParaLSTM's
diagonal structure."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.errors import ConvergenceError, InputError
from tests.helpers import assert_close

NEWTON_LAYERS = ("elman", "gru", "lstm", "paragru", "paralstm")


@pytest.mark.parametrize("name", NEWTON_LAYERS)
def test_newton_info_after_a_call(name: str) -> None:
    torch.manual_seed(0)
    layer = rnnkit.layers.build(name, d_model=3, hidden_size=4).double()
    x = torch.randn(2, 30, 3, dtype=torch.float64)
    y, _ = layer(x, mode="newton")
    info = layer.newton_info
    assert info.converged and 1 <= info.iterations <= 30 and len(info.residuals) == info.iterations + 1
    y_ref, _ = layer(x, mode="recurrent")
    assert_close(y, y_ref)


def test_not_converging_raises() -> None:
    torch.manual_seed(0)
    layer = rnnkit.layers.build("gru", d_model=3, hidden_size=4, newton_max_iters=1)
    with pytest.raises(ConvergenceError, match="not converged within max_iters = 1"):
        layer(torch.randn(2, 40, 3), mode="newton")


def test_previous_solution_warm_starts_the_next_call() -> None:
    torch.manual_seed(0)
    layer = rnnkit.layers.build("paragru", d_model=3, hidden_size=4, newton_init="previous").double()
    x = torch.randn(2, 30, 3, dtype=torch.float64)
    layer(x, mode="newton")
    first = layer.newton_info.iterations
    y, _ = layer(x, mode="newton")
    assert first > 0 and layer.newton_info.iterations == 0
    layer(torch.randn(3, 30, 3, dtype=torch.float64), mode="newton")  # another shape: from zeros
    assert layer.newton_info.iterations > 0


@pytest.mark.parametrize(("option", "value", "match"), [
    ("newton_tol", 0.0, "newton_tol: expected a number > 0"),
    ("newton_max_iters", -1, "newton_max_iters: expected an int >= 0"),
    ("newton_damping", -0.5, "newton_damping: expected a number >= 0"),
    ("newton_quasi", 1, "newton_quasi: expected a bool"),
    ("newton_init", "ones", "newton_init: expected one of"),
])
@pytest.mark.parametrize("name", ["gru", "paralstm"])
def test_bad_options(name: str, option: str, value, match: str) -> None:
    with pytest.raises(InputError, match=match):
        rnnkit.layers.build(name, d_model=3, **{option: value})


def test_paragru_channels_do_not_mix_in_the_recurrence() -> None:
    """Diagonal recurrent weights: with ``W_ih = 0`` a channel's state never reaches another's."""
    torch.manual_seed(0)
    layer = rnnkit.layers.build("paragru", d_model=3, hidden_size=4).double()
    with torch.no_grad():
        layer.weight_ih.zero_()
    h0 = torch.zeros(1, 4, dtype=torch.float64)
    h0[0, 1] = 0.7
    y, _ = layer(torch.randn(1, 20, 3, dtype=torch.float64), h0, mode="recurrent")
    y_zero, _ = layer(torch.randn(1, 20, 3, dtype=torch.float64), torch.zeros_like(h0), mode="recurrent")
    changed = (y - y_zero).abs().amax(dim=(0, 1))
    assert changed[1] > 0 and changed[[0, 2, 3]].max() == 0


def test_paralstm_newton_iterates_on_two_by_two_blocks() -> None:
    """ParaLSTM's Jacobian has a 2 x 2 block per channel: exact Newton converges as fast with blocks
    as a dense solve would (quadratically), faster than the quasi (diagonal) variant."""
    torch.manual_seed(0)
    x = torch.randn(2, 60, 3, dtype=torch.float64)
    exact = rnnkit.layers.build("paralstm", d_model=3, hidden_size=4).double()
    quasi = rnnkit.layers.build("paralstm", d_model=3, hidden_size=4, newton_quasi=True).double()
    quasi.load_state_dict(exact.state_dict())
    y1, _ = exact(x, mode="newton")
    y2, _ = quasi(x, mode="newton")
    assert_close(y1, y2)
    assert exact.newton_info.iterations < quasi.newton_info.iterations


def test_auto_runs_the_loop_on_the_cpu() -> None:
    layer = rnnkit.layers.build("paragru", d_model=3)
    x = torch.randn(2, 10, 3)
    y, _ = layer(x)
    assert torch.equal(y, layer(x, mode="recurrent")[0])


@pytest.mark.parametrize("hidden", [64, 128])
def test_paralstm_fp32_with_doubled_weights_converges(hidden: int) -> None:
    """Less contractive (trained-like) recurrences in fp32: the full Newton step overflows or the
    residual stalls above fp32's target; the default adaptive trust region and round-off stop still
    solve it, within the bound docs/layers.md states (1e-4 of the loop, at most 10 times the loop's
    own fp32 error against fp64)."""
    torch.manual_seed(0)
    layer = rnnkit.layers.build("paralstm", d_model=hidden, hidden_size=hidden)
    with torch.no_grad():
        layer.weight_hh.mul_(2.0)
    x = torch.randn(2, 1024, hidden)
    with torch.no_grad():
        y, _ = layer(x, mode="newton")
        y_ref, _ = layer(x, mode="recurrent")
        y64, _ = layer.double()(x.double(), mode="recurrent")
    info = layer.newton_info
    assert info.converged and info.iterations <= 1024
    assert info.residuals[-1] <= rnnkit.ops.newton.stall_tol(torch.float32)
    assert (y - y_ref).abs().max() <= 1e-4
    assert (y.double() - y64).abs().max() <= 10 * (y_ref.double() - y64).abs().max()
