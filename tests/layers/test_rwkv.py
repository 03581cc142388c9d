"""RWKV-6 and RWKV-7 specifics: RWKV-6's read-out against the paper's sum over past tokens (the
bonus for the current one, the decay up to the step before), and the token shift as state. The
contract suite covers modes, state carry and lengths; tests/ops/test_delta_rule.py holds RWKV-7's
transition to the paper's formula."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.errors import InputError
from rnnkit.layers._multihead import merge_heads
from tests.helpers import assert_close


def paper_wkv6(r, k, v, log_w, u):
    """Peng et al. 2024, eq. 19 written out: ``wkv_t = diag(u) k_t^T v_t + sum_{i<t} diag(prod_{j=i+1}^{t-1}
    w_j) k_i^T v_i`` and ``o_t = r_t wkv_t``; r, k, v, log_w (B, H, T, K), u (H, K)."""
    T = r.shape[2]
    outs = []
    for t in range(T):
        o = (r[:, :, t] * u * k[:, :, t]).sum(-1, keepdim=True) * v[:, :, t]
        for i in range(t):
            decay = torch.exp(log_w[:, :, i + 1 : t].sum(2))  # (B, H, K): the steps strictly between
            o = o + (r[:, :, t] * decay * k[:, :, i]).sum(-1, keepdim=True) * v[:, :, i]
        outs.append(o)
    return torch.stack(outs, 2)


@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
def test_rwkv6_reads_the_state_before_the_update_plus_the_bonus(mode):
    torch.manual_seed(0)
    layer = rnnkit.layers.build("rwkv6", d_model=6, num_heads=2, mix_rank=2, decay_rank=2, chunk_size=4).double()
    with torch.no_grad():
        layer.decay.add_(4.0)  # decays well below 1, so the exponents differ visibly from step to step
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    r, k, v, log_w, gate = layer._inputs(x, torch.zeros(2, 6, dtype=torch.float64))
    expected = layer.o_proj(layer.norm(merge_heads(paper_wkv6(r, k, v, log_w, layer.bonus)), gate))
    y, _ = layer(x, mode=mode)
    assert_close(y, expected, what=f"rwkv6 {mode} vs the paper's sum")


@pytest.mark.parametrize("name", ["rwkv6", "rwkv7"])
def test_token_shift_state_is_the_last_valid_input(name):
    layer = rnnkit.layers.build(name, d_model=4, num_heads=2)
    x = torch.randn(3, 5, 4)
    _, state = layer(x, lengths=[5, 2, 1], mode="chunk")
    assert torch.equal(state.shift, torch.stack([x[0, 4], x[1, 1], x[2, 0]]))


@pytest.mark.parametrize("name", ["rwkv6", "rwkv7"])
@pytest.mark.parametrize(("option", "value", "match"), [
    ("depth", 1.5, "depth: expected a number in \\[0, 1\\]"),
    ("num_heads", 3, "num_heads: expected a divisor"),
])
def test_rwkv_options_are_checked(name, option, value, match):
    with pytest.raises(InputError, match=match):
        rnnkit.layers.build(name, d_model=4, **{option: value})


def test_rwkv6_chunk_size_must_be_a_power_of_two():
    with pytest.raises(InputError, match="chunk_size: expected a power of two"):
        rnnkit.layers.build("rwkv6", d_model=4, chunk_size=12)
