"""Parity: classify whether a bit string holds an odd number of ones.

A probe of state tracking: the answer depends on every bit, so a recurrence has to keep one bit of
state exactly over the whole sequence. Hahn (2020), "Theoretical Limitations of Self-Attention in
Neural Sequence Models", and Grazzi et al. (2024), "Unlocking State-Tracking in Linear RNNs Through
Negative Eigenvalues", use it to separate models that can track state from those that cannot.
"""

from __future__ import annotations

import torch

from rnnkit.errors import InputError
from rnnkit.tasks.base import Batch, SyntheticTask, register_task


@register_task("parity")
class ParityTask(SyntheticTask):
    """Parity: classify a bit string by the parity of its number of ones.

    Bits are uniform in ``{0, 1}``; the class is ``sum(bits) % 2``. With ``variable_length`` each
    sequence's length is uniform in ``[1, T]`` and the batch is right-padded with 0 up to ``T``
    (``lengths`` gives the valid lengths); otherwise every sequence fills all ``T`` steps and
    ``lengths`` is ``None``. Chance accuracy is 1/2.

    Args:
        variable_length: draw a length per sequence (default ``True``).
        eval_examples: examples in each of val and test (default 1000).

    Batches: ``x`` ``(B, T)`` int64 in ``{0, 1}``, ``y`` ``(B,)`` int64, ``lengths`` ``(B,)`` int64 or
    ``None``; default ``T = 64``.

    Example:
        >>> task = build_task("parity", variable_length=False)
        >>> batch = next(task.train_batches(batch_size=4, seq_len=16))
        >>> torch.equal(batch.x.sum(1) % 2, batch.y)
        True
    """

    input_kind = "tokens"
    vocab_size = 2
    target = "classify"
    n_classes = 2
    metrics = ("loss", "accuracy")
    default_seq_len = 64

    def __init__(self, *, variable_length: bool = True, eval_examples: int = 1000) -> None:
        if not isinstance(variable_length, bool):
            raise InputError(f"variable_length: expected a bool, got {variable_length!r}")
        super().__init__(eval_examples=eval_examples, variable_length=variable_length)
        self.variable_length = variable_length

    def generate(self, batch_size: int, seq_len: int, gen: torch.Generator) -> Batch:
        B, T = batch_size, seq_len
        bits = torch.randint(0, 2, (B, T), generator=gen)  # (B, T)
        lengths = None
        if self.variable_length:
            lengths = torch.randint(1, T + 1, (B,), generator=gen)  # (B,)
            valid = torch.arange(T) < lengths[:, None]  # (B, T)
            bits = bits * valid  # padding is 0, which also leaves the parity unchanged
        y = bits.sum(dim=1) % 2  # (B,)
        return Batch(bits, y, lengths)
