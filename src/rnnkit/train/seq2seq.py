"""What the Trainer does differently for sequence-to-sequence tasks (encoder-decoder models).

A task with ``seq2seq = True`` yields :class:`~rnnkit.tasks.seq2seq_base.Seq2SeqBatch`\\ es and is
trained with a :class:`~rnnkit.models.Seq2Seq` (or, for a pointer task, a
:class:`~rnnkit.models.PointerNetwork`); everything else of the Trainer (optimizer, schedule,
clipping, NaN policy, checkpoints, exact resume, logs, data parallelism) is shared with sequence
models. This module holds the differences:

- the loss: :func:`~rnnkit.models.seq2seq_loss` on teacher-forced logits, with the config's
  ``label_smoothing`` and, with ``scheduled_sampling``, the teacher-forcing probability of the step
  (Bengio et al. 2015); the sampling draws come from a generator seeded by (run seed, step, rank), so
  a resumed run draws what the uninterrupted one drew;
- evaluation: the teacher-forced loss (plain cross entropy, no smoothing, so val losses of runs with
  different smoothing compare) and the task's own metrics (PER and WER for ``g2p``, exact-sequence
  accuracy, area coverage for ``convex_hull``) of greedy decoding, or beam search with ``eval_beam > 1``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from rnnkit.errors import InputError, describe
from rnnkit.models.decoding import beam_search, greedy_decode
from rnnkit.models.losses import seq2seq_loss, teacher_forcing_probability
from rnnkit.models.model import SequenceModel
from rnnkit.models.pointer import PointerNetwork
from rnnkit.models.seq2seq import Seq2Seq
from rnnkit.models.wiring import check_fits, check_seq2seq_fits
from rnnkit.tasks.base import derive_seed
from rnnkit.tasks.seq2seq_base import Seq2SeqBatch, add_sums
from rnnkit.train.config import TrainConfig


def is_seq2seq(task: Any) -> bool:
    """True for a sequence-to-sequence task (its batches are ``Seq2SeqBatch``)."""
    return bool(getattr(task, "seq2seq", False))


def check_model(model: torch.nn.Module, task: Any, config: TrainConfig) -> None:
    """Raise InputError unless ``model`` is the kind of model ``task`` trains, with its sizes, and the
    config's sequence-to-sequence options apply to it."""
    name = getattr(task, "name", type(task).__name__)
    if not is_seq2seq(task):
        if not isinstance(model, SequenceModel):
            raise InputError(f"model: expected a SequenceModel for task {name!r}, got a {type(model).__name__}")
        for field, idle in (("label_smoothing", 0.0), ("scheduled_sampling", "none")):
            if getattr(config, field) != idle:
                raise InputError(f"{field}: expected {idle!r} for task {name!r} (only sequence-to-sequence tasks use "
                                 f"it), got {getattr(config, field)!r}")
        check_fits(model.config, task)
        return
    wanted = PointerNetwork if task.pointer else Seq2Seq
    if not isinstance(model, wanted):
        raise InputError(f"model: expected a {wanted.__name__} for the sequence-to-sequence task {name!r}, "
                         f"got a {type(model).__name__}")
    check_seq2seq_fits(model.config, task)
    if task.pointer and config.scheduled_sampling != "none":
        raise InputError(f"scheduled_sampling: expected 'none' for the pointer task {name!r} (a pointer network "
                         f"feeds back chosen elements, not sampled tokens), got {config.scheduled_sampling!r}")


def check_batch(task: Any, batch: Any) -> None:
    """Raise InputError unless a sequence-to-sequence task's batch is a ``Seq2SeqBatch``."""
    if not isinstance(batch, Seq2SeqBatch):
        raise InputError(f"task {task.name!r}: expected Seq2SeqBatch batches from a sequence-to-sequence task, "
                         f"got {describe(batch)}")


