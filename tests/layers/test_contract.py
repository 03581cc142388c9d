"""The Recurrence contract (docs/design.md) for every registered layer x test config x mode.

No layer is named here: registering a layer (with its ``test_configs``) puts it under every test
below. The checks themselves live in ``tests/layers/harness.py``; ids spell the case, e.g.
``lstm-peephole-fused-B3-T63-D5-float32``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.layers import harness
from tests.layers.harness import LayerCase, Shape, staggered_lengths

D = 5  # odd on purpose
DTYPES = (torch.float32, torch.float64)
T_ALL = (1, 2, 7, 63, 64, 65, 257)  # T=257 (> 256, odd) only in the mode-equivalence grid
LAYERS = harness.registry_cases(D)


def _params(modes: str | None, shapes=(None,), causal_only: bool = False) -> list:
    return harness.pytest_params(LAYERS, modes, shapes, causal_only)


# Full T list at B=3, T in {1, 64} at B=1, and padded batches (lengths [T, T//2+1, 1]).
EQUIV_SHAPES = (
    [Shape(3, T, D, dt) for dt in DTYPES for T in T_ALL]
    + [Shape(1, T, D, dt) for dt in DTYPES for T in (1, 64)]
    + [Shape(3, T, D, dt, staggered_lengths(T)) for dt in DTYPES for T in (7, 65)]
)
CARRY_SHAPES = [(Shape(3, 65, D, dt), (1, 32, 64)) for dt in DTYPES] + [(Shape(1, 7, D, dt), (3,)) for dt in DTYPES]
LENGTH_SHAPES = [Shape(3, T, D, dt, staggered_lengths(T)) for dt in DTYPES for T in (7, 65)]
STEP_SHAPES = [Shape(B, T, D, dt) for dt in DTYPES for B, T in ((1, 1), (3, 65))]
AUTO_SHAPES = [Shape(1, 1, D, torch.float32), Shape(3, 64, D, torch.float32), Shape(3, 65, D, torch.float32, (65, 33, 1))]


@pytest.mark.parametrize("layer", _params(None))
def test_declaration(layer: LayerCase) -> None:
    harness.check_declaration(layer.make)


@pytest.mark.parametrize(("layer", "mode", "shape"), _params("fast", EQUIV_SHAPES))
def test_modes_equal(layer: LayerCase, mode: str, shape: Shape) -> None:
    harness.check_modes_equal(layer.make, mode, shape)


@pytest.mark.parametrize(("layer", "mode"), _params("fast"))
@settings(max_examples=4, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 4), T=st.integers(1, 80), d_model=st.sampled_from([3, 5, 7]),
       dtype=st.sampled_from(DTYPES), data=st.data())
def test_modes_equal_drawn(layer: LayerCase, mode: str, B: int, T: int, d_model: int, dtype: torch.dtype,
                           data: st.DataObject) -> None:
    lengths = data.draw(st.none() | st.lists(st.integers(1, T), min_size=B, max_size=B).map(tuple), label="lengths")
    harness.check_modes_equal(layer.make, mode, Shape(B, T, d_model, dtype, lengths))


@pytest.mark.parametrize(("layer", "mode", "shape", "splits"), _params("all", CARRY_SHAPES, causal_only=True))
def test_state_carry(layer: LayerCase, mode: str, shape: Shape, splits: tuple[int, ...]) -> None:
    harness.check_state_carry(layer.make, mode, shape, splits)


@pytest.mark.parametrize(("layer", "mode", "shape"), _params("all", LENGTH_SHAPES))
def test_variable_lengths(layer: LayerCase, mode: str, shape: Shape) -> None:
    harness.check_variable_lengths(layer.make, mode, shape)


@pytest.mark.parametrize(("layer", "mode"), _params("all"))
def test_gradcheck(layer: LayerCase, mode: str) -> None:
    harness.check_gradcheck(layer.make, mode)


@pytest.mark.parametrize(("layer", "shape"), _params(None, STEP_SHAPES, causal_only=True))
def test_step(layer: LayerCase, shape: Shape) -> None:
    harness.check_step(layer.make, shape)


@pytest.mark.parametrize("layer", _params(None))
def test_bad_inputs(layer: LayerCase) -> None:
    harness.check_bad_inputs(layer.make, name=layer.name)


@pytest.mark.parametrize("layer", _params(None))
def test_state_api(layer: LayerCase) -> None:
    harness.check_state_api(layer.make)


@pytest.mark.parametrize(("layer", "shape"), _params(None, AUTO_SHAPES))
def test_auto_mode(layer: LayerCase, shape: Shape) -> None:
    harness.check_auto_mode(layer.make, shape)
