"""row_pass: the compiled fused row pass equals its PyTorch form for every combination of options
the chunk kernels use (and the ones they might), in place or not, with a broadcast input, and
falls back to PyTorch where the library or the layout does not serve."""

from __future__ import annotations

import itertools

import pytest
import torch

from rnnkit.ops import _native, _rows
from rnnkit.ops._rows import row_pass

G, N, C, D = 3, 4, 5, 7
needs_library = pytest.mark.skipif(not _native.available(), reason=f"no compiled kernel: {_native.unavailable_reason()}")


def reference(x, a=None, vec=None, scale=None, dot_with=None, col=False, weights=None, causal=False,
              dot_before_scale=False, out=None):
    """The formulas of the module docstring, written out in float64, element by element for the
    mask (``out``: the tensor accumulated into)."""
    x = x.double()
    u = x.clone()
    if vec is not None:
        v = vec.double() if vec.dim() == 1 else vec.double()[..., None, :]
        u = u + (v if a is None else a.double()[..., None] * v)
    t = u * (scale.double() if scale.shape == x.shape else scale.double()[..., None]) if scale is not None else u.clone()
    if causal:
        for i in range(x.shape[-2]):
            t[..., i, i + 1:] = 0
    dot = None
    if dot_with is not None:
        y = dot_with.double()
        y = y if y.shape == x.shape else (y if y.dim() == 1 else y[..., None, :])
        dot = ((u if dot_before_scale else t) * y).sum(-1)
    cols = (t * (1 if weights is None else weights.double()[..., None])).sum(-2) if col else None
    return (t if out is None else out.double() + t), dot, cols


OPTIONS = list(itertools.product([False, True], [None, "chunk", "shared"], [None, "row", "full"],
                                 [None, "row", "chunk", "shared"], [False, True], [False, True]))
FLAGS = [{}, {"causal": True}, {"dot_before_scale": True}, {"accumulate": True}]


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "-".join(f) or "plain")
@pytest.mark.parametrize("path", ["compiled", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("x_kind", ["fresh", "in-place", "broadcast"])
def test_matches_the_formulas(x_kind, dtype, path, flags, monkeypatch):
    if path == "compiled" and not _native.available():
        pytest.skip(f"no compiled kernel: {_native.unavailable_reason()}")
    if path == "torch":
        monkeypatch.setattr(_native, "library", lambda: None)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, dtype=dtype, generator=gen)

    tol = 2e-6 if dtype == torch.float32 else 1e-13
    for use_a, vec_kind, scale_kind, dot_kind, col, weighted in OPTIONS:
        if use_a and vec_kind is None:
            continue
        d = C if flags.get("causal") else D  # the mask is for a chunk's (C, C) scores
        x = rand().expand(G, N, C, d) if x_kind == "broadcast" else rand(G, N, C, d)
        kw = {
            "a": rand(G, N, C) if use_a else None,
            "vec": {None: None, "chunk": rand(G, N, d), "shared": rand(d)}[vec_kind],
            "scale": {None: None, "row": rand(G, N, C), "full": rand(G, N, C, d)}[scale_kind],
            "dot_with": {None: None, "row": rand(G, N, C, d), "chunk": rand(G, N, d), "shared": rand(d)}[dot_kind],
            "weights": rand(G, N, C) if weighted else None,
        }
        if flags.get("accumulate"):
            out = rand(G, N, C, d)
        else:
            out = x if x_kind == "in-place" else None
        want = reference(x, col=col, causal=flags.get("causal", False), out=out if flags.get("accumulate") else None,
                         dot_before_scale=flags.get("dot_before_scale", False), **kw)
        out, dot, cols = row_pass(x, C, out=out, col=col, **flags, **kw)
        for name, got, expected in zip(("out", "dot", "col"), (out, dot, cols), want):
            if expected is None:
                assert got is None, name
                continue
            scale_of = expected.abs().max().clamp(min=1)
            err = ((got.double() - expected).abs().max() / scale_of).item()
            assert got.shape == expected.shape and err <= tol, (name, use_a, vec_kind, scale_kind, dot_kind, col, weighted, err)


@needs_library
def test_no_write():
    """write=False stores nothing and still returns the dot products and chunk sums."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(G, N, C, D, dtype=torch.float64, generator=gen)
    w = torch.randn(G, N, C, dtype=torch.float64, generator=gen)
    before = x.clone()
    out, dot, cols = row_pass(x, C, write=False, dot_with=x, col=True, weights=w)
    assert out is None
    torch.testing.assert_close(dot, (x * x).sum(-1))
    torch.testing.assert_close(cols, (x * w[..., None]).sum(-2))
    assert torch.equal(x, before)


def test_strided_small_operands_and_unflattenable_input():
    """Per-row operands in any layout are taken (made contiguous); an x whose rows cannot be read
    in place (here a chunk-transposed view) goes through PyTorch with the same result."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(N, G, C, D, dtype=torch.float64, generator=gen).transpose(0, 1)
    scale = torch.randn(N, G, C, dtype=torch.float64, generator=gen).transpose(0, 1)
    y = torch.randn(G, N, C, D, dtype=torch.float64, generator=gen)
    out, dot, _ = row_pass(x, C, scale=scale, dot_with=y)
    t, want_dot, _ = reference(x, scale=scale, dot_with=y)
    torch.testing.assert_close(out, t)
    torch.testing.assert_close(dot, want_dot)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rows per chunk"):
        row_pass(torch.zeros(G, N, C, D), C + 1)
    with pytest.raises(ValueError, match="accumulate"):
        row_pass(torch.zeros(G, N, C, D), C, accumulate=True)
    with pytest.raises(ValueError, match="write=False"):
        row_pass(torch.zeros(G, N, C, D), C, write=False, out=torch.zeros(G, N, C, D))
    x = torch.zeros(G, N, C, D)
    for name, bad in (("a", torch.zeros(G, N, C + 1)), ("vec", torch.zeros(G, N, D + 1)),
                      ("scale", torch.zeros(G, N)), ("dot_with", torch.zeros(G, D)),
                      ("weights", torch.zeros(G * N * C)), ("out", torch.zeros(G, N, C, D - 1))):
        with pytest.raises(ValueError, match=f"{name}: expected shape"):
            row_pass(x, C, **{name: bad})


@needs_library
def test_single_thread_same_as_two():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 64, 32, 64, generator=gen)  # large enough to split across threads
    y = torch.randn(16, 64, 32, 64, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = row_pass(x, 32, dot_with=y, col=True)
        torch.set_num_threads(1)
        one = row_pass(x, 32, dot_with=y, col=True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(two, one):
        assert torch.equal(a, b)
