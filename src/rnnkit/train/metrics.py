"""Losses and metrics of a batch, by the task's target (the table in :mod:`rnnkit.targets`), and exact
metrics summed over batches."""

from __future__ import annotations

import torch

from rnnkit import targets
from rnnkit.targets import COUNT_KEYS, summarise
from rnnkit.tasks import Batch


def loss_and_counts(
    output: torch.Tensor, batch: Batch, target: str, reduction: str = "mean"
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of a batch and the sums needed for exact metrics over many batches.

    Returns:
        The mean (or, with ``reduction="sum"``, summed) loss as a scalar tensor with grad, and the sums
        :data:`~rnnkit.targets.COUNT_KEYS`, where ``count`` is the loss's denominator (non-ignored
        targets, sequences, regression values, or steps of a multi-label target).
    """
    return targets.loss_and_counts(output, batch.y, batch.lengths, target, reduction)


def prediction_count(batch: Batch, target: str) -> int:
    """Number of predictions in a batch, as :func:`loss_and_counts` counts them."""
    return targets.target_kind(target).count(batch.y, batch.lengths)


def empty_totals() -> dict[str, float]:
    """Metric sums before the first batch."""
    return dict.fromkeys(COUNT_KEYS, 0)


def describe_metrics(metrics: dict[str, float]) -> str:
    """``"loss 1.2345, bpc 1.7810"``."""
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


__all__ = ["describe_metrics", "empty_totals", "loss_and_counts", "prediction_count", "summarise"]
