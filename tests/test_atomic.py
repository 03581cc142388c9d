"""Atomic file writes: the old file survives a failed write, no temporary file is left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rnnkit.atomic import FAULT_ENV, write_atomic, write_json_atomic, write_text_atomic


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "data.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    write_text_atomic(path, "second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.json"]


def test_a_failing_write_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old contents")

    def fail_halfway(tmp):
        Path(tmp).write_bytes(b"new but incomp")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, fail_halfway)
    assert path.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]


def test_the_fault_hook_kills_the_writer_before_the_rename(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("old")
    code = ("import sys; from rnnkit.atomic import write_text_atomic\n"
            "write_text_atomic(sys.argv[1], 'x' * 10)\n"
            "write_text_atomic(sys.argv[1], 'y' * 10)\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), **{FAULT_ENV: "15"})
    proc = subprocess.run([sys.executable, "-c", code, str(path)], env=env)
    assert proc.returncode == -9  # SIGKILL in the second write: 20 bytes >= 15
    assert path.read_text() == "x" * 10  # the first write committed, the second never replaced it
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the killed write's temporary file
