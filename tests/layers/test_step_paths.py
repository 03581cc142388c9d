"""Layers whose ``_step`` is written apart from their whole-sequence forms: one step is, bit for bit,
the ``recurrent`` form on a one-step sequence (the decoding path must not change any result)."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from tests.layers.harness import assert_states_equal, random_state

#: The layers with a dedicated step beside the one-step forward of MultiHeadRecurrence.
DEDICATED = ("gla", "rwkv7", "deltanet", "gated_deltanet")
CASES = [(name, config_name, config) for name in DEDICATED
         for config_name, config in rnnkit.layers.spec(name).test_configs.items()]


@pytest.mark.parametrize("name, config", [(n, c) for n, _, c in CASES], ids=[f"{n}-{c}" for n, c, _ in CASES])
@pytest.mark.parametrize("batch", [1, 3])
def test_step_is_the_one_step_recurrent_form_bitwise(name: str, config: dict, batch: int) -> None:
    torch.manual_seed(0)
    layer = rnnkit.layers.build(name, d_model=16, **config)
    state = random_state(layer, batch, torch.float32)
    x_t = torch.randn(batch, 16)
    with torch.no_grad():
        y_t, stepped = layer.step(x_t, state)
        y, state_after = layer(x_t[:, None], state, mode="recurrent")
    assert torch.equal(y_t, y[:, 0]), f"max-abs difference {(y_t - y[:, 0]).abs().max().item():.3e}"
    assert_states_equal(stepped, state_after, "state")
