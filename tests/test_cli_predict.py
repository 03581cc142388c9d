"""Users' own tables through the command line: train -> eval --input -> predict, with the training file gone."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from rnnkit.cli import main
from rnnkit.models import SequenceModel

pd = pytest.importorskip("pandas", reason="the data extra (pandas) is not installed")

TINY = ["--model", "gru", "--d-model", "8", "--steps", "4", "--batch-size", "4", "--no-progress"]


def table(n_ids: int = 16, seed: int = 0, holes: bool = False) -> "pd.DataFrame":
    """Ragged sequences in long format: a class per id, a number per id, per-step values and 0/1 labels."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_ids):
        for t in range(int(rng.integers(2, 7))):
            rows.append({"id": 100 + i, "t": t * 10, "a": rng.normal() + i % 2, "b": rng.normal(),
                         "kind": "odd" if i % 2 else "even", "size": 1.5 * i, "level": float(t),
                         "on": int(rng.random() < 0.5), "off": t % 2})
    frame = pd.DataFrame(rows)
    if holes:
        frame.loc[[1, 4], "b"] = np.nan
    return frame.sample(frac=1.0, random_state=seed)


def train(tmp_path, data, *options, name="run"):
    out = tmp_path / name
    argv = ["train", "--task", "sequences", "--task-opt", f"path={data}", "--task-opt", "time=t", *options,
            *TINY, "--out", str(out)]
    assert main(argv) == 0
    return out


def test_classify_train_eval_predict_after_the_file_is_gone(tmp_path, capsys):
    data = tmp_path / "train.csv"
    table(holes=True).to_csv(data, index=False)
    # Missing values are refused unless a policy is chosen, naming the column and the count.
    assert main(["train", "--task", "sequences", "--task-opt", f"path={data}", "--task-opt", "label=kind", *TINY,
                 "--out", str(tmp_path / "refused")]) == 2
    assert "column 'b': expected no missing values (missing='error'), got 2 missing" in capsys.readouterr().err
    out = train(tmp_path, data, "--task-opt", "label=kind", "--task-opt", "missing=ffill",
                "--task-opt", "features=a,b")
    assert "val: loss" in capsys.readouterr().out
    state = json.loads((out / "train.json").read_text())["task"]["state"]
    assert state["classes"] == ["even", "odd"] and state["features"] == ["a", "b"]
    data.unlink()  # everything the model needs travels with it
    labelled = tmp_path / "new.parquet"
    table(seed=1).to_parquet(labelled)
    assert main(["eval", "--checkpoint", str(out), "--input", str(labelled)]) == 0
    assert re.search(r"test: loss [\d.]+, accuracy [\d.]+ \(16 sequences", capsys.readouterr().out)
    unlabelled = tmp_path / "new.csv"
    table(seed=2).drop(columns=["kind"]).to_csv(unlabelled, index=False)
    predictions = tmp_path / "predictions.csv"
    assert main(["predict", "--checkpoint", str(out), "--input", str(unlabelled), "--out", str(predictions)]) == 0
    assert "16 prediction row(s) for 16 sequence(s)" in capsys.readouterr().out
    rows = pd.read_csv(predictions)
    assert list(rows.columns) == ["id", "predicted", "prob_even", "prob_odd"]
    assert sorted(rows["id"]) == list(range(100, 116)) and set(rows["predicted"]) <= {"even", "odd"}
    np.testing.assert_allclose(rows[["prob_even", "prob_odd"]].sum(axis=1), 1.0, rtol=1e-5)


def test_regression_from_npz_predicts_in_the_file_units(tmp_path, capsys):
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 6, size=20)
    x = rng.normal(size=(20, 5, 3))
    y = 1000 + 50 * x[:, 0, :1]  # (N, 1), far from 0: predictions must be de-standardised
    data = tmp_path / "train.npz"
    np.savez(data, x=x, y=y, lengths=lengths)
    out = train(tmp_path, data, "--task-opt", "target=regress", "--task-opt", "label=y")
    assert "mse" in capsys.readouterr().out
    new = tmp_path / "new.npz"
    np.savez(new, x=x[:7], lengths=lengths[:7])
    predictions = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(out), "--input", str(new), "--out", str(predictions)]) == 0
    rows = pd.read_csv(predictions)
    assert list(rows.columns) == ["id", "pred_y"] and len(rows) == 7
    assert (rows["pred_y"] > 800).all()  # the training targets' scale


