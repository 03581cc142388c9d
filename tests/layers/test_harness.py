"""The contract harness can fail: deliberately broken layers trip each check, a correct one passes.

The broken layers subclass :class:`rnnkit.layers.elman.Elman` without registering (so the registry
and the contract suite never see them) and break one promise each.
"""

from __future__ import annotations

import math

import pytest
import torch

import rnnkit
from rnnkit.layers.elman import Elman
from tests.helpers import assert_close
from tests.layers import harness
from tests.layers.harness import Shape, class_factory

F32, F64 = torch.float32, torch.float64


# --------------------------------------------------------------------------- broken layers
class PerturbedFused(Elman):
    """Fused outputs off by 1e-4: ten times the fp32 value tolerance."""

    def _forward(self, x, state, lengths, mode):
        y, state = super()._forward(x, state, lengths, mode)
        return (y + 1e-4, state) if mode == "fused" else (y, state)


class WrongGradFused(Elman):
    """Fused forward exact, but every gradient through y scaled by 1.001."""

    def _forward(self, x, state, lengths, mode):
        y, state = super()._forward(x, state, lengths, mode)
        if mode == "fused":
            y = y + 1e-3 * (y - y.detach())  # same value, 1.001 x the gradient
        return y, state


class StaleStateFused(Elman):
    """Fused mode ignores the state it is given and starts from zeros."""

    def _forward(self, x, state, lengths, mode):
        if mode == "fused":
            state = torch.zeros_like(state)
        return super()._forward(x, state, lengths, mode)


class ReadsPadding(Elman):
    """Outputs depend on the raw input, padding included (0 * NaN is NaN, 0 * Inf is NaN)."""

    def forward(self, x, state=None, lengths=None, mode="auto", check_finite=False):
        y, state = super().forward(x, state, lengths, mode, check_finite)
        return y + 0.0 * x.sum(), state


class StateRunsThroughPadding(Elman):
    """Fused mode ignores lengths: its final state is the one after T steps, not at each length."""

    def _forward(self, x, state, lengths, mode):
        return super()._forward(x, state, None if mode == "fused" else lengths, mode)


class BrokenStep(Elman):
    """``step`` drifts by 1e-4 per step."""

    def _step(self, x_t, state):
        y, h = super()._step(x_t, state)
        return y + 1e-4, h + 1e-4


class LenientLengths(Elman):
    """Silently clamps out-of-range lengths instead of rejecting them."""

    def forward(self, x, state=None, lengths=None, mode="auto", check_finite=False):
        if lengths is not None:
            lengths = torch.as_tensor(lengths).clamp(1, x.shape[1])
        return super().forward(x, state, lengths, mode, check_finite)


class WrongStateSize(Elman):
    """Reports one float more than its state holds."""

    @property
    def state_size(self):
        return super().state_size + 1


class StateGrowsPastCapacity(Elman):
    """Says its state keeps growing with the length, past what ``init_state`` holds."""

    def state_size_at(self, length):
        return self.state_size + length


class AutoDrifts(Elman):
    """``mode="auto"`` runs something no declared mode computes."""

    def forward(self, x, state=None, lengths=None, mode="auto", check_finite=False):
        y, state = super().forward(x, state, lengths, "recurrent" if mode == "auto" else mode, check_finite)
        return (y * (1 + 1e-6), state) if mode == "auto" else (y, state)


CONFIG = {"hidden_size": 6, "kernel": "rnnkit"}
PADDED = Shape(3, 7, 5, F64, (7, 4, 1))

# (id, broken class, check to run on it, fragment of the expected AssertionError message)
BROKEN = [
    ("perturbed-fused-fp32", PerturbedFused, lambda m: harness.check_modes_equal(m, "fused", Shape(3, 7, 5, F32)),
     "max-abs error 1.00[01]e-04"),
    ("perturbed-fused-fp64", PerturbedFused, lambda m: harness.check_modes_equal(m, "fused", Shape(1, 1, 5, F64)),
     "max-abs error 1.000e-04"),
    ("wrong-grad-fp32", WrongGradFused, lambda m: harness.check_modes_equal(m, "fused", Shape(3, 7, 5, F32)),
     "d loss / d"),
    ("wrong-grad-gradcheck", WrongGradFused, lambda m: harness.check_gradcheck(m, "fused"), "gradcheck failed"),
    ("stale-state-modes", StaleStateFused, lambda m: harness.check_modes_equal(m, "fused", Shape(3, 7, 5, F64)),
     "vs recurrent"),
    ("stale-state-carry", StaleStateFused,
     lambda m: harness.check_state_carry(m, "fused", Shape(3, 7, 5, F64), (3,)), "split at t=3"),
    ("reads-padding", ReadsPadding, lambda m: harness.check_variable_lengths(m, "recurrent", PADDED),
     "padding filled with inf"),
    ("state-runs-through-padding", StateRunsThroughPadding,
     lambda m: harness.check_variable_lengths(m, "fused", PADDED), "padded vs alone: final state"),
    ("state-runs-through-padding-modes", StateRunsThroughPadding,
     lambda m: harness.check_modes_equal(m, "fused", PADDED), "fused vs recurrent, B3-T7-D5-float64-padded: final"),
    ("broken-step", BrokenStep, lambda m: harness.check_step(m, Shape(3, 7, 5, F32)), "step x7 vs forward"),
    ("lenient-lengths", LenientLengths, lambda m: harness.check_bad_inputs(m), "lengths: contains 0: did not raise"),
    ("wrong-state-size", WrongStateSize, harness.check_state_api, "state_size"),
    ("state-grows-past-capacity", StateGrowsPastCapacity, harness.check_state_api, "state_size_at"),
    ("auto-drifts", AutoDrifts, lambda m: harness.check_auto_mode(m, Shape(3, 7, 5, F32)), "equals no declared mode"),
]


