"""Titans' memory with attention (``titans_mac``, ``titans_mag``; MAL is a layer pattern, run by the
contract suite as ``stacked``'s ``titans-mal`` configuration and by ``tests/models/test_hybrid.py``),
beyond the contract suite: each against a composition written from the paper's description.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import rnnkit
from rnnkit.errors import InputError
from rnnkit.layers.attention import rotate
from tests.helpers import assert_close


def _rms(y: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + eps) * weight


def _gated(gate, y: torch.Tensor, m: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``W_o (RMSNorm(y) * sigmoid(RMSNorm(m)))``."""
    mixed = _rms(y, gate.attention_norm.weight, eps) * torch.sigmoid(_rms(m, gate.memory_norm.weight, eps))
    return mixed @ gate.out_proj.weight.T


def test_mag_is_window_attention_gated_by_the_memory() -> None:
    torch.manual_seed(0)
    layer = rnnkit.layers.build("titans_mag", d_model=6, num_heads=2, window=3, mini_batch_size=2).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    with torch.no_grad():
        y, cache = layer.attention(x, mode="recurrent")
        m, memory = layer.memory(x, mode="recurrent")
        expected = _gated(layer.gate, y, m)
        for mode in layer.modes:
            out, state = layer(x, mode=mode)
            assert_close(out, expected, dtype=torch.float64, what=f"{mode}: y")
            assert_close(state.memory.weights[0], memory.weights[0], dtype=torch.float64, what=f"{mode}: memory")
            assert_close(state.cache.k, cache.k, dtype=torch.float64, what=f"{mode}: cache")


def mac_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """MAC segment by segment: every token's retrieval from the memory at its segment's start, dense
    attention of the segment's tokens over the persistent tokens and the interleaved retrieved and
    own tokens under a causal mask, the memory trained on the attention's outputs, the gate."""
    c = layer.config
    B, T, D = x.shape
    H, K, S = c.num_heads, c.head_dim, c.segment_size
    memory, state = layer.memory, layer.memory.init_state(B, dtype=x.dtype)
    Wq, Wk, Wv = layer.qkv_proj.weight.chunk(3, 0)

    def heads(t: torch.Tensor) -> torch.Tensor:  # (B, n, HK) -> (B, H, n, K)
        return t.view(t.shape[0], t.shape[1], H, K).transpose(1, 2)

    outputs = []
    for first in range(0, T, S):
        seg = x[:, first : first + S]
        n = seg.shape[1]
        start = [w + w0 for w, w0 in zip(state.start, memory.inner)]
        q_mem = memory._inner_inputs(seg)[0]  # (B, H, n, K)
        h = q_mem
        for i, w in enumerate(start):  # the memory MLP at the segment's start
            h = h @ w
            if i + 1 < len(start):
                h = F.gelu(h)
        retrieved = memory._output(h, seg)  # (B, n, D)
        pos = torch.arange(n, dtype=torch.float64).expand(B, n)
        q = rotate(heads(seg @ Wq.T), pos)
        # Interleave [r_0, x_0, r_1, x_1, ...]; token i sees entries 0 .. 2i + 1.
        k = torch.stack([rotate(heads(retrieved @ Wk.T), pos), rotate(heads(seg @ Wk.T), pos)], 3).flatten(2, 3)
        v = torch.stack([heads(retrieved @ Wv.T), heads(seg @ Wv.T)], 3).flatten(2, 3)
        p = layer.persistent
        k = torch.cat([heads((p @ Wk.T)[None]).expand(B, -1, -1, -1), k], 2)
        v = torch.cat([heads((p @ Wv.T)[None]).expand(B, -1, -1, -1), v], 2)
        visible = torch.ones(n, p.shape[0] + 2 * n, dtype=torch.bool)
        visible[:, p.shape[0]:] = torch.arange(2 * n)[None, :] <= 2 * torch.arange(n)[:, None] + 1
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(K)
        att = torch.softmax(scores.masked_fill(~visible, -math.inf), -1) @ v  # (B, H, n, K)
        y = layer.o_proj(att.transpose(1, 2).reshape(B, n, H * K))
        m, state = memory(y, state, mode="recurrent")
        outputs.append(_gated(layer.gate, y, m))
    return torch.cat(outputs, 1)


@pytest.mark.parametrize(("segment_size", "persistent"), [(1, 0), (3, 2), (4, 1)])
def test_mac_is_the_papers_segment_attention_made_causal(segment_size: int, persistent: int) -> None:
    torch.manual_seed(0)
    layer = rnnkit.layers.build("titans_mac", d_model=6, num_heads=2, segment_size=segment_size,
                                persistent=persistent).double()
    x = torch.randn(2, 10, 6, dtype=torch.float64)
    with torch.no_grad():
        out, state = layer(x)
        expected = mac_reference(layer, x)
    assert_close(out, expected, dtype=torch.float64, what=f"S={segment_size}, N_p={persistent}: y")
    assert state.memory.count.tolist() == [[10 % segment_size]] * 2


def test_mac_state_holds_the_segment_and_not_more() -> None:
    layer = rnnkit.layers.build("titans_mac", d_model=8, num_heads=2, segment_size=6)
    H, K, P = 2, 4, 2 * 4 * 8  # P: the memory's weights per head at depth 2, E = 2K
    assert layer.state_size == 3 * H * P + 1 + 4 * 5 * H * K


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [("titans_mac", "segment_size", 0), ("titans_mac", "persistent", -1), ("titans_mag", "window", 0),
     ("titans_mag", "memory_depth", 0), ("titans_mac", "norm_eps", 0.0)],
)
def test_bad_options_name_the_field(name: str, option: str, value: object) -> None:
    with pytest.raises(InputError, match=f"{option}: expected"):
        rnnkit.layers.build(name, d_model=8, **{option: value})


def test_mac_default_inner_rate_keeps_a_long_sequence_finite() -> None:
    # A segment's gradients add up; at titans' own base_lr = 1 this memory diverges to NaN here.
    torch.manual_seed(0)
    layer = rnnkit.layers.build("titans_mac", d_model=32, num_heads=2, segment_size=16)
    assert layer.config.base_lr == 1 / 16
    with torch.no_grad():
        y, state = layer(torch.randn(2, 1024, 32))
    assert bool(torch.isfinite(y).all())
    assert max(w.abs().max().item() for w in state.memory.weights) < 10
