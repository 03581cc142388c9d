"""Ragged examples into batches: a public collate function and the base class of tasks over indexed examples.

:func:`collate_sequences` pads examples of different lengths into one right-padded :class:`Batch`
(usable as a ``DataLoader``'s ``collate_fn`` through ``functools.partial``). :class:`IndexedTask` is a
:class:`Task` over a fixed list of examples per split (a user's table, a ``torch`` data set): its
training batch ``k`` is a pure function of ``(seed, k)`` (an epoch's order is a seeded, length-bucketed
permutation, :func:`~rnnkit.tasks.bucketing.bucket_batches`), so the Trainer's exact resume holds.

Example:
    >>> items = [(torch.randn(5, 3), 1), (torch.randn(2, 3), 0)]            # (x (T_i, D), class)
    >>> batch = collate_sequences(items, target="classify")
    >>> batch.x.shape, batch.y.tolist(), batch.lengths.tolist()
    (torch.Size([2, 5, 3]), [1, 0], [5, 2])
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Iterator, Sequence

import torch

from rnnkit.errors import InputError, describe
from rnnkit.targets import IGNORE_INDEX, target_kind
from rnnkit.tasks.base import Batch, Task, check_eval_args, check_train_args, derive_seed, generator
from rnnkit.tasks.bucketing import bucket_batches


def _unpack(item: Any, index: int) -> tuple[Any, Any, Any]:
    """``(x, y, length)`` of an ``(x, y)``/``(x, y, length)`` tuple or an ``{"x", "y"[, "length"]}`` mapping."""
    if isinstance(item, Mapping):
        if "x" not in item or "y" not in item:
            raise InputError(f"items[{index}]: expected a mapping with keys 'x' and 'y', got keys {sorted(item)}")
        return item["x"], item["y"], item.get("length")
    if isinstance(item, (tuple, list)) and len(item) in (2, 3):
        return item[0], item[1], item[2] if len(item) == 3 else None
    raise InputError(f"items[{index}]: expected (x, y), (x, y, length) or a mapping with 'x' and 'y', got {describe(item)}")


def _tensor(value: Any, name: str) -> torch.Tensor:
    try:
        return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise InputError(f"{name}: expected a tensor, array or nested list of numbers, got {describe(value)} ({error})") from None


def collate_sequences(items: Sequence[Any], target: str = "classify", pad_to: int | None = None) -> Batch:
    """Pad ragged examples into one right-padded :class:`Batch`.

    Args:
        items: ``B`` examples, each ``(x, y)``, ``(x, y, length)`` or a mapping with keys ``"x"``,
            ``"y"`` (and optionally ``"length"``). ``x`` is ``(T_i,)`` integer token ids or
            ``(T_i, D)`` features (tensor, NumPy array or nested lists); ``length`` marks an ``x``
            that is already padded (only its first ``length`` steps are valid). ``y`` as the target
            kind wants it for one example: a class id (``classify``), ``(W,)`` values or a number
            (``regress``), ``(T_i,)`` class ids (``per_step``), ``(T_i, W)`` values
            (``regress_per_step``) or 0/1 labels (``multilabel``).
        target: a target kind of :data:`rnnkit.targets.TARGET_KINDS` (decides how ``y`` is padded).
        pad_to: pad to this many steps instead of the longest example's.

    Returns:
        A :class:`Batch`: ``x`` ``(B, T)`` int64 or ``(B, T, D)`` float32; per-step class targets
        padded with ``IGNORE_INDEX``, real-valued and multi-label ones with 0 (the loss masks them by
        ``lengths``); ``lengths`` ``(B,)``, or None when every example fills all ``T`` steps.
    """
    kind = target_kind(target)
    if not isinstance(items, (list, tuple)) or not items:
        raise InputError(f"items: expected a non-empty list of examples, got {describe(items)}")
    xs, ys, lengths = [], [], []
    for i, item in enumerate(items):
        x, y, length = _unpack(item, i)
        x, y = _tensor(x, f"items[{i}].x"), _tensor(y, f"items[{i}].y")
        if x.dim() not in (1, 2) or x.shape[0] < 1:
            raise InputError(f"items[{i}].x: expected (T, D) features or (T,) token ids with T >= 1, got {describe(x)}")
        length = x.shape[0] if length is None else int(length)
        if not 1 <= length <= x.shape[0]:
            raise InputError(f"items[{i}].length: expected an int in [1, {x.shape[0]}], got {length}")
        x = x[:length]
        if kind.per_step:
            if y.dim() < 1 or y.shape[0] < length:
                raise InputError(f"items[{i}].y: expected a per-step target with at least {length} steps for "
                                 f"target {kind.name!r}, got {describe(y)}")
            y = y[:length]
        xs.append(x)
        ys.append(y.float() if kind.y_dtype.startswith("float") else y.long())
        lengths.append(length)
    first = xs[0]
    for i, x in enumerate(xs):
        if x.shape[1:] != first.shape[1:] or x.is_floating_point() != first.is_floating_point():
            raise InputError(f"items[{i}].x: expected the trailing shape {tuple(first.shape[1:])} and kind of items[0].x, "
                             f"got {describe(x)}")
    steps = max(lengths)
    if pad_to is not None:
        if pad_to < steps:
            raise InputError(f"seq_len: expected at least the longest sequence, {steps} steps, got {pad_to}")
        steps = pad_to
    tokens = not first.is_floating_point()
    x_out = torch.zeros(len(xs), steps, *first.shape[1:], dtype=torch.long if tokens else torch.float32)
    for b, x in enumerate(xs):
        x_out[b, : x.shape[0]] = x
    if kind.per_step:
        fill = IGNORE_INDEX if ys[0].dtype == torch.long else 0.0
        y_out = ys[0].new_full((len(ys), steps, *ys[0].shape[1:]), fill)
        for b, y in enumerate(ys):
            if y.shape[1:] != ys[0].shape[1:]:
                raise InputError(f"items[{b}].y: expected the trailing shape {tuple(ys[0].shape[1:])} of items[0].y, got {describe(y)}")
            y_out[b, : y.shape[0]] = y
    else:
        if kind.y_dtype.startswith("float"):
            ys = [y.reshape(-1) for y in ys]
        try:
            y_out = torch.stack(ys)
        except RuntimeError:
            raise InputError(f"items: expected targets of one shape for target {kind.name!r}, "
                             f"got shapes {sorted({tuple(y.shape) for y in ys})}") from None
    length_tensor = torch.tensor(lengths, dtype=torch.long)
    ragged = bool((length_tensor != steps).any())
    return Batch(x_out, y_out, length_tensor if ragged else None)


class IndexedTask(Task):
    """A :class:`Task` over a fixed list of examples in each split.

    Subclasses implement :meth:`split_size` and :meth:`example` (one item as :func:`collate_sequences`
    takes it), and may implement :meth:`example_lengths` so training batches group similar lengths.

    Training: the ``N`` training examples are shuffled once per epoch (a seeded permutation, cut into
    pools of ``pool_batches`` batches sorted by length) and cut into ``N // B`` full batches; batch
    ``k`` belongs to epoch ``k // (N // B)``, so it is a pure function of ``(seed, k)``. With fewer
    examples than ``B``, every batch is a fresh seeded draw that repeats examples. Evaluation visits a
    split in order, in batches of consecutive examples.
    """

    #: Batches per length-sorting pool (1: plain random batches); see :mod:`rnnkit.tasks.bucketing`.
    pool_batches: int = 50

    def split_size(self, split: str) -> int:
        """Number of examples in ``"train"``, ``"val"`` or ``"test"``."""
        raise NotImplementedError

    def example(self, split: str, index: int) -> Any:
        """Example ``index`` of ``split``: ``(x, y)``, ``(x, y, length)`` or ``{"x", "y"}``."""
        raise NotImplementedError

    def example_lengths(self, split: str) -> list[int] | None:
        """Length of every example of ``split``, for length bucketing (None: unknown, no bucketing)."""
        return None

    def collate(self, split: str, indices: Sequence[int], seq_len: int | None) -> Batch:
        """The batch of ``split``'s examples ``indices`` (padded to ``seq_len`` when given)."""
        return collate_sequences([self.example(split, int(i)) for i in indices], self.target, pad_to=seq_len)

    def _nonempty(self, split: str) -> int:
        n = self.split_size(split)
        if n == 0:
            raise InputError(f"split: expected a split of task {self.name!r} with examples, got {split!r} with none")
        return n

    def train_batches(
        self, batch_size: int, seq_len: int | None = None, seed: int = 0, start: int = 0
    ) -> Iterator[Batch]:
        check_train_args(batch_size, seq_len, seed, start)
        n = self._nonempty("train")
        lengths = self.example_lengths("train") or [1] * n
        key = (self.name, "train", seed)
        plan_seed = derive_seed(*key) % 2**31

        @lru_cache(maxsize=2)
        def epoch(e: int) -> list[list[int]]:
            return bucket_batches(lengths, batch_size, pool_batches=self.pool_batches, seed=plan_seed, epoch=e,
                                  drop_last=True)

        def indices(k: int) -> list[int]:
            if n < batch_size:  # one draw per batch, repeating examples
                gen = generator(*key, k)
                return torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-batch_size // n))])[:batch_size].tolist()
            per_epoch = n // batch_size
            return epoch(k // per_epoch)[k % per_epoch]

        def batches() -> Iterator[Batch]:
            k = start
            while True:
                yield self.collate("train", indices(k), seq_len)
                k += 1

        return batches()

    def eval_batches(self, split: str, batch_size: int, seq_len: int | None = None) -> Iterator[Batch]:
        check_eval_args(split, batch_size, seq_len)
        n = self._nonempty(split)
        return (self.collate(split, range(i, min(i + batch_size, n)), seq_len) for i in range(0, n, batch_size))


__all__ = ["IndexedTask", "collate_sequences"]
