"""The Trainer: the training loop and its evaluation, final model and resumable checkpoints.

Streaming tasks (character language modelling) are trained with truncated backpropagation through
time (Williams & Peng 1990): the recurrent state is carried from one window to the next and
detached at the window boundary, so gradients flow through at most ``seq_len`` steps while the
model still reads the text as one long stream. Gradient norms are clipped (Pascanu, Mikolov &
Bengio 2013, "On the difficulty of training recurrent neural networks").

With ``config.online`` the gradients are carried forward in time instead (real-time recurrent
learning or UORO, :mod:`~rnnkit.train.online_training`): each batch is read one time step at a time,
the weights change every ``online_every`` steps, memory does not grow with ``T``, and a stream's
state and sensitivities are carried across windows without truncation (and saved in checkpoints).

Exact resume: everything a step depends on is in the checkpoint (weights, optimizer moments, the
step that fixes the learning rate and the data position, every RNG, the carried TBPTT state), and
batches are pure functions of their index, so a run killed at any instant and resumed from its last
checkpoint produces bit-for-bit the weights, optimizer state and loss log of an uninterrupted run.

The mechanics live in their own modules: :mod:`~rnnkit.train.config` (the configuration),
:mod:`~rnnkit.train.optim` (optimizer, schedule, clipping), :mod:`~rnnkit.train.metrics` (loss and
metrics), :mod:`~rnnkit.train.rng`, :mod:`~rnnkit.train.signals`, :mod:`~rnnkit.train.progress`
(bar, log lines, throughput), :mod:`~rnnkit.train.distributed`, :mod:`~rnnkit.train.state` (what a
checkpoint holds) and :mod:`~rnnkit.train.checkpoint` (how it is committed).
"""

from __future__ import annotations

import csv
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from rnnkit.atomic import DISK_FULL, disk_full, fsync_dir, write_json_atomic
from rnnkit.errors import InputError, NonFiniteError
from rnnkit.layers.base import flatten_state, map_state
from rnnkit.models.io import read_weights
from rnnkit.models.model import SequenceModel
from rnnkit.tasks import Batch, Task, task_description
from rnnkit.train import distributed
from rnnkit.train import seq2seq
from rnnkit.train.checkpoint import CheckpointManager, resolve_checkpoint
from rnnkit.train.config import RESUME_FREE_FIELDS, TrainConfig
from rnnkit.train.logs import MetricsLogger
from rnnkit.targets import check_target
from rnnkit.train.online_training import OnlineTraining
from rnnkit.train.metrics import describe_metrics, empty_totals, loss_and_counts, prediction_count, summarise
from rnnkit.train.optim import build_optimizer, clip_gradients, lr_at, set_lr
from rnnkit.train.precision import autocast, fast_bf16, resolve_precision
from rnnkit.train.progress import ProgressReport, SessionClock, throughput_unit
from rnnkit.train.rng import rng_states, seed_everything, set_rng_states
from rnnkit.train.rundir import (
    BEST_DIR, FINAL_FILES, STAGING_PREFIX, foreign_final_files, make_owned_dir, record_final_files, remove_owned,
    remove_staging,
)
from rnnkit.train.signals import route_stop_signals
from rnnkit.train.state import (
    CHECKPOINT_FORMAT, HISTORY_KEYS, check_format, check_same_run, history_records, history_tensor,
    read_checkpoint_files, unflatten_like, write_checkpoint_files,
)


#: Steps timed (after the first) before ``budget_minutes`` fixes the step count; fewer within a shorter warmup.
BUDGET_PROBE_STEPS = 20


