"""The short causal depthwise convolution that Mamba, Mamba-2, Hawk, GLA, DeltaNet, mLSTM and
linear attention put in front of their recurrences, with its input history as state:

    y_t = act(bias + sum_{s=0}^{W-1} w_s ⊙ x_{t-W+1+s})        x_t, y_t (D,) per batch element

where ``x_{-k}`` for ``k = 1..W-1`` is the history ``state[:, :, W-1-k]`` (oldest first) and
``act`` the identity or SiLU. One entry, :func:`short_conv` with ``mode=``:

- ``recurrent``: :func:`short_conv_recurrent`, the loop over :func:`short_conv_step` (the window of
  the last ``W`` inputs), the definition;
- ``parallel``: ``torch.nn.functional.conv1d`` over the history and the sequence, channels first;
- ``fused``: a compiled CPU kernel (:mod:`rnnkit.ops._native`), channels last: each step reads one
  row of ``x`` and writes one row of ``y``, the activation applied on the way; its backward
  recomputes the pre-activation and writes the input's gradient in one pass (and is not itself
  differentiable: no second derivatives). fp32 and fp64 run as
  they are, other floating dtypes in fp32 with the results cast back; available where the compiled
  library is (else ``mode="fused"`` raises);
- ``auto``: ``fused`` on the CPU where the compiled library is available, ``parallel`` otherwise.

Padding (``lengths``): the returned history is the ``W - 1`` inputs ending at each sequence's last
valid step. Outputs past a length are not defined by the op (the loop holds the history there while
the convolutions slide over the padding); the layers zero them.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from rnnkit.errors import InputError, check_choice, check_lengths, check_tensor
from rnnkit.ops import _native, _workspace
from rnnkit.ops._forms import is_empty_batch
from rnnkit.ops._native import CHANNELS_LAST_DTYPES, ptr
from rnnkit.ops.padding import freeze_padding

#: Forms :func:`short_conv` runs, ``recurrent`` (the definition) first.
SHORT_CONV_MODES = ("recurrent", "parallel", "fused", "auto")
#: Activations applied to the convolution's output.
SHORT_CONV_ACTIVATIONS = ("identity", "silu")


def _check_inputs(x, weight, bias, state, lengths, activation):
    check_tensor("x", x)
    check_tensor("weight", weight)
    check_choice("activation", activation, SHORT_CONV_ACTIVATIONS)
    if x.dim() != 3 or x.shape[1] < 1:
        raise InputError(f"x: expected shape (B, T, D) with T >= 1, got {tuple(x.shape)}")
    B, T, D = x.shape
    if weight.dim() != 2 or weight.shape[0] != D or weight.shape[1] < 2:
        raise InputError(f"weight: expected shape (D, W) = ({D}, W) with W >= 2, got {tuple(weight.shape)}")
    W = weight.shape[1]
    if bias is not None and check_tensor("bias", bias).shape != (D,):
        raise InputError(f"bias: expected shape (D,) = ({D},), got {tuple(bias.shape)}")
    if state is not None and check_tensor("state", state).shape != (B, D, W - 1):
        raise InputError(f"state: expected shape (B, D, W-1) = {(B, D, W - 1)}, got {tuple(state.shape)}")
    return check_lengths(lengths, B, T, x.device)


def _act(y: torch.Tensor, activation: str) -> torch.Tensor:
    return F.silu(y) if activation == "silu" else y


def short_conv_step(x_t, weight, bias, state, activation: str = "identity"):
    """One step: ``x_t`` (B, D), ``weight`` (D, W), ``bias`` (D,) or None, ``state`` (B, D, W-1) ->
    ``y_t`` (B, D) and the next state."""
    window = torch.cat([state, x_t[:, :, None]], 2)  # (B, D, W)
    y = (window * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return _act(y, activation), window[:, :, 1:]


def short_conv_recurrent(x, weight, bias=None, state=None, lengths=None, activation: str = "identity"):
    """The loop that defines the convolution (see the module docstring).

    Args:
        x: ``(B, T, D)``; weight: ``(D, W)``; bias: ``(D,)`` or None; state: ``(B, D, W-1)`` input
        history, oldest first (zeros if None); lengths: optional ``(B,)`` in ``[1, T]``;
        activation: ``"identity"`` or ``"silu"``.

    Returns:
        ``y`` ``(B, T, D)`` and the history after each sequence's last valid step ``(B, D, W-1)``.
    """
    lengths = _check_inputs(x, weight, bias, state, lengths, activation)
    B, _, D = x.shape
    if state is None:
        state = x.new_zeros(B, D, weight.shape[1] - 1)
    ys = []
    for t, x_t in enumerate(x.unbind(1)):
        y_t, new = short_conv_step(x_t, weight, bias, state, activation)
        state = freeze_padding(t, lengths, new, state)
        ys.append(y_t)
    return torch.stack(ys, 1), state


def _history_at(x, state, lengths, W):
    """The ``W - 1`` inputs ending at each sequence's last valid step, ``(B, D, W-1)``, from the
    history ``state`` and ``x``, without forming their concatenation."""
    B, T, D = x.shape
    ends = torch.full((B,), T, device=x.device, dtype=torch.int64) if lengths is None else lengths
    idx = ends[:, None] - (W - 1) + torch.arange(W - 1, device=x.device)  # (B, W-1), time of each slot
    from_x = x.gather(1, idx.clamp_min(0)[:, :, None].expand(B, W - 1, D)).transpose(1, 2)  # (B, D, W-1)
    from_state = state.gather(2, (idx + W - 1).clamp(0, W - 2)[:, None, :].expand(B, D, W - 1))
    return torch.where((idx >= 0)[:, None, :], from_x, from_state)


def _conv_parallel(x, weight, bias, state, lengths, activation):
    B, T, D = x.shape
    xs = torch.cat([state, x.transpose(1, 2)], 2)  # (B, D, W-1+T)
    y = F.conv1d(xs, weight[:, None], bias, groups=D).transpose(1, 2)  # (B, T, D)
    return _act(y, activation), _history_at(x, state, lengths, weight.shape[1])


def _dims(x, W, parts, activation):
    B, T, D = x.shape
    return (ctypes.c_int64 * 8)(B, T, D, W, parts, activation == "silu", x.stride(0), x.stride(1))


class _FusedConv(torch.autograd.Function):
    """``y`` of the convolution by the compiled kernel, all tensors of one dtype in
    ``CHANNELS_LAST_DTYPES``; ``x`` with a contiguous last dim."""

    @staticmethod
    def forward(ctx, x, weight, bias, state, activation: str):
        lib = _native.library()
        sfx = CHANNELS_LAST_DTYPES[x.dtype]
        weight = weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        state = state.contiguous()
        B, T, D = x.shape
        parts = _native.channel_parts(B, D, x.dtype)
        dims = _dims(x, weight.shape[1], parts, activation)
        y = _workspace.workspace((B, T, D), x)
        getattr(lib, f"rnnkit_conv_fwd_{sfx}")(dims, ptr(x), ptr(weight), ptr(bias), ptr(state), ptr(y),
                                               torch.get_num_threads())
        ctx.save_for_backward(x, weight, bias, state)
        ctx.parts, ctx.activation = parts, activation
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, weight, bias, state = ctx.saved_tensors
        lib = _native.library()
        sfx = CHANNELS_LAST_DTYPES[x.dtype]
        B, T, D = x.shape
        W = weight.shape[1]
        gy = gy.contiguous()
        dx = _workspace.workspace((B, T, D), x)
        dstate = torch.empty(B, D, W - 1, dtype=x.dtype) if ctx.needs_input_grad[3] else None
        dwp, dbp = torch.empty(B, D, W, dtype=x.dtype), torch.empty(B, D, dtype=x.dtype)
        getattr(lib, f"rnnkit_conv_bwd_{sfx}")(_dims(x, W, ctx.parts, ctx.activation), ptr(x), ptr(weight),
                                               ptr(bias), ptr(state), ptr(gy), ptr(dx), ptr(dstate), ptr(dwp),
                                               ptr(dbp), torch.get_num_threads())
        return dx, dwp.sum(0), None if bias is None else dbp.sum(0), dstate, None


def _conv_fused(x, weight, bias, state, lengths, activation):
    dtype, work = _native.work_dtype(x, weight, bias, state)
    xw, weight, bias, state = (None if t is None else t.to(work) for t in (x, weight, bias, state))
    rows = xw if xw.stride(-1) == 1 else xw.contiguous()
    y = _FusedConv.apply(rows, weight, bias, state, activation)
    return y.to(dtype), _history_at(x, state.to(dtype), lengths, weight.shape[1])


def resolve_mode(mode: str, device: torch.device) -> str:
    """The form ``mode`` runs as on ``device`` (``auto`` resolved; ``fused`` checked).

    Raises:
        InputError: for an unknown mode, or ``fused`` where the compiled kernel cannot run.
    """
    return _native.resolve_fused(mode, SHORT_CONV_MODES, device, "parallel")


def short_conv(x, weight, bias=None, state=None, *, lengths=None, activation: str = "identity", mode: str = "auto"):
    """The causal depthwise convolution in the form ``mode`` (see the module docstring).

    Args:
        x: ``(B, T, D)`` inputs (any strides); weight: ``(D, W)``, ``W >= 2``; bias: ``(D,)`` or
            None; state: ``(B, D, W-1)`` input history, oldest first (zeros if None);
            lengths: optional ``(B,)`` in ``[1, T]``; activation: ``"identity"`` or ``"silu"``.
        mode: ``"recurrent"``, ``"parallel"``, ``"fused"`` or ``"auto"`` (the default).

    Returns:
        ``y`` ``(B, T, D)`` and the history after each sequence's last valid step ``(B, D, W-1)``.

    Raises:
        InputError: an unknown ``mode`` or activation, ``"fused"`` where the compiled kernel is
            unavailable or off the CPU, or bad shapes or lengths.

    Example:
        >>> y, history = short_conv(torch.randn(2, 10, 8), torch.randn(8, 4), activation="silu")
    """
    check_choice("mode", mode, SHORT_CONV_MODES)
    if mode == "recurrent" or is_empty_batch(x):
        return short_conv_recurrent(x, weight, bias, state, lengths, activation)
    lengths = _check_inputs(x, weight, bias, state, lengths, activation)
    if state is None:
        state = x.new_zeros(x.shape[0], x.shape[2], weight.shape[1] - 1)
    form = _conv_fused if resolve_mode(mode, x.device) == "fused" else _conv_parallel
    return form(x, weight, bias, state, lengths, activation)


__all__ = ["SHORT_CONV_ACTIVATIONS", "SHORT_CONV_MODES", "short_conv", "short_conv_recurrent", "short_conv_step"]
