"""The test-time-training layers (``ttt_linear``, ``ttt_mlp``, ``titans``) against their papers'
definitions, beyond the contract suite (which holds ``chunk`` to ``recurrent``).

The reference below is written from the papers, independently of ``rnnkit.layers._fast_weights``:
the inner gradient comes from ``torch.autograd.grad`` of the inner loss (the layers write it out by
hand), and the mini-batches are the paper's (gradients at the weights the mini-batch started from).
With mini-batch size 1 it is plain per-token gradient descent.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rnnkit
from rnnkit.errors import InputError
from tests.helpers import assert_close

LAYERS = {
    "ttt_linear": {"num_heads": 2, "head_dim": 3},
    "ttt_mlp": {"num_heads": 2, "head_dim": 3, "expansion": 2},
    "titans": {"num_heads": 2, "head_dim": 3, "memory_depth": 2, "expansion": 2},
    "titans-depth3": {"num_heads": 1, "head_dim": 4, "memory_depth": 3, "expansion": 2},
}


def _build(case: str, mini_batch_size: int) -> rnnkit.layers.Recurrence:
    torch.manual_seed(0)
    layer = rnnkit.layers.build(case.split("-")[0], d_model=5, mini_batch_size=mini_batch_size, **LAYERS[case])
    return layer.double().eval()


def _inner(layer, weights: list[torch.Tensor], u: torch.Tensor) -> torch.Tensor:
    """The inner model ``f_W(u)`` for ``u`` ``(B, H, K)``: TTT's ``u + LN(mlp(u))`` or Titans' ``mlp(u)``."""
    ttt = layer.name.startswith("ttt")
    pairs = [(weights[i], weights[i + 1]) for i in range(0, len(weights), 2)] if ttt else [(w, None) for w in weights]
    h = u
    for i, (w, b) in enumerate(pairs):
        h = torch.einsum("bhi,bhio->bho", h, w) + (b if b is not None else 0)
        if i + 1 < len(pairs):
            h = F.gelu(h)
    if not ttt:
        return h
    normed = F.layer_norm(h, h.shape[-1:], eps=layer.config.norm_eps)
    return u + normed * layer.ttt_norm_weight + layer.ttt_norm_bias


def reference(layer, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Mini-batch test-time training as the papers define it, from the layer's initial state.

    Returns the layer's output and the inner weights after the last token.
    """
    q, k, v, gates = layer._inner_inputs(x)
    b, T = layer.config.mini_batch_size, x.shape[1]
    momentum = layer.name == "titans"
    W = [p.detach().expand(x.shape[0], *p.shape) for p in layer.inner]  # the learned initial weights
    S = [torch.zeros_like(w) for w in W]
    outputs = []
    for first in range(0, T, b):
        W0 = [w.detach().requires_grad_() for w in W]  # every gradient of the mini-batch is taken here
        for t in range(first, min(first + b, T)):
            loss = 0.5 * (_inner(layer, W0, k[:, :, t]) - v[:, :, t]).pow(2).sum()
            grads = torch.autograd.grad(loss, W0)
            lr = gates.lr[:, :, t]

            def per_head(g, w):  # (B, H) -> broadcast over w
                return g.view(*g.shape, *([1] * (w.dim() - 2)))

            if momentum:
                eta, keep = gates.log_eta[:, :, t].exp(), gates.log_keep[:, :, t].exp()
                S = [per_head(eta, s) * s - per_head(lr, g) * g for s, g in zip(S, grads)]
                W = [per_head(keep, w) * w + s for w, s in zip(W, S)]
            else:
                W = [w - per_head(lr, g) * g for w, g in zip(W, grads)]
            outputs.append(_inner(layer, W, q[:, :, t]))
        W = [w.detach() for w in W]
        S = [s.detach() for s in S]
    return layer._output(torch.stack(outputs, 2), x).detach(), W


