"""HGRN2 specifics: the forget gate's lower bound set by ``depth``. The contract suite covers modes,
state carry and lengths."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.errors import InputError
from tests.helpers import assert_close


@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.75])
def test_forget_gate_closed_leaves_the_lower_bound(depth, mode):
    """A forget gate driven fully shut (``sigmoid(-60)``) forgets at its lower bound: from zero
    input, ``S_t = depth^t S_0``."""
    layer = rnnkit.layers.build("hgrn2", d_model=4, num_heads=2, expand_ratio=3, depth=depth).double()
    with torch.no_grad():
        layer.f_proj.weight.zero_()
        layer.f_proj.bias.fill_(-60.0)
    S0 = torch.randn(2, 2, 3, 2, dtype=torch.float64)
    _, S = layer(torch.zeros(2, 3, 4, dtype=torch.float64), S0, mode=mode)
    assert_close(S, depth**3 * S0, what="state after three closed steps")


@pytest.mark.parametrize("depth", [-0.1, 1.0, True])
def test_depth_must_lie_in_the_unit_interval(depth):
    with pytest.raises(InputError, match="depth: expected a number in \\[0, 1\\)"):
        rnnkit.layers.build("hgrn2", d_model=4, depth=depth)
