"""The fused pieces of the multi-head and diagonal layers compute the formulas they replace.

Each is checked against the formula written with plain PyTorch ops, in fp64, in values and in the
gradients autograd takes through the formula (the contract suite then holds the layers themselves
to their recurrent definitions, gradcheck included)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rnnkit
from rnnkit.layers._multihead import HeadNorm
from rnnkit.layers.rglru import _GatedInput
from tests.helpers import assert_close


def grads(outputs, inputs, weights):
    return torch.autograd.grad(sum((o * w).sum() for o, w in zip(outputs, weights)), inputs)


def compare(fused, formula, inputs, what):
    """Values and input gradients of ``fused(*inputs)`` against ``formula(*inputs)``."""
    gen = torch.Generator().manual_seed(1)
    expected, actual = formula(*inputs), fused(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    actual = actual if isinstance(actual, tuple) else (actual,)
    weights = [torch.randn(e.shape, generator=gen, dtype=e.dtype) for e in expected]
    for a, e in zip(actual, expected):
        assert_close(a, e, what=f"{what} value")
    for a, e in zip(grads(actual, inputs, weights), grads(expected, inputs, weights)):
        assert_close(a, e, kind="grad", what=f"{what} gradient")


@pytest.mark.parametrize("r_bias", [0.0, -40.0])  # -40: r ~ 4e-18, a = 1 up to rounding
def test_rglru_gated_input_matches_its_formula(r_bias):
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(3, 5, 2, 4, generator=gen, dtype=torch.float64)
    pre[..., 0, :] += r_bias
    rates = torch.sigmoid(pre).requires_grad_()
    x = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    scale = (-8 * F.softplus(torch.randn(4, generator=gen, dtype=torch.float64))).requires_grad_()

    def formula(rates, x, scale):
        log_a = rates[..., 0, :] * scale
        return torch.exp(log_a), torch.sqrt(-torch.expm1(2 * log_a)) * (rates[..., 1, :] * x)

    compare(_GatedInput.apply, formula, (rates, x, scale), "rglru gated input")


def test_rglru_takes_the_same_values_with_and_without_gradients():
    torch.manual_seed(0)
    layer = rnnkit.layers.build("rglru", d_model=6, num_heads=2).double()
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        plain = layer.coefficients(x)
    fused = layer.coefficients(x.requires_grad_())
    for p, f in zip(plain, fused):
        assert_close(f, p, what="rglru coefficients")


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("gate", [None, "first", "after"])
def test_head_norm_matches_its_formula(kind, heads, gate):
    torch.manual_seed(0)
    norm = HeadNorm(heads, 4, kind=kind, eps=1e-5, gate_first=gate == "first").double()
    with torch.no_grad():
        norm.weight.normal_()
        if norm.bias is not None:
            norm.bias.normal_()
    y = torch.randn(2, 5, heads * 4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 5, heads * 4, dtype=torch.float64, requires_grad=True)
    params = [norm.weight] + ([norm.bias] if norm.bias is not None else [])

    def formula(y, *rest):
        z, params = (rest[0], rest[1:]) if gate else (None, rest)
        if gate == "first":
            y = y * F.silu(z)
        h = y.reshape(2, 5, heads, 4)
        if kind == "layer":
            h = h - h.mean(-1, keepdim=True)
        out = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(2, 5, -1) * params[0]
        out = out + params[1] if len(params) > 1 else out
        return out * F.silu(z) if gate == "after" else out

    inputs = (y, z, *params) if gate else (y, *params)
    compare(lambda y, *rest: norm(y, rest[0] if gate else None), formula, inputs, f"HeadNorm {kind}")