def test_per_step_multilabel_and_forecast_write_one_row_per_step(tmp_path, capsys):
    data = tmp_path / "train.parquet"
    frame = table()
    frame.to_parquet(data)
    out = train(tmp_path, data, "--task-opt", "target=multilabel", "--task-opt", "label=on,off",
                "--task-opt", "features=a,b", name="multi")
    assert "f1" in capsys.readouterr().out
    predictions = tmp_path / "multi.csv"
    assert main(["predict", "--checkpoint", str(out), "--input", str(data), "--out", str(predictions)]) == 0
    rows = pd.read_csv(predictions)
    assert list(rows.columns) == ["id", "time", "pred_on", "pred_off", "prob_on", "prob_off"] and len(rows) == len(frame)
    first = rows[rows["id"] == 100]
    assert first["time"].tolist() == sorted(frame[frame["id"] == 100]["t"])
    # ... and exports: the exported forward gives the model's per-step label logits.
    exported = tmp_path / "multi-exported"
    assert main(["export", "--checkpoint", str(out), "--out", str(exported)]) == 0
    artefacts = json.loads((exported / "manifest.json").read_text())["artefacts"]
    assert {"forward.pt2", "step.pt2"} <= set(artefacts)
    model = SequenceModel.from_pretrained(out).eval()
    seq_len = artefacts["forward.pt2"]["seq_len"]  # the length the run trained at
    x, lengths = torch.randn(3, seq_len, 2), torch.tensor([seq_len, 3, 1])
    with torch.no_grad():
        expected, state = model(x, lengths=lengths)
        got = torch.export.load(exported / "forward.pt2").module()(x, lengths)
    assert expected.shape == (3, seq_len, 2)
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-5)
    step, leaves = torch.export.load(exported / "step.pt2").module(), got[1:]
    for x_t in torch.randn(2, 3, 2):
        with torch.no_grad():
            logits, state = model.step(x_t, state)
            got_logits, *leaves = step(x_t, *leaves)
        torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-5)
    forecast = train(tmp_path, data, "--task-opt", "target=forecast", "--task-opt", "features=a,b", name="forecast")
    assert main(["predict", "--checkpoint", str(forecast), "--input", str(data), "--out", str(predictions)]) == 0
    rows = pd.read_csv(predictions)
    assert list(rows.columns) == ["id", "time", "pred_a", "pred_b"] and len(rows) == len(frame)
    assert main(["train", "--task", "sequences", "--task-opt", f"path={data}", "--task-opt", "target=forecast",
                 "--bidirectional", *TINY, "--out", str(tmp_path / "bi")]) == 2
    assert "bidirectional: expected False" in capsys.readouterr().err


def test_predict_errors(tmp_path, capsys):
    run = tmp_path / "parity"
    assert main(["train", "--task", "parity", *TINY, "--seq-len", "6", "--out", str(run),
                 "--task-opt", "eval_examples=8"]) == 0
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(run), "--input", "x.csv", "--out", str(tmp_path / "p.csv")]) == 2
    assert "expected a model trained on a file (task sequences), got task 'parity'" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run), "--input", "x.csv"]) == 2
    assert "--input: expected a model trained on a file" in capsys.readouterr().err
    data = tmp_path / "train.csv"
    table().to_csv(data, index=False)
    out = train(tmp_path, data, "--task-opt", "label=kind")
    capsys.readouterr()
    other = tmp_path / "other.csv"
    table().rename(columns={"a": "alpha"}).to_csv(other, index=False)
    assert main(["predict", "--checkpoint", str(out), "--input", str(other), "--out", str(tmp_path / "p.csv")]) == 2
    assert "features: expected columns of other.csv" in capsys.readouterr().err
    unseen = tmp_path / "unseen.csv"
    table().replace({"kind": {"odd": "strange"}}).to_csv(unseen, index=False)
    assert main(["eval", "--checkpoint", str(out), "--input", str(unseen)]) == 2
    assert "label: expected one of the training classes ['even', 'odd'], got 'strange'" in capsys.readouterr().err

