"""Trainer: schedule, determinism, TBPTT, metrics, checkpoint, non-finite guard."""

import math

import pytest
import torch

from rnnkit import InputError, NonFiniteError
from rnnkit.models import SequenceModel
from rnnkit.tasks import build_task
from rnnkit.train import TrainConfig, Trainer, lr_at


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, cfg) == pytest.approx(0.1)


def _adding_model(seed=0):
    torch.manual_seed(seed)
    return SequenceModel(d_input=2, d_model=16, head="regress", n_outputs=1, layer="gru")


def _quick(**overrides):
    base = dict(steps=30, batch_size=16, seq_len=20, lr=1e-2, warmup_steps=5, progress=False, log_every=1000)
    base.update(overrides)
    return TrainConfig(**base)


def test_training_is_deterministic_and_learns(tmp_path):
    task = build_task("adding", eval_examples=64)
    first = Trainer(_adding_model(), task, _quick(), out_dir=tmp_path / "a")
    first_result = first.fit()
    second = Trainer(_adding_model(), task, _quick())
    second_result = second.fit()
    assert [r["loss"] for r in first.history] == [r["loss"] for r in second.history]
    assert first_result["val"]["mse"] == second_result["val"]["mse"]
    losses = [r["loss"] for r in first.history]
    assert sum(losses[-10:]) < sum(losses[:10])
    assert (tmp_path / "a" / "model.safetensors").is_file() and (tmp_path / "a" / "train.json").is_file()
    reloaded = SequenceModel.from_pretrained(tmp_path / "a")
    for (name, p), q in zip(first.model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(p, q), name


def test_streaming_lm_carries_state_and_reports_bpc():
    task = build_task("shakespeare")
    torch.manual_seed(0)
    model = SequenceModel(vocab_size=task.vocab_size, d_model=16, layer="lstm")
    seen_states = []
    original = model.forward

    def spy(x, state=None, lengths=None, mode="auto"):
        seen_states.append(state)
        return original(x, state, lengths, mode)

    model.forward = spy
    trainer = Trainer(model, task, _quick(steps=3, batch_size=4, seq_len=16, eval_max_batches=2, eval_batch_size=4))
    result = trainer.fit()
    train_states = seen_states[:3]
    assert train_states[0] is None
    assert all(s is not None for s in train_states[1:])  # carried across windows
    assert all(not t.requires_grad for s in train_states[1:] for layer in s for t in layer)  # detached
    assert result["val"]["bpc"] == pytest.approx(result["val"]["loss"] / math.log(2))
    assert 4 < result["val"]["bpc"] < 7


def test_non_finite_loss_raises_before_the_update():
    task = build_task("adding", eval_examples=16)
    model = _adding_model()
    trainer = Trainer(model, task, _quick(steps=5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    before["head.bias"] = model.head.bias.clone()
    with pytest.raises(NonFiniteError, match="step 0"):
        trainer.fit()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]) or (torch.isnan(value).all() and torch.isnan(before[name]).all()), name


def test_incompatible_model_and_task_is_a_clear_error():
    with pytest.raises(InputError, match="head"):
        Trainer(_adding_model(), build_task("parity"), _quick())


def test_bf16_autocast_trains_a_streaming_lm_with_fp32_weights():
    task = build_task("shakespeare")
    torch.manual_seed(0)
    model = SequenceModel(vocab_size=task.vocab_size, d_model=16, layer="lstm")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = _quick(steps=4, batch_size=4, seq_len=16, lr=1e-2, eval_max_batches=2, eval_batch_size=4, precision="bf16")
    trainer = Trainer(model, task, config)
    result = trainer.fit()  # windows 2-4 continue from the bf16 state the previous window handed back
    assert all(math.isfinite(r["loss"]) for r in trainer.history)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(before[name], p) for name, p in model.named_parameters())
    assert 4 < result["val"]["bpc"] < 7


@pytest.mark.parametrize("field, value", [("steps", 0), ("lr", -1.0), ("batch_size", 1.5), ("grad_clip", float("nan")), ("precision", "fp16")])
def test_bad_train_config(field, value):
    with pytest.raises(InputError, match=field):
        TrainConfig(**{field: value})


@pytest.mark.slow
def test_lstm_solves_adding_at_t100():
    """Hochreiter & Schmidhuber's adding problem at T=100: predicting the mean gives MSE ~0.167."""
    task = build_task("adding")
    torch.manual_seed(0)
    model = SequenceModel(d_input=2, d_model=64, head="regress", n_outputs=1, layer="lstm")
    config = TrainConfig(steps=2500, batch_size=64, seq_len=100, lr=3e-3, warmup_steps=100, progress=False, log_every=250)
    trainer = Trainer(model, task, config)
    trainer.fit()
    test = trainer.evaluate("test")
    assert test["mse"] < 0.01, test


def test_evaluate_bounded_stops_by_batches_and_time():
    task = build_task("adding", eval_examples=64)
    model = SequenceModel(d_input=2, d_model=4, head="regress", n_outputs=1, layer="gru")
    trainer = Trainer(model, task, TrainConfig(steps=1, seq_len=10, eval_batch_size=16, progress=False))
    full, seen = trainer.evaluate_bounded("test")
    assert seen == 64 and full == trainer.evaluate("test")
    assert trainer.evaluate_bounded("test", max_batches=2)[1] == 32
    assert trainer.evaluate_bounded("test", max_seconds=0.0)[1] == 16  # at least one batch, then the cap
    assert trainer.evaluate_bounded("test", seq_len=20)[0] != full  # another length, other sequences
    assert trainer.model.training
