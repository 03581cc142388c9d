"""Induction heads: after a trigger token, recall the token that followed the trigger earlier.

From Olsson et al. (2022), "In-context Learning and Induction Heads", in the synthetic form of Fu
et al. (2023), "Hungry Hungry Hippos", section 3.1, and Gu & Dao (2023), "Mamba", section 4.1.2,
who also test it at sequence lengths far beyond the training length.
"""

from __future__ import annotations

import torch

from rnnkit.errors import InputError, check_positive_int
from rnnkit.tasks.base import Batch, SyntheticTask, register_task


@register_task("induction_heads")
class InductionHeadsTask(SyntheticTask):
    """Induction heads: output the token that followed the trigger the first time it appeared.

    Layout of one sequence of length ``T``::

        x:  r r r ... r  s  a  r r ... r  s     (s: the trigger, a: the answer, r: random tokens)

    ``r`` and ``a`` are uniform over ``0..vocab_size - 2``; the trigger ``s = vocab_size - 1`` appears
    exactly twice: at a uniform position ``p`` in ``[0, T - 3]`` (followed by ``a``) and at the last
    step. The class is ``a``, read at the last step. Chance accuracy is ``1 / (vocab_size - 1)``.

    Args:
        vocab_size: tokens ``0..vocab_size - 1``, the last one the trigger (default 17).
        eval_examples: examples in each of val and test (default 1000).

    Batches: ``x`` ``(B, T)`` int64, ``y`` ``(B,)`` int64, ``lengths`` ``None``; default ``T = 64``,
    test lengths 64, 128, 256.

    Example:
        >>> task = build_task("induction_heads")
        >>> batch = next(task.train_batches(batch_size=2))
        >>> batch.x.shape, batch.y.shape, int(batch.x[0, -1])
        (torch.Size([2, 64]), torch.Size([2]), 16)
    """

    input_kind = "tokens"
    target = "classify"
    metrics = ("loss", "accuracy")
    default_seq_len = 64

    def __init__(self, *, vocab_size: int = 17, eval_examples: int = 1000) -> None:
        check_positive_int("vocab_size", vocab_size, minimum=3)
        super().__init__(eval_examples=eval_examples, vocab_size=vocab_size)
        self.vocab_size = self.n_classes = vocab_size
        self.trigger = vocab_size - 1

    def resolve_seq_len(self, seq_len: int | None) -> int:
        if seq_len is None:
            return self.default_seq_len
        if seq_len < 3:
            raise InputError(f"seq_len: expected at least 3 (trigger, answer, trigger), got {seq_len}")
        return seq_len

    def generate(self, batch_size: int, seq_len: int, gen: torch.Generator) -> Batch:
        B, T = batch_size, seq_len
        x = torch.randint(0, self.trigger, (B, T), generator=gen)  # (B, T): never the trigger
        where = torch.randint(0, T - 2, (B, 1), generator=gen)  # (B, 1): first trigger
        x.scatter_(1, where, self.trigger)
        x[:, -1] = self.trigger
        y = x.gather(1, where + 1)[:, 0]  # (B,): the token after the first trigger
        return Batch(x, y, None)
