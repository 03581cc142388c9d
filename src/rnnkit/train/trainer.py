"""The Trainer: AdamW, warmup + cosine schedule, gradient clipping, truncated BPTT, evaluation,
crash-safe checkpoints with exact resume, a NaN policy, CSV/TensorBoard logs and data parallelism.

Streaming tasks (character language modelling) are trained with truncated backpropagation through
time (Williams & Peng 1990): the recurrent state is carried from one window to the next and
detached at the window boundary, so gradients flow through at most ``seq_len`` steps while the
model still reads the text as one long stream. Gradient norms are clipped (Pascanu, Mikolov &
Bengio 2013, "On the difficulty of training recurrent neural networks").

Exact resume: everything a step depends on is in the checkpoint (weights, optimizer moments, the
step that fixes the learning rate and the data position, every RNG, the carried TBPTT state), and
batches are pure functions of their index, so a run killed at any instant and resumed from its last
checkpoint produces bit-for-bit the weights, optimizer state and loss log of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rnnkit.errors import InputError, NonFiniteError, check_choice, check_positive_int
from rnnkit.layers.base import flatten_state, map_state
from rnnkit.models.io import read_weights, save_model, write_atomic, write_json_atomic
from rnnkit.models.model import SequenceModel
from rnnkit.tasks import IGNORE_INDEX, Batch, Task
from rnnkit.train import distributed
from rnnkit.train.checkpoint import CheckpointManager, remove_temporary_files, resolve_checkpoint
from rnnkit.train.logs import MetricsLogger

PRECISIONS = ("fp32", "bf16")


def fast_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 autocast is a speed-up on ``device``: a CUDA device with bf16 support, or a CPU
    with AMX tiles or AVX512-BF16 (elsewhere oneDNN emulates bf16 and it is slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        hardware = any(probe() for probe in probes if probe is not None)
    except RuntimeError:  # a build without the CPU feature probes
        return False
    # The CPU may have the instructions while oneDNN is told not to use them (ONEDNN_MAX_CPU_ISA).
    return hardware and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``"auto"`` -> ``"bf16"`` where :func:`fast_bf16`, else ``"fp32"``; other values pass through."""
    check_choice("precision", precision, PRECISIONS + ("auto",))
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of one training run (saved with the checkpoint)."""

    steps: int = 1000  # optimizer steps
    batch_size: int = 32  # B (global: split across data-parallel ranks)
    seq_len: int | None = None  # T of a training window; None: the task's default
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup from 0
    weight_decay: float = 0.01  # AdamW decay on matrices only (not biases, norms, embeddings)
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    eval_every: int = 0  # evaluate on val every N steps (0: only at the end)
    eval_batch_size: int = 64
    eval_max_batches: int | None = None  # cap on val batches per evaluation (None: the whole split)
    seed: int = 0  # seeds parameters, data order and dropout
    mode: str = "auto"  # layer mode used for training
    device: str = "cpu"
    precision: str = "fp32"  # "fp32", or "bf16": autocast forward + loss, fp32 weights and optimizer state
    progress: bool = True  # show a progress bar
    log_every: int = 50  # steps between metric log lines when no progress bar is shown
    checkpoint_every: int = 0  # write a resumable checkpoint every N steps (0: only on SIGTERM/SIGINT)
    keep_last: int = 3  # resumable checkpoints kept; older ones go once a newer one is committed (0: all)
    nan_policy: str = "raise"  # non-finite loss/grad norm: "raise" NonFiniteError, or "skip" the step
    max_skips: int = 10  # nan_policy="skip": this many consecutive skipped steps are tolerated, one more raises

    def __post_init__(self) -> None:
        check_positive_int("steps", self.steps)
        check_positive_int("batch_size", self.batch_size)
        if self.seq_len is not None:
            check_positive_int("seq_len", self.seq_len)
        for name in ("lr", "weight_decay", "grad_clip", "min_lr_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or not math.isfinite(value):
                raise InputError(f"{name}: expected a finite number >= 0, got {value!r}")
        if self.lr <= 0:
            raise InputError(f"lr: expected a number > 0, got {self.lr!r}")
        check_positive_int("warmup_steps", self.warmup_steps, minimum=0)
        check_positive_int("eval_every", self.eval_every, minimum=0)
        check_positive_int("eval_batch_size", self.eval_batch_size)
        if self.eval_max_batches is not None:
            check_positive_int("eval_max_batches", self.eval_max_batches)
        check_positive_int("seed", self.seed, minimum=0)
        check_positive_int("log_every", self.log_every)
        check_positive_int("checkpoint_every", self.checkpoint_every, minimum=0)
        check_positive_int("keep_last", self.keep_last, minimum=0)
        check_choice("nan_policy", self.nan_policy, ("raise", "skip"))
        check_choice("precision", self.precision, PRECISIONS)
        check_positive_int("max_skips", self.max_skips, minimum=0)
        for name in ("progress",):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        for name in ("mode", "device"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"{name}: expected a string, got {getattr(self, name)!r}")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise InputError(f"device: expected a torch device such as 'cpu' or 'cuda:0', got {self.device!r}") from None
        betas = self.betas
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise InputError(f"betas: expected two numbers in [0, 1), got {betas!r}")
        self.betas = tuple(betas)  # JSON round trips give lists

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: TrainConfig fields that do not change a run's trajectory: they may differ on resume.
RESUME_FREE_FIELDS = frozenset(
    {"progress", "log_every", "eval_every", "eval_batch_size", "eval_max_batches", "device",
     "checkpoint_every", "keep_last", "nan_policy", "max_skips"}
)
#: Per-step records kept in ``Trainer.history``, the checkpoint and ``train.csv``.
HISTORY_KEYS = ("step", "loss", "lr", "grad_norm", "skipped", "tokens_per_second", "elapsed")
CHECKPOINT_FORMAT = 1


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate at ``step``: linear warmup, then cosine decay to ``lr * min_lr_ratio``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that a run is repeatable."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def summarise(totals: dict[str, float], metrics: tuple[str, ...]) -> dict[str, float]:
    """Turn summed counts into the task's metrics."""
    count = max(totals["count"], 1)
    loss = totals["loss_sum"] / count
    out: dict[str, float] = {"loss": loss}
    if "bpc" in metrics:
        out["bpc"] = loss / math.log(2)
    if "accuracy" in metrics:
        out["accuracy"] = totals["correct"] / count
    if "mse" in metrics:
        out["mse"] = loss
    return out


