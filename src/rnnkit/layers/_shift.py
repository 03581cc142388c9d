"""Token shift, what the RWKV layers (``rwkv6``, ``rwkv7``) share: each step reads its own input and
the previous one, so the previous input is part of the state.

- :class:`ShiftState`: the last input read (``shift``) and the layer's matrix state (``S``);
- :class:`TokenShiftRecurrence`: their base class: modes, that state, the projections' reset;
- :func:`previous_inputs`: ``x_{t-1}`` for every step, the state's ``shift`` before the first;
- :func:`at_last_step`: a tensor's entries at each sequence's last valid step, for the final state.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from rnnkit.layers._multihead import MultiHeadRecurrence


class ShiftState(NamedTuple):
    """State of a token-shifting matrix-memory layer: ``shift`` ``(B, D)``, the last input read
    (zeros before the first), and ``S`` ``(B, H, K, V)``, the matrix state."""

    shift: torch.Tensor
    S: torch.Tensor


def previous_inputs(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, T, D)`` delayed by one step, ``shift`` ``(B, D)`` in front: ``(B, T, D)``."""
    return torch.cat([shift[:, None], x[:, :-1]], 1)


def at_last_step(t: torch.Tensor, lengths: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``t`` at each sequence's last valid step along its time axis ``dim`` (batch first), that axis
    removed; the last step without ``lengths``."""
    if lengths is None:
        return t.select(dim, t.shape[dim] - 1)
    shape = [1] * t.dim()
    shape[0] = t.shape[0]
    index = (lengths - 1).view(shape).expand(*t.shape[:dim], 1, *t.shape[dim + 1:])
    return t.gather(dim, index).squeeze(dim)


class TokenShiftRecurrence(MultiHeadRecurrence):
    """Base of the RWKV layers: modes ``recurrent`` and ``chunk``, the state :class:`ShiftState`
    (``shift`` (B, D), ``S`` (B, H, K, K)) from ``config.d_model``, ``config.num_heads`` and
    ``self.head_dim``, and :meth:`_reset_outputs` for the linear maps and the group norm."""

    MODES = ("recurrent", "chunk")

    def _init_state(self, batch_size, device, dtype):
        c = self.config
        K = self.head_dim
        return ShiftState(torch.zeros(batch_size, c.d_model, device=device, dtype=dtype),
                          torch.zeros(batch_size, c.num_heads, K, K, device=device, dtype=dtype))

    def _reset_outputs(self, *linears: nn.Linear) -> None:
        """PyTorch's default initialisation for ``linears``, and the group norm (``self.norm``) as
        the identity."""
        for lin in linears:
            lin.reset_parameters()
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
