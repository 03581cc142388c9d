"""The run directory of ``rnnkit train``: checked before training, used by one run at a time, and
cleaned only of what rnnkit provably wrote there.

A run is told where to write before it trains, so a directory it cannot write to is an error at
start, not after the last step. A fresh run never lands in a directory that already holds files
(they would mix with its own): that needs ``--resume`` (continue the run there) or ``--overwrite``.
While a run is alive it holds an exclusive ``flock`` on :data:`LOCK_NAME` in its directory; the
kernel drops the lock when the process ends in any way (kill -9 included), so it is never stale.

Ownership: the run directory may be shared with the user's own files (``--out .``), so rnnkit never
deletes or replaces a file there because of its name. It deletes a directory only when the
directory carries :data:`OWNER_MARKER`, which rnnkit writes first into every directory it creates for
its writes (checkpoints, staging areas), and it replaces the final model's files only when
:data:`RUN_MANIFEST` lists them as files of an rnnkit run.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

from rnnkit.atomic import fsync_dir, write_json_atomic
from rnnkit.errors import InputError

LOCK_NAME = ".rnnkit.lock"
#: Written first into every directory rnnkit creates for its own writes: the proof that it may
#: delete the directory later (a killed writer's leftovers, a rotated checkpoint).
OWNER_MARKER = ".rnnkit-owned"
#: In a run directory: the files the run writes there (the final model), so that a later run may
#: replace them and a foreign file of the same name is never overwritten.
RUN_MANIFEST = ".rnnkit-run.json"
#: The final model's files in a run directory, as :meth:`rnnkit.train.Trainer.save` writes them.
FINAL_FILES = ("model.safetensors", "config.json", "train.json")
#: Subdirectory of a run where ``keep_best`` keeps the model of the lowest val loss (the final files' layout).
BEST_DIR = "best"
#: Prefix of the directory in which the final model is assembled before its files are moved into place.
STAGING_PREFIX = ".rnnkit-save-"
#: Bookkeeping files that do not make a run directory "non-empty" for a fresh run.
BOOKKEEPING = frozenset({LOCK_NAME, RUN_MANIFEST})


def check_writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """Create ``path`` (with its parents) if needed and prove it writable by creating and removing a
    probe file in it. Raises InputError naming ``flag`` otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".rnnkit-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or str(error)
        raise InputError(f"{flag}: expected a directory this process can write to, got {str(path)!r} ({reason})") from None
    return path


def check_fresh(path: Path, flag: str = "--out") -> None:
    """Raise InputError if ``path`` holds anything besides rnnkit's bookkeeping (for a fresh run)."""
    entries = sorted(p.name for p in path.iterdir() if p.name not in BOOKKEEPING) if path.is_dir() else []
    if entries:
        shown = ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")
        raise InputError(
            f"{flag}: expected an empty or new directory for a fresh run, got {str(path)!r} holding {shown}; "
            "pass --resume to continue the run there, or --overwrite to start a new one in its place"
        )


# ---------------------------------------------------------------------- ownership
def make_owned_dir(path: Path) -> Path:
    """Create the new directory ``path`` and mark it as rnnkit's (the marker is written first)."""
    path.mkdir()
    with open(path / OWNER_MARKER, "w") as handle:
        handle.write("written by rnnkit; removed with its directory\n")
    return path


def is_owned(path: Path) -> bool:
    """True when ``path`` is a real directory (not a link) that rnnkit created (it holds the marker)."""
    return path.is_dir() and not path.is_symlink() and (path / OWNER_MARKER).is_file()


def remove_owned(path: Path) -> bool:
    """Delete ``path`` with its contents if rnnkit owns it (:func:`is_owned`); returns whether it did.

    The marker goes last: a removal cut short (a kill, a crash) leaves a directory that still says it
    is rnnkit's, which the next start removes, and at worst an empty directory, never one that looks
    like someone else's and blocks the run.
    """
    if not is_owned(path):
        return False
    for root, dirs, files in os.walk(path, topdown=False):
        top = Path(root) == path
        for name in files:
            if not (top and name == OWNER_MARKER):
                _unlink_quietly(Path(root) / name)
        for name in dirs:
            entry = Path(root) / name
            if entry.is_symlink():
                _unlink_quietly(entry)
            else:
                _rmdir_quietly(entry)
    _unlink_quietly(path / OWNER_MARKER)
    _rmdir_quietly(path)
    return True


