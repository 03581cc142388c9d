"""Length extrapolation of state tracking: train on short sequences, test on far longer ones.

The protocol of Grazzi et al. 2025 ("Unlocking State-Tracking in Linear RNNs Through Negative
Eigenvalues", section 5.1) at CPU scale, for any registered layer with and without
``allow_neg_eigval``: one residual block of width 32 (MLP ratio 2), AdamW at lr 3e-3 without weight
decay (the paper's), batch 64, 50 warmup steps then cosine, ``steps`` steps on sequences of at most
``train_len`` (``parity``: lengths drawn from 1..train_len; ``modular_sum``: every sequence
``train_len`` long), then tested on ``eval_examples`` sequences of exactly ``factor * train_len``.

``rnnkit bench extrapolation`` runs the (layer, task, ``allow_neg_eigval``, seed) grid and appends
one JSON line per run (resumable: finished runs are skipped); :func:`extrapolation_run` is one run.

Example:
    >>> result = extrapolation_run("deltanet", "parity", allow_neg_eigval=True, steps=1500,
    ...                            num_heads=2, head_dim=16, use_short_conv=False)
    >>> result["long"]      # accuracy on 2000 strings of 256 bits
"""

from __future__ import annotations

import contextlib
import io
import platform
import time
from typing import Any, Callable, Sequence

import torch

from rnnkit.errors import InputError, check_positive_int


def extrapolation_run(
    layer: str,
    task: str = "parity",
    allow_neg_eigval: bool = False,
    seed: int = 0,
    steps: int = 1500,
    train_len: int = 64,
    factor: int = 4,
    task_options: dict[str, Any] | None = None,
    d_model: int = 32,
    num_layers: int = 1,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    eval_examples: int = 2000,
    **layer_options: Any,
) -> dict[str, float]:
    """Train ``layer`` on ``task`` at ``train_len``; test at ``train_len`` and at ``factor * train_len``.

    Returns:
        ``train_len``: the task's test accuracy at the training length (the trainer's test split);
        ``long``: the accuracy on ``eval_examples`` sequences of exactly ``factor * train_len`` steps
        (per-step tasks: over every step); ``long_last``: per-step tasks only, the accuracy at the
        last step (the answer that needs the whole sequence); ``params``; ``seconds`` of training.
    """
    from rnnkit.models import SequenceModel, model_config_for
    from rnnkit.tasks import build_task
    from rnnkit.tasks import task_options as options_of
    from rnnkit.train import TrainConfig, Trainer

    check_positive_int("factor", factor)
    task_options = dict(task_options or {})
    torch.manual_seed(seed)
    train_task = build_task(task, **task_options)
    model = SequenceModel(model_config_for(
        train_task, d_model=d_model, block="residual", layer=layer, num_layers=num_layers, mlp_ratio=2.0,
        layer_options={**layer_options, "allow_neg_eigval": allow_neg_eigval},
    ))
    config = TrainConfig(steps=steps, batch_size=64, seq_len=train_len, lr=lr, warmup_steps=50,
                         weight_decay=weight_decay, seed=seed, progress=False, log_every=10**9)
    trainer = Trainer(model, train_task, config)
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's end-of-run log line
        fit = trainer.fit()
    if fit.get("interrupted") or trainer.step < steps:
        # A stop signal ends training early; such a model must not pass for one trained ``steps`` steps.
        raise RuntimeError(f"{layer} on {task}: training stopped at step {trainer.step} of {steps} "
                           f"({fit.get('interrupted') or 'early'}); nothing recorded")
    result: dict[str, float] = {"train_len": trainer.evaluate("test")["accuracy"]}
    # Every test sequence has exactly factor x the training length (no padding, no shorter ones).
    fixed = {"variable_length": False} if "variable_length" in options_of(task) else {}
    long = build_task(task, **{**task_options, **fixed, "eval_examples": eval_examples})
    model.eval()
    correct = last = count = 0
    with torch.no_grad():
        for batch in long.eval_batches("test", batch_size=500, seq_len=factor * train_len):
            logits, _ = model(batch.x)  # (B, C) or (B, T, C)
            hits = logits.argmax(-1) == batch.y  # (B,) or (B, T)
            correct += int(hits.sum())
            count += hits.numel()
            if hits.dim() == 2:
                last += int(hits[:, -1].sum())
    result["long"] = correct / count
    if long.target == "per_step":
        result["long_last"] = last / long.eval_examples
    result["params"] = sum(p.numel() for p in model.parameters())
    result["seconds"] = fit["seconds"]
    return result