def _prediction_count(batch: Batch, target: str) -> int:
    """Number of predictions in a batch, as ``loss_and_counts`` counts them."""
    if target == "per_step":
        return int((batch.y != IGNORE_INDEX).sum())
    if target == "classify":
        return int(batch.y.shape[0])
    return int(batch.y.numel())


def rng_states() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` captured."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _unflatten_like(template: Any, leaves: Iterator[torch.Tensor]) -> Any:
    """Rebuild a state with ``template``'s structure from tensors in :func:`flatten_state` order."""
    if isinstance(template, torch.Tensor):
        leaf = next(leaves)
        if leaf.shape != template.shape:
            raise InputError(f"checkpoint: carried state: expected shape {tuple(template.shape)}, got {tuple(leaf.shape)}")
        return leaf.to(device=template.device, dtype=template.dtype)
    parts = [_unflatten_like(part, leaves) for part in template]
    return type(template)(*parts) if hasattr(template, "_fields") else tuple(parts)


def _json_normal(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


def _differences(prefix: str, saved: dict[str, Any], current: dict[str, Any], ignore=frozenset()) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            out.append(f"{prefix}.{key}: checkpoint {a!r}, now {b!r}")
    return out


class Trainer:
    """Trains a :class:`SequenceModel` on a :class:`~rnnkit.tasks.Task`.

    Args:
        model: the model; its head must match the task's target.
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
        self._check_compatible()
        self.rank, self.world_size = distributed.rank_and_world()
        if self.config.batch_size % self.world_size:
            raise InputError(
                f"batch_size: expected a multiple of the world size {self.world_size}, got {self.config.batch_size}"
            )
        self.net: torch.nn.Module = self.model
        if self.world_size > 1:
            device = torch.device(self.config.device)
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device] if device.type == "cuda" else None
            )
        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            # Decay matrices only; embeddings (incl. a tied output matrix) and 1-D params are left alone.
            (decay if param.dim() >= 2 and "embedding" not in name else no_decay).append(param)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.config.lr,
            betas=self.config.betas,
            foreach=True,
        )
        self.step = 0
        self.history: list[dict[str, float]] = []  # one record per optimizer step, keys HISTORY_KEYS
        self.skipped = 0  # steps skipped under nan_policy="skip"
        self.consecutive_skips = 0
        self.tokens = 0  # predictions trained on so far
        self.elapsed = 0.0  # training seconds so far, over all sessions of this run
        self._carry = None  # TBPTT state carried into the next window (detached)
        self._rng_restored = False
        self._stop_signal: int | None = None
        self.checkpoints = None
        if self.out_dir is not None:
            self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", self.config.keep_last)
            if self.rank == 0:
                self.checkpoints.clean()  # leftovers of a killed writer
                remove_temporary_files(self.out_dir)

    def _check_compatible(self) -> None:
        task, cfg = self.task, self.model.config
        wanted_head = {"per_step": "lm", "classify": "classify", "regress": "regress"}[task.target]
        if cfg.head != wanted_head:
            raise InputError(f"model.head: expected {wanted_head!r} for task {task.name!r}, got {cfg.head!r}")
        if task.input_kind == "tokens" and cfg.vocab_size != task.vocab_size:
            raise InputError(f"model.vocab_size: expected {task.vocab_size} for task {task.name!r}, got {cfg.vocab_size}")
        if task.input_kind == "features" and cfg.d_input != task.d_input:
            raise InputError(f"model.d_input: expected {task.d_input} for task {task.name!r}, got {cfg.d_input}")
        expected_out = task.n_classes * task.n_heads if task.target != "regress" else task.d_output
        if cfg.n_outputs != expected_out:
            raise InputError(f"model.n_outputs: expected {expected_out} for task {task.name!r}, got {cfg.n_outputs}")

    # ------------------------------------------------------------------ training
    def fit(self, on_step: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
        """Run until ``config.steps``, evaluate on val, and write the final model.

        SIGTERM or SIGINT (Ctrl-C) stops the run at the next step boundary: a checkpoint is written
        (when ``out_dir`` is set) and the result has ``"interrupted": <signal name>``; no final
        evaluation is done. A second SIGINT interrupts immediately.

        Returns:
            ``{"steps", "seconds", "tokens_per_second", "train_loss", "val", "skipped",
            "interrupted"}`` (``val`` is empty for an interrupted run).
        """
        cfg = self.config
        if not self._rng_restored:
            seed_everything(cfg.seed)
        self.model.train()
        batches = self.task.train_batches(cfg.batch_size, cfg.seq_len, seed=cfg.seed, start=self.step)
        lead = self.rank == 0
        logger = MetricsLogger(self.log_dir, self.history, self.step) if (self.log_dir is not None and lead) else None
        session_start, session_tokens, first_step = time.perf_counter(), 0, self.step
        elapsed_before = self.elapsed
        last_val: dict[str, float] = {}
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and lead), unit="step",
                   dynamic_ncols=True, mininterval=1.0)
        smoothed = self.history[-1]["loss"] if self.history else None
        interrupted = None
        try:
            with self._catch_signals():
                while self.step < cfg.steps:
                    batch = next(batches)
                    record = self._train_step(batch)
                    session_tokens += batch.num_tokens
                    self.tokens += batch.num_tokens
                    session_seconds = time.perf_counter() - session_start
                    self.elapsed = elapsed_before + session_seconds
                    record["tokens_per_second"] = session_tokens / max(session_seconds, 1e-9)
                    record["elapsed"] = self.elapsed
                    self.history.append(record)
                    if logger is not None:
                        logger.log_train(record)
                    if math.isfinite(record["loss"]):
                        smoothed = record["loss"] if smoothed is None else 0.95 * smoothed + 0.05 * record["loss"]
                    postfix = {"loss": f"{smoothed:.3f}" if smoothed is not None else "nan",
                               "tok/s": f"{record['tokens_per_second']:,.0f}"}
                    if self.skipped:
                        postfix["skipped"] = str(self.skipped)
                    if last_val:
                        postfix.update({f"val_{k}": f"{v:.3f}" for k, v in last_val.items() if k != "loss"})
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(1)
                    if lead and not cfg.progress and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                        rate = session_seconds / max(self.step - first_step, 1)
                        print(f"step {self.step}/{cfg.steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                              f"tok/s {record['tokens_per_second']:,.0f} eta {_duration(rate * (cfg.steps - self.step))}",
                              flush=True)
                    if on_step is not None:
                        on_step(self.step, record)
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                        last_val = self.evaluate("val")
                        if logger is not None:
                            logger.log_eval(self.step, "val", last_val)
                        if lead:
                            bar.write(f"step {self.step}: val " + describe_metrics(last_val))
                        self.model.train()
                    if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self._stop_requested():
                        interrupted = signal.Signals(self._stop_signal or signal.SIGTERM).name
                        self.save_checkpoint()
                        break
        except BaseException:
            if logger is not None:
                logger.close()
            raise
        finally:
            bar.close()
        seconds = time.perf_counter() - session_start
        result = {
            "steps": self.step,
            "seconds": seconds,
            "tokens_per_second": session_tokens / max(seconds, 1e-9),
            "train_loss": self.history[-1]["loss"] if self.history else float("nan"),
            "skipped": self.skipped,
            "interrupted": interrupted,
            "val": {},
        }
        if interrupted is None:
            if cfg.checkpoint_every:
                self.save_checkpoint()  # the final state, resumable (e.g. to train further)
            result["val"] = self.evaluate("val")
            if logger is not None:
                logger.log_eval(self.step, "val", result["val"])
            if self.out_dir is not None and lead:
                self.save(self.out_dir, metrics=result)
            distributed.barrier()
        if logger is not None:
            logger.close()
        return result

    def _shard(self, batch: Batch) -> Batch:
        """This rank's rows of a global batch (all rows outside a process group)."""
        if self.world_size == 1:
            return batch
        per = batch.x.shape[0] // self.world_size
        rows = slice(self.rank * per, (self.rank + 1) * per)
        lengths = None if batch.lengths is None else batch.lengths[rows]
        return Batch(batch.x[rows], batch.y[rows], lengths, batch.reset)

    def _train_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on a global batch (or a skipped step under ``nan_policy="skip"``)."""
        cfg = self.config
        local = self._shard(batch).to(cfg.device)
        state = self._carry if (self.task.streaming and not local.reset) else None
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        autocast = torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        with autocast:
            output, state = self.net(local.x, state, local.lengths, cfg.mode)
            if self.world_size == 1:
                loss, _ = loss_and_counts(output, local, self.task.target)
                loss_value = float(loss.detach())
            else:
                # Each rank's sum over the *global* count, times the world size: DDP's gradient average
                # then equals the gradient of the global mean, even when ranks hold different numbers of
                # predictions (ignored targets, ragged sequences).
                total = _prediction_count(batch, self.task.target)
                loss_sum, _ = loss_and_counts(output, local, self.task.target, reduction="sum")
                loss = loss_sum / max(total, 1) * self.world_size
                loss_value = distributed.all_sum([float(loss_sum.detach())], cfg.device)[0] / max(total, 1)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = self._clip()
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

    def _non_finite(self, loss_value: float, grad_norm: float) -> None:
        """Apply ``nan_policy`` to a step whose loss or gradient norm is not finite (before any update)."""
        what = f"non-finite loss ({loss_value}) or gradient norm ({grad_norm})"
        if self.config.nan_policy == "raise":
            error = NonFiniteError(
                f"step {self.step}: {what}; the weights were not updated and no checkpoint was written "
                "after the last good step. Lower the learning rate, enable clipping, or use nan_policy='skip'."
            )
            error.step = self.step
            raise error
        self.skipped += 1
        self.consecutive_skips += 1
        if self.consecutive_skips > self.config.max_skips:
            error = NonFiniteError(
                f"step {self.step}: {what} for {self.consecutive_skips} consecutive steps "
                f"(nan_policy='skip' tolerates max_skips={self.config.max_skips}); the weights were not updated"
            )
            error.step = self.step
            raise error

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.config.grad_clip > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip, foreach=True))
        return float(torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True))

    # ------------------------------------------------------------------ signals
    @contextlib.contextmanager
    def _catch_signals(self):
        """Turn SIGTERM/SIGINT into a stop request honoured at the next step boundary."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self._stop_signal = signum

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

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

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str = "val", max_batches: int | None = None) -> dict[str, float]:
        """Metrics over a whole evaluation split (or its first ``max_batches`` batches).

        Streaming tasks are evaluated as streams: the state is carried across windows.
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
        totals = {"loss_sum": 0.0, "count": 0, "correct": 0}
        state, seen, started = None, 0, time.perf_counter()
        seq_len = seq_len if seq_len is not None else self.config.seq_len
        for index, batch in enumerate(self.task.eval_batches(split, self.config.eval_batch_size, seq_len)):
            if max_batches is not None and index >= max_batches:
                break
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
        return summarise(totals, self.task.metrics), seen

    # ------------------------------------------------------------------ final model
    def save(self, out_dir: str | os.PathLike, metrics: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors``, ``config.json`` (model) and ``train.json`` (run) to ``out_dir``."""
        out_dir = Path(out_dir)
        self.model.save_pretrained(out_dir)
        write_json_atomic(out_dir / "train.json", dict(self._run_description(), metrics=metrics or {}))
        return out_dir

    def _run_description(self) -> dict[str, Any]:
        from rnnkit import __version__

        return {
            "task": {"name": self.task.name, "options": getattr(self.task, "options", {})},
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
        carry = None if self._carry is None else [t.detach().cpu() for t in flatten_state(self._carry)]
        mine = {"rng": rng_states(), "carry": carry}
        per_rank = distributed.gather_objects(mine) if self.world_size > 1 else [mine]
        path = None
        if self.rank == 0:
            path = self.checkpoints.save(self.step, lambda tmp: self._write_checkpoint(tmp, per_rank))
        distributed.barrier()
        return path

    def _write_checkpoint(self, tmp: Path, per_rank: list[dict[str, Any]]) -> None:
        from rnnkit import __version__

        save_model(self.model, {"model": self.model.config.to_dict(), "rnnkit_version": __version__}, tmp)
        write_atomic(tmp / "optimizer.pt", lambda name: torch.save(self.optimizer.state_dict(), name))
        history = torch.tensor([[float(r[k]) for k in HISTORY_KEYS] for r in self.history], dtype=torch.float64)
        trainer_state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "data": {"next_batch": self.step, "seed": self.config.seed},
            "world_size": self.world_size,
            "ranks": per_rank,
            "history_keys": list(HISTORY_KEYS),
            "history": history.reshape(len(self.history), len(HISTORY_KEYS)),
            "skipped": self.skipped,
            "consecutive_skips": self.consecutive_skips,
            "tokens": self.tokens,
            "elapsed": self.elapsed,
        }
        write_atomic(tmp / "trainer_state.pt", lambda name: torch.save(trainer_state, name))
        write_json_atomic(tmp / "train.json", self._run_description())

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
            path = self.checkpoints.latest() if self.checkpoints is not None else None
            if path is None:
                return None
        else:
            path = resolve_checkpoint(checkpoint)
        try:
            info = json.loads((path / "train.json").read_text())
            state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
            optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        except Exception as error:  # any unreadable file (truncated pickle, bad JSON, I/O) is the same user error
            raise InputError(f"checkpoint: expected a readable checkpoint at {path}, got error: {error}") from None
        self._check_same_run(info, path)
        if state.get("format") != CHECKPOINT_FORMAT or state["world_size"] != self.world_size:
            raise InputError(
                f"checkpoint: expected format {CHECKPOINT_FORMAT} written by {self.world_size} process(es), "
                f"got format {state.get('format')} written by {state.get('world_size')}"
            )
        weights = read_weights(self.model, path)  # checked in full before anything is modified
        mine = state["ranks"][self.rank]
        carry = None
        if mine["carry"] is not None:
            local_batch = self.config.batch_size // self.world_size
            template = self.model.init_state(local_batch, device=self.config.device)
            leaves = iter(mine["carry"])
            carry = _unflatten_like(template, leaves)
        self.optimizer.load_state_dict(optimizer_state)
        self.model.load_state_dict(weights, strict=True)
        keys = state["history_keys"]
        self.history = [
            {k: (int(v) if k in ("step", "skipped") else float(v)) for k, v in zip(keys, row)}
            for row in state["history"].tolist()
        ]
        self.step = int(state["step"])
        self.skipped = int(state["skipped"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.tokens = int(state["tokens"])
        self.elapsed = float(state["elapsed"])
        self._carry = carry
        set_rng_states(mine["rng"])
        self._rng_restored = True
        return path

    def _check_same_run(self, info: dict[str, Any], path: Path) -> None:
        current = _json_normal(self._run_description())
        diffs = _differences("train", info.get("train", {}), current["train"], RESUME_FREE_FIELDS)
        diffs += _differences("model", info.get("model", {}), current["model"])
        diffs += _differences("task", info.get("task", {}), current["task"])
        if diffs:
            raise InputError(
                f"resume: expected the configuration of the checkpoint at {path}, got {len(diffs)} differing "
                "field(s):\n  " + "\n  ".join(diffs)
            )


def _duration(seconds: float) -> str:
    """``"1:02:03"`` / ``"02:03"``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def describe_metrics(metrics: dict[str, float]) -> str:
    """``"loss 1.2345, bpc 1.7810"``."""
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


__all__ = [
    "HISTORY_KEYS", "RESUME_FREE_FIELDS", "TrainConfig", "Trainer", "describe_metrics", "loss_and_counts", "lr_at",
    "rng_states", "seed_everything", "set_rng_states", "summarise",
]
