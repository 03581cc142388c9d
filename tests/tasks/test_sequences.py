"""The `sequences` task (users' own CSV/Parquet/NPZ files), `collate_sequences` and `DatasetTask`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rnnkit.errors import InputError
from rnnkit.models import SequenceModel, model_config_for
from rnnkit.tasks import (
    IGNORE_INDEX, DatasetTask, build_task, collate_sequences, restore_task, task_description,
)
from rnnkit.train import TrainConfig, Trainer

pd = pytest.importorskip("pandas", reason="the data extra (pandas) is not installed")


def long_table(n_ids: int = 24, seed: int = 0) -> "pd.DataFrame":
    """Ragged sequences in long format, rows shuffled: id, time t, features a, b, a class label (text),
    a per-sequence number r, per-step values v and two per-step 0/1 labels m0, m1."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_ids):
        up = i % 2 == 1
        for t in range(int(rng.integers(3, 9))):
            rows.append({"id": f"s{i}", "t": t, "a": rng.normal() + (2.0 if up else -2.0), "b": rng.normal() * 3 + 10,
                         "label": "up" if up else "down", "r": float(i % 3), "v": float(t), "m0": int(up),
                         "m1": t % 2})
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)


@pytest.fixture
def csv_path(tmp_path):
    path = tmp_path / "data.csv"
    long_table().to_csv(path, index=False)
    return path


def task_on(path, **options):
    return build_task("sequences", path=str(path), time="t", features="a,b", **options)


def test_classify_from_a_csv_table(csv_path):
    task = task_on(csv_path, label="label")
    assert task.target == "classify" and task.classes == ["down", "up"] and task.d_input == 2 and task.n_classes == 2
    table = long_table()
    sizes = table.groupby("id").size()
    assert task.default_seq_len == sizes.max()
    assert sum(task.split_size(s) for s in ("train", "val", "test")) == len(sizes)
    batch = next(task.eval_batches("test", batch_size=64))
    x, y = batch.x, batch.y
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[0] == task.split_size("test")
    # Each sequence's steps come back in time order (the rows are shuffled), normalised, with its class.
    test_ids = task._assign(list(table["id"].unique()))["test"]
    for row, id_ in enumerate(test_ids):
        rows = table[table["id"] == id_].sort_values("t")
        expected = (rows[["a", "b"]].to_numpy() - task.mean) / task.std
        n = len(rows)
        assert torch.allclose(x[row, :n], torch.tensor(expected, dtype=torch.float32), atol=1e-6)
        assert task.classes[int(y[row])] == rows["label"].iloc[0]


def test_splits_are_by_id_deterministic_and_disjoint(csv_path, tmp_path):
    task = task_on(csv_path, label="label", val_fraction=0.25, test_fraction=0.25)
    splits = task._assign(sorted(long_table()["id"].unique()))
    assert set(splits["train"]).isdisjoint(splits["val"]) and set(splits["train"]).isdisjoint(splits["test"])
    assert len(splits["test"]) == 6 and len(splits["val"]) == 6
    # The same ids in another row order land in the same splits.
    shuffled = tmp_path / "shuffled.csv"
    long_table().sample(frac=1.0, random_state=5).to_csv(shuffled, index=False)
    again = task_on(shuffled, label="label", val_fraction=0.25, test_fraction=0.25)
    assert {s: set(v) for s, v in again._assign(list(long_table()["id"].unique())).items()} == \
        {s: set(v) for s, v in splits.items()}
    explicit = task_on(csv_path, label="label", test_ids="s1,s2")
    assert sorted(explicit._assign(list(long_table()["id"].unique()))["test"]) == ["s1", "s2"]
    with pytest.raises(InputError, match=r"test_ids: expected ids of .*unknown \['nope'\]"):
        task_on(csv_path, label="label", test_ids=["nope"])


