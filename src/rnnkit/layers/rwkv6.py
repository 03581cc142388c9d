"""RWKV-6 ("Finch") time mixing: Peng et al. 2024, "Eagle and Finch: RWKV with Matrix-Valued States
and Dynamic Recurrence", section 4 (eqs. 13-21). Per head, with state ``S`` ``(K, V)``:

    y_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T)        S_t = diag(w_t) S_{t-1} + k_t v_t^T
    w_t = exp(-exp(w_0 + tanh(x^w_t A_w) B_w))       (per channel, data-dependent: a LoRA)
    out_t = W_o (GroupNorm_h(y_t) ⊙ SiLU(W_g x^g_t))

where ``x^* = x_t + (x_{t-1} - x_t) ⊙ (mu_* + lora_*(x_t + (x_{t-1} - x_t) ⊙ mu_x))`` is the
data-dependent token shift (one low-rank ``tanh`` projection giving the five interpolations of
``w, k, v, r, g``), ``r, k, v`` are linear in ``x^r, x^k, x^v`` and ``u`` is the learned bonus of
the current token. The state is :class:`~rnnkit.layers._shift.ShiftState`: the last input (for the
token shift) and ``S``.

Kernel: ``recurrent`` is the loop above; ``chunk`` runs :mod:`rnnkit.ops.gated_linear_attention`
with per-key-dimension decay on the state *before* each step: with ``k, v, log w`` delayed by one
step (zeros in front), the op's state after step ``t`` is ``S_{t-1}`` and its read-out is
``r_t^T S_{t-1}``; the bonus is the elementwise ``(r_t ⊙ u ⊙ k_t) . 1 v_t``, and the final state is
one more update from the op's, at each sequence's last valid step.

Initialisation as the authors' code, with ``depth`` = layer index / number of layers setting the
token-shift mixes, the decay speeds ``w_0`` (from ``-6`` to ``-1`` across channels) and ``u``;
the first LoRA factors start small and random rather than at zero, so that every parameter has a
gradient from the first step. The channel-mix half of an RWKV block is not part of this layer: it is
the residual block's MLP option ``mlp="rwkv_channel_mix"`` (:mod:`rnnkit.models.channel_mix`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import check_positive_int
from rnnkit.layers._multihead import (
    HeadNorm,
    check_depth,
    check_head_config,
    check_positive_number,
    check_power_of_two,
    merge_heads,
    split_heads,
)
from rnnkit.layers._shift import ShiftState, TokenShiftRecurrence, at_last_step, previous_inputs
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.gated_linear_attention import DEFAULT_CHUNK, gated_linear_attention
from rnnkit.ops.padding import freeze_padding

#: The five token-shift interpolations, in the order of the LoRA's output.
MIXES = ("w", "k", "v", "r", "g")


@dataclass
class RWKV6Config:
    """Options of :class:`RWKV6`."""

    d_model: int  # input and output width D
    num_heads: int = 4  # H
    head_dim: int | None = None  # K = V per head; default D / H (the authors use 64)
    mix_rank: int = 32  # rank of the token-shift LoRA (one per interpolation)
    decay_rank: int = 64  # rank of the decay LoRA
    depth: float = 0.0  # layer index / number of layers, for the initialisation
    norm_eps: float = 1e-5  # of the per-head group norm
    chunk_size: int = DEFAULT_CHUNK  # C of the chunk mode (a power of two)

    def __post_init__(self) -> None:
        self.head_dim = check_head_config(self.d_model, self.num_heads, self.head_dim)
        check_positive_int("mix_rank", self.mix_rank)
        check_positive_int("decay_rank", self.decay_rank)
        self.depth = check_depth(self.depth)
        check_positive_number("norm_eps", self.norm_eps)
        check_power_of_two("chunk_size", self.chunk_size)


@register(
    "rwkv6",
    description="RWKV-6 / Finch (Peng et al. 2024): data-dependent token shift and per-channel decay, bonus u",
    test_configs={
        "default": {"num_heads": 2, "head_dim": 3, "mix_rank": 2, "decay_rank": 3, "chunk_size": 16},
        "deep": {"num_heads": 1, "mix_rank": 1, "decay_rank": 2, "depth": 0.75, "chunk_size": 8},
    },
)
class RWKV6(TokenShiftRecurrence):
    """RWKV-6 time-mixing layer (see the module docstring for the math and the kernel).

    Args: the fields of :class:`RWKV6Config`.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state :class:`~rnnkit.layers._shift.ShiftState`
    (``shift`` (B, D), ``S`` (B, H, K, K)), ``K = D / H`` unless ``head_dim`` is given.

    Example:
        >>> layer = RWKV6(d_model=64, num_heads=2)
        >>> y, state = layer(torch.randn(2, 100, 64))     # y (2, 100, 64), state.S (2, 2, 32, 32)
    """

    takes_depth = True

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = c = make_config(RWKV6Config, "rwkv6", config)
        D, H = c.d_model, c.num_heads
        self.d_input = self.d_output = D
        self.head_dim = K = c.head_dim
        A = H * K  # the width of r, k, v and the decay
        self.mix_x = nn.Parameter(torch.empty(D))  # mu_x
        self.mix = nn.Parameter(torch.empty(len(MIXES), D))  # mu_w, mu_k, mu_v, mu_r, mu_g
        self.mix_down = nn.Parameter(torch.empty(D, len(MIXES) * c.mix_rank))
        self.mix_up = nn.Parameter(torch.empty(len(MIXES), c.mix_rank, D))
        self.decay = nn.Parameter(torch.empty(A))  # w_0
        self.decay_down = nn.Parameter(torch.empty(D, c.decay_rank))  # A_w
        self.decay_up = nn.Parameter(torch.empty(c.decay_rank, A))  # B_w
        self.bonus = nn.Parameter(torch.empty(H, K))  # u
        self.r_proj = nn.Linear(D, A, bias=False)
        self.k_proj = nn.Linear(D, A, bias=False)
        self.v_proj = nn.Linear(D, A, bias=False)
        self.g_proj = nn.Linear(D, A, bias=False)
        self.o_proj = nn.Linear(A, D, bias=False)
        self.norm = HeadNorm(H, K, kind="layer", eps=c.norm_eps)  # GroupNorm with H groups
        self.reset_parameters()

    def reset_parameters(self) -> None:
        c = self.config
        D = c.d_model
        deep, shallow = c.depth, 1.0 - c.depth  # the authors' ratio_0_to_1 and ratio_1_to_almost0
        with torch.no_grad():
            ddd = torch.arange(D, dtype=torch.float64) / D
            self.mix_x.copy_(1 - ddd**shallow)
            mixes = {"w": 1 - ddd**shallow, "k": 1 - ddd**shallow, "v": 1 - (ddd**shallow + 0.3 * deep),
                     "r": 1 - ddd ** (0.5 * shallow), "g": 1 - ddd ** (0.5 * shallow)}
            self.mix.copy_(torch.stack([mixes[m] for m in MIXES]))
            A = self.decay.numel()
            n = torch.arange(A, dtype=torch.float64) / max(A - 1, 1)
            self.decay.copy_(-6 + 5 * n ** (0.7 + 1.3 * deep))
            bonus = deep * (1 - n) + ((torch.arange(A) + 1) % 3 - 1) * 0.1
            self.bonus.copy_(bonus.view_as(self.bonus))
            for down, up in ((self.mix_down, self.mix_up), (self.decay_down, self.decay_up)):
                down.uniform_(-1e-2, 1e-2)
                up.uniform_(-1e-2, 1e-2)
        self._reset_outputs(self.r_proj, self.k_proj, self.v_proj, self.g_proj, self.o_proj)

    def _inputs(self, x, shift):
        """The per-step quantities: ``r, k, v, log w`` ``(B, H, T, K)`` and the gate ``(B, T, H K)``."""
        B, T, D = x.shape
        H, R = self.config.num_heads, self.config.mix_rank
        xx = previous_inputs(x, shift) - x  # (B, T, D)
        lora = torch.tanh((x + xx * self.mix_x) @ self.mix_down).view(B, T, len(MIXES), R)
        mixes = torch.einsum("btmr,mrd->btmd", lora, self.mix_up) + self.mix  # (B, T, 5, D)
        xw, xk, xv, xr, xg = (x + xx * m for m in mixes.unbind(2))
        log_w = -torch.exp(self.decay + torch.tanh(xw @ self.decay_down) @ self.decay_up)  # (B, T, H K), < 0
        r, k, v = (split_heads(p(xp), H) for p, xp in ((self.r_proj, xr), (self.k_proj, xk), (self.v_proj, xv)))
        return r, k, v, split_heads(log_w, H), self.g_proj(xg)

    def _forward(self, x, state, lengths, mode):
        r, k, v, log_w, gate = self._inputs(x, state.shift)
        if mode == "recurrent":
            u = self.bonus[..., None]  # (H, K, 1): scales the rows of k_t v_t^T
            S = state.S
            ys = []
            for t, (r_t, k_t, v_t, g_t) in enumerate(zip(r.unbind(2), k.unbind(2), v.unbind(2), log_w.unbind(2))):
                kv = k_t[..., :, None] * v_t[..., None, :]  # (B, H, K, K)
                ys.append(torch.einsum("bhk,bhkv->bhv", r_t, S + u * kv))
                S = freeze_padding(t, lengths, torch.exp(g_t)[..., None] * S + kv, S)
            o = torch.stack(ys, 2)  # (B, H, T, K)
        else:
            # The op's state after step t is S_{t-1}: k, v and the decay delayed by one step.
            delayed = [F.pad(t, (0, 0, 1, -1)) for t in (k, v, log_w)]
            o, S_before = gated_linear_attention(r, *delayed, state.S, lengths, mode="chunk",
                                                 chunk_size=self.config.chunk_size)
            k_L, v_L, g_L = (at_last_step(t, lengths, 2) for t in (k, v, log_w))  # (B, H, K) each
            S = torch.exp(g_L)[..., None] * S_before + k_L[..., :, None] * v_L[..., None, :]
            o = o + (r * self.bonus[:, None, :] * k).sum(-1, keepdim=True) * v  # the current token's bonus
        y = self.o_proj(self.norm(merge_heads(o), gate))  # GroupNorm(o) ⊙ SiLU(W_g x^g)
        return y, ShiftState(at_last_step(x, lengths, 1), S)
