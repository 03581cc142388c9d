"""State-tracking probes: running modular sums and permutation composition (word problems).

Merrill, Petty & Sabharwal (2024), "The Illusion of State in State-Space Models", show that linear
recurrences with diagonal (or positive) transitions cannot express the word problem of ``S5`` (a
non-solvable group) at any depth, while an Elman/LSTM-style nonlinear recurrence can; ``S3`` and the
cyclic groups ``Z_m`` (modular sums) are solvable and thus easier. Grazzi et al. (2025), "Unlocking
State-Tracking in Linear RNNs Through Negative Eigenvalues", measure it per step at growing lengths.
"""

from __future__ import annotations

import itertools

import torch

from rnnkit.errors import check_choice, check_positive_int
from rnnkit.tasks.base import Batch, SyntheticTask, register_task


@register_task("modular_sum")
class ModularSumTask(SyntheticTask):
    """Modular sum: at every step output the sum of the tokens so far, modulo ``m``.

    Tokens are uniform in ``0..m - 1``; ``y[t] = (x[0] + ... + x[t]) mod m`` at every step (the word
    problem of the cyclic group ``Z_m``). Accuracy is over all steps; chance is ``1 / m``.

    Args:
        modulus: ``m`` (default 5).
        eval_examples: examples in each of val and test (default 1000).

    Batches: ``x`` ``(B, T)`` int64 in ``0..m - 1``, ``y`` ``(B, T)`` int64, ``lengths`` ``None``;
    default ``T = 32``, test lengths 32, 64, 128.

    Example:
        >>> task = build_task("modular_sum", modulus=3)
        >>> batch = next(task.train_batches(batch_size=2, seq_len=5))
        >>> torch.equal(batch.y, batch.x.cumsum(1) % 3)
        True
    """

    input_kind = "tokens"
    target = "per_step"
    metrics = ("loss", "accuracy")
    default_seq_len = 32

    def __init__(self, *, modulus: int = 5, eval_examples: int = 1000) -> None:
        check_positive_int("modulus", modulus, minimum=2)
        super().__init__(eval_examples=eval_examples, modulus=modulus)
        self.modulus = modulus
        self.vocab_size = self.n_classes = modulus

    def generate(self, batch_size: int, seq_len: int, gen: torch.Generator) -> Batch:
        x = torch.randint(0, self.modulus, (batch_size, seq_len), generator=gen)  # (B, T)
        return Batch(x, x.cumsum(dim=1) % self.modulus, None)


GROUPS = ("S3", "S5")


def symmetric_group(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The elements of ``S_n`` and their composition table.

    Returns:
        ``perms`` ``(n!, n)`` int64, the permutations in lexicographic order (index 0 is the
        identity), and ``table`` ``(n!, n!)`` int64 with ``table[i, j]`` the index of ``p_j o p_i``
        (first ``p_i``, then ``p_j``: ``(p_j o p_i)(k) = p_j[p_i[k]]``).
    """
    perms = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long)  # (n!, n)
    index = {tuple(p.tolist()): i for i, p in enumerate(perms)}
    composed = perms[:, None, :].expand(-1, len(perms), -1)  # (n!, n!, n): p_i
    composed = perms[None, :, :].expand(len(perms), -1, -1).gather(2, composed)  # p_j[p_i[k]]
    table = torch.tensor([[index[tuple(c.tolist())] for c in row] for row in composed], dtype=torch.long)
    return perms, table


@register_task("permutation_composition")
class PermutationCompositionTask(SyntheticTask):
    """Permutation composition (the word problem of ``S3`` or ``S5``), answered at every step.

    Each token is a permutation (its index among the ``n!`` permutations of ``S_n`` in lexicographic
    order, uniform); ``y[t]`` is the index of ``x[t] o ... o x[1] o x[0]``, the product of the prefix.
    Accuracy is over all steps; chance is ``1 / n!``.

    Args:
        group: ``"S3"`` (6 elements, solvable) or ``"S5"`` (120 elements, not solvable) (default ``"S3"``).
        eval_examples: examples in each of val and test (default 1000).

    Batches: ``x`` ``(B, T)`` int64 in ``0..n! - 1``, ``y`` ``(B, T)`` int64, ``lengths`` ``None``;
    default ``T = 32``, test lengths 32, 64, 128.

    Example:
        >>> task = build_task("permutation_composition", group="S3")
        >>> batch = next(task.train_batches(batch_size=2, seq_len=8))
        >>> batch.x.shape, task.n_classes
        (torch.Size([2, 8]), 6)
    """

    input_kind = "tokens"
    target = "per_step"
    metrics = ("loss", "accuracy")
    default_seq_len = 32

    def __init__(self, *, group: str = "S3", eval_examples: int = 1000) -> None:
        check_choice("group", group, GROUPS)
        super().__init__(eval_examples=eval_examples, group=group)
        self.group = group
        self.perms, self.table = symmetric_group(int(group[1:]))
        self.vocab_size = self.n_classes = len(self.perms)

    def generate(self, batch_size: int, seq_len: int, gen: torch.Generator) -> Batch:
        B, T = batch_size, seq_len
        x = torch.randint(0, self.n_classes, (B, T), generator=gen)  # (B, T)
        y = torch.empty_like(x)  # (B, T)
        # A scan over T with a table lookup per step: cheap for the T used here, and exact.
        acc = x[:, 0]  # (B,)
        y[:, 0] = acc
        for t in range(1, T):
            acc = self.table[acc, x[:, t]]
            y[:, t] = acc
        return Batch(x, y, None)
