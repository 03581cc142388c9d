"""Target kinds (rnnkit.targets): one table for heads, losses, metrics and y; the Trainer's check of y."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rnnkit.errors import InputError
from rnnkit.models import ModelConfig, SequenceModel, model_config_for
from rnnkit.models.wiring import HEAD_FOR_TARGET
from rnnkit.targets import HEADS, PER_STEP_HEADS, TARGET_KINDS, TARGETS, check_target, loss_and_counts, summarise
from rnnkit.tasks import Batch, DatasetTask, Task
from rnnkit.tasks.base import TARGETS as TASK_TARGETS
from rnnkit.train import TrainConfig, Trainer
from rnnkit.train.metrics import empty_totals


def test_one_table_feeds_tasks_models_and_wiring():
    assert TASK_TARGETS == TARGETS == tuple(TARGET_KINDS)
    assert set(HEADS) == set(HEAD_FOR_TARGET.values()) and set(PER_STEP_HEADS) == {"lm", "regress_per_step", "multilabel"}
    for kind in TARGET_KINDS.values():
        width = {"d_input": 3, "n_outputs": 3} if kind.head != "lm" else {"vocab_size": 3}
        model = SequenceModel(ModelConfig(head=kind.head, d_model=4, layer="gru", **width))
        out, _ = model(torch.randn(2, 5, 3) if kind.head != "lm" else torch.zeros(2, 5, dtype=torch.long))
        assert out.shape == ((2, 5, 3) if kind.per_step else (2, 3)), kind.name


def ragged(batch=3, steps=6, width=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 2, 4])[:batch]
    return torch.randn(batch, steps, width, generator=gen, requires_grad=True), lengths, gen


def test_real_per_step_loss_is_masked_and_nan_padding_cannot_poison_it():
    out, lengths, gen = ragged()
    y = torch.randn(3, 6, 4, generator=gen)
    y[1, 2:] = float("nan")  # padding
    y[2, 4:] = float("inf")
    y[0, 3, 1] = float("nan")  # a valid step without this target
    loss, counts = loss_and_counts(out, y, lengths, "regress_per_step")
    mask = (torch.arange(6) < lengths[:, None])[..., None] & torch.isfinite(y)
    expected = ((out - y)[mask] ** 2).mean()
    assert torch.allclose(loss, expected) and counts["count"] == int(mask.sum()) == (12 * 4 - 1)
    loss.backward()
    assert torch.isfinite(out.grad).all() and out.grad[1, 2:].abs().sum() == 0


def test_multilabel_loss_sums_labels_and_averages_steps():
    out, lengths, gen = ragged()
    y = (torch.rand(3, 6, 4, generator=gen) > 0.5).float()
    y[1, 2:] = float("nan")
    loss, counts = loss_and_counts(out, y, lengths, "multilabel")
    valid = torch.arange(6) < lengths[:, None]  # (B, T)
    per_step = F.binary_cross_entropy_with_logits(out[valid], y[valid], reduction="none").sum(-1)  # (steps,)
    assert torch.allclose(loss, per_step.mean()) and counts["count"] == int(valid.sum()) == 12
    predicted, actual = out[valid] > 0, y[valid] > 0.5
    assert counts["correct"] == int((predicted == actual).sum()) and counts["total"] == 48
    assert counts["tp"] == int((predicted & actual).sum()) and counts["fn"] == int((~predicted & actual).sum())
    loss.backward()
    assert torch.isfinite(out.grad).all()
    totals = {k: counts[k] for k in empty_totals()}
    metrics = summarise(totals, ("loss", "accuracy", "f1"))
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    assert metrics["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert metrics["accuracy"] == pytest.approx(counts["correct"] / 48)
    assert summarise(dict(totals, loss_sum=math.log(2) * totals["count"]), ("loss", "bpc"))["bpc"] == pytest.approx(1.0)


class FloatStepsAsClasses(Task):
    """Declares classes per step but yields float targets: the mix-up the Trainer must catch."""

    input_kind = "features"
    d_input = 2
    target = "per_step"
    n_classes = 3
    default_seq_len = 4
    name = "float_steps"

    def train_batches(self, batch_size, seq_len=None, seed=0, start=0):
        while True:
            yield Batch(torch.randn(batch_size, 4, 2), torch.rand(batch_size, 4, 3), None)

    def eval_batches(self, split, batch_size, seq_len=None):
        yield Batch(torch.randn(batch_size, 4, 2), torch.rand(batch_size, 4, 3), None)


def test_the_trainer_checks_y_against_the_declared_target_at_the_first_batch():
    task = FloatStepsAsClasses()
    model = SequenceModel(model_config_for(task, d_model=4, layer="gru"))
    trainer = Trainer(model, task, TrainConfig(steps=2, batch_size=2, progress=False))
    message = r"task 'float_steps': expected int64 y of shape \(B=2, T=4\) or \(B=2, T=4, H=1\) for target 'per_step', got"
    with pytest.raises(InputError, match=message + r".*float32"):
        trainer.fit()
    assert trainer.step == 0  # no step was taken on a misread target
    with pytest.raises(InputError, match="task 'float_steps': expected int64 y"):
        trainer.evaluate("val")


def test_check_target_names_the_width():
    task = DatasetTask([(torch.randn(3, 2), torch.ones(3, 5))], target="multilabel", n_classes=5)
    check_target(task, torch.zeros(4, 3, 2), torch.zeros(4, 3, 5))
    with pytest.raises(InputError, match=r"expected float32 y of shape \(B=4, T=3, W=5\) for target 'multilabel'"):
        check_target(task, torch.zeros(4, 3, 2), torch.zeros(4, 3, 4))
    with pytest.raises(InputError, match="float32 y"):
        check_target(task, torch.zeros(4, 3, 2), torch.zeros(4, 3, 5, dtype=torch.long))


@pytest.mark.parametrize("target", ["regress_per_step", "multilabel"])
def test_per_step_feature_targets_train(target):
    gen = torch.Generator().manual_seed(0)
    items = []
    for i in range(24):
        x = torch.randn(3 + i % 5, 2, generator=gen)
        y = (x > 0).float() if target == "multilabel" else x.cumsum(0)
        items.append((x, y))
    options = {"n_classes": 2} if target == "multilabel" else {}
    task = DatasetTask(items, target=target, **options)
    torch.manual_seed(0)
    model = SequenceModel(model_config_for(task, d_model=16, layer="gru"))
    before = Trainer(model, task, TrainConfig(steps=1, batch_size=8, progress=False)).evaluate("val")
    after = Trainer(model, task, TrainConfig(steps=60, batch_size=8, lr=2e-2, warmup_steps=0, progress=False)).fit()
    assert after["val"]["loss"] < 0.5 * before["loss"]
