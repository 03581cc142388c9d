"""Online training in the Trainer and on the command line (``rnnkit train --online``): its gradient is
BPTT's when it updates once per batch, it runs end to end with checkpoints and logs, a resumed run
equals the uninterrupted one bit for bit (the stream's state and sensitivities are in the checkpoint),
and what it cannot train is refused with a clear error."""

from __future__ import annotations

import json
import re

import pytest
import torch

import rnnkit
from rnnkit.cli import main
from rnnkit.errors import InputError
from rnnkit.models import SequenceModel, model_config_for
from rnnkit.tasks import build_task
from rnnkit.train import TrainConfig, Trainer
from rnnkit.train.metrics import loss_and_counts
from rnnkit.train.online import OnlineGradient
from rnnkit.train.online_training import OnlineTraining
from tests.helpers import assert_close
from tests.train.resume_utils import assert_identical, run_state


class _GradientRecorder:
    """An optimizer stand-in that keeps the gradients of each update instead of applying them."""

    def __init__(self, params):
        self.params = list(params)
        self.updates: list[list[torch.Tensor]] = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        self.updates.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in self.params])


def _model(task, layer: str, **options) -> SequenceModel:
    block = options.pop("block", "stacked")
    torch.manual_seed(0)
    return SequenceModel(model_config_for(task, d_model=6, layer=layer, block=block,
                                          num_layers=1, layer_options=options))


