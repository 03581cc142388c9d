"""The delta-rule forms (chunk, parallel) against the recurrent loop that defines them."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from rnnkit.errors import InputError
from rnnkit.ops.delta_rule import (
    CHUNK_SIZE,
    _unit_lower_inverse,
    delta_rule_chunk,
    delta_rule_parallel,
    delta_rule_recurrent,
    dplr_delta_rule,
)
from tests.helpers import TOLERANCES, assert_close

#: The module itself (``rnnkit.ops.delta_rule`` as an attribute is the entry function).
delta_rule_module = importlib.import_module("rnnkit.ops.delta_rule")

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


#: Steps per chunk each form solves as one triangular system (a function of T).
FORM_CHUNKS = {"chunk8": lambda T: min(8, T), "chunk-default": lambda T: min(CHUNK_SIZE, T), "parallel": lambda T: T}


def solve_error_bound(inputs, C: int) -> float:
    """Forward-error scale of the chunk forms' triangular solves: ``max kappa_inf(I + A) * eps``.

    A chunk of ``C`` steps solves ``(I + A) X = R`` with ``A_ij = beta_i (k_i . k_j) exp(G_i - G_j)``
    for ``i > j`` (``G`` the within-chunk cumulative log decay). A backward-stable solve perturbs the
    system by O(eps) relative to its entries, so its result moves by up to ``kappa(I + A) * eps`` of
    its magnitude (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Thm 7.2 and
    Sec. 8.2; the dimension factor of the worst-case bound is not met by rounding that cancels).
    The recurrent loop applies the same transitions one step at a time and does not amplify by
    ``kappa``: with ``beta`` near 2 each transition ``I - beta k k^T`` reflects instead of
    contracting, and at ``C = 64`` ``kappa`` reaches ~500, so two fp32 algorithms can differ by
    ~500 eps = 3e-5 there on any BLAS. Where this bound is below the contract's tolerance, the
    contract's tolerance is what the test holds the forms to.
    """
    q, k, _, beta, log_decay, _ = (t.double() if t is not None else None for t in inputs)
    B, H, T, _ = k.shape
    n = -(-T // C)
    pad = n * C - T
    k = F.pad(k, (0, 0, 0, pad)).reshape(B, H, n, C, -1)
    beta = F.pad(beta, (0, pad)).reshape(B, H, n, C)
    A = beta[..., :, None] * (k @ k.mT)
    if log_decay is not None:
        G = F.pad(log_decay, (0, pad)).reshape(B, H, n, C).cumsum(-1)
        A = A * (G[..., :, None] - G[..., None, :]).tril(-1).exp()
    M = A.tril(-1) + torch.eye(C, dtype=A.dtype)
    inf = float("inf")
    kappa = torch.linalg.matrix_norm(M, ord=inf) * torch.linalg.matrix_norm(torch.linalg.inv(M), ord=inf)
    return float(kappa.max()) * torch.finfo(inputs[0].dtype).eps


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
    bound = solve_error_bound(inputs, FORM_CHUNKS[form](T))
    if bound > TOLERANCES[(dtype, "value")][1]:
        for name, a, e in (("y", y, y_ref), ("final state", S, S_ref)):
            err = float(((a - e).abs() / e.abs().clamp(min=1.0)).max())
            assert err <= bound, f"{form}: {name} max-abs error {err:.3e} (scaled) > kappa * eps = {bound:.3e}"
    else:
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
    """The explicit (I + A)^{-1} of the chunk kernel reads only A's strictly lower triangle, is unit
    lower triangular, and is the inverse to within the error bounds of triangular inversion."""
    gen = torch.Generator().manual_seed(C)
    A = (torch.randn(3, 2, C, C, dtype=torch.float64, generator=gen) * 0.5).tril(-1)
    A_dirty = A + torch.randn(3, 2, C, C, dtype=torch.float64, generator=gen).triu()  # only below the diagonal counts
    eye = torch.eye(C, dtype=torch.float64)
    M = A + eye
    X = _unit_lower_inverse(A_dirty)
    assert torch.equal(X.triu(1), torch.zeros_like(X)) and torch.equal(X.diagonal(0, -2, -1), torch.ones(3, 2, C, dtype=X.dtype))
    u = torch.finfo(torch.float64).eps / 2
    gamma = C * u / (1 - C * u)
    # Triangular inversion by substitution has the componentwise residual |M X - I| <= gamma_C |M| |X|
    # (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., Sec. 14.2): a bound that holds
    # for every summation order, so for every BLAS.
    residual = (M @ X - eye).abs()
    assert bool((residual <= gamma * (M.abs() @ X.abs())).all()), float(residual.max())
    # Against LU with pivoting (another algorithm, with its own rounding): both are within
    # gamma_C * kappa_inf(M) of the exact inverse in the inf-norm, relative to its norm.
    expected = torch.linalg.inv(M)
    inf = float("inf")
    norm_inv = torch.linalg.matrix_norm(expected, ord=inf)
    kappa = torch.linalg.matrix_norm(M, ord=inf) * norm_inv
    gap = torch.linalg.matrix_norm(X - expected, ord=inf)
    assert bool((gap <= 2 * gamma * kappa * norm_inv).all()), float((gap / (gamma * kappa * norm_inv)).max())


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


# --------------------------------------------------------------------------- diagonal plus low rank
@pytest.mark.parametrize("form", ["recurrent", "parallel", "chunk"])
@pytest.mark.parametrize("gated", [False, True], ids=["delta", "gated"])
def test_dplr_reduces_to_the_delta_rule(form, gated):
    """``a = -g beta k``, ``b = k``, ``beta k`` written and the decay ``g`` equal across K is the
    (gated) delta rule, ``g (I - beta k k^T)``: the diagonal-plus-low-rank op agrees with its loop."""
    q, k, v, beta, log_decay, state = make_inputs(2, 21, 2, 3, 4, torch.float64, gated)
    ref_y, ref_S = delta_rule_recurrent(q, k, v, beta, log_decay, state)
    g = (log_decay if gated else torch.zeros_like(beta))[..., None].expand_as(k)
    bk = beta[..., None] * k
    y, S = dplr_delta_rule(q, bk, v, -g.exp() * bk, k, g, state, mode=form, chunk_size=8)
    assert_close(y, ref_y, what="y")
    assert_close(S, ref_S, what="state")


def test_dplr_is_rwkv7s_transition():
    """The op with ``a = -(eta ⊙ kappa)``, ``b = kappa`` is RWKV-7's update as the paper writes it,
    with a ``(V, K)`` state: ``S_t = S_{t-1}(diag(w_t) - kappa_t^T (eta_t ⊙ kappa_t)) + v_t^T k_t``,
    ``y_t = S_t r_t``."""
    gen = torch.Generator().manual_seed(3)
    B, H, T, K, V = 2, 2, 9, 3, 4
    r, k = (torch.randn(B, H, T, K, dtype=torch.float64, generator=gen) for _ in range(2))
    v = torch.randn(B, H, T, V, dtype=torch.float64, generator=gen)
    kappa = F.normalize(torch.randn(B, H, T, K, dtype=torch.float64, generator=gen), dim=-1)
    eta = torch.rand(B, H, T, K, dtype=torch.float64, generator=gen)
    w = torch.rand(B, H, T, K, dtype=torch.float64, generator=gen) * 0.5 + 0.5
    S0 = torch.randn(B, H, V, K, dtype=torch.float64, generator=gen)  # the paper's layout
    S, ys = S0, []
    for t in range(T):
        kap, e = kappa[:, :, t, None, :], eta[:, :, t, None, :]  # (B, H, 1, K) row vectors
        transition = torch.diag_embed(w[:, :, t]) - kap.transpose(-1, -2) @ (e * kap)  # (B, H, K, K)
        S = S @ transition + v[:, :, t, :, None] @ k[:, :, t, None, :]
        ys.append((S @ r[:, :, t, :, None])[..., 0])
    y, S_op = dplr_delta_rule(r, k, v, -eta * kappa, kappa, w.log(), S0.transpose(-1, -2), mode="recurrent")
    assert_close(y, torch.stack(ys, 2), what="y")
    assert_close(S_op, S.transpose(-1, -2), what="state")


@pytest.mark.parametrize(("change", "match"), [
    (lambda args: args.__setitem__(3, args[3][..., :2]), "a: expected shape"),
    (lambda args: args.__setitem__(5, args[5][:, :, :, 0]), "log_decay: expected shape"),
    (lambda args: args.__setitem__(2, args[2][:, :1]), "v: expected shape"),
    (lambda args: args.__setitem__(4, args[4].float()), "expected one floating dtype"),
    (lambda args: args.__setitem__(6, torch.zeros(2, 2, 3, 3, dtype=torch.float64)), "state: expected"),
])
def test_dplr_rejects_bad_arguments(change, match):
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 2, 5, 3, dtype=torch.float64, generator=gen) for _ in range(6)] + [None]
    args[2] = torch.randn(2, 2, 5, 4, dtype=torch.float64, generator=gen)
    change(args)
    with pytest.raises(InputError, match=match):
        dplr_delta_rule(*args)


#: Log decays per regime: near 0 (either sign), RWKV-7's range, and strong enough that a chunk's
#: cumulative decay passes SCORE_FACTOR_BOUND (the exact pairwise scores instead of the factored ones).
DPLR_DECAYS = {
    "near-zero": lambda shape, gen: torch.randn(*shape, dtype=torch.float64, generator=gen) * 1e-3,
    "rwkv7": lambda shape, gen: -torch.rand(*shape, dtype=torch.float64, generator=gen) * 0.6,
    "strong": lambda shape, gen: -torch.rand(*shape, dtype=torch.float64, generator=gen) * 12.0 - 3.0,
}


def dplr_leaves(B, T, H, K, V, decay, seed=0):
    """RWKV-7's transition (``a = -eta kappa``, ``b = kappa``) with the decays of ``decay``, as leaves."""
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    kappa = F.normalize(torch.randn(B, H, T, K, dtype=f64, generator=gen), dim=-1)
    eta = torch.rand(B, H, T, K, dtype=f64, generator=gen)
    q, k = torch.randn(B, H, T, K, dtype=f64, generator=gen), torch.randn(B, H, T, K, dtype=f64, generator=gen) * 0.5
    v = torch.randn(B, H, T, V, dtype=f64, generator=gen)
    g = DPLR_DECAYS[decay]((B, H, T, K), gen)
    state = torch.randn(B, H, K, V, dtype=f64, generator=gen)
    return [t.requires_grad_() for t in (q, k, v, -eta * kappa, kappa, g, state)]


