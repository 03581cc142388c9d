"""Training objectives of sequence-to-sequence models: a masked, label-smoothed cross-entropy and the
teacher-forcing schedules of scheduled sampling (Bengio et al. 2015)."""

from __future__ import annotations

import math

import torch

from rnnkit.errors import InputError, check_choice, check_lengths, check_positive_int, describe
from rnnkit.layers.base import length_mask

SCHEDULES = ("linear", "exponential", "inverse_sigmoid")


def seq2seq_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lengths=None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy over the valid target steps, with label smoothing (Szegedy et al. 2016).

    Each valid step costs ``(1 - eps) * (-log p(target)) + eps * mean_v(-log p(v))``, the mean taken over
    the classes whose logit is finite (a pointer network's ``-inf`` marks positions it may not choose),
    so with finite logits it equals ``torch.nn.functional.cross_entropy(..., label_smoothing=eps)``.
    Steps at or past ``lengths`` are removed by selection: their logits and targets (any values, NaN
    included) reach neither the loss nor a gradient.

    Args:
        logits: ``(B, T, V)``.
        targets: ``(B, T)`` class ids in ``[0, V)`` at valid steps.
        lengths: ``(B,)`` valid target lengths, or None (every step is valid).
        label_smoothing: ``eps`` in ``[0, 1)``.
        reduction: ``"mean"`` (per valid token) or ``"sum"``.

    Returns:
        The scalar loss.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not logits.dtype.is_floating_point:
        raise InputError(f"logits: expected float logits of shape (B, T, V), got {describe(logits)}")
    batch, steps, classes = logits.shape
    if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != (batch, steps) \
            or targets.dtype not in (torch.int64, torch.int32):
        raise InputError(f"targets: expected integer ids of shape (B, T) = ({batch}, {steps}), got {describe(targets)}")
    if not isinstance(label_smoothing, (int, float)) or isinstance(label_smoothing, bool) \
            or not 0 <= label_smoothing < 1:
        raise InputError(f"label_smoothing: expected a number in [0, 1), got {label_smoothing!r}")
    check_choice("reduction", reduction, ("mean", "sum"))
    lengths = check_lengths(lengths, batch, steps, logits.device)
    valid = torch.ones(batch, steps, dtype=torch.bool, device=logits.device) if lengths is None \
        else length_mask(lengths, steps)
    if valid.any():
        chosen = targets[valid]
        if int(chosen.min()) < 0 or int(chosen.max()) >= classes:
            raise InputError(f"targets: expected ids in [0, {classes}) at valid steps, "
                             f"got min {int(chosen.min())}, max {int(chosen.max())}")
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    logits = torch.where(valid[..., None], logits, zero)
    targets = torch.where(valid, targets, torch.zeros_like(targets)).long()
    log_probs = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1)
    nll = -log_probs.gather(-1, targets[..., None]).squeeze(-1)  # (B, T)
    if label_smoothing:
        allowed = torch.isfinite(logits)
        uniform = -torch.where(allowed, log_probs, zero.to(log_probs.dtype)).sum(-1) / allowed.sum(-1).clamp(min=1)
        nll = (1 - label_smoothing) * nll + label_smoothing * uniform
    total = torch.where(valid, nll, zero.to(nll.dtype)).sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)


def teacher_forcing_probability(
    step: int, schedule: str = "inverse_sigmoid", k: float | None = None, slope: float = 1e-4, minimum: float = 0.0
) -> float:
    """The probability of feeding the true previous token at training ``step`` (Bengio et al. 2015,
    "Scheduled Sampling for Sequence Prediction with Recurrent Neural Networks", section 2.4).

    - ``"linear"``: ``max(minimum, k - slope * step)``, ``k`` defaults to 1;
    - ``"exponential"``: ``k ** step`` with ``0 < k < 1`` (default 0.9995);
    - ``"inverse_sigmoid"``: ``k / (k + exp(step / k))`` with ``k >= 1`` (default 1000).

    Every schedule is then clipped to ``[minimum, 1]``. Pass the result to ``Seq2Seq.forward``'s
    ``teacher_forcing``.

    Example:
        >>> logits = model(src, src_lengths, tgt_in, tgt_lengths,
        ...                teacher_forcing=teacher_forcing_probability(step, "linear", slope=1e-4),
        ...                generator=generator)
    """
    check_positive_int("step", step, minimum=0)
    check_choice("schedule", schedule, SCHEDULES)
    if not isinstance(minimum, (int, float)) or isinstance(minimum, bool) or not 0 <= minimum <= 1:
        raise InputError(f"minimum: expected a number in [0, 1], got {minimum!r}")
    if schedule == "linear":
        k = 1.0 if k is None else k
        if not isinstance(slope, (int, float)) or isinstance(slope, bool) or slope < 0:
            raise InputError(f"slope: expected a number >= 0, got {slope!r}")
        value = k - slope * step
    elif schedule == "exponential":
        k = 0.9995 if k is None else k
        if not isinstance(k, (int, float)) or isinstance(k, bool) or not 0 < k < 1:
            raise InputError(f"k: expected a number in (0, 1) for the exponential schedule, got {k!r}")
        value = k ** step
    else:
        k = 1000.0 if k is None else k
        if not isinstance(k, (int, float)) or isinstance(k, bool) or not k >= 1:
            raise InputError(f"k: expected a number >= 1 for the inverse sigmoid schedule, got {k!r}")
        exponent = step / k
        value = 0.0 if exponent > 700 else k / (k + math.exp(exponent))  # exp overflows past ~709
    return float(min(1.0, max(minimum, value)))


__all__ = ["SCHEDULES", "seq2seq_loss", "teacher_forcing_probability"]
