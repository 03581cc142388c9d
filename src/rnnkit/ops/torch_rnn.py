"""Calls into PyTorch's fused RNN kernels (oneDNN on CPU, cuDNN on GPU) on rnnkit's own parameters.

rnnkit's classic layers own their parameters under PyTorch's names (``weight_ih_l0``, ...) rather
than wrapping an ``nn.LSTM``, so they call the same ``torch._VF`` entry points that ``nn.LSTM`` /
``nn.GRU`` / ``nn.RNN`` call. Right-padded batches go through ``pack_padded_sequence`` so that the
kernel never reads padding and returns each sequence's state at its own last valid step.

Under CPU autocast the LSTM entry point hands oneDNN fp32 weights with bf16/fp16 activations, a
primitive that oneDNN builds only where the CPU has native instructions for the lower precision
(AVX-512 with BF16, or AMX, for bf16): elsewhere it raises "could not create a primitive descriptor".
:func:`runs_under_autocast` answers that question once per dtype from oneDNN's own capability query,
so layers pick another kernel up front instead of failing mid-training.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

_KERNELS = {
    "lstm": torch._VF.lstm,
    "gru": torch._VF.gru,
    "rnn_tanh": torch._VF.rnn_tanh,
    "rnn_relu": torch._VF.rnn_relu,
}


#: Kernels that go to oneDNN with mixed dtypes under CPU autocast (GRU and Elman run in one dtype).
_ONEDNN_MIXED_UNDER_AUTOCAST = ("lstm",)


@functools.cache
def _onednn_supports(dtype: torch.dtype) -> bool:
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return True


def runs_under_autocast(kind: str, device_type: str, dtype: torch.dtype) -> bool:
    """Whether PyTorch's ``kind`` kernel runs under ``torch.autocast(device_type, dtype)`` here.

    True except for the LSTM on a CPU whose oneDNN build has no kernels for ``dtype`` (oneDNN
    honours ``ONEDNN_MAX_CPU_ISA``, so a narrower instruction set set there answers False too).
    """
    if device_type != "cpu" or kind not in _ONEDNN_MIXED_UNDER_AUTOCAST:
        return True
    if not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled:
        return True  # ATen's own loop runs, in any dtype
    return _onednn_supports(dtype)


def torch_rnn(
    kind: str,
    x: torch.Tensor,
    hx: tuple[torch.Tensor, ...],
    weights: list[torch.Tensor],
    has_bias: bool,
    lengths: torch.Tensor | None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One layer, one direction of a PyTorch fused RNN kernel.

    Args:
        kind: ``"lstm"``, ``"gru"``, ``"rnn_tanh"`` or ``"rnn_relu"``.
        x: ``(B, T, D)`` batch-first input.
        hx: initial states, each ``(B, S)`` (``(h, c)`` for the LSTM, ``(h,)`` otherwise).
        weights: flat weights in ``nn.LSTM._flat_weights`` order for layer 0.
        has_bias: whether ``weights`` include the two bias vectors.
        lengths: ``(B,)`` valid lengths or None.

    Returns:
        ``y`` ``(B, T, H_out)`` (zeros past each length) and the final states, each ``(B, S)``.
    """
    kernel = _KERNELS[kind]
    hx = tuple(h.unsqueeze(0) for h in hx)  # the kernels want (layers * directions, B, S)
    state_arg = hx if kind == "lstm" else hx[0]
    if lengths is None:
        out = kernel(x, state_arg, weights, has_bias, 1, 0.0, False, False, True)
        return out[0], tuple(h.squeeze(0) for h in out[1:])
    max_len = x.shape[1]
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    sorted_state = tuple(h.index_select(1, packed.sorted_indices) for h in hx)
    state_arg = sorted_state if kind == "lstm" else sorted_state[0]
    out = kernel(packed.data, packed.batch_sizes, state_arg, weights, has_bias, 1, 0.0, False, False)
    y, _ = pad_packed_sequence(
        PackedSequence(out[0], packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices),
        batch_first=True,
        total_length=max_len,
    )
    return y, tuple(h.index_select(1, packed.unsorted_indices).squeeze(0) for h in out[1:])
