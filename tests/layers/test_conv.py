"""The one short causal convolution every layer with a convolution in front of its recurrence uses."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.layers._conv import ShortConv


@pytest.mark.parametrize("activation", ["silu", "identity"])
@pytest.mark.parametrize("bias", [True, False])
def test_step_forward_and_lengths_agree(activation, bias):
    """Whole sequence, step by step and split in two calls give the same outputs and history; with
    lengths the history is the one at each sequence's last valid step."""
    torch.manual_seed(0)
    conv = ShortConv(5, 3, activation=activation, bias=bias).double()
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    y, state = conv(x, conv.init_state(2, dtype=torch.float64))
    step_state, ys = conv.init_state(2, dtype=torch.float64), []
    for x_t in x.unbind(1):
        y_t, step_state = conv.step(x_t, step_state)
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=0, atol=1e-14)
    torch.testing.assert_close(step_state, state, rtol=0, atol=0)
    y1, mid = conv(x[:, :4], conv.init_state(2, dtype=torch.float64))
    y2, end = conv(x[:, 4:], mid)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=0, atol=1e-14)
    assert torch.equal(end, state)
    _, short = conv(x, conv.init_state(2, dtype=torch.float64), lengths=torch.tensor([7, 4]))
    _, alone = conv(x[1:, :4], conv.init_state(1, dtype=torch.float64))
    assert torch.equal(short[1:], alone) and torch.equal(short[:1], state[:1])


def test_draws_the_weights_of_conv1d_and_loads_its_layout():
    torch.manual_seed(3)
    reference = torch.nn.Conv1d(6, 6, 4, groups=6)
    torch.manual_seed(3)
    conv = ShortConv(6, 4, activation="identity")
    assert torch.equal(conv.weight, reference.weight[:, 0]) and torch.equal(conv.bias, reference.bias)
    fresh = ShortConv(6, 4, activation="identity")
    fresh.load_state_dict({"weight": reference.weight.detach(), "bias": reference.bias.detach()})
    assert torch.equal(fresh.weight, conv.weight)
    x = torch.randn(2, 9, 6)
    y, _ = fresh(x, fresh.init_state(2))
    expected = reference(torch.nn.functional.pad(x.transpose(1, 2), (3, 0))).transpose(1, 2)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["mamba", "hawk"])
def test_diagonal_blocks_keep_the_history_channels_first(name):
    """Mamba and Hawk carry their convolution history in ShortConv's layout, (B, E, W - 1)."""
    layer = rnnkit.layers.build(name, d_model=8)
    state = layer.init_state(3)
    assert state.conv.shape == (3, layer.conv.channels, layer.conv.kernel_size - 1)
    assert isinstance(layer.conv, ShortConv)
