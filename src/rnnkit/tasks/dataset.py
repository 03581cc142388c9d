"""Any ``torch.utils.data.Dataset`` (or Hugging Face ``datasets.Dataset``) as a task the Trainer runs.

Example:
    >>> examples = [(torch.randn(n, 3), n % 2) for n in range(2, 40)]           # (x (T_i, D), class)
    >>> task = DatasetTask(examples[:30], val=examples[30:], target="classify", n_classes=2)
    >>> model = SequenceModel(model_config_for(task, d_model=16, layer="gru"))
    >>> Trainer(model, task, TrainConfig(steps=20, batch_size=8)).fit()
"""

from __future__ import annotations

from typing import Any, Sequence

from rnnkit.errors import InputError, check_choice, check_positive_int, describe
from rnnkit.targets import METRICS, target_kind
from rnnkit.tasks.base import EVAL_SPLITS, INPUT_KINDS
from rnnkit.tasks.collate import IndexedTask, _tensor, _unpack

#: Metrics reported by default for each target kind.
DEFAULT_METRICS = {"per_step": ("loss", "accuracy"), "classify": ("loss", "accuracy"), "regress": ("loss", "mse"),
                   "regress_per_step": ("loss", "mse"), "multilabel": ("loss", "accuracy", "f1")}


class DatasetTask(IndexedTask):
    """Train, validate and test on in-memory data sets.

    Args:
        train, val, test: indexable data sets (``len`` and ``[i]``: a ``torch.utils.data.Dataset``, a
            list, a Hugging Face ``datasets.Dataset``) whose items are ``(x, y)``, ``(x, y, length)``
            or mappings with ``"x"`` and ``"y"`` (see :func:`~rnnkit.tasks.collate_sequences`). ``val``
            defaults to ``train``; ``test`` may be absent. A task restored from a saved model has no
            data sets (its options are only the scalars below).
        input_kind: ``"features"`` (``x`` ``(T_i, D)``) or ``"tokens"`` (``x`` ``(T_i,)`` ids).
        target: a target kind of :data:`rnnkit.targets.TARGET_KINDS`.
        d_input: feature width (default: read from the first training item).
        vocab_size: number of token ids, for token input.
        n_classes: classes (``per_step``, ``classify``) or labels (``multilabel``); required for those.
        d_output: width of a real-valued target (default: read from the first training item).
        metrics: what to report (default: the target kind's usual metrics).
        default_seq_len: the longest sequence, for messages (default: the first training item's length).
        pool_batches: batches per length-sorting pool of a training epoch; length bucketing reads
            every training item's length once (default 1: plain random batches, nothing read ahead).

    Training batch ``k`` is a pure function of the seed and ``k`` (see :class:`IndexedTask`), so the
    Trainer's exact resume holds as long as the data sets do not change.
    """

    name = "dataset"
    input_kind = "features"
    target = "classify"

    def __init__(self, train: Any = None, val: Any = None, test: Any = None, *, input_kind: str = "features",
                 target: str = "classify", d_input: int | None = None, vocab_size: int | None = None,
                 n_classes: int | None = None, d_output: int | None = None, metrics: Sequence[str] | None = None,
                 default_seq_len: int | None = None, pool_batches: int = 1) -> None:
        check_choice("input_kind", input_kind, INPUT_KINDS)
        kind = target_kind(target)
        check_positive_int("pool_batches", pool_batches)
        for name, value in (("train", train), ("val", val), ("test", test)):
            if value is not None and not (hasattr(value, "__len__") and hasattr(value, "__getitem__")):
                raise InputError(f"{name}: expected an indexable data set (len and [i]), got {describe(value)}")
        self.sets = {"train": train, "val": val if val is not None else train, "test": test}
        self.input_kind, self.target, self.pool_batches = input_kind, target, pool_batches
        first = self._first_item() if train is not None and len(train) else None
        if first is not None:
            x, y, _ = first
            d_input = d_input if d_input is not None or input_kind == "tokens" else int(x.shape[-1])
            if kind.width == "d_output" and d_output is None:
                d_output = int(y.shape[-1]) if y.dim() >= (2 if kind.per_step else 1) else 1
            default_seq_len = default_seq_len or int(x.shape[0])
        if input_kind == "features":
            check_positive_int("d_input", d_input)
        else:
            check_positive_int("vocab_size", vocab_size)
        check_positive_int(kind.width, n_classes if kind.width == "n_classes" else d_output)
        metrics = tuple(metrics) if metrics is not None else DEFAULT_METRICS[target]
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise InputError(f"metrics: expected names from {METRICS}, got {unknown}")
        self.d_input, self.vocab_size, self.n_classes, self.d_output = d_input, vocab_size, n_classes, d_output
        self.metrics = metrics
        self.default_seq_len = default_seq_len or 1
        super().__init__(input_kind=input_kind, target=target, d_input=d_input, vocab_size=vocab_size,
                         n_classes=n_classes, d_output=d_output, metrics=list(metrics),
                         default_seq_len=self.default_seq_len, pool_batches=pool_batches)

    def _first_item(self):
        x, y, length = _unpack(self.sets["train"][0], 0)
        return _tensor(x, "train[0].x"), _tensor(y, "train[0].y"), length

    def _set(self, split: str) -> Any:
        data = self.sets[split]
        if data is None:
            which = "the training data set" if split == "train" else f"a {split} data set"
            raise InputError(f"{split}: expected {which} (DatasetTask({'train' if split == 'train' else split}=...)), "
                             "got none; a task restored from a saved model has no data sets")
        return data

    def split_size(self, split: str) -> int:
        if split not in ("train", *EVAL_SPLITS):
            raise InputError(f"split: expected 'train', 'val' or 'test', got {split!r}")
        return len(self._set(split))

    def example(self, split: str, index: int) -> Any:
        return self._set(split)[index]

    def example_lengths(self, split: str) -> list[int] | None:
        if self.pool_batches == 1:
            return None
        out = []
        for i in range(self.split_size(split)):
            x, _, length = _unpack(self.example(split, i), i)
            out.append(int(length) if length is not None else len(x))
        return out


__all__ = ["DatasetTask"]
