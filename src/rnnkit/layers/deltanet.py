"""DeltaNet: multi-head linear attention whose matrix state is updated by the delta rule.

    S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        o_t = S_t^T q_t      (per head)

Schlag, Irie & Schmidhuber, "Linear Transformers Are Secretly Fast Weight Programmers" (2021), with
the architecture and chunkwise training of Yang, Wang, Zhang, Shen & Kim, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length" (NeurIPS 2024), Sec. 4: q, k, v projections,
each through a short causal depthwise convolution and SiLU, q and k L2-normalised per head,
``beta_t = sigmoid(W_beta x_t)`` per head, and a per-head RMSNorm on the output before the output
projection. ``allow_neg_eigval=True`` takes ``beta_t = 2 sigmoid(W_beta x_t)`` in ``(0, 2)`` so the
transition ``I - beta k k^T`` can have the eigenvalue ``1 - beta < 0``: Grazzi, Siems, Zela, Franke,
Hutter & Pontil, "Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues" (ICLR 2025),
who show that this lets DeltaNet solve parity, which it provably cannot with ``beta`` in ``(0, 1)``.

The kernel is :mod:`rnnkit.ops.delta_rule`; see there for the orientation of ``S`` (``(K, V)``).
:mod:`rnnkit.layers.gated_deltanet` adds a decay gate to the same layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import InputError, check_positive_int
from rnnkit.layers.base import Recurrence
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.delta_rule import CHUNK_SIZE, delta_rule_chunk, delta_rule_parallel, delta_rule_recurrent, delta_rule_step


class DeltaNetState(NamedTuple):
    """DeltaNet state: ``S`` (B, H, K, V) the matrix memory of every head, ``conv`` (B, W - 1, 2HK + HV)
    the last ``W - 1`` projected inputs that the short convolution still needs."""

    S: torch.Tensor
    conv: torch.Tensor


@dataclass
class DeltaNetConfig:
    """DeltaNet options."""

    d_model: int  # input and output width D
    num_heads: int = 4  # H
    head_dim: int | None = None  # K, the key/query width per head; default max(1, D // H)
    expand_v: float = 1.0  # V = round(expand_v * K), the value width per head
    conv_size: int = 4  # W, width of the short causal convolution on q, k, v (>= 2)
    allow_neg_eigval: bool = False  # beta in (0, 2) instead of (0, 1) (Grazzi et al. 2025)
    use_gate: bool = False  # multiply the normed output by SiLU(W_g x) before the output projection
    norm_eps: float = 1e-5  # epsilon of the output RMSNorm
    chunk_size: int = CHUNK_SIZE  # C, steps per chunk in mode "chunk"

    def __post_init__(self) -> None:
        check_positive_int("d_model", self.d_model)
        check_positive_int("num_heads", self.num_heads)
        if self.head_dim is None:
            self.head_dim = max(1, self.d_model // self.num_heads)
        check_positive_int("head_dim", self.head_dim)
        if not isinstance(self.expand_v, (int, float)) or isinstance(self.expand_v, bool) or self.expand_v <= 0:
            raise InputError(f"expand_v: expected a positive number, got {self.expand_v!r}")
        if round(self.expand_v * self.head_dim) < 1:
            raise InputError(f"expand_v: expected expand_v * head_dim >= 1, got {self.expand_v} * {self.head_dim}")
        check_positive_int("conv_size", self.conv_size, minimum=2)
        for name in ("allow_neg_eigval", "use_gate"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if not isinstance(self.norm_eps, (int, float)) or isinstance(self.norm_eps, bool) or not self.norm_eps > 0:
            raise InputError(f"norm_eps: expected a positive number, got {self.norm_eps!r}")
        check_positive_int("chunk_size", self.chunk_size)


_KERNELS = {"recurrent": delta_rule_recurrent, "parallel": delta_rule_parallel, "chunk": delta_rule_chunk}


class DeltaRuleLayer(Recurrence):
    """Shared body of DeltaNet and Gated DeltaNet; subclasses choose the decay (``_log_gate``)."""

    # "parallel" is the WY/UT form of the whole sequence as one chunk: quadratic in T, loop-free.
    MODES = ("recurrent", "parallel", "chunk")

    def __init__(self, config: DeltaNetConfig) -> None:
        super().__init__()
        self.config = config
        D, H, K = config.d_model, config.num_heads, config.head_dim
        V = round(config.expand_v * K)
        self.num_heads, self.head_dim, self.value_dim = H, K, V
        self.d_input = self.d_output = D
        self.qkv_width = 2 * H * K + H * V
        self.qkv_proj = nn.Linear(D, self.qkv_width, bias=False)  # [q | k | v]
        # Depthwise causal convolution, weight[c, w] multiplies the input w - (W - 1) steps back.
        self.conv_weight = nn.Parameter(torch.empty(self.qkv_width, config.conv_size))
        self.beta_proj = nn.Linear(D, H, bias=False)
        self.gate_proj = nn.Linear(D, H * V, bias=False) if config.use_gate else None
        self.norm_weight = nn.Parameter(torch.empty(V))
        self.out_proj = nn.Linear(H * V, D, bias=False)

    def reset_parameters(self) -> None:
        """Linear weights N(0, 0.02^2) and unit norm weights, as in the flash-linear-attention training
        setup the papers use; the convolution as ``torch.nn.Conv1d`` (U(-1/sqrt(W), 1/sqrt(W)))."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
        bound = 1.0 / math.sqrt(self.config.conv_size)
        nn.init.uniform_(self.conv_weight, -bound, bound)
        nn.init.ones_(self.norm_weight)

    # ---------------------------------------------------------------- pieces shared by forward and step
    def _log_gate(self, x: torch.Tensor) -> torch.Tensor | None:
        """``(..., H)`` log decay per head, or None for no decay (DeltaNet)."""
        return None

    def _beta(self, x: torch.Tensor) -> torch.Tensor:
        beta = torch.sigmoid(self.beta_proj(x))  # (..., H)
        return 2.0 * beta if self.config.allow_neg_eigval else beta

    def _qkv(self, mixed: torch.Tensor):
        """Convolved projections ``(..., 2HK + HV)`` -> q, k (..., H, K) and v (..., H, V)."""
        H, K, V = self.num_heads, self.head_dim, self.value_dim
        mixed = F.silu(mixed)
        q, k, v = mixed.split([H * K, H * K, H * V], -1)
        q = F.normalize(q.unflatten(-1, (H, K)), dim=-1) * K**-0.5  # (..., H, K); attention's 1/sqrt(K)
        k = F.normalize(k.unflatten(-1, (H, K)), dim=-1)  # (..., H, K): unit keys keep |1 - beta| <= 1
        return q, k, v.unflatten(-1, (H, V))

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``o`` (..., H, V) -> per-head RMSNorm (and gate) -> output projection (..., D)."""
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.config.norm_eps) * self.norm_weight
        o = o.flatten(-2)  # (..., H * V)
        if self.gate_proj is not None:
            o = o * F.silu(self.gate_proj(x))
        return self.out_proj(o)

    # ---------------------------------------------------------------- Recurrence hooks
    def _init_state(self, batch_size, device, dtype):
        H, K, V, W = self.num_heads, self.head_dim, self.value_dim, self.config.conv_size
        return DeltaNetState(
            torch.zeros(batch_size, H, K, V, device=device, dtype=dtype),
            torch.zeros(batch_size, W - 1, self.qkv_width, device=device, dtype=dtype),
        )

    def _forward(self, x, state, lengths, mode):
        B, T, _ = x.shape
        W = self.config.conv_size
        proj = torch.cat([state.conv, self.qkv_proj(x)], 1)  # (B, W - 1 + T, 2HK + HV)
        mixed = sum(proj[:, w : w + T] * self.conv_weight[:, w] for w in range(W))  # (B, T, 2HK + HV)
        q, k, v = self._qkv(mixed)  # (B, T, H, K), (B, T, H, K), (B, T, H, V)
        kwargs = {"chunk_size": self.config.chunk_size} if mode == "chunk" else {}
        o, S = _KERNELS[mode](q, k, v, self._beta(x), self._log_gate(x), state.S, lengths, **kwargs)
        # The convolution's next state: the W - 1 projections ending at each sequence's last valid step.
        if lengths is None:
            conv = proj[:, T:]
        else:
            index = lengths[:, None] + torch.arange(W - 1, device=x.device)  # (B, W - 1)
            conv = proj.gather(1, index[..., None].expand(B, W - 1, self.qkv_width))
        return self._output(o, x), DeltaNetState(S, conv)

    def _step(self, x_t, state):
        window = torch.cat([state.conv, self.qkv_proj(x_t)[:, None]], 1)  # (B, W, 2HK + HV)
        q, k, v = self._qkv((window * self.conv_weight.t()).sum(1))
        log_gate = self._log_gate(x_t)
        o, S = delta_rule_step(q, k, v, self._beta(x_t), log_gate, state.S)
        return self._output(o, x_t), DeltaNetState(S, window[:, 1:])

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self.config).items())


@register(
    "deltanet",
    description="DeltaNet (Yang et al. 2024): delta-rule linear attention, chunkwise WY/UT training",
    test_configs={
        "default": {"num_heads": 2, "head_dim": 3, "chunk_size": 16},
        "neg-eigval-gate": {"num_heads": 1, "head_dim": 4, "expand_v": 0.5, "conv_size": 2,
                            "allow_neg_eigval": True, "use_gate": True, "chunk_size": 16},
    },
)
class DeltaNet(DeltaRuleLayer):
    """DeltaNet layer (Yang et al. 2024), optionally with negative eigenvalues (Grazzi et al. 2025).

    Args:
        d_model: input and output width D.
        num_heads: H.
        head_dim: K per head (default ``max(1, D // H)``).
        expand_v: value width per head V = ``round(expand_v * K)``.
        conv_size: W of the short causal convolution on q, k, v.
        allow_neg_eigval: ``beta = 2 sigmoid(.)`` in ``(0, 2)`` instead of ``sigmoid(.)``.
        use_gate: output gate ``SiLU(W_g x)`` after the output norm.
        norm_eps: RMSNorm epsilon.
        chunk_size: C for ``mode="chunk"``.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state :class:`DeltaNetState` (``S`` (B, H, K, V),
    ``conv`` (B, W - 1, 2HK + HV)). Modes: ``recurrent`` (the loop), ``parallel`` (one ``(T, T)``
    WY/UT block), ``chunk`` (the default).

    Example:
        >>> layer = DeltaNet(d_model=64, num_heads=4, allow_neg_eigval=True)
        >>> y, state = layer(torch.randn(2, 100, 64))     # y (2, 100, 64), state.S (2, 4, 16, 16)
        >>> y_t, state = layer.step(torch.randn(2, 64), state)
    """

    def __init__(self, **config) -> None:
        super().__init__(make_config(DeltaNetConfig, "deltanet", config))
        self.reset_parameters()
