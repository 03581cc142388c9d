"""Attention specifics: its state, the KV cache, grows with the context (``state_size_at``); its output
equals PyTorch's ``scaled_dot_product_attention``.

The contract suite covers modes, state carry, lengths and the generic ``state_size_at`` bounds.
"""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.errors import InputError
from rnnkit.models import SequenceModel


def _cached_floats(layer, cache) -> list[int]:
    """Floats per sequence in the slots of ``cache`` that hold a real step, counted from the state,
    plus the position counter that RoPE keeps."""
    per_slot = cache.k.shape[1] * (cache.k.shape[-1] + cache.v.shape[-1]) + 1  # H (K + V) + its flag
    return [int(n) * per_slot + len(cache) - 3 for n in (cache.valid > 0.5).sum(1)]


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "nope"])
@pytest.mark.parametrize("options", [{"max_len": 20}, {"window": 6}], ids=["full", "window"])
def test_state_size_at_counts_the_filled_cache(options, rope):
    """``state_size_at(T)`` == the floats of the slots a forward over ``T`` steps actually filled,
    also when the context arrives in pieces, and stops growing at the capacity ``state_size``."""
    torch.manual_seed(0)
    H, K = 2, 3
    layer = rnnkit.layers.build("attention", d_model=5, num_heads=H, head_dim=K, chunk_size=4, rope=rope, **options)
    capacity = options.get("max_len", options.get("window", 0) - 1)
    assert layer.state_size == capacity * (2 * H * K + 1) + rope
    assert layer.state_size_at(0) == int(rope)
    for T in (1, 3, 5, 6, 19, 20, 21, 45):
        _, cache = layer(torch.randn(2, T, 5))
        assert _cached_floats(layer, cache) == [layer.state_size_at(T)] * 2, T
        assert layer.state_size_at(T) == min(T, capacity) * (2 * H * K + 1) + rope
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
    cache_64 = 64 * per_step + 1  # + RoPE's position counter
    assert one.state_size_at(64) == cache_64
    stack = rnnkit.layers.build("stacked", d_model=8, layer="attention", num_layers=3, num_heads=2, max_len=100)
    assert stack.state_size_at(64) == 3 * cache_64 and stack.state_size_at(500) == stack.state_size
    both = rnnkit.layers.build("bidirectional", d_model=8, layer="attention", num_heads=2, max_len=100)
    assert both.state_size_at(64) == 2 * cache_64
    model = SequenceModel(vocab_size=10, d_model=8, block="residual", layer="attention", num_layers=2,
                          layer_options={"num_heads": 2, "max_len": 100})
    assert model.body.state_size_at(64) == 2 * cache_64
    assert model.body.state_size == 2 * (100 * per_step + 1)
    gru_model = SequenceModel(vocab_size=10, d_model=8, block="residual", layer="gru", num_layers=2)
    assert gru_model.body.state_size_at(64) == gru_model.body.state_size == 2 * 8


@pytest.mark.parametrize("bad", [-1, 2.5, "64", None])
def test_state_size_at_rejects_a_bad_length(bad):
    layer = rnnkit.layers.build("attention", d_model=4, num_heads=1, max_len=8)
    with pytest.raises(InputError, match="length"):
        layer.state_size_at(bad)
    with pytest.raises(InputError, match="length"):
        rnnkit.layers.build("gru", d_model=4).state_size_at(bad)


def _scores(layer, state, x):
    """Every head's rotated query at each step of ``x`` dotted with the rotated key at each step,
    read from the layer's own cache: (H, T, T) for one sequence after ``state``."""
    T = x.shape[1]
    q = rnnkit.layers.attention.rotate  # the same rotation the layer applies
    _, cache = layer(x, state)
    keys = cache.k[0, :, -T:]  # (H, T, K): this call's keys, stored rotated
    H = keys.shape[0]
    queries = layer.qkv_proj(x).chunk(3, -1)[0].view(1, T, H, -1).transpose(1, 2)
    position = state.position if state is not None else torch.zeros(1, 1, dtype=x.dtype)
    queries = q(queries, position + torch.arange(T, dtype=x.dtype))[0]
    return queries @ keys.transpose(-1, -2)


