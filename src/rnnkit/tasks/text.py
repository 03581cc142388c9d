"""Language modelling on a user's own text: a file, a folder of files or a glob pattern.

``rnnkit train --task text --task-opt path=corpus/ --task-opt glob='*.py'`` trains a character,
byte or byte-level BPE model on it. The vocabulary (or tokenizer) is learned from the training split
only and saved with the model (:meth:`TextTask.portable_state`), so a trained model encodes,
decodes and evaluates without the corpus it came from.
"""

from __future__ import annotations

import fnmatch
import functools
import glob as globbing
import inspect
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rnnkit.errors import InputError, check_choice, check_positive_int, describe
from rnnkit.tasks.base import StreamDecoder, derive_seed, register_task
from rnnkit.tasks.text_stream import SPLITS, StreamingTextTask, Utf8StreamDecoder, check_split, ids_array

LEVELS = ("char", "byte", "bpe")
SPLIT_MODES = ("auto", "document", "block")
#: Documents are joined with a blank line; evaluation streams start with its last token as context.
SEPARATOR = "\n\n"
#: How the character level shows the id of characters unseen in training.
UNK = "<unk>"
#: What :meth:`TextTask.decode` prints for that id: U+FFFD, the replacement character.
UNK_TEXT = "\ufffd"
DEFAULT_BPE_VOCAB = 1024
#: Bytes read to tell a binary file (one with a NUL byte) from text.
SNIFF_BYTES = 8192
UNIT = {"char": "characters", "byte": "bytes", "bpe": "tokens"}


@dataclass(frozen=True)
class Document:
    """One text file: its name relative to the corpus root (POSIX separators) and its text."""

    name: str
    text: str


@dataclass(frozen=True)
class SplitData:
    """One split: its text and its token ids.

    Attributes:
        names: the documents in the split, in stream order (a single-file block split names its file).
        text: the split's text, its documents joined by ``SEPARATOR``.
        ids: ``(N,)`` token ids of ``text`` (uint8, int16 or int32, the narrowest that holds the vocabulary).
        n_bytes: length of the UTF-8 encoding of ``text``.
    """

    names: tuple[str, ...]
    text: str
    ids: torch.Tensor
    n_bytes: int


# ------------------------------------------------------------------------------------ the corpus


def find_documents(path: str, pattern: str) -> list[Document]:
    """The text files named by ``path`` (a file, a directory searched recursively for file names or
    relative paths matching ``pattern``, or a glob pattern), sorted by name.

    Hidden files and directories (names starting with ``.``) are skipped when searching a
    directory; empty files hold no document. Binary files (a NUL byte in the first 8 KiB) and files
    that are not UTF-8 are skipped with one warning that counts them.
    """
    root = Path(path).expanduser()
    if root.is_file():
        files = [(root.name, root)]
    elif root.is_dir():
        files = sorted((rel, root / rel) for rel in _walk(root) if _matches(rel, pattern))
    elif globbing.has_magic(path):
        base = Path(_fixed_prefix(path)).expanduser()
        matches = sorted(Path(p) for p in globbing.glob(os.path.expanduser(path), recursive=True))
        files = [(p.relative_to(base).as_posix() if p.is_relative_to(base) else p.as_posix(), p)
                 for p in matches if p.is_file()]
    else:
        raise InputError(f"path: expected an existing file, directory or glob pattern, got {path!r}")
    documents, skipped = [], []
    for name, file in files:
        text = _read_text(file)
        if text is None:
            skipped.append(name)
        elif text:
            documents.append(Document(name, text))
    if skipped:
        warnings.warn(
            f"text: skipped {len(skipped)} of {len(files)} files under {path!r} that are binary or not UTF-8 "
            f"(first: {skipped[0]})",
            UserWarning,
            stacklevel=3,
        )
    if not documents:
        where = f"{path!r}" if not root.is_dir() else f"{path!r} matching glob {pattern!r}"
        raise InputError(
            f"path: expected at least one non-empty UTF-8 text file in {where}, got none "
            f"({len(files)} files, {len(skipped)} of them binary or not UTF-8)"
        )
    return documents


