"""The padding rule of every reference loop, for ops and layers alike, and the reading of a zero
initial state as "nothing read yet" (:func:`lowest_where_empty`).

Right-padded batches carry ``lengths`` ``(B,)``: at a step ``t >= lengths[b]`` sequence ``b`` is
padding, and its state is kept as it was (``torch.where``, not a multiplication, so that NaN or
Inf written in the padding cannot leak into values or gradients). The final state is then the one
at each sequence's last valid step. The layers import ops and never the reverse, so this rule
lives here, below both.
"""

from __future__ import annotations

from typing import Any

import torch


def valid_mask(lengths: torch.Tensor | None, max_len: int) -> torch.Tensor | None:
    """``(B, T)`` bool, True at valid steps, or None without lengths."""
    if lengths is None:
        return None
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def zero_padding(valid: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of ``tensors`` ``(B, H, T, *)`` with its padded steps (``valid`` ``(B, T)`` False) set to
    zero by ``torch.where``, so NaN or Inf written there cannot reach a valid output through a
    product with a zero weight."""
    mask = valid[:, None, :]  # (B, 1, T)
    zero = torch.zeros((), dtype=tensors[0].dtype, device=tensors[0].device)
    return tuple(torch.where(mask.view(*mask.shape, *([1] * (t.dim() - 3))), t, zero) for t in tensors)


def step_valid(t: int, lengths: torch.Tensor | None) -> torch.Tensor | None:
    """``(B,)`` True where step ``t`` is a valid (non-padding) step, or None without lengths."""
    return None if lengths is None else t < lengths


def freeze(valid: torch.Tensor | None, new: Any, old: Any) -> Any:
    """``new`` where ``valid`` (B,) is True, else ``old``; states are tensors ``(B, ...)`` or
    (named) tuples of them, nested to any depth. ``valid`` None: ``new``."""
    if valid is None:
        return new
    if isinstance(new, torch.Tensor):
        return torch.where(valid.view(-1, *([1] * (new.dim() - 1))), new, old)
    parts = [freeze(valid, n, o) for n, o in zip(new, old)]
    return type(new)(*parts) if hasattr(new, "_fields") else type(new)(parts)


def freeze_padding(t: int, lengths: torch.Tensor | None, new: Any, old: Any) -> Any:
    """The state after step ``t``: ``new`` for sequences where ``t`` is a valid step, ``old`` where
    it is padding (see :func:`freeze`)."""
    return freeze(step_valid(t, lengths), new, old)


def lowest_where_empty(m: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """A stabiliser ``m`` (a running maximum of log weights) with the entries whose normaliser
    ``total`` is 0 (nothing read yet: the zero initial state) replaced by the dtype's lowest value.

    Then ``exp`` of it minus any log weight is 0 and it minus itself is 0 (where minus infinity
    would give NaN), so the first step's stabiliser is its own log weight and its normaliser is at
    least 1: the zero state never makes a small first weight underflow to ``0 / 0``.
    """
    lowest = torch.full((), torch.finfo(m.dtype).min, dtype=m.dtype, device=m.device)
    return torch.where(total > 0, m, lowest)
