"""UCR/UEA time-series classification, read from the ``.ts`` files bundled in the ``aeon`` wheel.

The official train/test splits of the UCR archive (Dau et al. 2019, "The UCR time series archive") and
the UEA multivariate archive (Bagnall et al. 2018), as shipped in ``aeon==1.6.0``'s
``aeon/datasets/data/<Name>/<Name>_TRAIN.ts`` and ``_TEST.ts``. Install the wheel without its
dependencies (``pip install --no-deps aeon==1.6.0``): rnnkit only reads the text files with its own
parser, :func:`read_ts`, and never imports aeon. Published accuracies on these splits (Fawaz et al.
2019, "Deep learning for time series classification: a review") make them a reference point.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import torch

from rnnkit.errors import InputError, check_choice
from rnnkit.tasks.base import (
    Batch,
    Task,
    check_eval_args,
    check_train_args,
    derive_seed,
    generator,
    register_task,
)

#: Data sets bundled in aeon 1.6.0 that this task offers: (cases train/test, length, channels, classes).
DATASETS = {
    "GunPoint": "50/150 cases, length 150, 1 channel, 2 classes",
    "ItalyPowerDemand": "67/1029 cases, length 24, 1 channel, 2 classes",
    "ArrowHead": "36/175 cases, length 251, 1 channel, 3 classes",
    "OSULeaf": "200/242 cases, length 427, 1 channel, 6 classes",
    "BasicMotions": "40/40 cases, length 100, 6 channels, 4 classes",
    "JapaneseVowels": "270/370 cases, length 7-29 (ragged), 12 channels, 9 classes",
    "UnitTest": "20/22 cases, length 24, 1 channel, 2 classes (tiny, for tests)",
}
INSTALL_HINT = "pip install -c constraints.txt --no-deps aeon==1.6.0"


@dataclass
class TsData:
    """A parsed ``.ts`` file.

    Attributes:
        x: ``(N, T_max, C)`` float32, right-padded with 0 past each case's length; ``NaN`` where the
            file has ``?`` (missing).
        lengths: ``(N,)`` int64 valid length of each case.
        labels: the class label of each case, as written in the file.
        class_labels: the labels declared by ``@classLabel`` (their order defines the class ids).
    """

    x: torch.Tensor
    lengths: torch.Tensor
    labels: list[str]
    class_labels: list[str]


def read_ts(path: str | Path) -> TsData:
    """Parse a sktime/aeon ``.ts`` classification file.

    Format: ``#`` (or ``%``) comment lines; ``@key value`` header lines up to ``@data``; then one case per line,
    channels separated by ``:``, values by ``,``, ``?`` for a missing value, and the class label as
    the last ``:``-separated field. Channels of one case share its length; cases may differ
    (``@equalLength false``).

    Args:
        path: the ``.ts`` file.

    Returns:
        A :class:`TsData`.

    Example:
        >>> data = read_ts(ucr_dir() / "UnitTest" / "UnitTest_TRAIN.ts")
        >>> data.x.shape, data.class_labels
        (torch.Size([20, 24, 1]), ['1', '2'])
    """
    path = Path(path)
    header: dict[str, str] = {}
    cases: list[list[list[float]]] = []
    labels: list[str] = []
    in_data = False
    with path.open() as handle:
        for number, raw in enumerate(handle, 1):
            line = raw.strip()
            if not line or line.startswith(("#", "%")):
                continue
            if not in_data:
                if not line.startswith("@"):
                    raise InputError(f"{path}:{number}: expected a @header line before @data, got {line[:40]!r}")
                key, _, value = line[1:].partition(" ")
                header[key.lower()] = value.strip()
                in_data = key.lower() == "data"
                continue
            *channels, label = line.split(":")
            if not channels:
                raise InputError(f"{path}:{number}: expected channels and a label separated by ':', got {line[:40]!r}")
            values = [[math.nan if v.strip() == "?" else float(v) for v in c.split(",")] for c in channels]
            if len({len(v) for v in values}) != 1:
                raise InputError(f"{path}:{number}: expected channels of one length, got {[len(v) for v in values]}")
            cases.append(values)
            labels.append(label.strip())
    if header.get("classlabel", "false").split()[0].lower() != "true":
        raise InputError(f"{path}: expected a classification file (@classLabel true ...), got {header.get('classlabel')!r}")
    class_labels = header["classlabel"].split()[1:]
    if not cases:
        raise InputError(f"{path}: expected at least one case after @data, got none")
    n_channels = {len(c) for c in cases}
    if len(n_channels) != 1:
        raise InputError(f"{path}: expected every case to have the same number of channels, got {sorted(n_channels)}")
    lengths = torch.tensor([len(c[0]) for c in cases], dtype=torch.long)  # (N,)
    x = torch.zeros(len(cases), int(lengths.max()), n_channels.pop())  # (N, T_max, C)
    for i, case in enumerate(cases):
        x[i, : len(case[0])] = torch.tensor(case).T  # (T_i, C)
    unknown = sorted(set(labels) - set(class_labels))
    if unknown:
        raise InputError(f"{path}: expected labels from {class_labels}, got {unknown}")
    return TsData(x, lengths, labels, class_labels)


def ucr_dir() -> Path:
    """The folder of ``.ts`` data sets inside the installed aeon wheel (aeon itself is not imported)."""
    spec = importlib.util.find_spec("aeon")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"ucr: expected the aeon wheel's data files, got no 'aeon' package: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    if not folder.is_dir():
        raise InputError(f"ucr: expected {folder} to exist (aeon==1.6.0), got no such folder: {INSTALL_HINT}")
    return folder


@lru_cache(maxsize=None)
def _load(dataset: str) -> tuple[TsData, TsData]:
    folder = ucr_dir() / dataset
    return read_ts(folder / f"{dataset}_TRAIN.ts"), read_ts(folder / f"{dataset}_TEST.ts")


@register_task("ucr")
class UCRTask(Task):
    """UCR/UEA classification on the archive's official splits (from the aeon wheel's ``.ts`` files).

    Each channel is standardised with the mean and standard deviation of the training cases (valid
    steps only); missing values (``?``) become 0 after that, the training mean. Ragged data sets
    (JapaneseVowels) are right-padded with 0 and their batches carry ``lengths``.

    Splits: ``test`` is the archive's test file. ``val`` is a fixed, class-stratified
    ``val_fraction`` of the training file, held out from training; with ``val_fraction=0`` (as in
    Fawaz et al. 2019, who select on training loss) nothing is held out and ``val`` is the training
    file itself, so val metrics are training metrics.

    Args:
        dataset: one of ``GunPoint``, ``ItalyPowerDemand``, ``ArrowHead``, ``OSULeaf``,
            ``BasicMotions``, ``JapaneseVowels``, ``UnitTest`` (default ``"GunPoint"``).
        val_fraction: share of the training file held out as ``val`` (default 0.0).

    Batches: ``x`` ``(B, T, C)`` float32, ``y`` ``(B,)`` int64, ``lengths`` ``(B,)`` int64 for ragged
    data sets (else ``None``). Training batches are ``B`` cases drawn without replacement (with
    replacement across batches); ``B`` larger than the training set repeats cases. ``seq_len`` must be
    ``None`` or the data set's length.

    Example:
        >>> task = build_task("ucr", dataset="JapaneseVowels")
        >>> batch = next(task.train_batches(batch_size=4))
        >>> batch.x.shape, task.n_classes, batch.lengths.shape
        (torch.Size([4, 29, 12]), 9, torch.Size([4]))
    """

    input_kind = "features"
    target = "classify"
    metrics = ("loss", "accuracy")

    def __init__(self, *, dataset: str = "GunPoint", val_fraction: float = 0.0) -> None:
        check_choice("dataset", dataset, tuple(DATASETS))
        if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) or not 0 <= val_fraction < 1:
            raise InputError(f"val_fraction: expected a number in [0, 1), got {val_fraction!r}")
        super().__init__(dataset=dataset, val_fraction=val_fraction)
        self.dataset = dataset
        train, test = _load(dataset)
        classes = {label: i for i, label in enumerate(train.class_labels)}
        self.n_classes = len(classes)
        self.d_input = train.x.shape[2]
        self.ragged = bool((train.lengths != train.lengths[0]).any() or (test.lengths != train.lengths[0]).any())
        self.default_seq_len = max(train.x.shape[1], test.x.shape[1])
        y_train = torch.tensor([classes[v] for v in train.labels])  # (N_train,)
        y_test = torch.tensor([classes[v] for v in test.labels])  # (N_test,)
        x_train, x_test = self._pad(train.x), self._pad(test.x)
        valid = torch.arange(x_train.shape[1]) < train.lengths[:, None]  # (N, T)
        mean, std = _channel_stats(x_train[valid])
        self.splits = {}
        held_out = _stratified_holdout(y_train, val_fraction, derive_seed("ucr", dataset, "val"))
        keep = ~held_out
        data = {
            "train": (x_train[keep], y_train[keep], train.lengths[keep]),
            "val": (x_train[held_out], y_train[held_out], train.lengths[held_out]) if held_out.any()
            else (x_train, y_train, train.lengths),
            "test": (x_test, y_test, test.lengths),
        }
        for split, (x, y, lengths) in data.items():
            mask = torch.arange(x.shape[1]) < lengths[:, None]  # (N, T)
            x = torch.nan_to_num((x - mean) / std) * mask[..., None]  # padding and missing values -> 0
            self.splits[split] = (x.float(), y, lengths)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Right-pad ``(N, T, C)`` with 0 to the longest length of either file."""
        return torch.nn.functional.pad(x, (0, 0, 0, self.default_seq_len - x.shape[1]))

    def size(self, split: str) -> int:
        """Number of cases in ``"train"``, ``"val"`` or ``"test"``."""
        return len(self.splits[split][1])

    def _check_seq_len(self, seq_len: int | None) -> None:
        if seq_len is not None and seq_len != self.default_seq_len:
            raise InputError(f"seq_len: expected None or {self.default_seq_len} ({self.dataset}'s length), got {seq_len}")

    def _batch(self, split: str, index: torch.Tensor) -> Batch:
        x, y, lengths = self.splits[split]
        return Batch(x[index].clone(), y[index].clone(), lengths[index].clone() if self.ragged else None)

    def train_batches(
        self, batch_size: int, seq_len: int | None = None, seed: int = 0, start: int = 0
    ) -> Iterator[Batch]:
        check_train_args(batch_size, seq_len, seed, start)
        self._check_seq_len(seq_len)
        N = self.size("train")

        def batches() -> Iterator[Batch]:
            k = start
            while True:
                gen = generator("ucr", self.dataset, "train", seed, k)
                order = torch.cat([torch.randperm(N, generator=gen) for _ in range(math.ceil(batch_size / N))])
                yield self._batch("train", order[:batch_size])
                k += 1

        return batches()

    def eval_batches(self, split: str, batch_size: int, seq_len: int | None = None) -> Iterator[Batch]:
        check_eval_args(split, batch_size, seq_len)
        self._check_seq_len(seq_len)
        n = self.size(split)
        return (self._batch(split, torch.arange(i, min(i + batch_size, n))) for i in range(0, n, batch_size))


def _channel_stats(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std ``(C,)`` of ``(M, C)`` values, ignoring NaN; std 1 for constant channels."""
    finite = torch.isfinite(values)
    count = finite.sum(0).clamp(min=1)
    filled = torch.where(finite, values, 0.0)
    mean = filled.sum(0) / count
    var = (torch.where(finite, values - mean, 0.0) ** 2).sum(0) / count
    std = var.sqrt()
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def _stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Boolean mask ``(N,)`` holding out ``round(fraction * n_c)`` random cases of each class (at least one
    case of a class stays in training)."""
    held = torch.zeros(len(labels), dtype=torch.bool)
    if fraction == 0:
        return held
    gen = torch.Generator().manual_seed(seed)
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        k = min(len(members) - 1, round(fraction * len(members)))
        held[members[torch.randperm(len(members), generator=gen)[:k]]] = True
    return held


__all__ = ["DATASETS", "TsData", "UCRTask", "read_ts", "ucr_dir"]
