"""The selective scan's own edges: the fused kernel's gradients (gradcheck), its independence of the
thread count, its memory (no (B, T, E, N) tensor, forward or backward), strided inputs, reduced
precision, saturating decays, the fallback without the compiled library, and bad arguments. The
shared harness (tests/ops/test_families.py) holds every form to the loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnnkit.errors import InputError
from rnnkit.ops import _native
from rnnkit.ops.selective_scan import resolve_mode, selective_scan, selective_scan_recurrent
from tests.helpers import LargestTensor, assert_close, saved_numel, under_threads

FUSED = _native.available()
needs_fused = pytest.mark.skipif(not FUSED, reason=f"no compiled kernel: {_native.unavailable_reason()}")


def _inputs(B, T, E, N, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale).to(dtype)

    return {"delta": randn(B, T, E, scale=2.0), "Bm": randn(B, T, N), "Cm": randn(B, T, N), "u": randn(B, T, E),
            "A": -torch.exp(randn(E, N, scale=0.5)), "h0": randn(B, E, N), "D": randn(E), "z": randn(B, T, E),
            "delta_bias": randn(E) - 1.0}


def _run(args, mode, lengths=None, steps_per_block=None, delta_softplus=True):
    """The scan of ``args`` (delta raw: the step size is softplus(delta + delta_bias) by default)."""
    a = dict(args)
    return selective_scan(a.pop("delta"), a.pop("Bm"), a.pop("Cm"), a.pop("u"), a.pop("A"), a.pop("h0"), **a,
                          delta_softplus=delta_softplus, lengths=lengths, mode=mode, steps_per_block=steps_per_block)


@needs_fused
@pytest.mark.parametrize("N", [3, 8, 16], ids=["N3", "N8", "N16"])
def test_gradcheck(N):
    """Every gradient of the fused form (u, delta, A, B, C, h0, D, z, delta_bias) against finite
    differences in fp64, with padding and several checkpoint chunks, with and without the softplus."""
    lengths = torch.tensor([9, 6])
    for softplus in (True, False):
        args = _inputs(2, 9, 5, N)
        if not softplus:  # positive step sizes, as the softplus would give
            args["delta"], args["delta_bias"] = args["delta"].abs() * 0.3, args["delta_bias"].abs() * 0.1
        args = {k: v.requires_grad_() for k, v in args.items()}
        names = list(args)

        def fn(*tensors):
            return _run(dict(zip(names, tensors)), "fused", lengths, steps_per_block=4, delta_softplus=softplus)

        assert torch.autograd.gradcheck(fn, tuple(args.values()), eps=1e-6, atol=1e-7, rtol=1e-5)


@needs_fused
@pytest.mark.parametrize("shape", [(1, 70, 264, 16), (3, 65, 24, 5)], ids=["B1-N16", "B3-N5"])
def test_threads_give_the_same_bits(shape):
    """Units of work (batch row, channel range) depend on the shape only: 1 and 2 threads agree
    bitwise in the outputs and every gradient, also at B = 1 where channels are split."""
    B, T, E, N = shape
    if B == 1:
        assert _native.channel_parts(B, E, torch.float32, partial_width=N) > 1  # the split is exercised
    args = _inputs(B, T, E, N, torch.float32)
    gy, gh = torch.randn(B, T, E), torch.randn(B, E, N)
    lengths = torch.tensor([T] + [T - 7 * i for i in range(1, B)])

    def run():
        leaves = {k: v.clone().requires_grad_() for k, v in args.items()}
        y, h = _run(leaves, "fused", lengths)
        torch.autograd.backward([y, h], [gy, gh])
        return [y.detach(), h.detach()] + [v.grad for v in leaves.values()]

    results = under_threads(run)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@needs_fused
def test_never_forms_the_expanded_state():
    """Forward and backward of the fused form: no tensor near (B, T, E, N) is created (the largest
    are (B, T, E)-sized: the inputs, gradients, and the per-channel-range partial sums of dB and dC),
    and autograd keeps the (B, T, E)-sized inputs and one (B, E, N) checkpoint per chunk of 64 steps."""
    B, T, E, N = 2, 512, 64, 16
    args = {k: v.requires_grad_() for k, v in _inputs(B, T, E, N, torch.float32).items()}
    full = B * T * E * N
    with LargestTensor() as probe:
        (y, h), saved = saved_numel(lambda: _run(args, "fused"))
        (y.square().sum() + h.sum()).backward()
    assert probe.largest <= B * T * E, (probe.largest, full)
    inputs = sum(v.numel() for v in args.values())
    checkpoints = B * (T // 64) * N * E
    assert saved <= inputs + checkpoints, (saved, inputs, checkpoints)
    assert checkpoints * 32 <= full


@needs_fused
def test_strided_inputs_are_read_in_place():
    """Views with a contiguous last dim (the halves of a projection, columns of another) and strided
    lengths give the result of contiguous copies."""
    B, T, E, N = 2, 30, 20, 6
    args = _inputs(B, T, E, N, torch.float32)
    wide = torch.cat([args["z"], args["u"]], -1)  # (B, T, 2E): z and u as halves
    cols = torch.cat([torch.randn(B, T, 3), args["Bm"], args["Cm"]], -1)  # B and C as columns
    views = dict(args, z=wide[..., :E], u=wide[..., E:], Bm=cols[..., 3:3 + N], Cm=cols[..., 3 + N:])
    assert not views["u"].is_contiguous() and not views["Bm"].is_contiguous()
    lengths = torch.tensor([30, 0, 17, 0])[::2]  # a strided view too
    for got, want in zip(_run(views, "fused", lengths), _run(args, "fused", lengths.clone())):
        assert torch.equal(got, want)


@needs_fused
def test_bf16_is_computed_in_fp32():
    args = _inputs(2, 40, 8, 4, torch.bfloat16)
    y, h = _run(args, "fused")
    assert y.dtype == h.dtype == torch.bfloat16
    y_ref, h_ref = _run({k: v.double() for k, v in args.items()}, "recurrent")
    assert_close(y, y_ref.to(torch.bfloat16), dtype=torch.bfloat16)
    assert_close(h, h_ref.to(torch.bfloat16), dtype=torch.bfloat16)


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_saturating_decays(dtype):
    """delta A far below the smallest exponent (decay exactly 0: the state is only the new input),
    delta = 0 (decay exactly 1) and delta A in between, as the loop computes them."""
    args = _inputs(2, 20, 6, 3, dtype)
    args["A"] = torch.tensor([[-1e4, -1.0, -1e-3]] * 6, dtype=dtype)
    args["delta"] = args["delta"].abs()
    args["delta"][:, :5] = 0
    args["delta_bias"] = torch.zeros(6, dtype=dtype)
    y, h = _run(args, "fused", delta_softplus=False)
    y_ref, h_ref = _run(args, "recurrent", delta_softplus=False)
    assert_close(y, y_ref, dtype=dtype)
    assert_close(h, h_ref, dtype=dtype)


def test_auto_and_fused_without_the_library(monkeypatch):
    monkeypatch.setattr(_native, "available", lambda: False)
    monkeypatch.setattr(_native, "unavailable_reason", lambda: "disabled for the test")
    assert resolve_mode("auto", torch.device("cpu")) == "chunk"
    args = _inputs(2, 20, 4, 3)
    with pytest.raises(InputError, match="mode: 'fused' expected the compiled CPU kernel"):
        _run(args, "fused")
    assert torch.equal(_run(args, "auto")[0], _run(args, "chunk")[0])


def test_auto_is_fused_on_the_cpu_where_available():
    assert resolve_mode("auto", torch.device("cpu")) == ("fused" if FUSED else "chunk")
    assert resolve_mode("auto", torch.device("meta")) == "chunk"  # stands for any accelerator
    with pytest.raises(InputError, match="'fused' is a CPU kernel"):
        resolve_mode("fused", torch.device("meta"))


@pytest.mark.parametrize(("change", "match"), [
    ({"D": torch.ones(5)}, r"D: expected shape \(E,\) = \(4,\), got \(5,\)"),
    ({"z": torch.ones(2, 20, 5)}, r"z: expected shape \(B, T, E\) = \(2, 20, 4\), got \(2, 20, 5\)"),
    ({"D": "1"}, "D: expected a torch.Tensor"),
    ({"delta_bias": torch.ones(4, 1)}, r"delta_bias: expected shape \(E,\) = \(4,\), got \(4, 1\)"),
])
def test_bad_skip_and_gate(change, match):
    args = dict(_inputs(2, 20, 4, 3), **change)
    for mode in ("recurrent", "chunk", "auto"):
        with pytest.raises(InputError, match=match):
            _run(args, mode)


def test_bad_softplus_flag():
    with pytest.raises(InputError, match="delta_softplus: expected a bool, got str 'yes'"):
        _run(_inputs(2, 20, 4, 3), "auto", delta_softplus="yes")


def test_extras_are_the_block_formula():
    """y = (h C + D u) SiLU(z) with the step size softplus(delta + delta_bias): the loop with them
    against the loop without them."""
    args = _inputs(2, 12, 4, 3)
    y, h = _run(args, "recurrent")
    plain = {k: v for k, v in args.items() if k not in ("D", "z", "delta_bias")}
    plain["delta"] = F.softplus(args["delta"] + args["delta_bias"])
    y0, h0 = _run(plain, "recurrent", delta_softplus=False)
    assert torch.equal(h, h0)
    assert_close(y, (y0 + args["D"] * args["u"]) * F.silu(args["z"]))
    assert_close(selective_scan_recurrent(*(plain[k] for k in ("delta", "Bm", "Cm", "u", "A", "h0")))[0], y0)
