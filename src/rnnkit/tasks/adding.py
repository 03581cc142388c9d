"""The adding problem: add the two marked numbers of a long sequence.

From Hochreiter & Schmidhuber (1997), "Long Short-Term Memory", experiment 4, in the form used by
Le, Jaitly & Hinton (2015), "A Simple Way to Initialize Recurrent Networks of Rectified Linear Units",
section 4.1, and Arjovsky, Shah & Bengio (2016), section 4.2.
"""

from __future__ import annotations

import torch

from rnnkit.errors import InputError
from rnnkit.tasks.base import Batch, SyntheticTask, register_task


@register_task("adding")
class AddingTask(SyntheticTask):
    """Adding problem: regress the sum of the two marked values of a sequence.

    Each step has two features: channel 0 a value drawn uniformly from ``[0, 1)``, channel 1 a marker
    that is 1 at exactly two steps, one uniform in the first half ``[0, T // 2)`` and one uniform in
    the second half ``[T // 2, T)``, and 0 elsewhere. The target is the sum of the two marked values.

    Baseline: always predicting the mean 1.0 gives MSE = Var(U1 + U2) = 2/12 = 0.167; Le et al. (2015)
    count a model as solving the task when its MSE falls well below that.

    Args:
        eval_examples: examples in each of val and test (default 1000).

    Batches: ``x`` ``(B, T, 2)`` float32, ``y`` ``(B, 1)`` float32, ``lengths`` ``None``; default
    ``T = 100``.

    Example:
        >>> task = build_task("adding")
        >>> batch = next(task.train_batches(batch_size=4, seq_len=50))
        >>> torch.allclose((batch.x[..., 0] * batch.x[..., 1]).sum(1, keepdim=True), batch.y)
        True
    """

    input_kind = "features"
    d_input = 2
    target = "regress"
    d_output = 1
    metrics = ("loss", "mse")
    default_seq_len = 100

    def __init__(self, *, eval_examples: int = 1000) -> None:
        super().__init__(eval_examples=eval_examples)

    def resolve_seq_len(self, seq_len: int | None) -> int:
        if seq_len is None:
            return self.default_seq_len
        if seq_len < 2:
            raise InputError(f"seq_len: expected at least 2 (one marker in each half), got {seq_len}")
        return seq_len

    def generate(self, batch_size: int, seq_len: int, gen: torch.Generator) -> Batch:
        B, T = batch_size, seq_len
        half = T // 2
        values = torch.rand(B, T, generator=gen)  # (B, T)
        first = torch.randint(0, half, (B, 1), generator=gen)  # (B, 1)
        second = torch.randint(half, T, (B, 1), generator=gen)  # (B, 1)
        markers = torch.zeros(B, T)  # (B, T)
        markers.scatter_(1, first, 1.0)
        markers.scatter_(1, second, 1.0)
        x = torch.stack([values, markers], dim=-1)  # (B, T, 2)
        y = values.gather(1, first) + values.gather(1, second)  # (B, 1)
        return Batch(x, y, None)
