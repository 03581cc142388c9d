"""A user's own sequences as a task: long-format CSV or Parquet tables, or NumPy ``.npz`` arrays.

Tables are in long format, one row per time step: an id column (which sequence), optionally a time
column (the order of the steps; file order otherwise), feature columns and label column(s). Reading
goes through pandas (and pyarrow for Parquet; the ``data`` extra). An ``.npz`` file holds ``x``
``(N, T, D)``, ``y`` and optionally ``lengths`` ``(N,)`` and ``ids`` ``(N,)``.

Everything learned from the training file (feature and target means and standard deviations over
the training split, the column names, the class labels, the longest length) is the task's
:meth:`~SequencesTask.portable_state`, saved with every model, so a restored task prepares a new
file exactly as at training time without the training file (:meth:`SequencesTask.predict`,
:meth:`SequencesTask.with_input`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rnnkit.errors import InputError, check_choice, check_positive_int, describe
from rnnkit.targets import IGNORE_INDEX, target_kind
from rnnkit.tasks.base import derive_seed, register_task
from rnnkit.tasks.bucketing import pad_sequences
from rnnkit.tasks.collate import IndexedTask

#: ``target=`` values: the target kinds a table can feed, and ``forecast`` (values of the next step).
TARGET_OPTIONS = ("classify", "regress", "per_step", "regress_per_step", "multilabel", "forecast")
MISSING_POLICIES = ("error", "drop", "ffill", "zero")
TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".npz": "npz"}
METRICS_OF = {"classify": ("loss", "accuracy"), "per_step": ("loss", "accuracy"), "regress": ("loss", "mse"),
              "regress_per_step": ("loss", "mse"), "multilabel": ("loss", "accuracy", "f1")}
INSTALL_HINT = "pip install 'rnnkit[data]' (pandas, pyarrow)"
STATE_FORMAT = 1


@dataclass
class RawSequences:
    """Sequences read from a file, before missing values, normalisation and class ids.

    Attributes:
        ids: ``N`` sequence ids.
        times: ``N`` arrays ``(T_i,)`` of the time column's values (step indices without one).
        x: ``N`` float64 arrays ``(T_i, D)``.
        labels: ``N`` arrays ``(T_i, W)`` (per-step targets) or ``(W,)`` (per-sequence), of any dtype
            (class labels may be strings); None when the file has no labels.
    """

    ids: list[Any]
    times: list[np.ndarray]
    x: list[np.ndarray]
    labels: list[np.ndarray] | None = None
    dropped: list[Any] = field(default_factory=list)


def _names(value: Any, option: str) -> list[str] | None:
    """A column list from ``"a,b"``, ``["a", "b"]`` or ``"a"``; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        names = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        names = list(value)
    else:
        raise InputError(f"{option}: expected a column name or names ('a,b' or a list of strings), got {describe(value)}")
    if not names:
        raise InputError(f"{option}: expected at least one column name, got {value!r}")
    return names


def _python(value: Any) -> Any:
    """A JSON-friendly Python scalar of a NumPy/pandas value (class labels, ids)."""
    return value.item() if hasattr(value, "item") else value


def _pandas():
    try:
        import pandas
    except ImportError:
        raise InputError(f"sequences: expected pandas to read tables, got none installed: {INSTALL_HINT}") from None
    return pandas


