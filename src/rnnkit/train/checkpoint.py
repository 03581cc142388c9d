"""Crash-safe checkpoint directories: atomic commit, a checksummed manifest, rotation, and cleanup of
what a killed writer left (only what rnnkit provably wrote).

Layout under a run's ``checkpoints/`` folder::

    checkpoints/
      step-00000200/        # committed: has the COMPLETE manifest
        .rnnkit-owned       # written first: this directory is rnnkit's to delete
        model.safetensors   # weights (safetensors)
        config.json         # model config + rnnkit version (loadable by SequenceModel.from_pretrained)
        optimizer.pt        # optimizer state_dict
        trainer_state.pt    # step, RNG states, data position, TBPTT state, per-step and eval history
        train.json          # task, train config, model config, rnnkit version, world size
        COMPLETE            # JSON: the step and the sha256 of every file above
      .tmp-step-00000300-4711/   # a write in progress (or killed): never read, removed at start

A checkpoint is written into a temporary directory next to its final place, every file fsynced, the
manifest written last, then the directory is renamed into place with ``os.replace`` (atomic on
POSIX) and the parent directory fsynced. Only then are older checkpoints rotated out, so a crash at
any instant leaves the previous checkpoint intact: a directory counts only if its manifest exists.
Loading verifies the checksums (:meth:`CheckpointManager.verify`), so a checkpoint damaged after it
was written (a flipped bit, a truncated copy) is detected instead of resumed from. Checkpoints
written before the manifest held checksums (``COMPLETE`` reading ``step N``) load unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from rnnkit.atomic import disk_full, fsync_dir, DISK_FULL
from rnnkit.errors import DiskFullError, InputError, check_positive_int
from rnnkit.train.rundir import OWNER_MARKER, is_owned, make_owned_dir, remove_owned

MARKER = "COMPLETE"
MANIFEST_FORMAT = 1
TMP_PREFIX = ".tmp-step-"
#: Suffix of a committed checkpoint set aside because its files no longer match their checksums.
QUARANTINE_SUFFIX = ".corrupt"
_NAME = re.compile(r"^step-(\d{8,})$")


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(path: Path) -> dict | None:
    """The parsed ``COMPLETE`` manifest of a checkpoint, or None for a legacy ``step N`` marker."""
    try:
        data = json.loads((path / MARKER).read_text())
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


class CheckpointManager:
    """Writes, finds, verifies and rotates the checkpoints of one run.

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
        """True when ``path`` is a committed checkpoint (its manifest exists)."""
        return (Path(path) / MARKER).is_file()

    @staticmethod
    def verify(path: str | os.PathLike) -> str | None:
        """What is wrong with a committed checkpoint's files (missing, or not matching the checksum its
        manifest records), or None when they all match (or the checkpoint predates checksums)."""
        path = Path(path)
        try:
            recorded = manifest(path)
        except OSError as error:
            return f"{MARKER}: unreadable ({error.strerror or error})"
        if recorded is None:
            return None
        for name, expected in sorted(recorded.get("sha256", {}).items()):
            try:
                actual = file_sha256(path / name)
            except OSError as error:
                return f"{name}: unreadable ({error.strerror or error})"
            if actual != expected:
                return f"{name}: sha256 {actual[:12]}..., expected {expected[:12]}..."
        return None

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
        """Remove what a killed writer left behind: uncommitted directories rnnkit created (temporary
        writes, a checkpoint whose deletion was cut short). Entries without rnnkit's marker are
        never touched, whatever their names.

        Call it once at start, before any writer of this run is active. Returns the removed paths.
        """
        removed = []
        if not self.root.is_dir():
            return removed
        for entry in sorted(self.root.iterdir()):
            ours = entry.name.startswith(TMP_PREFIX) or _NAME.match(entry.name)
            if ours and not self.is_complete(entry) and remove_owned(entry):
                removed.append(entry)
        return removed

    def foreign(self) -> list[Path]:
        """Entries named like checkpoints that rnnkit did not write (uncommitted and unmarked): they
        would stand where this run commits a checkpoint, and are never deleted."""
        if not self.root.is_dir():
            return []
        return sorted(e for e in self.root.iterdir()
                      if _NAME.match(e.name) and not self.is_complete(e) and not is_owned(e))

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Commit a checkpoint for ``step``: ``write(tmp_dir)`` fills a temporary directory.

        ``write`` must fsync what it writes (:func:`rnnkit.atomic.write_atomic` does). The
        directory becomes ``step-<step>`` atomically, with the SHA-256 of each file in its manifest;
        older checkpoints beyond ``keep_last`` are deleted only after that.

        Raises:
            DiskFullError: the disk filled up; the previous checkpoints are intact.
            InputError: a directory rnnkit did not write stands at ``step-<step>``.
        """
        check_positive_int("step", step, minimum=0)
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step:08d}"
        if self.is_complete(final):
            return final  # already committed (e.g. a signal arrived right after a periodic save)
        if (final.exists() or final.is_symlink()) and not is_owned(final):
            raise InputError(f"checkpoint: expected no foreign entry at {final}, got one not written by rnnkit; move it away")
        tmp = self.root / f"{TMP_PREFIX}{step:08d}-{os.getpid()}"
        remove_owned(tmp)
        try:
            make_owned_dir(tmp)
            write(tmp)
            sums = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != OWNER_MARKER}
            with open(tmp / MARKER, "w") as handle:
                json.dump({"format": MANIFEST_FORMAT, "step": step, "sha256": sums}, handle, indent=1, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            fsync_dir(tmp)
            self._remove(final)  # an uncommitted leftover of this run under the final name
            os.replace(tmp, final)
            fsync_dir(self.root)
        except OSError as error:
            if error.errno not in DISK_FULL:
                raise
            latest = self.latest()
            kept = f"the previous checkpoint {latest} is intact" if latest else "no earlier checkpoint exists"
            cause = error.filename if isinstance(error, DiskFullError) else tmp
            raise disk_full(error, cause, f"checkpoint of step {step} not written, {kept}") from None
        finally:
            remove_owned(tmp)
        self._rotate()
        return final

    def _rotate(self) -> None:
        if self.keep_last == 0:
            return
        found = self.committed()
        for _, path in found[: max(0, len(found) - self.keep_last)]:
            self.discard(path)

    def discard(self, path: Path) -> None:
        """Delete a committed checkpoint. It is marked as rnnkit's (checkpoints older than the
        marker get it now) and un-committed before anything else goes, so a crash mid-delete leaves
        an uncommitted directory that :meth:`clean` removes, never a torn checkpoint that counts."""
        if not self.is_complete(path) and not is_owned(path):
            return
        if not is_owned(path):
            (path / OWNER_MARKER).write_text("written by rnnkit; removed with its directory\n")
        (path / MARKER).unlink(missing_ok=True)
        fsync_dir(path)
        self._remove(path)

    def _remove(self, path: Path) -> None:
        """Delete a directory of rnnkit's under a checkpoint's name, first moving it out of that name.

        Deleting a directory takes many steps; one cut short by a kill must not leave, under a
        checkpoint's name, something without rnnkit's marker, which a restart would refuse as
        foreign. Renamed first (atomic), what a cut leaves is a temporary-named directory that
        :meth:`clean` removes while it is marked and that blocks nothing once it is not.
        """
        if not is_owned(path):
            return
        trash = self.root / f"{TMP_PREFIX}removed-{path.name}-{os.getpid()}"
        remove_owned(trash)
        os.replace(path, trash)
        remove_owned(trash)

    def quarantine(self, path: Path) -> Path:
        """Set a committed checkpoint aside under ``step-<step>.corrupt`` (kept, no longer counted
        nor rotated), so the run can commit a sound checkpoint for that step again."""
        target = path.with_name(path.name + QUARANTINE_SUFFIX)
        if target.exists():
            target = path.with_name(f"{path.name}{QUARANTINE_SUFFIX}-{os.getpid()}")
        os.replace(path, target)
        fsync_dir(self.root)
        return target


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


__all__ = ["MARKER", "QUARANTINE_SUFFIX", "CheckpointManager", "file_sha256", "manifest", "resolve_checkpoint"]
