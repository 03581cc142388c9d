"""Training metrics to CSV files and, when ``tensorboardX`` is installed, TensorBoard event files (``--log-dir``).

``train.csv`` has one row per optimizer step (``step, loss, lr, grad_norm, skipped, tokens_per_second,
elapsed``), ``eval.csv`` one row per evaluation (``step, split, metric, value``); TensorBoard shows
``train/*`` and ``<split>/*`` scalars. Floats are written with ``repr`` so the CSV round-trips the
exact values. On resume both CSV files are rewritten from the checkpoint (its per-step history and
its evaluations), and TensorBoard is told to forget the steps from the checkpoint's on (a session-start
event at that step), whose scalars are written again from the checkpoint, so the logs of a resumed run
equal those of an uninterrupted one.

CSV needs nothing beyond the standard library; TensorBoard files come from ``tensorboardX`` (the
``tensorboard`` extra), a maintained writer of the format that needs neither TensorFlow nor the
TensorBoard server.
"""

from __future__ import annotations

import csv
import io
import os
import time
from pathlib import Path
from typing import Any

from rnnkit.atomic import write_text_atomic
from rnnkit.errors import InputError

TRAIN_FIELDS = ("step", "loss", "lr", "grad_norm", "skipped", "tokens_per_second", "elapsed")
EVAL_FIELDS = ("step", "split", "metric", "value")


def _csv_text(fields: tuple[str, ...], rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row[k]) for k in fields})
    return buffer.getvalue()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


def tensorboard_available() -> bool:
    """True when ``tensorboardX`` can be imported (TensorBoard files are then written next to the CSV)."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


class TensorBoardWriter:
    """Scalars to one TensorBoard event file under ``log_dir``, through ``tensorboardX``.

    The file is written synchronously (``tensorboardX``'s ``EventsWriter``, not its ``SummaryWriter``,
    whose queue a killed process would lose): :meth:`flush` puts every scalar logged so far on disk,
    which a checkpoint relies on.

    Args:
        log_dir: the directory.
        session_step: TensorBoard discards the events of earlier files at steps >= this one (a resumed
            run redoes them).
    """

    def __init__(self, log_dir: Path, session_step: int) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.summary import scalar

        self._event, self._scalar = Event, scalar
        # The library names files by the second; the nanosecond suffix keeps two sessions started in
        # the same second apart and the names in order of creation.
        self._writer = EventsWriter(str(log_dir / "events"), f".{time.time_ns():020d}")
        self.path = Path(self._writer._file_name)
        self._writer.write_event(Event(wall_time=time.time(), step=session_step,
                                       session_log=SessionLog(status=SessionLog.START)))

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self._writer.write_event(self._event(wall_time=time.time(), step=step, summary=self._scalar(tag, float(value))))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsLogger:
    """Writes ``train.csv``, ``eval.csv`` and TensorBoard events under ``log_dir``.

    Args:
        log_dir: the directory (created).
        history: the per-step records already done (a resumed run), rewritten to ``train.csv``.
        resume_step: the step the run resumes from (0 for a fresh run).
        evals: the evaluation rows already done (keys ``EVAL_FIELDS``), rewritten to ``eval.csv``.
        tensorboard: ``"auto"`` writes TensorBoard files when ``tensorboardX`` is installed, ``True``
            requires it, ``False`` writes CSV only.
    """

    def __init__(self, log_dir: str | os.PathLike, history: list[dict[str, float]], resume_step: int,
                 evals: list[dict[str, Any]] = (), tensorboard: bool | str = "auto") -> None:
        if tensorboard is True and not tensorboard_available():
            raise InputError("tensorboard: expected the tensorboardX package (pip install 'rnnkit[tensorboard]'), "
                             "got no such module")
        if tensorboard not in (True, False, "auto"):
            raise InputError(f"tensorboard: expected True, False or 'auto', got {tensorboard!r}")
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        train_path, eval_path = self.log_dir / "train.csv", self.log_dir / "eval.csv"
        write_text_atomic(train_path, _csv_text(TRAIN_FIELDS, history))
        write_text_atomic(eval_path, _csv_text(EVAL_FIELDS, list(evals)))
        self._train = open(train_path, "a", newline="")
        self._eval = open(eval_path, "a", newline="")
        self._train_csv = csv.DictWriter(self._train, fieldnames=TRAIN_FIELDS, lineterminator="\n", extrasaction="ignore")
        self._eval_csv = csv.DictWriter(self._eval, fieldnames=EVAL_FIELDS, lineterminator="\n")
        self.events = None
        if tensorboard is True or (tensorboard == "auto" and tensorboard_available()):
            # TensorBoard forgets the steps this session redoes (those of a killed or finished
            # earlier session), from the checkpoint's own step on, whose scalars are written again
            # from the checkpoint: an earlier session may have logged a final evaluation at that step.
            self.events = TensorBoardWriter(self.log_dir, max(resume_step, 1))
        if resume_step > 0 and self.events is not None:
            for record in history[-1:]:
                self.events.add_scalars(resume_step, self._train_scalars(record))
            again: dict[str, dict[str, float]] = {}
            for row in evals:
                if int(row["step"]) == resume_step:
                    again.setdefault(row["split"], {})[row["metric"]] = float(row["value"])
            for split, metrics in again.items():
                self.events.add_scalars(resume_step, {f"{split}/{k}": v for k, v in metrics.items()})

    def log_train(self, record: dict[str, float]) -> None:
        """One step's record (keys of ``TRAIN_FIELDS``)."""
        self._train_csv.writerow({k: _fmt(record[k]) for k in TRAIN_FIELDS})
        self._train.flush()
        if self.events is not None:
            self.events.add_scalars(int(record["step"]), self._train_scalars(record))

    @staticmethod
    def _train_scalars(record: dict[str, float]) -> dict[str, float]:
        return {f"train/{k}": float(record[k]) for k in ("loss", "lr", "grad_norm", "tokens_per_second")}

    def log_eval(self, step: int, split: str, metrics: dict[str, float]) -> None:
        """An evaluation's metrics at ``step``."""
        for name, value in metrics.items():
            self._eval_csv.writerow({"step": step, "split": split, "metric": name, "value": _fmt(float(value))})
        self._eval.flush()
        if self.events is not None:
            self.events.add_scalars(step, {f"{split}/{k}": float(v) for k, v in metrics.items()})
            self.events.flush()

    def flush(self) -> None:
        self._train.flush()
        self._eval.flush()
        if self.events is not None:
            self.events.flush()

    def close(self) -> None:
        for handle in (self._train, self._eval):
            if not handle.closed:
                handle.close()
        if self.events is not None:
            self.events.close()
