"""``lact`` against the paper's definition, beyond the contract suite (which holds ``chunk`` to
``recurrent``, with ``lengths`` and states split in mid-chunk).

The reference below is written from the paper (Zhang et al. 2025, "Test-Time Training Done Right"),
independently of ``rnnkit.layers.lact``: whole chunks, the read-outs of a chunk with the weights it
started from, the chunk's gradient from ``torch.autograd.grad`` of its dot-product loss (the layer
writes it out by hand), momentum, a Newton-Schulz iteration of its own and the weight normalisation
to the initial column norms.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import rnnkit
from rnnkit.errors import InputError
from rnnkit.layers.lact import inner_gradient, newton_schulz
from tests.helpers import assert_close
from tests.layers.test_ttt import largest_saved_tensor

CASES = {
    "plain": {"num_heads": 2, "head_dim": 3, "expansion": 2},
    "momentum": {"num_heads": 2, "head_dim": 3, "expansion": 2, "momentum": True},
    "muon": {"num_heads": 1, "head_dim": 4, "expansion": 2, "muon": True, "muon_steps": 3},
    "momentum-muon-gate": {"num_heads": 2, "head_dim": 2, "expansion": 3, "momentum": True, "muon": True,
                           "use_gate": True},
}


def _build(case: str, chunk_size: int, **extra) -> rnnkit.layers.Recurrence:
    torch.manual_seed(0)
    layer = rnnkit.layers.build("lact", d_model=5, chunk_size=chunk_size, base_lr=0.3, **CASES[case], **extra)
    with torch.no_grad():  # larger projections than the default 0.02, so that the updates matter
        for proj in (layer.qkv_proj, layer.lr_proj):
            proj.weight.normal_(std=0.5)
    return layer.double().eval()


def _swiglu(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``W2 (silu(W1 x) * (W3 x))`` per head, ``x`` ``(B, H, K)``, weights ``(B, H, in, out)``."""
    w1, w2, w3 = weights
    hidden = F.silu(torch.einsum("bhi,bhio->bho", x, w1)) * torch.einsum("bhi,bhio->bho", x, w3)
    return torch.einsum("bhi,bhio->bho", hidden, w2)