def run_extrapolation_grid(
    models: Sequence[str],
    tasks: Sequence[str],
    seeds: Sequence[int],
    out,
    steps: int = 1500,
    train_len: int = 64,
    factor: int = 4,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every (model, task, ``allow_neg_eigval`` in (False, True), seed) that ``out`` does not hold
    yet, appending one JSON line each; returns every row of ``out`` afterwards.

    ``models`` are ``name`` or ``name:key=value:...`` (the layer's options), ``tasks`` the same for
    tasks (as in ``rnnkit bench tasks``).
    """
    from rnnkit.bench.grid import TaskSpec, append_line, parse_entry, read_results
    from rnnkit.layers import build

    check_positive_int("steps", steps)
    check_positive_int("train_len", train_len)
    specs = [TaskSpec.parse(t) for t in tasks]
    for spec in specs:
        if spec.seq_len is not None:
            raise InputError(f"--tasks {spec.label!r}: expected no seq_len (set --train-len), got {spec.seq_len}")
    parsed = [parse_entry(m, "--models") for m in models]
    for name, options in parsed:
        if "allow_neg_eigval" in options:
            raise InputError(f"--models {name!r}: expected no allow_neg_eigval (both values run), got it")
        build(name, d_model=32, allow_neg_eigval=True, **options)  # an unknown layer or option raises before any run
    done = {row.get("key") for row in read_results(out)}
    for spec in specs:
        for (name, options), label in zip(parsed, models):
            for neg in (False, True):
                for seed in seeds:
                    key = f"{label}|{spec.label}|neg={neg}|s{seed}|steps={steps}|T={train_len}x{factor}"
                    if key in done:
                        continue
                    started = time.perf_counter()
                    result = extrapolation_run(name, spec.name, neg, seed, steps, train_len, factor,
                                               dict(spec.options), **options)
                    row = {
                        "key": key, "model": label, "layer": name, "layer_options": options, "task": spec.name,
                        "task_label": spec.label, "allow_neg_eigval": neg, "seed": seed, "steps": steps,
                        "train_len": train_len, "test_len": factor * train_len, **result,
                        "wall_seconds": time.perf_counter() - started, "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "machine": platform.machine(),
                        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    }
                    append_line(out, row)
                    log(f"{key}: train_len {result['train_len']:.3f}, x{factor} {result['long']:.3f}"
                        + (f" (last step {result['long_last']:.3f})" if "long_last" in result else "")
                        + f", {row['wall_seconds']:.0f} s")
    return read_results(out)


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of ``rows``: per (model, task, ``allow_neg_eigval``), the accuracies' mean ±
    sample standard deviation over seeds (``n`` seeds)."""
    from rnnkit.bench.report import fmt

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["task_label"], row["allow_neg_eigval"], row["steps"]), []).append(row)
    lines = ["| model | task | allow_neg_eigval | steps | n | at train_len | at test_len | test_len, last step |",
             "|---|---|---|---|---|---|---|---|"]
    for (model, task, neg, steps), group in groups.items():
        cells = []
        for name in ("train_len", "long", "long_last"):
            cells.append(fmt(r[name] for r in group if name in r))
        lines.append(f"| {model} | {task} | {neg} | {steps} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["extrapolation_run", "run_extrapolation_grid", "summary_table"]
