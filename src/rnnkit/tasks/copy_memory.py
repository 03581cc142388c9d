"""The copy-memory task: remember a few symbols across a long blank delay, then replay them.

From Hochreiter & Schmidhuber (1997), "Long Short-Term Memory", in the form of Arjovsky, Shah &
Bengio (2016), "Unitary Evolution Recurrent Neural Networks", section 4.1.
"""

from __future__ import annotations

import torch

from rnnkit.errors import InputError, check_positive_int
from rnnkit.tasks.base import IGNORE_INDEX, Batch, SyntheticTask, register_task

BLANK = 0
DELIMITER = 9
FIRST_SYMBOL, LAST_SYMBOL = 1, 8  # the alphabet the model has to remember


@register_task("copy")
class CopyTask(SyntheticTask):
    """Copy memory: replay n_symbols random symbols after a long blank delay.

    Layout of one sequence of length ``T = 2 * n_symbols + delay + 1`` (``n`` = ``n_symbols``)::

        x:  s_1 ... s_n | 0 ... 0 (delay) | 9 | 0 ... 0 (n)
        y:  -100 ........................... -100 | s_1 ... s_n

    ``s_i`` are drawn uniformly from ``1..8``, ``0`` is the blank and ``9`` the delimiter that says
    "start replaying". The model sees the delimiter at step ``n + delay`` and must output the symbols
    at the last ``n`` steps; all other targets are ``-100`` (ignored), so loss and accuracy are over
    the replayed symbols only. A memoryless model scores ``ln 8 = 2.079`` nats and accuracy 1/8.

    Args:
        n_symbols: ``n``, symbols to remember (default 10).
        delay: blanks between the symbols and the delimiter (default 50, so ``T = 71``). Passing
            ``seq_len`` to the batch methods overrides it: ``delay = seq_len - 2 * n_symbols - 1``.
        eval_examples: examples in each of val and test (default 1000).

    Batches: ``x`` ``(B, T)`` int64 in ``0..9``, ``y`` ``(B, T)`` int64, ``lengths`` ``None``.

    Example:
        >>> task = build_task("copy", delay=100)
        >>> batch = next(task.train_batches(batch_size=8))
        >>> batch.x.shape, batch.num_tokens
        (torch.Size([8, 121]), 80)
    """

    input_kind = "tokens"
    vocab_size = 10
    target = "per_step"
    n_classes = 10
    metrics = ("loss", "accuracy")

    def __init__(self, *, n_symbols: int = 10, delay: int = 50, eval_examples: int = 1000) -> None:
        check_positive_int("n_symbols", n_symbols)
        check_positive_int("delay", delay, minimum=0)
        super().__init__(eval_examples=eval_examples, n_symbols=n_symbols, delay=delay)
        self.n_symbols = n_symbols
        self.delay = delay
        self.default_seq_len = 2 * n_symbols + delay + 1

    def resolve_seq_len(self, seq_len: int | None) -> int:
        if seq_len is None:
            return self.default_seq_len
        shortest = 2 * self.n_symbols + 1
        if seq_len < shortest:
            raise InputError(
                f"seq_len: expected at least 2 * n_symbols + 1 = {shortest} (symbols, delimiter, "
                f"replay), got {seq_len}"
            )
        return seq_len

    def generate(self, batch_size: int, seq_len: int, gen: torch.Generator) -> Batch:
        B, T, n = batch_size, seq_len, self.n_symbols
        delay = T - 2 * n - 1
        symbols = torch.randint(FIRST_SYMBOL, LAST_SYMBOL + 1, (B, n), generator=gen)  # (B, n)
        x = torch.full((B, T), BLANK, dtype=torch.long)  # (B, T)
        x[:, :n] = symbols
        x[:, n + delay] = DELIMITER
        y = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        y[:, T - n :] = symbols
        return Batch(x, y, None)
