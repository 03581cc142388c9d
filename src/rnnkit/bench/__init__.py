"""Benchmarks over the registries: the task grid (``rnnkit bench tasks``) and its report (``rnnkit report``)."""

from rnnkit.bench.grid import (
    BUDGETS,
    DEFAULT_TASKS,
    Budget,
    Cell,
    TaskSpec,
    build_cells,
    default_models,
    estimate_seconds,
    read_results,
    run_cell,
    run_grid,
)

__all__ = [
    "BUDGETS", "DEFAULT_TASKS", "Budget", "Cell", "TaskSpec", "build_cells", "default_models", "estimate_seconds",
    "read_results", "run_cell", "run_grid",
]
