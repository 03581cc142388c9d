"""``rnnkit.ops.linear_scan``: every form == the plain loop, values and gradients, edge cases, fallback.

Ids spell the case, e.g. ``chunk-B2-T65-S(3, 2)-complex64``.
"""

from __future__ import annotations

import math

import platform

import pytest
import torch

import rnnkit
from rnnkit.errors import InputError
from rnnkit.ops import _native, _workspace, linear_scan, linear_scan_log, linear_scan_recurrent
from rnnkit.ops.scan import resolve_mode
from tests.helpers import assert_close

FUSED = _native.available()
NO_FUSED = f"fused kernel unavailable: {_native.unavailable_reason()}"
FORMS = ["parallel", "chunk", pytest.param("fused", marks=pytest.mark.skipif(not FUSED, reason=NO_FUSED))]
DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)
#: Tolerance-table row for each dtype (complex compares like its real counterpart).
REAL = {torch.float32: torch.float32, torch.float64: torch.float64,
        torch.complex64: torch.float32, torch.complex128: torch.float64}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _inputs(B, T, S, dtype, seed=0, low=0.0, high=1.0):
    """Decays with |a| in [low, high) (random phase when complex), inputs, and an initial state."""
    g = torch.Generator().manual_seed(seed)
    real = REAL[dtype]
    mag = low + (high - low) * torch.rand(B, T, *S, generator=g, dtype=real)
    if dtype.is_complex:
        phase = 2 * math.pi * torch.rand(B, T, *S, generator=g, dtype=real)
        a = torch.polar(mag, phase)
        b = torch.complex(torch.randn(B, T, *S, generator=g, dtype=real), torch.randn(B, T, *S, generator=g, dtype=real))
        h0 = torch.complex(torch.randn(B, *S, generator=g, dtype=real), torch.randn(B, *S, generator=g, dtype=real))
    else:
        a = mag * torch.where(torch.rand(B, T, *S, generator=g, dtype=real) < 0.2, -1.0, 1.0)  # some negative
        b = torch.randn(B, T, *S, generator=g, dtype=real)
        h0 = torch.randn(B, *S, generator=g, dtype=real)
    return a, b, h0


def _run(mode, a, b, h0, lengths=None, chunk_size=64):
    """``h`` and the gradients of a random loss touching every step w.r.t. a, b and h0."""
    a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    h0 = None if h0 is None else h0.detach().clone().requires_grad_()
    if mode == "recurrent":
        h = linear_scan_recurrent(a, b, h0, lengths)
    else:
        h = linear_scan(a, b, h0, lengths=lengths, mode=mode, chunk_size=chunk_size)
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=REAL[h.dtype]).to(h.dtype)
    loss = (h * w).real.sum() if h.is_complex() else (h * w).sum()
    grads = torch.autograd.grad(loss, [a, b] + ([h0] if h0 is not None else []))
    return h.detach(), grads


def _compare(mode, a, b, h0, lengths=None, chunk_size=64, what=""):
    ref_h, ref_g = _run("recurrent", a, b, h0, lengths)
    h, g = _run(mode, a, b, h0, lengths, chunk_size)
    dt = REAL[a.dtype]
    assert_close(torch.view_as_real(h) if h.is_complex() else h,
                 torch.view_as_real(ref_h) if ref_h.is_complex() else ref_h, dtype=dt, what=f"{mode} {what}: h")
    for name, x, y in zip(("a", "b", "h0"), g, ref_g):
        x = torch.view_as_real(x) if x.is_complex() else x
        y = torch.view_as_real(y) if y.is_complex() else y
        assert_close(x, y, dtype=dt, kind="grad", what=f"{mode} {what}: dL/d{name}")


CASES = [(B, T, S) for B, T, S in ((1, 1, (3,)), (2, 2, (5,)), (2, 63, (3,)), (3, 64, (4,)), (2, 65, (3, 2)), (1, 200, (7,)))]


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("shape", CASES, ids=lambda c: f"B{c[0]}-T{c[1]}-S{c[2]}")
@pytest.mark.parametrize("mode", FORMS)
def test_forms_equal_loop(mode, shape, dtype):
    B, T, S = shape
    a, b, h0 = _inputs(B, T, S, dtype)
    _compare(mode, a, b, h0, what=f"B{B}-T{T}")
    _compare(mode, a, b, None, what=f"B{B}-T{T} h0=None")


