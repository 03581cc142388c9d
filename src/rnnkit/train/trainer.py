"""The Trainer: AdamW, warmup + cosine schedule, gradient clipping, truncated BPTT, evaluation, checkpoints.

Streaming tasks (character language modelling) are trained with truncated backpropagation through
time (Williams & Peng 1990): the recurrent state is carried from one window to the next and
detached at the window boundary, so gradients flow through at most ``seq_len`` steps while the
model still reads the text as one long stream. Gradient norms are clipped (Pascanu, Mikolov &
Bengio 2013, "On the difficulty of training recurrent neural networks").
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rnnkit.errors import InputError, NonFiniteError, check_choice, check_positive_int
from rnnkit.layers.base import map_state
from rnnkit.models.io import write_json_atomic
from rnnkit.models.model import SequenceModel
from rnnkit.tasks import IGNORE_INDEX, Batch, Task

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
        return any(probe() for probe in probes if probe is not None)
    except RuntimeError:  # a build without the CPU feature probes
        return False


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
    batch_size: int = 32  # B
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
        check_choice("precision", self.precision, PRECISIONS)
        self.betas = tuple(self.betas)  # JSON round trips give lists

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def loss_and_counts(output: torch.Tensor, batch: Batch, target: str) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean loss of a batch and the sums needed for exact metrics over many batches.

    Returns:
        The mean loss (a scalar tensor with grad) and ``{"loss_sum", "count", "correct"}`` where
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
    mean = loss_sum / max(count, 1)
    return mean, {"loss_sum": float(loss_sum.detach()), "count": count, "correct": correct}


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


class Trainer:
    """Trains a :class:`SequenceModel` on a :class:`~rnnkit.tasks.Task`.

    Args:
        model: the model; its head must match the task's target.
        task: the task supplying batches.
        config: optimisation settings.
        out_dir: where :meth:`fit` writes the final checkpoint (None: no checkpoint).
        run_info: extra JSON-serialisable metadata stored in the checkpoint (e.g. the CLI command).

    Example:
        >>> task = build_task("adding")
        >>> model = SequenceModel(d_input=2, head="regress", n_outputs=1, layer="lstm", d_model=64)
        >>> metrics = Trainer(model, task, TrainConfig(steps=2000, lr=3e-3)).fit()
        >>> metrics["val"]["mse"]
    """

    def __init__(
        self,
        model: SequenceModel,
        task: Task,
        config: TrainConfig | None = None,
        out_dir: str | os.PathLike | None = None,
        run_info: dict[str, Any] | None = None,
    ) -> None:
        self.config = config or TrainConfig()
        self.task = task
        self.model = model.to(self.config.device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.run_info = dict(run_info or {})
        self._check_compatible()
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
        self.history: list[dict[str, float]] = []  # one entry per optimizer step: step, loss, lr, grad_norm

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
        """Run the configured number of steps, evaluate on val, and write the checkpoint.

        Returns:
            ``{"train": last-window metrics, "val": validation metrics, "steps": ..., "seconds": ...,
            "tokens_per_second": ...}``.
        """
        cfg = self.config
        seed_everything(cfg.seed)
        self.model.train()
        batches = self.task.train_batches(cfg.batch_size, cfg.seq_len, seed=cfg.seed, start=self.step)
        state = None
        start_time = time.perf_counter()
        tokens = 0
        last_val: dict[str, float] = {}
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, unit="step",
                   dynamic_ncols=True, mininterval=1.0)
        smoothed = None
        autocast = cfg.precision == "bf16"
        try:
            while self.step < cfg.steps:
                batch = next(batches).to(cfg.device)
                if self.task.streaming and not batch.reset and state is not None:
                    state = map_state(torch.Tensor.detach, state)  # truncated BPTT: keep values, cut gradients
                else:
                    state = None
                lr = lr_at(self.step, cfg)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                with torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=autocast):
                    output, state = self.model(batch.x, state, batch.lengths, cfg.mode)
                    loss, _ = loss_and_counts(output, batch, self.task.target)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = self._clip()
                loss_value = float(loss.detach())
                if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                    raise NonFiniteError(
                        f"step {self.step}: non-finite loss ({loss_value}) or gradient norm ({grad_norm}); "
                        "the weights were not updated. Lower the learning rate or enable clipping."
                    )
                self.optimizer.step()
                if not self.task.streaming:
                    state = None
                self.step += 1
                tokens += batch.num_tokens
                record = {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm}
                self.history.append(record)
                smoothed = loss_value if smoothed is None else 0.95 * smoothed + 0.05 * loss_value
                elapsed = time.perf_counter() - start_time
                postfix = {"loss": f"{smoothed:.3f}", "tok/s": f"{tokens / max(elapsed, 1e-9):,.0f}"}
                if last_val:
                    postfix.update({f"val_{k}": f"{v:.3f}" for k, v in last_val.items() if k != "loss"})
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                if not cfg.progress and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    print(f"step {self.step}/{cfg.steps} loss {smoothed:.4f} lr {lr:.2e} "
                          f"tok/s {tokens / max(elapsed, 1e-9):,.0f}", flush=True)
                if on_step is not None:
                    on_step(self.step, record)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    last_val = self.evaluate("val")
                    bar.write(f"step {self.step}: val " + ", ".join(f"{k} {v:.4f}" for k, v in last_val.items()))
                    self.model.train()
        finally:
            bar.close()
        seconds = time.perf_counter() - start_time
        val = self.evaluate("val")
        result = {
            "steps": self.step,
            "seconds": seconds,
            "tokens_per_second": tokens / max(seconds, 1e-9),
            "train_loss": self.history[-1]["loss"] if self.history else float("nan"),
            "val": val,
        }
        if self.out_dir is not None:
            self.save(self.out_dir, metrics=result)
        return result

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.config.grad_clip > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip, foreach=True))
        return float(torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str = "val", max_batches: int | None = None) -> dict[str, float]:
        """Metrics over a whole evaluation split (or its first ``max_batches`` batches).

        Streaming tasks are evaluated as streams: the state is carried across windows.
        """
        was_training = self.model.training
        self.model.eval()
        max_batches = max_batches if max_batches is not None else self.config.eval_max_batches
        totals = {"loss_sum": 0.0, "count": 0, "correct": 0}
        state = None
        for index, batch in enumerate(self.task.eval_batches(split, self.config.eval_batch_size, self.config.seq_len)):
            if max_batches is not None and index >= max_batches:
                break
            batch = batch.to(self.config.device)
            if batch.reset or not self.task.streaming:
                state = None
            output, state = self.model(batch.x, state, batch.lengths, self.config.mode)
            _, counts = loss_and_counts(output, batch, self.task.target)
            for key in totals:
                totals[key] += counts[key]
        self.model.train(was_training)
        return summarise(totals, self.task.metrics)

    # ------------------------------------------------------------------ checkpoint
    def save(self, out_dir: str | os.PathLike, metrics: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors``, ``config.json`` (model) and ``train.json`` (run) to ``out_dir``."""
        out_dir = Path(out_dir)
        self.model.save_pretrained(out_dir)
        train_info = {
            "task": {"name": self.task.name, "options": getattr(self.task, "options", {})},
            "train": self.config.to_dict(),
            "step": self.step,
            "metrics": metrics or {},
            "run": self.run_info,
        }
        write_json_atomic(out_dir / "train.json", train_info)
        return out_dir


def describe_metrics(metrics: dict[str, float]) -> str:
    """``"loss 1.2345, bpc 1.7810"``."""
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


__all__ = ["TrainConfig", "Trainer", "describe_metrics", "loss_and_counts", "lr_at", "seed_everything", "summarise"]
