"""When a run ends and what it keeps: a time budget that fixes the step count, early stopping, the best
model on validation, and the throughput's unit."""

import json

import pytest
import torch

from rnnkit.cli import GENERIC_DEFAULTS, LANGUAGE_MODEL_DEFAULTS, defaults_for, main
from rnnkit.errors import InputError
from rnnkit.models import SequenceModel
from rnnkit.tasks import build_task
from rnnkit.train import TrainConfig, Trainer
from rnnkit.train import trainer as trainer_module
from rnnkit.train.progress import throughput_unit


def _model(seed=0):
    torch.manual_seed(seed)
    return SequenceModel(d_input=2, d_model=8, head="regress", n_outputs=1, layer="gru")


def _config(**overrides):
    base = dict(steps=40, batch_size=8, seq_len=12, lr=1e-2, warmup_steps=4, progress=False, log_every=1000)
    base.update(overrides)
    return TrainConfig(**base)


class FakeClock:
    """Stands in for the trainer's wall clock: every step takes ``per_step`` seconds."""

    def __init__(self, per_step):
        self.per_step, self.now = per_step, 0.0

    def __call__(self):
        return self.now


def _timed(monkeypatch, per_step):
    """Make each training step last ``per_step`` seconds of the trainer's clock."""
    clock = FakeClock(per_step)
    monkeypatch.setattr(trainer_module.time, "perf_counter", clock)
    monkeypatch.setattr("rnnkit.train.progress.time.perf_counter", clock)
    real_step = Trainer._train_step

    def step(self, batch):
        clock.now += per_step
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "_train_step", step)
    return clock


def test_a_time_budget_fixes_the_step_count_from_measured_speed(tmp_path, monkeypatch):
    _timed(monkeypatch, per_step=3.0)  # 1 minute of budget: 20 steps of 3 s
    task = build_task("adding", eval_examples=16)
    trainer = Trainer(_model(), task, _config(steps=1000, budget_minutes=1.0), out_dir=tmp_path / "run")
    result = trainer.fit()
    assert trainer.budget_steps == 20 and trainer.config.steps == 20 and result["steps"] == 20
    saved = json.loads((tmp_path / "run" / "train.json").read_text())
    assert saved["train"]["steps"] == 20 and saved["train"]["budget_minutes"] == 1.0


def test_the_given_steps_cap_a_time_budget(monkeypatch):
    _timed(monkeypatch, per_step=0.001)
    trainer = Trainer(_model(), build_task("adding", eval_examples=16), _config(steps=12, budget_minutes=5.0))
    assert trainer.fit()["steps"] == 12 and trainer.budget_steps == 12