@pytest.mark.parametrize("chunk_size", (1, 7, 64, 1000))
@pytest.mark.parametrize("dtype", (torch.float64, torch.complex128), ids=_name)
def test_chunk_sizes(chunk_size, dtype):
    a, b, h0 = _inputs(2, 130, (3,), dtype)
    _compare("chunk", a, b, h0, chunk_size=chunk_size, what=f"chunk_size={chunk_size}")


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("mode", FORMS)
def test_lengths_freeze_state_and_ignore_padding(mode, dtype):
    T, lengths = 70, torch.tensor([70, 33, 1])
    a, b, h0 = _inputs(3, T, (4,), dtype)
    _compare(mode, a, b, h0, lengths=lengths, what="padded")
    pad = torch.arange(T)[None, :, None] >= lengths[:, None, None]
    dirty_a, dirty_b = a.masked_fill(pad, math.nan), b.masked_fill(pad, math.inf)
    clean = linear_scan(a, b, h0, lengths=lengths, mode=mode)
    dirty = linear_scan(dirty_a, dirty_b, h0, lengths=lengths, mode=mode)
    assert torch.equal(dirty, clean), "NaN/Inf in padding changed h"
    for i, L in enumerate(lengths.tolist()):
        alone = linear_scan(a[i : i + 1, :L], b[i : i + 1, :L], h0[i : i + 1], mode=mode)
        real = torch.view_as_real if dtype.is_complex else (lambda x: x)
        # Frozen after the last valid step (up to the association order of the parallel form).
        assert_close(real(clean[i, L - 1 :]), real(clean[i, L - 1 : L]).expand_as(real(clean[i, L - 1 :])),
                     dtype=REAL[dtype], what=f"sequence {i}: state past its length")
        assert_close(real(clean[i, :L]), real(alone[0]), dtype=REAL[dtype], what=f"sequence {i} padded vs alone")
    # Gradients stay finite (and zero) at the padding even though it holds NaN/Inf.
    a_ = dirty_a.clone().requires_grad_()
    b_ = dirty_b.clone().requires_grad_()
    h = linear_scan(a_, b_, h0, lengths=lengths, mode=mode)
    (h.abs() if dtype.is_complex else h).sum().backward()
    for g in (a_.grad, b_.grad):
        assert torch.isfinite(torch.view_as_real(g) if g.is_complex() else g).all()
        assert (g[pad.expand_as(g)] == 0).all()


@pytest.mark.parametrize("dtype", (torch.float64, torch.complex128), ids=_name)
@pytest.mark.parametrize("mode", FORMS)
def test_gradcheck(mode, dtype):
    a, b, h0 = _inputs(2, 9, (3,), dtype)
    lengths = torch.tensor([9, 5])

    def fn(a, b, h0):
        return linear_scan(a, b, h0, lengths=lengths, mode=mode, chunk_size=4)

    args = [t.clone().requires_grad_() for t in (a, b, h0)]
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("mode", FORMS)
def test_double_backward_gradgradcheck(mode):
    """The backward is itself made of differentiable scans, so second derivatives work too."""
    a, b, h0 = _inputs(2, 6, (2,), torch.float64)
    args = [t.clone().requires_grad_() for t in (a, b, h0)]
    assert torch.autograd.gradgradcheck(lambda a, b, h0: linear_scan(a, b, h0, mode=mode, chunk_size=4), args)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=_name)
@pytest.mark.parametrize("mode", FORMS)
@pytest.mark.parametrize("regime", ("zero", "tiny", "near-one", "one"))
def test_extreme_decays(mode, dtype, regime):
    """a = 0 exactly, a ~ 1e-30 (products underflow), a = 1 - 1e-7 and a = 1 (no decay) over T = 3000."""
    g = torch.Generator().manual_seed(3)
    B, T, S = 2, 3000, (3,)
    a = {"zero": torch.zeros(B, T, *S, dtype=dtype),
         "tiny": torch.full((B, T, *S), 1e-30, dtype=dtype),
         "near-one": 1 - 1e-7 * torch.rand(B, T, *S, generator=g, dtype=dtype),
         "one": torch.ones(B, T, *S, dtype=dtype)}[regime]
    # Small inputs keep the sums of "one" O(1) so the fp32 tolerance is meaningful.
    b = 0.02 * torch.randn(B, T, *S, generator=g, dtype=dtype)
    h0 = torch.randn(B, *S, generator=g, dtype=dtype)
    if dtype == torch.float64:
        _compare(mode, a, b, h0, what=regime)
    else:
        _assert_no_worse_than_loop(mode, a, b, h0)


