"""The task grid: train every (model, task, width, seed) cell with a fixed budget and record one JSON line each.

``rnnkit bench tasks`` calls :func:`run_grid`. A cell builds a :class:`~rnnkit.models.SequenceModel`
whose blocks use the cell's registered layer (for a sequence-to-sequence task, a
:class:`~rnnkit.models.Seq2Seq` or :class:`~rnnkit.models.PointerNetwork` with that layer as encoder
and decoder), trains it with the :class:`~rnnkit.train.Trainer` for the
budget's steps (stopping early if the budget's time cap is hit), then evaluates the test split at every
test length the task offers (lengths beyond the training length measure length generalisation).

Both halves of a cell are bounded in time, so a grid's wall time is known before it starts: training
stops after the step that passes ``max_seconds``, and evaluation stops after the batch that passes
``eval_seconds`` (shared equally by the test lengths, each getting at least one batch; the examples
actually evaluated are recorded per length). :meth:`Budget.cell_seconds` adds an allowance for the
uncapped rest (building the task and model, the one step and one batch that may run past a cap), and
:func:`estimate_seconds` multiplies it out; ``rnnkit bench tasks`` prints that estimate before it runs.

Results are a JSON-lines file, one object per cell, appended with a single ``write`` on a file opened
in append mode, so an interrupted run never leaves half a line behind another cell's line. A rerun
with the same file skips the cells that already have an ``"ok"`` line; a cell that crashed (no line)
or failed (an ``"error"`` line) is run again.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rnnkit.errors import InputError, check_positive_int


@dataclass(frozen=True)
class Budget:
    """The fixed training budget of every cell of a grid."""

    name: str
    d_model: int  # width of the model (and so of each layer's state)
    num_layers: int  # residual blocks
    steps: int  # optimizer steps
    batch_size: int  # B
    lr: float  # peak learning rate (warmup then cosine)
    warmup: int  # warmup steps
    max_seconds: float  # training stops early when a cell has trained this long
    eval_examples: int  # test examples per length (synthetic tasks); real tasks use their whole test split
    max_length_factor: int  # test lengths up to this multiple of the training length
    eval_seconds: float = math.inf  # evaluation stops after the batch that passes this (all test lengths together)
    eval_batch_size: int = 128  # examples per evaluation batch (the granularity of the evaluation cap)
    setup_seconds: float = 0.5  # allowance per cell for the uncapped rest: building task and model, one step/batch past a cap
    curve_points: int = 60  # loss-curve points kept per cell
    val_batches: int | None = 1  # val batches scored at the end of training (None: the whole val split)
    block: str = "residual"  # "residual" (pre-norm mixer + MLP) or "stacked" (the classic deep RNN)

    def cell_seconds(self) -> float:
        """Wall-time bound of one cell: training cap + evaluation cap + the setup allowance."""
        return self.max_seconds + self.eval_seconds + self.setup_seconds


#: ``small`` bounds a cell at 5.5 s, so each layer takes at most about 66 s on the 12 default tasks on
#: one core and the grid of every registered layer grows by that much per layer:
#: :func:`estimate_seconds` multiplies out its caps (``rnnkit bench tasks`` prints that bound before it
#: runs); ``medium`` trains ~8x longer per cell.
BUDGETS = {
    "small": Budget("small", d_model=32, num_layers=1, steps=150, batch_size=32, lr=1e-2, warmup=15,
                    max_seconds=3.5, eval_examples=256, max_length_factor=2, eval_seconds=1.5,
                    eval_batch_size=64, setup_seconds=0.5),
    "medium": Budget("medium", d_model=64, num_layers=2, steps=1000, batch_size=64, lr=2e-3, warmup=50,
                     max_seconds=90.0, eval_examples=1000, max_length_factor=4, eval_seconds=30.0,
                     setup_seconds=5.0),
}

#: The default task list of ``rnnkit bench tasks``: the synthetic probes, one UCR data set, one forecast.
DEFAULT_TASKS = (
    "copy:delay=20", "selective_copy", "mqar", "set_disjointness", "parity", "modular_sum",
    "permutation_composition:group=S3", "n_parity:n=3:stage_steps=40", "n_dms:n=3:stage_steps=40",
    "induction_heads", "adding:seq_len=50",
    "ucr:dataset=GunPoint",
)


@dataclass(frozen=True)
class TaskSpec:
    """A task name with options, written ``name`` or ``name:key=value:key=value`` on the command line.

    ``seq_len`` is a pseudo-option: the training length (default: the task's own).
    """

    name: str
    options: tuple[tuple[str, Any], ...] = ()
    seq_len: int | None = None

    @classmethod
    def parse(cls, text: str) -> "TaskSpec":
        from rnnkit.tasks import task_class, task_options

        name, given = parse_entry(text, "--tasks")
        task_class(name)  # raises for unknown names
        options: dict[str, Any] = {}
        seq_len = None
        for key, value in given.items():
            if key == "seq_len":
                check_positive_int("seq_len", value)
                seq_len = value
            elif key not in task_options(name):
                raise InputError(f"--tasks {text!r}: expected options from {task_options(name) + ['seq_len']}, got {key!r}")
            else:
                options[key] = value
        return cls(name, tuple(sorted(options.items())), seq_len)

    @property
    def label(self) -> str:
        extra = [f"{k}={v}" for k, v in self.options] + ([f"seq_len={self.seq_len}"] if self.seq_len else [])
        return ":".join([self.name] + extra)


def parse_model(text: str) -> tuple[str, dict[str, Any]]:
    """A ``--models`` entry, ``name`` or ``name:key=value:...`` (the layer's own options, e.g.
    ``attention:rope=False:num_heads=1``), as the layer name and its options; or a hybrid stack's layer
    pattern with its entries joined by ``+`` (``rglru+rglru+attention:window=64``, ``mamba*3+attention``;
    :mod:`rnnkit.layers.pattern`), as the pattern and no shared options."""
    from rnnkit import layers
    from rnnkit.layers.pattern import format_pattern

    if any(mark in text for mark in "+*,"):
        return format_pattern(text, separator="+"), {}
    name, options = parse_entry(text, "--models")
    layers.spec(name)  # raises for unknown names
    return name, options


def parse_entry(text: str, flag: str) -> tuple[str, dict[str, Any]]:
    """``name:key=value:...`` as the name and its options; values are Python literals, bare words
    strings (``dataset=GunPoint``, ``feature_map=relu``). ``flag`` names the argument in errors."""
    from rnnkit.layers.pattern import parse_entry as parse

    return parse(text, flag)


@dataclass(frozen=True)
class Cell:
    """One grid cell."""

    model: str
    task: TaskSpec
    d_model: int
    seed: int
    budget: Budget

    @property
    def key(self) -> str:
        return f"{self.model}|{self.task.label}|d{self.d_model}|s{self.seed}|{self.budget.name}"


def default_models() -> list[str]:
    """Every registered layer except the wrappers (``stacked``, ``bidirectional``), which need an inner layer."""
    from rnnkit import layers

    return [n for n in layers.names() if not layers.spec(n).cls.delegates_auto]


def build_cells(
    models: Sequence[str], tasks: Sequence[str], budget: str, seeds: int, widths: Sequence[int] | None = None
) -> list[Cell]:
    """The grid in run order: task-major, so a partial run already covers every model on the first tasks."""
    from rnnkit import layers
    from rnnkit.layers.pattern import parse_pattern

    if budget not in BUDGETS:
        raise InputError(f"--budget: expected one of {sorted(BUDGETS)}, got {budget!r}")
    check_positive_int("seeds", seeds)
    specs = [TaskSpec.parse(t) for t in tasks]
    chosen = BUDGETS[budget]
    widths = list(widths) if widths else [chosen.d_model]
    for w in widths:
        check_positive_int("width", w)
    labels = []
    for model in models:
        name, options = parse_model(model)
        for layer, entry in parse_pattern(name, "--models"):
            layers.build(layer, d_model=max(widths), **options, **entry)  # raises for unknown or invalid options
        labels.append(":".join([name] + [f"{k}={v}" for k, v in sorted(options.items())]))
    return [
        Cell(model, spec, width, seed, chosen)
        for spec in specs for model in labels for width in widths for seed in range(seeds)
    ]


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of a results file, skipping a torn last line (from a killed run)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_line(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append one JSON line with a single ``write`` (``O_APPEND``), then flush it to disk."""
    data = (json.dumps(row, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # If the file ends in a torn line (a run killed mid-write), start on a fresh line.
        if os.fstat(fd).st_size > 0:
            with open(path, "rb") as handle:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":
                    data = b"\n" + data
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def downsample(values: Sequence[float], points: int) -> list[list[float]]:
    """``[[step, mean loss], ...]``: the curve averaged over ``points`` equal buckets of steps (1-based)."""
    n = len(values)
    if n == 0:
        return []
    edges = [round(i * n / min(points, n)) for i in range(min(points, n) + 1)]
    return [[edges[i + 1], sum(values[edges[i] : edges[i + 1]]) / (edges[i + 1] - edges[i])] for i in range(len(edges) - 1)]


def run_cell(cell: Cell) -> dict[str, Any]:
    """Train and evaluate one cell; returns its result row (``status`` ``"ok"``)."""
    from rnnkit.models import PointerNetwork, Seq2Seq, SequenceModel, model_config_for, seq2seq_config_for
    from rnnkit.tasks import build_task, task_options
    from rnnkit.train import TrainConfig, Trainer, seed_everything

    b = cell.budget
    cell_started = time.perf_counter()
    options = dict(cell.task.options)
    if "eval_examples" in task_options(cell.task.name) and "eval_examples" not in options:
        options["eval_examples"] = b.eval_examples
    task = build_task(cell.task.name, **options)
    train_len = cell.task.seq_len or task.default_seq_len
    layer, layer_options = parse_model(cell.model)
    seed_everything(cell.seed)
    if getattr(task, "seq2seq", False):
        # The cell's layer is the encoder and the decoder; the budget's blocks and depth are the encoder's.
        config = seq2seq_config_for(
            task, d_model=cell.d_model, encoder_block=b.block, encoder_layer=layer, encoder_options=layer_options,
            encoder_layers=b.num_layers, decoder_layer=layer, decoder_options=layer_options,
        )
        model = (PointerNetwork if task.pointer else Seq2Seq)(config)
    else:
        model = SequenceModel(model_config_for(
            task, d_model=cell.d_model, block=b.block, layer=layer, layer_options=layer_options,
            num_layers=b.num_layers,
        ))
    config = TrainConfig(
        steps=b.steps, batch_size=b.batch_size, seq_len=cell.task.seq_len, lr=b.lr, warmup_steps=b.warmup,
        eval_batch_size=b.eval_batch_size, eval_max_batches=b.val_batches, seed=cell.seed, progress=False,
        log_every=10**9, max_seconds=b.max_seconds,
    )  # the val check at the end of fit reads val_batches batches (the test split is what is reported)
    trainer = Trainer(model, task, config)
    losses: list[float] = []
    started = time.perf_counter()

    def on_step(step: int, record: dict[str, float]) -> None:
        losses.append(record["loss"])

    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's end-of-run log line
        fit = trainer.fit(on_step=on_step)
    metric = _metric(task)
    lengths = [train_len]
    if cell.task.seq_len is None:
        lengths = [T for T in task.test_lengths if T <= b.max_length_factor * train_len]
    else:  # an explicit training length: test there and at 2x, 4x of it
        lengths += [f * train_len for f in (2, 4) if f <= b.max_length_factor]
    test: dict[str, dict[str, float]] = {}
    examples: dict[str, int] = {}
    eval_started = time.perf_counter()
    for i, T in enumerate(lengths):
        # Each length gets an equal share of what is left, so a slow long length cannot starve the others.
        left = b.eval_seconds - (time.perf_counter() - eval_started)
        try:
            test[str(T)], examples[str(T)] = trainer.evaluate_bounded("test", seq_len=T, max_seconds=left / (len(lengths) - i))
        except InputError:
            continue  # a length the task cannot build with these options
    wall = time.perf_counter() - cell_started
    first = test[str(train_len)]
    full = getattr(task, "eval_examples", None)
    return {
        "key": cell.key, "status": "ok", "model": cell.model, "layer": layer, "layer_options": layer_options,
        "task": cell.task.name, "task_label": cell.task.label,
        "task_options": dict(cell.task.options), "d_model": cell.d_model, "num_layers": b.num_layers,
        "block": b.block, "seed": cell.seed, "budget": b.name, "steps": trainer.step, "planned_steps": b.steps,
        "time_capped": trainer.step < b.steps, "train_len": train_len, "metric": metric,
        "score": first[metric], "test_loss": first["loss"], "test": test, "val": fit["val"],
        "params": sum(p.numel() for p in model.parameters()), "state_size": _state_size(model, train_len),
        "eval_examples": examples, "eval_capped": full is not None and min(examples.values()) < full,
        "setup_seconds": started - cell_started, "train_seconds": fit["seconds"],
        "eval_seconds": time.perf_counter() - eval_started, "wall_seconds": wall,
        "tokens_per_second": fit["tokens_per_second"], "loss_curve": downsample(losses, b.curve_points),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _metric(task) -> str:
    """The metric a cell reports: ``mse`` for regression, bits per character (``bpc``) for a language
    model, ``accuracy`` where the task has it, else the last of a sequence-to-sequence task's metrics
    (``g2p``: ``wer``)."""
    if task.target == "regress":
        return "mse"
    if "bpc" in task.metrics:
        return "bpc"
    if getattr(task, "seq2seq", False) and "accuracy" not in task.seq2seq_metrics:
        return task.seq2seq_metrics[-1]
    return "accuracy"


#: Once per run, charged to its first cell: lazy imports and loading the fused kernels (later cells
#: reuse them, so their setup fits the budget's ``setup_seconds``).
STARTUP_SECONDS = 3.0


def estimate_seconds(cells: Sequence[Cell]) -> float:
    """Upper bound of the wall time of running ``cells`` in one process: :data:`STARTUP_SECONDS` plus
    the sum of their budgets' :meth:`Budget.cell_seconds`."""
    return STARTUP_SECONDS + sum(c.budget.cell_seconds() for c in cells) if cells else 0.0


def _state_size(model, length: int) -> int | None:
    """Floats of recurrent state per sequence of the whole model after ``length`` steps (None if it cannot say).

    ``state_size_at``: attention's KV cache holds ``min(length, capacity)`` steps, not its preallocated capacity.
    """
    try:
        size = model.body.state_size_at(length)
    except Exception:  # noqa: BLE001  a layer that cannot report its state size
        return None
    return int(size) if isinstance(size, int) or (isinstance(size, float) and math.isfinite(size)) else None


def run_grid(
    cells: Sequence[Cell],
    out: str | os.PathLike,
    progress: bool = True,
    runner: Callable[[Cell], dict[str, Any]] = run_cell,
    log: Callable[[str], None] = print,
    stop_after: float | None = None,
) -> dict[str, int]:
    """Run the cells that ``out`` does not yet hold as ``"ok"``; append one line per cell.

    Args:
        stop_after: seconds; a cell is not started unless its :meth:`Budget.cell_seconds` still fits
            (the rest is left for a rerun of the same command, which resumes).

    Returns:
        ``{"total", "skipped", "ok", "error", "left"}`` counts (``left``: not started because of ``stop_after``).
    """
    from tqdm.auto import tqdm

    done = {row.get("key") for row in read_results(out) if row.get("status") == "ok"}
    todo = [c for c in cells if c.key not in done]
    counts = {"total": len(cells), "skipped": len(cells) - len(todo), "ok": 0, "error": 0, "left": 0}
    if counts["skipped"]:
        log(f"{counts['skipped']} of {len(cells)} cells already in {out}: skipped")
    bound = estimate_seconds(todo)
    per_cell = (bound - STARTUP_SECONDS) / len(todo) if todo else 0.0
    log(f"estimate: {len(todo)} cells to run, at most {bound / 60:.1f} min ({STARTUP_SECONDS:.0f} s startup + per cell "
        f"training cap + evaluation cap + setup allowance = {per_cell:.1f} s)"
        + (f"; stopping after {stop_after:.0f} s" if stop_after else ""))
    started = time.perf_counter()
    bar = tqdm(todo, disable=not progress, unit="cell", dynamic_ncols=True, desc="bench", mininterval=1.0)
    for index, cell in enumerate(bar):
        if stop_after is not None and time.perf_counter() - started + cell.budget.cell_seconds() > stop_after:
            counts["left"] = len(todo) - index
            hint = (f"; no cell fits: one may take {cell.budget.cell_seconds():.0f} s, so raise --stop-after or lower "
                    "--max-seconds/--eval-seconds") if index == 0 else ""
            bar.write(f"stopped after {time.perf_counter() - started:.0f} s: {counts['left']} cells left "
                      f"(run the same command again to continue){hint}")
            break
        bar.set_postfix_str(f"{cell.model} {cell.task.label} s{cell.seed}", refresh=False)
        try:
            row = runner(cell)
            counts["ok"] += 1
        except Exception as error:  # noqa: BLE001  one broken layer/task must not stop the grid
            row = {
                "key": cell.key, "status": "error", "model": cell.model, "task": cell.task.name,
                "task_label": cell.task.label, "d_model": cell.d_model, "seed": cell.seed,
                "budget": cell.budget.name, "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(limit=6),
            }
            counts["error"] += 1
            bar.write(f"cell {cell.key} failed: {row['error']}")
        append_line(out, row)
        if not progress:
            status = f"{row.get('metric', '')} {row['score']:.4f}" if row["status"] == "ok" else "error"
            log(f"[{counts['ok'] + counts['error']}/{len(todo)}] {cell.key}: {status}")
    bar.close()
    return counts


def describe_budget(budget: Budget) -> str:
    """One line: the budget's settings."""
    return ", ".join(f"{k}={v}" for k, v in asdict(budget).items())


__all__ = [
    "BUDGETS", "Budget", "Cell", "DEFAULT_TASKS", "STARTUP_SECONDS", "TaskSpec", "append_line", "build_cells", "default_models",
    "describe_budget", "downsample", "estimate_seconds", "parse_model", "read_results", "run_cell",
    "run_grid",
]

