"""Encoder-decoder studies, each cell one `rnnkit train` command followed by a greedy test evaluation.

    python benchmarks/seq2seq_study.py attention-length --threads 1 --out attention_length.jsonl
    python benchmarks/seq2seq_study.py pointer --threads 1 --out pointer.jsonl
    python benchmarks/seq2seq_study.py g2p-layers --threads 1 --out g2p_layers.jsonl
    python benchmarks/seq2seq_study.py attention-length --quick --out quick.jsonl     # a check that it runs

Studies:

- ``attention-length``: the ``reverse`` task at fixed source lengths (``--lengths``), each encoder
  layer (``--encoders``, also the decoder) with ``--attention none`` (the decoder sees the source only
  through the encoder's final state, copied into it: Sutskever et al. 2014) and with additive attention
  (Bahdanau et al. 2015); width 64, unidirectional encoder, the same ``--steps`` in every cell.
- ``pointer``: pointer networks on ``convex_hull`` trained at n = 5 and at n = 10 (Vinyals et al.
  2015), each tested at n = 5 and 10, and on ``sort`` of 10 numbers with the Read-Process-Write
  encoder (5 process steps; Vinyals et al. 2016) and with a recurrent encoder reading the numbers in
  their given order; batches of 128, every element choosable at every step (``--no-mask-chosen``, the
  papers' setting), and one short sort run with chosen elements masked (the library's default).
- ``g2p-layers``: the G2P recipe (``G2P_DEFAULTS`` of ``rnnkit train --task g2p``) with each layer of
  ``--layers`` as encoder and decoder, ``--steps`` steps each, scored on the whole test split.

Every cell runs ``rnnkit train`` in this process (``rnnkit.cli.main``) with ``--steps`` fixed, so
the machine's load changes its wall time and nothing else; the model is saved under ``--runs``
(``runs/seq2seq_study/<cell>``, kept for ``rnnkit eval`` and ``rnnkit translate``). Each result is one
JSON line appended to ``--out``, holding the cell's exact ``rnnkit train`` command (``command``), the
run's step count, training seconds (wall; ``train_cpu_seconds`` is this process's CPU time for
training, the val evaluation and saving, which other load on the machine hardly changes), val
metrics, and ``test``: for each test size (``"all"`` for the task's own test split) the task's
metrics of greedy decoding, plus ``position_accuracy`` where a target has a single reference (the
share of the reference's tokens, the end token excluded, that the output has at the same position).
A rerun with the same ``--out`` skips the cells already there.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

STUDIES: dict[str, Callable[[argparse.Namespace], list["Cell"]]] = {}
#: ``--quick``: the smallest cells that still train, save, reload and evaluate.
QUICK = {"steps": 4, "d_model": 16, "eval_batches": 1}
#: ``pointer``: steps of the sort run with chosen elements masked (the library default), which needs few.
MASKED_SORT_STEPS = 200


@dataclass(frozen=True)
class Cell:
    """One ``rnnkit train`` run (``train_args``, without ``--out``/``--threads``) and the test sizes
    to score it at (``None``: the task's test split as it is)."""

    key: str
    train_args: tuple[str, ...]
    test_sizes: tuple[int | None, ...] = (None,)
    positions: bool = True  # score position_accuracy (targets with one reference)
    info: dict[str, Any] = field(default_factory=dict, compare=False)


def study(name: str):
    def register(builder: Callable[[argparse.Namespace], list[Cell]]):
        STUDIES[name] = builder
        return builder
    return register


def task_opts(**options: Any) -> list[str]:
    return [arg for key, value in options.items() for arg in ("--task-opt", f"{key}={value}")]


@study("attention-length")
def attention_length(args: argparse.Namespace) -> list[Cell]:
    cells = []
    for n in args.lengths:
        for layer in args.encoders:
            for attention in ("none", "additive"):
                train = ["--task", "reverse", *task_opts(min_len=n, max_len=n, eval_examples=args.eval_examples),
                         "--model", layer, "--attention", attention, "--d-model", str(args.d_model or 64),
                         "--steps", str(args.steps or 1500), "--seed", str(args.seed)]
                cells.append(Cell(f"reverse-n{n}-{layer}-{attention}", tuple(train), (n,),
                                  info={"length": n, "layer": layer, "attention": attention}))
    return cells


@study("pointer")
def pointer(args: argparse.Namespace) -> list[Cell]:
    steps = args.steps or 1000
    common = ["--d-model", str(args.d_model or 128), "--batch-size", "128", "--seed", str(args.seed)]
    cells = []
    for n in (5, 10):
        train = ["--task", "convex_hull", *task_opts(min_n=n, max_n=n, eval_examples=args.eval_examples),
                 "--pointer-encoder", "rnn", "--no-mask-chosen", "--steps", str(steps), *common]
        cells.append(Cell(f"convex_hull-n{n}", tuple(train), (5, 10), positions=False,
                          info={"task": "convex_hull", "train_n": n, "encoder": "rnn", "mask_chosen": False}))
    sort = ["--task", "sort", *task_opts(min_n=10, max_n=10, eval_examples=args.eval_examples)]
    for encoder, extra in (("set", ["--process-steps", "5"]), ("rnn", [])):
        train = [*sort, "--pointer-encoder", encoder, *extra, "--no-mask-chosen", "--steps", str(steps), *common]
        cells.append(Cell(f"sort-n10-{encoder}", tuple(train), (10,),
                          info={"task": "sort", "train_n": 10, "encoder": encoder, "mask_chosen": False}))
    # With chosen elements masked, sorting needs only a score that falls with the value: a short run shows it.
    train = [*sort, "--pointer-encoder", "set", "--process-steps", "5", "--steps", str(min(steps, MASKED_SORT_STEPS)),
             *common]
    cells.append(Cell("sort-n10-set-masked", tuple(train), (10,),
                      info={"task": "sort", "train_n": 10, "encoder": "set", "mask_chosen": True}))
    return cells


@study("g2p-layers")
def g2p_layers(args: argparse.Namespace) -> list[Cell]:
    cells = []
    for layer in args.encoders:
        train = ["--task", "g2p", "--model", layer, "--steps", str(args.steps or 3000), "--seed", str(args.seed)]
        if args.d_model:
            train += ["--d-model", str(args.d_model)]
        cells.append(Cell(f"g2p-{layer}", tuple(train), (None,), positions=False, info={"layer": layer}))
    return cells


def position_hits(tokens: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
                  tgt_lengths: torch.Tensor) -> tuple[int, int]:
    """Reference tokens (the end token excluded) that the output has at the same position, and their count.

    ``tokens`` (B, L) decoded, ``lengths`` (B,) their lengths (end token included); ``targets`` (B, T)
    the references ending in the end token at ``tgt_lengths - 1``. A token past an output's length
    counts as a miss.
    """
    want_len = tgt_lengths - 1
    width = max(int(want_len.max()), 1)
    got = torch.full((tokens.shape[0], width), -1, dtype=torch.long)
    got[:, : min(width, tokens.shape[1])] = tokens[:, :width]
    steps = torch.arange(width)
    got = torch.where(steps < lengths[:, None], got, -1)
    want = torch.full_like(got, -2)
    want[:, : min(width, targets.shape[1])] = targets[:, :width]
    valid = steps < want_len[:, None]
    return int(((got == want) & valid).sum()), int(valid.sum())


@torch.no_grad()
def evaluate(model, task, size: int | None, positions: bool, batch_size: int = 256,
             max_batches: int | None = None) -> dict[str, float]:
    """The task's metrics of greedy decoding on the test split at ``size`` (and ``position_accuracy``)."""
    from rnnkit.tasks.seq2seq_base import add_sums
    from rnnkit.train.seq2seq import decode

    sums: dict[str, float] = {}
    hits = total = examples = 0
    for index, batch in enumerate(task.eval_batches("test", batch_size, size)):
        if max_batches is not None and index >= max_batches:
            break
        decoded = decode(model, task, batch.src, batch.src_lengths)
        add_sums(sums, task.metric_sums(decoded, batch))
        h, t = position_hits(decoded.tokens, decoded.lengths, batch.targets, batch.tgt_lengths)
        hits, total, examples = hits + h, total + t, examples + len(batch)
    metrics = {**task.finalize_metrics(sums), "examples": examples}
    if positions:
        metrics["position_accuracy"] = hits / max(total, 1)
    return metrics


def run_cell(cell: Cell, runs: Path, threads: int | None, eval_batches: int | None,
             val_batches: int | None = None) -> dict[str, Any]:
    """Train ``cell`` with ``rnnkit train``, reload the saved model and score it; the result row.

    ``eval_batches`` caps the test batches scored, ``val_batches`` those of the run's own final val
    evaluation (default: ``eval_batches``; None: the whole split).
    """
    from rnnkit.cli import main as rnnkit
    from rnnkit.models import load_pretrained
    from rnnkit.tasks import restore_task

    out = runs / cell.key
    argv = ["train", *cell.train_args, "--out", str(out), "--overwrite", "--no-progress", "--log-every", "500"]
    if threads is not None:
        argv += ["--threads", str(threads)]
    val_batches = eval_batches if val_batches is None else val_batches
    if val_batches is not None:
        argv += ["--eval-max-batches", str(val_batches)]
    started, cpu_started = time.perf_counter(), time.process_time()
    if rnnkit(argv) != 0:
        raise RuntimeError(f"rnnkit {shlex.join(argv)} failed")
    cpu_seconds = time.process_time() - cpu_started  # this process's CPU time: a busy machine leaves it as it is
    info = json.loads((out / "train.json").read_text())
    model, task = load_pretrained(out).eval(), restore_task(info["task"])
    eval_started = time.perf_counter()
    test = {("all" if size is None else str(size)): evaluate(model, task, size, cell.positions, max_batches=eval_batches)
            for size in cell.test_sizes}
    metrics = info["metrics"]
    decoder = getattr(model, "decoder", None)
    return {
        "key": cell.key, "status": "ok", **cell.info, "command": "rnnkit " + shlex.join(argv),
        "steps": metrics["steps"], "train_seconds": metrics["seconds"], "train_cpu_seconds": cpu_seconds, "val": metrics["val"], "test": test,
        "eval_seconds": time.perf_counter() - eval_started, "wall_seconds": time.perf_counter() - started,
        "params": sum(p.numel() for p in model.parameters()),
        "decoder_state_size": None if decoder is None else int(decoder.state_size),
        "bridge": getattr(getattr(model, "bridge", None), "kind", None),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def describe_row(row: dict[str, Any]) -> str:
    parts = [f"{size}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "examples")
             for size, metrics in row["test"].items()]
    return f"{row['key']}: {row['steps']} steps in {row['train_seconds']:.0f} s; test " + "; ".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=sorted(STUDIES))
    parser.add_argument("--out", required=True, help="results file (JSON lines; appended to, finished cells skipped)")
    parser.add_argument("--runs", default="runs/seq2seq_study", help="where each cell's model is saved")
    parser.add_argument("--steps", type=int, help="training steps of every cell (default: the study's)")
    parser.add_argument("--d-model", type=int, help="model width (default: the study's)")
    parser.add_argument("--lengths", default="8,16,32", help="attention-length: source lengths")
    parser.add_argument("--encoders", help="layers, each the encoder and the decoder (default: lstm,gla,mingru for "
                                           "attention-length, lstm,gru,mingru,gla for g2p-layers)")
    parser.add_argument("--eval-examples", type=int, default=1000, help="generated tasks: val and test examples")
    parser.add_argument("--eval-batches", type=int, help="score only this many test batches (default: all)")
    parser.add_argument("--val-batches", type=int, help="val batches of each run's final evaluation, which only "
                                                          "the results' val field reports (default: --eval-batches)")
    parser.add_argument("--only", help="run only the cells whose key matches this regular expression")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a check that it runs: {QUICK['steps']} steps, width {QUICK['d_model']}, one test batch")
    args = parser.parse_args(argv)
    args.lengths = [int(n) for n in args.lengths.split(",")]
    default = "lstm,gru,mingru,gla" if args.study == "g2p-layers" else "lstm,gla,mingru"
    args.encoders = (args.encoders or default).split(",")
    if args.quick:
        args.steps = args.steps or QUICK["steps"]
        args.d_model = args.d_model or QUICK["d_model"]
        args.eval_batches = args.eval_batches or QUICK["eval_batches"]
        args.eval_examples = min(args.eval_examples, 64)
    return args


def main(argv: list[str] | None = None) -> dict[str, int]:
    from rnnkit.bench.grid import append_line, read_results
    from rnnkit.bench.machine import describe

    args = parse_args(argv)
    cells = STUDIES[args.study](args)
    if args.only:
        cells = [c for c in cells if re.search(args.only, c.key)]
    done = {row.get("key") for row in read_results(args.out) if row.get("status") == "ok"}
    todo = [c for c in cells if c.key not in done]
    print(describe())
    print(f"{args.study}: {len(cells)} cells, {len(cells) - len(todo)} already in {args.out}", flush=True)
    for cell in todo:
        row = run_cell(cell, Path(args.runs), args.threads, args.eval_batches, args.val_batches)
        append_line(args.out, row)
        print(describe_row(row), flush=True)
    return {"cells": len(cells), "ran": len(todo)}


if __name__ == "__main__":
    main()
