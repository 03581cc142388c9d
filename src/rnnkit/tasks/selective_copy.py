"""Selective copying: replay the data tokens scattered among noise, in order, ignoring the gaps.

From Gu & Dao (2023), "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", section
3.1 and 4.1.1 (figure 2): unlike plain copying, the positions of the tokens to remember vary from
example to example, so a time-invariant filter cannot solve it; the model has to select by content.
"""

from __future__ import annotations

import torch

from rnnkit.errors import InputError, check_positive_int
from rnnkit.tasks.base import IGNORE_INDEX, Batch, SyntheticTask, register_task

NOISE = 0


@register_task("selective_copy")
class SelectiveCopyTask(SyntheticTask):
    """Selective copy: output the data tokens hidden among noise tokens, in their order.

    Layout of one sequence of length ``T = context + n`` (``n`` = ``n_symbols``)::

        x:  0 0 s_1 0 s_2 0 0 ... s_n 0 | m m ... m   (context: n data tokens at random positions)
        y:  -100 ................... -100 | s_1 ... s_n

    ``s_i`` are uniform in ``1..n_colors``, ``0`` is the noise token and ``m = n_colors + 1`` the
    marker that asks for the next token. The data positions are a uniform random subset of the context
    (sorted, so ``s_1`` comes first). A memoryless model scores accuracy ``1 / n_colors``.

    Args:
        n_symbols: ``n``, data tokens to copy (default 8; Gu & Dao use 16).
        n_colors: size of the data alphabet (default 8; Gu & Dao use 16).
        context: length of the noisy context (default 64; Gu & Dao use 4096). Passing ``seq_len`` to the
            batch methods overrides it: ``context = seq_len - n_symbols``.
        eval_examples: examples in each of val and test (default 1000).

    Batches: ``x`` ``(B, T)`` int64 in ``0..n_colors + 1``, ``y`` ``(B, T)`` int64, ``lengths``
    ``None``. Test lengths: ``T``, ``2 T``, ``4 T`` (a longer noisy context).

    Example:
        >>> task = build_task("selective_copy", n_symbols=4, context=16)
        >>> batch = next(task.train_batches(batch_size=2))
        >>> batch.x.shape, batch.num_tokens
        (torch.Size([2, 20]), 8)
    """

    input_kind = "tokens"
    target = "per_step"
    metrics = ("loss", "accuracy")

    def __init__(self, *, n_symbols: int = 8, n_colors: int = 8, context: int = 64, eval_examples: int = 1000) -> None:
        check_positive_int("n_symbols", n_symbols)
        check_positive_int("n_colors", n_colors, minimum=2)
        check_positive_int("context", context)
        if context < n_symbols:
            raise InputError(f"context: expected at least n_symbols = {n_symbols}, got {context}")
        super().__init__(eval_examples=eval_examples, n_symbols=n_symbols, n_colors=n_colors, context=context)
        self.n_symbols, self.n_colors, self.context = n_symbols, n_colors, context
        self.vocab_size = self.n_classes = n_colors + 2
        self.marker = n_colors + 1
        self.default_seq_len = context + n_symbols

    def resolve_seq_len(self, seq_len: int | None) -> int:
        if seq_len is None:
            return self.default_seq_len
        if seq_len < 2 * self.n_symbols:
            raise InputError(
                f"seq_len: expected at least 2 * n_symbols = {2 * self.n_symbols} (a context that holds "
                f"the data tokens, then the markers), got {seq_len}"
            )
        return seq_len

    def generate(self, batch_size: int, seq_len: int, gen: torch.Generator) -> Batch:
        B, T, n = batch_size, seq_len, self.n_symbols
        C = T - n  # context length
        symbols = torch.randint(1, self.n_colors + 1, (B, n), generator=gen)  # (B, n)
        # A uniform random n-subset of the context per row: the n smallest of C random keys, sorted.
        positions = torch.rand(B, C, generator=gen).argsort(dim=1)[:, :n].sort(dim=1).values  # (B, n)
        x = torch.full((B, T), NOISE, dtype=torch.long)  # (B, T)
        x.scatter_(1, positions, symbols)
        x[:, C:] = self.marker
        y = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        y[:, C:] = symbols
        return Batch(x, y, None)
