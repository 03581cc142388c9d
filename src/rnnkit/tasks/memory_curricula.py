"""N-parity and N-delayed match-to-sample, with single-head and multi-head curricula.

From Khajehabdollahi, Zeraati et al. (2024), "Emergent mechanisms for long timescales depend on
training curriculum and affect performance in memory tasks" (ICLR 2024), section 2. A stream of
random bits; at every step the network reports a function of the last ``N`` bits, so the memory it
needs grows with ``N``. Two curricula raise ``N`` during training:

- single-head: one output, trained on ``N = 1``, then ``N = 2``, ... (the paper's networks solve
  large ``N`` this way but forget the smaller ones);
- multi-head: one output head per ``n``; at curriculum stage ``N`` the heads ``n = 1..N`` are all
  trained at once (the paper finds this more robust and faster to train).

The paper advances a stage when accuracy passes a threshold; here a stage lasts ``stage_steps``
training batches, so that batch ``k`` stays a pure function of its coordinates (resumable runs, and
the same data for every model of a benchmark grid). ``stage_steps = 0`` trains on the final ``n``
from the first step (no curriculum).
"""

from __future__ import annotations

from typing import Iterator

import torch

from rnnkit.errors import check_choice, check_positive_int
from rnnkit.tasks.base import IGNORE_INDEX, Batch, SyntheticTask, check_train_args, generator, register_task

CURRICULA = ("single", "multi")


