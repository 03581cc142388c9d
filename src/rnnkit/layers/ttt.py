"""TTT-Linear and TTT-MLP: the hidden state is a model, updated by gradient descent on each token.

    W_t = W_{t-1} - lr_t grad l(W_{t-1}; x_t),   l(W; x) = 1/2 ||f_W(theta_K x) - theta_V x||^2,
    z_t = f_{W_t}(theta_Q x_t),                  f_W(u) = u + LN(mlp_W(u))                (per head)

Sun, Li, Dalal, Xu, Vikram, Zhang, Dubois, Chen, Wang, Koyejo, Hashimoto & Guestrin, "Learning to
(Learn at Test Time): RNNs with Expressive Hidden States" (2024). ``ttt_linear``: ``mlp_W(u) = u W +
b``; ``ttt_mlp``: ``mlp_W(u) = GELU(u W1 + b1) W2 + b2`` with a hidden width of ``expansion * K``. As
in the paper: learned views ``theta_K``, ``theta_V``, ``theta_Q`` (one projection each), learned
initial inner weights (``W0 ~ N(0, 0.02^2)``, zero biases), the inner model's LayerNorm + residual
with learned weight and bias (not updated by the inner loop), a learned per-token learning rate
``lr_t = base_lr * sigmoid(w_h . x_t + c_h) / K`` per head, and after the inner model a LayerNorm over
all heads, an optional GELU gate and the output projection.

**Mini-batches are part of the recurrence.** ``mini_batch_size = b`` (16 in the paper) takes every
gradient of a mini-batch of ``b`` tokens at the weights the mini-batch started from, each token's
output with the weights after its own update (the paper's mini-batch TTT, section 2.4; its reference
code also averages the pending gradients with weights ``1/i``, which rnnkit leaves out so that the
learning rate alone scales each step). ``recurrent`` computes exactly this token by token, keeping
the mini-batch-start weights and the current ones in the state (:class:`TTTState`), and commits at
each mini-batch's end; ``chunk`` computes the same function a mini-batch at a time in the paper's
dual form (no weight per token; memory linear in ``T``). With ``b = 1`` both are plain per-token
gradient descent, the equation above. See :mod:`rnnkit.layers._fast_weights` for the recurrence in
full and how continuing a sequence mid-mini-batch lines up.

Left out: the paper's causal convolutions on the views and rotary positions (the Mamba backbone's),
and the learnable per-position rate of the reference code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import check_positive_int
from rnnkit.layers._fast_weights import (
    FastWeightLayer,
    Gates,
    InnerSpec,
    LNHead,
    TTTState,
    check_bool,
    check_positive_number,
)
from rnnkit.layers._multihead import check_head_config, merge_heads, split_heads
from rnnkit.layers.registry import make_config, register

__all__ = ["TTTConfig", "TTTLinear", "TTTMLP", "TTTMLPConfig", "TTTState"]


@dataclass
class TTTConfig:
    """TTT-Linear options."""

    d_model: int  # input and output width D
    num_heads: int = 4  # H
    head_dim: int | None = None  # K, the inner model's width per head; default D // H
    mini_batch_size: int = 16  # b: gradients of b tokens at the weights their mini-batch started from
    base_lr: float = 1.0  # lr_t = base_lr * sigmoid(.) / K
    use_gate: bool = False  # multiply the normed output by GELU(W_g x) before the output projection
    norm_eps: float = 1e-6  # epsilon of the inner LayerNorm and of the output LayerNorm

    def __post_init__(self) -> None:
        self.head_dim = check_head_config(self.d_model, self.num_heads, self.head_dim)
        check_positive_int("mini_batch_size", self.mini_batch_size)
        check_positive_number("base_lr", self.base_lr)
        check_bool("use_gate", self.use_gate)
        check_positive_number("norm_eps", self.norm_eps)


@dataclass
class TTTMLPConfig(TTTConfig):
    """TTT-MLP options: TTT-Linear's and the hidden width of the inner MLP."""

    expansion: int = 4  # the inner MLP's hidden width is expansion * K (4 in the paper)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("expansion", self.expansion)