def _orthogonalise(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration, on the orientation with fewer rows."""
    flip = g.shape[-2] > g.shape[-1]
    x = g.mT if flip else g
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)
    for _ in range(steps):
        a = x @ x.mT
        x = 3.4445 * x - 4.7750 * a @ x + 2.0315 * a @ a @ x
    return x.mT if flip else x


def reference(layer, x: torch.Tensor):
    """LaCT from a fresh state: ``y``, the final weights and the gradient pending in the last,
    unfinished chunk (summed over its tokens, one rate per weight matrix)."""
    c = layer.config
    B, T, _ = x.shape
    H, K, C = c.num_heads, c.head_dim, c.chunk_size
    qkv = layer.qkv_proj(x).view(B, T, 3, H, K)
    q, k, v = F.silu(qkv).unbind(2)  # (B, T, H, K)
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    rates = F.softplus(layer.lr_proj(x)).view(B, T, H, 3)
    gates = torch.sigmoid(layer.momentum_proj(x)) if c.momentum else None  # (B, T, H)
    W = [p.detach().expand(B, *p.shape) for p in layer.fast]
    target = [w.norm(dim=-2, keepdim=True) for w in W]
    M = [torch.zeros_like(w) for w in W]

    def chunk_gradient(first: int, last: int) -> list[torch.Tensor]:
        W0 = [w.detach().requires_grad_() for w in W]
        grads = []
        for j in range(3):  # each matrix with its own rates
            loss = sum((rates[:, t, :, j, None] * -(_swiglu(W0, k[:, t]) * v[:, t])).sum() for t in range(first, last))
            grads.append(torch.autograd.grad(loss, W0[j])[0])
        return grads

    outputs = []
    pending = [torch.zeros_like(w) for w in W]
    for first in range(0, T, C):
        last = min(first + C, T)
        outputs += [_swiglu(W, q[:, t]) for t in range(first, last)]  # apply, then update
        grads = chunk_gradient(first, last)
        if last - first < C:
            pending = grads  # the sequence ends inside this chunk: no update yet
            break
        if c.momentum:
            m = gates[:, first:last].mean(1)[..., None, None]  # (B, H, 1, 1)
            M = [m * mm + g for mm, g in zip(M, grads)]
            grads = M
        if c.muon:
            grads = [_orthogonalise(g, c.muon_steps) for g in grads]
        W = [w - g for w, g in zip(W, grads)]
        W = [w / (w.norm(dim=-2, keepdim=True) + 1e-5) * n for w, n in zip(W, target)]
    y = torch.stack(outputs, 2)  # (B, H, T, K)
    scale = layer.scale_proj(x).repeat_interleave(K, -1) if c.use_gate else None
    y = layer.norm(y.transpose(1, 2).reshape(B, T, H * K), scale)
    return layer.out_proj(y).detach(), W, pending


@pytest.mark.parametrize("chunk_size", [1, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_every_mode_is_the_papers_chunked_recurrence(case: str, chunk_size: int) -> None:
    """``recurrent`` and ``chunk`` equal the paper's large-chunk TTT with the gradient from autograd,
    on a sequence that ends in mid-chunk."""
    layer = _build(case, chunk_size)
    x = torch.randn(2, 11, 5, dtype=torch.float64)
    expected_y, expected_w, expected_pending = reference(layer, x)
    for mode in layer.modes:
        with torch.no_grad():
            y, state = layer(x, mode=mode)
        what = f"{case} C={chunk_size} {mode}"
        assert_close(y, expected_y, dtype=torch.float64, what=f"{what}: y")
        for i, (got, want) in enumerate(zip(state.weights, expected_w)):
            assert_close(got + layer.fast[i], want, dtype=torch.float64, what=f"{what}: weights[{i}]")
        # The unfinished chunk's steps, kept in the state, give the gradient pending in it.
        weights = tuple(w + p for w, p in zip(state.weights, layer.fast))
        for i, (got, want) in enumerate(zip(inner_gradient(weights, *state.chunk[:3]), expected_pending)):
            assert_close(got, want, dtype=torch.float64, what=f"{what}: pending gradient of W{i + 1}")
        assert state.count.tolist() == [[11 % chunk_size]] * 2


def test_the_updates_change_the_output() -> None:
    """A reference that is the initial network throughout would also pass if no update happened: the
    weights after two chunks differ from the initial ones, and so do the read-outs."""
    layer = _build("plain", 4)
    x = torch.randn(1, 9, 5, dtype=torch.float64)
    with torch.no_grad():
        _, state = layer(x)
    assert min(float(w.abs().max()) for w in state.weights) > 1e-3


def test_a_chunk_reads_out_before_its_update() -> None:
    """Apply, then update: the tokens of a chunk read out with the weights it started from, so a change
    of one token reaches no other output of its own chunk, and every output of the next."""
    layer = _build("plain", 4)
    x = torch.randn(1, 8, 5, dtype=torch.float64)
    changed = x.clone()
    changed[:, 1] += 1.0
    with torch.no_grad():
        y, _ = layer(x, mode="chunk")
        y2, _ = layer(changed, mode="chunk")
    difference = (y - y2).abs().amax(-1)[0]  # (T,)
    assert difference[[0, 2, 3]].max() == 0
    assert difference[1] > 0 and difference[4:].min() > 1e-6


def test_the_rates_learn_through_the_updates() -> None:
    """The per-token rates reach the output only through the updates: the outer gradient flows through
    them once a chunk has been updated, and is zero before."""
    layer = _build("plain", 4)
    for T, reaches in ((4, False), (6, True)):
        layer.zero_grad()
        layer(torch.randn(2, T, 5, dtype=torch.float64), mode="chunk")[0].square().sum().backward()
        grad = layer.lr_proj.weight.grad  # None: the rates are not in the graph of y at all
        assert (grad is not None and bool(grad.abs().max() > 0)) == reaches, T


def test_the_updated_weights_keep_the_initial_column_norms() -> None:
    layer = _build("momentum-muon-gate", 3)
    with torch.no_grad():
        _, state = layer(torch.randn(2, 12, 5, dtype=torch.float64))
    for delta, initial in zip(state.weights, layer.fast):
        norms = (delta + initial).norm(dim=-2)  # (B, H, out)
        want = initial.norm(dim=-2).expand_as(norms)
        assert torch.allclose(norms, want, rtol=1e-4), (norms, want)
        assert delta.abs().max() > 1e-3  # the weights did move


@pytest.mark.parametrize("shape", [(2, 3, 6), (2, 6, 3), (4, 4)])
def test_newton_schulz_orthogonalises_keeping_the_singular_vectors(shape) -> None:
    torch.manual_seed(0)
    g = torch.randn(*shape, dtype=torch.float64)
    x = newton_schulz(g, 5)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    inner = u.mT @ x @ vh.mT  # diagonal when x has g's singular vectors
    diagonal = torch.diagonal(inner, dim1=-2, dim2=-1)
    assert torch.allclose(inner, torch.diag_embed(diagonal), atol=1e-10)
    assert diagonal.min() > 0.5 and diagonal.max() < 1.5, diagonal
    zeros = torch.zeros(*shape, dtype=torch.float64)
    assert torch.equal(newton_schulz(zeros, 5), zeros)


def test_the_window_branch_adds_sliding_window_attention() -> None:
    """With ``window``, the layer is its TTT branch plus causal window attention over the same q, k, v
    projections, through the same output projection: the ``attention`` layer with those weights."""
    torch.manual_seed(0)
    D, H, K, w = 6, 2, 3, 4
    lact = rnnkit.layers.build("lact", d_model=D, num_heads=H, chunk_size=3, window=w).double()
    alone = rnnkit.layers.build("lact", d_model=D, num_heads=H, chunk_size=3).double()
    alone.load_state_dict(lact.state_dict())
    attention = rnnkit.layers.build("attention", d_model=D, num_heads=H, head_dim=K, window=w).double()
    with torch.no_grad():
        attention.qkv_proj.weight.copy_(lact.qkv_proj.weight)
        attention.o_proj.weight.copy_(lact.out_proj.weight)
    x = torch.randn(2, 10, D, dtype=torch.float64)
    with torch.no_grad():
        y_ttt, _ = alone(x)
        y_attention, cache = attention(x)
        for mode in lact.modes:
            y, state = lact(x, mode=mode)
            assert_close(y, y_ttt + y_attention, dtype=torch.float64, what=f"{mode}: y")
            for name, got, want in zip(cache._fields, state.cache, cache):
                assert_close(got, want, dtype=torch.float64, what=f"{mode}: cache.{name}")


@pytest.mark.parametrize(
    ("options", "floats"),
    [
        ({}, 3 * 2 * 4 * 8 + 6 * 2 * (2 * 4 + 3) + 1),
        ({"momentum": True}, 6 * 2 * 4 * 8 + 6 * 2 * (2 * 4 + 4) + 1),
        ({"window": 16}, 3 * 2 * 4 * 8 + 6 * 2 * (2 * 4 + 3) + 1 + 15 * (2 * 2 * 4 + 1) + 1),
    ],
)
def test_state_size(options, floats) -> None:
    """``3HKE + CH(2K + 3) + 1`` floats: the weights, the chunk's keys, values and rates, the count
    (and the momentum's and the window's parts); constant in ``T``."""
    layer = rnnkit.layers.build("lact", d_model=8, num_heads=2, chunk_size=6, **options)
    assert layer.state_size == floats
    if "window" in options:
        assert layer.state_size_at(3) == floats - 12 * (2 * 2 * 4 + 1)


def test_the_modes_agree_to_the_bit_on_the_weights() -> None:
    """Muon's unit-size steps make the recurrence chaotic: rounding differences between two ways of
    summing a chunk's gradient would grow from chunk to chunk. Both modes take it with the same
    arithmetic on the same chunk, so their weights agree exactly, in fp32, over many chunks."""
    torch.manual_seed(0)
    layer = rnnkit.layers.build("lact", d_model=16, num_heads=2, chunk_size=4, muon=True, momentum=True).eval()
    x = torch.randn(2, 150, 16)
    with torch.no_grad():
        _, recurrent = layer(x, mode="recurrent")
        _, chunk = layer(x, mode="chunk")
    for got, want in zip(chunk.weights, recurrent.weights):
        assert torch.equal(got, want)
    assert min(float(w.abs().max()) for w in chunk.weights) > 1e-2  # the weights did move


def test_chunk_never_materialises_a_weight_per_token() -> None:
    """The chunk mode saves for backward no tensor as large as one fast-weight matrix per token
    (``(B, H, T, K, E)``): its memory is linear in ``T`` with a small constant."""
    B, H, K, T = 1, 1, 16, 256
    torch.manual_seed(0)
    layer = rnnkit.layers.build("lact", d_model=K, num_heads=H, chunk_size=64, momentum=True, muon=True)
    largest = largest_saved_tensor(layer, torch.randn(B, T, K, requires_grad=True))
    assert largest * 8 < B * H * T * K * 2 * K, f"largest saved tensor: {largest} floats"


def test_the_default_rates_start_at_base_lr() -> None:
    layer = rnnkit.layers.build("lact", d_model=8, num_heads=2, base_lr=0.01)
    assert torch.allclose(F.softplus(layer.lr_proj.bias), torch.full((6,), 0.01))
    huge = rnnkit.layers.build("lact", d_model=8, num_heads=2, base_lr=1000.0)
    assert math.isfinite(float(huge.lr_proj.bias[0].detach()))


@pytest.mark.parametrize(
    ("option", "value"),
    [("chunk_size", 0), ("expansion", 0), ("base_lr", -1.0), ("momentum", 1), ("muon", "yes"),
     ("muon_steps", 0), ("window", 0), ("use_gate", None), ("norm_eps", 0.0)],
)
def test_bad_options_name_the_field(option: str, value: object) -> None:
    with pytest.raises(InputError, match=f"{option}: expected"):
        rnnkit.layers.build("lact", d_model=8, **{option: value})


@pytest.mark.parametrize("options", [{}, {"momentum": True}, {"muon": True}, {"momentum": True, "muon": True}])
def test_the_gradient_through_the_updates(options) -> None:
    """The contract's gradcheck runs too few steps to reach an update of the Muon configuration; here
    two updates (momentum, Newton-Schulz, normalisation) are differentiated, in both modes, w.r.t. the
    input and every parameter along a random direction, against central differences. (The updates are
    strongly curved, so the step is small: finite differences at gradcheck's 1e-6 are off by more
    than its tolerance on some entries.)"""
    torch.manual_seed(0)
    layer = rnnkit.layers.build("lact", d_model=4, num_heads=1, head_dim=2, expansion=2, chunk_size=5,
                                base_lr=0.5, **options).double()
    x = torch.randn(1, 11, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(1, 11, 4, dtype=torch.float64)
    tensors = [x, *layer.parameters()]
    directions = [torch.randn_like(t) for t in tensors]
    for mode in layer.modes:
        def loss() -> torch.Tensor:
            return (layer(x, mode=mode)[0] * weight).sum()

        grads = torch.autograd.grad(loss(), tensors)
        analytic = sum(float((g * d).sum()) for g, d in zip(grads, directions))
        eps = 1e-7
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                for t, d in zip(tensors, directions):
                    t += sign * eps * d
                values.append(float(loss()))
                for t, d in zip(tensors, directions):
                    t -= sign * eps * d
        numeric = (values[0] - values[1]) / (2 * eps)
        assert abs(numeric - analytic) <= 1e-6 * abs(analytic), (mode, numeric, analytic)
