"""What a training session shows and measures: the progress bar or log lines, and its throughput."""

from __future__ import annotations

import math
import time
from typing import Any

from tqdm.auto import tqdm

from rnnkit.train.config import TrainConfig
from rnnkit.train.metrics import describe_metrics


class SessionClock:
    """Seconds and tokens of this session, and the run's total training seconds over all sessions."""

    def __init__(self, elapsed_before: float) -> None:
        self.started = time.perf_counter()
        self.elapsed_before = elapsed_before
        self.tokens = 0

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def add_tokens(self, tokens: int) -> None:
        self.tokens += tokens

    def tokens_per_second(self, seconds: float | None = None) -> float:
        seconds = self.seconds if seconds is None else seconds
        return self.tokens / max(seconds, 1e-9)


class ProgressReport:
    """The progress bar (``config.progress``) or, without it, a log line every ``config.log_every`` steps.

    Args:
        config: the run's configuration.
        step: the step this session starts from.
        last_loss: the loss of the last step before this session (None for a fresh run).
        enabled: False on ranks > 0, which show nothing.
        unit: the throughput's unit (:func:`throughput_unit`).
    """

    def __init__(self, config: TrainConfig, step: int, last_loss: float | None, enabled: bool,
                 unit: str = "tok/s") -> None:
        self.config = config
        self.unit = unit
        self.enabled = enabled
        self.first_step = step
        self.smoothed = last_loss
        self.last_val: dict[str, float] = {}
        self.bar = tqdm(total=config.steps, initial=step, disable=not (config.progress and enabled), unit="step",
                        dynamic_ncols=True, mininterval=1.0)

    def step(self, record: dict[str, float], skipped_total: int, session_seconds: float) -> None:
        """Show one finished step (``record`` as in ``Trainer.history``)."""
        if math.isfinite(record["loss"]):
            self.smoothed = record["loss"] if self.smoothed is None else 0.95 * self.smoothed + 0.05 * record["loss"]
        postfix = {"loss": f"{self.smoothed:.3f}" if self.smoothed is not None else "nan",
                   self.unit: f"{record['tokens_per_second']:,.0f}"}
        if skipped_total:
            postfix["skipped"] = str(skipped_total)
        if self.last_val:
            postfix.update({f"val_{k}": f"{v:.3f}" for k, v in self.last_val.items() if k != "loss"})
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)
        cfg, step = self.config, int(record["step"])
        if self.enabled and not cfg.progress and (step % cfg.log_every == 0 or step == cfg.steps):
            rate = session_seconds / max(step - self.first_step, 1)
            print(f"step {step}/{cfg.steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                  f"{self.unit} {record['tokens_per_second']:,.0f} eta {duration(rate * (cfg.steps - step))}", flush=True)

    def set_total(self, steps: int) -> None:
        """The run's step count changed (fixed from a time budget)."""
        self.bar.total = steps
        self.bar.refresh()

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        """Show an evaluation during training."""
        self.last_val = metrics
        if self.enabled:
            self.bar.write(f"step {step}: val " + describe_metrics(metrics))

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "ProgressReport":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def throughput_unit(task: Any) -> str:
    """What a run's throughput counts: ``"tok/s"`` (predicted steps) for per-step targets,
    ``"seq/s"`` for one prediction per sequence (classification, regression)."""
    return "seq/s" if getattr(task, "target", "per_step") in ("classify", "regress") else "tok/s"


def duration(seconds: float) -> str:
    """``"1:02:03"`` / ``"02:03"``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


__all__ = ["ProgressReport", "SessionClock", "duration", "throughput_unit"]
