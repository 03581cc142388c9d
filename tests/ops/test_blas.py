"""ChunkProducts: per-chunk batched products written into slices of a larger buffer, through MKL's
batch interface where this PyTorch build has it and through torch.bmm otherwise; both paths give
the same numbers for every operand layout the kernels use."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rnnkit.ops import _blas
from rnnkit.ops._blas import ChunkProducts
from rnnkit.ops.delta_rule import delta_rule_chunk

needs_mkl = pytest.mark.skipif(not _blas.available(), reason=f"no MKL batch interface: {_blas.unavailable_reason()}")


def _torch_only(monkeypatch):
    monkeypatch.setattr(ChunkProducts, "_blas_for", staticmethod(lambda *tensors: None))


def operands(dtype, a_transposed, b_shared, b_transposed, gen):
    G, N, m, k, p = 3, 4, 5, 6, 7
    a = torch.randn(G, N, k, m, dtype=dtype, generator=gen).transpose(-1, -2) if a_transposed else torch.randn(G, N, m, k, dtype=dtype, generator=gen)
    b_shape = (G, p, k) if b_transposed else (G, k, p)
    if not b_shared:
        b_shape = (G, N, *b_shape[1:])
    b = torch.randn(b_shape, dtype=dtype, generator=gen)
    if b_transposed:
        b = b.transpose(-1, -2)
    c = torch.randn(G, N, m, p, dtype=dtype, generator=gen)
    return a, b, c


@pytest.mark.parametrize("path", ["mkl", "torch"])
@pytest.mark.parametrize("alpha, beta", [(1.0, 0.0), (-1.0, 1.0), (0.5, -2.0)])
@pytest.mark.parametrize("layout", ["NN", "TN", "NT", "shared-B", "shared-B^T"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_into_slices(dtype, layout, alpha, beta, path, monkeypatch):
    if path == "mkl" and not _blas.available():
        pytest.skip(f"no MKL batch interface: {_blas.unavailable_reason()}")
    if path == "torch":
        _torch_only(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    a, b, c = operands(dtype, layout == "TN", layout.startswith("shared"), layout in ("NT", "shared-B^T"), gen)
    want = c.clone()
    products = ChunkProducts(a, b, c, alpha=alpha, beta=beta)
    assert (products.fn is not None) == (path == "mkl")
    for n in (2, 0, 3):
        b_n = b if b.dim() == 3 else b[:, n]
        want[:, n] = alpha * a[:, n] @ b_n + (beta * want[:, n] if beta else 0)
        products(n)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(c, want, rtol=tol, atol=tol)  # chunk 1 untouched: it is in `want` as it was


@needs_mkl
def test_beta_zero_ignores_nan_in_the_result():
    """beta = 0 must not read C: a NaN there (an uninitialised buffer) does not leak."""
    gen = torch.Generator().manual_seed(1)
    a, b, c = operands(torch.float32, False, True, False, gen)
    c.fill_(float("nan"))
    ChunkProducts(a, b, c)(1)
    assert torch.isfinite(c[:, 1]).all() and torch.isnan(c[:, 0]).all()


@pytest.mark.parametrize("path", ["mkl", "torch"])
def test_running_result(path, monkeypatch):
    """A 3-D result (the same matrices at every n: a running state) accumulates chunk by chunk."""
    if path == "mkl" and not _blas.available():
        pytest.skip(f"no MKL batch interface: {_blas.unavailable_reason()}")
    if path == "torch":
        _torch_only(monkeypatch)
    gen = torch.Generator().manual_seed(6)
    a, b, c = operands(torch.float64, True, False, False, gen)
    state = torch.randn(c.shape[0], *c.shape[2:], dtype=torch.float64, generator=gen)
    want = state.clone()
    products = ChunkProducts(a, b, state, alpha=-0.5, beta=1.0)
    for n in range(a.shape[1]):
        want = want - 0.5 * a[:, n] @ b[:, n]
        products(n)
    torch.testing.assert_close(state, want, rtol=1e-12, atol=1e-12)


def test_running_operand_read_at_call_time():
    """A shared operand updated in place between calls (the carried state) is read as it then is."""
    gen = torch.Generator().manual_seed(2)
    a, b, c = operands(torch.float32, False, True, False, gen)
    products = ChunkProducts(a, b, c)
    b.mul_(3)
    products(0)
    torch.testing.assert_close(c[:, 0], a[:, 0] @ b)


def test_dispatch_modes_see_the_products():
    """Under a TorchDispatchMode (here the FLOP counter the benchmarks use) the products run as torch
    ops, so that the mode sees them."""
    gen = torch.Generator().manual_seed(3)
    a, b, c = operands(torch.float32, False, True, False, gen)
    with FlopCounterMode(display=False) as counter:
        ChunkProducts(a, b, c)(0)
    G, _, m, k = a.shape
    assert counter.get_total_flops() == 2 * G * m * k * b.shape[-1]


def test_bad_arguments():
    gen = torch.Generator().manual_seed(4)
    a, b, c = operands(torch.float32, False, True, False, gen)
    with pytest.raises(ValueError, match="B: expected"):
        ChunkProducts(a, b[..., :-1, :], c)
    with pytest.raises(ValueError, match="C: expected"):
        ChunkProducts(a, b, c[:, :-1])  # one chunk fewer than A
    with pytest.raises(ValueError, match="at least one"):
        ChunkProducts(a[:, 0], b, c[:, 0])
    with pytest.raises(ValueError, match="A: expected torch.float32"):
        ChunkProducts(a.double(), b, c)
    products = ChunkProducts(a, b, c)
    for n in (-1, c.shape[1]):
        with pytest.raises(IndexError, match="chunk index"):
            products(n)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("RNNKIT_NO_BLAS", "1")
    _blas._reset_for_tests()
    try:
        assert not _blas.available()
        assert "RNNKIT_NO_BLAS" in _blas.unavailable_reason()
    finally:
        monkeypatch.delenv("RNNKIT_NO_BLAS")
        _blas._reset_for_tests()


@needs_mkl
@pytest.mark.parametrize("gated", [False, True])
def test_delta_rule_same_with_and_without_mkl(gated, monkeypatch):
    """The delta-rule kernel's carry loops give the same values and gradients on either path."""
    gen = torch.Generator().manual_seed(5)
    B, H, T, K = 2, 3, 200, 16
    base = [torch.randn(B, H, T, K, generator=gen) * K**-0.5,
            torch.nn.functional.normalize(torch.randn(B, H, T, K, generator=gen), dim=-1),
            torch.randn(B, H, T, K, generator=gen), torch.rand(B, H, T, generator=gen)]
    if gated:
        base.append(-torch.rand(B, H, T, generator=gen) * 0.1)

    def run():
        leaves = [t.clone().requires_grad_() for t in base]
        y, S = delta_rule_chunk(*leaves)
        (y.pow(2).sum() + S.pow(2).sum()).backward()
        return [y, S] + [t.grad for t in leaves]

    with_mkl = run()
    _torch_only(monkeypatch)
    for a, b in zip(with_mkl, run()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
