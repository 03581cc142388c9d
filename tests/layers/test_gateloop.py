"""GateLoop specifics: the real-arithmetic loop against the recurrence in complex numbers. The
contract suite holds ``chunk`` (rotations folded into q and k) to the loop, with state carry and
lengths."""

from __future__ import annotations

import torch

import rnnkit
from tests.helpers import assert_close


def test_loop_is_the_complex_recurrence():
    """``S_t = a_t S_{t-1} + k_t v_t^T`` with ``a_t = |a_t| e^{i theta_t}``, ``y_t = Re(S_t^T q_t)``."""
    layer = rnnkit.layers.build("gateloop", d_model=4, num_heads=2)
    gen = torch.Generator().manual_seed(0)
    B, H, T, K, V = 2, 2, 7, 3, 4
    q, k, theta = (torch.randn(B, H, T, K, dtype=torch.float64, generator=gen) for _ in range(3))
    v = torch.randn(B, H, T, V, dtype=torch.float64, generator=gen)
    log_a = -torch.rand(B, H, T, K, dtype=torch.float64, generator=gen)
    state = torch.randn(B, H, 2, K, V, dtype=torch.float64, generator=gen)
    S = torch.complex(state[:, :, 0], state[:, :, 1])
    ys = []
    for t in range(T):
        a = torch.polar(log_a[:, :, t].exp(), theta[:, :, t])[..., None]  # (B, H, K, 1)
        S = a * S + (k[:, :, t, :, None] * v[:, :, t, None, :]).to(S.dtype)
        ys.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t].to(S.dtype), S).real)
    y, S_loop = layer._loop(q, k, v, log_a, theta, state, None)
    assert_close(y, torch.stack(ys, 2), what="y")
    assert_close(S_loop, torch.stack([S.real, S.imag], 2), what="state")


def test_chunk_turns_the_state_back_at_the_end():
    """Through ``chunk`` the returned state is the complex state itself (not the rotated frame the
    kernel runs in): continuing from it in ``recurrent`` equals running the whole sequence."""
    torch.manual_seed(1)
    layer = rnnkit.layers.build("gateloop", d_model=6, num_heads=2, chunk_size=4).double()
    x = torch.randn(2, 13, 6, dtype=torch.float64)
    y_all, S_all = layer(x, mode="recurrent")
    y1, S1 = layer(x[:, :9], mode="chunk")
    y2, S2 = layer(x[:, 9:], S1, mode="recurrent")
    assert_close(torch.cat([y1, y2], 1), y_all, what="y")
    assert_close(S2, S_all, what="state")
