"""The Trainer on sequence-to-sequence tasks: Seq2Seq and PointerNetwork models train, evaluate with
the task's decoding metrics, save and reload as their own class; label smoothing and scheduled
sampling reach the loss; a run stopped and resumed equals an uninterrupted one bit for bit; the NaN
policy and the logs work as for sequence models. (Killed runs of `rnnkit train` on a seq2seq task
are in test_resume.py, through its RUNS.)"""

from __future__ import annotations

import csv
import itertools
import json

import pytest
import torch

from rnnkit import InputError, NonFiniteError
from rnnkit.models import (
    PointerNetwork, Seq2Seq, SequenceModel, load_pretrained, seq2seq_config_for, seq2seq_loss,
    teacher_forcing_probability,
)
from rnnkit.tasks import build_task
from rnnkit.tasks.seq2seq_base import Seq2SeqBatch
from rnnkit.train import CheckpointManager, TrainConfig, Trainer
from rnnkit.train.seq2seq import teacher_forcing

from tests.train.seq2seq_utils import write_dictionary


def _reverse():
    return build_task("reverse", n_symbols=5, max_len=5, eval_examples=16)


def _seq2seq(task, **options):
    torch.manual_seed(0)
    fields = dict(d_model=8, encoder_layer="gru", decoder_layer="gru", attention="additive", bidirectional=True)
    fields.update(options)
    return Seq2Seq(seq2seq_config_for(task, **fields))


def _config(**overrides):
    config = dict(steps=6, batch_size=4, lr=1e-2, warmup_steps=2, progress=False, eval_batch_size=8)
    config.update(overrides)
    return TrainConfig(**config)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_seq2seq_trains_evaluates_saves_and_reloads(tmp_path):
    task = _reverse()
    model = _seq2seq(task, dropout=0.1)
    before = _weights(model)
    trainer = Trainer(model, task, _config(eval_every=3, keep_best=True), out_dir=tmp_path, log_dir=tmp_path / "logs")
    result = trainer.fit()
    assert result["steps"] == 6 and set(result["val"]) == {"loss", "accuracy"}
    assert 0 <= result["val"]["accuracy"] <= 1 and result["val"]["loss"] > 0
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())  # it trained
    again = load_pretrained(tmp_path)
    assert type(again) is Seq2Seq and again.config == model.config
    batch = next(task.eval_batches("test", 4))
    model.eval()
    again.eval()
    assert torch.equal(again(batch.src, batch.src_lengths, batch.tgt_in, batch.tgt_lengths),
                       model(batch.src, batch.src_lengths, batch.tgt_in, batch.tgt_lengths))
    assert type(load_pretrained(tmp_path / "best")) is Seq2Seq
    with open(tmp_path / "logs" / "eval.csv", newline="") as handle:
        rows = [(r["step"], r["metric"]) for r in csv.DictReader(handle)]
    assert ("3", "accuracy") in rows and ("6", "accuracy") in rows and ("6", "loss") in rows
    assert sorted((tmp_path / "logs").glob("events.out.tfevents.*"))  # TensorBoard too


def test_evaluation_decodes_greedily_or_with_beams():
    task = _reverse()
    model = _seq2seq(task)
    greedy = Trainer(model, task, _config()).evaluate("test")
    beams = Trainer(model, task, _config(eval_beam=3)).evaluate("test")
    assert greedy["loss"] == beams["loss"]  # teacher forced: decoding plays no part
    assert set(greedy) == set(beams) == {"loss", "accuracy"}


def test_pointer_network_trains_and_reports_area_coverage(tmp_path):
    task = build_task("convex_hull", min_n=4, max_n=6, eval_examples=8)
    torch.manual_seed(0)
    model = PointerNetwork(seq2seq_config_for(task, d_model=8, encoder="set", process_steps=2, decoder_layer="gru"))
    result = Trainer(model, task, _config(steps=3, label_smoothing=0.1), out_dir=tmp_path).fit()
    assert set(result["val"]) == {"loss", "accuracy", "area_coverage", "invalid"}
    again = load_pretrained(tmp_path)
    assert type(again) is PointerNetwork and again.config == model.config


def test_g2p_evaluation_reports_phoneme_and_word_error_rates(tmp_path):
    task = build_task("g2p", path=str(write_dictionary(tmp_path / "small.dict")), val_fraction=0.2, test_fraction=0.2)
    model = _seq2seq(task, attention="general", bidirectional=False)
    metrics = Trainer(model, task, _config(steps=2)).evaluate("test")
    assert set(metrics) == {"loss", "per", "wer"} and 0 <= metrics["wer"] <= 1 and metrics["per"] >= 0