def test_a_budgeted_run_resumes_exactly_with_the_fixed_count(tmp_path, monkeypatch):
    """Killed after the count was fixed, the resumed run keeps that count (its own speed does not
    matter), so it equals the uninterrupted run."""
    task = build_task("adding", eval_examples=16)
    _timed(monkeypatch, per_step=3.0)
    whole = Trainer(_model(), task, _config(steps=1000, budget_minutes=1.0, checkpoint_every=5), out_dir=tmp_path / "a")
    whole.fit()
    first = Trainer(_model(), task, _config(steps=1000, budget_minutes=1.0, checkpoint_every=5), out_dir=tmp_path / "b")
    first.fit(on_step=lambda step, record: step == 10 and first.request_stop())
    assert first.step == 10 and first.budget_steps == 20
    _timed(monkeypatch, per_step=0.5)  # a faster machine now: the count stays the recorded one
    second = Trainer(_model(7), task, _config(steps=1000, budget_minutes=1.0, checkpoint_every=5), out_dir=tmp_path / "b")
    second.resume()
    assert second.config.steps == 20
    second.fit()
    assert second.step == 20
    for (name, a), b in zip(whole.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_early_stopping_after_patience_evaluations_without_improvement(tmp_path, monkeypatch):
    losses = iter([1.0, 0.5, 0.6, 0.7, 0.4, 0.8, 0.9, 0.95, 1.0, 1.1])

    def fake_evaluate(self, split="val", max_batches=None):
        return {"loss": next(losses), "mse": 0.0}

    monkeypatch.setattr(Trainer, "evaluate", fake_evaluate)
    trainer = Trainer(_model(), build_task("adding", eval_examples=16), _config(eval_every=2, patience=3),
                      out_dir=tmp_path / "run")
    result = trainer.fit()
    # Evaluations at steps 2, 4, ...: the best (0.4) at step 10, then 0.8, 0.9, 0.95: stop at step 16.
    assert result["steps"] == 16 and result["stopped_early"]
    assert result["best"] == {"step": 10, "loss": 0.4}


def test_keep_best_writes_the_model_of_the_lowest_val_loss(tmp_path, monkeypatch):
    losses = iter([1.0, 0.3, 0.6, 0.7, 0.9])
    snapshots = {}
    real_save = Trainer.save

    def fake_evaluate(self, split="val", max_batches=None):
        snapshots[self.step] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return {"loss": next(losses), "mse": 0.0}

    monkeypatch.setattr(Trainer, "evaluate", fake_evaluate)
    monkeypatch.setattr(Trainer, "save", real_save)
    trainer = Trainer(_model(), build_task("adding", eval_examples=16), _config(steps=9, eval_every=2, keep_best=True),
                      out_dir=tmp_path / "run")
    trainer.fit()
    best = tmp_path / "run" / "best"
    info = json.loads((best / "train.json").read_text())
    assert info["metrics"]["step"] == 4 and info["metrics"]["val"]["loss"] == 0.3
    loaded = SequenceModel.from_pretrained(best)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, snapshots[4][name]), name


@pytest.mark.parametrize("field", ["patience", "keep_best"])
def test_patience_and_keep_best_need_evaluations(field):
    with pytest.raises(InputError, match="eval_every"):
        TrainConfig(**{field: 2 if field == "patience" else True})


def test_bad_budget_is_an_input_error():
    with pytest.raises(InputError, match="budget_minutes"):
        TrainConfig(budget_minutes=0)


def test_throughput_units_and_defaults_follow_the_task():
    assert throughput_unit(build_task("adding")) == "seq/s"
    assert throughput_unit(build_task("parity")) == "seq/s"
    assert throughput_unit(build_task("shakespeare")) == "tok/s"
    assert throughput_unit(build_task("copy")) == "tok/s"
    assert defaults_for(build_task("shakespeare")) is LANGUAGE_MODEL_DEFAULTS
    assert defaults_for(build_task("copy")) is GENERIC_DEFAULTS  # per-step targets, but not a streamed LM
    assert GENERIC_DEFAULTS["precision"] == LANGUAGE_MODEL_DEFAULTS["precision"] == "auto"


def test_cli_budget_patience_and_best(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--task", "adding", "--model", "gru", "--d-model", "4", "--batch-size", "4", "--seq-len", "6",
            "--task-opt", "eval_examples=8", "--no-progress", "--out", str(out), "--max-minutes", "0.05",
            "--steps", "30", "--eval-every", "5", "--keep-best", "--patience", "100", "--threads", "1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "0.05 minutes of steps, at most 30 steps of batch 4 x 6" in text and "seq/s" in text
    assert "best: val loss" in text and (out / "best" / "model.safetensors").is_file()
    assert main(["eval", "--checkpoint", str(out / "best"), "--threads", "1"]) == 0
    assert main(["train", *argv[1:], "--overwrite"]) == 0  # the best model of the old run goes with it
    assert main(["eval", "--checkpoint", str(out), "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_cli_rejects_a_non_positive_budget(tmp_path, capsys):
    assert main(["train", "--task", "adding", "--max-minutes", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--max-minutes" in capsys.readouterr().err
