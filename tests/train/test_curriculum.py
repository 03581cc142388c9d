"""Length curriculum: stages run in order on the same weights, with their own length and lr."""

from __future__ import annotations

import pytest
import torch

from rnnkit import InputError
from rnnkit.models import SequenceModel
from rnnkit.tasks import build_task
from rnnkit.train import TrainConfig
from rnnkit.train.curriculum import Stage, fit_length_curriculum


def tiny_model() -> SequenceModel:
    torch.manual_seed(0)
    return SequenceModel(d_input=2, d_model=8, head="regress", n_outputs=1, layer="lru", block="residual",
                         layer_options={"d_state": 4})


def test_stages_train_in_order_at_their_lengths(tmp_path):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(batch_size=4, warmup_steps=10, progress=False, log_every=10**9, eval_max_batches=1)
    results = fit_length_curriculum(model, build_task("adding", eval_examples=8), [(6, 3), Stage(12, 2, lr=1e-3)],
                                    config, out_dir=tmp_path)
    assert [r["seq_len"] for r in results] == [6, 12]
    assert [r["steps"] for r in results] == [3, 2]
    assert all("mse" in r["val"] for r in results)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage0-T6", "stage1-T12"]


def test_stage_configs_differ_only_where_the_stage_says(monkeypatch):
    seen = []

    class Recorder:
        def __init__(self, model, task, config, out_dir=None):
            seen.append(config)

        def fit(self):
            return {"steps": 0, "val": {}}

    monkeypatch.setattr("rnnkit.train.curriculum.Trainer", Recorder)
    base = TrainConfig(lr=3e-3, warmup_steps=100, seed=7, batch_size=5)
    fit_length_curriculum(tiny_model(), build_task("adding"), [(20, 600), (100, 50, 1e-3)], base)
    assert [(c.seq_len, c.steps, c.lr, c.warmup_steps, c.seed, c.batch_size) for c in seen] == [
        (20, 600, 3e-3, 100, 7, 5), (100, 50, 1e-3, 10, 7, 5)]


@pytest.mark.parametrize("stages, match", [
    ([], "stages"), ("20,100", "stages"), ([(20,)], r"stages\[0\]"), ([(20, 0)], "steps"), ([(0, 5)], "seq_len"),
    ([(20, 5, -1.0)], "lr"), ([[20, 5]], r"stages\[0\]"),
])
def test_bad_stages_raise(stages, match):
    with pytest.raises(InputError, match=match):
        fit_length_curriculum(tiny_model(), build_task("adding"), stages)
