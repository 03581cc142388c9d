"""What the multi-head matrix-state layers share (linear attention, RetNet, GLA, Mamba-2, mLSTM, Based,
DeltaNet, Gated DeltaNet, attention).

- :class:`MultiHeadRecurrence`: the base class: modes ``recurrent`` / ``parallel`` / ``chunk``,
  ``auto`` (``chunk`` for sequences, ``recurrent`` for a single step), ``step`` as a one-step forward;
- :func:`split_heads` / :func:`merge_heads`: ``(B, T, H*K) <-> (B, H, T, K)``;
- :func:`short_conv_qkv` runs q, k, v through one :class:`~rnnkit.layers._conv.ShortConv` and
  :class:`ConvState` pairs its history with the layer's matrix state;
- :func:`feature_map` / :func:`feature_dim`: the kernel feature maps of linear attention
  (identity, elu+1, relu, 2nd-order Taylor);
- :class:`HeadNorm`: per-head RMS or layer norm of the read-out, optionally multiplied by a SiLU
  gate (before or after the norm), as RetNet's group norm, GLA's and Mamba-2's gated RMSNorm;
- :func:`check_head_config`: validation of the usual ``num_heads`` / head dimension options;
- :func:`signed_decay`: a decay in ``(0, 1)`` stretched to ``(-1, 1)`` (negative eigenvalues), as
  the log of its magnitude and its sign, the form :func:`rnnkit.ops.gated_linear_attention` takes.
- :func:`check_power_of_two`, :func:`check_depth`, :func:`check_positive_number`: validation of
  the chunk size, depth and epsilon options.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import InputError, check_choice, check_positive_int
from rnnkit.layers._conv import ShortConv
from rnnkit.layers.base import Recurrence, State


# --------------------------------------------------------------------------- heads
def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, T, H*K)`` -> ``(B, H, T, K)`` (a copy, contiguous for the batched matmuls)."""
    B, T, D = x.shape
    return x.view(B, T, num_heads, D // num_heads).transpose(1, 2).contiguous()  # (B, H, T, K)


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    """``(B, H, T, V)`` -> ``(B, T, H*V)``."""
    B, H, T, V = y.shape
    return y.transpose(1, 2).reshape(B, T, H * V)


def check_head_config(d_model: int, num_heads: int, head_dim: int | None, field: str = "head_dim") -> int:
    """Validate ``num_heads`` and a head dimension; returns the head dimension (``d_model // H``
    when ``head_dim`` is None, which requires ``H`` to divide ``d_model``)."""
    check_positive_int("d_model", d_model)
    check_positive_int("num_heads", num_heads)
    if head_dim is None:
        if d_model % num_heads:
            raise InputError(
                f"num_heads: expected a divisor of d_model = {d_model} when {field} is not given, got {num_heads}"
            )
        return d_model // num_heads
    check_positive_int(field, head_dim)
    return head_dim


def signed_decay(log_decay: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a = 2 exp(log_decay) - 1``, the decay ``exp(log_decay)`` in ``(0, 1)`` mapped onto ``(-1, 1)``
    (Grazzi et al. 2025, "Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues"), as
    ``(log |a|, sign a)`` (sign +1 at ``a = 0``), shapes as ``log_decay``. ``|a|`` is floored at the
    dtype's smallest normal number, so ``log |a|`` is finite: ``a = 0`` exactly decays by that
    floor in every mode alike."""
    a = 1 + 2 * torch.expm1(log_decay)
    sign = torch.where(a < 0, -torch.ones((), dtype=a.dtype, device=a.device), torch.ones((), dtype=a.dtype, device=a.device))
    return torch.log(a.abs().clamp_min(torch.finfo(a.dtype).tiny)), sign


def check_depth(depth: object) -> float:
    """``depth``: the layer's position in its stack, layer index / number of layers, in ``[0, 1]``."""
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 1:
        raise InputError(f"depth: expected a number in [0, 1] (layer index / number of layers), got {depth!r}")
    return float(depth)


def check_positive_number(name: str, value: object) -> None:
    """A positive int or float (not a bool), e.g. a norm's epsilon."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InputError(f"{name}: expected a positive number, got {value!r}")


def check_power_of_two(name: str, value: object) -> None:
    """A chunk size of the per-key-dimension decay kernels: a positive power of two."""
    check_positive_int(name, value)
    if value & (value - 1):  # type: ignore[operator]
        raise InputError(f"{name}: expected a power of two, got {value}")


# --------------------------------------------------------------------------- base class
class MultiHeadRecurrence(Recurrence):
    """Base of the matrix-state layers: three modes, ``auto`` and ``step`` defined once.

    Subclasses implement ``_forward(x, state, lengths, mode)`` for the three modes and
    ``_init_state``; ``_step`` defaults to a one-step ``recurrent`` forward (the recurrent form of
    these layers is already one update per step, so this is the constant-memory inference path).
    """

    MODES: ClassVar[tuple[str, ...]] = ("recurrent", "parallel", "chunk")

    def _auto_mode(self, x: torch.Tensor) -> str:
        # One step: the update itself; otherwise the chunkwise form (measured fastest from T ~ 64
        # on, and memory linear in T unlike parallel): benchmarks/chunk_speed.py.
        return "recurrent" if x.shape[1] == 1 else "chunk"

    def _step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        y, state = self._forward(x_t[:, None], state, None, "recurrent")
        return y[:, 0], state


# --------------------------------------------------------------------------- short convolution
class ConvState(NamedTuple):
    """State of a matrix-memory layer with a short convolution in front of q, k, v: ``S`` the
    layer's own state (e.g. ``(B, H, K, V)``) and ``conv`` ``(B, C, W-1)``, the last ``W - 1``
    projected inputs the convolution still needs."""

    S: torch.Tensor
    conv: torch.Tensor


def short_conv_qkv(
    conv: ShortConv | None, parts: Sequence[torch.Tensor], state: State, lengths: torch.Tensor | None
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """Run the projections ``parts`` (each ``(B, T, C_i)``) through one depthwise ``conv`` over their
    concatenation (= one convolution per projection, as in flash-linear-attention) when there is one.

    Returns the parts (convolved, or as given when ``conv`` is None), the layer's own state (``state.S``,
    or ``state`` itself without a convolution) and the convolution's new history (None without one).
    """
    if conv is None:
        return list(parts), state, None
    mixed, history = conv(torch.cat(list(parts), -1), state.conv, lengths)  # (B, T, sum C_i)
    return list(mixed.split([p.shape[-1] for p in parts], -1)), state.S, history


# --------------------------------------------------------------------------- feature maps
FEATURE_MAPS = ("identity", "elu+1", "relu", "taylor")


def feature_dim(name: str, dim: int) -> int:
    """Width of ``feature_map(name, x)`` for ``x`` of width ``dim``."""
    return 1 + dim + dim * dim if name == "taylor" else dim


def feature_map(name: str, x: torch.Tensor) -> torch.Tensor:
    """Apply a linear-attention feature map to the last dimension of ``x``.

    - ``identity``: ``x``;
    - ``elu+1``: ``elu(x) + 1 > 0`` (Katharopoulos et al. 2020, eq. 7);
    - ``relu``: ``max(x, 0)``;
    - ``taylor``: ``[1, x / d^(1/4), (x ⊗ x) / (sqrt(2) sqrt(d))]`` so that
      ``phi(q) . phi(k) = 1 + s + s^2 / 2`` with ``s = q . k / sqrt(d)``, the 2nd-order Taylor
      expansion of ``exp(s)`` (Arora et al. 2024, "Simple linear attention language models balance
      the recall-throughput tradeoff", section 3.1). Width ``1 + d + d^2``.
    """
    if name == "identity":
        return x
    if name == "elu+1":
        return F.elu(x) + 1
    if name == "relu":
        return F.relu(x)
    if name == "taylor":
        d = x.shape[-1]
        x = x / d**0.25
        second = (x[..., :, None] * x[..., None, :]).flatten(-2) / 2**0.5  # (..., d*d)
        return torch.cat([torch.ones_like(x[..., :1]), x, second], -1)
    raise InputError(f"feature_map: expected one of {FEATURE_MAPS}, got {name!r}")


# --------------------------------------------------------------------------- output norm and gate
class HeadNorm(nn.Module):
    """Normalise each head's read-out separately, optionally with a SiLU gate.

    ``kind="rms"``: ``y / rms(y) * w`` (RMSNorm, Zhang & Sennrich 2019); ``kind="layer"``:
    ``(y - mean) / std * w + b`` per head (RetNet's GroupNorm with one group per head). With a gate
    ``z``: ``norm(y) * silu(z)`` (GLA, RetNet) or, ``gate_first=True``, ``norm(y * silu(z))``
    (Mamba-2's gated RMSNorm, Dao & Gu 2024, section 7).

    Args:
        num_heads: ``H``.
        head_dim: ``V``, the per-head width normalised together.
        kind: ``"rms"`` or ``"layer"``.
        eps: added to the variance.
        gate_first: apply the gate before the norm.

    Shapes: ``y`` ``(B, T, H*V)`` (heads merged), ``z`` same or None -> ``(B, T, H*V)``.
    """

    def __init__(self, num_heads: int, head_dim: int, kind: str = "rms", eps: float = 1e-5, gate_first: bool = False):
        super().__init__()
        check_choice("norm", kind, ("rms", "layer"))
        self.num_heads, self.head_dim, self.kind, self.eps, self.gate_first = num_heads, head_dim, kind, eps, gate_first
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads * head_dim)) if kind == "layer" else None

    def forward(self, y: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if z is not None and self.gate_first:
            y = y * F.silu(z)
        # The layer norm by PyTorch's fused kernel (one pass forward, one backward) rather than the
        # formula's elementwise ops and their backward: benchmarks/layer_profile.py.
        if self.num_heads == 1:
            out = self._norm(y, self.weight, self.bias)  # weight and bias applied inside the norm
        else:
            shape = y.shape
            out = self._norm(y.reshape(*shape[:-1], self.num_heads, self.head_dim), None, None).reshape(shape)
            out = out * self.weight if self.bias is None else torch.addcmul(self.bias, out, self.weight)
        if z is not None and not self.gate_first:
            out = out * F.silu(z)
        return out

    def _norm(self, h: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        """``h`` (..., V) normalised over its last dimension, times ``weight`` plus ``bias`` if given."""
        if self.kind == "layer":
            return F.layer_norm(h, (self.head_dim,), weight, bias, self.eps)
        # RMS: the formula itself (PyTorch's CPU rms_norm is these same ops, not a fused kernel).
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h if weight is None else h * weight