def test_the_step_loss_is_the_label_smoothed_loss_of_the_batch():
    task = _reverse()
    model = _seq2seq(task)
    batch = next(task.train_batches(4, seed=0))
    logits = model(batch.src, batch.src_lengths, batch.tgt_in, batch.tgt_lengths)
    expected = float(seq2seq_loss(logits, batch.targets, batch.tgt_lengths, label_smoothing=0.2))
    plain = float(seq2seq_loss(logits, batch.targets, batch.tgt_lengths))
    record = Trainer(model, task, _config(label_smoothing=0.2))._train_step(batch)
    assert record["loss"] == pytest.approx(expected, rel=1e-6) and expected != pytest.approx(plain, rel=1e-3)


def test_scheduled_sampling_follows_its_schedule_and_changes_the_inputs():
    config = _config(scheduled_sampling="linear", sampling_slope=0.1, sampling_min=0.3)
    assert [teacher_forcing(config, s) for s in (0, 2, 10)] == pytest.approx([1.0, 0.8, 0.3])
    assert teacher_forcing(config, 4) == teacher_forcing_probability(4, "linear", slope=0.1, minimum=0.3)
    assert teacher_forcing(_config(), 10**6) == 1.0
    task = _reverse()
    losses = {}
    for schedule in ("none", "exponential"):
        model = _seq2seq(task)
        trainer = Trainer(model, task, _config(scheduled_sampling=schedule, sampling_k=0.01))
        trainer.step = 3  # teacher forcing 1e-6 with the schedule: the model reads its own samples
        losses[schedule] = trainer._train_step(next(task.train_batches(4, seed=0)))["loss"]
    assert losses["none"] != losses["exponential"]


def _stop_after(trainer, step):
    def on_step(current, record):
        if current == step:
            trainer.request_stop()
    return on_step


