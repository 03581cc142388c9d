"""The delta-rule forms (chunk, parallel) against the recurrent loop that defines them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnnkit.errors import InputError
from rnnkit.ops.delta_rule import (
    _unit_lower_inverse,
    delta_rule_chunk,
    delta_rule_parallel,
    delta_rule_recurrent,
)
from tests.helpers import assert_close

FORMS = {
    "chunk8": lambda *a, **kw: delta_rule_chunk(*a, chunk_size=8, **kw),
    "chunk-default": delta_rule_chunk,
    "parallel": delta_rule_parallel,
}


def make_inputs(B, T, H, K, V, dtype, gated, beta_max=1.0, seed=0, log_decay_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, K, dtype=dtype, generator=gen)
    k = F.normalize(torch.randn(B, H, T, K, dtype=dtype, generator=gen), dim=-1)
    v = torch.randn(B, H, T, V, dtype=dtype, generator=gen)
    beta = torch.rand(B, H, T, dtype=dtype, generator=gen) * beta_max
    log_decay = -torch.rand(B, H, T, dtype=dtype, generator=gen) * log_decay_scale if gated else None
    state = torch.randn(B, H, K, V, dtype=dtype, generator=gen)
    return q, k, v, beta, log_decay, state


def forward_and_grads(fn, inputs, lengths, weights):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    y, S = fn(*leaves, lengths=lengths)
    loss = (y * weights[0]).sum() + (S * weights[1]).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return y.detach(), S.detach(), grads


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize(
    ("T", "lengths", "beta_max"),
    [(1, None, 1.0), (7, None, 2.0), (37, None, 1.0), (37, (37, 20, 1), 2.0), (64, None, 1.999)],
    ids=["T1", "T7-beta2", "T37", "T37-padded-beta2", "T64-beta-near-2"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_forms_match_recurrent(form, gated, T, lengths, beta_max, dtype):
    """Outputs, final state and gradients w.r.t. every input (q, k, v, beta, gate, S_0)."""
    inputs = make_inputs(3, T, 2, 5, 4, dtype, gated, beta_max)
    gen = torch.Generator().manual_seed(1)
    weights = (torch.randn(3, 2, T, 4, dtype=dtype, generator=gen), torch.randn(3, 2, 5, 4, dtype=dtype, generator=gen))
    lens = None if lengths is None else torch.tensor(lengths)
    y_ref, S_ref, g_ref = forward_and_grads(delta_rule_recurrent, inputs, lens, weights)
    y, S, g = forward_and_grads(FORMS[form], inputs, lens, weights)
    assert_close(y, y_ref, what=f"{form}: y")
    assert_close(S, S_ref, what=f"{form}: final state")
    names = ["q", "k", "v", "beta"] + (["log_decay"] if gated else []) + ["state"]
    for name, a, e in zip(names, g, g_ref):
        assert_close(a, e, kind="grad", what=f"{form}: d loss / d {name}")


def test_lengths_freeze_the_state_and_ignore_padding():
    """Steps past a length leave the state unchanged, whatever the padding holds (NaN included)."""
    q, k, v, beta, log_decay, S0 = make_inputs(2, 20, 2, 4, 3, torch.float64, gated=True)
    lengths = torch.tensor([20, 9])
    for fn in (delta_rule_recurrent, delta_rule_chunk):
        _, S_full = fn(q, k, v, beta, log_decay, S0, lengths)
        _, S_alone = fn(*(t[1:, :, :9] for t in (q, k, v, beta, log_decay)), S0[1:])
        assert torch.allclose(S_full[1:], S_alone, atol=1e-12, rtol=0)
        dirty = [t.clone() for t in (q, k, v, beta, log_decay)]
        for t in dirty:
            t[1, :, 9:] = float("nan")
        y_dirty, S_dirty = fn(*dirty, S0, lengths)
        y_clean, S_clean = fn(q, k, v, beta, log_decay, S0, lengths)
        assert torch.equal(S_dirty, S_clean)
        assert torch.equal(y_dirty[:, :, :9], y_clean[:, :, :9]) and torch.equal(y_dirty[0], y_clean[0])


def test_gradcheck_chunk_fp64():
    inputs = make_inputs(1, 6, 1, 3, 2, torch.float64, gated=True, beta_max=2.0)
    leaves = [t.clone().requires_grad_() for t in inputs]
    torch.autograd.gradcheck(
        lambda *a: delta_rule_chunk(*a, lengths=torch.tensor([5]), chunk_size=4), leaves, eps=1e-6, atol=1e-6
    )


def test_long_sequence_fp32_with_strong_gates_is_stable():
    """T = 4096 in fp32 with decays that underflow a chunk's cumulative product: finite, and == fp64."""
    inputs64 = make_inputs(1, 4096, 2, 8, 8, torch.float64, gated=True, beta_max=2.0, log_decay_scale=8.0)
    inputs32 = [t.float() for t in inputs64]
    y32, S32 = delta_rule_chunk(*inputs32, chunk_size=64)
    y64, S64 = delta_rule_recurrent(*inputs64)
    assert torch.isfinite(y32).all() and torch.isfinite(S32).all()
    assert_close(y32.double(), y64, dtype=torch.float32, what="y (chunk fp32 vs recurrent fp64)")
    assert_close(S32.double(), S64, dtype=torch.float32, what="final state")


