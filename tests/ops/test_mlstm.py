"""The mLSTM op: parallel and chunk forms == the stabilised loop (values, the whole state including
the stabiliser m, gradients w.r.t. everything), padding, and large gate pre-activations."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from rnnkit.errors import InputError
from rnnkit.ops.mlstm import MLSTMState, mlstm_chunk, mlstm_parallel, mlstm_recurrent
from tests.helpers import assert_close

mlstm_ops = importlib.import_module("rnnkit.ops.mlstm")  # the package attribute is the entry, mlstm()

FORMS = {
    "parallel": mlstm_parallel,
    "chunk16": lambda *a, **kw: mlstm_chunk(*a, chunk_size=16, **kw),
    "chunk64": mlstm_chunk,
}


def inputs(T, dtype, gate_scale=3.0, seed=0, B=2, H=2, K=3, V=4, forget_bias=0.0, input_scale=None):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, K, dtype=dtype, generator=gen) for _ in range(2))
    v = torch.randn(B, H, T, V, dtype=dtype, generator=gen)
    log_i = torch.randn(B, H, T, dtype=dtype, generator=gen) * (input_scale or gate_scale)
    log_f = F.logsigmoid(torch.randn(B, H, T, dtype=dtype, generator=gen) * gate_scale + forget_bias)
    C = torch.randn(B, H, K, V, dtype=dtype, generator=gen)
    n = torch.randn(B, H, K, dtype=dtype, generator=gen)
    m = torch.randn(B, H, dtype=dtype, generator=gen)
    return [q, k, v, log_i, log_f, C, n, m]


def run(form, args, lengths):
    args = [a.detach().clone().requires_grad_() for a in args]
    h, state = form(*args[:5], MLSTMState(*args[5:]), lengths=lengths)
    gen = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, dtype=t.dtype, generator=gen)).sum() for t in (h, *state))
    return h, state, torch.autograd.grad(loss, args)


# "strong": forget gates down to e^-10 per step (the autograd form with segment sums); "mild": the
# paper's forget-gate bias range (linspace(3, 6)), the hand-written kernel, with input gates wide
# enough that both the carried m and a step's log i win the stabiliser's maximum.
GATES = {
    "strong": dict(gate_scale=3.0),
    "mild": dict(gate_scale=1.0, forget_bias=4.0),
    "mild-wide-i": dict(gate_scale=1.0, forget_bias=4.0, input_scale=30.0),
}


@pytest.mark.parametrize("gates", list(GATES))
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("T", [1, 15, 64, 65, 130])
def test_forms_match_loop_fp64(form, T, gates):
    args = inputs(T, torch.float64, **GATES[gates])
    lengths = [T, max(1, T // 2 + 1)]
    h_ref, s_ref, g_ref = run(mlstm_recurrent, args, lengths)
    h, s, g = run(FORMS[form], args, lengths)
    assert_close(h, h_ref, what="h")
    for name, a, b in zip(("C", "n", "m"), s, s_ref):
        assert_close(a, b, what=f"state.{name}")
    for name, a, b in zip(("q", "k", "v", "log_i", "log_f", "C0", "n0", "m0"), g, g_ref):
        assert_close(a, b, kind="grad", what=f"d/d {name}")


@pytest.mark.parametrize("gates", ["mild", "mild-wide-i"])
def test_mild_gates_take_the_kernel(gates, monkeypatch):
    """Mild forget gates run the hand-written kernel (the comparisons above then test it)."""

    def fail(*args):
        raise AssertionError("the autograd form ran for mild gates")

    monkeypatch.setattr(mlstm_ops, "_chunked_strong", fail)
    args = inputs(130, torch.float64, **GATES[gates])
    for name, form in FORMS.items():
        run(form, args, [130, 66])


@pytest.mark.parametrize("force", [True, False])
@pytest.mark.parametrize("gates", ["mild", "mild-wide-i"])
def test_both_weight_forms_match_loop(gates, force, monkeypatch):
    """The kernel's intra-chunk weights formed from row and column factors, or directly, whichever
    the bound would choose: both match the loop (fp64, where neither overflows)."""
    monkeypatch.setattr(mlstm_ops, "_weights_factor", lambda rise, dtype: force)
    args = inputs(130, torch.float64, **GATES[gates])
    lengths = [130, 66]
    h_ref, s_ref, g_ref = run(mlstm_recurrent, args, lengths)
    for name in ("chunk16", "chunk64"):
        h, s, g = run(FORMS[name], args, lengths)
        assert_close(h, h_ref, what=f"{name}: h")
        for a, b in zip((*s, *g), (*s_ref, *g_ref)):
            assert_close(a, b, kind="grad", what=name)


@pytest.mark.parametrize("gates, factor", [("mild", True), ("mild-wide-i", False)])
def test_weight_form_chosen_by_the_bound(gates, factor, monkeypatch):
    """The paper's gates factor the weights; input gates of +-30 give row factors beyond the bound
    and take the direct form (test_forms_match_loop_fp64 covers both through this choice)."""
    chosen = []
    decide = mlstm_ops._weights_factor

    def spy(rise, dtype):
        chosen.append(decide(rise, dtype))
        return chosen[-1]

    monkeypatch.setattr(mlstm_ops, "_weights_factor", spy)
    run(mlstm_chunk, inputs(130, torch.float64, **GATES[gates]), None)
    assert chosen == [factor]


def test_weight_factor_bound_per_dtype():
    rise = torch.tensor([[0.0, 19.5]])
    assert mlstm_ops._weights_factor(rise, torch.float32)
    assert mlstm_ops._weights_factor(rise, torch.bfloat16)
    assert not mlstm_ops._weights_factor(rise + 1, torch.float32)
    # fp16 overflows at e^11: its bound is a quarter of that
    assert not mlstm_ops._weights_factor(torch.tensor([3.0]), torch.float16)
    assert mlstm_ops._weights_factor(torch.tensor([2.5]), torch.float16)


def test_weight_forms_equally_accurate_fp32(monkeypatch):
    """In fp32 the factored weights are about as close to the fp64 loop as the directly formed ones
    and the fp32 loop: every output and gradient within twice the larger of their errors."""
    args64 = inputs(256, torch.float64, B=2, H=2, K=16, V=16, **GATES["mild"])
    gen = torch.Generator().manual_seed(1)
    shapes = ((2, 2, 256, 16), (2, 2, 16, 16), (2, 2, 16), (2, 2))
    weights = [torch.randn(shape, dtype=torch.float64, generator=gen) for shape in shapes]

    def errors(form, dtype):
        args = [a.detach().to(dtype).requires_grad_() for a in args64]
        h, state = form(*args[:5], MLSTMState(*args[5:]))
        loss = sum((t * w.to(dtype)).sum() for t, w in zip((h, *state), weights))
        got = (h, *state, *torch.autograd.grad(loss, args))
        return [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, truth)]

    truth = _outputs_fp64(args64, weights)
    loop = errors(mlstm_recurrent, torch.float32)
    by_form = {}
    for force in (True, False):
        monkeypatch.setattr(mlstm_ops, "_weights_factor", lambda rise, dtype, force=force: force)
        by_form[force] = errors(mlstm_chunk, torch.float32)
    assert max(loop) < 1e-4  # the comparison is meaningful: fp32 rounding, not a mismatch
    for i, (factored, direct, looped) in enumerate(zip(by_form[True], by_form[False], loop)):
        assert factored <= 2 * max(direct, looped), (i, factored, direct, looped)


def _outputs_fp64(args64, weights):
    args = [a.detach().clone().requires_grad_() for a in args64]
    h, state = mlstm_recurrent(*args[:5], MLSTMState(*args[5:]))
    loss = sum((t * w).sum() for t, w in zip((h, *state), weights))
    return (h, *state, *torch.autograd.grad(loss, args))


def test_large_gates_fp32_stable():
    """Gate pre-activations of +-60 (exp(60) overflows fp32 unstabilised): every fp32 form stays
    finite and as close to the fp64 loop as the fp32 loop is (the ratio num / max(|den|, exp(-m))
    is ill-conditioned where |den| is small, so the comparison is against the truth, not 1e-5)."""
    args64 = inputs(200, torch.float64, gate_scale=20.0)
    h64, s64, _ = run(mlstm_recurrent, args64, None)
    args32 = [a.float() for a in args64]

    def err(h):
        return ((h.double() - h64).abs() / h64.abs().clamp(min=1)).max().item()

    h_loop, _, _ = run(mlstm_recurrent, args32, None)
    for name, form in FORMS.items():
        h, s, g = run(form, args32, None)
        assert all(torch.isfinite(t).all() for t in (h, *s, *g)), name
        assert err(h) <= max(2 * err(h_loop), 1e-5), f"{name}: {err(h):.2e} vs loop {err(h_loop):.2e}"
        assert_close(s.m, s64.m.float(), what=f"{name}: stabiliser m")


def test_bad_inputs():
    q, k, v, log_i, log_f, *_ = inputs(5, torch.float32)
    with pytest.raises(InputError, match="log_i"):
        mlstm_chunk(q, k, v, log_i[..., :4], log_f)
    with pytest.raises(InputError, match="state"):
        mlstm_chunk(q, k, v, log_i, log_f, state=(q,))
    with pytest.raises(InputError, match="chunk_size"):
        mlstm_chunk(q, k, v, log_i, log_f, chunk_size=0)