def test_normalisation_is_fitted_on_the_training_split_only(csv_path):
    task = task_on(csv_path, label="label")
    table = long_table()
    train_ids = set(task._assign(list(table["id"].unique()))["train"])
    rows = table[table["id"].isin(train_ids)]
    np.testing.assert_allclose(task.mean, rows[["a", "b"]].mean().to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(task.std, rows[["a", "b"]].std(ddof=0).to_numpy(), rtol=1e-12)
    everything = table[["a", "b"]].mean().to_numpy()
    assert not np.allclose(task.mean, everything)  # the val/test rows would move it


def test_batches_are_deterministic_ragged_and_resumable(csv_path):
    task = task_on(csv_path, label="label")
    first = [next(task.train_batches(4, seed=3, start=k)) for k in range(12)]  # past one epoch (18 // 4 = 4)
    stream = task.train_batches(4, seed=3)
    for expected in first:
        got = next(stream)
        assert torch.equal(got.x, expected.x) and torch.equal(got.y, expected.y)
        assert (got.lengths is None) or torch.equal(got.lengths, expected.lengths)
    others = [next(task.train_batches(4, seed=4, start=k)) for k in range(4)]
    assert [b.y.tolist() for b in others] != [b.y.tolist() for b in first[:4]] or \
        [b.x.shape for b in others] != [b.x.shape for b in first[:4]]
    # One epoch (4 batches of 4 of the 18 training ids) holds 16 distinct sequences.
    seen = {tuple(b.x[row, 0].tolist()) for b in first[:4] for row in range(4)}
    assert len(seen) == 16
    ragged = next(b for b in first if b.lengths is not None)
    assert int(ragged.lengths.max()) == ragged.x.shape[1]
    for row, n in enumerate(ragged.lengths.tolist()):
        assert torch.all(ragged.x[row, n:] == 0)
    assert next(task.train_batches(4, seq_len=12)).x.shape[1] == 12
    with pytest.raises(InputError, match="seq_len: expected None or at least the longest"):
        next(task.train_batches(4, seq_len=2))


def test_parquet_and_npz_read_like_csv(csv_path, tmp_path):
    parquet = tmp_path / "data.parquet"
    pd.read_csv(csv_path).to_parquet(parquet)
    a, b = task_on(csv_path, label="label"), task_on(parquet, label="label")
    assert torch.equal(next(a.train_batches(4)).x, next(b.train_batches(4)).x)
    # The same sequences as arrays: x (N, T, D) right-padded, y (N,), lengths (N,).
    table = long_table().sort_values(["id", "t"])
    groups = [g for _, g in table.groupby("id")]
    steps = max(len(g) for g in groups)
    x = np.zeros((len(groups), steps, 2))
    for i, g in enumerate(groups):
        x[i, : len(g)] = g[["a", "b"]].to_numpy()
    npz = tmp_path / "data.npz"
    np.savez(npz, x=x, y=np.array([g["r"].iloc[0] for g in groups]), lengths=np.array([len(g) for g in groups]),
             ids=np.array([g["id"].iloc[0] for g in groups]))
    arrays = build_task("sequences", path=str(npz), target="regress", label="y")
    assert arrays.d_input == 2 and arrays.d_output == 1 and arrays.features == ["x0", "x1"]
    np.testing.assert_allclose(arrays.mean, a.mean, rtol=1e-10)  # same ids, same split, same statistics
    rows = build_task("sequences", path=str(csv_path), time="t", features="a,b", target="regress", label="r")
    forecast = build_task("sequences", path=str(npz), target="forecast")
    assert forecast.d_output == forecast.d_input == 2  # the features forecast themselves; y is not read
    # The same test sequences (each split keeps its file's order: sorted ids in the arrays, first appearance in the table).
    assert torch.allclose(next(arrays.eval_batches("test", 64)).y.sort(0).values,
                          next(rows.eval_batches("test", 64)).y.sort(0).values)


def test_per_step_targets(csv_path):
    multi = task_on(csv_path, label="m0,m1", target="multilabel")
    batch = next(multi.eval_batches("val", 64))
    assert multi.target == "multilabel" and multi.n_classes == 2 and batch.y.dtype == torch.float32
    assert batch.y.shape == (*batch.x.shape[:2], 2) and set(batch.y.unique().tolist()) <= {0.0, 1.0}
    steps = task_on(csv_path, label="label", target="per_step")
    batch = next(steps.eval_batches("val", 64))
    assert batch.y.shape == batch.x.shape[:2] and batch.y.dtype == torch.int64
    if batch.lengths is not None:
        for row, n in enumerate(batch.lengths.tolist()):
            assert torch.all(batch.y[row, n:] == IGNORE_INDEX)
    values = task_on(csv_path, label="v", target="regress_per_step")
    assert next(values.eval_batches("val", 64)).y.shape[-1] == 1 and values.d_output == 1


def test_forecast_predicts_the_next_step(csv_path):
    task = task_on(csv_path, target="forecast")
    assert task.target == "regress_per_step" and task.predicts_next_step and task.d_output == task.d_input == 2
    x, y = task.data["train"][0]
    assert x.shape == y.shape and torch.allclose(x[1:], y[:-1])  # y_t is x_{t+1} (same statistics)
    with pytest.raises(InputError, match="bidirectional: expected False"):
        model_config_for(task, d_model=4, layer="gru", bidirectional=True)


def test_missing_values_policies(tmp_path):
    table = long_table()
    table.loc[[0, 5, 9], "a"] = np.nan
    path = tmp_path / "holes.csv"
    table.to_csv(path, index=False)
    with pytest.raises(InputError, match=r"column 'a': expected no missing values \(missing='error'\), got 3 missing"):
        task_on(path, label="label")
    dropped = task_on(path, label="label", missing="drop")
    filled = task_on(path, label="label", missing="ffill")
    zeros = task_on(path, label="label", missing="zero")
    rows = lambda t: sum(len(x) for s in ("train", "val", "test") for x, _ in t.data[s])  # noqa: E731
    assert rows(dropped) == len(table) - 3 and rows(filled) == rows(zeros) == len(table)
    for task in (dropped, filled, zeros):
        assert all(torch.isfinite(x).all() for s in ("train", "val", "test") for x, _ in task.data[s])
    # A per-sequence label cannot be invented: only dropping helps.
    table = long_table()
    table.loc[table["id"] == "s3", "label"] = np.nan
    table.to_csv(path, index=False)
    with pytest.raises(InputError, match="column 'label'"):
        task_on(path, label="label", missing="zero")
    assert "s3" not in sum((task_on(path, label="label", missing="drop")._assign(
        [v for v in long_table()["id"].unique() if v != "s3"])[s] for s in ("train", "test")), [])


def test_restore_needs_no_training_file(csv_path, tmp_path):
    task = task_on(csv_path, label="label")
    description = json.loads(json.dumps(task_description(task)))
    new = tmp_path / "new.csv"
    long_table(seed=1).drop(columns=["label"]).to_csv(new, index=False)
    csv_path.unlink()
    restored = restore_task(description)
    assert restored.classes == task.classes and restored.d_input == task.d_input
    np.testing.assert_allclose(restored.mean, task.mean)
    model = SequenceModel(model_config_for(restored, d_model=8, layer="gru"))
    table = restored.predict(model, new)
    assert list(table.columns) == ["id", "predicted", "prob_down", "prob_up"] and len(table) == 24
    assert set(table["predicted"]) <= {"down", "up"}
    np.testing.assert_allclose(table[["prob_down", "prob_up"]].sum(axis=1), 1.0, rtol=1e-5)
    with pytest.raises(InputError, match="expected an existing file"):
        next(restored.train_batches(4))


def test_bad_options_and_files_are_input_errors(csv_path, tmp_path):
    with pytest.raises(InputError, match="path: expected a file ending in"):
        build_task("sequences", path="data.txt", label="y")
    with pytest.raises(InputError, match=r"label: expected columns of data.csv .*missing \['nope'\]"):
        task_on(csv_path, label="nope")
    with pytest.raises(InputError, match="label: expected the label column"):
        task_on(csv_path)
    with pytest.raises(InputError, match="target: expected one of"):
        task_on(csv_path, label="label", target="rank")
    with pytest.raises(InputError, match="features: expected numeric column 'label'"):
        build_task("sequences", path=str(csv_path), features="a,label", label="r", target="regress")
    with pytest.raises(InputError, match="val_fraction \\+ test_fraction: expected less than 1"):
        task_on(csv_path, label="label", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(InputError, match="expected 0/1 values in column 'v'"):
        task_on(csv_path, label="m0,v", target="multilabel")
    table = long_table()
    table.loc[table["id"] == "s2", "label"] = ["up", "down"] + ["up"] * (int((table["id"] == "s2").sum()) - 2)
    bad = tmp_path / "bad.csv"
    table.to_csv(bad, index=False)
    with pytest.raises(InputError, match="expected one 'label' value per sequence, got .* for id 's2'"):
        task_on(bad, label="label")
    pd.concat([long_table(), long_table().iloc[:1]]).to_csv(bad, index=False)
    with pytest.raises(InputError, match="time: expected one row per \\(id, time\\)"):
        task_on(bad, label="label")


# ---------------------------------------------------------------------------------------------- collate


def test_collate_sequences_pads_every_target_kind():
    x = [torch.randn(3, 2), torch.randn(1, 2)]
    batch = collate_sequences([(x[0], 1), (x[1], 0)], target="classify")
    assert batch.x.shape == (2, 3, 2) and batch.y.tolist() == [1, 0] and batch.lengths.tolist() == [3, 1]
    assert torch.equal(batch.x[1, 1:], torch.zeros(2, 2))
    steps = collate_sequences([{"x": x[0], "y": [1, 2, 0]}, {"x": x[1], "y": [2]}], target="per_step")
    assert steps.y.tolist() == [[1, 2, 0], [2, IGNORE_INDEX, IGNORE_INDEX]]
    values = collate_sequences([(x[0], torch.ones(3, 4)), (x[1], torch.ones(1, 4))], target="multilabel")
    assert values.y.shape == (2, 3, 4) and values.y.dtype == torch.float32 and values.y[1, 1:].eq(0).all()
    padded = collate_sequences([(torch.randn(5, 2), [0.5], 2), (torch.randn(5, 2), [1.5], 5)], target="regress")
    assert padded.x.shape == (2, 5, 2) and padded.lengths.tolist() == [2, 5] and padded.y.shape == (2, 1)
    same = collate_sequences([(x[0], 1), (x[0], 0)], target="classify")
    assert same.lengths is None
    tokens = collate_sequences([([1, 2, 3], [2, 3, 4]), ([5], [6])], target="per_step")
    assert tokens.x.dtype == torch.int64 and tokens.x.tolist() == [[1, 2, 3], [5, 0, 0]]
    with pytest.raises(InputError, match=r"items\[1\]: expected \(x, y\)"):
        collate_sequences([(x[0], 1), x[1]], target="classify")
    with pytest.raises(InputError, match=r"items\[1\].y: expected a per-step target with at least 3 steps"):
        collate_sequences([(x[1], [1]), (x[0], [1])], target="per_step")
    with pytest.raises(InputError, match=r"items\[1\].x: expected the trailing shape"):
        collate_sequences([(x[0], 1), (torch.randn(2, 3), 0)], target="classify")


# ---------------------------------------------------------------------------------------------- DatasetTask


def ragged_examples(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        steps = 2 + i % 7
        label = i % 2
        out.append((torch.randn(steps, 3, generator=gen) + (1.0 if label else -1.0), label))
    return out


def test_dataset_task_trains_deterministically():
    data = ragged_examples(40)
    task = DatasetTask(data[:30], val=data[30:], target="classify", n_classes=2, pool_batches=2)
    assert task.d_input == 3 and json.dumps(task.options)
    a = [next(task.train_batches(8, seed=1, start=k)) for k in range(5)]  # past one epoch (30 // 8 = 3)
    stream = task.train_batches(8, seed=1)
    for expected in a:
        got = next(stream)
        assert torch.equal(got.x, expected.x) and torch.equal(got.y, expected.y)
    torch.manual_seed(0)
    model = SequenceModel(model_config_for(task, d_model=8, layer="gru"))
    result = Trainer(model, task, TrainConfig(steps=40, batch_size=8, lr=1e-2, warmup_steps=0, progress=False)).fit()
    assert result["val"]["accuracy"] >= 0.8
    restored = restore_task(json.loads(json.dumps(task_description(task))))
    assert isinstance(restored, DatasetTask) and restored.n_classes == 2
    with pytest.raises(InputError, match="a task restored from a saved model has no data sets"):
        next(restored.eval_batches("val", 4))
    with pytest.raises(InputError, match="n_classes: expected"):
        DatasetTask(data, target="classify")


def test_a_hugging_face_dataset_trains():
    datasets = pytest.importorskip("datasets", reason="the data extra (datasets) is not installed")
    rows = {"x": [x.tolist() for x, _ in ragged_examples(24)], "y": [y for _, y in ragged_examples(24)]}
    hf = datasets.Dataset.from_dict(rows).with_format("torch")
    split = hf.train_test_split(test_size=0.25, seed=0)
    task = DatasetTask(split["train"], val=split["test"], target="classify", n_classes=2)
    batch = next(task.train_batches(4))
    assert batch.x.dtype == torch.float32 and batch.x.shape[-1] == 3 and batch.y.dtype == torch.int64
    model = SequenceModel(model_config_for(task, d_model=8, layer="gru"))
    result = Trainer(model, task, TrainConfig(steps=3, batch_size=4, progress=False)).fit()
    assert set(result["val"]) == {"loss", "accuracy"}
