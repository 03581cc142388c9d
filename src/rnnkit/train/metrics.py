"""Losses and metrics: the loss of a batch per task target, and exact metrics summed over batches."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rnnkit.tasks import IGNORE_INDEX, Batch


def loss_and_counts(
    output: torch.Tensor, batch: Batch, target: str, reduction: str = "mean"
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of a batch and the sums needed for exact metrics over many batches.

    Returns:
        The mean (or, with ``reduction="sum"``, summed) loss as a scalar tensor with grad, and ``{"loss_sum", "count", "correct"}`` where
        ``count`` is the number of predictions (non-ignored targets, sequences or regression values).
    """
    if target == "per_step":
        heads = batch.y.shape[2] if batch.y.dim() == 3 else 1  # multi-head tasks: y (B, T, H)
        logits = output.reshape(-1, output.shape[-1] // heads)  # (B*T*H, C)
        labels = batch.y.reshape(-1)  # (B*T*H,)
        loss_sum = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        valid = labels != IGNORE_INDEX
        count = int(valid.sum())
        correct = int(((logits.argmax(-1) == labels) & valid).sum())
    elif target == "classify":
        loss_sum = F.cross_entropy(output.float(), batch.y, reduction="sum")
        count = batch.y.shape[0]
        correct = int((output.argmax(-1) == batch.y).sum())
    else:
        loss_sum = F.mse_loss(output.float(), batch.y.float(), reduction="sum")
        count = batch.y.numel()
        correct = 0
    loss = loss_sum if reduction == "sum" else loss_sum / max(count, 1)
    return loss, {"loss_sum": float(loss_sum.detach()), "count": count, "correct": correct}


def prediction_count(batch: Batch, target: str) -> int:
    """Number of predictions in a batch, as :func:`loss_and_counts` counts them."""
    if target == "per_step":
        return int((batch.y != IGNORE_INDEX).sum())
    if target == "classify":
        return int(batch.y.shape[0])
    return int(batch.y.numel())


def summarise(
    totals: dict[str, float], metrics: tuple[str, ...], units_per_target: dict[str, float] | None = None
) -> dict[str, float]:
    """Turn summed counts into the task's metrics.

    ``units_per_target`` (from :meth:`~rnnkit.tasks.Task.units_per_target`) turns bits per target
    into bits per character (``"bpc"``) or byte (``"bpb"``) of the text; absent entries are 1.
    """
    count = max(totals["count"], 1)
    loss = totals["loss_sum"] / count
    out: dict[str, float] = {"loss": loss}
    units = units_per_target or {}
    for name in ("bpc", "bpb"):
        if name in metrics:
            out[name] = loss / math.log(2) / units.get(name, 1.0)
    if "accuracy" in metrics:
        out["accuracy"] = totals["correct"] / count
    if "mse" in metrics:
        out["mse"] = loss
    return out


def describe_metrics(metrics: dict[str, float]) -> str:
    """``"loss 1.2345, bpc 1.7810"``."""
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


__all__ = ["describe_metrics", "loss_and_counts", "prediction_count", "summarise"]