@pytest.mark.parametrize("pointer", [False, True], ids=["seq2seq", "pointer"])
def test_stopped_and_resumed_run_is_bit_identical(tmp_path, pointer):
    """Dropout and scheduled sampling draw random numbers at every step: a run stopped at step 4
    (checkpointed there) and resumed by a new Trainer ends with the weights, optimizer state, history
    and evaluations of the uninterrupted run."""
    if pointer:
        task = build_task("sort", min_n=3, max_n=5, eval_examples=8)
        make = lambda: PointerNetwork(seq2seq_config_for(task, d_model=8, decoder_layer="gru", dropout=0.2,  # noqa: E731
                                                         encoder_layer="gru", encoder_layers=2))
        options = dict(label_smoothing=0.1)
    else:
        task = _reverse()
        make = lambda: _seq2seq(task, dropout=0.2, encoder_layers=2, input_feeding=True)  # noqa: E731
        options = dict(label_smoothing=0.1, scheduled_sampling="linear", sampling_slope=0.1)
    config = lambda: _config(steps=8, eval_every=3, checkpoint_every=2, **options)  # noqa: E731

    torch.manual_seed(0)
    reference = Trainer(make(), task, config(), out_dir=tmp_path / "reference")
    reference.fit()

    torch.manual_seed(0)
    first = Trainer(make(), task, config(), out_dir=tmp_path / "resumed")
    assert first.fit(on_step=_stop_after(first, 5))["interrupted"] == "SIGTERM"
    torch.manual_seed(123)  # a different initialisation: everything must come from the checkpoint
    second = Trainer(make(), task, config(), out_dir=tmp_path / "resumed")
    assert second.resume() is not None and second.step == 5
    second.fit()
    for name, value in reference.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[name]), name
    for a, b in zip(reference.optimizer.state.values(), second.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq"))
    assert reference.history and [{k: r[k] for k in ("loss", "grad_norm")} for r in reference.history] == \
        [{k: r[k] for k in ("loss", "grad_norm")} for r in second.history]
    assert reference.evals == second.evals
    latest = CheckpointManager(tmp_path / "resumed" / "checkpoints").latest()
    assert type(load_pretrained(latest)) is type(reference.model)  # a checkpoint loads as its model too


class _Poisoned:
    """A feature-source seq2seq task whose training batches at the given indices carry NaN sources."""

    def __init__(self, base, bad):
        self.base, self.bad = base, set(bad)

    def __getattr__(self, name):
        return getattr(self.base, name)

    def train_batches(self, batch_size, seq_len=None, seed=0, start=0):
        for index, batch in enumerate(self.base.train_batches(batch_size, seq_len, seed=seed, start=start), start):
            if index in self.bad:
                batch = Seq2SeqBatch(torch.full_like(batch.src, float("nan")), batch.src_lengths, batch.tgt_in,
                                     batch.targets, batch.tgt_lengths, batch.references)
            yield batch


def test_nan_policy_skips_or_raises_on_a_seq2seq_task(tmp_path):
    base = build_task("sort", min_n=3, max_n=4, eval_examples=8)
    make = lambda: PointerNetwork(seq2seq_config_for(base, d_model=8, decoder_layer="gru"))  # noqa: E731
    torch.manual_seed(0)
    trainer = Trainer(make(), _Poisoned(base, {2}), _config(steps=4, nan_policy="skip"))
    weights = {}
    trainer.fit(on_step=lambda step, record: weights.update({step: _weights(trainer.model)}))
    assert trainer.skipped == 1 and [r["skipped"] for r in trainer.history] == [0, 0, 1, 0]
    assert all(torch.equal(weights[3][k], weights[2][k]) for k in weights[2])  # the skipped step changed nothing
    torch.manual_seed(0)
    raising = Trainer(make(), _Poisoned(base, {1}), _config(steps=4), out_dir=tmp_path)
    with pytest.raises(NonFiniteError, match="step 1"):
        raising.fit()
    assert not (tmp_path / "model.safetensors").exists()


def test_models_and_options_that_do_not_fit_the_task_are_errors():
    reverse, hull, adding = _reverse(), build_task("convex_hull", max_n=6), build_task("adding")
    sequence_model = SequenceModel(d_input=2, d_model=4, head="regress", n_outputs=1, layer="gru")
    with pytest.raises(InputError, match="expected a Seq2Seq for the sequence-to-sequence task 'reverse'"):
        Trainer(sequence_model, reverse, _config())
    with pytest.raises(InputError, match="expected a PointerNetwork"):
        Trainer(_seq2seq(reverse), hull, _config())
    with pytest.raises(InputError, match="expected a SequenceModel for task 'adding'"):
        Trainer(_seq2seq(reverse), adding, _config())
    with pytest.raises(InputError, match="label_smoothing: expected 0.0 for task 'adding'"):
        Trainer(sequence_model, adding, _config(label_smoothing=0.1))
    with pytest.raises(InputError, match="model.tgt_vocab_size: expected"):
        Trainer(_seq2seq(build_task("reverse", n_symbols=7)), reverse, _config())
    pointer = PointerNetwork(seq2seq_config_for(hull, d_model=4))
    with pytest.raises(InputError, match="scheduled_sampling: expected 'none' for the pointer task"):
        Trainer(pointer, hull, _config(scheduled_sampling="linear"))


@pytest.mark.parametrize("field, value, needle", [
    ("label_smoothing", 1.0, "label_smoothing: expected a number in [0, 1)"),
    ("scheduled_sampling", "cosine", "scheduled_sampling: expected one of"),
    ("eval_beam", 0, "eval_beam: expected an int >= 1"),
])
def test_bad_seq2seq_train_options(field, value, needle):
    with pytest.raises(InputError) as error:
        TrainConfig(**{field: value})
    assert needle in str(error.value)


def test_bad_schedule_arguments_name_the_config_fields():
    with pytest.raises(InputError, match="^sampling_k: expected a number in \\(0, 1\\)"):
        TrainConfig(scheduled_sampling="exponential", sampling_k=2.0)
    with pytest.raises(InputError, match="^sampling_min: expected"):
        TrainConfig(scheduled_sampling="linear", sampling_min=-1.0)


def test_a_batch_that_is_not_a_seq2seq_batch_is_named():
    task = _reverse()
    wrong = type("Wrong", (), {"__getattr__": lambda self, name: getattr(task, name),
                               "train_batches": lambda self, *a, **k: itertools.repeat(object())})()
    with pytest.raises(InputError, match="expected Seq2SeqBatch batches"):
        Trainer(_seq2seq(task), wrong, _config(steps=1)).fit()


def test_a_checkpoint_written_before_the_seq2seq_fields_still_resumes(tmp_path):
    from rnnkit.train.state import check_same_run

    new_fields = ("label_smoothing", "scheduled_sampling", "sampling_k", "sampling_slope", "sampling_min", "eval_beam")
    current = {"train": TrainConfig().to_dict(), "model": {"d_model": 8}, "task": {"name": "adding"}}
    saved = json.loads(json.dumps({"train": {k: v for k, v in current["train"].items() if k not in new_fields},
                                   "model": {"d_model": 8}, "task": {"name": "adding"}}))  # as read back
    check_same_run(saved, current, tmp_path)  # absent fields had their defaults
    current["train"]["label_smoothing"] = 0.1
    with pytest.raises(InputError, match="train.label_smoothing: checkpoint 0.0, now 0.1"):
        check_same_run(saved, current, tmp_path)


def test_load_pretrained_names_what_it_expected(tmp_path):
    (tmp_path / "config.json").write_text('{"other": {}}')
    with pytest.raises(InputError, match=r"expected one of the entries \['model', 'pointer', 'seq2seq'\]"):
        load_pretrained(tmp_path)
    sequence_model = SequenceModel(vocab_size=5, d_model=4, layer="gru")
    sequence_model.save_pretrained(tmp_path / "lm")
    assert type(load_pretrained(tmp_path / "lm")) is SequenceModel
