"""Crash-safe checkpoint directories: atomic commit, a completion marker, rotation, stray-file cleanup.

Layout under a run's ``checkpoints/`` folder::

    checkpoints/
      step-00000200/        # committed: has the COMPLETE marker
        model.safetensors   # weights (safetensors)
        config.json         # model config + rnnkit version (loadable by SequenceModel.from_pretrained)
        optimizer.pt        # optimizer state_dict
        trainer_state.pt    # step, RNG states, data position, TBPTT state, per-step history
        train.json          # task, train config, model config, rnnkit version, world size
        COMPLETE
      .tmp-step-00000300-4711/   # a write in progress (or killed): never read, removed at start

A checkpoint is written into a temporary directory next to its final place, every file fsynced, the
marker written last, then the directory is renamed into place with ``os.replace`` (atomic on POSIX)
and the parent directory fsynced. Only then are older checkpoints rotated out, so a crash at any
instant leaves the previous checkpoint intact: a directory counts only if its marker exists.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable

from rnnkit.atomic import fsync_dir
from rnnkit.errors import InputError, check_positive_int

MARKER = "COMPLETE"
_NAME = re.compile(r"^step-(\d{8,})$")


def is_temporary(name: str) -> bool:
    """Names of in-progress writes: ``.tmp-step-*`` directories and ``write_atomic``'s ``.<name>.*.tmp``."""
    return name.startswith(".tmp") or (name.startswith(".") and name.endswith(".tmp"))


def remove_temporary_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed :func:`~rnnkit.atomic.write_atomic` left in ``directory``."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.is_file() and is_temporary(entry.name):
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


class CheckpointManager:
    """Writes, finds and rotates the checkpoints of one run.

    Args:
        root: the ``checkpoints/`` directory (created on first save).
        keep_last: committed checkpoints to keep (0 keeps all).

    Example:
        >>> manager = CheckpointManager("runs/x/checkpoints", keep_last=3)
        >>> manager.save(200, lambda tmp: (tmp / "weights.bin").write_bytes(b"..."))
        >>> manager.latest()
        PosixPath('runs/x/checkpoints/step-00000200')
    """

    def __init__(self, root: str | os.PathLike, keep_last: int = 3) -> None:
        check_positive_int("keep_last", keep_last, minimum=0)
        self.root = Path(root)
        self.keep_last = keep_last

    @staticmethod
    def is_complete(path: str | os.PathLike) -> bool:
        """True when ``path`` is a committed checkpoint (its marker exists)."""
        return (Path(path) / MARKER).is_file()

    def committed(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every committed checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _NAME.match(entry.name)
            if match and entry.is_dir() and self.is_complete(entry):
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def latest(self) -> Path | None:
        """The committed checkpoint with the highest step, or None."""
        found = self.committed()
        return found[-1][1] if found else None

    def clean(self) -> list[Path]:
        """Remove what a killed writer left behind: temporary entries and directories without a marker.

        Call it once at start, before any writer of this run is active. Returns the removed paths.
        """
        removed = []
        if not self.root.is_dir():
            return removed
        for entry in self.root.iterdir():
            stray = is_temporary(entry.name) or (_NAME.match(entry.name) and not self.is_complete(entry))
            if stray:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
        return removed

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Commit a checkpoint for ``step``: ``write(tmp_dir)`` fills a temporary directory.

        ``write`` must fsync what it writes (:func:`rnnkit.atomic.write_atomic` does). The
        directory becomes ``step-<step>`` atomically; older checkpoints beyond ``keep_last`` are
        deleted only after that.
        """
        check_positive_int("step", step, minimum=0)
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step:08d}"
        if self.is_complete(final):
            return final  # already committed (e.g. a signal arrived right after a periodic save)
        tmp = self.root / f".tmp-step-{step:08d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            write(tmp)
            with open(tmp / MARKER, "w") as handle:
                handle.write(f"step {step}\n")
                handle.flush()
                os.fsync(handle.fileno())
            fsync_dir(tmp)
            if final.exists():  # an uncommitted leftover under the final name
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self._rotate()
        return final

    def _rotate(self) -> None:
        if self.keep_last == 0:
            return
        found = self.committed()
        for _, path in found[: max(0, len(found) - self.keep_last)]:
            # Un-commit first (remove the marker) so a crash mid-delete leaves a stray, not a torn checkpoint.
            (path / MARKER).unlink(missing_ok=True)
            fsync_dir(path)
            shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a committed checkpoint, else the latest one inside it (a run or
    ``checkpoints/`` directory); InputError if neither."""
    path = Path(path)
    if CheckpointManager.is_complete(path):
        return path
    for root in (path / "checkpoints", path):
        latest = CheckpointManager(root).latest()
        if latest is not None:
            return latest
    raise InputError(f"checkpoint: expected a committed checkpoint (a directory with {MARKER}) at or in {path}, got none")
