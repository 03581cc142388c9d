"""S4 and S5 start where their papers say: HiPPO-LegS in DPLR form (S4), diagonalised HiPPO-N (S5),
and S4's bilinear discretisation is the one the paper defines."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.errors import InputError
from rnnkit.layers._hippo import hippo_legs, hippo_normal_modes, s4_dplr_init
from rnnkit.layers.s4 import interleave, pair_blocks

f64 = torch.float64


@pytest.mark.parametrize("n", [2, 8, 16])
def test_dplr_form_is_hippo_legs(n: int) -> None:
    """``V (Lambda - p p^*) V^* = A`` and ``V b = B`` of LegS, over the conjugate-completed basis."""
    A, B, _ = hippo_legs(n)
    lam, p, b = s4_dplr_init(n)
    _, V = hippo_normal_modes(n)
    full = lambda v: torch.cat([v, v.conj()], -1)  # noqa: E731
    V_full = full(V)  # (n, n): the kept eigenvectors and their conjugates
    A_eig = torch.diag(full(lam)) - full(p)[:, None] * full(p).conj()[None, :]
    assert torch.allclose(V_full @ A_eig @ V_full.conj().T, A.to(V.dtype), atol=1e-10)
    assert torch.allclose(V_full @ full(b), B.to(V.dtype), atol=1e-10)
    assert torch.allclose(lam.real, torch.full_like(lam.real, -0.5)) and bool((lam.imag > 0).all())


def test_s4_state_matrix_has_the_legs_spectrum() -> None:
    """On the state's (re, im) pairs, A = blocks(Lambda) - 2 pi pi^T is similar to LegS A (whose
    eigenvalues -1..-N are ill-conditioned: the fp32 parameters move them by ~1e-3)."""
    layer = rnnkit.layers.build("s4", d_model=2, d_state=8).double()
    lam_re, lam_im = -torch.exp(layer.log_A_real), layer.A_imag
    pi = interleave(layer.P_re, layer.P_im)
    A_r = pair_blocks(lam_re, lam_im) - 2 * pi[:, :, None] * pi[:, None, :]
    legs = torch.linalg.eigvals(hippo_legs(8)[0])
    for h in range(2):
        got = torch.linalg.eigvals(A_r[h].detach())
        key = lambda z: (round(z.real.item(), 6), round(z.imag.item(), 6))  # noqa: E731
        assert torch.allclose(torch.stack(sorted(got, key=key)), torch.stack(sorted(legs, key=key)), atol=2e-2)


def test_s4_bilinear_discretisation() -> None:
    """dA = (I - dt/2 A)^{-1} (I + dt/2 A) and dB = (I - dt/2 A)^{-1} dt B (Sherman-Morrison against a solve)."""
    torch.manual_seed(0)
    layer = rnnkit.layers.build("s4", d_model=3, d_state=6, dt_min=0.01, dt_max=1.0).double()
    with torch.no_grad():
        layer.P_re.normal_()
        layer.P_im.normal_()
    dA, dB, _ = layer.bilinear()
    dt = torch.exp(layer.log_dt)[:, None, None]
    pi = interleave(layer.P_re, layer.P_im)
    A = pair_blocks(-torch.exp(layer.log_A_real), layer.A_imag) - 2 * pi[:, :, None] * pi[:, None, :]
    eye = torch.eye(6, dtype=f64)
    want = torch.linalg.solve(eye - dt / 2 * A, eye + dt / 2 * A)
    assert torch.allclose(dA, want, atol=1e-12)
    beta = interleave(layer.B_re, layer.B_im)
    assert torch.allclose(dB, torch.linalg.solve(eye - dt / 2 * A, dt[..., 0] * beta), atol=1e-12)


def test_s4_conv_kernel_is_the_impulse_response() -> None:
    """The conv mode's response to a unit impulse from a zero state is K_l = C dA^l dB + D [l = 0]."""
    torch.manual_seed(0)
    layer = rnnkit.layers.build("s4", d_model=2, d_state=4, dt_min=0.05, dt_max=0.5).double()
    T = 37
    x = torch.zeros(1, T, 2, dtype=f64)
    x[:, 0] = 1.0
    y, _ = layer(x, mode="conv")
    dA, dB, _ = layer.bilinear()
    C = 2 * interleave(layer.C_re, -layer.C_im)
    v, want = dB, []
    for _ in range(T):
        want.append((C * v).sum(-1))
        v = (dA @ v[..., None])[..., 0]
    want = torch.stack(want, 0)
    want[0] += layer.D
    assert torch.allclose(y[0], want, atol=1e-10)


