"""What is on disk stays sound: checksummed checkpoints (a damaged one is never resumed from), a full
disk during a save (the previous checkpoint intact), a non-finite model never replacing a sound one."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from rnnkit.cli import main
from rnnkit.train import CheckpointManager, Trainer
from rnnkit.train.checkpoint import MARKER, QUARANTINE_SUFFIX
from rnnkit.train.rundir import OWNER_MARKER

from tests.train.resume_utils import assert_identical, run_state, train_argv

NAME = "adding-gru2-dropout"


def _flip_bytes(path, count=4):
    """Invert ``count`` bytes in the second half of a file (tensor data, past the safetensors header)."""
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[len(data) // 2 + i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_set_aside_and_resume_falls_back_to_a_sound_one(tmp_path, capsys):
    reference, damaged = tmp_path / "reference", tmp_path / "damaged"
    assert main(train_argv(NAME, reference, 6, 2)) == 0
    assert main(train_argv(NAME, damaged, 6, 2)) == 0
    capsys.readouterr()
    latest = CheckpointManager(damaged / "checkpoints").latest()
    assert latest.name == "step-00000006"
    sums = json.loads((latest / MARKER).read_text())["sha256"]
    assert set(sums) == {"model.safetensors", "config.json", "optimizer.pt", "trainer_state.pt", "train.json"}
    assert CheckpointManager.verify(latest) is None
    _flip_bytes(latest / "model.safetensors")
    assert "model.safetensors" in CheckpointManager.verify(latest)
    assert main(train_argv(NAME, damaged, 6, 2)) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {latest} is damaged (model.safetensors: sha256" in err, err
    assert "falling back to" in err and "step-00000004" in err, err
    assert (damaged / "checkpoints" / f"step-00000006{QUARANTINE_SUFFIX}").is_dir()  # kept, not deleted
    assert_identical(run_state(reference), run_state(damaged))  # steps 5 and 6 redone from step 4


def test_an_explicit_damaged_checkpoint_is_an_error_and_old_checkpoints_without_checksums_load(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(NAME, out, 4, 2)) == 0
    latest = CheckpointManager(out / "checkpoints").latest()
    # A checkpoint written before checksums: a "step N" marker, no ownership marker.
    (latest / MARKER).write_text("step 4\n")
    (latest / OWNER_MARKER).unlink()
    assert CheckpointManager.verify(latest) is None
    capsys.readouterr()
    assert main(train_argv(NAME, out, 4, 2)) == 0
    assert f"resumed from {latest} at step 4" in capsys.readouterr().out
    # Rotating it out still works (it is marked as rnnkit's before it goes).
    manager = CheckpointManager(out / "checkpoints", keep_last=1)
    manager.save(5, lambda tmp: (tmp / "data").write_text("5"))
    assert [s for s, _ in manager.committed()] == [5] and not latest.exists()
    # A damaged checkpoint named explicitly is an error, not a fallback.
    assert main(train_argv(NAME, tmp_path / "other", 4, 2)) == 0
    named = CheckpointManager(tmp_path / "other" / "checkpoints").latest()
    _flip_bytes(named / "optimizer.pt")
    trainer = Trainer.__new__(Trainer)  # resume(path) verifies before it reads or touches anything
    with pytest.raises(Exception, match=r"readable checkpoint whose files match their checksums.*optimizer.pt"):
        trainer.resume(named)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    save = torch.save
    calls = []

    def save_until_the_disk_fills(obj, name, *args, **kwargs):
        calls.append(name)
        if len(calls) > 2:  # the first checkpoint's optimizer.pt and trainer_state.pt go through
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, name, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    assert main(train_argv(NAME, out, 6, 2)) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnkit train: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "full disk" in err and str(out / "checkpoints") in err and "step-00000002 is intact" in err, err
    manager = CheckpointManager(out / "checkpoints")
    assert [s for s, _ in manager.committed()] == [2] and manager.verify(manager.latest()) is None
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]  # no temporary left


def test_a_non_finite_model_never_replaces_a_sound_final_model(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(train_argv(NAME, out, 4, 2)) == 0
    sound = {name: (out / name).read_bytes() for name in ("model.safetensors", "config.json", "train.json")}
    evaluate = Trainer.evaluate

    def evaluate_then_poison(self, *args, **kwargs):
        with torch.no_grad():
            next(self.model.parameters()).fill_(float("nan"))
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", evaluate_then_poison)
    capsys.readouterr()
    assert main(train_argv(NAME, out, 4, 2)) == 2  # the finished run re-evaluates and would save again
    err = capsys.readouterr().err
    assert err.startswith("rnnkit train: error: step 4: the final model has non-finite weights") and \
        err.count("\n") == 1, err
    assert {name: (out / name).read_bytes() for name in sound} == sound
    assert not any(p.name.startswith(".rnnkit-save-") for p in out.iterdir())
