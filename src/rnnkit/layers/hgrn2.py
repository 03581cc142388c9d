"""HGRN2: Qin et al. 2024, "HGRN2: Gated Linear RNNs with State Expansion", section 3. Per head, with
state ``S`` ``(K, V)``:

    f_t = gamma + (1 - gamma) sigmoid(W_f x_t)              the forget gate, in (gamma, 1) per channel
    S_t = diag(f_t) S_{t-1} + (1 - f_t) i_t^T               i_t = W_i x_t   (B, H, V)
    y_t = W_o RMSNorm_h(S_t^T o_t)                          o_t = SiLU(W_q x_t)

HGRN's forget gate with its input gate tied to ``1 - f_t``, expanded from a vector to a matrix state
by the outer product with the input (the state expansion: ``K`` channels of forget gate per head).
The forget gate's lower bound ``gamma`` rises with depth so that upper layers keep longer memories;
HGRN learns it as a cumulative softmax across layers, which starts at ``gamma = layer index / number
of layers``: here ``gamma = depth`` (``0`` for the first layer, as in the paper), fixed. The model's
stacks set ``depth`` from each block's position (:func:`rnnkit.layers.pattern.with_depth`).

Kernel: :mod:`rnnkit.ops.gated_linear_attention` with per-key-dimension decay (``q = o``,
``k = 1 - f``, ``v = i``, ``log_decay = log f``, taken in log space so that it stays exact where
``f`` is near 0); ``recurrent`` is its loop, ``chunk`` its chunkwise form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import InputError, check_positive_int
from rnnkit.layers._multihead import (
    HeadNorm,
    MultiHeadRecurrence,
    check_head_config,
    check_positive_number,
    check_power_of_two,
    merge_heads,
    split_heads,
)
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.gated_linear_attention import DEFAULT_CHUNK, gated_linear_attention


@dataclass
class HGRN2Config:
    """Options of :class:`HGRN2`."""

    d_model: int  # input and output width D
    num_heads: int = 4  # H
    expand_ratio: int = 16  # K, the forget gate's channels per head (the state expansion)
    head_dim: int | None = None  # V per head; default D / H
    depth: float = 0.0  # layer index / number of layers, in [0, 1): the forget gate's lower bound
    norm_eps: float = 1e-5  # of the per-head RMSNorm
    chunk_size: int = DEFAULT_CHUNK  # C of the chunk mode (a power of two)

    def __post_init__(self) -> None:
        self.head_dim = check_head_config(self.d_model, self.num_heads, self.head_dim)
        check_positive_int("expand_ratio", self.expand_ratio)
        if isinstance(self.depth, bool) or not isinstance(self.depth, (int, float)) or not 0 <= self.depth < 1:
            raise InputError(f"depth: expected a number in [0, 1) (layer index / number of layers), got {self.depth!r}")
        self.depth = float(self.depth)
        check_positive_number("norm_eps", self.norm_eps)
        check_power_of_two("chunk_size", self.chunk_size)


@register(
    "hgrn2",
    description="HGRN2 (Qin et al. 2024): gated linear RNN, outer-product state, depth-bounded forget gate",
    test_configs={
        "default": {"num_heads": 2, "expand_ratio": 2, "head_dim": 3, "chunk_size": 16},
        "deep": {"num_heads": 1, "expand_ratio": 3, "depth": 0.5, "chunk_size": 8},
    },
)
class HGRN2(MultiHeadRecurrence):
    """HGRN2 layer (see the module docstring for the math and the kernel).

    Args: the fields of :class:`HGRN2Config`.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state ``(B, H, K, V)``, ``K = expand_ratio``,
    ``V = D / H`` unless ``head_dim`` is given.

    Example:
        >>> layer = HGRN2(d_model=64, num_heads=4, depth=0.5)
        >>> y, S = layer(torch.randn(2, 100, 64))      # y (2, 100, 64), S (2, 4, 16, 16)
    """

    MODES = ("recurrent", "chunk")
    takes_depth = True

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = c = make_config(HGRN2Config, "hgrn2", config)
        H, K, V = c.num_heads, c.expand_ratio, c.head_dim
        self.d_input = self.d_output = c.d_model
        self.q_proj = nn.Linear(c.d_model, H * K, bias=False)  # the output gate o
        self.f_proj = nn.Linear(c.d_model, H * K, bias=True)  # the forget gate
        self.i_proj = nn.Linear(c.d_model, H * V, bias=False)  # the input
        self.o_proj = nn.Linear(H * V, c.d_model, bias=False)
        self.norm = HeadNorm(H, V, kind="rms", eps=c.norm_eps)

    def _init_state(self, batch_size, device, dtype):
        c = self.config
        return torch.zeros(batch_size, c.num_heads, c.expand_ratio, c.head_dim, device=device, dtype=dtype)

    def _forward(self, x, state, lengths, mode):
        c = self.config
        z = split_heads(self.f_proj(x), c.num_heads)  # (B, H, T, K)
        gamma = c.depth
        if gamma == 0:
            log_f = F.logsigmoid(z)
        else:  # log(gamma + (1 - gamma) sigmoid(z)), without forming f
            log_f = torch.logaddexp(torch.full_like(z, math.log(gamma)), math.log1p(-gamma) + F.logsigmoid(z))
        k = (1 - gamma) * torch.sigmoid(-z)  # 1 - f
        q = F.silu(split_heads(self.q_proj(x), c.num_heads))
        v = split_heads(self.i_proj(x), c.num_heads)  # (B, H, T, V)
        o, S = gated_linear_attention(q, k, v, log_f, state, lengths, mode=mode, chunk_size=c.chunk_size)
        return self.o_proj(self.norm(merge_heads(o))), S