def _walk(root: Path) -> list[str]:
    """Relative POSIX paths of the files under ``root``, hidden files and directories left out."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = Path(folder).relative_to(root)
        found += [(rel / n).as_posix() for n in names if not n.startswith(".")]
    return found


def _matches(name: str, pattern: str) -> bool:
    """Whether the relative path ``name`` or its file name matches the glob ``pattern``."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rsplit("/", 1)[-1], pattern)


def _fixed_prefix(pattern: str) -> str:
    """The directory part of a glob pattern before its first wildcard (what match names are relative to)."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if globbing.has_magic(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def _read_text(file: Path) -> str | None:
    """The file's text, or ``None`` for a binary or non-UTF-8 file."""
    data = file.read_bytes()
    if b"\0" in data[:SNIFF_BYTES]:
        return None
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark is not part of the text
    except UnicodeDecodeError:
        return None


def split_documents(
    documents: list[Document], split_by: str, val_fraction: float, test_fraction: float,
    val: tuple[str, ...], test: tuple[str, ...],
) -> dict[str, list[Document]]:
    """Assign documents (or, splitting by block, contiguous pieces of their joined text) to splits.

    By document, a document named by a pattern of ``val`` or ``test`` goes to that split; any other
    goes to test when ``u < test_fraction``, to val when ``u < test_fraction + val_fraction`` (for a
    split without patterns) and to train otherwise, where ``u`` in ``[0, 1)`` is a hash of its name:
    the assignment depends on names only, so editing a file never moves it to another split. A
    split with a positive fraction that no document draws takes the training document drawn lowest. By
    block, the joined text is cut into train, val and test in that order, val and test taking the
    given fractions of its characters.
    """
    if split_by == "auto":
        split_by = "block" if len(documents) == 1 and not (val or test) else "document"
    if split_by == "block":
        if val or test:
            raise InputError(
                f"val/test: expected no document lists when splitting by block (split_by={split_by!r}), got "
                f"val={list(val)}, test={list(test)}"
            )
        text = SEPARATOR.join(d.text for d in documents)
        name = documents[0].name if len(documents) == 1 else f"{len(documents)} documents"
        cut_val = round(len(text) * (1 - val_fraction - test_fraction))
        cut_test = round(len(text) * (1 - test_fraction))
        pieces = {"train": text[:cut_val], "val": text[cut_val:cut_test], "test": text[cut_test:]}
        return {s: [Document(f"{name} [{s} block]", t)] if t else [] for s, t in pieces.items()}

    listed = {"val": val, "test": test}
    for split, patterns in listed.items():
        for pattern in patterns:
            if not any(_matches(d.name, pattern) for d in documents):
                raise InputError(f"{split}: expected {pattern!r} to name a document of the corpus, got no match")
    splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
    draw = {d.name: derive_seed("text-split", d.name) / 2**63 for d in documents}  # u in [0, 1)
    for doc in documents:
        chosen = [s for s, patterns in listed.items() if any(_matches(doc.name, p) for p in patterns)]
        if len(chosen) > 1:
            raise InputError(f"val/test: expected each document in at most one list, got {doc.name!r} in both")
        if not chosen:
            u = draw[doc.name]
            if not test and u < test_fraction:
                chosen = ["test"]
            elif not val and u < test_fraction + val_fraction:
                chosen = ["val"]
            else:
                chosen = ["train"]
        splits[chosen[0]].append(doc)
    # A few documents may all draw past a small fraction: the split then takes the training document
    # drawn lowest, so a positive fraction never leaves it empty.
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        if fraction > 0 and not listed[split] and not splits[split] and len(splits["train"]) > 1:
            lowest = min(splits["train"], key=lambda d: draw[d.name])
            splits["train"].remove(lowest)
            splits[split].append(lowest)
    return splits


# ------------------------------------------------------------------------------------ the codecs


