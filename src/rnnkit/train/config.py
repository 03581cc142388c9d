"""The configuration of a training run (:class:`TrainConfig`), validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from rnnkit.errors import InputError, check_choice, check_positive_int, check_seed
from rnnkit.models.losses import SCHEDULES, teacher_forcing_probability
from rnnkit.train.online import ONLINE_METHODS
from rnnkit.train.precision import PRECISIONS


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
    max_seconds: float | None = None  # time budget: training ends after the step that passes it (None: no cap)
    # Time budget that fixes the run's length: after a few measured steps, ``steps`` becomes the number
    # that fits in these minutes (at most the given ``steps``) and is recorded, so a resume is exact.
    budget_minutes: float | None = None
    patience: int = 0  # stop after this many evaluations without a lower val loss (0: never; needs eval_every)
    keep_best: bool = False  # keep the model of the lowest val loss in <out_dir>/best (needs eval_every)
    # Online learning (rnnkit.train.online_training): gradients carried forward in time instead of BPTT.
    online: str | None = None  # None (backpropagation), "rtrl" (exact, element-wise layers) or "uoro" (any causal model)
    online_every: int = 1  # online: update the weights every this many time steps (and at the end of each batch)
    # Sequence-to-sequence tasks only (rnnkit.train.seq2seq):
    label_smoothing: float = 0.0  # training loss: (1 - eps) NLL + eps * mean over classes of -log p
    # Scheduled sampling (Bengio et al. 2015): the probability of feeding the true previous token
    # falls with the step by this schedule of rnnkit.models.teacher_forcing_probability ("none": always 1).
    scheduled_sampling: str = "none"  # "none", "linear", "exponential" or "inverse_sigmoid"
    sampling_k: float | None = None  # the schedule's k (None: its default)
    sampling_slope: float = 1e-4  # the linear schedule's decrease per step
    sampling_min: float = 0.0  # the teacher-forcing probability never falls below this
    eval_beam: int = 1  # evaluation decodes with beams of this width (1: greedy decoding)

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
        check_seed("seed", self.seed)
        check_positive_int("log_every", self.log_every)
        check_positive_int("checkpoint_every", self.checkpoint_every, minimum=0)
        check_positive_int("keep_last", self.keep_last, minimum=0)
        check_choice("nan_policy", self.nan_policy, ("raise", "skip"))
        check_choice("precision", self.precision, PRECISIONS)
        check_positive_int("max_skips", self.max_skips, minimum=0)
        if self.max_seconds is not None and (
            isinstance(self.max_seconds, bool) or not isinstance(self.max_seconds, (int, float)) or not self.max_seconds >= 0
        ):
            raise InputError(f"max_seconds: expected a number >= 0 or None, got {self.max_seconds!r}")
        if self.budget_minutes is not None and (
            isinstance(self.budget_minutes, bool) or not isinstance(self.budget_minutes, (int, float))
            or not (self.budget_minutes > 0 and math.isfinite(self.budget_minutes))
        ):
            raise InputError(f"budget_minutes: expected a number > 0 or None, got {self.budget_minutes!r}")
        check_positive_int("patience", self.patience, minimum=0)
        if (self.patience or self.keep_best is True) and not self.eval_every:
            which = "patience" if self.patience else "keep_best"
            raise InputError(f"{which}: expected evaluations during training (eval_every > 0), got eval_every=0")
        self._check_seq2seq_fields()
        self._check_online_fields()
        for name in ("progress", "keep_best"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        for name in ("mode", "device"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"{name}: expected a string, got {getattr(self, name)!r}")
        check_device("device", self.device)
        betas = self.betas
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise InputError(f"betas: expected two numbers in [0, 1), got {betas!r}")
        self.betas = tuple(betas)  # JSON round trips give lists

    def _check_online_fields(self) -> None:
        check_choice("online", self.online, (None, *ONLINE_METHODS))
        check_positive_int("online_every", self.online_every)
        if self.online is not None and self.precision != "fp32":
            raise InputError(f"precision: expected 'fp32' with online={self.online!r} (its Jacobians run in the "
                             f"parameters' dtype), got {self.precision!r}")

    def _check_seq2seq_fields(self) -> None:
        smoothing = self.label_smoothing
        if not isinstance(smoothing, (int, float)) or isinstance(smoothing, bool) or not 0 <= smoothing < 1:
            raise InputError(f"label_smoothing: expected a number in [0, 1), got {smoothing!r}")
        check_choice("scheduled_sampling", self.scheduled_sampling, ("none", *SCHEDULES))
        check_positive_int("eval_beam", self.eval_beam)
        if self.scheduled_sampling != "none":
            try:
                teacher_forcing_probability(0, self.scheduled_sampling, self.sampling_k, self.sampling_slope,
                                            self.sampling_min)
            except InputError as error:  # name the config's fields, not the function's arguments
                field = {"k": "sampling_k", "slope": "sampling_slope", "minimum": "sampling_min"}
                name, _, rest = str(error).partition(":")
                raise InputError(f"{field.get(name, name)}:{rest}") from None

    @property
    def teacher_forcing_schedule(self) -> dict[str, Any] | None:
        """The arguments of ``teacher_forcing_probability`` after ``step`` (None without scheduled sampling)."""
        if self.scheduled_sampling == "none":
            return None
        return {"schedule": self.scheduled_sampling, "k": self.sampling_k, "slope": self.sampling_slope,
                "minimum": self.sampling_min}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def device_available(device: str) -> bool:
    """True when this torch build and machine have ``device`` (``cpu``, ``cuda[:i]``, ``mps``)."""
    kind = torch.device(device)
    if kind.type == "cuda":
        return torch.cuda.is_available() and (kind.index is None or kind.index < torch.cuda.device_count())
    if kind.type == "mps":
        return torch.backends.mps.is_available()
    return True


def check_device(name: str, device: object) -> None:
    """Raise InputError unless ``device`` names a torch device this machine has."""
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"{name}: expected a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
    if not device_available(device):
        raise InputError(
            f"{name}: expected a device this machine has, got {device!r} (torch {torch.__version__} sees "
            f"{torch.cuda.device_count()} CUDA device(s){'' if torch.cuda.is_available() else '; a CPU-only build or no GPU'})"
        )


#: TrainConfig fields that do not change a run's trajectory: they may differ on resume.
RESUME_FREE_FIELDS = frozenset(
    {"progress", "log_every", "eval_every", "eval_batch_size", "eval_max_batches", "device",
     "checkpoint_every", "keep_last", "nan_policy", "max_skips", "max_seconds", "keep_best", "eval_beam"}
)

__all__ = ["RESUME_FREE_FIELDS", "TrainConfig", "check_device", "device_available"]
