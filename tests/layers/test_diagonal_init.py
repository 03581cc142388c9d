"""The diagonal layers start where their papers say (LRU, S4D, RG-LRU/Hawk, Mamba)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import rnnkit
from rnnkit.errors import InputError
from rnnkit.layers.lru import lru_lambda


def test_lru_ring_phase_and_gamma() -> None:
    torch.manual_seed(0)
    layer = rnnkit.layers.build("lru", d_model=8, d_state=4000, r_min=0.4, r_max=0.8, max_phase=math.pi / 4)
    lam = lru_lambda(layer.nu_log, layer.theta_log).detach()
    r = lam.abs()
    assert r.min() >= 0.4 - 1e-6 and r.max() <= 0.8 + 1e-6
    # Uniform over the ring's area: |lambda|^2 is uniform on [r_min^2, r_max^2].
    assert abs((r**2).mean().item() - (0.16 + 0.64) / 2) < 0.01
    phase = torch.exp(layer.theta_log).detach()
    assert phase.min() >= 0 and phase.max() <= math.pi / 4
    gamma = torch.exp(layer.gamma_log).detach()
    assert torch.allclose(gamma, torch.sqrt(1 - r**2), atol=1e-5)


def test_lru_normalisation_keeps_the_state_variance_near_the_input_variance() -> None:
    """With gamma = sqrt(1 - |lambda|^2), white-noise input gives E|h|^2 ~ E|Bx|^2 (Sec. 3.4)."""
    torch.manual_seed(0)
    layer = rnnkit.layers.build("lru", d_model=16, d_state=32, r_min=0.99, r_max=0.999).double()
    x = torch.randn(64, 3000, 16, dtype=torch.float64)
    with torch.no_grad():
        _, state = layer(x)
        h = torch.complex(state[..., 0], state[..., 1])
    # B ~ CN(0, 1/H) and x ~ N(0, I_H): E|B x|^2 = 1 per mode, and gamma^2 / (1 - |lambda|^2) = 1.
    power = (h.abs() ** 2).mean().item()
    assert 0.6 < power < 1.4, power


@pytest.mark.parametrize("init", ["lin", "inv"])
def test_s4d_init(init: str) -> None:
    torch.manual_seed(0)
    layer = rnnkit.layers.build("s4d", d_model=6, d_state=8, init=init, dt_min=0.01, dt_max=0.2)
    n = torch.arange(4, dtype=torch.float32)
    want = math.pi * n if init == "lin" else 8 / math.pi * (8 / (2 * n + 1) - 1)
    assert torch.allclose(layer.A_imag.detach(), want.expand(6, 4))
    assert torch.allclose(-torch.exp(layer.log_A_real.detach()), torch.full((6, 4), -0.5))
    dt = torch.exp(layer.log_dt.detach())
    assert dt.min() >= 0.01 - 1e-6 and dt.max() <= 0.2 + 1e-6


def test_s4d_zoh_matches_the_continuous_solution() -> None:
    """ZOH is exact for piecewise-constant input: one step of a mode equals the ODE's solution."""
    layer = rnnkit.layers.build("s4d", d_model=1, d_state=2).double()
    dtA, dA, dB = layer.discretise()
    A = dtA / torch.exp(layer.log_dt)[:, None]
    dt = torch.exp(layer.log_dt)[:, None]
    # x'(t) = A x + 1 from x(0) = 0 over [0, dt]: (exp(A dt) - 1) / A.
    assert torch.allclose(dB, (torch.exp(A * dt) - 1) / A)
    assert torch.allclose(dA, torch.exp(A * dt))


def test_s4d_rejects_an_odd_state() -> None:
    with pytest.raises(InputError, match="even"):
        rnnkit.layers.build("s4d", d_model=4, d_state=3)


def test_rglru_a_to_the_c_is_in_the_paper_range() -> None:
    torch.manual_seed(0)
    layer = rnnkit.layers.build("rglru", d_model=2000)
    a_c = torch.sigmoid(layer.Lambda.detach().double()) ** 8
    assert a_c.min() >= 0.9 - 1e-6 and a_c.max() <= 0.999 + 1e-6
    assert abs(a_c.mean().item() - (0.9 + 0.999) / 2) < 0.01


def test_rglru_input_normalisation() -> None:
    """a_t -> 1 (r_t -> 0) lets no input in; the sqrt(1 - a_t^2) factor is computed without NaN."""
    layer = rnnkit.layers.build("rglru", d_model=3).double()
    with torch.no_grad():
        layer.gate_bias[0].fill_(-60.0)  # r_t = sigma(-60) ~ 1e-26: a_t = 1 up to rounding
        layer.gate_bias[1].fill_(60.0)
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    a, b = layer.coefficients(x)
    assert torch.allclose(a, torch.ones_like(a)) and b.abs().max() < 1e-10
    b.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_hawk_default_width_and_conv_state() -> None:
    layer = rnnkit.layers.build("hawk", d_model=12)
    assert layer.config.d_rnn == 16 and layer.config.conv_width == 4
    state = layer.init_state(2)
    assert state.conv.shape == (2, 16, 3) and state.h.shape == (2, 16)


def test_mamba_init() -> None:
    torch.manual_seed(0)
    layer = rnnkit.layers.build("mamba", d_model=64, d_state=16)
    assert layer.config.dt_rank == 4 and layer.config.expand * 64 == 128
    A = -torch.exp(layer.A_log.detach())
    assert torch.allclose(A, -torch.arange(1, 17, dtype=torch.float32).expand(128, 16))  # S4D-Real
    dt = F.softplus(layer.dt_proj.bias.detach())  # the initial delta at zero input
    assert dt.min() >= 0.001 - 1e-6 and dt.max() <= 0.1 + 1e-6
    assert torch.equal(layer.D.detach(), torch.ones(128))
    assert layer.in_proj.bias is None and layer.out_proj.bias is None and layer.conv.bias is not None