def _narrow_ids(ids: np.ndarray, vocab_size: int) -> torch.Tensor:
    """``ids`` as a tensor of the narrowest integer dtype that holds ``vocab_size`` ids."""
    dtype = np.uint8 if vocab_size <= 256 else np.int16 if vocab_size <= 2**15 else np.int32
    return torch.from_numpy(np.array(ids, dtype=dtype))  # a copy: the input may be a read-only buffer


class CharCodec:
    """Characters: the sorted distinct characters of the training text (and ``"\\n"``), then ``<unk>``
    for every character unseen in training."""

    level = "char"

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.vocab_size = len(chars) + 1
        self.unk = len(chars)
        self._points = np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32)  # sorted code points

    @classmethod
    def train(cls, text: str) -> "CharCodec":
        return cls("".join(sorted(set(text) | {"\n"})))

    def state(self) -> dict[str, Any]:
        return {"chars": self.chars}

    @property
    def vocab(self) -> tuple[str, ...]:
        return tuple(self.chars) + (UNK,)

    def encode(self, text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        index = np.searchsorted(self._points, points)
        found = index < len(self._points)
        found[found] = self._points[index[found]] == points[found]
        return np.where(found, index, self.unk)

    def decode(self, ids: np.ndarray) -> str:
        table = np.append(self._points, np.uint32(ord(UNK_TEXT)))
        return table[ids].astype("<u4").tobytes().decode("utf-32-le")


class ByteCodec:
    """The 256 byte values of the text's UTF-8 encoding."""

    level = "byte"
    vocab_size = 256
    vocab = tuple(chr(b) if 32 <= b < 127 else f"<0x{b:02X}>" for b in range(256))

    def state(self) -> dict[str, Any]:
        return {}

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def to_bytes(self, ids: np.ndarray) -> bytes:
        return ids.astype(np.uint8).tobytes()

    def decode(self, ids: np.ndarray) -> str:
        return self.to_bytes(ids).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """The printable character that byte-level BPE writes for each byte value, inverted: char -> byte.

    Bytes that are printable and not whitespace (``!`` to ``~``, ``¡`` to ``¬``, ``®`` to ``ÿ``) stand
    for themselves; the other 68, in increasing order, take the code points from 256 up.
    """
    own = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in own]
    table = {chr(b): b for b in own}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


def _tokenizers():
    """The HF ``tokenizers`` package, imported only when a BPE vocabulary is used."""
    try:
        import tokenizers
    except ImportError:
        raise InputError(
            "level: expected the 'tokenizers' package for level='bpe', got it missing; install the data extra "
            "(pip install 'rnnkit[data]')"
        ) from None
    return tokenizers


class BpeCodec:
    """Byte-level BPE (HF ``tokenizers``): byte-level pre-tokenization, merges learned from the training
    text only, no special tokens."""

    level = "bpe"

    def __init__(self, tokenizer_json: str) -> None:
        tokenizers = _tokenizers()
        try:
            self.tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as error:  # the library raises its own exception types for malformed JSON
            raise InputError(f"tokenizer: expected a tokenizers JSON document, got one it rejects ({error})") from None
        self.tokenizer_json = tokenizer_json
        self.vocab_size = self.tokenizer.get_vocab_size()
        alphabet = _byte_level_alphabet()
        self._bytes = [bytes(alphabet[c] for c in self.tokenizer.id_to_token(i)) for i in range(self.vocab_size)]

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> "BpeCodec":
        tokenizers = _tokenizers()
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tokenizer = tokenizers.Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer.to_str())

    def state(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer_json}

    @property
    def vocab(self) -> tuple[str, ...]:
        return tuple(self.tokenizer.id_to_token(i) for i in range(self.vocab_size))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int64)

    def encode_pieces(self, pieces: list[str]) -> np.ndarray:
        """Ids of the concatenated ``pieces``, encoded in parallel (each piece on its own)."""
        encoded = self.tokenizer.encode_batch(pieces)
        return np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encoded] or [np.zeros(0, np.int64)])

    def to_bytes(self, ids: np.ndarray) -> bytes:
        return b"".join(self._bytes[i] for i in ids)

    def decode(self, ids: np.ndarray) -> str:
        return self.to_bytes(ids).decode("utf-8", errors="replace")


