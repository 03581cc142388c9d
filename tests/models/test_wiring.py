"""The one task -> model wiring: head, input kind and output sizes for every kind of task."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rnnkit import InputError
from rnnkit.models import ModelConfig, SequenceModel, model_config_for, task_io
from rnnkit.tasks import build_task


def _fake(**attrs):
    base = dict(name="fake", input_kind="features", vocab_size=None, d_input=None, target="classify",
                n_classes=None, d_output=None, n_heads=1)
    return SimpleNamespace(**{**base, **attrs})


@pytest.mark.parametrize(
    "task, expected",
    [
        # tokens in, a class per step out (language-model head)
        (_fake(input_kind="tokens", vocab_size=11, target="per_step", n_classes=11),
         {"head": "lm", "vocab_size": 11, "d_input": None, "n_outputs": 11}),
        # several per-step heads: H * n_classes logits
        (_fake(input_kind="tokens", vocab_size=5, target="per_step", n_classes=2, n_heads=3),
         {"head": "lm", "vocab_size": 5, "d_input": None, "n_outputs": 6}),
        # tokens in, one class per sequence
        (_fake(input_kind="tokens", vocab_size=3, target="classify", n_classes=2),
         {"head": "classify", "vocab_size": 3, "d_input": None, "n_outputs": 2}),
        # features in, one class per sequence
        (_fake(d_input=7, target="classify", n_classes=4),
         {"head": "classify", "vocab_size": None, "d_input": 7, "n_outputs": 4}),
        # features in, a regression target (n_classes is not used)
        (_fake(d_input=2, target="regress", d_output=3, n_classes=99),
         {"head": "regress", "vocab_size": None, "d_input": 2, "n_outputs": 3}),
    ],
    ids=["tokens-per_step", "tokens-per_step-multihead", "tokens-classify", "features-classify", "features-regress"],
)
def test_task_io_for_every_kind_of_task(task, expected):
    assert task_io(task) == expected
    config = model_config_for(task, d_model=8, layer="gru")
    assert {k: getattr(config, k) for k in expected} == expected
    assert (config.d_model, config.layer) == (8, "gru")


@pytest.mark.parametrize("name, options", [("adding", {}), ("parity", {}), ("copy", {}), ("n_parity", {"n": 3})])
def test_registered_tasks_get_a_model_the_trainer_accepts(name, options):
    from rnnkit.train import TrainConfig, Trainer

    task = build_task(name, **options)
    model = SequenceModel(model_config_for(task, d_model=4, layer="elman"))
    Trainer(model, task, TrainConfig(steps=1, batch_size=2, progress=False))  # checks the wiring


def test_a_mismatched_model_is_rejected_naming_the_field():
    from rnnkit.train import TrainConfig, Trainer

    task = build_task("adding")
    wrong = SequenceModel(ModelConfig(d_input=2, head="regress", n_outputs=2, d_model=4, layer="elman"))
    with pytest.raises(InputError, match=r"model.n_outputs: expected 1 for task 'adding', got 2"):
        Trainer(wrong, task, TrainConfig(steps=1, batch_size=2, progress=False))
    lm = SequenceModel(ModelConfig(d_input=2, head="lm", n_outputs=1, d_model=4, layer="elman"))
    with pytest.raises(InputError, match="model.head: expected 'regress'"):
        Trainer(lm, task, TrainConfig(steps=1, batch_size=2, progress=False))


def test_options_cannot_override_what_the_task_fixes():
    with pytest.raises(InputError, match=r"\['head'\]"):
        model_config_for(build_task("adding"), head="classify")


def test_an_unknown_target_is_an_input_error():
    with pytest.raises(InputError, match="task.target"):
        task_io(_fake(target="rank"))


def test_a_bidirectional_model_for_a_next_token_task_is_rejected():
    """A per-step (next-token) task's model must be causal: a bidirectional layer would read the answer."""
    from rnnkit.train import TrainConfig, Trainer

    task = build_task("copy")
    with pytest.raises(InputError, match=r"bidirectional: expected False for task 'copy'.*next token"):
        model_config_for(task, d_model=4, layer="gru", bidirectional=True)
    built = SequenceModel(ModelConfig(**task_io(task), d_model=4, layer="gru", bidirectional=True, block="residual"))
    with pytest.raises(InputError, match="bidirectional: expected False"):
        Trainer(built, task, TrainConfig(steps=1, batch_size=2, progress=False))
    # Sequence-level heads read the whole sequence before predicting: bidirectional is fine there.
    assert model_config_for(build_task("parity"), d_model=4, layer="gru", bidirectional=True).bidirectional


@pytest.mark.parametrize("name", ["reverse", "sort"])
def test_a_sequence_to_sequence_task_is_not_wired_to_a_sequence_model(name):
    with pytest.raises(InputError, match="sequence-to-sequence task"):
        model_config_for(build_task(name), d_model=4, layer="gru")
