"""``rnnkit report``: a results file of ``rnnkit bench tasks`` -> markdown tables, PNG plots, one HTML page.

Every number in a table is the mean over seeds with its spread (sample standard deviation, ``n`` seeds)
so a reader sees at once whether a gap between two models is larger than the seed-to-seed noise.
Plots (matplotlib, the ``bench`` extra): accuracy vs state size on MQAR (Arora et al. 2024), accuracy
vs test length on the length-generalisation tasks, and training-loss curves. The HTML page embeds the
images as base64, so it is a single file that can be mailed or attached to an issue.
"""

from __future__ import annotations

import base64
import html
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from rnnkit.atomic import write_atomic, write_text_atomic
from rnnkit.bench.grid import read_results
from rnnkit.errors import InputError

#: Tasks whose accuracy vs test length is plotted (state tracking and memory probes).
LENGTH_TASKS = ("parity", "modular_sum", "permutation_composition", "n_parity", "n_dms", "induction_heads",
                "selective_copy", "copy", "mqar")


def mean_spread(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count of finite ``values``."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def fmt(values: Iterable[float], digits: int = 3) -> str:
    """``"0.953 ± 0.012"`` (mean ± sample std over seeds); ``"–"`` when there is no value."""
    mean, spread, n = mean_spread(values)
    if n == 0:
        return "–"
    return f"{mean:.{digits}f} ± {spread:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _models(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({r["model"] for r in rows})


def _group(rows: list[dict[str, Any]], *keys: str) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in keys)].append(r)
    return groups


