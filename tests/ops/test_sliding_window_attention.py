"""Sliding-window attention: parallel and chunk forms == the loop over the window, for windows
shorter and longer than the sequence, chunk sizes that do not divide T, a partly filled history,
and padded batches; gradients included."""

from __future__ import annotations

import pytest
import torch

from rnnkit.errors import InputError
from rnnkit.ops.sliding_window_attention import (
    sliding_window_attention_chunk,
    sliding_window_attention_parallel,
    sliding_window_attention_recurrent,
)
from tests.helpers import assert_close


def make(T, window, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, T, 3, dtype=torch.float64, generator=gen) for _ in range(3))
    prefix = [torch.randn(2, 2, 3, 3, dtype=torch.float64, generator=gen) for _ in range(3)]
    _, state = sliding_window_attention_recurrent(*prefix, window)  # 3 of window - 1 slots filled
    return [q, k, v], state


@pytest.mark.parametrize("window", [1, 4, 9, 40])
@pytest.mark.parametrize("chunk_size", [4, 7, 64])
@pytest.mark.parametrize("ragged", [True, False], ids=["lengths", "no-lengths"])
def test_forms_match_loop(window, chunk_size, ragged):
    T = 23
    qkv, state = make(T, window)
    lengths = [T, 11] if ragged else None  # without lengths the final window is sliced, not gathered
    leaves = [t.requires_grad_() for t in qkv]
    # Outputs past a length are not defined by the op (layers zero them): compare valid steps.
    valid = (torch.arange(T)[None, :] < torch.tensor(lengths or [T, T])[:, None])[:, None, :, None]
    y_ref, s_ref = sliding_window_attention_recurrent(*leaves, window, state, lengths)
    y_ref = y_ref * valid

    def loss(y, s):  # the final window's keys and values get gradients too
        return y.square().sum() + s.k.sum() + s.v.square().sum()

    g_ref = torch.autograd.grad(loss(y_ref, s_ref), leaves)
    forms = {
        "parallel": lambda *a: sliding_window_attention_parallel(*a),
        "chunk": lambda *a: sliding_window_attention_chunk(*a, chunk_size=chunk_size),
    }
    for name, form in forms.items():
        y, s = form(*leaves, window, state, lengths)
        y = y * valid
        assert_close(y, y_ref, what=f"{name}: y")
        for a, b in zip(s, s_ref):
            assert_close(a, b, what=f"{name}: window state")
        for a, b in zip(torch.autograd.grad(loss(y, s), leaves), g_ref):
            assert_close(a, b, kind="grad", what=f"{name}: gradient")


def test_bad_inputs():
    (q, k, v), state = make(5, 4)
    with pytest.raises(InputError, match="window"):
        sliding_window_attention_chunk(q, k, v, 0)
    with pytest.raises(InputError, match="state"):
        sliding_window_attention_chunk(q, k, v, 5, state)
