"""Greff et al. (2017), "LSTM: A Search Space Odyssey", at CPU scale: the vanilla LSTM and each of its eight
variants trained with one shared budget on a character language model and a time-series classifier.

    python benchmarks/lstm_variants.py --out lstm_variants.jsonl           # the grid (resumable: rerun to continue)
    python benchmarks/lstm_variants.py --quick --out quick.jsonl           # a smoke test: a few steps per cell
    python benchmarks/lstm_variants.py --summary --out lstm_variants.jsonl # the tables of a results file

The variants are options of the ``lstm`` layer (:mod:`rnnkit.layers.lstm`): the paper's vanilla LSTM
(V) has peepholes, and each variant changes one thing about it: no input, forget or output gate (NIG,
NFG, NOG), no input or output activation (NIAF, NOAF), no peepholes (NP), the coupled input-forget
gate (CIFG) and full gate recurrence (FGR). Every cell is a ``rnnkit bench tasks`` cell
(:func:`rnnkit.bench.grid.run_cell`, one JSON line each, so ``rnnkit report`` reads the file) with
the budget of its experiment below, the same for every variant, and a fixed number of steps (time
caps far above what a cell needs), so the machine's speed or load changes how long a cell takes and
nothing else.

- ``shakespeare``: a single LSTM layer (``stacked`` block) between the character embedding and the
  softmax, as in the paper's networks; bits per character on the whole val and test splits (held-out
  plays), the test split read as 128 parallel streams with the state carried across windows.
  ``shakespeare-200`` is the same budget with 200 steps (the warmup and cosine schedule span them),
  for a slot too short for 1,000 steps of every variant.
- ``gunpoint``: the UCR GunPoint classification set (T = 150), a single LSTM layer whose last output
  is classified; accuracy on the whole official test split (``val``: the training set, since the
  archive's split has no validation part).

The variants run their ``recurrent`` mode, the per-step loop (no fused kernel computes them); V and
NP, which are not variants of the layer, run the fused kernel that ``auto`` picks. With a fixed
step count that changes only their wall time, not what they compute.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import torch

from rnnkit.bench.grid import Budget, build_cells, read_results, run_grid
from rnnkit.bench.machine import describe
from rnnkit.bench.report import fmt, mean_spread

#: The paper's names for the vanilla LSTM and its variants, as options of the ``lstm`` layer.
VARIANTS = {
    "V": {"peephole": True},
    "NIG": {"peephole": True, "input_gate": False},
    "NFG": {"peephole": True, "forget_gate": False},
    "NOG": {"peephole": True, "output_gate": False},
    "NIAF": {"peephole": True, "input_activation": False},
    "NOAF": {"peephole": True, "output_activation": False},
    "NP": {},
    "CIFG": {"peephole": True, "coupled": True},
    "FGR": {"peephole": True, "gate_recurrence": True},
}


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One task of the grid: its ``--tasks`` entry, its budget, the seeds it runs by default, and the
    metric read from each split (and whether lower is better)."""

    task: str
    budget: Budget
    seeds: int
    metric: str
    lower_is_better: bool


def shared_budget(name: str, **settings) -> Budget:
    """A budget with what every experiment shares: one LSTM layer in the ``stacked`` block, time caps
    far above what a cell needs (the step count ends training), the whole val and test splits scored."""
    return Budget(name, num_layers=1, block="stacked", eval_examples=256, max_length_factor=1, val_batches=None,
                  **settings)


EXPERIMENTS = {
    "shakespeare": Experiment(
        "shakespeare:seq_len=128",
        shared_budget("greff-shakespeare", d_model=128, steps=1000, batch_size=32, lr=4e-3, warmup=50, max_seconds=3600.0,
               eval_seconds=600.0, eval_batch_size=128),
        seeds=1, metric="bpc", lower_is_better=True,
    ),
    "shakespeare-200": Experiment(
        "shakespeare:seq_len=128",
        shared_budget("greff-shakespeare-200", d_model=128, steps=200, batch_size=32, lr=4e-3, warmup=50,
                      max_seconds=3600.0, eval_seconds=600.0, eval_batch_size=128),
        seeds=1, metric="bpc", lower_is_better=True,
    ),
    "gunpoint": Experiment(
        "ucr:dataset=GunPoint",
        shared_budget("greff-gunpoint", d_model=32, steps=500, batch_size=32, lr=1e-2, warmup=15, max_seconds=3600.0,
                      eval_seconds=600.0, eval_batch_size=256),
        seeds=2, metric="accuracy", lower_is_better=False,
    ),
}


