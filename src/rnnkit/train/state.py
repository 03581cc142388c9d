"""What a resumable checkpoint holds beyond the weights, and how it is written, read and checked.

A checkpoint directory (see :mod:`rnnkit.train.checkpoint` for its commit protocol) holds the model
(``model.safetensors`` + ``config.json``), ``optimizer.pt``, ``trainer_state.pt`` (step, every rank's
RNG states and carried TBPTT state, the per-step history, counters) and ``train.json`` (the run's
description, compared on resume so that a run never continues under a different configuration).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch

from rnnkit.atomic import write_atomic, write_json_atomic
from rnnkit.errors import InputError
from rnnkit.train.config import RESUME_FREE_FIELDS, TrainConfig

#: Per-step records kept in ``Trainer.history``, the checkpoint and ``train.csv``.
HISTORY_KEYS = ("step", "loss", "lr", "grad_norm", "skipped", "tokens_per_second", "elapsed")
CHECKPOINT_FORMAT = 1


def history_tensor(history: list[dict[str, float]]) -> torch.Tensor:
    """``(len(history), len(HISTORY_KEYS))`` float64: the per-step records as the checkpoint stores them."""
    rows = torch.tensor([[float(r[k]) for k in HISTORY_KEYS] for r in history], dtype=torch.float64)
    return rows.reshape(len(history), len(HISTORY_KEYS))


def history_records(keys: list[str], rows: torch.Tensor) -> list[dict[str, float]]:
    """Inverse of :func:`history_tensor`."""
    return [{k: (int(v) if k in ("step", "skipped") else float(v)) for k, v in zip(keys, row)} for row in rows.tolist()]


def write_checkpoint_files(
    tmp: Path, model, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any], description: dict[str, Any]
) -> None:
    """Fill a checkpoint directory (every file written atomically and fsynced)."""
    model.save_pretrained(tmp)  # config.json names the model's class, so the checkpoint loads as one
    write_atomic(tmp / "optimizer.pt", lambda name: torch.save(optimizer.state_dict(), name))
    write_atomic(tmp / "trainer_state.pt", lambda name: torch.save(trainer_state, name))
    write_json_atomic(tmp / "train.json", description)


def read_checkpoint_files(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``(train.json, trainer_state, optimizer state_dict)`` of a checkpoint, on the CPU.

    Raises:
        InputError: any of them is unreadable (truncated, bad JSON, I/O error).
    """
    try:
        info = json.loads((path / "train.json").read_text())
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file (truncated pickle, bad JSON, I/O) is the same user error
        raise InputError(f"checkpoint: expected a readable checkpoint at {path}, got error: {error}") from None
    return info, state, optimizer_state


def check_format(state: dict[str, Any], world_size: int) -> None:
    if state.get("format") != CHECKPOINT_FORMAT or state["world_size"] != world_size:
        raise InputError(
            f"checkpoint: expected format {CHECKPOINT_FORMAT} written by {world_size} process(es), "
            f"got format {state.get('format')} written by {state.get('world_size')}"
        )


def check_same_run(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Raise InputError listing every field in which the run described by ``current`` differs from the
    checkpoint's ``saved`` description (fields that do not change the trajectory may differ)."""
    current = json.loads(json.dumps(current))  # as it reads back from JSON (tuples become lists)
    # A field added to TrainConfig after the checkpoint was written had its default value there.
    defaults = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(TrainConfig)
                                      if f.default is not dataclasses.MISSING}))
    diffs = _differences("train", {**defaults, **saved.get("train", {})}, current["train"], RESUME_FREE_FIELDS)
    diffs += _differences("model", saved.get("model", {}), current["model"])
    # A learned vocabulary or tokenizer can be large: compare it by digest, so a changed corpus is named, not printed.
    diffs += _differences("task", _digest_state(saved.get("task", {})), _digest_state(current["task"]))
    if diffs:
        raise InputError(
            f"resume: expected the configuration of the checkpoint at {path}, got {len(diffs)} differing "
            "field(s):\n  " + "\n  ".join(diffs)
        )


def _digest_state(task: dict[str, Any]) -> dict[str, Any]:
    if "state" not in task:
        return task
    text = json.dumps(task["state"], sort_keys=True).encode()
    return dict(task, state=f"sha256:{hashlib.sha256(text).hexdigest()[:16]}")


def _differences(prefix: str, saved: dict[str, Any], current: dict[str, Any], ignore=frozenset()) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            out.append(f"{prefix}.{key}: checkpoint {a!r}, now {b!r}")
    return out


def unflatten_like(template: Any, leaves: Iterator[torch.Tensor]) -> Any:
    """Rebuild a state with ``template``'s structure from tensors in ``flatten_state`` order."""
    if isinstance(template, torch.Tensor):
        leaf = next(leaves)
        if leaf.shape != template.shape:
            raise InputError(f"checkpoint: carried state: expected shape {tuple(template.shape)}, got {tuple(leaf.shape)}")
        return leaf.to(device=template.device, dtype=template.dtype)
    parts = [unflatten_like(part, leaves) for part in template]
    return type(template)(*parts) if hasattr(template, "_fields") else tuple(parts)


__all__ = [
    "CHECKPOINT_FORMAT", "HISTORY_KEYS", "check_format", "check_same_run", "history_records", "history_tensor",
    "read_checkpoint_files", "unflatten_like", "write_checkpoint_files",
]