class _TTT(FastWeightLayer):
    """Shared body of TTT-Linear and TTT-MLP; ``hidden`` is None for the linear inner model."""

    def __init__(self, config: TTTConfig, hidden: int | None) -> None:
        super().__init__()
        self.config = config
        D, H, K = config.d_model, config.num_heads, config.head_dim
        self.num_heads, self.head_dim = H, K
        self.d_input = self.d_output = D
        self.spec = InnerSpec(depth=1 if hidden is None else 2, bias=True, momentum=False,
                              mini_batch=config.mini_batch_size)
        widths = [K, K] if hidden is None else [K, hidden, K]
        shapes = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            shapes += [(H, fan_in, fan_out), (H, fan_out)]
        self.inner = nn.ParameterList([nn.Parameter(torch.zeros(shape)) for shape in shapes])
        self.qkv_proj = nn.Linear(D, 3 * H * K, bias=False)  # [theta_Q | theta_K | theta_V]
        self.lr_proj = nn.Linear(D, H)
        self.ttt_norm_weight = nn.Parameter(torch.ones(H, K))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(H, K))
        self.post_norm = nn.LayerNorm(H * K, eps=config.norm_eps)
        self.gate_proj = nn.Linear(D, H * K, bias=False) if config.use_gate else None
        self.out_proj = nn.Linear(H * K, D, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02^2) for the projections and the initial inner weight matrices, zero biases (the
        learning-rate gate's included), unit LayerNorm weights: the reference implementation's."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for p in self.inner:
            if p.dim() == 3:
                nn.init.normal_(p, std=0.02)
            else:
                nn.init.zeros_(p)

    def _ln(self) -> LNHead:
        return LNHead(self.ttt_norm_weight, self.ttt_norm_bias, self.config.norm_eps)

    def _inner_inputs(self, x):
        H, K = self.num_heads, self.head_dim
        q, k, v = (split_heads(t, H) for t in self.qkv_proj(x).split(H * K, -1))  # (B, H, T, K) each
        lr = self.config.base_lr * torch.sigmoid(self.lr_proj(x)).transpose(1, 2) / K  # (B, H, T)
        return q, k, v, Gates(lr)

    def _output(self, y, x):
        y = self.post_norm(merge_heads(y))  # (B, T, HK)
        if self.gate_proj is not None:
            y = F.gelu(self.gate_proj(x)) * y
        return self.out_proj(y)


@register(
    "ttt_linear",
    description="TTT-Linear (Sun et al. 2024): a linear model per head trained on each token (mini-batch TTT, dual form)",
    test_configs={
        "default": {"num_heads": 2, "head_dim": 3, "mini_batch_size": 4},
        "per-token-gate": {"num_heads": 1, "head_dim": 4, "mini_batch_size": 1, "use_gate": True},
    },
)
class TTTLinear(_TTT):
    """TTT-Linear (Sun et al. 2024): per head, ``f_W(u) = u + LN(u W + b)`` trained at test time.

    Args:
        d_model: input and output width D.
        num_heads: H.
        head_dim: K per head (default ``D // H``).
        mini_batch_size: b, part of the recurrence (module docstring); 1 is per-token TTT.
        base_lr: scale of the inner learning rate ``base_lr * sigmoid(.) / K``.
        use_gate: output gate ``GELU(W_g x)`` after the output LayerNorm.
        norm_eps: LayerNorm epsilon.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state :class:`TTTState` with ``start`` and ``weights``
    each ``(W (B, H, K, K), b (B, H, K))`` and ``count`` ``(B, 1)``: ``2H(K^2 + K) + 1`` floats. Modes:
    ``recurrent`` (token by token, the definition), ``chunk`` (the dual form; the default).

    Example:
        >>> layer = TTTLinear(d_model=64, num_heads=4)
        >>> y, state = layer(torch.randn(2, 100, 64))     # y (2, 100, 64), state.weights[0] (2, 4, 16, 16)
        >>> y_t, state = layer.step(torch.randn(2, 64), state)
    """

    def __init__(self, **config) -> None:
        super().__init__(make_config(TTTConfig, "ttt_linear", config), hidden=None)


@register(
    "ttt_mlp",
    description="TTT-MLP (Sun et al. 2024): a two-layer MLP per head trained on each token (mini-batch TTT, dual form)",
    test_configs={
        "default": {"num_heads": 1, "head_dim": 3, "expansion": 2, "mini_batch_size": 4},
    },
)
class TTTMLP(_TTT):
    """TTT-MLP (Sun et al. 2024): per head, ``f_W(u) = u + LN(GELU(u W1 + b1) W2 + b2)`` trained at
    test time.

    Args:
        d_model, num_heads, head_dim, mini_batch_size, base_lr, use_gate, norm_eps: as :class:`TTTLinear`.
        expansion: the hidden width of the inner MLP is ``expansion * K``.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state :class:`TTTState` with ``start`` and ``weights``
    each ``(W1 (B, H, K, E), b1 (B, H, E), W2 (B, H, E, K), b2 (B, H, K))``, ``E = expansion * K``, and
    ``count`` ``(B, 1)``: ``2H(2KE + E + K) + 1`` floats. Modes: ``recurrent``, ``chunk`` (the default).

    Example:
        >>> layer = TTTMLP(d_model=64, num_heads=4)
        >>> y, state = layer(torch.randn(2, 100, 64))     # state.weights[0] (2, 4, 16, 64)
    """

    def __init__(self, **config) -> None:
        config = make_config(TTTMLPConfig, "ttt_mlp", config)
        super().__init__(config, hidden=config.expansion * config.head_dim)