def model_label(options: dict) -> str:
    """The ``--models`` entry of a variant, as :func:`rnnkit.bench.grid.build_cells` labels it."""
    return ":".join(["lstm"] + [f"{k}={v}" for k, v in sorted(options.items())])


def quick_budget(budget: Budget) -> Budget:
    """A smoke-test version of ``budget``: a few steps and capped evaluation, under its own name so its
    cells never pass for the full grid's."""
    return dataclasses.replace(budget, name=budget.name + "-quick", steps=5, warmup=1, eval_seconds=2.0,
                               val_batches=2)


def cells_for(experiments: list[str], variants: list[str], seeds: int | None, quick: bool) -> list:
    """The grid's cells, experiment-major and then seed-major, so that an interrupted run already holds
    every variant of the first seeds."""
    cells = []
    for name in experiments:
        exp = EXPERIMENTS[name]
        budget = quick_budget(exp.budget) if quick else exp.budget
        runs = 1 if quick else (seeds or exp.seeds)
        grid = build_cells([model_label(VARIANTS[v]) for v in variants], [exp.task], "small", runs,
                           [exp.budget.d_model])
        cells += sorted((dataclasses.replace(c, budget=budget) for c in grid),
                        key=lambda c: (c.seed, variants.index(variant_of(c.model))))
    return cells


def variant_of(model: str) -> str:
    """The paper's name of a results row's ``model``."""
    return next(name for name, options in VARIANTS.items() if model_label(options) == model)


def summary(rows: list[dict]) -> str:
    """Markdown, per experiment and budget: each variant's test and val metric (mean ± sample std over
    seeds), the gap of its test mean to V's, and the test value of each seed."""
    out = []
    for name, exp in EXPERIMENTS.items():
        budgets = (exp.budget.name, quick_budget(exp.budget).name)
        mine = [r for r in rows if r.get("status") == "ok" and r["task_label"] == exp.task and r["budget"] in budgets
                and r["seed"] < exp.seeds]
        for budget in sorted({r["budget"] for r in mine}):
            cells = [r for r in mine if r["budget"] == budget]
            by_variant = {v: sorted((r for r in cells if variant_of(r["model"]) == v), key=lambda r: r["seed"])
                          for v in VARIANTS}
            base = mean_spread(r["score"] for r in by_variant["V"])[0]
            better = "lower" if exp.lower_is_better else "higher"
            out += [f"{name}: {exp.task}, budget {budget}, {exp.metric} ({better} is better)", "",
                    f"| variant | n | test {exp.metric} | val {exp.metric} | test - V | test per seed | steps | params |",
                    "|---|---|---|---|---|---|---|---|"]
            for variant, group in by_variant.items():
                if not group:
                    continue
                mean, _, n = mean_spread(r["score"] for r in group)
                val = fmt(r["val"].get(exp.metric, math.nan) for r in group)
                seeds = " / ".join(f"{r['score']:.3f}" for r in group)
                steps = ", ".join(str(s) for s in sorted({r["steps"] for r in group}))
                out.append(f"| {variant} | {n} | {fmt(r['score'] for r in group)} | {val} | {mean - base:+.3f} "
                           f"| {seeds} | {steps} | {group[0]['params']:,} |")
            out.append("")
        done = {r["key"] for r in mine}
        failed = [r for r in rows if r.get("status") == "error" and r["task_label"] == exp.task
                  and r["budget"] in budgets and r["key"] not in done]
        out += [f"failed: {variant_of(r['model'])} seed {r['seed']} ({r['budget']}): {r['error']}" for r in failed]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(EXPERIMENTS), help=f"comma-separated, from {list(EXPERIMENTS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--seeds", type=int, help="seeds per cell (default: each experiment's own)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 5 steps, one seed, capped evaluation")
    parser.add_argument("--out", default="lstm_variants.jsonl", help="results file (appended to; done cells skipped)")
    parser.add_argument("--stop-after", type=float, help="start no cell that may end after this many seconds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--summary", action="store_true", help="print the tables of --out and run nothing")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(read_results(args.out)))
        return 0
    experiments = [t.strip() for t in args.tasks.split(",") if t.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [t for t in experiments if t not in EXPERIMENTS] + [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown tasks or variants {unknown}: expected tasks from {list(EXPERIMENTS)}, "
                     f"variants from {list(VARIANTS)}")
    torch.set_num_threads(args.threads)
    print(describe())
    cells = cells_for(experiments, variants, args.seeds, args.quick)
    counts = run_grid(cells, args.out, progress=False, stop_after=args.stop_after)
    print(f"{counts['ok']} cells ran, {counts['skipped']} already done, {counts['error']} failed, "
          f"{counts['left']} left for a rerun")
    print(summary(read_results(args.out)))
    return 1 if counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
