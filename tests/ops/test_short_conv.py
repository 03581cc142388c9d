"""The short convolution's own edges: the fused kernel's gradients (gradcheck), its independence of
the thread count, strided input, histories shorter than the kernel, and bad arguments. The shared
harness (tests/ops/test_families.py) holds every form to the loop."""

from __future__ import annotations

import pytest
import torch

from rnnkit.errors import InputError
from rnnkit.ops import _native, short_conv
from rnnkit.ops.short_conv import resolve_mode, short_conv_recurrent
from tests.helpers import assert_close, under_threads

FUSED = _native.available()
needs_fused = pytest.mark.skipif(not FUSED, reason=f"no compiled kernel: {_native.unavailable_reason()}")


def _inputs(B, T, C, W, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, weight, bias, state = (torch.randn(*s, dtype=torch.float64, generator=gen).to(dtype)
                              for s in ((B, T, C), (C, W), (C,), (B, C, W - 1)))
    return x, weight, bias, state


@needs_fused
@pytest.mark.parametrize("activation", ["identity", "silu"])
def test_gradcheck(activation):
    args = [t.requires_grad_() for t in _inputs(2, 6, 5, 3)]
    lengths = torch.tensor([6, 2])

    def fn(x, weight, bias, state):
        return short_conv(x, weight, bias, state, lengths=lengths, activation=activation, mode="fused")

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@needs_fused
@pytest.mark.parametrize("B", [1, 3])
def test_threads_give_the_same_bits(B):
    x, weight, bias, state = _inputs(B, 300, 70, 4, torch.float32)
    gy, gs = torch.randn(B, 300, 70), torch.randn(B, 70, 3)

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias, state)]
        y, hist = short_conv(*leaves, activation="silu", mode="fused")
        torch.autograd.backward([y, hist], [gy, gs])
        return [y.detach()] + [t.grad for t in leaves]

    results = under_threads(run)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@needs_fused
def test_strided_input_is_read_in_place():
    x, weight, bias, state = _inputs(2, 20, 9, 4, torch.float32)
    wide = torch.cat([x, torch.randn(2, 20, 9)], -1)[..., :9]  # the first half of a projection
    assert not wide.is_contiguous()
    for got, want in zip(short_conv(wide, weight, bias, state, mode="fused"), short_conv(x, weight, bias, state, mode="fused")):
        assert torch.equal(got, want)


@pytest.mark.parametrize("mode", ["parallel", "fused"])
def test_sequences_shorter_than_the_history(mode):
    """T < W - 1 and lengths < W - 1: the returned history mixes the old one with the new inputs."""
    if mode == "fused" and not FUSED:
        pytest.skip("no compiled kernel")
    x, weight, bias, state = _inputs(2, 2, 3, 5)
    lengths = torch.tensor([2, 1])
    y, hist = short_conv(x, weight, bias, state, lengths=lengths, mode=mode)
    y_ref, hist_ref = short_conv_recurrent(x, weight, bias, state, lengths)
    assert torch.equal(hist, hist_ref)
    assert_close(y[:, :1], y_ref[:, :1])


def test_auto_without_the_library(monkeypatch):
    assert resolve_mode("auto", torch.device("cpu")) == ("fused" if FUSED else "parallel")
    monkeypatch.setattr(_native, "available", lambda: False)
    monkeypatch.setattr(_native, "unavailable_reason", lambda: "disabled for the test")
    assert resolve_mode("auto", torch.device("cpu")) == "parallel"
    with pytest.raises(InputError, match="mode: 'fused' expected the compiled CPU kernel"):
        short_conv(*_inputs(1, 3, 2, 2), mode="fused")


@pytest.mark.parametrize(("args", "kwargs", "match"), [
    ((torch.ones(2, 3, 4), torch.ones(4, 1)), {}, r"weight: expected shape \(D, W\) = \(4, W\) with W >= 2"),
    ((torch.ones(2, 3, 4), torch.ones(5, 3)), {}, r"weight: expected shape \(D, W\) = \(4, W\)"),
    ((torch.ones(2, 3, 4), torch.ones(4, 3), torch.ones(3)), {}, r"bias: expected shape \(D,\) = \(4,\)"),
    ((torch.ones(2, 3, 4), torch.ones(4, 3), None, torch.ones(2, 4, 3)), {},
     r"state: expected shape \(B, D, W-1\) = \(2, 4, 2\)"),
    ((torch.ones(2, 0, 4), torch.ones(4, 3)), {}, r"x: expected shape \(B, T, D\) with T >= 1"),
    ((torch.ones(2, 3, 4), torch.ones(4, 3)), {"activation": "tanh"}, r"activation: expected one of"),
])
def test_bad_arguments(args, kwargs, match):
    for mode in ("recurrent", "parallel", "auto"):
        with pytest.raises(InputError, match=match):
            short_conv(*args, mode=mode, **kwargs)
