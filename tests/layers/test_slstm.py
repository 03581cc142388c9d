"""sLSTM: the stabilised cell equals the paper's unstabilised equations, heads do not mix, the zero
state is the empty one, and the xLSTM[7:1] stack is one layer pattern."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnnkit.layers import build
from rnnkit.models import SequenceModel
from tests.models.test_model import check_step_and_carry
from tests.helpers import assert_close


def _slstm(**options):
    torch.manual_seed(0)
    return build("slstm", d_model=4, num_heads=2, head_dim=3, norm=False, **options).double()


def unstabilised(layer, x: torch.Tensor) -> torch.Tensor:
    """Beck et al. (2024), eq. 8-13 as written (exp input gate, no stabiliser), from the zero state."""
    B, T, _ = x.shape
    H, K = layer.config.num_heads, layer.config.head_dim
    pre_x = layer.input_proj(x).view(B, T, 4, H, K)
    h = c = n = torch.zeros(B, H * K, dtype=x.dtype)
    outputs = []
    for t in range(T):
        pre = pre_x[:, t] + torch.einsum("bhk,ghkj->bghj", h.view(B, H, K), layer.recurrent)
        z, i, f, o = (p.reshape(B, H * K) for p in pre.unbind(1))
        f = torch.exp(f) if layer.config.forget_gate == "exp" else torch.sigmoid(f)
        c = f * c + torch.exp(i) * torch.tanh(z)
        n = f * n + torch.exp(i)
        h = torch.sigmoid(o) * c / n
        outputs.append(h)
    return torch.stack(outputs, 1)


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
def test_stabilised_cell_equals_the_papers_equations(forget_gate):
    layer = _slstm(forget_gate=forget_gate)
    x = torch.randn(3, 20, 4, dtype=torch.float64)
    y, state = layer(x)
    assert_close(y, unstabilised(layer, x), what="h")
    assert bool((state.n >= 1).all())


def test_heads_do_not_mix_through_the_recurrence():
    layer = _slstm()
    x = torch.randn(2, 9, 4, dtype=torch.float64)
    y, _ = layer(x)
    with torch.no_grad():
        layer.recurrent[:, 1].add_(torch.randn_like(layer.recurrent[:, 1]))
    y2, _ = layer(x)
    assert torch.equal(y[..., :3], y2[..., :3]) and not torch.allclose(y[..., 3:], y2[..., 3:])


def test_tiny_input_gates_from_the_zero_state_stay_finite():
    """An input gate of exp(-800) underflows against a stabiliser of 0; the zero state is read as empty."""
    layer = _slstm()
    with torch.no_grad():
        layer.input_proj.bias.view(4, -1)[1] = -800.0
    y, state = layer(torch.randn(2, 5, 4, dtype=torch.float64))
    assert bool(torch.isfinite(y).all()) and bool((state.n >= 1).all())


def test_xlstm_7_to_1_is_a_layer_pattern():
    torch.manual_seed(0)
    model = SequenceModel(vocab_size=9, d_model=8, block="residual", layer="mlstm:num_heads=2*7,slstm:num_heads=2",
                          num_layers=8).double().eval()
    assert [block.mixer.name for block in model.body.blocks] == ["mlstm"] * 7 + ["slstm"]
    assert model.body.modes == ("recurrent",)
    check_step_and_carry(model, torch.randint(0, 9, (2, 6)))
    assert model.state_size == sum(block.mixer.state_size for block in model.body.blocks)
