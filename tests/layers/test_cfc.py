"""CfC's extra input: the elapsed time ``dt`` per step (irregular sampling)."""

from __future__ import annotations

import math

import pytest
import torch

import rnnkit
from rnnkit.errors import InputError
from tests.helpers import assert_close


def _cell(dtype=torch.float64):
    torch.manual_seed(0)
    return rnnkit.layers.build("cfc", d_model=3, hidden_size=5, backbone_units=8).to(dtype)


def test_dt_of_ones_equals_the_default() -> None:
    cell = _cell()
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    y, h = cell(x)
    y1, h1 = cell(x, dt=torch.ones(2, 9, dtype=torch.float64))
    assert torch.equal(y, y1) and torch.equal(h, h1)


def test_dt_changes_the_output_and_only_from_its_step_on() -> None:
    cell = _cell()
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    dt = torch.ones(2, 9, dtype=torch.float64)
    dt[:, 4] = 3.0
    y, _ = cell(x)
    y_dt, _ = cell(x, dt=dt)
    assert torch.equal(y_dt[:, :4], y[:, :4])  # causal: earlier steps do not see dt_4
    assert (y_dt[:, 4:] - y[:, 4:]).abs().max() > 1e-3


def test_long_gaps_reach_the_closed_form_limit() -> None:
    """As dt grows the gate sigma(-(f_a dt + f_b)) tends to 0 or 1: h_t -> tanh(k) or tanh(g)."""
    cell = _cell()
    x = torch.randn(4, 1, 3, dtype=torch.float64)
    y_a, _ = cell(x, dt=torch.full((4, 1), 1e6, dtype=torch.float64))
    y_b, _ = cell(x, dt=torch.full((4, 1), 2e6, dtype=torch.float64))
    assert_close(y_a, y_b, what="h at dt=1e6 vs 2e6")


def test_step_with_dt_equals_forward_with_dt() -> None:
    cell = _cell()
    x = torch.randn(3, 7, 3, dtype=torch.float64)
    dt = torch.rand(3, 7, dtype=torch.float64) * 2 + 0.1
    y, h = cell(x, dt=dt)
    state, ys = None, []
    for t in range(7):
        y_t, state = cell.step(x[:, t], state, dt=dt[:, t])
        ys.append(y_t)
    assert_close(torch.stack(ys, 1), y, what="step with dt vs forward with dt")
    assert_close(state, h, what="final state")


def test_dt_at_padding_is_ignored() -> None:
    cell = _cell()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    dt = torch.rand(2, 6, dtype=torch.float64) + 0.5
    y, h = cell(x, lengths=[6, 3], dt=dt)
    dt_bad = dt.clone()
    dt_bad[1, 3:] = math.nan
    y_bad, h_bad = cell(x, lengths=[6, 3], dt=dt_bad)
    assert torch.equal(y, y_bad) and torch.equal(h, h_bad)
    y1, h1 = cell(x[1:, :3], dt=dt[1:, :3])
    assert_close(y[1:, :3], y1, what="padded vs alone")
    assert_close(h[1:], h1, what="final state padded vs alone")


def test_gradient_reaches_dt() -> None:
    cell = _cell()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    dt = (torch.rand(2, 5, dtype=torch.float64) + 0.5).requires_grad_()
    torch.autograd.gradcheck(lambda d: cell(x, dt=d)[0], (dt,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("dt", "match"),
    [
        (torch.ones(2, 5), "dtype"),
        (torch.ones(2, 4, dtype=torch.float64), "shape"),
        (torch.ones(5, dtype=torch.float64), "shape"),
        ([[1.0] * 5] * 2, "Tensor"),
        (torch.zeros(2, 5, dtype=torch.float64), "positive"),
        (torch.full((2, 5), math.nan, dtype=torch.float64), "positive"),
        (-torch.ones(2, 5, dtype=torch.float64), "positive"),
    ],
)
def test_bad_dt_raises(dt, match: str) -> None:
    cell = _cell()
    with pytest.raises(InputError, match=match):
        cell(torch.randn(2, 5, 3, dtype=torch.float64), dt=dt)


def test_bad_step_dt_raises() -> None:
    cell = _cell()
    x_t = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(InputError, match="shape"):
        cell.step(x_t, dt=torch.ones(3, dtype=torch.float64))
    with pytest.raises(InputError, match="positive"):
        cell.step(x_t, dt=torch.zeros(2, dtype=torch.float64))


def test_an_unknown_per_step_input_is_rejected() -> None:
    cell = _cell()
    with pytest.raises(InputError, match="dts: not an argument of CfC"):
        cell(torch.randn(2, 4, 3, dtype=torch.float64), dts=torch.ones(2, 4, dtype=torch.float64))
    lstm = rnnkit.layers.build("lstm", d_model=3)
    with pytest.raises(InputError, match="dt: not an argument of LSTM .it takes no per-step inputs"):
        lstm(torch.randn(2, 4, 3), dt=torch.ones(2, 4))
    with pytest.raises(InputError, match=r"dt: expected shape \(B,\)"):
        cell.step(torch.randn(2, 3, dtype=torch.float64), dt=torch.ones(2, 1, dtype=torch.float64))
