"""Attention specifics: its state, the KV cache, grows with the context (``state_size_at``).

The contract suite covers modes, state carry, lengths and the generic ``state_size_at`` bounds.
"""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.errors import InputError
from rnnkit.models import SequenceModel


def _cached_floats(layer, cache) -> list[int]:
    """Floats per sequence in the slots of ``cache`` that hold a real step, counted from the state."""
    per_slot = cache.k.shape[1] * (cache.k.shape[-1] + cache.v.shape[-1]) + 1  # H (K + V) + its flag
    return [int(n) * per_slot for n in (cache.valid > 0.5).sum(1)]


@pytest.mark.parametrize("options", [{"max_len": 20}, {"window": 6}], ids=["full", "window"])
def test_state_size_at_counts_the_filled_cache(options):
    """``state_size_at(T)`` == the floats of the slots a forward over ``T`` steps actually filled,
    also when the context arrives in pieces, and stops growing at the capacity ``state_size``."""
    torch.manual_seed(0)
    H, K = 2, 3
    layer = rnnkit.layers.build("attention", d_model=5, num_heads=H, head_dim=K, chunk_size=4, **options)
    capacity = options.get("max_len", options.get("window", 0) - 1)
    assert layer.state_size == capacity * (2 * H * K + 1)
    assert layer.state_size_at(0) == 0
    for T in (1, 3, 5, 6, 19, 20, 21, 45):
        _, cache = layer(torch.randn(2, T, 5))
        assert _cached_floats(layer, cache) == [layer.state_size_at(T)] * 2, T
        assert layer.state_size_at(T) == min(T, capacity) * (2 * H * K + 1)
        # The same context in two pieces: the cache after both is the cache at their total length.
        _, first = layer(torch.randn(1, 2, 5))
        _, cache = layer(torch.randn(1, T, 5), first)
        assert _cached_floats(layer, cache) == [layer.state_size_at(T + 2)]
    assert layer.state_size_at(10**6) == layer.state_size
    # Ragged batch: each sequence's cache is the one at its own length.
    lengths = torch.tensor([7, 2])
    _, cache = layer(torch.randn(2, 7, 5), lengths=lengths)
    assert _cached_floats(layer, cache) == [layer.state_size_at(7), layer.state_size_at(2)]


def test_recurrences_keep_one_size_and_wrappers_sum():
    """A recurrence's state does not grow; a stack/residual model/bidirectional wrapper sums its layers'."""
    lstm = rnnkit.layers.build("lstm", d_model=4, hidden_size=6)
    assert [lstm.state_size_at(T) for T in (0, 1, 1000)] == [lstm.state_size] * 3
    one = rnnkit.layers.build("attention", d_model=8, num_heads=2, max_len=100)
    per_step = 2 * 8 + 1
    assert one.state_size_at(64) == 64 * per_step
    stack = rnnkit.layers.build("stacked", d_model=8, layer="attention", num_layers=3, num_heads=2, max_len=100)
    assert stack.state_size_at(64) == 3 * 64 * per_step and stack.state_size_at(500) == stack.state_size
    both = rnnkit.layers.build("bidirectional", d_model=8, layer="attention", num_heads=2, max_len=100)
    assert both.state_size_at(64) == 2 * 64 * per_step
    model = SequenceModel(vocab_size=10, d_model=8, block="residual", layer="attention", num_layers=2,
                          layer_options={"num_heads": 2, "max_len": 100})
    assert model.body.state_size_at(64) == 2 * 64 * per_step
    assert model.body.state_size == 2 * 100 * per_step
    gru_model = SequenceModel(vocab_size=10, d_model=8, block="residual", layer="gru", num_layers=2)
    assert gru_model.body.state_size_at(64) == gru_model.body.state_size == 2 * 8


@pytest.mark.parametrize("bad", [-1, 2.5, "64", None])
def test_state_size_at_rejects_a_bad_length(bad):
    layer = rnnkit.layers.build("attention", d_model=4, num_heads=1, max_len=8)
    with pytest.raises(InputError, match="length"):
        layer.state_size_at(bad)
    with pytest.raises(InputError, match="length"):
        rnnkit.layers.build("gru", d_model=4).state_size_at(bad)
