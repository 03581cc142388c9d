"""RWKV-7 ("Goose") time mixing: Peng et al. 2025, "RWKV-7 'Goose' with Expressive Dynamic State
Evolution", section 4. Per head, with state ``S`` ``(V, K)`` as in the paper:

    S_t = S_{t-1} (diag(w_t) - kappa_t^T (a_t ⊙ kappa_t)) + v_t^T k~_t        y_t = S_t r_t
    out_t = W_o ((GroupNorm_h(y_t) + ((r_t ⊙ k~_t ⊙ rho) . 1) v_t) ⊙ g_t)

the generalised delta rule: a vector-valued decay ``w_t = exp(-e^{-1/2} sigmoid(w_0 + lora_w))``
in ``(e^{-e^{-1/2}}, 1)``, an in-context learning rate ``a_t = sigmoid(a_0 + lora_a)`` per channel,
the removal key ``kappa_t = normalize(k_t ⊙ xi)`` (per head) apart from the replacement key
``k~_t = k_t ⊙ (1 + (a_t - 1) ⊙ alpha)``, a bonus ``rho`` of the current token and an output gate
``g_t = sigmoid(x^g_t G_1) G_2``. Each ``x^*_t = x_t + (x_{t-1} - x_t) ⊙ mu_*`` is a (static)
token shift, so the state is :class:`~rnnkit.layers._shift.ShiftState`: the last input and ``S``
(kept transposed, ``(K, V)``). The value residual across layers (the first layer's ``v`` mixed
into later ones) is not part of this layer: a layer sees only its own input.

Kernel: :func:`rnnkit.ops.dplr_delta_rule`, the delta rule with a diagonal-plus-low-rank
transition, ``a = -(a_t ⊙ kappa_t)`` and ``b = kappa_t`` in its notation; ``recurrent`` is its
loop, ``chunk`` its chunkwise form (``benchmarks/delta_speed.py`` times the two against
``gated_deltanet``).

Initialisation as the authors' code, with ``depth`` = layer index / number of layers setting the
token-shift mixes and the decay speeds; the first LoRA factors and ``rho`` start small and random
rather than at zero, so that every parameter has a gradient from the first step.
"""

from __future__ import annotations

import math
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
    merge_heads,
    split_heads,
)
from rnnkit.layers._shift import ShiftState, TokenShiftRecurrence, at_last_step, previous_inputs
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.delta_rule import DPLR_CHUNK_SIZE, dplr_delta_rule, dplr_delta_rule_step

#: The token-shift interpolations and how fast each one's initial mix falls across channels.
MIXES = {"r": 0.2, "w": 0.9, "k": 0.7, "v": 0.7, "a": 0.9, "g": 0.2}


@dataclass
class RWKV7Config:
    """Options of :class:`RWKV7`."""

    d_model: int  # input and output width D
    num_heads: int = 4  # H
    head_dim: int | None = None  # K = V per head; default D / H (the authors use 64)
    decay_rank: int = 64  # rank of the decay LoRA
    rate_rank: int = 64  # rank of the in-context learning rate's LoRA
    gate_rank: int = 128  # rank of the output gate
    depth: float = 0.0  # layer index / number of layers, for the initialisation
    norm_eps: float = 1e-5  # of the per-head group norm
    chunk_size: int = DPLR_CHUNK_SIZE  # C of the chunk mode

    def __post_init__(self) -> None:
        self.head_dim = check_head_config(self.d_model, self.num_heads, self.head_dim)
        for name in ("decay_rank", "rate_rank", "gate_rank", "chunk_size"):
            check_positive_int(name, getattr(self, name))
        self.depth = check_depth(self.depth)
        check_positive_number("norm_eps", self.norm_eps)


