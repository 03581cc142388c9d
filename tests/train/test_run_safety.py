"""Run safety of ``rnnkit train``: signals at any point, unwritable or foreign run directories, locks."""

from __future__ import annotations

import os
import signal

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
