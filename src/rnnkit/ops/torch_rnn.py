"""Calls into PyTorch's fused RNN kernels (oneDNN on CPU, cuDNN on GPU) on rnnkit's own parameters.

rnnkit's classic layers own their parameters under PyTorch's names (``weight_ih_l0``, ...) rather
than wrapping an ``nn.LSTM``, so they call the same ``torch._VF`` entry points that ``nn.LSTM`` /
``nn.GRU`` / ``nn.RNN`` call. Right-padded batches go through ``pack_padded_sequence`` so that the
kernel never reads padding and returns each sequence's state at its own last valid step.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

_KERNELS = {
    "lstm": torch._VF.lstm,
    "gru": torch._VF.gru,
    "rnn_tanh": torch._VF.rnn_tanh,
    "rnn_relu": torch._VF.rnn_relu,
}


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
