"""``use_short_conv`` on gla and linear_attention: the option is off by default (the state stays the
plain matrix), and when on, the state carries the convolution's input history and each step's output
depends on the previous step's projections through the convolution, not only through the memory."""

from __future__ import annotations

import pytest
import torch

from rnnkit.errors import InputError
from rnnkit.layers import build
from rnnkit.layers._multihead import ConvState

LAYERS = ["gla", "linear_attention"]


@pytest.mark.parametrize("name", LAYERS)
def test_default_is_off_and_state_unchanged(name):
    layer = build(name, d_model=8, num_heads=2)
    assert layer.config.use_short_conv is False and layer.conv is None
    assert isinstance(layer.init_state(3), torch.Tensor)


@pytest.mark.parametrize("name", LAYERS)
def test_state_holds_the_last_projections(name):
    torch.manual_seed(0)
    layer = build(name, d_model=8, num_heads=2, use_short_conv=True, conv_size=3).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    _, state = layer(x)
    assert isinstance(state, ConvState)
    projected = torch.cat([layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)], -1)  # (B, T, C)
    torch.testing.assert_close(state.conv, projected[:, -2:].transpose(1, 2), rtol=0, atol=1e-12)
    # the matrix part has the shape of the layer without the convolution
    assert state.S.shape == build(name, d_model=8, num_heads=2).init_state(2).shape
    assert layer.state_size == state.S[0].numel() + state.conv[0].numel()


@pytest.mark.parametrize("name", LAYERS)
def test_convolution_mixes_neighbouring_steps(name):
    """With the memory emptied after step t - 1, the output at t still depends on x_{t-1} through the
    convolution's history; without the convolution it does not."""
    torch.manual_seed(1)
    for conv in (True, False):
        layer = build(name, d_model=8, num_heads=2, use_short_conv=conv).double()
        x = torch.randn(1, 5, 8, dtype=torch.float64)
        x_other = x.clone()
        x_other[:, 3] += 1.0  # change only step t - 1 = 3
        outs = []
        for seq in (x, x_other):
            _, state = layer(seq[:, :4])
            if conv:
                state = ConvState(torch.zeros_like(state.S), state.conv)
            else:
                state = torch.zeros_like(state)
            outs.append(layer(seq[:, 4:], state)[0])
        assert (not torch.equal(outs[0], outs[1])) == conv


@pytest.mark.parametrize("name", LAYERS)
def test_bad_options(name):
    with pytest.raises(InputError, match="use_short_conv"):
        build(name, d_model=8, use_short_conv=1)
    with pytest.raises(InputError, match="conv_size"):
        build(name, d_model=8, use_short_conv=True, conv_size=1)
