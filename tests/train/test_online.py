"""Online learning (rnnkit.train.online): exact RTRL equals BPTT over the same window in fp64 for the
element-wise recurrences and the dense cells; UORO's estimate is unbiased."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.errors import InputError
from rnnkit.train.online import ELEMENTWISE_LAYERS, OnlineGradient
from tests.helpers import assert_close

f64 = torch.float64
D, B, T = 3, 2, 6


def _setup(name: str, seed: int = 0, **config):
    torch.manual_seed(seed)
    layer = rnnkit.layers.build(name, d_model=D, **config).to(f64)
    head = torch.nn.Linear(layer.d_output, 1).to(f64)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, T, D, dtype=f64, generator=gen)
    target = torch.randn(B, T, 1, dtype=f64, generator=gen)
    return layer, head, x, target


def _loss(head, y, target):
    return ((head(y) - target) ** 2).mean()


def _bptt(layer, head, x, target):
    layer.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    y, _ = layer(x, mode="recurrent")
    sum(_loss(head, y[:, t], target[:, t]) for t in range(T)).backward()
    return [p.grad.clone() for p in (*layer.parameters(), *head.parameters())]


def _online(layer, head, x, target, **options):
    layer.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    online = OnlineGradient(layer, **options)
    online.reset(B)
    for t in range(T):
        online.step(x[:, t], lambda y, t=t: _loss(head, y, target[:, t]))
    return [p.grad.clone() for p in (*layer.parameters(), *head.parameters())]


CONFIGS = {
    "mingru": {"hidden_size": 4},
    "minlstm": {"hidden_size": 4},
    "lru": {"d_state": 4},
    "rglru": {},
    "s4d": {"d_state": 4},
    "paragru": {"hidden_size": 4},
    "elman": {"hidden_size": 4},
    "gru": {"hidden_size": 4},
    "lstm": {"hidden_size": 4},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rtrl_equals_bptt_in_fp64(name: str) -> None:
    layer, head, x, target = _setup(name, **CONFIGS[name])
    expected = _bptt(layer, head, x, target)
    got = _online(layer, head, x, target)
    names = [n for n, _ in layer.named_parameters()] + ["head.weight", "head.bias"]
    for n, g, e in zip(names, got, expected):
        assert_close(g, e, kind="grad", what=f"{name}: d/d {n}")


def test_every_elementwise_layer_is_covered() -> None:
    assert set(ELEMENTWISE_LAYERS) <= set(CONFIGS)


@pytest.mark.parametrize(("name", "block"), [("mingru", 1), ("minlstm", 1), ("rglru", 1), ("paragru", 1), ("lru", 2),
                                             ("s4d", 2)])
def test_rtrl_with_block_diagonal_jacobian_equals_bptt(name: str, block: int) -> None:
    layer, head, x, target = _setup(name, **CONFIGS[name])
    expected = _bptt(layer, head, x, target)
    for g, e in zip(_online(layer, head, x, target, block_size=block), expected):
        assert_close(g, e, kind="grad")


def test_a_wrong_block_declaration_gives_a_different_gradient() -> None:
    """The block option is not a no-op: on a dense cell, keeping only the diagonal is wrong."""
    layer, head, x, target = _setup("elman", hidden_size=4)
    expected = _bptt(layer, head, x, target)
    got = _online(layer, head, x, target, block_size=1)
    assert max((g - e).abs().max().item() for g, e in zip(got, expected)) > 1e-6


def test_uoro_is_unbiased() -> None:
    """UORO's rank-one estimate has expectation the exact sensitivity, so its gradient averaged over
    independent sign draws is the exact gradient. 40 groups of 100 copies of one sequence, each copy
    with its own signs: the mean of the group means is within 5 standard errors (their spread over
    the groups) of RTRL's gradient, entry by entry."""
    torch.manual_seed(0)
    layer = rnnkit.layers.build("elman", d_model=2, hidden_size=3).to(f64)
    gen = torch.Generator().manual_seed(1)
    copies, groups, steps = 100, 40, 4
    x = torch.randn(1, steps, 2, dtype=f64, generator=gen).expand(copies, -1, -1)
    target = torch.randn(1, steps, 3, dtype=f64, generator=gen).expand(copies, -1, -1)

    def mean_grads(method, seed):
        online = OnlineGradient(layer, method=method, generator=torch.Generator().manual_seed(seed))
        online.reset(copies)
        layer.zero_grad(set_to_none=True)
        for t in range(steps):  # the loss sums over copies, so .grad / copies is the per-copy mean
            online.step(x[:, t], lambda y, t=t: ((y - target[:, t]) ** 2).sum())
        return torch.cat([p.grad.reshape(-1) / copies for p in layer.parameters()])

    exact = mean_grads("rtrl", 0)
    means = torch.stack([mean_grads("uoro", 10 + g) for g in range(groups)])  # (groups, P)
    estimate, stderr = means.mean(0), means.std(0) / groups**0.5
    assert (stderr > 1e-4).any(), "the estimate is noisy: a group mean alone is not the exact gradient"
    assert ((estimate - exact).abs() <= 5 * stderr + 1e-12).all(), (
        f"UORO's mean is off: {(estimate - exact).abs().tolist()} against 5 standard errors {(5 * stderr).tolist()}")


def test_bad_arguments() -> None:
    layer = rnnkit.layers.build("mingru", d_model=3)
    with pytest.raises(InputError, match="method: expected one of"):
        OnlineGradient(layer, method="bptt")
    with pytest.raises(InputError, match="layer: expected an rnnkit Recurrence"):
        OnlineGradient(torch.nn.GRU(3, 3))
    with pytest.raises(InputError, match="block_size: expected a divisor"):
        OnlineGradient(layer, block_size=2 if layer.state_size % 2 else 5)
    with pytest.raises(InputError, match="step: expected reset"):
        OnlineGradient(layer).step(torch.randn(2, 3), lambda y: y.sum())
    online = OnlineGradient(layer)
    online.reset(2)
    with pytest.raises(InputError, match="x_t: expected batch size 2"):
        online.step(torch.randn(3, 3), lambda y: y.sum())
    with pytest.raises(InputError, match="layer: expected a causal layer"):
        OnlineGradient(rnnkit.layers.build("bidirectional", d_model=3, layer="gru"))


@pytest.mark.parametrize(("name", "block"), [("lru", 2), ("mingru", 1), ("elman", None)])
def test_advance_equals_steps_without_a_loss(name: str, block: int | None) -> None:
    """``advance`` (the Jacobians of several loss-free steps in one call) carries the state and the
    sensitivities exactly as that many ``step(x_t, None)`` calls do, then the gradients agree."""
    layer, head, x, target = _setup(name, **CONFIGS[name])
    batched, stepped = OnlineGradient(layer, block_size=block), OnlineGradient(layer, block_size=block)
    batched.reset(B)
    stepped.reset(B)
    batched.advance(x[:, : T - 1])
    for t in range(T - 1):
        stepped.step(x[:, t], None)
    for key, value in stepped.carry().items():
        assert_close(batched.carry()[key], value, kind="value", what=f"{name}: {key}")
    grads = []
    for online in (batched, stepped):
        layer.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        online.step(x[:, T - 1], lambda y: _loss(head, y, target[:, T - 1]))
        grads.append([p.grad.clone() for p in (*layer.parameters(), *head.parameters())])
    for got, expected in zip(*grads):
        assert_close(got, expected, kind="grad")