def test_rope_scores_depend_only_on_relative_position():
    """The same tokens read after 0 or after 1000 earlier steps (a prefilled cache) give the same
    q_t . k_s for every (t, s): RoPE's scores depend on t - s only; the cache's position counter
    advanced by exactly the steps read. Without RoPE the layer is position-free and ignores it."""
    torch.manual_seed(0)
    layer = rnnkit.layers.build("attention", d_model=8, num_heads=2, max_len=1100).double()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    _, prefilled = layer(torch.randn(1, 1000, 8, dtype=torch.float64))
    assert prefilled.position.tolist() == [[1000.0]]
    fresh, shifted = _scores(layer, None, x), _scores(layer, prefilled, x)
    torch.testing.assert_close(shifted, fresh, rtol=1e-10, atol=1e-10)
    # ... and the rotation is real: position changes the raw key.
    raw_k = layer.qkv_proj(x).chunk(3, -1)[1].view(1, 6, 2, -1).transpose(1, 2)[0]
    _, cache = layer(x)
    assert torch.allclose(cache.k[0, :, -6:, :][:, 0], raw_k[:, 0])  # position 0: unrotated
    assert not torch.allclose(cache.k[0, :, -6:, :][:, 1:], raw_k[:, 1:])


def test_rope_changes_the_output_and_rope_false_is_position_free():
    """With RoPE the output at a step depends on where the context sits; with ``rope=False`` the layer
    is today's NoPE attention: its state is the plain WindowState and the same keys give the same
    output wherever they sit in the stream (a state of earlier steps with no valid slot)."""
    torch.manual_seed(0)
    rope = rnnkit.layers.build("attention", d_model=8, num_heads=2, window=4)
    nope = rnnkit.layers.build("attention", d_model=8, num_heads=2, window=4, rope=False)
    nope.load_state_dict(rope.state_dict())
    x = torch.randn(1, 10, 8)
    _, cache = nope(x)
    assert type(cache).__name__ == "WindowState" and len(cache) == 3
    # Steps 6..9 only see the window [6 - 3, 9]: the same last 4 inputs after a different prefix.
    y_nope = nope(x)[0][:, -1]
    other = torch.cat([torch.randn(1, 3, 8), x[:, -4:]], 1)
    torch.testing.assert_close(nope(other)[0][:, -1], y_nope)
    y_rope, y_rope_other = rope(x)[0][:, -1], rope(other)[0][:, -1]
    torch.testing.assert_close(y_rope_other, y_rope)  # relative positions equal: same output
    y_shift = rope(torch.cat([torch.randn(1, 4, 8), x[:, -4:]], 1))[0][:, -1]
    torch.testing.assert_close(y_shift, y_rope)
    # Reordering the earlier keys in the window: NoPE cannot tell (a softmax over a set), RoPE can.
    shuffled = torch.cat([x[:, :6], x[:, [8, 6, 7]], x[:, 9:]], 1)
    torch.testing.assert_close(nope(shuffled)[0][:, -1], y_nope)
    assert not torch.allclose(rope(shuffled)[0][:, -1], y_rope, atol=1e-4)
    assert not torch.allclose(y_rope, y_nope, atol=1e-4)


def test_rope_rejects_a_non_bool():
    with pytest.raises(InputError, match="rope"):
        rnnkit.layers.build("attention", d_model=8, rope=1)


def _rotary(x: torch.Tensor) -> torch.Tensor:
    """RoPE written out for the reference: features ``i`` and ``i + K/2`` of ``x`` (B, H, T, K) at
    position ``t`` rotated by ``t * 10000^(-2i/K)``."""
    K, T = x.shape[-1], x.shape[-2]
    half = K // 2
    angle = torch.arange(T, dtype=torch.float64)[:, None] * 10000.0 ** (-2 * torch.arange(half, dtype=torch.float64) / K)
    cos, sin = angle.cos(), angle.sin()  # (T, K/2)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)


@pytest.mark.parametrize("window", [None, 5], ids=["full", "window5"])
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "nope"])
def test_matches_torch_scaled_dot_product_attention(rope, window):
    """Every mode equals ``torch.nn.functional.scaled_dot_product_attention`` on the layer's own
    projections: causal (``is_causal=True``), or under a band mask of ``window`` steps."""
    torch.manual_seed(0)
    B, T, D, H = 2, 23, 12, 3
    layer = rnnkit.layers.build("attention", d_model=D, num_heads=H, window=window, rope=rope,
                                chunk_size=8).double()
    x = torch.randn(B, T, D, dtype=torch.float64)
    q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in layer.qkv_proj(x).chunk(3, -1))  # (B, H, T, K)
    if rope:
        q, k = _rotary(q), _rotary(k)
    if window is None:
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
        band = (s <= t) & (s > t - window)  # (T, T): the last `window` steps, this one included
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band)
    expected = layer.o_proj(y.transpose(1, 2).reshape(B, T, D))
    for mode in layer.modes:
        got, _ = layer(x, mode=mode)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12, msg=f"mode {mode}")
