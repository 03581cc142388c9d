"""Crash-safe file writes shared by model saving, training and the benchmarks.

A file is written to a temporary file in its own directory, fsynced, then renamed over its final name
with ``os.replace`` (atomic on POSIX), so a crash or a failed write leaves the old file or the new one,
never a truncated mix. Directories are fsynced where a rename has to survive power loss (checkpoint
commits); :func:`fsync_dir` does that. A write that fails because the disk is full raises
:class:`~rnnkit.errors.DiskFullError` naming the file.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from rnnkit.errors import DiskFullError

#: Prefix and suffix of the temporary files of :func:`write_atomic`: ``.<name>.<random>.tmp``.
TMP_SUFFIX = ".tmp"
#: ``errno`` values that mean "no room left": a full file system or a spent disk quota.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (a rename or a new file) to disk; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def disk_full(error: OSError, path: str | os.PathLike, what: str = "") -> DiskFullError:
    """The :class:`DiskFullError` for a write of ``path`` that failed with ``error`` (ENOSPC/EDQUOT)."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    suffix = f"; {what}" if what else ""
    full = DiskFullError(f"{path}: expected room to write it, got a full disk ({reason}){suffix}")
    full.errno, full.filename = error.errno, str(path)
    return full


def write_atomic(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Create or replace ``path`` atomically: ``write(tmp_name)`` fills a temporary file in the same
    directory, which is fsynced and then renamed over ``path``. If ``write`` (or the flush) raises,
    the temporary file is removed and ``path`` is left as it was.

    Raises:
        DiskFullError: the file system is full (``ENOSPC``/``EDQUOT``); ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as error:
        if error.errno in DISK_FULL:
            raise disk_full(error, path, "nothing was written") from error
        raise
    os.close(fd)
    try:
        write(tmp)
        _fault_point(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if error.errno in DISK_FULL and not isinstance(error, DiskFullError):
            raise disk_full(error, path, "the previous file, if any, is intact") from error
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    text = json.dumps(data, indent=2, sort_keys=True)
    write_text_atomic(path, text)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


#: Test-only fault injection, read by every :func:`write_atomic`: with
#: ``RNNKIT_FAULT_KILL_AFTER_BYTES=N`` in the environment, the process SIGKILLs itself inside the
#: first atomic write that brings the bytes written by this process to N or more (after the
#: temporary file is filled, before it is renamed). With ``RNNKIT_FAULT_SCOPE=TEXT`` as well, only
#: writes whose temporary path contains TEXT count (``.tmp-step-``: files of a checkpoint being
#: written), so tests place a kill inside a checkpoint write by construction instead of by timing.
#: Unset (always, outside tests), the hook does nothing.
FAULT_ENV = "RNNKIT_FAULT_KILL_AFTER_BYTES"
FAULT_SCOPE_ENV = "RNNKIT_FAULT_SCOPE"
_written = [0]


def _fault_point(tmp: str) -> None:
    limit = os.environ.get(FAULT_ENV)
    if not limit:
        return
    if os.environ.get(FAULT_SCOPE_ENV, "") not in tmp:
        return
    _written[0] += os.path.getsize(tmp)
    if _written[0] >= int(limit):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


__all__ = [
    "DISK_FULL", "FAULT_ENV", "FAULT_SCOPE_ENV", "disk_full", "fsync_dir", "write_atomic", "write_json_atomic",
    "write_text_atomic",
]
