"""The ``rnnkit bench`` and ``rnnkit report`` subcommands (wired into :mod:`rnnkit.cli`)."""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from rnnkit.errors import InputError


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise InputError(f"expected comma-separated integers, got {text!r}") from None


def add_parsers(sub) -> None:
    """Add ``bench`` (with its ``tasks`` grid) and ``report`` to the CLI's subparsers."""
    bench = sub.add_parser("bench", help="benchmark grids (tasks: every model on every task, fixed budget)")
    kinds = bench.add_subparsers(dest="bench_kind", required=True)
    grid = kinds.add_parser("tasks", help="train each (model, task, width, seed) cell with a fixed budget")
    grid.add_argument("--models", help="comma-separated layers, each name or name:key=value:... "
                      "with the layer's options, or a hybrid stack's layer pattern joined by + "
                      "(rglru+rglru+attention:window=64) (default: every registered layer but the wrappers)")
    grid.add_argument("--tasks", help="comma-separated tasks, each name or name:key=value:... (default: the probes)")
    grid.add_argument("--budget", default="small", help="small (about a minute per layer on the default tasks) or medium")
    grid.add_argument("--seeds", type=int, default=1, help="seeds per cell (default 1)")
    grid.add_argument("--widths", help="comma-separated d_model values (default: the budget's)")
    grid.add_argument("--steps", type=int, help="override the budget's training steps per cell")
    grid.add_argument("--max-seconds", type=float, help="override the budget's training-time cap per cell")
    grid.add_argument("--eval-seconds", type=float, help="override the budget's evaluation-time cap per cell")
    grid.add_argument("--stop-after", type=float, help="start no cell that would end after this many seconds "
                      "(rerun the same command to resume)")
    grid.add_argument("--layers", type=int, help="override the budget's number of residual blocks")
    grid.add_argument("--lr", type=float, help="override the budget's peak learning rate")
    grid.add_argument("--block", choices=["residual", "stacked"], help="override the budget's block type (default residual)")
    grid.add_argument("--out", default="RESULTS.jsonl", help="results file; appended to, finished cells skipped")
    grid.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    grid.add_argument("--no-progress", action="store_true", help="one log line per cell instead of a progress bar")

    extra = kinds.add_parser(
        "extrapolation", help="state tracking beyond the training length, each layer with and without allow_neg_eigval")
    extra.add_argument("--models", required=True, help="comma-separated layers, each name or name:key=value:... "
                       "(both allow_neg_eigval values run)")
    extra.add_argument("--tasks", default="parity", help="comma-separated tasks, each name or name:key=value:... "
                       "(default parity)")
    extra.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    extra.add_argument("--steps", type=int, default=1500, help="training steps per run (default 1500)")
    extra.add_argument("--train-len", type=int, default=64, help="longest training sequence (default 64)")
    extra.add_argument("--factor", type=int, default=4, help="test length = factor x train length (default 4)")
    extra.add_argument("--out", default="extrapolation.jsonl", help="results file; appended to, finished runs skipped")
    extra.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")

    report = sub.add_parser("report", help="tables, plots and an HTML page from a `rnnkit bench tasks` results file")
    report.add_argument("results", help="the JSON-lines file written by `rnnkit bench tasks`")
    report.add_argument("--out", default="report", help="output folder (default: report)")


def cmd_bench(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bench_kind == "extrapolation":
        return _cmd_extrapolation(args)
    from rnnkit.bench.grid import BUDGETS, DEFAULT_TASKS, build_cells, default_models, describe_budget, run_grid

    models = _csv(args.models) if args.models else default_models()
    tasks = _csv(args.tasks) if args.tasks else list(DEFAULT_TASKS)
    if args.budget not in BUDGETS:
        raise InputError(f"--budget: expected one of {sorted(BUDGETS)}, got {args.budget!r}")
    overrides = {k: v for k, v in (("steps", args.steps), ("max_seconds", args.max_seconds), ("eval_seconds", args.eval_seconds),
                                   ("num_layers", args.layers), ("lr", args.lr), ("block", args.block))
                 if v is not None}
    budget = BUDGETS[args.budget]
    if overrides:
        # A changed budget gets its own name, so its cells never pass for the stock budget's on resume.
        name = budget.name + "".join(f"+{k}={v}" for k, v in sorted(overrides.items()))
        budget = dataclasses.replace(budget, name=name, **overrides)
    cells = build_cells(models, tasks, args.budget, args.seeds, _ints(args.widths) if args.widths else None)
    cells = [dataclasses.replace(c, budget=budget) for c in cells]
    print(f"rnnkit bench tasks: {len(models)} models x {len(tasks)} tasks x "
          f"{len(cells) // max(1, len(models) * len(tasks) * args.seeds)} widths x {args.seeds} seeds = {len(cells)} cells; "
          f"budget {describe_budget(budget)}; {torch.get_num_threads()} threads; results -> {args.out}", flush=True)
    started = time.perf_counter()
    counts = run_grid(cells, args.out, progress=not args.no_progress, stop_after=args.stop_after)
    print(f"done in {time.perf_counter() - started:.0f} s: {counts['ok']} cells ran, {counts['skipped']} skipped, "
          f"{counts['error']} failed (re-run the same command to retry them)"
          + (f", {counts['left']} left for the next run" if counts["left"] else ""))
    return 1 if counts["error"] else 0


def _cmd_extrapolation(args: argparse.Namespace) -> int:
    from rnnkit.bench.extrapolation import run_extrapolation_grid, summary_table

    print(f"rnnkit bench extrapolation: {torch.get_num_threads()} threads; results -> {args.out}", flush=True)
    rows = run_extrapolation_grid(_csv(args.models), _csv(args.tasks), _ints(args.seeds), args.out, steps=args.steps,
                                  train_len=args.train_len, factor=args.factor)
    print(summary_table(rows))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from rnnkit.bench.report import write_report

    paths = write_report(args.results, args.out)
    for path in paths:
        print(path)
    return 0
