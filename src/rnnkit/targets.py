"""What a task predicts: the one table of target kinds.

Each row of :data:`TARGET_KINDS` says, for one ``Task.target``, which model head produces the
prediction, what ``Batch.y`` holds (dtype and shape), how the loss and the exact metric sums of a
batch are computed, which metrics make sense, and how ``SequenceModel.generate`` turns a per-step
output into the next input. Tasks, models and the trainer all read this table, so adding a target
kind is one row here.

Shapes: ``B`` batch, ``T`` time, ``H`` heads per step (multi-head curricula), ``W`` the width the task
declares (``n_classes`` or ``d_output``, by the row's ``width``).

Padding: per-step targets are masked by the batch's ``lengths``. Class ids mark ignored steps with
``IGNORE_INDEX``; real-valued targets are masked with ``torch.where`` (never a multiplication), so a
NaN written in the padding, or standing for a missing target at a valid step, reaches neither the
loss nor its gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from rnnkit.errors import InputError, describe

#: Target value that losses and metrics skip (``torch.nn.functional.cross_entropy``'s default).
IGNORE_INDEX = -100

#: The sums one batch contributes to a split's metrics (all added over batches, then :func:`summarise`\ d).
COUNT_KEYS = ("loss_sum", "count", "correct", "total", "tp", "fp", "fn")


@dataclass(frozen=True)
class TargetKind:
    """One target kind (a row of :data:`TARGET_KINDS`).

    Attributes:
        name: the ``Task.target`` value.
        head: the :class:`~rnnkit.models.SequenceModel` head that predicts it.
        per_step: one prediction per time step (else one per sequence).
        y_dtype: ``"int64"`` (class ids) or ``"float32"`` (values or 0/1 labels).
        y_shapes: the shapes ``Batch.y`` may have, in the letters of the module docstring.
        width: the task attribute that gives ``W``: ``"n_classes"`` or ``"d_output"``.
        metrics: the metrics this kind can report (a task picks among them).
        loss: ``(output, y, lengths) -> (summed loss, counts)``; ``counts`` has :data:`COUNT_KEYS`.
        count: ``(y, lengths) -> int``: the loss's denominator (what the mean loss is averaged over).
        feedback: how generation feeds a per-step prediction back as the next input: ``"token"``
            (a sampled class id), ``"bernoulli"`` (each label drawn from its probability) or
            ``"value"`` (the prediction itself); ``None`` for per-sequence kinds.
    """

    name: str
    head: str
    per_step: bool
    y_dtype: str
    y_shapes: tuple[tuple[str, ...], ...]
    width: str
    metrics: tuple[str, ...]
    loss: Callable[..., tuple[torch.Tensor, dict[str, float]]]
    count: Callable[[torch.Tensor, torch.Tensor | None], int]
    feedback: str | None


def step_mask(lengths: torch.Tensor | None, batch: int, steps: int, device: torch.device) -> torch.Tensor:
    """``(B, T)`` bool: True at the valid steps of a right-padded batch (all steps when ``lengths`` is None)."""
    if lengths is None:
        return torch.ones(batch, steps, dtype=torch.bool, device=device)
    return torch.arange(steps, device=device) < lengths.to(device)[:, None]


def _value_mask(y: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """``(B, T, W)`` bool: the entries of a real-valued per-step target that count (valid step, finite value)."""
    return step_mask(lengths, y.shape[0], y.shape[1], y.device)[..., None] & torch.isfinite(y)


def _counts(loss_sum: torch.Tensor, count: int, correct: int = 0, total: int | None = None,
            tp: int = 0, fp: int = 0, fn: int = 0) -> dict[str, float]:
    return {"loss_sum": float(loss_sum.detach()), "count": count, "correct": correct,
            "total": count if total is None else total, "tp": tp, "fp": fp, "fn": fn}


def _class_per_step_loss(output, y, lengths):
    heads = y.shape[2] if y.dim() == 3 else 1  # multi-head tasks: y (B, T, H)
    logits = output.reshape(-1, output.shape[-1] // heads)  # (B*T*H, C)
    labels = y.reshape(-1)  # (B*T*H,)
    loss_sum = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    valid = labels != IGNORE_INDEX
    return loss_sum, _counts(loss_sum, int(valid.sum()), int(((logits.argmax(-1) == labels) & valid).sum()))


def _classify_loss(output, y, lengths):
    loss_sum = F.cross_entropy(output.float(), y, reduction="sum")
    return loss_sum, _counts(loss_sum, y.shape[0], int((output.argmax(-1) == y).sum()))


def _regress_loss(output, y, lengths):
    loss_sum = F.mse_loss(output.float(), y.float(), reduction="sum")
    return loss_sum, _counts(loss_sum, y.numel())


def _regress_per_step_loss(output, y, lengths):
    mask = _value_mask(y, lengths)  # (B, T, W)
    target = torch.where(mask, y, 0.0)  # NaN never meets the prediction, so never the gradient
    loss_sum = torch.where(mask, (output.float() - target.float()) ** 2, 0.0).sum()
    return loss_sum, _counts(loss_sum, int(mask.sum()))


def _multilabel_loss(output, y, lengths):
    mask = _value_mask(y, lengths)  # (B, T, K)
    target = torch.where(mask, y, 0.0).float()
    nll = F.binary_cross_entropy_with_logits(output.float(), target, reduction="none")  # (B, T, K)
    loss_sum = torch.where(mask, nll, 0.0).sum()
    predicted, actual = output > 0, target > 0.5
    return loss_sum, _counts(
        loss_sum, _multilabel_steps(y, lengths),
        correct=int(((predicted == actual) & mask).sum()), total=int(mask.sum()),
        tp=int((predicted & actual & mask).sum()), fp=int((predicted & ~actual & mask).sum()),
        fn=int((~predicted & actual & mask).sum()),
    )


def _multilabel_steps(y, lengths) -> int:
    """Steps with at least one label to predict: the multi-label loss is summed over the K labels of a
    step and averaged over steps (the convention of polyphonic-music benchmarks such as JSB Chorales)."""
    return int(_value_mask(y, lengths).any(-1).sum())


TARGET_KINDS: dict[str, TargetKind] = {
    kind.name: kind
    for kind in (
        TargetKind("per_step", "lm", True, "int64", (("B", "T"), ("B", "T", "H")), "n_classes",
                   ("loss", "bpc", "accuracy"), _class_per_step_loss,
                   lambda y, lengths: int((y != IGNORE_INDEX).sum()), "token"),
        TargetKind("classify", "classify", False, "int64", (("B",),), "n_classes", ("loss", "accuracy"),
                   _classify_loss, lambda y, lengths: int(y.shape[0]), None),
        TargetKind("regress", "regress", False, "float32", (("B", "W"),), "d_output", ("loss", "mse"),
                   _regress_loss, lambda y, lengths: int(y.numel()), None),
        TargetKind("regress_per_step", "regress_per_step", True, "float32", (("B", "T", "W"),), "d_output",
                   ("loss", "mse"), _regress_per_step_loss, lambda y, lengths: int(_value_mask(y, lengths).sum()),
                   "value"),
        TargetKind("multilabel", "multilabel", True, "float32", (("B", "T", "W"),), "n_classes",
                   ("loss", "accuracy", "f1"), _multilabel_loss, _multilabel_steps, "bernoulli"),
    )
}

#: ``Task.target`` values.
TARGETS = tuple(TARGET_KINDS)
#: ``ModelConfig.head`` values, and the kind each head predicts.
KIND_OF_HEAD = {kind.head: kind for kind in TARGET_KINDS.values()}
HEADS = tuple(KIND_OF_HEAD)
#: Heads that emit one output per time step (``(B, T, n_outputs)``).
PER_STEP_HEADS = tuple(kind.head for kind in TARGET_KINDS.values() if kind.per_step)
#: Metric names a task may report.
METRICS = ("loss", "bpc", "bpb", "accuracy", "mse", "f1")


def target_kind(name: str, argument: str = "target") -> TargetKind:
    """The row of :data:`TARGET_KINDS` for target ``name`` (``argument`` names it in the error)."""
    if name not in TARGET_KINDS:
        raise InputError(f"{argument}: expected one of {list(TARGETS)}, got {name!r}")
    return TARGET_KINDS[name]


def check_target(task: Any, x: torch.Tensor, y: Any) -> None:
    """Raise InputError unless ``y`` has the dtype and shape that ``task.target`` declares for inputs ``x``.

    The message names the task, the expected dtype and shapes (with the sizes filled in) and the actual
    tensor, so a float per-step target declared as classes (or any such mix-up) is caught before a loss.
    """
    kind = target_kind(task.target)
    name = getattr(task, "name", "") or type(task).__name__
    sizes = {"B": x.shape[0], "T": x.shape[1] if x.dim() >= 2 else None, "H": getattr(task, "n_heads", 1),
             "W": getattr(task, kind.width, None)}
    shapes = [tuple(sizes[d] for d in shape) for shape in kind.y_shapes]
    readable = " or ".join("(" + ", ".join(f"{d}={sizes[d]}" if sizes[d] is not None else d for d in shape) + ")"
                           for shape in kind.y_shapes)
    expected = f"{kind.y_dtype} y of shape {readable} for target {kind.name!r}"
    if not isinstance(y, torch.Tensor):
        raise InputError(f"task {name!r}: expected {expected}, got {describe(y)}")
    floating = kind.y_dtype.startswith("float")
    dtype_ok = y.is_floating_point() if floating else (not y.is_floating_point() and y.dtype != torch.bool)
    shape_ok = any(y.dim() == len(s) and all(w is None or w == got for w, got in zip(s, y.shape)) for s in shapes)
    if not (dtype_ok and shape_ok):
        raise InputError(f"task {name!r}: expected {expected}, got {describe(y)}")


def loss_and_counts(output: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor | None, target: str,
                    reduction: str = "mean") -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one batch and its metric sums (:data:`COUNT_KEYS`), by the target's row."""
    kind = target_kind(target)
    loss_sum, counts = kind.loss(output, y, lengths)
    loss = loss_sum if reduction == "sum" else loss_sum / max(counts["count"], 1)
    return loss, counts


