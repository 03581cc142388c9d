"""Length curriculum: train one model on growing sequence lengths, one Trainer per stage.

Some long-range problems have a plateau that grows with ``T``. On the adding problem, a model whose
recurrence is linear in its input (LRU, S4D) has to learn to silence every unmarked step before
the two marked ones can stand out of the sum over the sequence. At ``T = 20`` it finds that within
a few hundred steps; at ``T = 100`` it can stay at the mean-prediction baseline for the whole run
(``tests/train/test_long_adding.py`` exercises it). What it learns at a short
length carries over to a longer one, which is the oldest remedy for this plateau (Elman 1993,
"Learning and development in neural networks: the importance of starting small").
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Sequence

from rnnkit.errors import InputError, check_positive_int
from rnnkit.models import SequenceModel
from rnnkit.tasks import Task
from rnnkit.train.config import TrainConfig
from rnnkit.train.trainer import Trainer


@dataclass(frozen=True)
class Stage:
    """One stage of a length curriculum: ``steps`` optimizer steps on windows of ``seq_len``."""

    seq_len: int
    steps: int
    lr: float | None = None  # peak learning rate of this stage (None: the base config's)

    def __post_init__(self) -> None:
        check_positive_int("seq_len", self.seq_len)
        check_positive_int("steps", self.steps)
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or self.lr <= 0):
            raise InputError(f"lr: expected a number > 0 or None, got {self.lr!r}")


def fit_length_curriculum(
    model: SequenceModel,
    task: Task,
    stages: Sequence[Stage | tuple],
    config: TrainConfig | None = None,
    out_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` through ``stages`` in order; each stage is a fresh :class:`Trainer` run.

    Every stage starts a new optimizer and learning-rate schedule (warmup ``min(config.warmup_steps,
    steps // 5)``, then cosine); the weights carry over. Every stage uses ``config.seed``: the task
    draws sequences of the stage's own length, so the data differ between stages anyway.
    Evaluation at the end of a stage uses that stage's length.

    Args:
        model: the model to train (changed in place).
        task: a task whose batches accept any ``seq_len`` of the stages.
        stages: :class:`Stage` or ``(seq_len, steps)`` / ``(seq_len, steps, lr)`` tuples.
        config: the base configuration; ``seq_len``, ``steps``, ``lr`` and ``warmup_steps`` are set
            per stage. Defaults to ``TrainConfig()``.
        out_dir: when given, stage ``i`` writes under ``out_dir/stage{i}-T{seq_len}``.

    Returns:
        One :meth:`Trainer.fit` result per completed stage, each with ``"seq_len"`` added. A stage
        interrupted by SIGTERM/SIGINT ends the curriculum there (its result is the last one).

    Example:
        >>> results = fit_length_curriculum(model, build_task("adding"), [(20, 600), (100, 400), (1000, 400, 5e-4)])
        >>> results[-1]["val"]["mse"]
    """
    if not isinstance(stages, Sequence) or isinstance(stages, (str, bytes)) or not stages:
        raise InputError(f"stages: expected a non-empty sequence of Stage or (seq_len, steps[, lr]), got {stages!r}")
    parsed = []
    for i, stage in enumerate(stages):
        if isinstance(stage, Stage):
            parsed.append(stage)
        elif isinstance(stage, tuple) and len(stage) in (2, 3):
            parsed.append(Stage(*stage))
        else:
            raise InputError(f"stages[{i}]: expected a Stage or (seq_len, steps[, lr]), got {stage!r}")
    base = config if config is not None else TrainConfig()
    results = []
    for i, stage in enumerate(parsed):
        stage_config = dataclasses.replace(
            base, seq_len=stage.seq_len, steps=stage.steps, lr=stage.lr if stage.lr is not None else base.lr,
            warmup_steps=min(base.warmup_steps, stage.steps // 5),
        )
        stage_dir = None if out_dir is None else os.path.join(os.fspath(out_dir), f"stage{i}-T{stage.seq_len}")
        result = Trainer(model, task, stage_config, out_dir=stage_dir).fit()
        results.append({**result, "seq_len": stage.seq_len})
        if result.get("interrupted"):
            break
    return results