def test_negative_eigenvalue_flips_the_state():
    """beta = 2 with a unit key is a reflection: writing v = 0 twice along k returns the state."""
    S0 = torch.randn(1, 1, 3, 2, dtype=torch.float64)
    k = F.normalize(torch.randn(1, 1, 1, 3, dtype=torch.float64), dim=-1).expand(1, 1, 2, 3)
    zeros = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    beta = torch.full((1, 1, 2), 2.0, dtype=torch.float64)
    q = torch.zeros(1, 1, 2, 3, dtype=torch.float64)
    _, S1 = delta_rule_chunk(q[:, :, :1], k[:, :, :1], zeros[:, :, :1], beta[:, :, :1], state=S0)
    _, S2 = delta_rule_chunk(q, k, zeros, beta, state=S0)
    kk = k[0, 0, 0]
    assert torch.allclose(S1[0, 0], S0[0, 0] - 2 * torch.outer(kk, kk @ S0[0, 0]), atol=1e-12)
    assert torch.allclose(S2, S0, atol=1e-12)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: {**a, "k": a["k"][..., :-1]}, "q, k"),
        (lambda a: {**a, "v": a["v"][:, :, :-1]}, "v"),
        (lambda a: {**a, "beta": a["beta"][..., None]}, "beta"),
        (lambda a: {**a, "log_decay": a["beta"][:, :, :-1]}, "log_decay"),
        (lambda a: {**a, "state": a["state"][..., :-1]}, "state"),
        (lambda a: {**a, "lengths": torch.tensor([0, 3])}, "lengths"),
        (lambda a: {**a, "lengths": torch.tensor([1.0, 3.0])}, "lengths"),
        (lambda a: {**a, "v": a["v"].double()}, "dtype"),
        (lambda a: {**a, "chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_input(change, match):
    q, k, v, beta, _, S0 = make_inputs(2, 5, 2, 3, 4, torch.float32, gated=False)
    args = dict(q=q, k=k, v=v, beta=beta, log_decay=None, state=S0, lengths=None, chunk_size=4)
    with pytest.raises(InputError, match=match):
        delta_rule_chunk(**change(args))


@pytest.mark.parametrize("C", [1, 7, 32, 64, 37])
def test_unit_lower_inverse_is_the_inverse(C):
    """The explicit (I + A)^{-1} of the chunk kernel reads only A's strictly lower triangle and
    agrees with inverting I + A (LU with pivoting, a different algorithm) to rounding."""
    gen = torch.Generator().manual_seed(C)
    A = (torch.randn(3, 2, C, C, dtype=torch.float64, generator=gen) * 0.5).tril(-1)
    A_dirty = A + torch.randn(3, 2, C, C, dtype=torch.float64, generator=gen).triu()  # only below the diagonal counts
    eye = torch.eye(C, dtype=torch.float64)
    expected = torch.linalg.inv(A + eye)
    # random A: entries of the inverse grow to ~1e3 at C = 64; LU's own rounding there exceeds 1e-14 of them
    tol = 1e-13 * float(expected.abs().max())
    T = _unit_lower_inverse(A_dirty)
    assert torch.allclose(T, expected, atol=tol, rtol=0)
    assert torch.allclose((A + eye) @ T, eye.expand(3, 2, C, C), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unit_lower_inverse_in_lower_precisions(dtype):
    """fp32 solves natively; bf16 and fp16 (no LAPACK solve) solve in fp32 and round once."""
    gen = torch.Generator().manual_seed(0)
    k = F.normalize(torch.randn(4, 16, 8, dtype=torch.float64, generator=gen), dim=-1)
    A = (k @ k.mT * torch.rand(4, 16, 1, dtype=torch.float64, generator=gen)).tril(-1)
    expected = torch.linalg.inv(A + torch.eye(16, dtype=torch.float64))
    T = _unit_lower_inverse(A.to(dtype))
    assert T.dtype == dtype
    # the solve's error in its working precision plus one rounding of A and of the result
    tol = 8 * torch.finfo(dtype).eps * float(expected.abs().max())
    assert torch.allclose(T.double(), expected, atol=tol, rtol=0)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_chunk_gradients_from_outputs_alone(gated):
    """A loss on y only (no gradient into the final state) through the hand-written backward."""
    inputs = make_inputs(2, 21, 2, 4, 3, torch.float64, gated, beta_max=2.0)
    grads = []
    for fn in (delta_rule_recurrent, lambda *a: delta_rule_chunk(*a, chunk_size=8)):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
        y, _ = fn(*leaves)
        grads.append(torch.autograd.grad((y**2).sum(), [t for t in leaves if t is not None]))
    for a, e in zip(*grads[::-1]):
        assert_close(a, e, kind="grad", what="d (y^2).sum()")


def test_parallel_without_gradients_skips_nothing_it_needs():
    """Long chunks form the explicit inverse only for the backward; without gradients they match the loop."""
    inputs = make_inputs(2, 40, 2, 5, 4, torch.float64, gated=True, beta_max=2.0)
    y_ref, S_ref = delta_rule_recurrent(*inputs)
    with torch.no_grad():
        y, S = delta_rule_parallel(*inputs)
    assert_close(y, y_ref, what="parallel, no grad: y")
    assert_close(S, S_ref, what="parallel, no grad: final state")
