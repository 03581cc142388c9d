"""The mLSTM block of xLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory", section 2.3
and the pre-up-projection block of Appendix B / Fig. 10):

    [x_m, z] = W_up x_t                         x_c = swish(conv4(x_m))
    q = W_q x_c,  k = W_k x_c / sqrt(K),  v = W_v x_m,  [log i, f~] = W_if [q; k; v] + b_if
    h = mLSTM(q, k, v, log i, logsigmoid(f~))   (matrix memory, exponential input gate, max-stabiliser,
                                                 normaliser state: :mod:`rnnkit.ops.mlstm`)
    y_t = W_down ((GroupNorm_h(h) + s ⊙ x_c) ⊙ swish(z))

Initialisation as the paper's code: forget-gate biases ``linspace(3, 6)`` over heads (long memory
at the start), input-gate bias ``N(0, 0.1)``, gate weights zero, learnable skip ``s = 1``; other
projections as ``torch.nn.Linear``. The paper's q/k/v projections are block-diagonal (blocks of 4);
here they are dense. The state is the convolution's history and the cell's ``(C, n, m)``: the
stabiliser ``m`` is part of the state, so chunked training, split sequences and step-by-step
inference all compute the loop's stabilised values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import InputError, check_positive_int
from rnnkit.layers._multihead import HeadNorm, MultiHeadRecurrence, ShortConv, merge_heads, split_heads
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.gated_linear_attention import DEFAULT_CHUNK
from rnnkit.ops.mlstm import MLSTMState, mlstm


class MLSTMLayerState(NamedTuple):
    """``conv`` (B, E, W-1) convolution history; ``C`` (B, H, K, K), ``n`` (B, H, K), ``m`` (B, H)."""

    conv: torch.Tensor
    C: torch.Tensor
    n: torch.Tensor
    m: torch.Tensor


@dataclass
class MLSTMConfig:
    """Options of :class:`MLSTM`."""

    d_model: int  # input and output width D
    num_heads: int = 4  # H
    expand: float = 2.0  # inner width E = expand * D (the paper's pre-up-projection factor 2)
    conv_size: int = 4  # causal convolution width before q and k
    eps: float = 1e-6  # added to the cell's denominator
    chunk_size: int = DEFAULT_CHUNK  # C of the chunk mode

    def __post_init__(self) -> None:
        check_positive_int("d_model", self.d_model)
        check_positive_int("num_heads", self.num_heads)
        if not isinstance(self.expand, (int, float)) or self.expand <= 0:
            raise InputError(f"expand: expected a positive number, got {self.expand!r}")
        inner = round(self.expand * self.d_model)
        if inner < self.num_heads or inner % self.num_heads:
            raise InputError(
                f"num_heads: expected a divisor of the inner width round(expand * d_model) = {inner}, "
                f"got {self.num_heads}"
            )
        check_positive_int("conv_size", self.conv_size, minimum=2)
        check_positive_int("chunk_size", self.chunk_size)


@register(
    "mlstm",
    description="xLSTM mLSTM block (Beck et al. 2024): matrix memory, exponential gating, stabiliser",
    test_configs={"default": {"num_heads": 2, "expand": 1.2, "conv_size": 2, "chunk_size": 16}},
)
class MLSTM(MultiHeadRecurrence):
    """mLSTM block (see the module docstring for the math and reference).

    Args: the fields of :class:`MLSTMConfig`.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state :class:`MLSTMLayerState`.

    Example:
        >>> layer = MLSTM(d_model=64, num_heads=4)
        >>> y, state = layer(torch.randn(2, 100, 64))      # y (2, 100, 64); state.C (2, 4, 32, 32)
    """

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = c = make_config(MLSTMConfig, "mlstm", config)
        self.d_input = self.d_output = c.d_model
        E = self.inner = round(c.expand * c.d_model)
        self.head_dim = E // c.num_heads
        self.up_proj = nn.Linear(c.d_model, 2 * E)
        self.conv = ShortConv(E, c.conv_size)
        self.q_proj = nn.Linear(E, E, bias=False)
        self.k_proj = nn.Linear(E, E, bias=False)
        self.v_proj = nn.Linear(E, E, bias=False)
        self.gate_proj = nn.Linear(3 * E, 2 * c.num_heads)  # input and forget pre-activations per head
        self.norm = HeadNorm(c.num_heads, self.head_dim, kind="layer")
        self.skip = nn.Parameter(torch.ones(E))
        self.down_proj = nn.Linear(E, c.d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        H = self.config.num_heads
        with torch.no_grad():
            nn.init.zeros_(self.gate_proj.weight)
            self.gate_proj.bias[:H].normal_(0.0, 0.1)  # input gate
            self.gate_proj.bias[H:].copy_(torch.linspace(3.0, 6.0, H))  # forget gate

    def _init_state(self, batch_size, device, dtype):
        c, K = self.config, self.head_dim
        z = dict(device=device, dtype=dtype)
        return MLSTMLayerState(
            self.conv.init_state(batch_size, **z),
            torch.zeros(batch_size, c.num_heads, K, K, **z),
            torch.zeros(batch_size, c.num_heads, K, **z),
            torch.zeros(batch_size, c.num_heads, **z),
        )

    def _forward(self, x, state, lengths, mode):
        c = self.config
        H = c.num_heads
        x_m, z = self.up_proj(x).chunk(2, -1)  # (B, T, E) each
        x_c, conv_state = self.conv(x_m, state.conv, lengths)  # (B, T, E)
        q, k, v = self.q_proj(x_c), self.k_proj(x_c), self.v_proj(x_m)  # (B, T, E)
        log_i, f_pre = self.gate_proj(torch.cat([q, k, v], -1)).chunk(2, -1)  # (B, T, H) each
        q, k, v = split_heads(q, H), split_heads(k, H) * self.head_dim**-0.5, split_heads(v, H)  # (B, H, T, K)
        log_i, log_f = log_i.transpose(1, 2), F.logsigmoid(f_pre).transpose(1, 2)  # (B, H, T)
        cell = MLSTMState(state.C, state.n, state.m)
        h, cell = mlstm(q, k, v, log_i, log_f, cell, lengths, eps=c.eps, mode=mode, chunk_size=c.chunk_size)
        y = (self.norm(merge_heads(h)) + self.skip * x_c) * F.silu(z)  # (B, T, E)
        return self.down_proj(y), MLSTMLayerState(conv_state, *cell)
