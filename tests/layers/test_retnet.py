"""RetNet specifics: xPos against the paper's parallel retention; the contract suite covers modes,
state carry (a split sequence == the whole one also with rotations) and lengths."""

from __future__ import annotations

import pytest
import torch

import rnnkit
from rnnkit.errors import InputError
from rnnkit.layers._multihead import merge_heads, split_heads


def paper_retention(layer, x: torch.Tensor, xpos: bool) -> torch.Tensor:
    """Sun et al. 2023, eq. 5-8, written out: ``Retention(X) = (Q K^T ⊙ D) V`` with
    ``D_nm = gamma^(n-m)`` (n >= m), q and k turned by ``e^{i n theta}`` as complex pairs, the
    group norm, swish gate and output projection. Absolute positions from 0."""
    c = layer.config
    B, T, _ = x.shape
    q = split_heads(layer.q_proj(x), c.num_heads)  # (B, H, T, K)
    k = split_heads(layer.k_proj(x), c.num_heads) * c.head_dim**-0.5
    v = split_heads(layer.v_proj(x), c.num_heads)
    P = c.head_dim // 2
    scores = q[..., 2 * P :] @ k[..., 2 * P :].transpose(-1, -2)  # the unrotated odd dimension, if any
    zq = torch.complex(q[..., 0 : 2 * P : 2], q[..., 1 : 2 * P : 2])  # (B, H, T, P)
    zk = torch.complex(k[..., 0 : 2 * P : 2], k[..., 1 : 2 * P : 2])
    if xpos and P:
        theta = 10000.0 ** -torch.linspace(0, 1, P, dtype=torch.float64)
        turn = torch.polar(torch.ones(T, P, dtype=torch.float64), torch.arange(T, dtype=torch.float64)[:, None] * theta)
        zq, zk = zq * turn, zk * turn
    scores = scores + (zq @ zk.conj().transpose(-1, -2)).real  # Re[q_n conj(k_m) e^{i(n-m) theta}]
    n = torch.arange(T, dtype=torch.float64)
    # The layer's own decays, 1 - 2^(-5-h), exact in fp64.
    gamma = layer.log_gamma.exp()[:, None, None]
    decay = torch.where(n[:, None] >= n[None, :], gamma ** (n[:, None] - n[None, :]), 0.0)  # (H, T, T)
    o = (scores * decay) @ v  # (B, H, T, V)
    return layer.o_proj(layer.norm(merge_heads(o), layer.g_proj(x)))


@pytest.mark.parametrize("head_dim", [4, 5])
@pytest.mark.parametrize("mode", ["recurrent", "parallel", "chunk"])
def test_xpos_is_the_papers_rotated_retention(mode, head_dim):
    """Every mode == the paper's parallel form with xPos, also with a history state carried in;
    and the rotation matters (without it the outputs differ)."""
    torch.manual_seed(0)
    layer = rnnkit.layers.build("retnet", d_model=6, num_heads=2, head_dim=head_dim, chunk_size=8).double()
    assert layer.config.xpos  # the paper's default
    x = torch.randn(2, 37, 6, dtype=torch.float64)
    with torch.no_grad():
        y, _ = layer(x, mode=mode)
        expected = paper_retention(layer, x, xpos=True)
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-10)
        # The second half run from the first half's state == the tail of the whole sequence.
        _, state = layer(x[:, :20], mode=mode)
        y_tail, _ = layer(x[:, 20:], state, mode=mode)
        torch.testing.assert_close(y_tail, expected[:, 20:], rtol=0, atol=1e-10)
        assert (expected - paper_retention(layer, x, xpos=False)).abs().max() > 1e-3


def test_without_xpos_decay_only():
    torch.manual_seed(0)
    layer = rnnkit.layers.build("retnet", d_model=6, num_heads=2, head_dim=4, xpos=False).double()
    x = torch.randn(2, 19, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], paper_retention(layer, x, xpos=False), rtol=0, atol=1e-10)


def test_xpos_fp32_long_sequence_matches_fp64():
    """Angles are formed in fp64: at T = 3000 (angles up to 3000 rad) fp32 stays at fp32 rounding."""
    torch.manual_seed(0)
    layer = rnnkit.layers.build("retnet", d_model=8, num_heads=2)
    x = torch.randn(1, 3000, 8)
    with torch.no_grad():
        y32, S32 = layer(x)
        y64, S64 = layer.double()(x.double())
    assert (y32.double() - y64).abs().max() < 1e-4 and (S32.double() - S64).abs().max() < 1e-4


def test_xpos_option_is_checked():
    with pytest.raises(InputError, match="xpos"):
        rnnkit.layers.build("retnet", d_model=8, xpos="yes")


def test_decays_are_exact_after_a_cast_to_float64():
    """A layer built in fp32 and cast with ``.double()`` computes exactly what the same weights built
    in fp64 compute: no constant of the layer keeps the rounding of the dtype it was built in."""
    torch.manual_seed(0)
    built32 = rnnkit.layers.build("retnet", d_model=8, num_heads=2, xpos=False).double()
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        built64 = rnnkit.layers.build("retnet", d_model=8, num_heads=2, xpos=False)
    finally:
        torch.set_default_dtype(before)
    built64.load_state_dict(built32.state_dict())
    x = torch.randn(2, 40, 8, dtype=torch.float64)
    for mode in built32.modes:
        torch.testing.assert_close(built32(x, mode=mode)[0], built64(x, mode=mode)[0], rtol=1e-13, atol=1e-13)
    decay = built32.log_gamma.exp()
    assert torch.equal(decay, 1 - torch.exp2(-5.0 - torch.arange(2, dtype=torch.float64)))


def test_state_dict_with_the_decay_buffer_loads():
    layer = rnnkit.layers.build("retnet", d_model=8, num_heads=2)
    state = dict(layer.state_dict(), log_gamma=torch.zeros(2))
    layer.load_state_dict(state)  # strict: the old key is accepted and ignored
    assert "log_gamma" not in layer.state_dict()
