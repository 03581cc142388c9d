"""Titans' neural memory: a deep MLP per head learned at test time with momentum and forgetting.

    S_t = eta_t S_{t-1} - theta_t grad l(M_{t-1}; x_t),   l(M; x) = 1/2 ||M(k_t) - v_t||^2
    M_t = (1 - alpha_t) M_{t-1} + S_t                      y_t = M_t(q_t)                    (per head)

Behrouz, Zhong & Mirrokni, "Titans: Learning to Memorize at Test Time" (2025), section 3.1 (the
long-term memory module, its surprise with momentum and its forgetting) and 3.2 (chunked parallel
training). The memory ``M`` is an MLP of ``memory_depth`` linear layers without biases, hidden width
``expansion * K``, exact GELU between layers (a one-layer memory is the linear map ``k W``); keys,
values and queries are SiLU of linear projections, keys and queries L2-normalised per head (the
paper's section 4.4); ``theta_t = base_lr * sigmoid(.)``, ``eta_t = sigmoid(.)`` and ``alpha_t =
sigmoid(.)`` are per head and data-dependent. The read-out ``M_t(q_t)`` goes through a per-head
RMSNorm, an optional SiLU gate and the output projection. The initial memory is learned
(``N(0, 1/fan_in)``), the initial momentum zero.

**Mini-batches are part of the recurrence.** As in the paper's chunked training, ``mini_batch_size
= b`` takes every gradient of a mini-batch at the memory the mini-batch started from, ``grad l(M_0;
x_t)`` in place of ``grad l(M_{t-1}; x_t)``, while momentum and decay still run token by token, so
every token reads out with its own ``M_t``. ``recurrent`` computes this token by token (the state
keeps the mini-batch-start memory, the current memory and the momentum: :class:`TitansState`);
``chunk`` computes the same function a mini-batch at a time: the two linear scans of ``S`` and ``M``
over a mini-batch in closed form as decay matrices (``exp`` of differences of cumulative log gates),
so the read-outs take the dual form and no per-token memory is stored (memory linear in ``T``).
With ``b = 1`` it is the equation above. See :mod:`rnnkit.layers._fast_weights`.

Left out: the short convolutions on q, k, v. The paper's ways of combining the memory with attention
are in :mod:`rnnkit.layers.titans_hybrid`: memory as a context (``titans_mac``), as a gate
(``titans_mag``) and as a layer (the layer pattern ``titans,attention:window=w``).
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
    TitansState,
    check_bool,
    check_positive_number,
    silu_views,
)
from rnnkit.layers._multihead import HeadNorm, check_head_config, merge_heads
from rnnkit.layers.registry import make_config, register

__all__ = ["Titans", "TitansConfig", "TitansState"]


@dataclass
class TitansConfig:
    """Titans neural-memory options."""

    d_model: int  # input and output width D
    num_heads: int = 4  # H
    head_dim: int | None = None  # K, key/value width per head; default D // H
    memory_depth: int = 2  # L, linear layers of the memory MLP (the paper uses L >= 2)
    expansion: int = 2  # the memory's hidden width is expansion * K
    mini_batch_size: int = 16  # b: gradients of b tokens at the memory their mini-batch started from
    base_lr: float = 1.0  # theta_t = base_lr * sigmoid(.)
    use_gate: bool = False  # multiply the normed read-out by SiLU(W_g x) before the output projection
    norm_eps: float = 1e-5  # epsilon of the output RMSNorm

    def __post_init__(self) -> None:
        self.head_dim = check_head_config(self.d_model, self.num_heads, self.head_dim)
        check_positive_int("memory_depth", self.memory_depth)
        check_positive_int("expansion", self.expansion)
        check_positive_int("mini_batch_size", self.mini_batch_size)
        check_positive_number("base_lr", self.base_lr)
        check_bool("use_gate", self.use_gate)
        check_positive_number("norm_eps", self.norm_eps)


@register(
    "titans",
    description="Titans neural memory (Behrouz et al. 2025): a deep MLP learned at test time with momentum and decay",
    test_configs={
        "default": {"num_heads": 2, "head_dim": 3, "memory_depth": 2, "expansion": 2, "mini_batch_size": 4},
        "linear-per-token-gate": {"num_heads": 1, "head_dim": 4, "memory_depth": 1, "mini_batch_size": 1,
                                  "use_gate": True},
    },
)
class Titans(FastWeightLayer):
    """Titans' long-term neural memory as a layer (Behrouz et al. 2025).

    Args:
        d_model: input and output width D.
        num_heads: H.
        head_dim: K per head (default ``D // H``).
        memory_depth: L, linear layers of the memory MLP.
        expansion: hidden width ``E = expansion * K`` of a memory with ``L >= 2``.
        mini_batch_size: b, part of the recurrence (module docstring); 1 is per-token.
        base_lr: the largest inner learning rate.
        use_gate: output gate ``SiLU(W_g x)`` after the output norm.
        norm_eps: RMSNorm epsilon.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state :class:`TitansState`: ``start``, ``weights`` and
    ``momentum`` each a tuple of the L memory matrices ``(B, H, in, out)`` (``K x E``, ``E x E``...,
    ``E x K``; ``K x K`` for ``L = 1``), and ``count`` ``(B, 1)``: ``3HP + 1`` floats with ``P`` the
    memory's parameters per head (``2KE + (L - 2)E^2``, or ``K^2`` for ``L = 1``). Modes:
    ``recurrent`` (token by token, the definition), ``chunk`` (the default).

    Example:
        >>> layer = Titans(d_model=64, num_heads=4)
        >>> y, state = layer(torch.randn(2, 100, 64))     # state.weights[0] (2, 4, 16, 32)
        >>> y_t, state = layer.step(torch.randn(2, 64), state)
    """

    def __init__(self, **config) -> None:
        super().__init__()
        config = make_config(TitansConfig, "titans", config)
        self.config = config
        D, H, K, L = config.d_model, config.num_heads, config.head_dim, config.memory_depth
        self.num_heads, self.head_dim = H, K
        self.d_input = self.d_output = D
        self.spec = InnerSpec(depth=L, bias=False, momentum=True, mini_batch=config.mini_batch_size)
        widths = [K] + [config.expansion * K] * (L - 1) + [K]
        self.inner = nn.ParameterList(
            [nn.Parameter(torch.zeros(H, fan_in, fan_out)) for fan_in, fan_out in zip(widths[:-1], widths[1:])]
        )
        self.qkv_proj = nn.Linear(D, 3 * H * K, bias=False)  # [q | k | v]
        self.gate_params = nn.Linear(D, 3 * H)  # [theta | eta | alpha] logits per head
        self.gate_proj = nn.Linear(D, H * K, bias=False) if config.use_gate else None
        self.norm = HeadNorm(H, K, kind="rms", eps=config.norm_eps)
        self.out_proj = nn.Linear(H * K, D, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Projections N(0, 0.02^2); the initial memory N(0, 1/fan_in) so a read-out keeps its scale;
        gate biases so that ``theta = base_lr / 2``, ``eta = 1/2`` and ``alpha = sigmoid(-4) ~ 0.018``
        at the start (a mild decay: the memory keeps most of what it learned)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
        H = self.num_heads
        with torch.no_grad():
            self.gate_params.bias.zero_()
            self.gate_params.bias[2 * H :] = -4.0
        for p in self.inner:
            nn.init.normal_(p, std=p.shape[1] ** -0.5)

    def _ln(self):
        return None

    def _inner_inputs(self, x):
        H = self.num_heads
        q, k, v = silu_views(self.qkv_proj(x), H)  # (B, H, T, K) each
        theta, eta, alpha = self.gate_params(x).transpose(1, 2).split(H, 1)  # (B, H, T) logits each
        gates = Gates(self.config.base_lr * torch.sigmoid(theta), F.logsigmoid(eta), F.logsigmoid(-alpha))
        return q, k, v, gates

    def _output(self, y, x):
        gate = self.gate_proj(x) if self.gate_proj is not None else None
        return self.out_proj(self.norm(merge_heads(y), gate))
