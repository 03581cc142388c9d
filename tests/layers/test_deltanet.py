"""DeltaNet and Gated DeltaNet specifics; the shared contract suite covers modes, state, lengths."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.errors import InputError
from rnnkit.ops.delta_rule import delta_rule_recurrent


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
@pytest.mark.parametrize("neg", [False, True])
def test_beta_range(name, neg):
    """beta in (0, 1), or (0, 2) with allow_neg_eigval: eigenvalue 1 - beta of I - beta k k^T down to -1."""
    torch.manual_seed(0)
    layer = rnnkit.layers.build(name, d_model=8, num_heads=2, allow_neg_eigval=neg)
    with torch.no_grad():
        layer.beta_proj.weight.mul_(2000)  # saturate the sigmoid both ways
    beta = layer.beta(torch.randn(4, 50, 8))
    top = 2.0 if neg else 1.0
    assert beta.min() >= 0 and beta.max() <= top
    assert beta.max() > top - 1e-3 and beta.min() < 1e-3


@pytest.mark.parametrize("short_conv", [True, False])
def test_deltanet_readout_is_the_delta_rule(short_conv):
    """With the projections made identities, the layer's read-out is the op's: y = S_t^T q_t / sqrt(K).
    Without the short convolution (``use_short_conv=False``) q, k, v are SiLU of the step's own
    projection, which is what a convolution passing only the current step computes."""
    torch.manual_seed(0)
    D = 4
    layer = rnnkit.layers.build("deltanet", d_model=D, num_heads=1, head_dim=D, conv_size=2,
                                use_short_conv=short_conv).double()
    with torch.no_grad():
        layer.qkv_proj.weight.copy_(torch.cat([torch.eye(D)] * 3).double())
        if short_conv:
            layer.conv.weight.zero_()
            layer.conv.weight[:, -1] = 1.0  # the convolution passes the current step only
        else:
            assert layer.conv is None and layer.state_size == D * D  # no history in the state
        layer.out_proj.weight.copy_(torch.eye(D).double())
    x = torch.randn(2, 9, D, dtype=torch.float64)
    y, state = layer(x, mode="chunk")
    h = torch.nn.functional.silu(x)[:, None]  # (B, 1, T, D): every projection is SiLU(x)
    q = torch.nn.functional.normalize(h, dim=-1) * D**-0.5
    k = torch.nn.functional.normalize(h, dim=-1)
    o, S = delta_rule_recurrent(q, k, h, layer.beta(x))
    o = o[:, 0] * torch.rsqrt(o[:, 0].pow(2).mean(-1, keepdim=True) + layer.config.norm_eps)
    assert torch.allclose(y, o, atol=1e-12)
    assert torch.allclose(state.S if short_conv else state, S, atol=1e-12)


def test_gated_deltanet_gate_init():
    """A in [1, 16] (Mamba-2), softplus(dt_bias) = dt in [dt_min, dt_max]; decays in (0, 1)."""
    torch.manual_seed(0)
    layer = rnnkit.layers.build("gated_deltanet", d_model=16, num_heads=8, dt_min=0.01, dt_max=0.05)
    A = layer.A_log.exp()
    dt = torch.nn.functional.softplus(layer.dt_bias)
    assert ((A >= 1) & (A <= 16)).all()
    assert ((dt >= 0.01 - 1e-6) & (dt <= 0.05 + 1e-6)).all()
    log_decay = layer._log_decay(torch.randn(2, 5, 16))
    assert log_decay.shape == (2, 8, 5) and (log_decay < 0).all()  # (B, H, T)
    assert layer.value_dim == 2 * layer.head_dim  # expand_v = 2 by default


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("deltanet", {"num_heads": 3}, "num_heads"),
        ("deltanet", {"expand_v": 0}, "expand_v"),
        ("deltanet", {"conv_size": 1}, "conv_size"),
        ("deltanet", {"allow_neg_eigval": 1}, "allow_neg_eigval"),
        ("deltanet", {"use_short_conv": 0}, "use_short_conv"),
        ("gated_deltanet", {"dt_min": 0.2, "dt_max": 0.1}, "dt_min"),
        ("gated_deltanet", {"dt_min": -1.0}, "dt_min"),
    ],
)
def test_bad_config(name, options, match):
    with pytest.raises(InputError, match=match):
        rnnkit.layers.build(name, d_model=8, **options)


def test_long_sequence_fp32_chunk_matches_fp64():
    """Gated DeltaNet over 3000 steps in fp32 (chunk) stays within fp32 error of fp64 (recurrent)."""
    torch.manual_seed(0)
    layer = rnnkit.layers.build("gated_deltanet", d_model=8, num_heads=2, allow_neg_eigval=True)
    x = torch.randn(1, 3000, 8)
    y32, _ = layer(x, mode="chunk")
    y64, _ = layer.double()(x.double(), mode="recurrent")
    assert torch.isfinite(y32).all()
    assert (y32.double() - y64).abs().max() < 1e-4 * max(1.0, y64.abs().max().item())
