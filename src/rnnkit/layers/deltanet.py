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
``use_short_conv=False`` (flash-linear-attention's option of the same name) leaves the convolution
out, so each step's q, k, v depend on that step alone: then a token can reflect the state along the
same key every time, and parity learnt on 32 bits holds exactly at 128
(``tests/layers/test_deltanet_parity.py``; with the convolution the keys shift with the context).

The kernel is :mod:`rnnkit.ops.delta_rule`; see there for the orientation of ``S`` (``(K, V)``).
:mod:`rnnkit.layers.gated_deltanet` adds a decay gate to the same layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import InputError, check_positive_int
from rnnkit.layers._multihead import (
    ConvState,
    HeadNorm,
    MultiHeadRecurrence,
    ShortConv,
    check_head_config,
    merge_heads,
    short_conv_qkv,
    split_heads,
)
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.delta_rule import CHUNK_SIZE, delta_rule, delta_rule_step


#: DeltaNet's state with the short convolution: ``S`` (B, H, K, V) the matrix memory of every head,
#: ``conv`` (B, 2HK + HV, W - 1) the last ``W - 1`` projected inputs the convolution still needs.
#: Without it (``use_short_conv=False``) the state is ``S`` alone, as for GLA and linear attention.
DeltaNetState = ConvState


@dataclass
class DeltaNetConfig:
    """DeltaNet options."""

    d_model: int  # input and output width D
    num_heads: int = 4  # H
    head_dim: int | None = None  # K, the key/query width per head; default D // H
    expand_v: float = 1.0  # V = round(expand_v * K), the value width per head
    conv_size: int = 4  # W, width of the short causal convolution on q, k, v (>= 2)
    use_short_conv: bool = True  # False: q, k, v = SiLU(projection), no mixing over time (fla's option)
    allow_neg_eigval: bool = False  # beta in (0, 2) instead of (0, 1) (Grazzi et al. 2025)
    use_gate: bool = False  # multiply the normed output by SiLU(W_g x) before the output projection
    norm_eps: float = 1e-5  # epsilon of the output RMSNorm
    chunk_size: int = CHUNK_SIZE  # C, steps per chunk in mode "chunk"

    def __post_init__(self) -> None:
        self.head_dim = check_head_config(self.d_model, self.num_heads, self.head_dim)
        if not isinstance(self.expand_v, (int, float)) or isinstance(self.expand_v, bool) or self.expand_v <= 0:
            raise InputError(f"expand_v: expected a positive number, got {self.expand_v!r}")
        if round(self.expand_v * self.head_dim) < 1:
            raise InputError(f"expand_v: expected expand_v * head_dim >= 1, got {self.expand_v} * {self.head_dim}")
        check_positive_int("conv_size", self.conv_size, minimum=2)
        for name in ("allow_neg_eigval", "use_gate", "use_short_conv"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if not isinstance(self.norm_eps, (int, float)) or isinstance(self.norm_eps, bool) or not self.norm_eps > 0:
            raise InputError(f"norm_eps: expected a positive number, got {self.norm_eps!r}")
        check_positive_int("chunk_size", self.chunk_size)


class DeltaRuleLayer(MultiHeadRecurrence):
    """Shared body of DeltaNet and Gated DeltaNet; subclasses choose the decay (``_log_decay``).

    Modes: ``recurrent`` (the loop), ``parallel`` (the WY/UT form of the whole sequence as one
    chunk: quadratic in T, no loop), ``chunk``.
    """

    autocast_safe = False  # the delta-rule kernel takes one dtype; see Recurrence.autocast_safe

    def __init__(self, config: DeltaNetConfig) -> None:
        super().__init__()
        self.config = config
        D, H, K = config.d_model, config.num_heads, config.head_dim
        V = round(config.expand_v * K)
        self.num_heads, self.head_dim, self.value_dim = H, K, V
        self.d_input = self.d_output = D
        self.qkv_proj = nn.Linear(D, 2 * H * K + H * V, bias=False)  # [q | k | v]
        # One depthwise convolution over the concatenation = one per projection (no bias, as in fla).
        self.conv = ShortConv(2 * H * K + H * V, config.conv_size, activation="silu", bias=False) \
            if config.use_short_conv else None
        self.beta_proj = nn.Linear(D, H, bias=False)
        self.gate_proj = nn.Linear(D, H * V, bias=False) if config.use_gate else None
        self.norm = HeadNorm(H, V, kind="rms", eps=config.norm_eps)
        self.out_proj = nn.Linear(H * V, D, bias=False)

    def reset_parameters(self) -> None:
        """Linear weights N(0, 0.02^2), as in the flash-linear-attention training setup the papers
        use; the convolution as ``torch.nn.Conv1d``; unit norm weights."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)

    def beta(self, x: torch.Tensor) -> torch.Tensor:
        """Write strengths ``(B, H, T)`` for ``x`` (B, T, D): ``sigmoid(W_beta x)``, doubled with
        ``allow_neg_eigval`` so that ``I - beta k k^T`` has eigenvalues in ``(-1, 1]``."""
        beta = torch.sigmoid(self.beta_proj(x)).transpose(1, 2)  # (B, H, T)
        return 2.0 * beta if self.config.allow_neg_eigval else beta

    def _log_decay(self, x: torch.Tensor) -> torch.Tensor | None:
        """``(B, H, T)`` log decay per head for ``x`` (B, T, D), or None for no decay (DeltaNet)."""
        return None

    def _init_state(self, batch_size, device, dtype):
        H, K, V = self.num_heads, self.head_dim, self.value_dim
        S = torch.zeros(batch_size, H, K, V, device=device, dtype=dtype)
        if self.conv is None:
            return S
        return ConvState(S, self.conv.init_state(batch_size, device=device, dtype=dtype))

    def _forward(self, x, state, lengths, mode):
        H, K, V = self.num_heads, self.head_dim, self.value_dim
        (mixed,), S0, history = short_conv_qkv(self.conv, [self.qkv_proj(x)], state, lengths)
        if history is None:
            mixed = F.silu(mixed)  # the convolution applies its own SiLU
        q, k, v = mixed.split([H * K, H * K, H * V], -1)  # (B, T, HK), (B, T, HK), (B, T, HV)
        q = F.normalize(split_heads(q, H), dim=-1) * K**-0.5  # (B, H, T, K); attention's 1/sqrt(K)
        k = F.normalize(split_heads(k, H), dim=-1)  # (B, H, T, K): unit keys keep |1 - beta| <= 1
        v = split_heads(v, H)  # (B, H, T, V)
        beta = self.beta(x)  # (B, H, T)
        log_decay = self._log_decay(x)  # (B, H, T) or None
        o, S = delta_rule(q, k, v, beta, log_decay, S0, lengths, mode=mode, chunk_size=self.config.chunk_size)
        gate = self.gate_proj(x) if self.gate_proj is not None else None
        return self.out_proj(self.norm(merge_heads(o), gate)), S if history is None else ConvState(S, history)

    def _step(self, x_t, state):
        # The recurrent form at one step without its time axis (head splits, the op's checks, a stack
        # of one output): the decoding path (benchmarks/decode_speed.py --profile). The convolution
        # and the per-head gates read x_t as a one-step sequence, as the forward does.
        B, H, K, V = x_t.shape[0], self.num_heads, self.head_dim, self.value_dim
        x1 = x_t[:, None]  # (B, 1, D)
        (mixed,), S0, history = short_conv_qkv(self.conv, [self.qkv_proj(x1)], state, None)
        if history is None:
            mixed = F.silu(mixed)
        q, k, v = (t.reshape(B, H, n).contiguous() for t, n in zip(mixed[:, 0].split([H * K, H * K, H * V], -1),
                                                                    (K, K, V)))
        q = F.normalize(q, dim=-1) * K**-0.5  # (B, H, K)
        k = F.normalize(k, dim=-1)
        log_decay = self._log_decay(x1)
        o, S = delta_rule_step(q, k, v, self.beta(x1)[..., 0], None if log_decay is None else log_decay[..., 0], S0)
        gate = self.gate_proj(x_t) if self.gate_proj is not None else None
        return self.out_proj(self.norm(o.reshape(B, H * V), gate)), S if history is None else ConvState(S, history)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self.config).items())


@register(
    "deltanet",
    description="DeltaNet (Yang et al. 2024): delta-rule linear attention, chunkwise WY/UT training",
    test_configs={
        "default": {"num_heads": 2, "head_dim": 3, "chunk_size": 16},
        "neg-eigval-gate-noconv": {"num_heads": 1, "head_dim": 4, "expand_v": 0.5, "use_short_conv": False,
                                   "allow_neg_eigval": True, "use_gate": True, "chunk_size": 16},
    },
)
class DeltaNet(DeltaRuleLayer):
    """DeltaNet layer (Yang et al. 2024), optionally with negative eigenvalues (Grazzi et al. 2025).

    Args:
        d_model: input and output width D.
        num_heads: H.
        head_dim: K per head (default ``D // H``).
        expand_v: value width per head V = ``round(expand_v * K)``.
        conv_size: W of the short causal convolution on q, k, v.
        use_short_conv: False drops the convolution (q, k, v then see only their own step).
        allow_neg_eigval: ``beta = 2 sigmoid(.)`` in ``(0, 2)`` instead of ``sigmoid(.)``.
        use_gate: output gate ``SiLU(W_g x)`` after the output norm.
        norm_eps: RMSNorm epsilon.
        chunk_size: C for ``mode="chunk"``.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state :class:`DeltaNetState` (``S`` (B, H, K, V),
    ``conv`` (B, 2HK + HV, W - 1)), or ``S`` alone with ``use_short_conv=False``. Modes: ``recurrent`` (the loop), ``parallel`` (one ``(T, T)``
    WY/UT block), ``chunk`` (the default).

    Example:
        >>> layer = DeltaNet(d_model=64, num_heads=4, allow_neg_eigval=True)
        >>> y, state = layer(torch.randn(2, 100, 64))     # y (2, 100, 64), state.S (2, 4, 16, 16)
        >>> y_t, state = layer.step(torch.randn(2, 64), state)
    """

    def __init__(self, **config) -> None:
        super().__init__(make_config(DeltaNetConfig, "deltanet", config))
        self.reset_parameters()
