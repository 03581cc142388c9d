"""Streaming language-model tasks: a split's token ids cut into windows of parallel streams.

:class:`StreamingTextTask` turns one ``(N,)`` array of token ids per split (documents joined by a
separator, or a contiguous block of one text) into the batches of a streaming task: training
windows for truncated BPTT, deterministic by seed with an O(1) ``start``, and finite evaluation
that scores every token of a split exactly once. A subclass supplies the ids (:meth:`split_ids`)
and the context token of an evaluation stream (:meth:`context_id`); ``shakespeare`` and ``text``
are such subclasses.
"""

from __future__ import annotations

import codecs
import math
from typing import Any, Callable, Iterator

import numpy as np
import torch

from rnnkit.errors import InputError, describe
from rnnkit.tasks.base import IGNORE_INDEX, Batch, Task, check_eval_args, check_train_args, derive_seed

SPLITS = ("train", "val", "test")


class StreamingTextTask(Task):
    """Base class of language-model tasks streamed in windows (truncated BPTT).

    Subclasses implement :meth:`split_ids` and :meth:`context_id`, and set ``vocab_size``,
    ``n_classes`` and ``unit`` (what one id stands for, in messages: ``"characters"``, ``"bytes"``,
    ``"tokens"``).

    Training: the train ids (``N`` of them) are cut into ``B`` contiguous streams of ``L = W * T``
    ids and batch ``w`` of an epoch is window ``w`` of every stream, ``x = ids[t : t + T]``,
    ``y = ids[t + 1 : t + T + 1]``; ``reset`` is ``True`` at the first window of each epoch. Each
    epoch starts at its own offset into the ids, drawn from ``(name, seed, epoch)`` in
    ``[0, N - 1 - B * L]``, so window boundaries move between epochs; ``W`` is chosen to leave at
    least ``T`` ids for that offset, and ids outside ``[offset, offset + B * L]`` are skipped in that
    epoch. Batch ``k`` is window ``k % W`` of epoch ``k // W``, so ``start`` is free.

    Evaluation covers every id of the split exactly once as a target: the split, preceded by
    :meth:`context_id` as context for its first target, is cut into ``B`` contiguous streams of
    ``ceil(N / B)`` or ``floor(N / B)`` targets, read in consecutive windows of ``T`` (``reset`` only
    on the first). Only the last window can be partial: it is as wide as the longest remainder, the
    padding has ``x = 0`` and ``y = -100``, and ``lengths`` holds each stream's valid steps (at least
    1, as the layer contract requires, for a stream that already ended or never began when
    ``B > N``: its targets are all -100).

    Batches: ``x`` and ``y`` ``(B, T)`` int64.
    """

    input_kind = "tokens"
    target = "per_step"
    streaming = True
    metrics = ("loss", "bpc")
    default_seq_len = 256
    #: What one token id stands for, in messages.
    unit = "tokens"

    def split_ids(self, split: str) -> torch.Tensor:
        """``(N,)`` integer token ids of ``"train"``, ``"val"`` or ``"test"`` (any integer dtype; cached)."""
        raise NotImplementedError

    def context_id(self) -> int:
        """The input before the first target of an evaluation split (the end of a separator)."""
        raise NotImplementedError

    def windows_per_epoch(self, batch_size: int, seq_len: int | None = None) -> int:
        """``W``: training batches in one pass over the ``batch_size`` streams."""
        check_train_args(batch_size, seq_len, 0, 0)
        T = self.default_seq_len if seq_len is None else seq_len
        N = len(self.split_ids("train"))
        # Keep at least T ids of slack so the per-epoch offset can move window boundaries.
        W = max(0, N - 1 - T) // (batch_size * T)
        if W < 1:
            # W >= 1 exactly when T * (batch_size + 1) <= N - 1: the bound is on T for this batch size.
            raise InputError(
                f"batch_size * seq_len: expected seq_len at most {(N - 1) // (batch_size + 1)} for batch_size "
                f"{batch_size} (each stream holds a window, and the {N:,} train {self.unit} leave seq_len of slack), "
                f"got seq_len {T}"
            )
        return W

    def train_batches(
        self, batch_size: int, seq_len: int | None = None, seed: int = 0, start: int = 0
    ) -> Iterator[Batch]:
        check_train_args(batch_size, seq_len, seed, start)
        W = self.windows_per_epoch(batch_size, seq_len)
        B = batch_size
        T = self.default_seq_len if seq_len is None else seq_len
        ids = self.split_ids("train")
        L = W * T  # ids per stream per epoch
        slack = len(ids) - 1 - B * L  # >= T

        def batches() -> Iterator[Batch]:
            epoch, w = divmod(start, W)
            while True:
                offset = derive_seed(self.name, "train", seed, epoch) % (slack + 1)
                xs = ids[offset : offset + B * L].view(B, L)  # (B, L)
                ys = ids[offset + 1 : offset + 1 + B * L].view(B, L)  # (B, L): next ids
                while w < W:
                    cols = slice(w * T, (w + 1) * T)
                    # .long() copies, so batches never alias the cached ids.
                    yield Batch(xs[:, cols].long(), ys[:, cols].long(), None, reset=w == 0)
                    w += 1
                epoch, w = epoch + 1, 0

        return batches()

    def eval_batches(self, split: str, batch_size: int, seq_len: int | None = None) -> Iterator[Batch]:
        check_eval_args(split, batch_size, seq_len)
        B = batch_size
        T = self.default_seq_len if seq_len is None else seq_len
        targets = self.split_ids(split).long()  # (N,)
        N = len(targets)
        if N == 0:
            raise InputError(f"{split}: expected a split with at least one {self.unit[:-1]}, got none")
        inputs = torch.cat([torch.tensor([self.context_id()]), targets[:-1]])  # (N,): the id before each

        # B contiguous streams; the first N % B streams get one extra target.
        q, r = divmod(N, B)
        stream_len = torch.full((B,), q) + (torch.arange(B) < r)  # (B,)
        stream_start = torch.cumsum(stream_len, 0) - stream_len  # (B,)
        L = q + (r > 0)  # longest stream
        steps = torch.arange(L)  # (L,)
        valid = steps < stream_len[:, None]  # (B, L)
        index = (stream_start[:, None] + steps).clamp(max=N - 1)  # (B, L); clamped where invalid
        xs = torch.where(valid, inputs[index], 0)  # (B, L)
        ys = torch.where(valid, targets[index], IGNORE_INDEX)  # (B, L)

        def batches() -> Iterator[Batch]:
            for w in range(math.ceil(L / T)):
                x, y = xs[:, w * T : (w + 1) * T], ys[:, w * T : (w + 1) * T]  # (B, T_w)
                n_valid = (stream_len - w * T).clamp(0, x.shape[1])  # (B,)
                # Only the last window can be partial; a stream that already ended keeps length 1.
                lengths = None if bool((n_valid == x.shape[1]).all()) else n_valid.clamp(min=1)
                yield Batch(x.clone(), y.clone(), lengths, reset=w == 0)

        return batches()