def _count_pairwise(monkeypatch):
    calls = []
    original = delta_rule_module._pairwise_scores

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(delta_rule_module, "_pairwise_scores", spy)
    return calls


@pytest.mark.parametrize("decay", list(DPLR_DECAYS))
@pytest.mark.parametrize("chunk_size", [4, 40], ids=["C4", "C40-direct-solve"])
def test_dplr_chunk_gradcheck_fp64(decay, chunk_size, monkeypatch):
    """fp64 gradcheck of the chunk form's hand-written backward: every input and the initial state,
    both outputs (y and the final state), lengths, decays near 0, RWKV-7's and strong ones; chunks
    of 4 (products with the explicit inverse) and one chunk of 40 (triangular solves)."""
    pairwise = _count_pairwise(monkeypatch)
    T = 11 if chunk_size == 4 else 40
    leaves = dplr_leaves(2, T, 1, 3, 2, decay)
    lengths = torch.tensor([T, T - 4])
    # fast_mode: random projections v^T J u (numerical against analytical), two forwards per input
    # tensor; the test below compares every gradient entry with autograd through the loop
    torch.autograd.gradcheck(
        lambda *x: dplr_delta_rule(*x, lengths=lengths, mode="chunk", chunk_size=chunk_size),
        leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True,
    )
    assert bool(pairwise) == (decay == "strong"), "strong decays take the pairwise scores, others the factored ones"