def remove_if_empty(path: Path) -> bool:
    """Remove ``path`` if it is an empty directory (nothing can be lost); returns whether it did."""
    if path.is_symlink() or not path.is_dir():
        return False
    try:
        path.rmdir()
    except OSError:
        return False
    return True


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(path, ignore_errors=True)  # a file appeared meanwhile inside rnnkit's own directory


def remove_staging(directory: Path) -> list[Path]:
    """Delete the staging directories a killed final save left in ``directory`` (those rnnkit owns)."""
    if not directory.is_dir():
        return []
    return [e for e in directory.iterdir() if e.name.startswith(STAGING_PREFIX) and remove_owned(e)]


def owned_files(directory: Path) -> set[str]:
    """The final-model files of ``directory`` that an rnnkit run wrote: those :data:`RUN_MANIFEST`
    lists, or, in a run directory written before the manifest existed, :data:`FINAL_FILES` when its
    ``train.json`` is an rnnkit run description."""
    try:
        return set(json.loads((directory / RUN_MANIFEST).read_text())["files"]) & set(FINAL_FILES)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        info = json.loads((directory / "train.json").read_text())
    except (OSError, ValueError):
        return set()
    legacy = isinstance(info, dict) and {"rnnkit_version", "task", "train", "model"} <= set(info)
    return set(FINAL_FILES) if legacy else set()


def record_final_files(directory: Path) -> None:
    """List :data:`FINAL_FILES` in ``directory``'s :data:`RUN_MANIFEST` (before they are written)."""
    if owned_files(directory) >= set(FINAL_FILES) and (directory / RUN_MANIFEST).is_file():
        return
    write_json_atomic(directory / RUN_MANIFEST, {"written_by": "rnnkit", "files": list(FINAL_FILES)})


def foreign_final_files(directory: Path) -> list[str]:
    """Files in ``directory`` at the final model's names that no rnnkit run wrote."""
    present = [name for name in FINAL_FILES if (directory / name).exists() or (directory / name).is_symlink()]
    ours = owned_files(directory)
    return [name for name in present if name not in ours]


def claim_outputs(directory: Path, flag: str = "--out") -> None:
    """Check that the final model's files can be written to ``directory`` without replacing a file
    rnnkit did not write, then record them as this run's (:func:`record_final_files`).

    Raises:
        InputError: a foreign file sits at one of :data:`FINAL_FILES`.
    """
    foreign = foreign_final_files(directory)
    if foreign:
        raise InputError(
            f"{flag}: expected no files of other programs where the run writes its model, got {', '.join(foreign)} "
            f"in {str(directory)!r} not written by rnnkit; move them away or choose another {flag}"
        )
    record_final_files(directory)


def discard_final_files(directory: Path) -> list[Path]:
    """Delete the final model's files of an earlier run in ``directory`` (only those rnnkit wrote)."""
    removed = []
    for name in sorted(owned_files(directory)):
        path = directory / name
        if path.is_file() and not path.is_symlink():
            path.unlink()
            removed.append(path)
    fsync_dir(directory)
    return removed


# ---------------------------------------------------------------------- the lock
class RunLock:
    """An exclusive lock on a run directory, held until :meth:`release` or the end of the process.

    Raises:
        InputError: another live process holds the lock (its pid is named when known).
    """

    def __init__(self, directory: str | os.PathLike, flag: str = "--out") -> None:
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            self.release()
            raise InputError(
                f"{flag}: expected a run directory no other run is using, got {str(directory)!r} in use by "
                f"{'process ' + holder if holder else 'another process'} (wait for it to end, or choose another {flag})"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = [
    "BOOKKEEPING", "FINAL_FILES", "LOCK_NAME", "OWNER_MARKER", "RUN_MANIFEST", "STAGING_PREFIX", "RunLock",
    "check_fresh", "check_writable_dir", "claim_outputs", "discard_final_files", "foreign_final_files",
    "is_owned", "make_owned_dir", "owned_files", "record_final_files", "remove_owned", "remove_staging",
]
