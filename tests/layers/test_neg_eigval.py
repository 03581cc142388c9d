"""Negative eigenvalues (Grazzi et al. 2025) in mamba, mamba2 and gla: ``allow_neg_eigval=True``
maps the decay from (0, 1) onto (-1, 1); every mode computes the same function (the contract suite
runs each layer's ``neg-eigval`` test configuration); here what is specific to the option."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.errors import InputError
from rnnkit.layers._multihead import signed_decay
from rnnkit.ops import gated_linear_attention, selective_scan

f64 = torch.float64


def test_signed_decay_maps_zero_one_onto_minus_one_one() -> None:
    log_decay = torch.log(torch.tensor([1e-9, 0.25, 0.5, 0.75, 1.0], dtype=f64))
    log_abs, sign = signed_decay(log_decay)
    a = sign * torch.exp(log_abs)
    assert torch.allclose(a, torch.tensor([-1 + 2e-9, -0.5, 0.0, 0.5, 1.0], dtype=f64), atol=1e-15)
    assert sign[2] == 1 and torch.isfinite(log_abs).all()


@pytest.mark.parametrize("per_dim", [False, True])
@pytest.mark.parametrize("mode", ["recurrent", "parallel", "chunk"])
def test_a_decay_of_minus_one_flips_the_state(mode: str, per_dim: bool) -> None:
    """Decay -1 every step: ``S_t = -S_{t-1} + k_t v_t^T``, an alternating sum (the parity flip)."""
    torch.manual_seed(0)
    B, H, T, K, V = 2, 1, 9, 3, 2
    q, k, v = torch.randn(B, H, T, K, dtype=f64), torch.randn(B, H, T, K, dtype=f64), torch.randn(B, H, T, V, dtype=f64)
    shape = (B, H, T, K) if per_dim else (B, H, T)
    y, S = gated_linear_attention(q, k, v, torch.zeros(shape, dtype=f64), mode=mode, chunk_size=4,
                                  decay_sign=-torch.ones(shape, dtype=f64))
    signs = torch.tensor([(-1.0) ** (T - 1 - t) for t in range(T)], dtype=f64)
    want = torch.einsum("t,bhtk,bhtv->bhkv", signs, k, v)
    assert torch.allclose(S, want, atol=1e-12)
    assert torch.allclose(y[:, :, -1], torch.einsum("bhk,bhkv->bhv", q[:, :, -1], want), atol=1e-12)


def test_decay_sign_must_match_log_decay() -> None:
    q = torch.randn(1, 1, 4, 2)
    with pytest.raises(InputError, match="decay_sign: expected the shape"):
        gated_linear_attention(q, q, q, torch.zeros(1, 1, 4), decay_sign=torch.ones(1, 1, 4, 2))


def test_fused_selective_scan_refuses_negative_eigenvalues() -> None:
    delta, u = torch.rand(1, 5, 2), torch.randn(1, 5, 2)
    Bm = Cm = torch.randn(1, 5, 3)
    with pytest.raises(InputError, match="allow_neg_eigval"):
        selective_scan(delta, Bm, Cm, u, -torch.ones(2, 3), mode="fused", allow_neg_eigval=True)


def test_mamba_routes_negative_eigenvalues_around_the_fused_kernel() -> None:
    layer = rnnkit.layers.build("mamba", d_model=4, d_state=2, allow_neg_eigval=True)
    assert "fused" not in layer.modes and layer._auto_mode(torch.zeros(1, 3, 4)) == "chunk"


@pytest.mark.parametrize("name", ["mamba", "mamba2", "gla"])
def test_the_option_is_a_bool_and_off_by_default(name: str) -> None:
    assert rnnkit.layers.build(name, d_model=64).config.allow_neg_eigval is False
    with pytest.raises(InputError, match="allow_neg_eigval: expected a bool"):
        rnnkit.layers.build(name, d_model=64, allow_neg_eigval=1)


def test_mamba_negative_eigenvalues_change_the_transition() -> None:
    """One step: h_1 = a h_0 + (input term), with a = 2 exp(delta A) - 1 with the option, exp(delta A) without."""
    torch.manual_seed(0)
    on = rnnkit.layers.build("mamba", d_model=4, d_state=2, expand=1, allow_neg_eigval=True).double()
    off = rnnkit.layers.build("mamba", d_model=4, d_state=2, expand=1).double()
    off.load_state_dict(on.state_dict())
    zero = on.init_state(1)
    state = zero._replace(h=torch.randn_like(zero.h))
    x = torch.randn(1, 4, dtype=f64)
    _, from_zero = off.step(x, zero)  # the input term alone
    decay = (off.step(x, state)[1].h - from_zero.h) / state.h  # exp(delta A)
    assert bool(((decay > 0) & (decay < 1)).all())
    assert torch.allclose(on.step(x, state)[1].h - from_zero.h, (2 * decay - 1) * state.h, atol=1e-12)