class Trainer:
    """Trains a :class:`SequenceModel` on a :class:`~rnnkit.tasks.Task`, or an encoder-decoder model
    (:class:`~rnnkit.models.Seq2Seq`, :class:`~rnnkit.models.PointerNetwork`) on a sequence-to-sequence
    task (:mod:`rnnkit.train.seq2seq`: the loss with label smoothing and scheduled sampling, evaluation
    by decoding), with the same checkpoints, exact resume, logs and NaN policy.

    Args:
        model: the model; its head must match the task's target (a Seq2Seq or PointerNetwork wired to
            a sequence-to-sequence task, see :func:`~rnnkit.models.seq2seq_config_for`).
        task: the task supplying batches.
        config: optimisation settings.
        out_dir: where :meth:`fit` writes the final model and, under ``checkpoints/``, resumable
            checkpoints (None: nothing is written).
        run_info: extra JSON-serialisable metadata stored in the checkpoint (e.g. the CLI command).
        log_dir: where metrics go as ``train.csv``, ``eval.csv`` and TensorBoard events (None: no logs).

    Inside a ``torch.distributed`` process group (``torchrun``) the model is wrapped in
    ``DistributedDataParallel``, each rank trains on its slice of every global batch, and only rank 0
    writes checkpoints and logs.

    Example:
        >>> task = build_task("adding")
        >>> model = SequenceModel(d_input=2, head="regress", n_outputs=1, layer="lstm", d_model=64)
        >>> trainer = Trainer(model, task, TrainConfig(steps=2000, checkpoint_every=200), out_dir="runs/adding")
        >>> trainer.resume()          # continue from runs/adding/checkpoints if a checkpoint exists
        >>> metrics = trainer.fit()
        >>> metrics["val"]["mse"]
    """

    def __init__(
        self,
        model: SequenceModel,
        task: Task,
        config: TrainConfig | None = None,
        out_dir: str | os.PathLike | None = None,
        run_info: dict[str, Any] | None = None,
        log_dir: str | os.PathLike | None = None,
    ) -> None:
        self.config = config or TrainConfig()
        self.task = task
        self.model = model.to(self.config.device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.run_info = dict(run_info or {})
        self.seq2seq = seq2seq.is_seq2seq(task)
        seq2seq.check_model(self.model, task, self.config)
        self.rank, self.world_size = distributed.rank_and_world()
        if self.config.batch_size % self.world_size:
            raise InputError(
                f"batch_size: expected a multiple of the world size {self.world_size}, got {self.config.batch_size}"
            )
        self.online: OnlineTraining | None = None  # config.online: forward-carried gradients instead of BPTT
        if self.config.online is not None:
            self.online = OnlineTraining(self.model, task, self.config, self.world_size)
        self.net: torch.nn.Module = distributed.wrap(self.model, self.config.device)
        self.optimizer = build_optimizer(self.model, self.config)
        self.step = 0
        self.history: list[dict[str, float]] = []  # one record per optimizer step, keys HISTORY_KEYS
        # One row per metric of each evaluation during training (keys EVAL_KEYS), kept in the
        # checkpoint so a resumed run's eval log is rebuilt from it; the final evaluation comes after
        # the last checkpoint and is not kept, so resuming a finished run logs it once.
        self.evals: list[dict[str, Any]] = []
        self.skipped = 0  # steps skipped under nan_policy="skip"
        self.consecutive_skips = 0
        self.tokens = 0  # predictions trained on so far
        self.elapsed = 0.0  # training seconds so far, over all sessions of this run
        self.budget_steps: int | None = None  # the run's length once fixed from config.budget_minutes
        self._budget_timer: tuple[int, float] | None = None  # (step, session seconds) where timing began
        self._session_first_step = 0
        self._carry = None  # TBPTT state carried into the next window (detached)
        self._rng_restored = False
        self._stop_signal: int | None = None
        self._logger: MetricsLogger | None = None  # the logger of the fit() in progress
        self.checkpoints = None
        if self.out_dir is not None:
            self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", self.config.keep_last)
            if self.rank == 0:
                self.checkpoints.clean()  # leftovers of a killed writer (only what rnnkit wrote)
                remove_staging(self.out_dir)
                foreign = foreign_final_files(self.best_dir) if self.config.keep_best else []
                if foreign:
                    raise InputError(f"keep_best: expected {self.best_dir} to hold no files rnnkit did not write, "
                                     f"got {', '.join(foreign)}; move them away or choose another out_dir")

    @property
    def best_dir(self) -> Path | None:
        """Where ``keep_best`` keeps the model of the lowest val loss: ``<out_dir>/best``."""
        return None if self.out_dir is None else self.out_dir / BEST_DIR

    # ------------------------------------------------------------------ training
    def fit(self, on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
        """Run until ``config.steps`` (fixed from ``config.budget_minutes`` after a few measured steps
        when that is set), the ``config.max_seconds`` budget, or ``config.patience`` evaluations without
        a lower val loss; then evaluate on val and write the final model.

        SIGTERM or SIGINT (Ctrl-C) at any point of the call stops the run at the next step boundary
        (or after the final evaluation or save in progress): a checkpoint is written (when ``out_dir``
        is set) and, unless the final model was already written, the result has ``"interrupted":
        <signal name>`` and an empty ``val``. A second SIGINT interrupts immediately.

        Returns:
            ``{"steps", "seconds", "tokens_per_second", "train_loss", "val", "skipped",
            "interrupted", "stopped_early", "best"}`` (``val`` is empty for an interrupted run;
            ``best`` is ``{"step", "loss"}`` of the lowest val loss seen during training, or None).
        """
        cfg = self.config
        if not self._rng_restored:
            seed_everything(cfg.seed)
        self.model.train()
        start = self.step
        batches = self.task.train_batches(cfg.batch_size, cfg.seq_len, seed=cfg.seed, start=start)
        logger = self._logger = self._open_logger()
        clock = SessionClock(self.elapsed)
        self._session_first_step, self._budget_timer = self.step, None
        report = ProgressReport(cfg, self.step, self.history[-1]["loss"] if self.history else None, self.rank == 0,
                                unit=throughput_unit(self.task))
        try:
            with route_stop_signals(self._on_signal):
                with report:
                    while self.step < cfg.steps and not self._out_of_time() and not self.patience_spent():
                        batch = next(batches)
                        if self.step == start:
                            self._check_batch(batch)  # before a loss could misread it
                        record = self._train_step(batch)
                        self._record(record, batch, clock, logger, report)
                        self._fix_steps_from_budget(clock, report)
                        if on_step is not None:
                            on_step(self.step, record)
                        if self._due(cfg.eval_every) and self.step < cfg.steps:
                            self._evaluate_during_training(logger, report)
                        if self._due(cfg.checkpoint_every):
                            self.save_checkpoint()
                        if self._stop_requested():
                            break
                result = self._result(clock)
                if self._stop_requested():
                    result["interrupted"] = self._checkpoint_on_stop()
                else:
                    self._finish(logger, result)
            return result
        finally:
            self._logger = None
            if logger is not None:
                logger.close()

    def _open_logger(self) -> MetricsLogger | None:
        """The CSV/TensorBoard logger of this session (rank 0 with a ``log_dir``)."""
        if self.log_dir is None or self.rank != 0:
            return None
        return MetricsLogger(self.log_dir, self.history, self.step, self.evals)

    def _record(self, record: dict[str, float], batch: Batch, clock: SessionClock, logger, report) -> None:
        """Add timings to a step's record, keep it in the history, log and show it."""
        clock.add_tokens(batch.num_tokens)
        self.tokens += batch.num_tokens
        seconds = clock.seconds
        self.elapsed = clock.elapsed_before + seconds
        record["tokens_per_second"] = clock.tokens_per_second(seconds)
        record["elapsed"] = self.elapsed
        self.history.append(record)
        if logger is not None:
            logger.log_train(record)
        report.step(record, self.skipped, seconds)

    def _due(self, every: int) -> bool:
        return bool(every) and self.step % every == 0

    def _evaluate_during_training(self, logger, report) -> None:
        metrics = self.evaluate("val")
        improved = self.best() is None or metrics["loss"] < self.best()["loss"]
        self.evals += [{"step": self.step, "split": "val", "metric": k, "value": float(v)} for k, v in metrics.items()]
        if logger is not None:
            logger.log_eval(self.step, "val", metrics)
        report.evaluation(self.step, metrics)
        if improved and self.config.keep_best and self.best_dir is not None:
            if self.rank == 0:
                self.save(self.best_dir, metrics={"step": self.step, "val": metrics})
            distributed.barrier()
        self.model.train()

    def _val_losses(self) -> list[tuple[int, float]]:
        return [(int(r["step"]), float(r["value"])) for r in self.evals if r["split"] == "val" and r["metric"] == "loss"]

    def best(self) -> dict[str, float] | None:
        """``{"step", "loss"}`` of the lowest val loss among the evaluations during training (the
        earliest on ties), or None before the first one."""
        losses = self._val_losses()
        if not losses:
            return None
        step, loss = min(losses, key=lambda pair: pair[1])
        return {"step": step, "loss": loss}

    def patience_spent(self) -> bool:
        """True once ``config.patience`` evaluations in a row brought no lower val loss (early stopping).

        Computed from the evaluations a checkpoint keeps, so a resumed run stops where the uninterrupted
        one does."""
        if not self.config.patience:
            return False
        losses = [loss for _, loss in self._val_losses()]
        if not losses:
            return False
        best_index = losses.index(min(losses))
        return len(losses) - 1 - best_index >= self.config.patience

    def _fix_steps_from_budget(self, clock: SessionClock, report: ProgressReport) -> None:
        """Once a few steps are timed, fix ``config.steps`` to what fits in ``config.budget_minutes``.

        The first step of a session is not timed (allocations, kernel builds). Timing ends within the
        learning-rate warmup when there is one, whose rates do not depend on the step count, so the
        run is the one that would have been asked for with that ``steps`` from the start. Every rank
        takes rank 0's measurement, so all agree on the count.
        """
        cfg = self.config
        if cfg.budget_minutes is None or self.budget_steps is not None:
            return
        if self.step - self._session_first_step == 1:
            self._budget_timer = (self.step, clock.seconds)
            return
        timed_from = self._budget_timer
        probe = max(2, min(BUDGET_PROBE_STEPS, cfg.warmup_steps))
        if timed_from is None or self.step - timed_from[0] < probe:
            return
        per_step = (clock.seconds - timed_from[1]) / (self.step - timed_from[0])
        if self.world_size > 1:
            per_step = distributed.all_sum([per_step if self.rank == 0 else 0.0], cfg.device)[0]
        remaining = cfg.budget_minutes * 60.0 - self.elapsed
        fitting = self.step + max(0, int(remaining / max(per_step, 1e-9)))
        self.budget_steps = cfg.steps = max(self.step, min(cfg.steps, fitting))
        report.set_total(cfg.steps)

    def _result(self, clock: SessionClock) -> dict[str, Any]:
        seconds = clock.seconds
        return {
            "steps": self.step,
            "seconds": seconds,
            "tokens_per_second": clock.tokens_per_second(seconds),
            "train_loss": self.history[-1]["loss"] if self.history else float("nan"),
            "skipped": self.skipped,
            "interrupted": None,
            "stopped_early": self.step < self.config.steps and self.patience_spent(),
            "best": self.best(),
            "val": {},
        }

    def _finish(self, logger, result: dict[str, Any]) -> None:
        """The end of a run: the final resumable checkpoint (if periodic ones are on), the val metrics
        and the final model, filled into ``result``.

        A stop request during the evaluation ends the run as interrupted, with a checkpoint of the last
        step to resume from; one during the final save lets the save finish, then checkpoints too, so a
        signal anywhere after a step leaves a resumable run.
        """
        if self.config.checkpoint_every:
            self.save_checkpoint()  # the final state, resumable (e.g. to train further)
        metrics = self.evaluate("val")
        if self._stop_requested():
            result["interrupted"] = self._checkpoint_on_stop()
            return
        result["val"] = metrics
        if logger is not None:
            logger.log_eval(self.step, "val", metrics)
        if self.out_dir is not None:
            self._check_finite_weights(self.out_dir)  # on every rank (their weights are equal): all stop together
        if self.out_dir is not None and self.rank == 0:
            self.save(self.out_dir, metrics=result)
        distributed.barrier()
        if self._stop_requested():
            self.save_checkpoint()

    def _out_of_time(self) -> bool:
        """True once the ``max_seconds`` budget is spent (agreed by every rank)."""
        if self.config.max_seconds is None:
            return False
        flag = float(self.elapsed > self.config.max_seconds)
        if self.world_size > 1:
            flag = distributed.all_sum([flag], self.config.device)[0]
        return bool(flag)

    def _check_batch(self, batch: Batch) -> None:
        if self.seq2seq:
            seq2seq.check_batch(self.task, batch)
        else:
            check_target(self.task, batch.x, batch.y)

    def _shard(self, batch: Batch) -> Batch:
        """This rank's rows of a global batch (all rows outside a process group)."""
        if self.seq2seq:
            return seq2seq.shard(batch, self.rank, self.world_size)
        if self.world_size == 1:
            return batch
        per = batch.x.shape[0] // self.world_size
        rows = slice(self.rank * per, (self.rank + 1) * per)
        lengths = None if batch.lengths is None else batch.lengths[rows]
        return Batch(batch.x[rows], batch.y[rows], lengths, batch.reset)

    def _online_step(self, batch: Batch) -> dict[str, float]:
        """One step of online training (:mod:`rnnkit.train.online_training`): the batch read step by step,
        the weights updated every ``online_every`` time steps."""
        local = batch.to(self.config.device)
        lr = lr_at(self.step, self.config)
        set_lr(self.optimizer, lr)
        result = self.online.train_batch(local, self.task.streaming and not local.reset, self.optimizer,
                                         self._non_finite)
        if not result["skipped"]:
            self.consecutive_skips = 0
        self.step += 1
        return {"step": self.step, "loss": result["loss"], "lr": lr, "grad_norm": result["grad_norm"],
                "skipped": result["skipped"]}

    def _train_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on a global batch (or a skipped step under ``nan_policy="skip"``)."""
        if self.online is not None:
            return self._online_step(batch)
        cfg = self.config
        local = self._shard(batch).to(cfg.device)
        state = self._carry if (self.task.streaming and not local.reset) else None
        lr = lr_at(self.step, cfg)
        set_lr(self.optimizer, lr)
        with autocast(cfg):
            if self.seq2seq:
                total = seq2seq.loss_sum(self.net, self.task, local, cfg, self.step, self.rank)
                loss, loss_value = self._mean_loss(total, batch.num_tokens)
            else:
                output, state = self.net(local.x, state, local.lengths, cfg.mode)
                loss, loss_value = self._loss(output, local, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_gradients(self.model, cfg.grad_clip)
        skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
        if skipped:
            self._non_finite(loss_value, grad_norm)
            self.optimizer.zero_grad(set_to_none=True)
            state = None  # a non-finite state would poison the windows that follow
        else:
            self.optimizer.step()
            self.consecutive_skips = 0
        self._carry = map_state(torch.Tensor.detach, state) if (self.task.streaming and state is not None) else None
        self.step += 1
        return {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "skipped": int(skipped)}

    def _loss(self, output: torch.Tensor, local: Batch, batch: Batch) -> tuple[torch.Tensor, float]:
        """The loss to differentiate on this rank and the global batch's mean loss."""
        if self.world_size == 1:
            loss, _ = loss_and_counts(output, local, self.task.target)
            return loss, float(loss.detach())
        loss_sum, _ = loss_and_counts(output, local, self.task.target, reduction="sum")
        return self._mean_loss(loss_sum, prediction_count(batch, self.task.target))

    def _mean_loss(self, loss_sum: torch.Tensor, total: int) -> tuple[torch.Tensor, float]:
        """From this rank's summed loss and the global batch's number of predictions ``total``: the
        loss to differentiate and the global mean loss."""
        if self.world_size == 1:
            loss = loss_sum / max(total, 1)
            return loss, float(loss.detach())
        # Each rank's sum over the *global* count, times the world size: DDP's gradient average
        # then equals the gradient of the global mean, even when ranks hold different numbers of
        # predictions (ignored targets, ragged sequences).
        total = max(total, 1)
        loss_value = distributed.all_sum([float(loss_sum.detach())], self.config.device)[0] / total
        return loss_sum / total * self.world_size, loss_value

    def _non_finite(self, loss_value: float, grad_norm: float) -> None:
        """Apply ``nan_policy`` to a step whose loss or gradient norm is not finite (before any update)."""
        what = f"non-finite loss ({loss_value}) or gradient norm ({grad_norm})"
        if self.config.nan_policy == "raise":
            error = NonFiniteError(
                f"step {self.step}: {what}; the weights were not updated and no checkpoint was written "
                "after the last good step. Lower the learning rate (--lr), enable clipping (--grad-clip), "
                "or skip such steps (--nan-policy skip, nan_policy='skip')."
            )
            error.step = self.step
            raise error
        self.skipped += 1
        self.consecutive_skips += 1
        if self.consecutive_skips > self.config.max_skips:
            error = NonFiniteError(
                f"step {self.step}: {what} for {self.consecutive_skips} consecutive steps "
                f"(nan_policy='skip' tolerates max_skips={self.config.max_skips}); the weights were not updated. "
                "Lower the learning rate (--lr) or tolerate more skips (--max-skips)."
            )
            error.step = self.step
            raise error

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum: int) -> None:
        """SIGTERM/SIGINT during :meth:`fit`: a stop request honoured at the next step boundary."""
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self._stop_signal = signum

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask :meth:`fit` to checkpoint and return at the next step boundary (what SIGTERM does)."""
        self._stop_signal = int(signum)

    def _stop_requested(self) -> bool:
        flag = float(self._stop_signal is not None)
        if self.world_size > 1:  # torchrun signals every rank, maybe at different steps: agree on one
            flag = distributed.all_sum([flag], self.config.device)[0]
        if flag and self._stop_signal is None:
            self._stop_signal = signal.SIGTERM
        return bool(flag)

    def _checkpoint_on_stop(self) -> str:
        """Checkpoint the current step after a stop request; returns the signal's name."""
        self.save_checkpoint()
        return signal.Signals(self._stop_signal or signal.SIGTERM).name

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str = "val", max_batches: int | None = None) -> dict[str, float]:
        """Metrics over a whole evaluation split (or its first ``max_batches`` batches).

        Streaming tasks are evaluated as streams: the state is carried across windows. Sequence-to-
        sequence tasks report the teacher-forced loss and the task's metrics of decoded predictions.
        """
        max_batches = max_batches if max_batches is not None else self.config.eval_max_batches
        return self.evaluate_bounded(split, max_batches=max_batches)[0]

    @torch.no_grad()
    def evaluate_bounded(
        self,
        split: str = "val",
        *,
        seq_len: int | None = None,
        max_batches: int | None = None,
        max_seconds: float | None = None,
    ) -> tuple[dict[str, float], int]:
        """Metrics over ``split`` at ``seq_len`` (default: the config's), stopping before batch
        ``max_batches`` or after the batch that passes ``max_seconds`` (at least one batch runs).

        Returns the metrics and the number of examples (sequences) they cover.
        """
        was_training = self.model.training
        self.model.eval()
        seq_len = seq_len if seq_len is not None else self.config.seq_len
        if self.seq2seq:
            result = seq2seq.evaluate(self.model, self.task, self.config, split, seq_len, max_batches, max_seconds)
            self.model.train(was_training)
            return result
        totals = empty_totals()
        state, seen, started = None, 0, time.perf_counter()
        for index, batch in enumerate(self.task.eval_batches(split, self.config.eval_batch_size, seq_len)):
            if max_batches is not None and index >= max_batches:
                break
            if index == 0:
                check_target(self.task, batch.x, batch.y)
            batch = batch.to(self.config.device)
            if batch.reset or not self.task.streaming:
                state = None
            output, state = self.model(batch.x, state, batch.lengths, self.config.mode)
            _, counts = loss_and_counts(output, batch, self.task.target)
            for key in totals:
                totals[key] += counts[key]
            seen += batch.x.shape[0]
            if max_seconds is not None and time.perf_counter() - started > max_seconds:
                break
        self.model.train(was_training)
        return summarise(totals, self.task.metrics, self.task.units_per_target(split)), seen

    # ------------------------------------------------------------------ final model
    def save(self, out_dir: str | os.PathLike, metrics: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors``, ``config.json`` (model) and ``train.json`` (run) to ``out_dir``.

        The files are assembled in a staging directory of rnnkit's inside ``out_dir`` and then each
        moved over its final name, so a crash or a full disk leaves every file whole (the previous
        one or the new one) and no temporary file among the user's.

        Raises:
            NonFiniteError: a weight is NaN or infinite; nothing is written, so a sound model already
                in ``out_dir`` stays.
            DiskFullError: the disk filled up; the files already in ``out_dir`` are intact.
        """
        out_dir = Path(out_dir)
        self._check_finite_weights(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        record_final_files(out_dir)  # before they exist: a later run may replace them, never a foreign file
        staging = out_dir / f"{STAGING_PREFIX}{os.getpid()}"
        remove_owned(staging)
        try:
            make_owned_dir(staging)
            self.model.save_pretrained(staging)
            write_json_atomic(staging / "train.json", dict(self._run_description(), metrics=metrics or {}))
            for name in FINAL_FILES:
                os.replace(staging / name, out_dir / name)
            fsync_dir(out_dir)
        except OSError as error:
            if error.errno not in DISK_FULL:
                raise
            where = out_dir / Path(error.filename or "model").name
            raise disk_full(error, where, f"the final model was not written; the files in {out_dir} are as they were") from None
        finally:
            remove_owned(staging)
        return out_dir

    def _check_finite_weights(self, out_dir: Path) -> None:
        """Raise NonFiniteError if a weight is NaN or infinite (the final model is then not written)."""
        for name, tensor in self.model.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise NonFiniteError(
                    f"step {self.step}: the final model has non-finite weights ({name}); it was not written "
                    f"to {out_dir}, so the model there, if any, is kept. Lower the learning rate (--lr) or "
                    "enable clipping (--grad-clip)."
                )

    def _run_description(self) -> dict[str, Any]:
        from rnnkit import __version__

        return {
            "task": task_description(self.task),
            "train": self.config.to_dict(),
            "model": self.model.config.to_dict(),
            "step": self.step,
            "world_size": self.world_size,
            "rnnkit_version": __version__,
            "run": self.run_info,
        }

    # ------------------------------------------------------------------ checkpoint / resume
    def save_checkpoint(self) -> Path | None:
        """Commit a resumable checkpoint of the current step (rank 0 writes; every rank must call).

        Returns:
            The checkpoint directory, or None when the trainer has no ``out_dir`` (or on ranks > 0).
        """
        if self.checkpoints is None:
            return None
        if self._logger is not None:
            # The logs up to this step reach the OS before the checkpoint does: a process killed later
            # loses none of what a resume from this checkpoint keeps (TensorBoard events are buffered).
            self._logger.flush()
        carry = None if self._carry is None else [t.detach().cpu() for t in flatten_state(self._carry)]
        online = None if self.online is None else self.online.checkpoint_state()
        mine = {"rng": rng_states(), "carry": carry, "online": online}
        per_rank = distributed.gather_objects(mine) if self.world_size > 1 else [mine]
        path = None
        if self.rank == 0:
            state = self._trainer_state(per_rank)
            description = self._run_description()
            path = self.checkpoints.save(
                self.step, lambda tmp: write_checkpoint_files(tmp, self.model, self.optimizer, state, description)
            )
        distributed.barrier()
        return path

    def _trainer_state(self, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
        """``trainer_state.pt``: everything but weights and optimizer that the next step depends on."""
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "data": {"next_batch": self.step, "seed": self.config.seed},
            "world_size": self.world_size,
            "ranks": per_rank,
            "history_keys": list(HISTORY_KEYS),
            "history": history_tensor(self.history),
            "evals": [dict(row) for row in self.evals],
            "skipped": self.skipped,
            "consecutive_skips": self.consecutive_skips,
            "tokens": self.tokens,
            "elapsed": self.elapsed,
            "budget_steps": self.budget_steps,
        }

    def resume(self, checkpoint: str | os.PathLike | None = None) -> Path | None:
        """Restore a checkpoint so that :meth:`fit` continues exactly where it stopped.

        Args:
            checkpoint: a checkpoint directory, or a run directory (its latest checkpoint). None: the
                latest under ``out_dir/checkpoints``; if there is none, nothing happens.

        Returns:
            The checkpoint restored, or None.

        Raises:
            InputError: the checkpoint was written by a run with a different configuration (the
                message lists every differing field), a different world size, or is unreadable.
                Nothing is modified in that case.
        """
        if checkpoint is None:
            path = self._latest_sound_checkpoint()
            if path is None:
                return None
        else:
            path = resolve_checkpoint(checkpoint)
            problem = CheckpointManager.verify(path)
            if problem is not None:
                raise InputError(f"checkpoint: expected a readable checkpoint whose files match their checksums at {path}, got {problem}")
        info, state, optimizer_state = read_checkpoint_files(path)
        saved_train = info.get("train", {})
        if self.config.budget_minutes is not None and saved_train.get("budget_minutes") == self.config.budget_minutes:
            # The step count this run fixed from its budget (or its cap, if it was not fixed yet).
            self.config.steps = int(saved_train.get("steps", self.config.steps))
        check_same_run(info, self._run_description(), path)
        check_format(state, self.world_size)
        weights = read_weights(self.model, path)  # checked in full before anything is modified
        mine = state["ranks"][self.rank]
        carry = None
        if mine["carry"] is not None:
            template = self.model.init_state(self.config.batch_size // self.world_size, device=self.config.device)
            carry = unflatten_like(template, iter(mine["carry"]))
        self.optimizer.load_state_dict(optimizer_state)
        self.model.load_state_dict(weights, strict=True)
        self.history = history_records(state["history_keys"], state["history"])
        self.step = int(state["step"])
        self.evals = list(state["evals"]) if "evals" in state else self._logged_evals()
        self.skipped = int(state["skipped"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.tokens = int(state["tokens"])
        self.elapsed = float(state["elapsed"])
        self.budget_steps = state.get("budget_steps")
        self._carry = carry
        if self.online is not None:  # the stream's state and sensitivities, when a stream runs on
            self.online.load_checkpoint_state(mine.get("online"))
        set_rng_states(mine["rng"])
        self._rng_restored = True
        return path

    def _latest_sound_checkpoint(self) -> Path | None:
        """The newest committed checkpoint whose files match their checksums. Newer ones that do not
        are set aside (kept as ``step-<n>.corrupt``), each said on stderr."""
        if self.checkpoints is None:
            return None
        say = (lambda text: print(f"resume: {text}", file=sys.stderr, flush=True)) if self.rank == 0 else (lambda t: None)
        damaged = []
        for _, path in reversed(self.checkpoints.committed()):
            problem = CheckpointManager.verify(path)
            if problem is None:
                if damaged:
                    say(f"falling back to {path}, the newest checkpoint whose files match their checksums")
                return path
            kept = self.checkpoints.quarantine(path) if self.rank == 0 else path
            say(f"checkpoint {path} is damaged ({problem}); not used, kept as {kept.name}")
            damaged.append(path)
        if damaged:
            raise InputError(
                f"resume: expected a checkpoint in {self.checkpoints.root} whose files match their checksums, "
                f"got {len(damaged)} damaged one(s) and no other; start again with --overwrite"
            )
        return None

    def _logged_evals(self) -> list[dict[str, Any]]:
        """The evaluation rows of a checkpoint written before checkpoints held them: those in
        ``eval.csv`` up to the checkpoint's step, except a final evaluation's (at the last step)."""
        path = self.log_dir / "eval.csv" if self.log_dir is not None else None
        if path is None or not path.is_file():
            return []
        with open(path, newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if r.get("step", "").isdigit()]
        keep = lambda s: s < self.step or (s == self.step and s < self.config.steps)  # noqa: E731
        return [{"step": int(r["step"]), "split": r["split"], "metric": r["metric"], "value": float(r["value"])}
                for r in rows if keep(int(r["step"]))]


__all__ = [
    "HISTORY_KEYS", "RESUME_FREE_FIELDS", "TrainConfig", "Trainer", "describe_metrics", "fast_bf16",
    "loss_and_counts", "lr_at", "resolve_precision", "rng_states", "seed_everything", "set_rng_states", "summarise",
]