def _assert_no_worse_than_loop(mode, a, b, h0, refs=None):
    """fp32 ``mode`` vs an fp64 reference: its error (values and gradients) within 4x the fp32 loop's."""
    (ref_h, ref_g), (loop_h, loop_g) = refs or _loop_references(a, b, h0)
    h, g = _run(mode, a, b, h0)
    for name, x, loop, ref in zip(("h", "dL/da", "dL/db", "dL/dh0"), (h, *g), (loop_h, *loop_g), (ref_h, *ref_g)):
        scale = ref.abs().max().item()
        err, loop_err = (x.double() - ref).abs().max().item(), (loop.double() - ref).abs().max().item()
        assert err <= 4 * loop_err + 1e-6 * scale, f"{mode} {name}: max error {err:.3e} vs the fp32 loop's {loop_err:.3e}"


def _loop_references(a, b, h0):
    """The fp64 loop (the truth) and the fp32 loop (the rounding to match), values and gradients."""
    return _run("recurrent", a.double(), b.double(), h0.double()), _run("recurrent", a, b, h0)


@pytest.fixture(scope="module")
def long_case():
    inputs = _inputs(1, 10000, (4,), torch.float32, low=0.99, high=1.0)
    return inputs, _loop_references(*inputs)


@pytest.mark.parametrize("mode", FORMS)
def test_long_sequence_fp32(mode, long_case):
    """T = 10000 with decays near 1: no drift beyond the loop's own rounding."""
    (a, b, h0), refs = long_case
    _assert_no_worse_than_loop(mode, a, b, h0, refs)


def test_state_dims_any_rank():
    """(B, T) scalars per sequence and (B, T, D, N) states give the same as the flattened layout."""
    a, b, h0 = _inputs(2, 10, (3, 4), torch.float64)
    h = linear_scan(a, b, h0, mode="chunk", chunk_size=3)
    flat = linear_scan(a.reshape(2, 10, 12), b.reshape(2, 10, 12), h0.reshape(2, 12), mode="chunk", chunk_size=3)
    assert torch.equal(h, flat.view(2, 10, 3, 4))
    a2, b2, h2 = _inputs(2, 10, (), torch.float64)
    assert_close(linear_scan(a2, b2, h2, mode="parallel"), linear_scan_recurrent(a2, b2, h2))


def test_non_contiguous_and_conj_views():
    a, b, h0 = _inputs(2, 12, (3,), torch.complex128)
    at, bt = a.transpose(0, 1).contiguous().transpose(0, 1), b.conj()  # strided a, lazily conjugated b
    ref = linear_scan_recurrent(at, bt.resolve_conj(), h0)
    for mode in ("parallel", "chunk") + (("fused",) if FUSED else ()):
        assert_close(torch.view_as_real(linear_scan(at, bt, h0, mode=mode)), torch.view_as_real(ref))


# ----------------------------------------------------------------------------------- log space
@pytest.mark.parametrize("chunk_size", (None, 7))
@pytest.mark.parametrize("with_h0", (False, True))
def test_log_space_form(with_h0, chunk_size):
    B, T, S = 3, 40, (2,)
    g = torch.Generator().manual_seed(5)
    a = torch.rand(B, T, *S, generator=g, dtype=torch.float64) * 0.98 + 0.01
    b = torch.rand(B, T, *S, generator=g, dtype=torch.float64) + 0.1
    h0 = torch.randn(B, *S, generator=g, dtype=torch.float64) if with_h0 else None  # any sign
    lengths = torch.tensor([40, 17, 1])
    ref = linear_scan_recurrent(a, b, h0, lengths)
    assert_close(linear_scan_log(a.log(), b.log(), h0, lengths=lengths, block_size=chunk_size), ref)
    args = [a.log().requires_grad_(), b.log().requires_grad_()] + ([h0.requires_grad_()] if with_h0 else [])
    assert torch.autograd.gradcheck(lambda *x: linear_scan_log(*x, lengths=lengths, block_size=chunk_size), args)
    # Padding holding NaN/Inf changes nothing, gradients included.
    pad = torch.arange(T)[None, :, None] >= lengths[:, None, None]
    la, lb = a.log().masked_fill(pad, math.nan).requires_grad_(), b.log().masked_fill(pad, math.inf).requires_grad_()
    h = linear_scan_log(la, lb, h0, lengths=lengths, block_size=chunk_size)
    assert torch.equal(h, linear_scan_log(a.log(), b.log(), h0, lengths=lengths, block_size=chunk_size))
    h.sum().backward()
    assert torch.isfinite(la.grad).all() and torch.isfinite(lb.grad).all()


