"""The padding rule of every reference loop, for ops and layers alike.

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