class _MemoryCurriculumTask(SyntheticTask):
    """Shared machinery: bits in, per-step targets for one ``N`` (single) or every ``n <= N`` (multi).

    Subclasses implement :meth:`targets_for`, the per-step answer for one ``n``.
    """

    input_kind = "tokens"
    vocab_size = 2
    target = "per_step"
    n_classes = 2
    metrics = ("loss", "accuracy")
    default_seq_len = 64

    def __init__(self, *, n: int = 4, curriculum: str = "single", stage_steps: int = 200, eval_examples: int = 1000) -> None:
        check_positive_int("n", n)
        check_choice("curriculum", curriculum, CURRICULA)
        check_positive_int("stage_steps", stage_steps, minimum=0)
        super().__init__(eval_examples=eval_examples, n=n, curriculum=curriculum, stage_steps=stage_steps)
        self.n, self.curriculum, self.stage_steps = n, curriculum, stage_steps
        self.n_heads = n if curriculum == "multi" else 1
        self.default_seq_len = max(self.default_seq_len, 4 * n)

    def resolve_seq_len(self, seq_len: int | None) -> int:
        if seq_len is None:
            return self.default_seq_len
        check_positive_int("seq_len", seq_len, minimum=self.n + 1)
        return seq_len

    def stage(self, batch_index: int) -> int:
        """``N`` trained at training batch ``batch_index``: 1, 2, ... every ``stage_steps`` batches, up to ``n``."""
        if self.stage_steps == 0:
            return self.n
        return min(self.n, 1 + batch_index // self.stage_steps)

    def targets_for(self, bits: torch.Tensor, n: int) -> torch.Tensor:
        """Per-step answers ``(B, T)`` for delay/window ``n``, ``IGNORE_INDEX`` where undefined."""
        raise NotImplementedError

    def make(self, batch_size: int, seq_len: int, gen: torch.Generator, active: int) -> Batch:
        """A batch whose targets cover ``N = active`` (single) or heads ``1..active`` (multi)."""
        bits = torch.randint(0, 2, (batch_size, seq_len), generator=gen)  # (B, T)
        if self.curriculum == "single":
            return Batch(bits, self.targets_for(bits, active), None)
        heads = [
            self.targets_for(bits, m) if m <= active else torch.full_like(bits, IGNORE_INDEX)
            for m in range(1, self.n + 1)
        ]
        return Batch(bits, torch.stack(heads, dim=-1), None)  # y: (B, T, H)

    def generate(self, batch_size: int, seq_len: int, gen: torch.Generator) -> Batch:
        # Evaluation examples: the final stage (every head, or N = n).
        return self.make(batch_size, seq_len, gen, self.n)

    def train_batches(
        self, batch_size: int, seq_len: int | None = None, seed: int = 0, start: int = 0
    ) -> Iterator[Batch]:
        check_train_args(batch_size, seq_len, seed, start)
        T = self.resolve_seq_len(seq_len)

        def batches() -> Iterator[Batch]:
            k = start
            while True:
                yield self.make(batch_size, T, generator(self.name, "train", seed, k), self.stage(k))
                k += 1

        return batches()


def _window_parity(bits: torch.Tensor, n: int) -> torch.Tensor:
    """Parity of ``bits[t - n + 1 .. t]`` at every ``t >= n - 1``; ``IGNORE_INDEX`` before."""
    csum = torch.nn.functional.pad(bits.cumsum(dim=1), (1, 0))  # (B, T + 1): csum[:, t] = sum of bits[:t]
    window = csum[:, n:] - csum[:, :-n]  # (B, T - n + 1): sum of bits[t - n + 1 .. t]
    y = torch.full_like(bits, IGNORE_INDEX)
    y[:, n - 1 :] = window % 2
    return y


@register_task("n_parity")
class NParityTask(_MemoryCurriculumTask):
    """N-parity: at every step output the parity of the last N bits (single- or multi-head curriculum).

    ``y[t] = (x[t - N + 1] + ... + x[t]) mod 2`` for ``t >= N - 1`` (earlier steps are ignored). With
    ``curriculum="multi"`` the targets are ``(B, T, n)``: head ``m - 1`` answers for window ``m``.
    Evaluation (val/test) uses the final stage. Chance accuracy is 1/2 (``N = 1`` is a copy).

    Args:
        n: the final window ``N`` (default 4).
        curriculum: ``"single"`` or ``"multi"`` (see the module docstring; default ``"single"``).
        stage_steps: training batches per curriculum stage (default 200; 0: no curriculum).
        eval_examples: examples in each of val and test (default 1000).

    Batches: ``x`` ``(B, T)`` int64 in ``{0, 1}``; ``y`` ``(B, T)`` (single) or ``(B, T, n)`` (multi)
    int64; ``lengths`` ``None``; default ``T = max(64, 4 n)``.

    Example:
        >>> task = build_task("n_parity", n=3, curriculum="multi")
        >>> batch = next(task.eval_batches("val", batch_size=2))
        >>> batch.y.shape, task.n_heads
        (torch.Size([2, 64, 3]), 3)
    """

    def targets_for(self, bits: torch.Tensor, n: int) -> torch.Tensor:
        return _window_parity(bits, n)


@register_task("n_dms")
class NDMSTask(_MemoryCurriculumTask):
    """N-DMS: at every step say whether the current bit equals the bit N steps back (single- or multi-head).

    N-delayed match-to-sample: ``y[t] = 1 if x[t] == x[t - N] else 0`` for ``t >= N`` (earlier steps
    are ignored). With ``curriculum="multi"`` the targets are ``(B, T, n)``: head ``m - 1`` answers
    for delay ``m``. Evaluation uses the final stage. Chance accuracy is 1/2.

    Args:
        n: the final delay ``N`` (default 4).
        curriculum: ``"single"`` or ``"multi"`` (default ``"single"``).
        stage_steps: training batches per curriculum stage (default 200; 0: no curriculum).
        eval_examples: examples in each of val and test (default 1000).

    Batches: as :class:`NParityTask`.

    Example:
        >>> task = build_task("n_dms", n=2)
        >>> batch = next(task.train_batches(batch_size=2, seq_len=8))
        >>> batch.y.shape
        torch.Size([2, 8])
    """

    def targets_for(self, bits: torch.Tensor, n: int) -> torch.Tensor:
        y = torch.full_like(bits, IGNORE_INDEX)
        y[:, n:] = (bits[:, n:] == bits[:, :-n]).long()
        return y