def test_s5_init_is_diagonalised_hippo_n() -> None:
    layer = rnnkit.layers.build("s5", d_model=3, d_state=16, blocks=2)
    lam, V = hippo_normal_modes(8)
    assert torch.allclose(-torch.exp(layer.log_A_real.detach()), torch.full((8,), -0.5))
    assert torch.allclose(layer.A_imag.detach().double(), lam.imag.repeat(2), atol=1e-6)
    dt = torch.exp(layer.log_dt.detach())
    assert dt.min() >= 0.001 - 1e-7 and dt.max() <= 0.1 + 1e-6 and dt.shape == (8,)
    assert layer.state_size == 16


@pytest.mark.parametrize(("name", "options"), [("s4", {"d_state": 3}), ("s5", {"d_state": 6, "blocks": 2})])
def test_bad_state_sizes_are_rejected(name: str, options: dict) -> None:
    with pytest.raises(InputError, match="d_state: expected"):
        rnnkit.layers.build(name, d_model=4, **options)


def test_s4_recurrent_mode_saves_one_state_per_step_for_backward() -> None:
    """The loop keeps O(B H N) per step for backward, never a per-step copy of the (H, N, N) transition
    broadcast over the batch (which made long recurrent runs exhaust memory)."""
    from tests.helpers import saved_numel

    B, T, H, N = 8, 16, 4, 16
    layer = rnnkit.layers.build("s4", d_model=H, d_state=N)
    x = torch.randn(B, T, H)
    _, saved = saved_numel(lambda: layer(x, mode="recurrent"))
    assert saved < T * B * H * N * 8, f"{saved} floats saved; a per-step (B, H, N, N) copy is {T * B * H * N * N}"


def test_s4_decoding_step_forms_the_transition_once_and_follows_parameter_updates(monkeypatch) -> None:
    torch.manual_seed(0)
    layer = rnnkit.layers.build("s4", d_model=4, d_state=8).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    calls = []
    original = type(layer).bilinear
    monkeypatch.setattr(type(layer), "bilinear", lambda self: calls.append(1) or original(self))
    y_ref, _ = layer(x, mode="recurrent")
    calls.clear()
    with torch.no_grad():
        state, ys = layer.init_state(2, dtype=torch.float64), []
        for t in range(5):
            y_t, state = layer.step(x[:, t], state)
            ys.append(y_t)
        assert len(calls) == 1  # formed at the first step, reused by the next four
        assert torch.equal(torch.stack(ys, 1), y_ref.detach())
        layer.log_dt.add_(0.1)  # an optimiser-like in-place update
        y_new, _ = layer.step(x[:, 0], layer.init_state(2, dtype=torch.float64))
    assert len(calls) == 2
    y_fresh, _ = layer.step(x[:, 0], layer.init_state(2, dtype=torch.float64))  # gradients on: no cache
    assert torch.equal(y_new, y_fresh.detach())


def test_s4_decoding_step_under_inference_mode_follows_reloaded_weights() -> None:
    torch.manual_seed(0)
    with torch.inference_mode():
        layer = rnnkit.layers.build("s4", d_model=4, d_state=8)
        other = rnnkit.layers.build("s4", d_model=4, d_state=8)
        x = torch.randn(2, 4)
        y_first, _ = layer.step(x, layer.init_state(2))
        layer.load_state_dict(other.state_dict())
        y_reloaded, _ = layer.step(x, layer.init_state(2))
        y_other, _ = other.step(x, other.init_state(2))
    assert torch.equal(y_reloaded, y_other)
    assert not torch.equal(y_first, y_reloaded)