def markdown_tables(rows: list[dict[str, Any]]) -> str:
    """The report's tables as markdown: score per task x model, length generalisation, cost per model."""
    models = _models(rows)
    seeds = sorted({r["seed"] for r in rows})
    budgets = sorted({r["budget"] for r in rows})
    out = [
        f"Budget(s): {', '.join(budgets)}. Seeds: {len(seeds)} ({', '.join(map(str, seeds))}). "
        "Cells: mean ± sample standard deviation over seeds of the test metric at the training length "
        "(accuracy: higher is better; mse, wer, bpc: lower is better).",
        "",
        "| task | metric | d_model | " + " | ".join(models) + " |",
        "|---|---|---|" + "---|" * len(models),
    ]
    by_cell = _group(rows, "task_label", "d_model", "model")
    for task, width in sorted({(r["task_label"], r["d_model"]) for r in rows}):
        metric = next(r["metric"] for r in rows if r["task_label"] == task)
        cells = [fmt(r["score"] for r in by_cell.get((task, width, m), [])) for m in models]
        out.append(f"| {task} | {metric} | {width} | " + " | ".join(cells) + " |")

    lengthy = [r for r in rows if len(r["test"]) > 1]
    if lengthy:
        out += ["", "Length generalisation: test metric at each test length (trained at the first).", "",
                "| task | d_model | model | " + " | ".join(["length 1x", "2x", "4x"]) + " |", "|---|---|---|---|---|---|"]
        for (task, width, model), group in sorted(_group(lengthy, "task_label", "d_model", "model").items()):
            lengths = sorted({int(T) for r in group for T in r["test"]})
            metric = group[0]["metric"]
            cells = [f"{fmt(r['test'][str(T)][metric] for r in group if str(T) in r['test'])} (T={T})" for T in lengths]
            cells += [""] * (3 - len(cells))
            out.append(f"| {task} | {width} | {model} | " + " | ".join(cells[:3]) + " |")

    out += ["", "Cost per model (means over all its cells).", "",
            "| model | d_model | parameters | state floats | tokens/s | train s/cell | cells |", "|---|---|---|---|---|---|---|"]
    for (model, width), group in sorted(_group(rows, "model", "d_model").items()):
        params = statistics.median(r["params"] for r in group)
        states = sorted({r["state_size"] for r in group if r.get("state_size") is not None})
        state = "/".join(str(s) for s in states) if states else "grows with T"
        out.append(
            f"| {model} | {width} | {params:,.0f} | {state} | {fmt((r['tokens_per_second'] for r in group), 0)} | "
            f"{fmt((r['train_seconds'] for r in group), 1)} | {len(group)} |"
        )
    return "\n".join(out) + "\n"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise InputError("rnnkit report: expected matplotlib for the plots, got none: pip install 'rnnkit[bench]'") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _colors(models: list[str]) -> dict[str, Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab20" if len(models) > 10 else "tab10")
    return {m: cmap(i % cmap.N) for i, m in enumerate(models)}


def _panel_grid(plt, count: int, panel_height: float):
    """A figure with ``count`` panels, at most 4 a row."""
    cols = min(4, count)
    nrows = math.ceil(count / cols)
    return plt.subplots(nrows, cols, figsize=(4.2 * cols, panel_height * nrows), squeeze=False)


def _write_png(plt, fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` as a PNG (atomically) and release it."""
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def _save_panels(plt, fig, axes, used: int, path: Path) -> Path:
    """Blank the unused panels, add one legend for all of them below, write ``path``."""
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(8, len(names)), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _write_png(plt, fig, path)


def plot_mqar_state(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Accuracy vs state size (log x) on MQAR, one line per model through its widths; error bars = seed std."""
    mqar = [r for r in rows if r["task"] == "mqar" and r.get("state_size")]
    if not mqar:
        return None
    plt = _pyplot()
    labels = sorted({r["task_label"] for r in mqar})
    fig, axes = plt.subplots(1, len(labels), figsize=(8.5 * len(labels), 4.2), squeeze=False)
    colors = _colors(_models(mqar))
    for ax, label in zip(axes[0], labels):
        for model, group in sorted(_group([r for r in mqar if r["task_label"] == label], "model").items()):
            points = []
            for (state,), cell in sorted(_group(group, "state_size").items()):
                mean, spread, _ = mean_spread(r["score"] for r in cell)
                points.append((state, mean, spread))
            xs, ys, es = zip(*points)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=model[0], color=colors[model[0]])
        ax.set_xscale("log")
        ticks = sorted({r["state_size"] for r in mqar if r["task_label"] == label})
        if len(ticks) <= 8:  # every state size labelled; more would overlap, so log ticks then
            ax.set_xticks(ticks, [f"{t:,}" for t in ticks], fontsize=8)
            ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("recurrent state (floats per sequence)")
        ax.set_ylabel("test accuracy")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: lines end top right
    fig.suptitle("MQAR: recall vs state size")
    fig.tight_layout()
    return _write_png(plt, fig, path)


def plot_lengths(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Test accuracy vs test length per task (one panel each), a line per model (mean over seeds)."""
    lengthy = [r for r in rows if r["task"] in LENGTH_TASKS and len(r["test"]) > 1 and r["metric"] == "accuracy"]
    if not lengthy:
        return None
    plt = _pyplot()
    panels = sorted({(r["task_label"], r["d_model"]) for r in lengthy})
    fig, axes = _panel_grid(plt, len(panels), panel_height=3.4)
    colors = _colors(_models(lengthy))
    for ax, (label, width) in zip(axes.flat, panels):
        group = [r for r in lengthy if r["task_label"] == label and r["d_model"] == width]
        for (model,), cell in sorted(_group(group, "model").items()):
            lengths = sorted({int(T) for r in cell for T in r["test"]})
            means = [mean_spread(r["test"][str(T)]["accuracy"] for r in cell if str(T) in r["test"])[0] for T in lengths]
            ax.plot(lengths, means, marker="o", label=model, color=colors[model])
        ax.axvline(group[0]["train_len"], color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ticks = sorted({int(T) for r in group for T in r["test"]})
        ax.set_xticks(ticks, [str(T) for T in ticks])  # the actual lengths, not powers of two
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{label} (d={width})", fontsize=9)
        ax.set_xlabel("test length T (dotted: training T)", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.grid(alpha=0.3)
    return _save_panels(plt, fig, axes, len(panels), path)


def plot_loss_curves(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Training loss vs step per task (one panel each), a line per model (mean over seeds of the bucketed curve)."""
    curved = [r for r in rows if r.get("loss_curve")]
    if not curved:
        return None
    plt = _pyplot()
    panels = sorted({(r["task_label"], r["d_model"]) for r in curved})
    fig, axes = _panel_grid(plt, len(panels), panel_height=3.2)
    colors = _colors(_models(curved))
    for ax, (label, width) in zip(axes.flat, panels):
        group = [r for r in curved if r["task_label"] == label and r["d_model"] == width]
        for (model,), cell in sorted(_group(group, "model").items()):
            steps = [p[0] for p in min((r["loss_curve"] for r in cell), key=len)]
            losses = [statistics.fmean(r["loss_curve"][i][1] for r in cell) for i in range(len(steps))]
            ax.plot(steps, losses, label=model, color=colors[model], linewidth=1.2)
        ax.set_title(f"{label} (d={width})", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("train loss", fontsize=8)
        ax.grid(alpha=0.3)
    return _save_panels(plt, fig, axes, len(panels), path)


def _markdown_to_html(text: str) -> str:
    """The tables and paragraphs of :func:`markdown_tables` as HTML (just the subset it writes)."""
    parts, table = [], []

    def flush() -> None:
        if not table:
            return
        head, *body = table
        cells = lambda row, tag: "".join(f"<{tag}>{html.escape(c.strip())}</{tag}>" for c in row.strip("|").split("|"))  # noqa: E731
        parts.append("<table><thead><tr>" + cells(head, "th") + "</tr></thead><tbody>"
                     + "".join("<tr>" + cells(r, "td") + "</tr>" for r in body if not set(r) <= set("|-")) + "</tbody></table>")
        table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.strip():
            parts.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(parts)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}thead{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}
.err{color:#a00}"""


def write_report(results: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write ``report.md``, the PNG plots and ``report.html`` (self-contained) for a results file.

    Returns:
        The paths written.
    """
    all_rows = read_results(results)
    if not all_rows:
        raise InputError(f"results: expected a non-empty file written by `rnnkit bench tasks`, got {results}")
    rows = [r for r in all_rows if r.get("status") == "ok"]
    errors = [r for r in all_rows if r.get("status") == "error"]
    if not rows:
        raise InputError(f"results: expected at least one finished cell in {results}, got only {len(errors)} failed ones")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = markdown_tables(rows)
    if errors:
        tables += "\nFailed cells (re-run the bench command to retry): " + ", ".join(sorted({r["key"] for r in errors})) + "\n"
    plots = [
        ("Recall vs state size (MQAR)", plot_mqar_state(rows, out / "mqar_state_size.png")),
        ("Accuracy vs test length", plot_lengths(rows, out / "length_generalisation.png")),
        ("Training loss curves", plot_loss_curves(rows, out / "loss_curves.png")),
    ]
    plots = [(title, path) for title, path in plots if path is not None]
    md = ["# rnnkit task benchmark", "", f"Source: `{results}` ({len(rows)} cells).", "", tables]
    md += [f"## {title}\n\n![{title}]({path.name})\n" for title, path in plots]
    md_path = out / "report.md"
    write_text_atomic(md_path, "\n".join(md))
    images = "".join(
        f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,"
        f"{base64.b64encode(path.read_bytes()).decode()}'>"
        for title, path in plots
    )
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>rnnkit task benchmark</title><style>{STYLE}</style>"
            f"</head><body><h1>rnnkit task benchmark</h1><p>Source: <code>{html.escape(str(results))}</code> "
            f"({len(rows)} cells).</p>{_markdown_to_html(tables)}{images}</body></html>")
    html_path = out / "report.html"
    write_text_atomic(html_path, page)
    return [md_path, *(p for _, p in plots), html_path]