def shard(batch: Seq2SeqBatch, rank: int, world_size: int) -> Seq2SeqBatch:
    """Rank ``rank``'s rows of a global batch (the whole batch outside a process group)."""
    if world_size == 1:
        return batch
    per = len(batch) // world_size
    return batch.take(rank * per, (rank + 1) * per)


def teacher_forcing(config: TrainConfig, step: int) -> float:
    """The probability of feeding the true previous token at ``step`` (1 without scheduled sampling)."""
    schedule = config.teacher_forcing_schedule
    return 1.0 if schedule is None else teacher_forcing_probability(step, **schedule)


def _logits(net: torch.nn.Module, pointer: bool, batch: Seq2SeqBatch, mode: str, **sampling: Any) -> torch.Tensor:
    """Teacher-forced logits ``(B, T, V)`` (pointer networks: scores over positions ``(B, T, n)``)."""
    if pointer:
        return net(batch.src, batch.src_lengths, batch.targets, batch.tgt_lengths, mode=mode)
    return net(batch.src, batch.src_lengths, batch.tgt_in, batch.tgt_lengths, mode=mode, **sampling)


def loss_sum(net: torch.nn.Module, task: Any, batch: Seq2SeqBatch, config: TrainConfig, step: int,
             rank: int = 0) -> torch.Tensor:
    """The training loss of one (local) batch summed over its target tokens (``batch.num_tokens``).

    ``net`` is the model or its ``DistributedDataParallel`` wrapper.
    """
    sampling: dict[str, Any] = {}
    p = teacher_forcing(config, step)
    if p < 1:
        device = batch.src.device
        generator = torch.Generator(device=device).manual_seed(
            derive_seed("scheduled_sampling", config.seed, step, rank))
        sampling = {"teacher_forcing": p, "generator": generator}
    logits = _logits(net, task.pointer, batch, config.mode, **sampling)
    return seq2seq_loss(logits, batch.targets, batch.tgt_lengths, label_smoothing=config.label_smoothing,
                        reduction="sum")


def decode(model: torch.nn.Module, task: Any, src: torch.Tensor, src_lengths: torch.Tensor, beam: int = 1):
    """Greedy decoding (``beam = 1``) or the best hypothesis of a beam search, with the task's
    decoding options (``max_len``, start, end and padding ids)."""
    options = task.decode_options(src_lengths)
    if beam == 1:
        return greedy_decode(model, src, src_lengths, **options)
    return beam_search(model, src, src_lengths, beam_size=beam, **options)


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: Any, config: TrainConfig, split: str, seq_len: int | None,
             max_batches: int | None = None, max_seconds: float | None = None) -> tuple[dict[str, float], int]:
    """``{"loss", <the task's metrics>}`` over ``split`` (or its first batches, as
    :meth:`~rnnkit.train.Trainer.evaluate_bounded` bounds them) and the number of examples seen.

    The loss is the teacher-forced cross entropy per target token; the metrics score decoded
    predictions (``config.eval_beam``).
    """
    nll, count, seen, sums, started = 0.0, 0, 0, {}, time.perf_counter()
    for index, batch in enumerate(task.eval_batches(split, config.eval_batch_size, seq_len)):
        if max_batches is not None and index >= max_batches:
            break
        if index == 0:
            check_batch(task, batch)
        batch = batch.to(config.device)
        logits = _logits(model, task.pointer, batch, config.mode)
        nll += float(seq2seq_loss(logits, batch.targets, batch.tgt_lengths, label_smoothing=0.0, reduction="sum"))
        count += batch.num_tokens
        add_sums(sums, task.metric_sums(decode(model, task, batch.src, batch.src_lengths, config.eval_beam), batch))
        seen += len(batch)
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            break
    return {"loss": nll / max(count, 1), **task.finalize_metrics(sums)}, seen


__all__ = ["check_batch", "check_model", "decode", "evaluate", "is_seq2seq", "loss_sum", "shard", "teacher_forcing"]