def _encode_split(codec, documents: list[Document]) -> np.ndarray:
    """Ids of the documents joined by ``SEPARATOR``; BPE encodes each document (after the first, with
    the separator in front) on its own, in parallel."""
    if isinstance(codec, BpeCodec):
        return codec.encode_pieces([(SEPARATOR if i else "") + d.text for i, d in enumerate(documents)])
    return codec.encode(SEPARATOR.join(d.text for d in documents))


# ------------------------------------------------------------------------------------ the task


def _patterns(name: str, value: object) -> tuple[str, ...]:
    """A comma-separated string (or a list) of names or glob patterns, as a tuple."""
    if value is None:
        return ()
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        raise InputError(f"{name}: expected comma-separated file names or glob patterns, got {describe(value)}")
    items = [v.strip() for v in items if v.strip()]
    if not items:
        raise InputError(f"{name}: expected at least one file name or glob pattern, got {value!r}")
    return tuple(items)


def _check_fraction(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise InputError(f"{name}: expected a number in [0, 1], got {value!r}")


@register_task("text")
class TextTask(StreamingTextTask):
    """Language model on your own text files (a file, a directory or a glob pattern; char, byte or BPE).

    Options:
        path: a text file, a directory searched recursively (hidden entries skipped) for files whose
            name or relative path matches ``glob``, or a glob pattern (``**`` recurses). Files must
            be UTF-8; binary and undecodable files are skipped with a warning that counts them.
        glob: file-name pattern inside a directory (default ``"*"``: every file).
        level: ``"char"`` (default), ``"byte"`` or ``"bpe"``.

            * ``char``: the sorted distinct characters of the training split (any Unicode) plus
              ``"\\n"``, then ``<unk>`` (the last id) for characters unseen in training; ``<unk>``
              decodes to U+FFFD.
            * ``byte``: the 256 byte values of the UTF-8 text.
            * ``bpe``: a byte-level BPE of ``vocab_size`` tokens (HF ``tokenizers``, the ``data``
              extra), trained on the training split only; deterministic for the same text.
        vocab_size: BPE vocabulary size (default 1024; ``bpe`` only). A small corpus may end with fewer.
        split_by: ``"document"`` (whole files go to a split), ``"block"`` (the joined text is cut
            into contiguous train, val and test blocks, in that order) or ``"auto"`` (default: by
            block for a single document without ``val``/``test`` lists, else by document).
        val_fraction, test_fraction: shares of the documents (by a hash of their names, so the
            assignment is stable as files change or are added; a positive fraction always gets at
            least one document) or of the characters (by block); default 0.05 each.
        val, test: comma-separated file names or glob patterns (matched against relative paths and
            file names) of the documents of that split; the split then holds exactly those, and
            the other documents are assigned by fraction to the remaining splits.

    Each split is its documents, in name order, joined by a blank line; training and evaluation
    stream it in windows as :class:`StreamingTextTask` describes, and an evaluation stream starts
    with the separator's last token as the context of its first token. All three splits must be non-empty when the
    task is built from its data.

    Metrics: ``loss`` is per token of the level (character, byte or BPE token); ``bpc`` is bits
    per character of the text at every level, and ``byte`` and ``bpe`` add ``bpb``, bits per UTF-8
    byte. For ``bpe`` both divide the split's total bits by its characters (bytes): exact when the
    whole split is evaluated, the split's average ratio when evaluation is capped.

    Saved with a model (:meth:`portable_state`): the characters (``char``) or the tokenizer JSON
    (``bpe``). A restored task (``rnnkit eval``, ``rnnkit generate``) encodes and decodes without
    the corpus and reads data only when batches are asked for, from ``path`` (which ``rnnkit eval
    --task-opt path=NEW`` may point elsewhere) with the saved vocabulary.

    Batches: ``x`` and ``y`` ``(B, T)`` int64; default ``T = 256``.

    Example:
        >>> task = build_task("text", path="notes/", glob="*.md")
        >>> batch = next(task.train_batches(batch_size=16, seq_len=128))
        >>> task.decode(task.encode("héllo"))
        'héllo'
    """

    def __init__(
        self,
        path: str,
        glob: str = "*",
        level: str = "char",
        vocab_size: int | None = None,
        split_by: str = "auto",
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        val: str | None = None,
        test: str | None = None,
    ) -> None:
        self._configure(path=path, glob=glob, level=level, vocab_size=vocab_size, split_by=split_by,
                        val_fraction=val_fraction, test_fraction=test_fraction, val=val, test=test)
        self._load()
        for split in SPLITS:
            self._check_not_empty(split, self._documents[split])
        train = self._documents["train"]
        if level == "char":
            codec = CharCodec.train(SEPARATOR.join(d.text for d in train))
        elif level == "byte":
            codec = ByteCodec()
        else:  # BPE learns from each training document on its own
            codec = BpeCodec.train([d.text for d in train], vocab_size or DEFAULT_BPE_VOCAB)
        self._set_codec(codec)

    def _configure(self, **options: Any) -> None:
        """Check and keep the options; nothing is read yet."""
        path = options["path"]
        if not isinstance(path, (str, os.PathLike)) or not str(path):
            raise InputError(f"path: expected a file, directory or glob pattern, got {describe(path)}")
        options["path"] = str(path)
        if not isinstance(options["glob"], str) or not options["glob"]:
            raise InputError(f"glob: expected a file-name pattern such as '*.txt', got {describe(options['glob'])}")
        check_choice("level", options["level"], LEVELS)
        if options["vocab_size"] is not None:
            if options["level"] != "bpe":
                raise InputError(f"vocab_size: expected it only with level='bpe', got level={options['level']!r}")
            check_positive_int("vocab_size", options["vocab_size"], minimum=256)
        check_choice("split_by", options["split_by"], SPLIT_MODES)
        for name in ("val_fraction", "test_fraction"):
            _check_fraction(name, options[name])
        if options["val_fraction"] + options["test_fraction"] > 1:
            raise InputError(
                f"val_fraction + test_fraction: expected at most 1, got "
                f"{options['val_fraction']} + {options['test_fraction']}"
            )
        self._val = _patterns("val", options["val"])
        self._test = _patterns("test", options["test"])
        super().__init__(**options)
        self.level = options["level"]
        self.unit = UNIT[self.level]
        self.metrics = ("loss", "bpc") if self.level == "char" else ("loss", "bpc", "bpb")
        self._splits: dict[str, SplitData] | None = None
        self._documents: dict[str, list[Document]] = {}

    def _set_codec(self, codec) -> None:
        self._codec = codec
        self.vocab_size = codec.vocab_size
        self.n_classes = codec.vocab_size
        self._context = int(codec.encode(SEPARATOR)[-1])

    @classmethod
    def restore(cls, options: dict[str, Any], state: dict[str, Any]) -> "TextTask":
        """The task with the saved vocabulary (or tokenizer) in ``state``; the corpus at ``options["path"]``
        is read only when batches are asked for."""
        try:
            bound = inspect.signature(cls.__init__).bind(None, **options)
        except TypeError as error:
            raise InputError(f"task options: expected the options of {cls.name!r} with a path, got {options} ({error})") from None
        bound.apply_defaults()
        task = cls.__new__(cls)
        task._configure(**{k: v for k, v in bound.arguments.items() if k != "self"})
        level = task.level
        key = {"char": "chars", "bpe": "tokenizer"}.get(level)
        if key is not None and not isinstance(state.get(key), str):
            raise InputError(f"task state: expected {key!r} (a string) for level={level!r}, got keys {sorted(state)}")
        codec = CharCodec(state["chars"]) if level == "char" else ByteCodec() if level == "byte" else BpeCodec(state["tokenizer"])
        task._set_codec(codec)
        return task

    def portable_state(self) -> dict[str, Any]:
        """``{"chars": ...}`` (``char``), ``{}`` (``byte``) or ``{"tokenizer": <tokenizers JSON>}`` (``bpe``)."""
        return self._codec.state()

    @property
    def vocab(self) -> tuple[str, ...]:
        """Each id's token as text: a character (``<unk>`` last), a byte (``<0xNN>`` unless printable
        ASCII) or a BPE token in its byte-level spelling."""
        return self._codec.vocab

    # -------------------------------------------------------------------- data, read when needed
    def _load(self) -> dict[str, SplitData]:
        if self._splits is None:
            o = self.options
            documents = find_documents(o["path"], o["glob"])
            self._n_documents = len(documents)
            self._documents = split_documents(
                documents, o["split_by"], o["val_fraction"], o["test_fraction"], self._val, self._test
            )
            self._splits = {}
        return self._splits

    def _split(self, split: str) -> SplitData:
        """The text and ids of ``split``, encoded with this task's vocabulary on first use."""
        check_split(split)
        splits = self._load()
        if split not in splits:
            documents = self._documents[split]
            self._check_not_empty(split, documents)
            ids = _encode_split(self._codec, documents)
            text = SEPARATOR.join(d.text for d in documents)
            splits[split] = SplitData(
                tuple(d.name for d in documents), text, _narrow_ids(ids, self.vocab_size), len(text.encode("utf-8"))
            )
        return splits[split]

    def _check_not_empty(self, split: str, documents) -> None:
        if not documents:
            o = self.options
            how = (
                f"val_fraction={o['val_fraction']}, test_fraction={o['test_fraction']}, val={o['val']!r}, "
                f"test={o['test']!r}, split_by={o['split_by']!r}"
            )
            raise InputError(
                f"{split}: expected a non-empty split of the {self._n_documents} documents "
                f"in {o['path']!r}, got none ({how}); give more files, other fractions or explicit val=/test= lists"
            )

    def split_ids(self, split: str) -> torch.Tensor:
        """``(N,)`` token ids of ``"train"``, ``"val"`` or ``"test"``."""
        return self._split(split).ids

    def text(self, split: str) -> str:
        """The text of ``split``: its documents joined by a blank line."""
        return self._split(split).text

    def documents(self, split: str) -> tuple[str, ...]:
        """Names of the documents of ``split``, in stream order."""
        return self._split(split).names

    def context_id(self) -> int:
        return self._context

    def units_per_target(self, split: str) -> dict[str, float]:
        data = self._split(split)
        n = max(len(data.ids), 1)
        return {"bpc": len(data.text) / n, "bpb": data.n_bytes / n}

    # -------------------------------------------------------------------- encode / decode
    def encode(self, text: str) -> torch.Tensor:
        """Token ids ``(N,)`` int64 of ``text`` (``N = len(text)`` for ``char``; unseen characters give ``<unk>``)."""
        if not isinstance(text, str):
            raise InputError(f"text: expected a str, got {describe(text)}")
        return torch.from_numpy(np.asarray(self._codec.encode(text), dtype=np.int64))

    def decode(self, ids: Any) -> str:
        """Text of a 1-D sequence of ids (a tensor or ints in ``[0, vocab_size)``); bytes that do not
        form UTF-8 (a character cut by the sequence's ends) decode to U+FFFD."""
        return self._codec.decode(ids_array(ids, self.vocab_size))

    def stream_decoder(self) -> StreamDecoder | Utf8StreamDecoder:
        """Decodes ids one at a time; ``byte`` and ``bpe`` hold back a character split across ids."""
        if self.level == "char":
            return super().stream_decoder()
        return Utf8StreamDecoder(lambda ids: self._codec.to_bytes(ids_array(ids, self.vocab_size)))

