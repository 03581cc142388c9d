"""The gated linear attention op: parallel and chunk forms == the recurrent loop (values, final
state, gradients w.r.t. everything), padding, strong decays and long fp32 sequences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnnkit.errors import InputError
from rnnkit.ops.gated_linear_attention import (
    gated_linear_attention_chunk,
    gated_linear_attention_parallel,
    gated_linear_attention_recurrent,
)
from tests.helpers import assert_close

FORMS = {
    "parallel": gated_linear_attention_parallel,
    "chunk16": lambda *a, **kw: gated_linear_attention_chunk(*a, chunk_size=16, **kw),
    "chunk64": gated_linear_attention_chunk,
}


def inputs(B, H, T, K, V, per_dim, dtype, strength=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, K, dtype=dtype, generator=gen) for _ in range(2))
    v = torch.randn(B, H, T, V, dtype=dtype, generator=gen)
    shape = (B, H, T, K) if per_dim else (B, H, T)
    g = F.logsigmoid(torch.randn(shape, dtype=dtype, generator=gen) * 2) * strength
    S0 = torch.randn(B, H, K, V, dtype=dtype, generator=gen)
    return q, k, v, g, S0


def run(form, args, lengths):
    args = [a.detach().clone().requires_grad_() for a in args]
    y, S = form(*args, lengths=lengths)
    gen = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, dtype=y.dtype, generator=gen)).sum() + (S * torch.randn(S.shape, dtype=S.dtype, generator=gen)).sum()
    return y, S, torch.autograd.grad(loss, args)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("per_dim", [False, True], ids=["scalar", "per_dim"])
@pytest.mark.parametrize("T", [1, 15, 64, 65, 130])
def test_forms_match_loop_fp64(form, per_dim, T):
    args = inputs(2, 2, T, 3, 4, per_dim, torch.float64)
    lengths = [T, max(1, T // 2 + 1)]
    y_ref, S_ref, g_ref = run(gated_linear_attention_recurrent, args, lengths)
    y, S, g = run(FORMS[form], args, lengths)
    assert_close(y, y_ref, what="y")
    assert_close(S, S_ref, what="final state")
    for name, a, b in zip(("q", "k", "v", "log_decay", "state"), g, g_ref):
        assert_close(a, b, kind="grad", what=f"d/d {name}")


@pytest.mark.parametrize("per_dim", [False, True], ids=["scalar", "per_dim"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_strong_decay_underflow_is_finite(per_dim, dtype):
    """Cumulative decays far below the dtype's smallest exp (exp(-88) in fp32, exp(-745) in fp64)
    inside one chunk give zeros, not inf * 0 = NaN, and the loop's values and gradients.

    fp32 loses |b| * 6e-8 of precision in exp(b_i - b_j) when the cumulative log decay b inside a
    block reaches |b|, so the fp32 case uses decays that underflow within a 64-step chunk while
    keeping |b| in the hundreds; parallel (one block over T) is checked for finiteness there.
    """
    strength = 3.0 if dtype == torch.float32 else 60.0
    args = inputs(1, 2, 200, 4, 4, per_dim, dtype, strength=strength)
    y_ref, S_ref, g_ref = run(gated_linear_attention_recurrent, args, None)
    for name, form in FORMS.items():
        y, S, g = run(form, args, None)
        if name == "parallel" and dtype == torch.float32:
            assert all(torch.isfinite(t).all() for t in (y, S, *g))
            continue
        assert_close(y, y_ref, what=f"{name}: y")
        assert_close(S, S_ref, what=f"{name}: final state")
        for a, b in zip(g, g_ref):
            assert_close(a, b, kind="grad", what=f"{name}: gradient")


@pytest.mark.parametrize("per_dim", [False, True], ids=["scalar", "per_dim"])
def test_long_fp32_sequence_matches_fp64(per_dim):
    """fp32 chunk form over T=4096 stays as close to the fp64 loop as the fp32 loop does."""
    args64 = inputs(1, 1, 4096, 4, 4, per_dim, torch.float64, strength=0.05)
    args32 = [a.float() for a in args64]
    with torch.no_grad():
        y64, S64 = gated_linear_attention_chunk(*args64)
        y32, S32 = gated_linear_attention_chunk(*args32)
    err = (y32.double() - y64).abs().max() / y64.abs().max()
    assert err < 1e-5, f"relative fp32 error {err:.2e}"
    assert torch.isfinite(S32).all()


def test_padding_leaves_state_and_ignores_garbage():
    q, k, v, g, S0 = inputs(2, 1, 9, 3, 3, True, torch.float64)
    lengths = torch.tensor([9, 4])
    y, S = gated_linear_attention_chunk(q, k, v, g, S0, lengths=lengths, chunk_size=4)
    k2, v2, g2 = (t.clone() for t in (k, v, g))
    k2[1, :, 4:], v2[1, :, 4:], g2[1, :, 4:] = float("nan"), float("inf"), -1e30
    y2, S2 = gated_linear_attention_chunk(q, k2, v2, g2, S0, lengths=lengths, chunk_size=4)
    assert torch.equal(S, S2) and torch.equal(y[:, :, :4], y2[:, :, :4])
    _, S_alone = gated_linear_attention_recurrent(q[1:, :, :4], k[1:, :, :4], v[1:, :, :4], g[1:, :, :4], S0[1:])
    assert_close(S[1:], S_alone, what="state of the short sequence")


def test_bad_inputs():
    q, k, v, g, S0 = inputs(1, 1, 5, 4, 4, False, torch.float32)
    with pytest.raises(InputError, match="expected"):
        gated_linear_attention_chunk(q, k[..., :3], v, g)
    with pytest.raises(InputError, match="log_decay"):
        gated_linear_attention_chunk(q, k, v, g[..., :4])
    with pytest.raises(InputError, match="state"):
        gated_linear_attention_chunk(q, k, v, g, S0[..., :3])
    with pytest.raises(InputError, match="power of two"):
        gated_linear_attention_chunk(q, k, v, torch.zeros(1, 1, 5, 4), chunk_size=24)
    with pytest.raises(InputError, match="lengths"):
        gated_linear_attention_chunk(q, k, v, g, lengths=[6])


@pytest.mark.parametrize("T", [1, 20, 64])
def test_no_decay_path_matches_loop(T):
    """Zero log decay without gradient (plain linear attention) takes a shortcut; same result."""
    q, k, v, _, S0 = inputs(2, 2, T, 3, 4, False, torch.float64)
    g = torch.zeros(2, 2, T, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (q, k, v, S0)]
    y_ref, S_ref = gated_linear_attention_recurrent(q, k, v, g, S0, lengths=[T, 1])
    g_ref = torch.autograd.grad(y_ref.sin().sum() + S_ref.sum(), leaves)
    for form in FORMS.values():
        y, S = form(q, k, v, g, S0, lengths=[T, 1])
        assert_close(y, y_ref, what="y")
        assert_close(S, S_ref, what="final state")
        for a, b in zip(torch.autograd.grad(y.sin().sum() + S.sum(), leaves), g_ref):
            assert_close(a, b, kind="grad", what="gradient")


@pytest.mark.parametrize("per_dim", [False, True], ids=["scalar", "per_dim"])
def test_workspace_pool_reuse_keeps_results(monkeypatch, per_dim):
    """The chunk kernel's large tensors come from a pool of reused buffers: repeated training steps
    (with outputs and gradients still held, and a cap small enough to evict) match the loop."""
    from rnnkit.ops import _workspace

    monkeypatch.setattr(_workspace, "HUGE_PAGE_MIN_BYTES", 1 << 8)  # pool even these tiny tensors
    pool = _workspace.BufferPool(12 << 10)
    monkeypatch.setattr(_workspace, "POOL", pool)
    args = inputs(2, 2, 40, 4, 4, per_dim, torch.float64)
    y_ref, S_ref, g_ref = run(gated_linear_attention_recurrent, args, [40, 23])
    held = []
    for step in range(4):
        y, S, g = run(FORMS["chunk16"], args, [40, 23])
        assert_close(y, y_ref, what=f"step {step}: y")
        assert_close(S, S_ref, what=f"step {step}: final state")
        for a, b in zip(g, g_ref):
            assert_close(a, b, kind="grad", what=f"step {step}: gradient")
        held.append((y, g))  # still referenced: their buffers must not be handed out again
        if step == 1:
            held.clear()
    assert pool.buffers, "the kernel's buffers went through the pool"
    assert sum(t.numel() * t.element_size() for t in pool.buffers) <= 12 << 10
