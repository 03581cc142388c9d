"""Run safety of ``rnnkit train``: signals at any point, unwritable or foreign run directories, locks."""

from __future__ import annotations

import os
import signal
import time

import pytest

from rnnkit.cli import main
from rnnkit.train import CheckpointManager, Trainer

from tests.train.resume_utils import RUNS, fork_main, wait_pid, warm_up


def fresh_argv(out, steps: int = 4, *extra: str) -> list[str]:
    """A tiny fresh run (no --resume) into ``out``, default --checkpoint-every 0."""
    return ["train", *RUNS["adding-gru2-dropout"], "--steps", str(steps), "--warmup", "1", "--no-progress",
            "--threads", "1", "--out", str(out), *extra]


def committed_steps(out) -> list[int]:
    return [s for s, _ in CheckpointManager(out / "checkpoints").committed()]


# ---------------------------------------------------------------------- signals after the last step
def test_ctrl_c_during_the_final_evaluation_leaves_a_resumable_checkpoint(tmp_path, monkeypatch, capsys):
    evaluate = Trainer.evaluate

    def evaluate_then_ctrl_c(self, *args, **kwargs):
        if self.step == self.config.steps:
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", evaluate_then_ctrl_c)
    out = tmp_path / "run"
    assert main(fresh_argv(out)) == 0
    assert "stopped by SIGINT at step 4" in capsys.readouterr().out
    assert committed_steps(out) == [4] and not (out / "model.safetensors").exists()
    monkeypatch.undo()
    assert main(fresh_argv(out, 4, "--resume")) == 0  # evaluates and writes the final model, no more steps
    assert "resumed from" in capsys.readouterr().out and (out / "model.safetensors").is_file()


def test_sigterm_during_the_final_save_still_exits_0_with_a_checkpoint(tmp_path, monkeypatch):
    warm_up()  # before the patch: the warm-up trains in this process
    save = Trainer.save

    def save_then_sigterm(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "save", save_then_sigterm)
    out = tmp_path / "run"
    assert wait_pid(fork_main(fresh_argv(out)), 120) == 0
    assert (out / "model.safetensors").is_file() and committed_steps(out) == [4]


# ---------------------------------------------------------------------- where the run writes
def _one_line_error(capsys, *needles: str) -> str:
    """The stderr of a command that failed with exit 2: one ``rnnkit train: error:`` line naming ``needles``."""
    err = capsys.readouterr().err
    assert err.startswith("rnnkit train: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("flag", ["--out", "--log-dir"])
@pytest.mark.parametrize("where", ["parent-is-a-file", "read-only", "proc"])
def test_an_unwritable_out_or_log_dir_is_an_error_before_step_1(tmp_path, capsys, flag, where):
    if where == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes to read-only directories")
    target = {"parent-is-a-file": tmp_path / "file" / "run", "read-only": tmp_path / "locked" / "run",
              "proc": "/proc/rnnkit-run"}[where]
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "locked").mkdir(mode=0o500)
    out = tmp_path / "out"
    argv = fresh_argv(target, 4) if flag == "--out" else fresh_argv(out, 4, "--log-dir", str(target))
    assert main(argv) == 2
    _one_line_error(capsys, flag, "expected a directory this process can write to", str(target))
    assert not (out / "checkpoints").exists() and not (out / "model.safetensors").exists()


def test_a_fresh_run_into_a_non_empty_out_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(fresh_argv(out)) == 2
    _one_line_error(capsys, "notes.txt", "--resume", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written, not even a lock
    assert main(fresh_argv(out, 4, "--resume", "--overwrite")) == 2
    _one_line_error(capsys, "either --resume or --overwrite")
    # --overwrite: a new run in the same place; the earlier run's checkpoints go, the user's file stays.
    assert main(fresh_argv(out, 4, "--checkpoint-every", "3")) == 2
    (out / "notes.txt").unlink()
    assert main(fresh_argv(out, 4, "--checkpoint-every", "3")) == 0
    assert committed_steps(out) == [3, 4]
    (out / "notes.txt").write_text("mine")
    assert main(fresh_argv(out, 5, "--checkpoint-every", "2", "--overwrite")) == 0
    assert committed_steps(out) == [2, 4, 5] and (out / "notes.txt").read_text() == "mine"


def test_a_fresh_run_does_not_rewrite_the_logs_in_a_used_log_dir(tmp_path, capsys):
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    (logs / "train.csv").write_text("another run's log")
    assert main(fresh_argv(out, 4, "--log-dir", str(logs))) == 2
    _one_line_error(capsys, "--log-dir", "train.csv", "--resume", "--overwrite")
    assert (logs / "train.csv").read_text() == "another run's log"
    assert not out.exists() or not any(out.iterdir())  # nothing trained, nothing written
    assert main(fresh_argv(out, 4, "--log-dir", str(logs), "--overwrite")) == 0
    assert (logs / "train.csv").read_text().startswith("step")


def test_a_second_run_in_the_same_directory_fails_at_once_and_kill_9_leaves_no_stale_lock(tmp_path, capsys):
    from rnnkit.train.rundir import LOCK_NAME

    out = tmp_path / "run"
    warm_up()
    first = fork_main(fresh_argv(out, 10**6))  # trains until killed
    lock, deadline = out / LOCK_NAME, time.monotonic() + 60
    while not (lock.is_file() and lock.read_text().strip() == str(first)):
        assert time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.01)
    try:
        started = time.monotonic()
        assert main(fresh_argv(out, 4, "--resume")) == 2  # a second process, while the first one trains
        assert time.monotonic() - started < 10
        _one_line_error(capsys, "in use by process", str(first))
    finally:
        os.kill(first, signal.SIGKILL)
        os.waitpid(first, 0)
    assert main(fresh_argv(out, 4, "--resume")) == 0  # the killed run's lock went with it
    assert "resumed from" not in capsys.readouterr().out  # it had no checkpoint: a fresh start


