"""Classic layers keep torch.nn's parameter names: torch state dicts load and give the same outputs."""

import pytest
import torch
from torch import nn

from rnnkit.layers import build


@pytest.mark.parametrize(
    "name, torch_module, options",
    [
        ("lstm", nn.LSTM(5, 7, batch_first=True), {"hidden_size": 7}),
        ("lstm", nn.LSTM(5, 7, proj_size=3, batch_first=True), {"hidden_size": 7, "proj_size": 3}),
        ("gru", nn.GRU(5, 7, batch_first=True), {"hidden_size": 7}),
        ("elman", nn.RNN(5, 7, nonlinearity="relu", batch_first=True), {"hidden_size": 7, "nonlinearity": "relu"}),
    ],
    ids=["lstm", "lstm-proj", "gru", "elman-relu"],
)
@pytest.mark.parametrize("kernel", ["torch", "rnnkit"])
def test_torch_state_dict_loads(name, torch_module, options, kernel):
    layer = build(name, d_model=5, kernel=kernel, **options)
    layer.load_state_dict(torch_module.state_dict(), strict=True)
    x = torch.randn(3, 11, 5)
    expected, _ = torch_module(x)
    actual, _ = layer(x)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_lstm_forget_bias_starts_at_one():
    layer = build("lstm", d_model=4, hidden_size=6)
    total = layer.bias_ih_l0 + layer.bias_hh_l0
    assert torch.equal(total[6:12], torch.ones(6))
