"""minGRU / minLSTM specifics beyond the contract suite: the paper's maths, mode choice, the CLI."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.cli import main
from rnnkit.layers.mingru import g, log_g, mingru_recurrent
from rnnkit.layers.minlstm import minlstm_recurrent
from rnnkit.ops import _native
from tests.helpers import assert_close


def test_g_is_positive_continuous_and_log_g_is_its_log():
    x = torch.linspace(-30, 30, 2001, dtype=torch.float64)
    assert (g(x) > 0).all()
    # log(σ(x)) itself loses digits far below 0 (where -softplus(-x) does not), so compare on [-8, 30].
    assert_close(log_g(x[x > -8]), torch.log(g(x[x > -8])))
    assert g(torch.tensor(0.0)).item() == 0.5 == torch.sigmoid(torch.tensor(0.0)).item()
    # No NaN through the unused branch of torch.where, at any x.
    x = x.clone().requires_grad_()
    log_g(x).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ["mingru", "minlstm"])
def test_log_coefficients_are_logs_of_the_linear_ones(name):
    torch.manual_seed(1)
    layer = rnnkit.layers.build(name, d_model=4, hidden_size=5).double()
    k = 8 * torch.randn(2, 9, layer.GATES * 5, dtype=torch.float64)  # |k| > 20 included
    a, b = layer._coefficients(k)
    log_a, log_b = layer._log_coefficients(k)
    assert_close(log_a, torch.log(a))
    assert_close(log_b, torch.log(b))
    assert ((a > 0) & (a < 1)).all() and (b > 0).all()


def test_minlstm_gates_are_normalised():
    """f' + i' = 1: h_t is a convex combination, so |h| stays within the range of h0 and h~."""
    torch.manual_seed(2)
    layer = rnnkit.layers.build("minlstm", d_model=3, hidden_size=4).double()
    k = 10 * torch.randn(5, 3 * 4, dtype=torch.float64)
    a, b = layer._coefficients(k)
    k_f, k_i, k_h = k.chunk(3, -1)
    f, i = torch.sigmoid(k_f), torch.sigmoid(k_i)
    assert_close(a, f / (f + i))
    assert_close(b, i / (f + i) * g(k_h))


@pytest.mark.parametrize(("name", "loop"), [("mingru", mingru_recurrent), ("minlstm", minlstm_recurrent)])
def test_module_loop_matches_layer(name, loop):
    torch.manual_seed(3)
    layer = rnnkit.layers.build(name, d_model=3, hidden_size=4).double()
    x, h0 = torch.randn(2, 7, 3, dtype=torch.float64), torch.rand(2, 4, dtype=torch.float64)
    y, h = loop(x, h0, layer.linear.weight, layer.linear.bias, torch.tensor([7, 4]))
    y_ref, h_ref = layer(x, h0, lengths=[7, 4], mode="recurrent")
    assert_close(y[0], y_ref[0])
    assert_close(y[1, :4], y_ref[1, :4])
    assert_close(h, h_ref)


@pytest.mark.parametrize("name", ["mingru", "minlstm"])
def test_auto_is_fused_on_cpu_and_modes_follow_the_kernel(name, monkeypatch):
    layer = rnnkit.layers.build(name, d_model=3)
    x = torch.randn(2, 5, 3)
    if _native.available():
        assert "fused" in layer.modes and layer._auto_mode(x) == "fused"
        assert layer._auto_mode(x.bfloat16()) == "chunk"  # the kernel has no bf16
    monkeypatch.setattr(_native, "available", lambda: False)
    assert "fused" not in layer.modes and layer._auto_mode(x) == "chunk"
    assert layer._auto_mode(x.to("meta")) == "parallel"  # any accelerator: the paper's log-space form


@pytest.mark.parametrize("name", ["mingru", "minlstm"])
def test_cli_trains_on_adding(name, tmp_path, capsys):
    argv = ["train", "--task", "adding", "--model", name, "--d-model", "8", "--steps", "3", "--batch-size", "4",
            "--no-progress", "--out", str(tmp_path / "run"), "--seq-len", "20", "--task-opt", "eval_examples=16"]
    assert main(argv) == 0
    assert "val: loss" in capsys.readouterr().out
