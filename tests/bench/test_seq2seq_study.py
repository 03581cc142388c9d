"""benchmarks/seq2seq_study.py: its cells are valid `rnnkit train` commands, a quick study trains,
saves, reloads and scores every cell into resumable JSON lines, and position accuracy counts what it says."""

from __future__ import annotations

import json
import shlex

import pytest
import torch

from rnnkit.bench.grid import read_results
from rnnkit.cli import build_parser
from rnnkit.models import load_pretrained
from tests.bench.test_model_benchmarks import load


def test_position_hits_counts_reference_tokens_at_their_position():
    study = load("seq2seq_study")
    targets = torch.tensor([[5, 4, 2], [5, 4, 2], [6, 2, -100]])  # references, end token 2, padding -100
    tgt_lengths = torch.tensor([3, 3, 2])
    tokens = torch.tensor([[5, 4, 2, 0], [5, 3, 2, 0], [7, 2, 0, 0]])
    lengths = torch.tensor([3, 3, 2])
    assert study.position_hits(tokens, lengths, targets, tgt_lengths) == (3, 5)
    # An output that ended early misses the rest, and tokens past its length never count.
    short = torch.tensor([[5, 2, 0, 0], [5, 4, 2, 0], [6, 2, 0, 0]])
    assert study.position_hits(short, torch.tensor([2, 1, 2]), targets, tgt_lengths) == (3, 5)
    # Narrower outputs than references are padded with misses.
    assert study.position_hits(torch.tensor([[5], [5], [6]]), torch.tensor([1, 1, 1]), targets, tgt_lengths) == (3, 5)


@pytest.mark.parametrize("name", ["attention-length", "pointer", "g2p-layers"])
def test_every_cell_is_a_valid_train_command(name):
    study = load("seq2seq_study")
    args = study.parse_args([name, "--out", "unused.jsonl"])
    cells = study.STUDIES[name](args)
    assert len({c.key for c in cells}) == len(cells) > 0
    for cell in cells:
        parsed = build_parser().parse_args(["train", *cell.train_args])
        assert parsed.steps is not None and parsed.max_minutes is None  # a fixed step count, never a time budget
    if name == "attention-length":
        assert {(c.info["attention"], c.info["length"]) for c in cells} == {
            (a, n) for a in ("none", "additive") for n in (8, 16, 32)}


def test_quick_study_trains_scores_and_resumes(tmp_path, capsys):
    study = load("seq2seq_study")
    out = tmp_path / "results.jsonl"
    argv = ["attention-length", "--quick", "--lengths", "3", "--encoders", "lstm", "--out", str(out),
            "--runs", str(tmp_path / "runs"), "--threads", "1"]
    assert study.main(argv) == {"cells": 2, "ran": 2}
    rows = read_results(out)
    assert [r["key"] for r in rows] == ["reverse-n3-lstm-none", "reverse-n3-lstm-additive"]
    for row in rows:
        assert row["status"] == "ok" and row["steps"] == study.QUICK["steps"]
        assert 0 < row["train_cpu_seconds"] and 0 < row["train_seconds"] <= row["wall_seconds"]
        test = row["test"]["3"]
        assert 0 <= test["accuracy"] <= test["position_accuracy"] <= 1 and test["examples"] > 0
        assert row["command"].startswith("rnnkit train --task reverse") and "--threads 1" in row["command"]
        assert (tmp_path / "runs" / row["key"] / "model.safetensors").is_file()
    assert rows[0]["bridge"] == "copy" and rows[0]["decoder_state_size"] == 2 * study.QUICK["d_model"]
    # The recorded command is the run: parsed again, it asks for the same model and steps.
    again = build_parser().parse_args(shlex.split(rows[0]["command"])[1:])
    assert (again.model, again.attention, again.steps) == ("lstm", "none", study.QUICK["steps"])
    assert study.main(argv) == {"cells": 2, "ran": 0}  # finished cells are skipped
    assert len(read_results(out)) == 2
    assert "reverse-n3-lstm-additive" in capsys.readouterr().out


def test_quick_pointer_cell_scores_both_sizes(tmp_path):
    study = load("seq2seq_study")
    out = tmp_path / "pointer.jsonl"
    study.main(["pointer", "--quick", "--only", "convex_hull-n5", "--val-batches", "2", "--out", str(out),
                "--runs", str(tmp_path / "runs")])
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert "--eval-max-batches 2" in row["command"]  # the run's own val evaluation; the test scores one batch
    assert row["test"]["5"]["examples"] == 64
    assert set(row["test"]) == {"5", "10"} and "area_coverage" in row["test"]["10"]
    assert "position_accuracy" not in row["test"]["5"]  # a hull has one sequence, but its metric is the task's own
    assert load_pretrained(tmp_path / "runs" / row["key"]).config.mask_chosen is False  # the papers' setting
