"""The valid edges of the contract, over the whole registry and every mode.

- An empty batch (``B = 0``) is a valid call: ``forward`` returns ``y`` ``(0, T, D_out)`` and a state
  with the structure of ``init_state(0)``, ``step`` likewise, and a loss on the empty output
  backpropagates (to zero gradients). Every mode gives that, kernels included: fast kernels need not
  take zero-sized dimensions, so the base class computes an empty batch with the reference loop.
- ``T = 0`` is not: a sequence has at least one step, and every layer says so with ``InputError``.
- ``lengths`` all equal to ``T`` is the unpadded call; ``lengths`` all 1 is the one-step call.
- ``check_finite=True`` also rejects a NaN or Inf in the state passed in.
"""

from __future__ import annotations

import pytest
import torch

from rnnkit import InputError
from rnnkit.layers import flatten_state
from tests.helpers import assert_close
from tests.layers import harness

D = 5
LAYERS = harness.registry_cases(D)


@pytest.mark.parametrize(("layer", "mode"), harness.pytest_params(LAYERS, "all"))
def test_empty_batch_gives_empty_outputs_and_states(layer: harness.LayerCase, mode: str) -> None:
    module = layer.make(D, torch.float32)
    for T in (1, 3):
        x = torch.randn(0, T, D, requires_grad=True)
        y, state = module(x, mode=mode)
        assert y.shape == (0, T, module.d_output)
        harness.assert_same_structure(state, module.init_state(0), f"state after an empty batch ({mode})")
        y2, _ = module(torch.randn(0, T, D), state=state, mode=mode)  # the empty state is accepted back
        assert y2.shape == (0, T, module.d_output)
        y.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
    if layer.causal:
        y_t, state = module.step(torch.randn(0, D))
        assert y_t.shape == (0, module.d_output)
        harness.assert_same_structure(state, module.init_state(0), "state after an empty step")


@pytest.mark.parametrize("layer", harness.pytest_params(LAYERS, None))
def test_no_time_steps_is_rejected(layer: harness.LayerCase) -> None:
    module = layer.make(D, torch.float32)
    for B in (0, 2):
        with pytest.raises(InputError, match=r"x: expected at least one time step \(T >= 1\)"):
            module(torch.randn(B, 0, D))


@pytest.mark.parametrize(("layer", "mode"), harness.pytest_params(LAYERS, "all"))
def test_full_and_unit_lengths(layer: harness.LayerCase, mode: str) -> None:
    """``lengths`` all ``T`` changes nothing; ``lengths`` all 1 equals running the first step alone."""
    torch.manual_seed(0)
    module = layer.make(D, torch.float64)
    x = torch.randn(3, 6, D, dtype=torch.float64)
    y, state = module(x, mode=mode)
    y_full, state_full = module(x, lengths=torch.full((3,), 6), mode=mode)
    assert_close(y_full, y, what=f"y, lengths all T ({mode})")
    for a, e in zip(flatten_state(state_full), flatten_state(state)):
        assert_close(a, e, what=f"state, lengths all T ({mode})")
    y_one, state_one = module(x, lengths=torch.ones(3, dtype=torch.long), mode=mode)
    y_first, state_first = module(x[:, :1], mode=mode)
    assert_close(y_one[:, :1], y_first, what=f"y, lengths all 1 ({mode})")
    assert torch.equal(y_one[:, 1:], torch.zeros_like(y_one[:, 1:]))
    for a, e in zip(flatten_state(state_one), flatten_state(state_first)):
        assert_close(a, e, what=f"state, lengths all 1 ({mode})")


@pytest.mark.parametrize("layer", harness.pytest_params(LAYERS, None))
def test_check_finite_rejects_a_non_finite_state(layer: harness.LayerCase) -> None:
    module = layer.make(D, torch.float32)
    state = module.init_state(2)
    leaves = flatten_state(state)
    # the last leaf that holds any value (a layer may keep an empty one, e.g. no persistent tokens)
    [leaf for leaf in leaves if leaf.numel() > 0][-1].view(-1)[0] = float("nan")
    x = torch.randn(2, 4, D)
    with pytest.raises(InputError, match="state: expected finite values"):
        module(x, state=state, check_finite=True)
    module(x, state=state)  # without the check the call runs (the caller asked for no validation)
