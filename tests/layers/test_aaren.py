"""Aaren: both modes equal softmax attention of the learned query over the prefix, computed directly
(the contract suite holds the modes to each other; this holds them to the paper's definition)."""

from __future__ import annotations

import pytest
import torch

from rnnkit.layers import build
from rnnkit.layers._multihead import merge_heads
from tests.helpers import assert_close


def direct_attention(layer, x: torch.Tensor) -> torch.Tensor:
    """``softmax_{i <= t}(s_i) . v_i`` for every t by a masked (T, T) softmax: ``x`` (B, T, D) -> (B, T, D)."""
    s, v = layer.scores_and_values(x)  # (B, H, T), (B, H, T, K)
    T = s.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    scores = s[:, :, None, :].expand(-1, -1, T, -1).masked_fill(~causal, float("-inf"))  # (B, H, T, T)
    return layer.o_proj(merge_heads(torch.softmax(scores, -1) @ v))


@pytest.mark.parametrize("mode", ["recurrent", "parallel"])
@pytest.mark.parametrize("T", [1, 2, 7, 65])
@pytest.mark.parametrize("query_scale", [1.0, 300.0])
def test_modes_equal_softmax_attention_over_the_prefix(mode, T, query_scale):
    """A large query scale gives scores in the thousands, of both signs: without the running maximum
    ``exp`` would overflow, and against a zero (rather than empty) initial maximum it would underflow."""
    torch.manual_seed(0)
    layer = build("aaren", d_model=6, num_heads=2).double()
    with torch.no_grad():
        layer.query.mul_(query_scale)
    x = torch.randn(3, T, 6, dtype=torch.float64)
    expected = direct_attention(layer, x)
    assert bool(torch.isfinite(expected).all())
    y, state = layer(x, mode=mode)
    assert_close(y, expected, what=f"{mode} vs direct softmax")
    assert bool((state.c >= 1).all()), "a non-empty prefix has a denominator of at least 1"
    # carried on from the state, as one prefix
    y2, _ = layer(x, state, mode=mode)
    both = direct_attention(layer, torch.cat([x, x], 1))[:, T:]
    assert_close(y2, both, what=f"{mode} carried vs direct softmax")


def test_zero_state_is_the_empty_prefix_and_state_size():
    layer = build("aaren", d_model=8, num_heads=2)
    state = layer.init_state(3)
    assert all(not bool(t.any()) for t in state)
    assert layer.state_size == 2 * (4 + 2)