def test_log_space_chunks_bound_fp32_error():
    """Over T = 2000 in fp32 the one-chunk form drifts by eps * |A_T|; 32-step chunks stay at the loop's error."""
    g = torch.Generator().manual_seed(6)
    a = torch.rand(2, 2000, 8, generator=g) * 0.5 + 0.25
    b = torch.rand(2, 2000, 8, generator=g) + 0.1
    ref = linear_scan_recurrent(a.double(), b.double())
    loop_err = (linear_scan_recurrent(a, b).double() - ref).abs().max().item()
    whole = (linear_scan_log(a.log(), b.log()).double() - ref).abs().max().item()
    chunked = (linear_scan_log(a.log(), b.log(), block_size=32).double() - ref).abs().max().item()
    assert chunked <= 10 * loop_err + 1e-6, f"chunked log-space error {chunked:.3e} vs loop {loop_err:.3e}"
    assert whole > chunked, f"one chunk {whole:.3e} should drift more than 32-step chunks {chunked:.3e}"


def test_log_space_rejects_complex():
    z = torch.zeros(1, 2, 3, dtype=torch.complex64)
    with pytest.raises(InputError, match="expected a real tensor"):
        linear_scan_log(z, z)


# ----------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("label", "call", "match"),
    [
        ("shape mismatch", lambda: linear_scan(torch.ones(2, 3, 4), torch.ones(2, 3, 5)), "b: expected the shape"),
        ("broadcast a", lambda: linear_scan(torch.ones(1, 3, 4), torch.ones(2, 3, 4)), "b: expected the shape"),
        ("dtype mismatch", lambda: linear_scan(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.float64)), "b: expected the dtype"),
        ("integer", lambda: linear_scan(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)), "a: expected a floating"),
        ("rank 1", lambda: linear_scan(torch.ones(3), torch.ones(3)), "a: expected a tensor of shape"),
        ("T = 0", lambda: linear_scan(torch.ones(2, 0, 3), torch.ones(2, 0, 3)), "T >= 1"),
        ("h0 shape", lambda: linear_scan(torch.ones(2, 3, 4), torch.ones(2, 3, 4), torch.ones(2, 3)), "h0: expected shape"),
        ("h0 dtype", lambda: linear_scan(torch.ones(2, 3, 4), torch.ones(2, 3, 4), torch.ones(2, 4, dtype=torch.float64)), "h0: expected the dtype"),
        ("mode", lambda: linear_scan(torch.ones(2, 3), torch.ones(2, 3), mode="fast"), "mode: expected one of"),
        ("chunk_size", lambda: linear_scan(torch.ones(2, 3), torch.ones(2, 3), chunk_size=0), "chunk_size: expected"),
        ("lengths range", lambda: linear_scan(torch.ones(2, 3), torch.ones(2, 3), lengths=torch.tensor([4, 1])), "lengths: expected"),
        ("lengths shape", lambda: linear_scan(torch.ones(2, 3), torch.ones(2, 3), lengths=torch.tensor([3])), "lengths: expected"),
        ("not a tensor", lambda: linear_scan([[1.0]], torch.ones(1, 1)), "a: expected a torch.Tensor"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_input(label, call, match):
    with pytest.raises(InputError, match=match):
        call()


@pytest.mark.skipif(not FUSED, reason=NO_FUSED)
def test_fused_rejects_unsupported_dtype():
    with pytest.raises(InputError, match="mode 'fused' expected a dtype"):
        linear_scan(torch.ones(1, 2, 3, dtype=torch.bfloat16), torch.ones(1, 2, 3, dtype=torch.bfloat16), mode="fused")
    h = linear_scan(torch.ones(1, 2, 3, dtype=torch.bfloat16), torch.ones(1, 2, 3, dtype=torch.bfloat16))
    assert torch.equal(h[0, :, 0], torch.tensor([1.0, 2.0], dtype=torch.bfloat16)), "auto must fall back for bf16"


# ----------------------------------------------------------------------------------- compile and fallback
def test_auto_picks_fused_on_cpu_when_available():
    expected = "fused" if FUSED else "chunk"
    assert resolve_mode("auto", torch.device("cpu"), torch.float32) == expected
    assert resolve_mode("auto", torch.device("cpu"), torch.bfloat16) == "chunk"
    assert resolve_mode("auto", torch.device("meta"), torch.float32) == "chunk"  # stands for any accelerator
    a, b, h0 = _inputs(2, 20, (3,), torch.float32)
    assert torch.equal(linear_scan(a, b, h0), linear_scan(a, b, h0, mode=expected))


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """A kernel loader that re-reads the environment, restored afterwards."""
    monkeypatch.setenv("RNNKIT_CACHE_DIR", str(tmp_path / "cache"))
    _native.reset()
    yield monkeypatch
    _native.reset()


def test_no_compile_env_falls_back(fresh_kernel):
    fresh_kernel.setenv("RNNKIT_NO_COMPILE", "1")
    assert not _native.available()
    assert "RNNKIT_NO_COMPILE" in _native.unavailable_reason()
    a, b, h0 = _inputs(2, 70, (3,), torch.float32)
    assert resolve_mode("auto", a.device, a.dtype) == "chunk"
    assert_close(linear_scan(a, b, h0), linear_scan_recurrent(a, b, h0))
    with pytest.raises(InputError, match="unavailable"):
        linear_scan(a, b, h0, mode="fused")


def test_broken_compiler_falls_back(fresh_kernel, tmp_path):
    """A compiler that fails is reported, not raised, and nothing half-written is left in the cache."""
    cxx = tmp_path / "broken-cxx"
    cxx.write_text("#!/bin/sh\necho 'broken-cxx: internal error' >&2\nexit 1\n")
    cxx.chmod(0o755)
    fresh_kernel.setenv("RNNKIT_CXX", str(cxx))
    fresh_kernel.delenv("RNNKIT_NO_COMPILE", raising=False)
    assert not _native.available()
    assert "broken-cxx: internal error" in _native.unavailable_reason()
    assert list((tmp_path / "cache").iterdir()) == []
    a, b, _ = _inputs(1, 5, (2,), torch.float64)
    assert_close(linear_scan(a, b), linear_scan_recurrent(a, b))


@pytest.mark.skipif(_native._compiler() is None, reason="no C++ compiler on this machine")
def test_compile_into_fresh_cache(fresh_kernel, tmp_path):
    fresh_kernel.delenv("RNNKIT_NO_COMPILE", raising=False)
    assert _native.available(), _native.unavailable_reason()
    built = list((tmp_path / "cache").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so", built
    a, b, h0 = _inputs(2, 33, (5,), torch.complex64)
    assert_close(torch.view_as_real(linear_scan(a, b, h0, mode="fused")),
                 torch.view_as_real(linear_scan_recurrent(a, b, h0)), dtype=torch.float32)


@pytest.mark.skipif(not FUSED, reason=NO_FUSED)
@pytest.mark.parametrize("shape", [(1, 300, 256), (3, 400, 100), (5, 50, 1)], ids=lambda s: "B{}-T{}-S{}".format(*s))
def test_fused_threads_split_channels_identically(shape):
    """Threads split the B x S channels (rows, or s-blocks of one row when B is small): same bits as 1 thread."""
    B, T, S = shape
    a, b, h0 = _inputs(B, T, (S,), torch.float32)
    g = torch.randn(B, T, S)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            a_, b_, h0_ = (t.clone().requires_grad_() for t in (a, b, h0))
            h = linear_scan(a_, b_, h0_, mode="fused")
            h.backward(g)
            results.append([h.detach(), a_.grad, b_.grad, h0_.grad])
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results):
        assert torch.equal(one, two)
    assert_close(results[0][0], linear_scan_recurrent(a, b, h0))


@pytest.mark.skipif(_native._compiler() is None, reason="no C++ compiler on this machine")
def test_march_switch_builds_for_the_named_target(fresh_kernel, tmp_path):
    """RNNKIT_MARCH reaches the compiler, keys the cache apart from the native build, and a malformed
    value is reported rather than passed to the compiler's command line."""
    fresh_kernel.delenv("RNNKIT_NO_COMPILE", raising=False)
    seen = []
    real = _native._run_compiler

    def spy(cxx, flags, out):
        seen.append(flags)
        return real(cxx, flags, out)

    fresh_kernel.setattr(_native, "_run_compiler", spy)
    fresh_kernel.setenv("RNNKIT_MARCH", "x86-64" if platform.machine() in ("x86_64", "AMD64") else "native")
    assert _native.available(), _native.unavailable_reason()
    assert f"-march={_native.target_arch()}" in seen[0]
    a, b, h0 = _inputs(2, 33, (5,), torch.float32)
    assert_close(linear_scan(a, b, h0, mode="fused"), linear_scan_recurrent(a, b, h0))
    _native.reset()
    fresh_kernel.delenv("RNNKIT_MARCH")
    assert _native.available()
    if platform.machine() in ("x86_64", "AMD64"):
        assert len(list((tmp_path / "cache").glob("*.so"))) == 2  # one library per target
    _native.reset()
    fresh_kernel.setenv("RNNKIT_MARCH", "native -o /tmp/x")
    assert not _native.available()
    assert "RNNKIT_MARCH" in _native.unavailable_reason()


def test_no_compiler_on_path_falls_back(fresh_kernel, tmp_path):
    for var in ("RNNKIT_NO_COMPILE", "RNNKIT_CXX", "CXX"):
        fresh_kernel.delenv(var, raising=False)
    fresh_kernel.setenv("PATH", str(tmp_path))  # an empty directory: no g++, c++ or clang++
    assert not _native.available()
    assert "no C++ compiler" in _native.unavailable_reason()
    assert "fused" not in rnnkit.layers.build("mingru", d_model=3).modes  # layers drop the mode


@pytest.mark.skipif(not FUSED, reason=NO_FUSED)
def test_output_pool_reuses_only_released_buffers(monkeypatch):
    """Large fused outputs are recycled once nothing else references their storage."""
    monkeypatch.setattr(_workspace, "HUGE_PAGE_MIN_BYTES", 1 << 10)  # pool small tensors for the test
    monkeypatch.setattr(_workspace, "POOL", _workspace.BufferPool(1 << 20))
    a, b, h0 = _inputs(2, 64, (8,), torch.float32)  # 4 KiB outputs
    ref = linear_scan_recurrent(a, b, h0)
    h1 = linear_scan(a, b, h0, mode="fused")
    h2 = linear_scan(a, b, h0, mode="fused")
    assert h1.data_ptr() != h2.data_ptr(), "a buffer still held must not be handed out again"
    first = h1.data_ptr()
    view = h1[1]
    del h1
    h3 = linear_scan(a, b, h0, mode="fused")
    assert h3.data_ptr() != first, "a view keeps its storage alive"
    del view
    h4 = linear_scan(0.5 * a, b, h0, mode="fused")
    assert h4.data_ptr() == first, "a released buffer is reused"
    for h in (h2, h3):
        assert_close(h, ref)
    assert_close(h4, linear_scan_recurrent(0.5 * a, b, h0))
    # Gradients and the saved output come from the pool too, and stay correct across steps.
    for _ in range(3):
        a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
        linear_scan(a_, b_, h0, mode="fused").sum().backward()
        ref_a, ref_b = a.clone().requires_grad_(), b.clone().requires_grad_()
        linear_scan_recurrent(ref_a, ref_b, h0).sum().backward()
        assert_close(a_.grad, ref_a.grad, kind="grad")
        assert_close(b_.grad, ref_b.grad, kind="grad")
    held = sum(t.numel() * t.element_size() for t in _workspace.POOL.buffers)
    assert held <= 1 << 20