@pytest.mark.parametrize(("task_name", "task_options", "layer", "options"), [
    ("adding", {}, "mingru", {}),                                   # one target, at the last step
    ("parity", {"variable_length": True}, "lru", {"d_state": 4}),   # a class at each sequence's own last step
    ("copy", {"n_symbols": 3, "delay": 4}, "rglru", {"block": "residual"}),  # targets at several steps, tokens in
])
def test_one_update_per_batch_is_bptts_gradient(task_name, task_options, layer, options):
    """With ``online_every >= T`` the one update of a batch uses the gradient of backpropagation
    through the whole batch: every parameter's, at fp32 tolerance."""
    task = build_task(task_name, eval_examples=8, **task_options)
    model = _model(task, layer, **options)
    batch = next(task.train_batches(4, 10 if task_name != "copy" else None, seed=0))
    config = TrainConfig(online="rtrl", online_every=1000, grad_clip=0.0, progress=False)
    params = [p for p in model.parameters()]
    recorder = _GradientRecorder(params)
    result = OnlineTraining(model, task, config).train_batch(batch, False, recorder, lambda *a: None)
    assert result["updates"] == len(recorder.updates) == 1
    model.zero_grad(set_to_none=True)
    output, _ = model(batch.x, None, batch.lengths, "recurrent")
    loss, _ = loss_and_counts(output, batch, task.target)
    loss.backward()
    assert result["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    for (name, p), got in zip(model.named_parameters(), recorder.updates[0]):
        assert_close(got, torch.zeros_like(p) if p.grad is None else p.grad, kind="grad", what=f"d/d {name}")


def test_updates_every_k_steps_follow_the_windows():
    """``online_every=K`` updates once per window of K steps that holds predictions (copy: the last
    ``n_symbols`` steps), and once more for the steps left at the end of the batch."""
    task = build_task("copy", n_symbols=4, delay=3, eval_examples=8)  # T = 12, predictions at steps 8..11
    model = _model(task, "mingru")
    batch = next(task.train_batches(2, None, seed=0))
    for every, expected in ((1, 4), (3, 2), (5, 2), (12, 1)):  # windows ending at 8,9,10,11 / 8,11 / 9,11 / 11
        recorder = _GradientRecorder(model.parameters())
        config = TrainConfig(online="rtrl", online_every=every, progress=False)
        result = OnlineTraining(model, task, config).train_batch(batch, False, recorder, lambda *a: None)
        assert result["updates"] == len(recorder.updates) == expected, every


def test_cli_trains_online_and_the_model_evaluates(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--task", "adding", "--model", "mingru", "--d-model", "8", "--steps", "3", "--batch-size", "4",
            "--seq-len", "16", "--online", "rtrl", "--no-progress", "--log-every", "1", "--out", str(out),
            "--task-opt", "eval_examples=8", "--checkpoint-every", "2", "--log-dir", str(out / "logs")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "online rtrl (update every 1 step)" in printed and "val: loss" in printed
    info = json.loads((out / "train.json").read_text())
    assert info["train"]["online"] == "rtrl" and info["train"]["online_every"] == 1
    assert info["train"]["precision"] == "fp32"
    assert len((out / "logs" / "train.csv").read_text().splitlines()) == 1 + 3
    assert main(["eval", "--checkpoint", str(out), "--split", "test"]) == 0
    assert "test: loss" in capsys.readouterr().out


#: Streaming runs: the state and the sensitivities run on from one window to the next, so a resume
#: must restore them (and, for uoro, the random signs' generator) to continue exactly.
RESUMED = {
    "rtrl-mingru-stream": ["--model", "mingru", "--online", "rtrl", "--online-every", "3"],
    "rtrl-lru-stream": ["--model", "lru", "--layer-opt", "d_state=4", "--block", "residual", "--online", "rtrl"],
    "uoro-gru-stream": ["--model", "gru", "--layers", "2", "--online", "uoro", "--online-every", "2"],
}


def _online_argv(name: str, out, steps: int = 6) -> list[str]:
    return ["train", "--task", "shakespeare", *RESUMED[name], "--d-model", "6", "--batch-size", "2", "--seq-len", "5",
            "--steps", str(steps), "--warmup", "2", "--lr", "0.01", "--sample-length", "0", "--eval-max-batches", "1",
            "--eval-batch-size", "2", "--eval-every", "3", "--no-progress", "--threads", "1", "--checkpoint-every",
            "2", "--resume", "--out", str(out), "--log-dir", str(out / "logs")]


def _stop_after(monkeypatch, step: int) -> None:
    """Make the next run stop (as on SIGTERM) once it has trained ``step`` steps."""
    original = Trainer._train_step

    def train_step(self, batch):
        record = original(self, batch)
        if self.step == step:
            self.request_stop()
        return record

    monkeypatch.setattr(Trainer, "_train_step", train_step)


@pytest.mark.parametrize("name", list(RESUMED))
def test_a_stopped_and_resumed_online_run_is_bit_identical(name, tmp_path, monkeypatch, capsys):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert main(_online_argv(name, reference)) == 0
    with monkeypatch.context() as patch:
        _stop_after(patch, 3)  # mid-stream, between checkpoints: the stop writes the checkpoint
        assert main(_online_argv(name, resumed)) == 0
    assert "stopped by SIGTERM at step 3" in capsys.readouterr().out
    assert main(_online_argv(name, resumed)) == 0
    assert "resumed from" in capsys.readouterr().out
    assert_identical(run_state(reference), run_state(resumed))


def test_resume_without_the_carried_sensitivities_would_differ(tmp_path, monkeypatch):
    """The check above can fail: a resume that restarts the stream's sensitivities from zero (as a
    checkpoint without them would) trains different weights."""
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert main(_online_argv("rtrl-mingru-stream", reference)) == 0
    with monkeypatch.context() as patch:
        _stop_after(patch, 3)
        assert main(_online_argv("rtrl-mingru-stream", resumed)) == 0
    original = OnlineTraining.load_checkpoint_state
    monkeypatch.setattr(OnlineTraining, "load_checkpoint_state",
                        lambda self, saved: original(self, None if saved is None else {"state": saved["state"]}))
    assert main(_online_argv("rtrl-mingru-stream", resumed)) == 0
    with pytest.raises(AssertionError, match="differs"):
        assert_identical(run_state(reference)["weights"], run_state(resumed)["weights"])


@pytest.mark.parametrize(("extra", "match"), [
    (["--model", "gru", "--online", "rtrl"], "element-wise recurrent layer .*mingru, minlstm, lru, rglru, s4d, paragru"),
    (["--model", "mingru", "--layers", "2", "--online", "rtrl"], "got 2 layers"),
    (["--model", "mingru", "--online", "rtrl", "--pooling", "mean"], "pooling: expected 'last'"),
    (["--model", "mingru", "--online", "rtrl", "--dropout", "0.1"], "dropout: expected 0"),
    (["--model", "mingru", "--online", "rtrl", "--precision", "bf16"], "precision: expected 'fp32'"),
    (["--model", "mingru", "--online", "rtrl", "--online-every", "0"], "online_every: expected an int >= 1"),
    (["--model", "gru", "--bidirectional", "--online", "uoro"], "expected a causal model"),
    (["--task", "reverse", "--model", "gru", "--online", "uoro"], "sequence-to-sequence"),
    (["--model", "mingru", "--online-every", "4"], "--online-every: expected --online rtrl or uoro"),
])
def test_what_online_training_cannot_train_is_refused(extra, match, tmp_path, capsys):
    argv = ["train", "--d-model", "4", "--steps", "1", "--batch-size", "2", "--no-progress",
            "--task-opt", "eval_examples=4", "--out", str(tmp_path / "run"), *extra]
    if "--task" not in extra:
        argv += ["--task", "adding"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err


def test_online_training_raises_the_same_errors_from_python():
    task = build_task("adding", eval_examples=4)
    model = SequenceModel(model_config_for(task, d_model=4, layer="lstm", num_layers=1))
    with pytest.raises(InputError, match="online: expected, for exact RTRL, a model of one element-wise"):
        Trainer(model, task, TrainConfig(online="rtrl", progress=False))
    with pytest.raises(InputError, match="online: expected one of"):
        TrainConfig(online="bptt")


def test_a_wrong_block_declaration_is_caught_when_verified():
    layer = rnnkit.layers.build("elman", d_model=3, hidden_size=4)
    online = OnlineGradient(layer, block_size=1, verify_blocks=True)
    online.reset(2)
    with pytest.raises(InputError, match="block_size: expected a state Jacobian with no entry outside"):
        online.step(torch.randn(2, 3), lambda y: y.sum())
