"""How an op family's entry runs the form its ``mode`` names.

Every family (gated linear attention, delta rule, mLSTM, sliding-window attention) has forms with
one signature, of which only the chunkwise one takes ``chunk_size``; its entry checks ``mode``
against the family's forms (an :class:`~rnnkit.errors.InputError` listing them) and calls the one
named.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from rnnkit.errors import check_choice


def run_form(mode: str, forms: Mapping[str, Callable[..., Any]], args: tuple, chunk_size: int) -> Any:
    """``forms[mode](*args)``, with ``chunk_size=`` for the ``"chunk"`` form.

    Raises:
        InputError: ``mode`` is not one of ``forms``.
    """
    check_choice("mode", mode, tuple(forms))
    if mode == "chunk":
        return forms["chunk"](*args, chunk_size=chunk_size)
    return forms[mode](*args)