def test_foreign_files_in_the_run_directory_survive_a_run_and_a_resume(tmp_path, monkeypatch, capsys):
    """`--out .` in a directory of the user's: rnnkit deletes only what it provably wrote."""
    from rnnkit.train.rundir import make_owned_dir

    here = tmp_path / "project"
    foreign = {".x.tmp": "a", ".tmpabc": "b", "notes.txt": "c", "checkpoints/step-5/data": "d",
               "checkpoints/.tmpabc": "e", "checkpoints/.model.safetensors.abc.tmp": "f",
               "checkpoints/.tmp-step-00000002-1/data": "g", ".model.safetensors.xyz.tmp": "h"}
    for name, text in foreign.items():
        (here / name).parent.mkdir(parents=True, exist_ok=True)
        (here / name).write_text(text)
    monkeypatch.chdir(here)

    def survived():
        return {name: (here / name).read_text() if (here / name).is_file() else None for name in foreign}

    # Files at the names of the final model that rnnkit did not write: refused before step 1, kept.
    (here / "config.json").write_text('{"mine": 1}')
    (here / "train.json").write_text('{"task": "mine"}')
    assert main(fresh_argv(".", 4, "--overwrite")) == 2
    _one_line_error(capsys, "config.json, train.json", "not written by rnnkit")
    assert (here / "config.json").read_text() == '{"mine": 1}' and (here / "train.json").read_text() == '{"task": "mine"}'
    (here / "config.json").unlink()
    (here / "train.json").unlink()

    assert main(fresh_argv(".", 4, "--overwrite", "--checkpoint-every", "1", "--keep-last", "1")) == 0
    assert survived() == foreign and committed_steps(here) == [4] and (here / "model.safetensors").is_file()
    # What a killed writer of rnnkit's leaves is removed at the next start; foreign look-alikes are not.
    ours = make_owned_dir(here / "checkpoints" / ".tmp-step-00000009-1")
    (ours / "model.safetensors").write_text("torn")
    assert main(fresh_argv(".", 4, "--resume", "--checkpoint-every", "1", "--keep-last", "1")) == 0
    assert survived() == foreign and not ours.exists() and committed_steps(here) == [4]


class _Cut(Exception):
    """Stands for a kill: the process stops between two filesystem operations."""


@pytest.mark.parametrize("ops_before_kill", range(7))
def test_a_checkpoint_deletion_cut_anywhere_never_leaves_a_foreign_looking_directory(tmp_path, monkeypatch,
                                                                                      ops_before_kill):
    """Rotation deletes a checkpoint file by file; a kill between any two deletions must leave a
    directory the next start removes, not one it refuses as someone else's."""
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=1)
    write = lambda tmp: [(tmp / name).write_bytes(b"x" * 10) for name in ("a.bin", "b.bin", "c.bin")]  # noqa: E731
    old = manager.save(1, write)
    real_unlink, real_rmdir, done = os.unlink, os.rmdir, [0]

    def counted(real):
        def op(*args, **kwargs):
            if done[0] == ops_before_kill:
                raise _Cut
            done[0] += 1
            return real(*args, **kwargs)
        return op

    monkeypatch.setattr(os, "unlink", counted(real_unlink))
    monkeypatch.setattr(os, "rmdir", counted(real_rmdir))
    try:
        manager.discard(old)
    except _Cut:
        pass
    monkeypatch.undo()
    assert manager.foreign() == []
    manager.clean()
    assert manager.is_complete(old) or not old.exists()  # intact (cut before un-committing) or gone
    assert manager.save(1, write) == old  # the step can be committed again where the cut one stood
