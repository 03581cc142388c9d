"""``rnnkit bench extrapolation``: one run's measurements, the resumable grid, its summary and errors
(tiny budgets; the measured finding is in docs/findings.md)."""

from __future__ import annotations

import json

import pytest

from rnnkit import InputError
from rnnkit.bench.extrapolation import extrapolation_run, run_extrapolation_grid, summary_table
from rnnkit.cli import main

TINY = {"num_heads": 1, "gate_rank": 2}


def test_a_run_reports_accuracy_at_the_training_length_and_beyond():
    parity = extrapolation_run("gla", "parity", allow_neg_eigval=True, steps=2, train_len=4, factor=3,
                               eval_examples=40, d_model=4, **TINY)
    assert set(parity) == {"train_len", "long", "params", "seconds"}
    assert 0 <= parity["train_len"] <= 1 and 0 <= parity["long"] <= 1
    # A per-step task also reports its last step; every one of the 40 x 12 steps is scored.
    mod = extrapolation_run("gla", "modular_sum", task_options={"modulus": 3}, steps=2, train_len=4, factor=3,
                            eval_examples=40, d_model=4, **TINY)
    assert set(mod) == {"train_len", "long", "long_last", "params", "seconds"}
    assert (mod["long"] * 40 * 12) == pytest.approx(round(mod["long"] * 40 * 12))
    assert (mod["long_last"] * 40) == pytest.approx(round(mod["long_last"] * 40))


def test_same_seed_same_result_and_the_option_reaches_the_layer():
    a = extrapolation_run("gla", steps=3, train_len=4, eval_examples=20, d_model=4, seed=1, **TINY)
    b = extrapolation_run("gla", steps=3, train_len=4, eval_examples=20, d_model=4, seed=1, **TINY)
    assert a["long"] == b["long"] and a["train_len"] == b["train_len"]
    with pytest.raises(InputError, match="allow_neg_eigval: expected a bool"):
        extrapolation_run("gla", allow_neg_eigval="yes", steps=1, d_model=4, **TINY)


def test_the_grid_runs_both_eigenvalue_ranges_once_and_resumes(tmp_path):
    out = tmp_path / "x.jsonl"
    logged: list[str] = []
    rows = run_extrapolation_grid(["gla:num_heads=1:gate_rank=2"], ["parity"], [0], out, steps=2, train_len=4,
                                  log=logged.append)
    assert [r["allow_neg_eigval"] for r in rows] == [False, True] and len(logged) == 2
    assert {r["test_len"] for r in rows} == {16} and all(r["layer_options"] == TINY for r in rows)
    again = run_extrapolation_grid(["gla:num_heads=1:gate_rank=2"], ["parity"], [0], out, steps=2, train_len=4,
                                   log=logged.append)
    assert again == rows and len(logged) == 2  # nothing ran twice
    table = summary_table(rows).splitlines()
    assert len(table) == 4 and table[2].startswith("| gla:num_heads=1:gate_rank=2 | parity | False | 2 | 1 |")


@pytest.mark.parametrize(
    "models, tasks, match",
    [
        (["gla:allow_neg_eigval=True"], ["parity"], "expected no allow_neg_eigval"),
        (["gla"], ["parity:seq_len=8"], "expected no seq_len"),
        (["nope"], ["parity"], "layer: expected one of"),
        (["gla"], ["parity:modulus=3"], "expected options from"),
    ],
)
def test_bad_grids_are_clear_errors(tmp_path, models, tasks, match):
    with pytest.raises(InputError, match=match):
        run_extrapolation_grid(models, tasks, [0], tmp_path / "x.jsonl", steps=1)
    assert not (tmp_path / "x.jsonl").exists()


def test_cli_runs_the_grid_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    argv = ["bench", "extrapolation", "--models", "gla:num_heads=1:gate_rank=2", "--tasks", "modular_sum:modulus=2",
            "--seeds", "0", "--steps", "1", "--train-len", "3", "--factor", "2", "--out", str(out), "--threads", "1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| gla:num_heads=1:gate_rank=2 | modular_sum:modulus=2 | True | 1 | 1 |" in text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["task"], r["test_len"], r["threads"]) for r in rows] == [("modular_sum", 6, 1)] * 2


def test_a_run_stopped_early_is_not_recorded(tmp_path, monkeypatch):
    """A stop signal (or any early stop) leaves a model trained fewer steps than the row would claim."""
    from rnnkit.train import Trainer

    monkeypatch.setattr(Trainer, "_out_of_time", lambda self: self.step >= 1)
    out = tmp_path / "x.jsonl"
    with pytest.raises(RuntimeError, match="training stopped at step 1 of 3"):
        run_extrapolation_grid(["gla:num_heads=1:gate_rank=2"], ["parity"], [0], out, steps=3, train_len=4)
    assert not out.exists()