def file_format(path: str | os.PathLike) -> str:
    """``"csv"``, ``"parquet"`` or ``"npz"`` from the file's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise InputError(f"path: expected a file ending in {sorted(TABLE_SUFFIXES)}, got {str(path)!r}")
    return TABLE_SUFFIXES[suffix]


def read_sequences(path: str | os.PathLike, *, id: str = "id", time: str | None = None,
                   features: Sequence[str] | None = None, labels: Sequence[str] | None = None,
                   per_step_labels: bool = True, require_labels: bool = True) -> tuple[RawSequences, list[str], list[str]]:
    """Read a table or ``.npz`` file into per-sequence arrays.

    Args:
        path: a ``.csv``, ``.parquet``/``.pq`` or ``.npz`` file.
        id, time: the id and time columns of a table (``time=None``: the steps in file order).
        features: feature columns (None: every numeric column but the id, time and label columns).
        labels: label columns (None: no labels).
        per_step_labels: labels are per step (else one value per sequence, the same on all its rows).
        require_labels: a missing label column is an error (else the sequences come without labels).

    Returns:
        The :class:`RawSequences`, the feature names and the label names (``[]`` without labels).
    """
    path = Path(path)
    kind = file_format(path)
    if not path.is_file():
        raise InputError(f"path: expected an existing file, got {str(path)!r}")
    if kind == "npz":
        return _read_npz(path, features, labels, per_step_labels, require_labels)
    pandas = _pandas()
    try:
        frame = pandas.read_csv(path) if kind == "csv" else pandas.read_parquet(path)
    except ImportError as error:
        raise InputError(f"path: expected a Parquet reader (pyarrow), got {error}: {INSTALL_HINT}") from None
    except (ValueError, OSError, pandas.errors.ParserError) as error:
        raise InputError(f"path: expected a readable {kind} file, got {str(path)!r} ({error})") from None
    return _from_frame(frame, path, id, time, features, labels, per_step_labels, require_labels)


def _from_frame(frame, path, id, time, features, labels, per_step_labels, require_labels):
    pandas = _pandas()
    columns = list(frame.columns)
    for option, name in (("id", id), ("time", time)):
        if name is not None and name not in columns:
            raise InputError(f"{option}: expected a column of {path.name} ({columns}), got {name!r}")
    labels = list(labels or [])
    present = [n for n in labels if n in columns]
    if present != labels and (require_labels or present):
        missing = [n for n in labels if n not in columns]
        raise InputError(f"label: expected columns of {path.name} ({columns}), got missing {missing}")
    labels = present
    if features is None:
        skip = {id, time, *labels}
        features = [c for c in columns if c not in skip and pandas.api.types.is_numeric_dtype(frame[c])
                    and not pandas.api.types.is_bool_dtype(frame[c])]
        if not features:
            raise InputError(f"features: expected numeric columns besides id/time/label in {path.name}, got none ({columns})")
    for name in features:
        if name not in columns:
            raise InputError(f"features: expected columns of {path.name} ({columns}), got {name!r}")
        if not pandas.api.types.is_numeric_dtype(frame[name]):
            raise InputError(f"features: expected numeric column {name!r}, got dtype {frame[name].dtype}")
    if frame[id].isna().any():
        raise InputError(f"id: expected an id on every row of {path.name}, got {int(frame[id].isna().sum())} row(s) without")
    order = pandas.unique(frame[id])  # sequences in the order they first appear in the file
    if time is not None:
        if frame.duplicated([id, time]).any():
            first = frame[frame.duplicated([id, time])].iloc[0]
            raise InputError(f"time: expected one row per (id, time), got repeated time {_python(first[time])!r} "
                             f"for id {_python(first[id])!r}")
        frame = frame.sort_values([id, time], kind="mergesort")
    groups = dict(tuple(frame.groupby(id, sort=False)))
    raw = RawSequences([], [], [], [] if labels else None)
    for key in order:
        group = groups[key]
        raw.ids.append(_python(key))
        raw.times.append(group[time].to_numpy() if time is not None else np.arange(len(group)))
        raw.x.append(group[features].to_numpy(dtype=np.float64))
        if labels:
            values = group[labels].to_numpy()
            raw.labels.append(values if per_step_labels else _one_label(values, labels, raw.ids[-1]))
    return raw, list(features), labels


def _one_label(values: np.ndarray, names: list[str], id_: Any) -> np.ndarray:
    """The per-sequence label ``(W,)`` of one id's rows ``(T_i, W)``: its one non-missing value per
    column (NaN where the id has none; an error where it has two)."""
    pandas = _pandas()
    out = np.empty(values.shape[1], dtype=object)
    for j, name in enumerate(names):
        seen = pandas.unique(values[~pandas.isna(values[:, j]), j])
        if len(seen) > 1:
            raise InputError(f"label: expected one {name!r} value per sequence, got {sorted(map(str, seen))} "
                             f"for id {id_!r}")
        out[j] = seen[0] if len(seen) else np.nan
    return out


def _read_npz(path, features, labels, per_step_labels, require_labels):
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise InputError(f"path: expected a readable .npz file, got {str(path)!r} ({error})") from None
    if "x" not in data.files or data["x"].ndim != 3:
        raise InputError(f"{path.name}: expected an array 'x' of shape (N, T, D), got "
                         f"{data['x'].shape if 'x' in data.files else 'no x'}")
    x = data["x"].astype(np.float64)
    n, steps, width = x.shape
    lengths = data["lengths"] if "lengths" in data.files else np.full(n, steps)
    if lengths.shape != (n,) or (lengths < 1).any() or (lengths > steps).any():
        raise InputError(f"{path.name}: expected 'lengths' (N,) = ({n},) in [1, {steps}], got {describe(torch.as_tensor(lengths))}")
    ids = [_python(v) for v in data["ids"]] if "ids" in data.files else list(range(n))
    feature_names = [f"x{j}" for j in range(width)]
    if features is not None and list(features) != feature_names:
        raise InputError(f"features: expected None or {feature_names} for an .npz file, got {list(features)}")
    raw = RawSequences(ids, [np.arange(int(t)) for t in lengths], [x[i, : int(lengths[i])] for i in range(n)])
    if labels is None or "y" not in data.files:  # labels not asked for, or absent
        if require_labels and labels is not None:
            raise InputError(f"{path.name}: expected an array 'y' of targets, got arrays {data.files}")
        return raw, feature_names, []
    y = data["y"]
    if per_step_labels:
        if y.ndim not in (2, 3) or y.shape[:2] != (n, steps):
            raise InputError(f"{path.name}: expected per-step 'y' of shape (N, T[, W]) = ({n}, {steps}[, W]), got {y.shape}")
        y = y.reshape(n, steps, -1)
        raw.labels = [y[i, : int(lengths[i])] for i in range(n)]
    else:
        if y.ndim not in (1, 2) or y.shape[0] != n:
            raise InputError(f"{path.name}: expected per-sequence 'y' of shape (N[, W]) = ({n}[, W]), got {y.shape}")
        y = y.reshape(n, -1)
        raw.labels = [y[i] for i in range(n)]
    names = ["y"] if raw.labels[0].shape[-1] == 1 else [f"y{j}" for j in range(raw.labels[0].shape[-1])]
    return raw, feature_names, names


def apply_missing(raw: RawSequences, policy: str, features: list[str], labels: list[str]) -> RawSequences:
    """Apply the missing-value policy to features and labels (NaN, or None for class labels).

    ``error``: any missing value raises, naming the column and the count. ``drop``: steps with a
    missing feature or per-step label are removed, and sequences left without steps or without their
    per-sequence label. ``ffill``: each column carries its last value forward within a sequence (the
    first value backward to the start; 0 where a sequence has none). ``zero``: missing values become 0.
    Per-sequence labels cannot be invented: under ``ffill`` and ``zero`` a missing one is an error.
    """
    pandas = _pandas() if raw.labels is not None else None
    missing_x = [np.isnan(x) for x in raw.x]
    per_step = raw.labels is not None and raw.labels[0].ndim == 2
    missing_y = [pandas.isna(y) for y in raw.labels] if raw.labels is not None else None
    if policy == "error" or (not per_step and missing_y is not None and policy in ("ffill", "zero")):
        checks = [] if policy != "error" else [(features, missing_x)]
        if missing_y is not None:
            checks.append((labels, missing_y))
        for names, masks in checks:
            counts = sum(m.reshape(-1, len(names)).sum(0) for m in masks)
            for name, count in zip(names, np.atleast_1d(counts)):
                if count:
                    raise InputError(f"column {name!r}: expected no missing values (missing={policy!r}), got {int(count)} "
                                     "missing; choose missing='drop', 'ffill' or 'zero'"
                                     + (" (a sequence's label can only be dropped)" if policy != "error" else ""))
        if policy == "error":
            return raw
    out = RawSequences([], [], [], [] if raw.labels is not None else None, list(raw.dropped))
    for i, id_ in enumerate(raw.ids):
        x, times = raw.x[i], raw.times[i]
        y = raw.labels[i] if raw.labels is not None else None
        if policy == "drop":
            keep = ~missing_x[i].any(1)
            if per_step:
                keep &= ~missing_y[i].any(1)
            elif y is not None and missing_y[i].any():
                keep[:] = False
            x, times = x[keep], times[keep]
            if per_step:
                y = y[keep]
            if not keep.any():
                out.dropped.append(id_)
                continue
        elif policy == "ffill":
            x = _fill_forward(x)
            if per_step:
                y = _fill_forward(y)
        else:  # zero
            x = np.where(missing_x[i], 0.0, x)
            if per_step:
                y = np.where(missing_y[i], 0, y)
        out.ids.append(id_)
        out.times.append(times)
        out.x.append(x)
        if out.labels is not None:
            out.labels.append(y)
    return out


def _fill_forward(values: np.ndarray) -> np.ndarray:
    """Forward-fill ``(T, W)`` per column, then back-fill the start, then 0 where a column is all missing."""
    pandas = _pandas()
    frame = pandas.DataFrame(values).ffill().bfill()
    return frame.fillna(0).to_numpy(dtype=values.dtype if values.dtype != object else object)


def _class_key(value: Any) -> Any:
    """Sort key that orders numbers numerically and everything else as text."""
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


@register_task("sequences")
class SequencesTask(IndexedTask):
    """A user's own sequences from a CSV/Parquet table (long format) or an ``.npz`` file.

    Args:
        path: the file: ``.csv``, ``.parquet`` (``.pq``) or ``.npz``.
        id: the id column of a table (one sequence per id; default ``"id"``).
        time: the column that orders each sequence's steps (default: file order).
        features: feature columns, ``"a,b,c"`` or a list (default: every numeric column other than the
            id, time and label columns).
        label: label column(s), ``"y"`` or ``"a,b"``. A per-sequence label is the one value an id
            carries (on every row, or on some rows with the others empty).
        target: ``"classify"`` (a class per sequence), ``"regress"`` (values per sequence),
            ``"per_step"`` (a class per step), ``"regress_per_step"`` (values per step),
            ``"multilabel"`` (0/1 label columns per step) or ``"forecast"`` (the next step's label
            columns, or every feature without ``label``, from the steps so far: a causal
            ``regress_per_step`` whose model can generate).
        missing: ``"error"`` (default: a message names the column and the count), ``"drop"``,
            ``"ffill"`` or ``"zero"`` (see :func:`apply_missing`).
        val_fraction, test_fraction: share of the ids in ``val`` and ``test`` (default 0.1 each; at
            least one id each when positive). ``val_fraction=0``: ``val`` is the training split.
        test_ids: ids that form the test split (a list or ``"a,b"``), instead of ``test_fraction``.
        split_seed: seed of the split: ids are ranked by a hash of ``(split_seed, id)``, so an id's
            split depends on neither the file's row order nor the training seed.
        normalize: standardise features (and real-valued targets) with the training split's mean and
            standard deviation (default True). MSE is then in standardised units; predictions are
            written in the file's units.
        pool_batches: batches per length-sorting pool of a training epoch (1: plain random batches).

    Batches: ``x`` ``(B, T, D)`` float32 right-padded to the batch's longest sequence (or ``seq_len``,
    which must be at least the longest), ``lengths`` ``(B,)`` when ragged, ``y`` as the target kind
    declares (:data:`rnnkit.targets.TARGET_KINDS`); class labels are mapped to ids in sorted order.

    Example:
        >>> task = build_task("sequences", path="data.csv", label="activity", time="t")
        >>> task.n_classes, task.d_input, task.classes
    """

    input_kind = "features"
    target = "classify"

    def __init__(self, *, path: str, id: str = "id", time: str | None = None, features: Any = None,
                 label: Any = None, target: str = "classify", missing: str = "error", val_fraction: float = 0.1,
                 test_fraction: float = 0.1, test_ids: Any = None, split_seed: int = 0, normalize: bool = True,
                 pool_batches: int = 50) -> None:
        self._configure(path=path, id=id, time=time, features=features, label=label, target=target, missing=missing,
                        val_fraction=val_fraction, test_fraction=test_fraction, test_ids=test_ids,
                        split_seed=split_seed, normalize=normalize, pool_batches=pool_batches)
        self._data: dict[str, list[tuple[Any, ...]]] | None = None
        self._whole_file = False
        raw = self._read(labelled=True)
        train_ids = set(self._assign(raw.ids)["train"])
        self._fit(raw, train_ids)
        self._data = self._encode_splits(raw)

    def _configure(self, **options: Any) -> None:
        """Check and keep the options, and set what follows from them alone."""
        file_format(options["path"])
        if not isinstance(options["id"], str) or (options["time"] is not None and not isinstance(options["time"], str)):
            raise InputError(f"id/time: expected column names, got id={options['id']!r}, time={options['time']!r}")
        check_choice("target", options["target"], TARGET_OPTIONS)
        check_choice("missing", options["missing"], MISSING_POLICIES)
        for name in ("val_fraction", "test_fraction"):
            value = options[name]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
                raise InputError(f"{name}: expected a number in [0, 1), got {value!r}")
        if options["val_fraction"] + options["test_fraction"] >= 1:
            raise InputError(f"val_fraction + test_fraction: expected less than 1, got "
                             f"{options['val_fraction'] + options['test_fraction']}")
        check_positive_int("split_seed", options["split_seed"], minimum=0)
        check_positive_int("pool_batches", options["pool_batches"])
        if not isinstance(options["normalize"], bool):
            raise InputError(f"normalize: expected True or False, got {options['normalize']!r}")
        test_ids = options["test_ids"]
        if isinstance(test_ids, str):
            test_ids = [v.strip() for v in test_ids.split(",") if v.strip()]
        elif isinstance(test_ids, (int, float)):
            test_ids = [test_ids]
        elif test_ids is not None and not isinstance(test_ids, (list, tuple)):
            raise InputError(f"test_ids: expected a list of ids or 'a,b', got {describe(test_ids)}")
        options["test_ids"] = None if test_ids is None else list(test_ids)
        options["features"] = _names(options["features"], "features")
        options["label"] = _names(options["label"], "label")
        if options["label"] is None and options["target"] != "forecast":
            raise InputError(f"label: expected the label column(s) for target={options['target']!r}, got None")
        if options["target"] in ("classify", "per_step") and len(options["label"]) != 1:
            raise InputError(f"label: expected one label column for target={options['target']!r}, got {options['label']}")
        if options["path"] and not isinstance(options["path"], str):
            options["path"] = str(options["path"])
        super().__init__(**options)
        self.path = options["path"]
        self.forecast = options["target"] == "forecast"
        self.target = "regress_per_step" if self.forecast else options["target"]
        self.predicts_next_step = self.forecast
        self.metrics = METRICS_OF[self.target]
        self.pool_batches = options["pool_batches"]
        self.kind = target_kind(self.target)

    # ------------------------------------------------------------------ reading
    def _read(self, labelled: bool, path: str | None = None) -> RawSequences:
        o = self.options
        raw, features, labels = read_sequences(
            path or self.path, id=o["id"], time=o["time"], features=getattr(self, "features", None) or o["features"],
            labels=o["label"] if labelled else None, per_step_labels=self.kind.per_step, require_labels=labelled,
        )
        if hasattr(self, "features") and list(features) != list(self.features):
            raise InputError(f"features: expected the training columns {self.features}, got {features}")
        self.features = features
        self.label_names = labels or getattr(self, "label_names", [])
        return apply_missing(raw, o["missing"], features, labels)

    def _assign(self, ids: list[Any]) -> dict[str, list[Any]]:
        """The ids of each split (all of them in ``val`` and ``test`` for a file given by :meth:`with_input`)."""
        if self._whole_file:
            return {"train": list(ids), "val": list(ids), "test": list(ids)}
        o = self.options
        ranked = sorted(ids, key=lambda v: derive_seed("sequences", o["split_seed"], str(v)))
        if o["test_ids"] is not None:
            wanted = {str(v) for v in o["test_ids"]}
            test = [v for v in ids if str(v) in wanted]
            unknown = sorted(wanted - {str(v) for v in test})
            if unknown:
                raise InputError(f"test_ids: expected ids of {self.path}, got unknown {unknown}")
            ranked = [v for v in ranked if str(v) not in wanted]
        else:
            n_test = max(1, round(o["test_fraction"] * len(ids))) if o["test_fraction"] > 0 else 0
            test, ranked = ranked[:n_test], ranked[n_test:]
        n_val = max(1, round(o["val_fraction"] * len(ids))) if o["val_fraction"] > 0 else 0
        val, train = ranked[:n_val], ranked[n_val:]
        if not train:
            raise InputError(f"val_fraction/test_fraction: expected ids left for training among the {len(ids)} of "
                             f"{self.path}, got none")
        order = {v: i for i, v in enumerate(ids)}  # each split in file order
        split = {"train": train, "val": val or train, "test": test}
        return {name: sorted(members, key=order.__getitem__) for name, members in split.items()}

    # ------------------------------------------------------------------ what is learned from the training split
    def _fit(self, raw: RawSequences, train_ids: set) -> None:
        rows = [i for i, v in enumerate(raw.ids) if v in train_ids]
        x = np.concatenate([raw.x[i] for i in rows])  # (steps, D)
        self.mean, self.std = _stats(x, self.options["normalize"])
        self.classes: list[Any] = []
        self.target_mean, self.target_std = [], []
        if self.target in ("classify", "per_step"):
            values = np.concatenate([raw.labels[i].reshape(-1) for i in range(len(raw.ids))])
            pandas = _pandas()
            values = values[~pandas.isna(values)]
            self.classes = sorted({_python(v) for v in values}, key=_class_key)
            if len(self.classes) < 2:
                raise InputError(f"label: expected at least 2 classes in {self.options['label']}, got {self.classes}")
        elif self.target == "multilabel":
            for i in rows:
                bad = ~np.isin(raw.labels[i].astype(np.float64), (0.0, 1.0))
                if bad.any():
                    column = self.label_names[int(np.argwhere(bad)[0][1])]
                    raise InputError(f"label: expected 0/1 values in column {column!r} for target='multilabel', got "
                                     f"{raw.labels[i][bad][0]!r}")
        elif self.forecast and not self.label_names:
            # The features forecast themselves with their own statistics, so a prediction is the next input as is.
            self.target_mean, self.target_std = self.mean, self.std
        else:
            targets = [self._raw_targets(raw, i) for i in rows]
            mean, std = _stats(np.concatenate([t.reshape(-1, t.shape[-1]) for t in targets]), self.options["normalize"])
            self.target_mean, self.target_std = mean, std
        self.max_len = max(len(x) for x in raw.x)
        self._set_sizes()

    def _set_sizes(self) -> None:
        """Sizes and lookups that follow from what was learned (after fitting or restoring)."""
        self.class_index = {c: k for k, c in enumerate(self.classes)}  # class label -> id, labels sorted
        self.d_input = len(self.features)
        self.default_seq_len = self.max_len
        if self.target in ("classify", "per_step"):
            self.n_classes = len(self.classes)
        elif self.target == "multilabel":
            self.n_classes = len(self.label_names)
        else:
            self.d_output = len(self.target_names)

    @property
    def target_names(self) -> list[str]:
        """The columns a real-valued target predicts (a forecast without ``label`` predicts every feature)."""
        return self.features if self.forecast and not self.label_names else self.label_names

    def _raw_targets(self, raw: RawSequences, i: int) -> np.ndarray:
        """Real-valued targets of sequence ``i`` in the file's units: ``(W,)``, ``(T_i, W)``, or the
        next steps ``(T_i - 1, W)`` of a forecast."""
        if self.forecast:
            source = raw.labels[i] if self.label_names else raw.x[i]
            return np.asarray(source, dtype=np.float64)[1:]
        return np.asarray(raw.labels[i], dtype=np.float64)

    def portable_state(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "features": list(self.features), "labels": list(self.label_names),
            "mean": list(map(float, self.mean)), "std": list(map(float, self.std)), "classes": list(self.classes),
            "target_mean": list(map(float, self.target_mean)), "target_std": list(map(float, self.target_std)),
            "max_len": int(self.max_len),
        }

    @classmethod
    def restore(cls, options: dict[str, Any], state: dict[str, Any]) -> "SequencesTask":
        """The task as trained, from its options and saved state; its files are read only when batches
        (or predictions) are asked for, so the training file may be gone."""
        if state.get("format") != STATE_FORMAT:
            raise InputError(f"sequences state: expected format {STATE_FORMAT}, got {state.get('format')!r}")
        task = cls.__new__(cls)
        task._configure(**options)
        task._data, task._whole_file = None, False
        task.features, task.label_names = list(state["features"]), list(state["labels"])
        task.mean, task.std = np.asarray(state["mean"]), np.asarray(state["std"])
        task.target_mean, task.target_std = np.asarray(state["target_mean"]), np.asarray(state["target_std"])
        task.classes, task.max_len = list(state["classes"]), int(state["max_len"])
        task._set_sizes()
        return task

    def with_input(self, path: str | os.PathLike) -> "SequencesTask":
        """This task on another labelled file: every sequence of ``path`` in the ``val`` and ``test``
        splits, prepared with this task's saved state (for ``rnnkit eval --input``)."""
        task = type(self).restore(dict(self.options, path=str(path)), self.portable_state())
        task._whole_file = True
        return task

    # ------------------------------------------------------------------ encoding
    def _encode_x(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((x - self.mean) / self.std).float()  # (T_i, D)

    def _encode_y(self, raw: RawSequences, i: int) -> torch.Tensor:
        if self.target in ("classify", "per_step"):
            index = self.class_index
            pandas = _pandas()

            def class_id(value: Any) -> int:
                if pandas.isna(value):
                    return IGNORE_INDEX
                value = _python(value)
                if value not in index:
                    raise InputError(f"label: expected one of the training classes {self.classes}, got {value!r} "
                                     f"(id {raw.ids[i]!r})")
                return index[value]

            ids = [class_id(v) for v in raw.labels[i][..., 0].reshape(-1)]
            return torch.tensor(ids[0] if self.target == "classify" else ids, dtype=torch.long)
        if self.target == "multilabel":
            return torch.tensor(np.asarray(raw.labels[i], dtype=np.float64), dtype=torch.float32)  # (T_i, K)
        return torch.from_numpy((self._raw_targets(raw, i) - self.target_mean) / self.target_std).float()

    def _encode_splits(self, raw: RawSequences) -> dict[str, list[tuple[Any, ...]]]:
        where = {v: i for i, v in enumerate(raw.ids)}
        data = {}
        for split, ids in self._assign(raw.ids).items():
            examples = []
            for v in ids:
                i = where[v]
                x = raw.x[i][:-1] if self.forecast else raw.x[i]
                if len(x) == 0:
                    raise InputError(f"target='forecast': expected sequences of at least 2 steps, got 1 for id {v!r}")
                examples.append((self._encode_x(x), self._encode_y(raw, i)))
            data[split] = examples
        return data

    @property
    def data(self) -> dict[str, list[tuple[Any, ...]]]:
        if self._data is None:  # a restored task reads its file on first use
            self._data = self._encode_splits(self._read(labelled=True))
        return self._data

    def split_size(self, split: str) -> int:
        return len(self.data[split])

    def example(self, split: str, index: int) -> tuple[Any, ...]:
        return self.data[split][index]

    def example_lengths(self, split: str) -> list[int]:
        return [len(x) for x, _ in self.data[split]]

    def collate(self, split, indices, seq_len):
        if seq_len is not None and seq_len < self.max_len:
            raise InputError(f"seq_len: expected None or at least the longest sequence ({self.max_len} steps), got {seq_len}")
        return super().collate(split, indices, seq_len)

    # ------------------------------------------------------------------ predictions
    @torch.no_grad()
    def predict(self, model: Any, path: str | os.PathLike, batch_size: int = 64, device: str = "cpu"):
        """Predictions of ``model`` for every sequence of ``path`` (labels optional, ignored), prepared
        with this task's saved state.

        Returns:
            A ``pandas.DataFrame``: one row per sequence for per-sequence targets (``id``, then
            ``predicted`` and ``prob_<class>`` for classification, ``pred_<label>`` for regression), one
            row per step for per-step targets (``id``, ``time`` and the same columns; a forecast row
            holds the values predicted for the step after ``time``). Values are in the file's units.
        """
        check_positive_int("batch_size", batch_size)
        pandas = _pandas()
        raw = self._read(labelled=False, path=str(path))
        if not raw.ids:
            raise InputError(f"--input: expected at least one sequence in {path}, got none")
        was_training = model.training
        model.eval()
        outputs = []
        for lo in range(0, len(raw.ids), batch_size):
            x, lengths = pad_sequences([self._encode_x(x) for x in raw.x[lo: lo + batch_size]])
            out, _ = model(x.to(device), lengths=lengths.to(device))
            outputs += [o[: int(n)].float().cpu() if self.kind.per_step else o.float().cpu() for o, n in zip(out, lengths)]
        model.train(was_training)
        rows = []
        for i, out in enumerate(outputs):
            columns = self._prediction_columns(out)
            if self.kind.per_step:
                frame = pandas.DataFrame({"id": [raw.ids[i]] * len(out), "time": raw.times[i], **columns})
            else:
                frame = pandas.DataFrame({"id": [raw.ids[i]], **{k: [v[0]] for k, v in columns.items()}})
            rows.append(frame)
        return pandas.concat(rows, ignore_index=True)

    def _prediction_columns(self, out: torch.Tensor) -> dict[str, Any]:
        """Output columns of one sequence's model output (``(T_i, n_outputs)`` or ``(n_outputs,)``)."""
        out = out.reshape(-1, out.shape[-1]).numpy()  # (rows, n_outputs)
        if self.target in ("classify", "per_step"):
            probs = np.exp(out - out.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            return {"predicted": [self.classes[k] for k in probs.argmax(-1)],
                    **{f"prob_{c}": probs[:, k] for k, c in enumerate(self.classes)}}
        if self.target == "multilabel":
            probs = 1 / (1 + np.exp(-out))
            return {**{f"pred_{n}": (probs[:, k] > 0.5).astype(int) for k, n in enumerate(self.label_names)},
                    **{f"prob_{n}": probs[:, k] for k, n in enumerate(self.label_names)}}
        values = out * self.target_std + self.target_mean
        return {f"pred_{n}": values[:, k] for k, n in enumerate(self.target_names)}


def _stats(values: np.ndarray, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std ``(W,)`` of ``(M, W)`` values, NaN ignored; std 1 for constant columns, and
    mean 0, std 1 everywhere without ``normalize``."""
    width = values.shape[-1]
    if not normalize or len(values) == 0:
        return np.zeros(width), np.ones(width)
    finite = np.isfinite(values)
    count = np.maximum(finite.sum(0), 1)
    mean = np.where(finite, values, 0).sum(0) / count
    std = np.sqrt((np.where(finite, values - mean, 0) ** 2).sum(0) / count)
    return mean, np.where(std > 0, std, 1.0)


__all__ = ["MISSING_POLICIES", "RawSequences", "SequencesTask", "TARGET_OPTIONS", "apply_missing", "file_format",
           "read_sequences"]