@register(
    "rwkv7",
    description="RWKV-7 / Goose (Peng et al. 2025): generalised delta rule, vector decay, in-context rate",
    test_configs={
        "default": {"num_heads": 2, "head_dim": 3, "decay_rank": 2, "rate_rank": 2, "gate_rank": 3,
                    "chunk_size": 16},
        "deep": {"num_heads": 1, "decay_rank": 1, "rate_rank": 1, "gate_rank": 2, "depth": 0.5, "chunk_size": 8},
    },
)
class RWKV7(TokenShiftRecurrence):
    """RWKV-7 time-mixing layer: the math and the kernel are in the module docstring.

    Args: the fields of :class:`RWKV7Config`.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``, the state a ``ShiftState`` of the last input
    ``(B, D)`` and ``S`` ``(B, H, K, K)`` (``K = head_dim``, by default ``D / H``).

    Example:
        >>> rwkv = RWKV7(d_model=32, num_heads=4)
        >>> y, state = rwkv(torch.randn(3, 50, 32))       # y (3, 50, 32), state.S (3, 4, 8, 8)
    """

    autocast_safe = False  # the diagonal-plus-low-rank kernel takes one dtype; see Recurrence.autocast_safe
    takes_depth = True

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = c = make_config(RWKV7Config, "rwkv7", config)
        D, H = c.d_model, c.num_heads
        self.d_input = self.d_output = D
        self.head_dim = K = c.head_dim
        A = H * K  # the width of r, k, v, the decay and the rate
        self.mix = nn.Parameter(torch.empty(len(MIXES), D))  # mu_r, mu_w, mu_k, mu_v, mu_a, mu_g
        self.decay = nn.Parameter(torch.empty(A))  # w_0
        self.decay_down = nn.Parameter(torch.empty(D, c.decay_rank))
        self.decay_up = nn.Parameter(torch.empty(c.decay_rank, A))
        self.rate = nn.Parameter(torch.empty(A))  # a_0
        self.rate_down = nn.Parameter(torch.empty(D, c.rate_rank))
        self.rate_up = nn.Parameter(torch.empty(c.rate_rank, A))
        self.gate_down = nn.Parameter(torch.empty(D, c.gate_rank))  # G_1
        self.gate_up = nn.Parameter(torch.empty(c.gate_rank, A))  # G_2
        self.removal_scale = nn.Parameter(torch.empty(A))  # xi
        self.replacement_mix = nn.Parameter(torch.empty(A))  # alpha
        self.bonus = nn.Parameter(torch.empty(H, K))  # rho
        self.r_proj = nn.Linear(D, A, bias=False)
        self.k_proj = nn.Linear(D, A, bias=False)
        self.v_proj = nn.Linear(D, A, bias=False)
        self.o_proj = nn.Linear(A, D, bias=False)
        self.norm = HeadNorm(H, K, kind="layer", eps=c.norm_eps)  # GroupNorm with H groups
        self.reset_parameters()

    def reset_parameters(self) -> None:
        c = self.config
        D, A = c.d_model, self.decay.numel()
        shallow = 1.0 - c.depth
        with torch.no_grad():
            ddd = torch.arange(D, dtype=torch.float64) / D
            self.mix.copy_(torch.stack([1 - ddd ** (speed * shallow) for speed in MIXES.values()]))
            n = torch.arange(A, dtype=torch.float64) / max(A - 1, 1)
            self.decay.copy_(-7 + 5 * n ** (0.85 + c.depth**0.5) + 0.5)
            self.rate.zero_()
            for down, up in ((self.decay_down, self.decay_up), (self.rate_down, self.rate_up),
                             (self.gate_down, self.gate_up)):
                down.uniform_(-1e-2, 1e-2)
                up.uniform_(-0.1, 0.1)
            self.removal_scale.fill_(0.85)
            self.replacement_mix.fill_(1.0)
            self.bonus.uniform_(-0.1, 0.1)
        self._reset_outputs(self.r_proj, self.k_proj, self.v_proj, self.o_proj)

    def _inputs(self, x, previous):
        """From inputs ``x`` and the inputs before them (``(..., D)`` each): ``r``, ``k`` (the
        replacement key), ``v``, the rate ``a``, ``log w``, the output gate and the removal key
        before its normalisation, each ``(..., H K)``."""
        xx = previous - x
        xr, xw, xk, xv, xa, xg = (x + xx * m for m in self.mix)
        r, k, v = self.r_proj(xr), self.k_proj(xk), self.v_proj(xv)
        # log w = -e^{-1/2} sigmoid(.): the decay stays in (exp(-e^{-1/2}), 1)
        log_w = -math.exp(-0.5) * torch.sigmoid(self.decay + torch.tanh(xw @ self.decay_down) @ self.decay_up)
        rate = torch.sigmoid(self.rate + (xa @ self.rate_down) @ self.rate_up)  # a_t
        gate = torch.sigmoid(xg @ self.gate_down) @ self.gate_up
        removal = k * self.removal_scale
        k = k * (1 + (rate - 1) * self.replacement_mix)  # the replacement key
        return r, k, v, rate, log_w, gate, removal

    def _forward(self, x, state, lengths, mode):
        H = self.config.num_heads
        r, k, v, rate, log_w, gate, removal = self._inputs(x, previous_inputs(x, state.shift))  # (B, T, H K)
        kappa = F.normalize(split_heads(removal, H), dim=-1)  # (B, H, T, K)
        r, k, v, rate, log_w = (split_heads(t, H) for t in (r, k, v, rate, log_w))
        o, S = dplr_delta_rule(r, k, v, -rate * kappa, kappa, log_w, state.S, lengths, mode=mode,
                               chunk_size=self.config.chunk_size)  # (B, H, T, K)
        o = self.norm(merge_heads(o)) + merge_heads((r * k * self.bonus[:, None, :]).sum(-1, keepdim=True) * v)
        return self.o_proj(o * gate), ShiftState(at_last_step(x, lengths, 1), S)

    def _step(self, x_t, state):
        # The recurrent form at one step without its time axis (head splits, the op's checks, a stack
        # of one output): the decoding path (benchmarks/decode_speed.py --profile).
        B, H, K = x_t.shape[0], self.config.num_heads, self.head_dim
        r, k, v, rate, log_w, gate, removal = self._inputs(x_t, state.shift)  # (B, H K)
        kappa = F.normalize(removal.view(B, H, K), dim=-1)
        r, k, v, rate, log_w = (t.view(B, H, K) for t in (r, k, v, rate, log_w))
        o, S = dplr_delta_rule_step(r, k, v, -rate * kappa, kappa, log_w, state.S)  # (B, H, K)
        o = self.norm(o.reshape(B, H * K)) + ((r * k * self.bonus).sum(-1, keepdim=True) * v).reshape(B, H * K)
        return self.o_proj(o * gate), ShiftState(x_t, S)
