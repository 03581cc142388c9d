"""Mamba's training form never holds the (B, T, E, N) expanded state of the whole sequence."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.errors import InputError
from tests.helpers import LargestTensor, saved_numel

B, T, D, N, CHUNK = 2, 1024, 8, 64, 32
E = 2 * D


def _run(layer, mode):
    x = torch.randn(B, T, D, requires_grad=True)
    y, state = layer(x, mode=mode)
    return (y.square().sum() + state.h.sum())


@pytest.mark.parametrize("mode", ["parallel", "chunk", "fused"])
def test_expanded_state_is_never_formed_for_the_whole_sequence(mode: str) -> None:
    torch.manual_seed(0)
    layer = rnnkit.layers.build("mamba", d_model=D, d_state=N, steps_per_block=CHUNK)
    if mode not in layer.modes:
        pytest.skip(f"mode {mode!r} unavailable here (no compiled scan kernel)")
    full = B * T * E * N
    with LargestTensor() as probe:
        _run(layer, mode).backward()
    # One chunk's (B, CHUNK, E, N) exists at a time (2x: a parallel scan may pad it) and the
    # (B, T, dt_rank + 2N) projection is formed once; nothing near the whole (B, T, E, N).
    assert probe.largest < full // 4, (probe.largest, full)


@pytest.mark.parametrize("mode", ["chunk", "fused"])
def test_backward_keeps_only_sequence_sized_activations(mode: str) -> None:
    torch.manual_seed(0)
    layer = rnnkit.layers.build("mamba", d_model=D, d_state=N, steps_per_block=CHUNK)
    if mode not in layer.modes:
        pytest.skip(f"mode {mode!r} unavailable here (no compiled scan kernel)")
    loss, saved = saved_numel(lambda: _run(layer, mode))
    loss.backward()
    # The (B, T, E)-sized activations of the block (projections, conv, gate, delta; the x_proj
    # output is (B, T, dt_rank + 2N)) and one (B, E, N) state per chunk: a fraction of one
    # (B, T, E, N) tensor, which a scan over the whole sequence would save (as a and h) twice.
    assert saved < B * T * E * N // 2, (saved, B * T * E * N)


@pytest.mark.parametrize("mode", ["chunk", "fused"])
def test_chunking_changes_nothing(mode: str) -> None:
    """The time blocks (chunk) or checkpoint interval (fused) change no output, state or gradient."""
    torch.manual_seed(0)
    layer = rnnkit.layers.build("mamba", d_model=D, d_state=4, steps_per_block=7).double()
    if mode not in layer.modes:
        pytest.skip(f"mode {mode!r} unavailable here (no compiled scan kernel)")
    x = torch.randn(2, 50, D, dtype=torch.float64, requires_grad=True)
    y_ref, s_ref = layer(x, mode="recurrent")
    (g_ref,) = torch.autograd.grad(y_ref.square().sum() + s_ref.h.sum(), x)
    for chunk_size in (1, 7, 50, 64):
        layer.config.steps_per_block = chunk_size
        y, s = layer(x, mode=mode)
        (g,) = torch.autograd.grad(y.square().sum() + s.h.sum(), x)
        assert torch.allclose(y, y_ref, atol=1e-12) and torch.allclose(s.h, s_ref.h, atol=1e-12), chunk_size
        assert torch.allclose(g, g_ref, atol=1e-10), chunk_size


def test_former_option_name_still_loads():
    """Saved configurations name the block length ``chunk_size``; they build the same layer."""
    layer = rnnkit.layers.build("mamba", d_model=8, chunk_size=5)
    assert layer.config.steps_per_block == 5
    with pytest.raises(InputError, match="'chunk_size' is the former name of 'steps_per_block'"):
        rnnkit.layers.build("mamba", d_model=8, chunk_size=5, steps_per_block=5)