def check_split(split: object) -> None:
    """Raise InputError unless ``split`` is ``"train"``, ``"val"`` or ``"test"``."""
    if split not in SPLITS:
        raise InputError(f"split: expected one of {list(SPLITS)}, got {split!r}")


def ids_array(ids: Any, vocab_size: int) -> np.ndarray:
    """``(N,)`` int64 array of token ids given as a 1-D integer tensor or a sequence of ints, each
    checked to lie in ``[0, vocab_size)``."""
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.dim() != 1:
            raise InputError(f"ids: expected a 1-D integer tensor (N,), got {describe(ids)}")
        array = ids.detach().cpu().numpy().astype(np.int64)
    else:
        ids = list(ids)
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
            raise InputError(f"ids: expected a sequence of ints, got {describe(ids)}")
        array = np.asarray(ids, dtype=np.int64)
    if array.size and (array.min() < 0 or array.max() >= vocab_size):
        raise InputError(f"ids: expected values in [0, {vocab_size}), got min {array.min()}, max {array.max()}")
    return array


class Utf8StreamDecoder:
    """Decodes ids that arrive one at a time into text when each id stands for bytes of UTF-8 text
    (byte-level vocabularies): bytes of a character split across ids are held until it is whole.

    Args:
        to_bytes: maps a 1-D sequence of ids to the bytes they stand for.
    """

    def __init__(self, to_bytes: Callable[[Any], bytes]) -> None:
        self._to_bytes = to_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def decode(self, ids: Any, final: bool = False) -> str:
        """The text completed by ``ids``; with ``final=True`` also any incomplete character, as U+FFFD."""
        return self._utf8.decode(self._to_bytes(ids), final=final)