@pytest.mark.parametrize("mini_batch_size", [1, 4])
@pytest.mark.parametrize("case", list(LAYERS))
def test_every_mode_is_the_papers_mini_batch_recurrence(case: str, mini_batch_size: int) -> None:
    """``recurrent`` and ``chunk`` equal the papers' mini-batch TTT (per-token TTT at size 1), with the
    inner gradient from autograd, on a sequence that ends mid-mini-batch."""
    layer = _build(case, mini_batch_size)
    x = torch.randn(2, 11, 5, dtype=torch.float64)
    expected_y, expected_w = reference(layer, x)
    for mode in layer.modes:
        with torch.no_grad():
            y, state = layer(x, mode=mode)
        assert_close(y, expected_y, dtype=torch.float64, what=f"{case} b={mini_batch_size} {mode}: y")
        for i, (got, want) in enumerate(zip(state.weights, expected_w)):
            # The state counts the weights from the learned initial ones.
            got = got + layer.inner[i]
            assert_close(got, want, dtype=torch.float64, what=f"{case} b={mini_batch_size} {mode}: weights[{i}]")
        assert state.count.tolist() == [[11 % mini_batch_size]] * 2


@pytest.mark.parametrize("case", ["ttt_linear", "titans"])
def test_the_mini_batch_size_changes_the_function(case: str) -> None:
    """Mini-batches of 4 are not per-token updates: the size is part of the recurrence, not a tiling."""
    x = torch.randn(1, 9, 5, dtype=torch.float64)
    with torch.no_grad():
        y1, _ = _build(case, 1)(x, mode="chunk")
        y4, _ = _build(case, 4)(x, mode="chunk")
    # The first token reads out after its own update either way.
    assert_close(y4[:, :1], y1[:, :1], dtype=torch.float64, what="first token")
    assert (y1 - y4).abs().max() > 1e-6


@pytest.mark.parametrize("name", ["ttt_linear", "ttt_mlp", "titans"])
def test_chunk_never_materialises_a_weight_per_token(name: str) -> None:
    """The chunk mode saves for backward no tensor as large as one inner weight matrix per token
    (``(B, H, T, K, K)``): its memory is linear in ``T`` with a small constant."""
    B, H, K, T = 1, 1, 16, 256
    torch.manual_seed(0)
    layer = rnnkit.layers.build(name, d_model=K, num_heads=H, mini_batch_size=16)
    largest = largest_saved_tensor(layer, torch.randn(B, T, K, requires_grad=True))
    assert largest * 8 < B * H * T * K * K, f"largest saved tensor: {largest} floats"


def largest_saved_tensor(layer: rnnkit.layers.Recurrence, x: torch.Tensor, mode: str = "chunk") -> int:
    """The floats of the largest tensor that a forward of ``layer`` in ``mode`` saves for backward."""
    sizes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, mode=mode)
    return max(sizes)


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [
        ("ttt_linear", "mini_batch_size", 0),
        ("ttt_linear", "base_lr", -1.0),
        ("ttt_linear", "use_gate", "yes"),
        ("ttt_mlp", "expansion", 0),
        ("titans", "memory_depth", 0),
        ("titans", "norm_eps", 0.0),
    ],
)
def test_bad_options_name_the_field(name: str, option: str, value: object) -> None:
    with pytest.raises(InputError, match=f"{option}: expected"):
        rnnkit.layers.build(name, d_model=8, **{option: value})


def test_initial_weights_learn_from_any_state() -> None:
    """The state is counted from the learned initial weights, so they get a gradient also when a call
    continues from a state (an encoder's, a previous window's)."""
    layer = _build("ttt_mlp", 4)
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        _, state = layer(x)
    y, _ = layer(x, state)
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.inner)


def test_state_sizes() -> None:
    D, H, K = 64, 4, 16
    assert rnnkit.layers.build("ttt_linear", d_model=D).state_size == 2 * H * (K * K + K) + 1
    E = 4 * K
    assert rnnkit.layers.build("ttt_mlp", d_model=D).state_size == 2 * H * (2 * K * E + E + K) + 1
    E = 2 * K
    assert rnnkit.layers.build("titans", d_model=D).state_size == 3 * H * (2 * K * E) + 1