@pytest.mark.parametrize(("cls", "check", "message"), [pytest.param(*b[1:], id=b[0]) for b in BROKEN])
def test_check_fails_on_broken_layer(cls, check, message):
    with pytest.raises(AssertionError, match=message):
        check(class_factory(cls, **CONFIG))


@pytest.mark.parametrize(("cls", "check", "message"), [pytest.param(*b[1:], id=b[0]) for b in BROKEN])
def test_same_check_passes_on_correct_layer(cls, check, message):
    """Control: the failure above is the breakage, not the check or its shape."""
    check(class_factory(Elman, **CONFIG))


def test_broken_layers_stay_out_of_the_registry():
    registered = {rnnkit.layers.spec(n).cls for n in rnnkit.layers.names()}
    assert not registered & {b[1] for b in BROKEN}


# --------------------------------------------------------------------------- assert_close
def test_assert_close_passes_within_tolerance():
    a = torch.randn(4, 5, dtype=F64)
    assert_close(a + 0.9e-10, a, what="fp64 value")
    b = torch.randn(4, 5)
    assert_close(b + 0.9e-5, b, what="fp32 value")
    assert_close(b * (1 + 0.9e-4), b, kind="grad", what="fp32 grad")
    c = torch.ones(100, dtype=torch.bfloat16)
    c_off = c.clone()
    c_off[0] = 1 + 2**-7  # the next bfloat16 after 1: relative RMS 7.8e-4
    assert_close(c_off, c, kind="value", what="bf16 value")


@pytest.mark.parametrize(
    ("actual", "expected", "dtype", "kind"),
    [
        pytest.param(torch.ones(3, dtype=F64) + 2e-10, torch.ones(3, dtype=F64), None, "value", id="fp64-value"),
        pytest.param(torch.ones(3, dtype=F64) + 2e-10, torch.ones(3, dtype=F64), None, "grad", id="fp64-grad"),
        pytest.param(torch.ones(3) + 2e-5, torch.ones(3), None, "value", id="fp32-value"),
        pytest.param(torch.ones(3) * (1 + 2e-4), torch.ones(3), None, "grad", id="fp32-grad"),
        pytest.param(torch.ones(3) * (1 + 1e-2), torch.ones(3), torch.bfloat16, "grad", id="bf16-grad"),
    ],
)
def test_assert_close_fails_above_tolerance(actual, expected, dtype, kind):
    with pytest.raises(AssertionError, match=r"max-abs error .*rel-RMS error .*tolerance"):
        assert_close(actual, expected, dtype=dtype, kind=kind, what="t")


def test_assert_close_fp32_value_is_absolute_below_one_relative_above():
    # |expected| <= 1: the absolute 1e-5 of docs/design.md, unscaled
    with pytest.raises(AssertionError, match="tolerance"):
        assert_close(torch.full((3,), 0.5 + 2e-5), torch.full((3,), 0.5), what="t")
    # |expected| = 100: one ulp there is 7.6e-6, so the bound is 1e-5 of the magnitude
    big = torch.full((3,), 100.0, dtype=F64)
    assert_close((big + 5e-4).float(), big.float(), what="t")
    with pytest.raises(AssertionError, match="scaled by max"):
        assert_close((big + 2e-3).float(), big.float(), what="t")


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_assert_close_fails_on_non_finite(bad):
    a = torch.zeros(3)
    a[1] = bad
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(a, a.clone(), what="t")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(torch.zeros(3), a, what="t")


def test_assert_close_shape_and_dtype_errors():
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="expected"):
        assert_close(torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))