def summarise(totals: dict[str, float], metrics: tuple[str, ...],
              units_per_target: dict[str, float] | None = None) -> dict[str, float]:
    """Turn metric sums added over batches into the metrics named in ``metrics``.

    ``units_per_target`` (from :meth:`~rnnkit.tasks.Task.units_per_target`) turns bits per target into
    bits per character (``"bpc"``) or byte (``"bpb"``) of the text; absent entries are 1.
    """
    loss = totals["loss_sum"] / max(totals["count"], 1)
    units = units_per_target or {}
    derived = {
        "loss": lambda: loss,
        "bpc": lambda: loss / math.log(2) / units.get("bpc", 1.0),
        "bpb": lambda: loss / math.log(2) / units.get("bpb", 1.0),
        "accuracy": lambda: totals["correct"] / max(totals.get("total", totals["count"]), 1),
        "mse": lambda: loss,
        "f1": lambda: 2 * totals["tp"] / max(2 * totals["tp"] + totals["fp"] + totals["fn"], 1),
    }
    return {"loss": loss, **{name: derived[name]() for name in METRICS if name in metrics and name != "loss"}}


__all__ = [
    "COUNT_KEYS", "HEADS", "IGNORE_INDEX", "KIND_OF_HEAD", "METRICS", "PER_STEP_HEADS", "TARGETS", "TARGET_KINDS",
    "TargetKind", "check_target", "loss_and_counts", "step_mask", "summarise", "target_kind",
]
