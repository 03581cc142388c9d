"""Greff et al. (2017)'s LSTM variants as ``lstm`` options.

The contract suite runs every variant (its ``test_configs``); here: the parameters each variant keeps,
that ``auto`` takes the PyTorch loop (no fused kernel computes a variant) and an explicit kernel is an
error, and each variant's equations, against the vanilla cell with a saturated gate where one exists.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnnkit import InputError
from rnnkit.layers import build
from rnnkit.layers.lstm import VARIANT_OPTIONS
from rnnkit.ops.classic_rnn import LSTMState
from tests.helpers import assert_close

H, D = 4, 3
VARIANTS = {
    "nig": {"input_gate": False},
    "nfg": {"forget_gate": False},
    "nog": {"output_gate": False},
    "niaf": {"input_activation": False},
    "noaf": {"output_activation": False},
    "cifg": {"coupled": True},
    "fgr": {"gate_recurrence": True},
}


def _lstm(**options):
    torch.manual_seed(0)
    return build("lstm", d_model=D, hidden_size=H, **options).double()


def test_every_variant_is_in_the_contract_configs():
    from rnnkit.layers import spec

    covered = {k for config in spec("lstm").test_configs.values() for k in config if k in VARIANT_OPTIONS}
    assert covered == set(VARIANT_OPTIONS)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variants_run_the_pytorch_loop_under_auto(name):
    layer = _lstm(peephole=True, **VARIANTS[name])
    assert layer.modes == ("recurrent",)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    y_auto, s_auto = layer(x)
    y_rec, s_rec = layer(x, mode="recurrent")
    assert torch.equal(y_auto, y_rec) and all(torch.equal(a, b) for a, b in zip(s_auto, s_rec))
    with pytest.raises(InputError, match="mode"):
        layer(x, mode="fused")
    for kernel in ("torch", "rnnkit"):
        with pytest.raises(InputError, match="kernel: expected 'auto' for an LSTM variant"):
            build("lstm", d_model=D, kernel=kernel, **VARIANTS[name])
    assert _lstm().modes == ("recurrent", "newton", "fused")  # the vanilla LSTM keeps its kernels and Newton


def test_parameters_of_each_variant():
    shapes = {name: {k: tuple(p.shape) for k, p in _lstm(peephole=True, **opts).named_parameters()}
              for name, opts in VARIANTS.items()}
    for name in ("nig", "nfg", "nog", "cifg"):  # one gate fewer: three blocks, two peephole rows
        assert shapes[name]["weight_ih_l0"] == (3 * H, D) and shapes[name]["weight_peephole_l0"] == (2, H), name
    for name in ("niaf", "noaf", "fgr"):
        assert shapes[name]["weight_ih_l0"] == (4 * H, D) and shapes[name]["weight_peephole_l0"] == (3, H), name
    assert shapes["fgr"]["weight_gg_l0"] == (3 * H, 3 * H)
    assert "weight_gg_l0" not in shapes["cifg"]
    state = _lstm(gate_recurrence=True, coupled=True).init_state(2)
    assert state.gates.shape == (2, 2 * H)  # i and o: CIFG's f has no parameters
    with pytest.raises(InputError, match="coupled"):
        build("lstm", d_model=D, coupled=True, input_gate=False)
    with pytest.raises(InputError, match="input_gate: expected a bool"):
        build("lstm", d_model=D, input_gate=1)


def test_initial_forget_gate_of_cifg_matches_a_forget_gate():
    layer = build("lstm", d_model=D, hidden_size=H, coupled=True, forget_bias=2.0)
    i_bias = layer.bias_ih_l0[:H] + layer.bias_hh_l0[:H]
    assert torch.equal(i_bias, torch.full((H,), -2.0))  # f = 1 - sigmoid(i~) = sigmoid(2) at zero input


@pytest.mark.parametrize("name, gate", [("nig", 0), ("nfg", 1), ("nog", 3)])
def test_a_removed_gate_is_a_saturated_one(name, gate):
    """Without a gate the cell equals the vanilla cell with that gate's bias at +1e4 (sigmoid = 1 in fp64)."""
    variant = _lstm(**VARIANTS[name])
    vanilla = _lstm()
    keep = [b for b in range(4) if b != gate]
    rows = torch.cat([torch.arange(b * H, (b + 1) * H) for b in keep])
    with torch.no_grad():
        for pname in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(vanilla, pname)[rows] = getattr(variant, pname)
            if pname.startswith("weight"):
                getattr(vanilla, pname)[gate * H : (gate + 1) * H] = 0
        vanilla.bias_ih_l0[gate * H : (gate + 1) * H] = 1e4
        vanilla.bias_hh_l0[gate * H : (gate + 1) * H] = 0
    x = torch.randn(2, 7, D, dtype=torch.float64)
    y, state = variant(x)
    y_ref, state_ref = vanilla(x, mode="recurrent")
    assert_close(y, y_ref, what=f"{name} y")
    assert_close(state.c, state_ref.c, what=f"{name} c")


def test_activation_variants_and_cifg_follow_their_equations():
    x_t = torch.randn(2, D, dtype=torch.float64)
    h0, c0 = torch.randn(2, H, dtype=torch.float64), torch.randn(2, H, dtype=torch.float64)
    for name in ("niaf", "noaf", "cifg"):
        layer = _lstm(**VARIANTS[name])
        pre = F.linear(x_t, layer.weight_ih_l0, layer.bias_ih_l0) + F.linear(h0, layer.weight_hh_l0, layer.bias_hh_l0)
        if name == "cifg":
            i, g, o = pre.chunk(3, 1)
            i = torch.sigmoid(i)
            c = (1 - i) * c0 + i * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        else:
            i, f, g, o = pre.chunk(4, 1)
            g = g if name == "niaf" else torch.tanh(g)
            c = torch.sigmoid(f) * c0 + torch.sigmoid(i) * g
            h = torch.sigmoid(o) * (c if name == "noaf" else torch.tanh(c))
        y, state = layer.step(x_t, LSTMState(h0, c0))
        assert_close(state.c, c, what=f"{name} c")
        assert_close(y, h, what=f"{name} h")


def test_full_gate_recurrence_reads_the_previous_gates():
    layer = _lstm(gate_recurrence=True)
    x = torch.randn(2, 2, D, dtype=torch.float64)
    _, first = layer(x[:, :1])
    assert first.gates.shape == (2, 3 * H) and bool(((first.gates > 0) & (first.gates < 1)).all())
    # the second step depends on the carried gates
    changed = first._replace(gates=first.gates.flip(0).clone())
    assert not torch.allclose(layer(x[:, 1:], first)[0], layer(x[:, 1:], changed)[0])