@pytest.mark.parametrize("decay", list(DPLR_DECAYS))
@pytest.mark.parametrize(("T", "chunk_size"), [(37, 8), (37, 16), (64, 32), (37, 37)],
                         ids=["T37-C8", "T37-C16", "T64-C32", "T37-one-chunk"])
def test_dplr_chunk_matches_autograd_through_the_loop(decay, T, chunk_size):
    """The chunk form's values and hand-written gradients == autograd through the recurrent loop,
    in fp64, with lengths, an initial state and a loss on both outputs."""
    lengths = torch.tensor([T, T // 2])
    results = []
    for mode in ("recurrent", "chunk"):
        leaves = dplr_leaves(2, T, 2, 4, 3, decay, seed=1)
        y, S = dplr_delta_rule(*leaves, lengths=lengths, mode=mode, chunk_size=chunk_size)
        gen = torch.Generator().manual_seed(2)
        loss = (y * torch.randn(y.shape, dtype=y.dtype, generator=gen)).sum() + (S * S).sum()
        results.append((y, S, torch.autograd.grad(loss, leaves)))
    (y_ref, S_ref, grads_ref), (y, S, grads) = results
    assert_close(y, y_ref, what="y")
    assert_close(S, S_ref, what="final state")
    for name, got, want in zip(("q", "k", "v", "a", "b", "log_decay", "state"), grads, grads_ref):
        assert_close(got, want, kind="grad", what=f"d/d {name}")
