"""How an op family's entry runs the form its ``mode`` names.

Every family (gated linear attention, delta rule, mLSTM, sliding-window attention) has forms with
one signature, of which only the chunkwise one takes ``chunk_size``; its entry checks ``mode``
against the family's forms (an :class:`~rnnkit.errors.InputError` listing them) and calls the one
named. A batch of no sequences runs the reference loop, whatever the mode: it costs nothing, and
the fast forms' reshapes and compiled kernels need not take a zero-sized batch.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from rnnkit.errors import check_choice


def is_empty_batch(x: Any) -> bool:
    """True for a tensor whose leading (batch) dimension is 0."""
    return isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 0


def run_form(mode: str, forms: Mapping[str, Callable[..., Any]], args: tuple, chunk_size: int) -> Any:
    """``forms[mode](*args)``, with ``chunk_size=`` for the ``"chunk"`` form.

    Raises:
        InputError: ``mode`` is not one of ``forms``.
    """
    check_choice("mode", mode, tuple(forms))
    if is_empty_batch(args[0]):
        return forms["recurrent"](*args)
    if mode == "chunk":
        return forms["chunk"](*args, chunk_size=chunk_size)
    return forms[mode](*args)
