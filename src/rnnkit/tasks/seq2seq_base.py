"""Sequence-to-sequence tasks: the batch they yield, their base classes and their evaluation.

A sequence-to-sequence task maps a source sequence to a target sequence of its own length, for the
encoder-decoder models of :mod:`rnnkit.models` (``Seq2Seq``, ``PointerNetwork``)::

    task = build_task("reverse")
    batch = next(task.train_batches(batch_size=32, seed=0))
    logits = model(batch.src, batch.src_lengths, batch.tgt_in, batch.tgt_lengths)        # (B, T, V)
    loss = seq2seq_loss(logits, batch.targets, batch.tgt_lengths)
    result = greedy_decode(model, batch.src, batch.src_lengths, **task.decode_options(batch.src_lengths))
    print(task.finalize_metrics(task.metric_sums(result, batch)))                        # {"accuracy": ...}

Conventions (those of ``seq2seq_loss`` and ``Seq2Seq.forward``): ``targets`` ends each sequence with
``eos_id``; ``tgt_in`` is ``bos_id`` followed by the targets but the last; steps at or past
``tgt_lengths`` hold ``IGNORE_INDEX`` in ``targets`` and ``pad_id`` in ``tgt_in`` (a valid id, as the
model's embedding needs). Token tasks share the special ids ``pad_id = 0``, ``bos_id = 1``,
``eos_id = 2`` in both vocabularies. Pointer tasks (``pointer = True``) predict input positions:
position 0 of every source is an end marker (``eos_id = 0``), element ``i`` of the instance is
position ``i + 1``, there is no start token (``bos_id = None``, ``tgt_in = None``: a
``PointerNetwork`` reads ``targets`` itself).

Determinism as for every task: a batch is a pure function of (options, seed, split, index).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Iterator, Sequence

import torch

from rnnkit.errors import InputError, check_positive_int, describe
from rnnkit.tasks.base import IGNORE_INDEX, Task, check_eval_args, check_train_args, generator
from rnnkit.tasks.bucketing import pad_sequences

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIALS = ("<pad>", "<s>", "</s>")
#: The end marker's position in a pointer task's source, and so its end id.
POINTER_EOS = 0


@dataclass
class Seq2SeqBatch:
    """One batch of a sequence-to-sequence task.

    Attributes:
        src: ``(B, S)`` int64 source ids (``pad_id`` at padding) or ``(B, S, D_in)`` float32 features (0
            at padding).
        src_lengths: ``(B,)`` int64 valid source lengths, each in ``[1, S]``.
        tgt_in: ``(B, T)`` int64 decoder inputs, ``bos_id`` then ``targets`` but the last, ``pad_id`` at
            padding; ``None`` for pointer tasks.
        targets: ``(B, T)`` int64 target ids (pointer tasks: source positions), each sequence ending
            with ``eos_id``, ``IGNORE_INDEX`` (-100) at padding.
        tgt_lengths: ``(B,)`` int64 valid target lengths (the end token included), each in ``[1, T]``.
        references: per example, every correct target sequence (ids, no end token), for tasks where
            more than one answer is right (G2P's alternative pronunciations); ``None`` when the target
            is the only one.
        reset: always ``True`` (independent sequences), as :class:`~rnnkit.tasks.base.Batch`.
    """

    src: torch.Tensor
    src_lengths: torch.Tensor
    tgt_in: torch.Tensor | None
    targets: torch.Tensor
    tgt_lengths: torch.Tensor
    references: tuple[tuple[tuple[int, ...], ...], ...] | None = None
    reset: bool = True

    @property
    def num_tokens(self) -> int:
        """Number of predicted target tokens (the end tokens included), for tokens/s figures."""
        return int((self.targets != IGNORE_INDEX).sum())

    def __len__(self) -> int:
        return int(self.src.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Seq2SeqBatch":
        """A copy of the batch with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Seq2SeqBatch(move(self.src), move(self.src_lengths), move(self.tgt_in), move(self.targets),
                            move(self.tgt_lengths), self.references, self.reset)

    def target_sequences(self) -> list[tuple[int, ...]]:
        """Each example's target ids without the end token and padding."""
        return [tuple(row[: n - 1]) for row, n in zip(self.targets.tolist(), self.tgt_lengths.tolist())]

    def take(self, lo: int, hi: int) -> "Seq2SeqBatch":
        """Examples ``lo:hi``, copied and cut to their own longest source and target."""
        src_lengths, tgt_lengths = self.src_lengths[lo:hi].clone(), self.tgt_lengths[lo:hi].clone()
        s, t = int(src_lengths.max()), int(tgt_lengths.max())
        tgt_in = None if self.tgt_in is None else self.tgt_in[lo:hi, :t].clone()
        refs = None if self.references is None else self.references[lo:hi]
        return Seq2SeqBatch(self.src[lo:hi, :s].clone(), src_lengths, tgt_in, self.targets[lo:hi, :t].clone(),
                            tgt_lengths, refs, self.reset)


def shift_right(targets: torch.Tensor, tgt_lengths: torch.Tensor, bos_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs ``(B, T)`` from padded ``targets`` ``(B, T)``: ``bos_id``, then ``targets[:, :-1]``,
    ``pad_id`` at and past each ``tgt_lengths``."""
    tgt_in = torch.cat([torch.full_like(targets[:, :1], bos_id), targets[:, :-1]], 1)
    valid = torch.arange(targets.shape[1]) < tgt_lengths[:, None]
    return torch.where(valid, tgt_in, torch.full_like(tgt_in, pad_id))


def collate_seq2seq(
    sources: Sequence[Any],
    targets: Sequence[Any],
    *,
    bos_id: int | None,
    pad_id: int = PAD_ID,
    references: Sequence[Sequence[Sequence[int]]] | None = None,
) -> Seq2SeqBatch:
    """A right-padded :class:`Seq2SeqBatch` from ragged examples.

    Args:
        sources: ``B`` sources: ``(S_i,)`` int ids (tensors or lists) or ``(S_i, D_in)`` float tensors.
        targets: ``B`` targets ``(T_i,)`` of ids, each already ending with the end id.
        bos_id: the start id of ``tgt_in``; ``None`` (pointer tasks) leaves ``tgt_in`` ``None``.
        pad_id: written in token sources and ``tgt_in`` at padding.
        references: per example, the correct target sequences (no end token), or ``None``.

    Returns:
        The batch (token sources padded with ``pad_id``, features with 0, targets with ``IGNORE_INDEX``).
    """
    if not isinstance(sources, (list, tuple)) or not isinstance(targets, (list, tuple)) or len(sources) != len(targets):
        raise InputError(f"sources/targets: expected two lists of one length, got {describe(sources)} and {describe(targets)}")
    src_tensors = [s if isinstance(s, torch.Tensor) else torch.tensor(s, dtype=torch.long) for s in sources]
    is_tokens = bool(src_tensors) and not src_tensors[0].is_floating_point()
    src, src_lengths = pad_sequences(src_tensors, padding_value=pad_id if is_tokens else 0)
    padded, tgt_lengths = pad_sequences([torch.as_tensor(t, dtype=torch.long) for t in targets], IGNORE_INDEX)
    tgt_in = None if bos_id is None else shift_right(padded, tgt_lengths, bos_id, pad_id)
    refs = None if references is None else tuple(tuple(tuple(r) for r in refs) for refs in references)
    return Seq2SeqBatch(src, src_lengths, tgt_in, padded, tgt_lengths, refs)


class Vocabulary:
    """Symbols and their ids, after the special ids ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2.

    Args:
        symbols: the task's symbols in id order (ids 3, 4, ...), distinct strings.
    """

    def __init__(self, symbols: Iterable[str]) -> None:
        self.symbols: tuple[str, ...] = SPECIALS + tuple(symbols)
        self.index = {s: i for i, s in enumerate(self.symbols)}
        if len(self.index) != len(self.symbols):
            raise InputError(f"symbols: expected distinct symbols other than {SPECIALS}, got {list(symbols)!r}")

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, name: str, symbols: Sequence[str]) -> list[int]:
        """Ids of ``symbols``; an unknown symbol raises, naming the argument ``name``."""
        ids = []
        for s in symbols:
            i = self.index.get(s)
            if i is None or i < len(SPECIALS):
                own = self.symbols[len(SPECIALS):]
                known = "".join(own) if all(len(x) == 1 for x in own) else " ".join(own)
                raise InputError(f"{name}: expected symbols from {known!r}, got {s!r}")
            ids.append(i)
        return ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Symbols of ``ids`` up to the first end id; start and padding ids are skipped."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID) or not 0 <= i < len(self.symbols):
                continue
            out.append(self.symbols[i])
        return out


def predicted_sequences(predictions: Any, eos_id: int | None) -> list[tuple[int, ...]]:
    """Each example's predicted ids without the end token and what follows it.

    Args:
        predictions: a ``DecodeResult`` (``tokens`` ``(B, L)``, ``lengths`` ``(B,)``), a ``BeamResult``
            (``(B, N, L)``, ``(B, N)``: the best hypothesis is used), a ``(B, L)`` int tensor, or a list
            of ``B`` id sequences.
        eos_id: the end id (``None``: nothing ends a sequence early).
    """
    lengths = None
    if hasattr(predictions, "tokens") and hasattr(predictions, "lengths"):
        tokens, lengths = predictions.tokens, predictions.lengths
        if tokens.dim() == 3:
            tokens, lengths = tokens[:, 0], lengths[:, 0]
        rows = [row[:n] for row, n in zip(tokens.tolist(), lengths.tolist())]
    elif isinstance(predictions, torch.Tensor) and predictions.dim() == 2 and not predictions.is_floating_point():
        rows = predictions.tolist()
    elif isinstance(predictions, (list, tuple)):
        rows = [list(map(int, row)) for row in predictions]
    else:
        raise InputError(f"predictions: expected a decoding result, a (B, L) id tensor or a list of id sequences, "
                         f"got {describe(predictions)}")
    out = []
    for row in rows:
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        out.append(tuple(row))
    return out


def add_sums(total: dict[str, float], sums: dict[str, float]) -> dict[str, float]:
    """Add one batch's metric sums into ``total`` (in place) and return it."""
    for key, value in sums.items():
        total[key] = total.get(key, 0) + value
    return total


class Seq2SeqTask(Task):
    """Base class of sequence-to-sequence tasks (module docstring for the batch conventions).

    Attributes (class or instance):
        seq2seq: ``True``; trainers and the CLI tell these tasks apart by it (their batches are
            :class:`Seq2SeqBatch`, not ``Batch``).
        input_kind: ``"tokens"`` (``src`` ``(B, S)``) or ``"features"`` (``(B, S, D_in)``).
        src_vocab_size: source ids (token sources); also ``vocab_size``.
        d_input: ``D_in`` (feature sources).
        tgt_vocab_size: target ids (``None`` for pointer tasks, whose outputs are source positions);
            also ``n_classes``.
        pointer: the targets are source positions (for a ``PointerNetwork``).
        bos_id, eos_id, pad_id: the start, end and padding ids (pointer tasks: ``None``, 0, 0).
        seq2seq_metrics: the names :meth:`finalize_metrics` returns.
        default_seq_len: the largest training source size (elements, digits or characters).

    ``seq_len`` in ``train_batches``/``eval_batches`` is each task's size knob (see its docstring):
    ``None`` draws sizes from the training range, an int fixes every example's size, which is how
    ``test_lengths`` beyond the training range probe length generalisation.
    """

    seq2seq: ClassVar[bool] = True
    target = "per_step"
    metrics = ("loss",)
    pointer: bool = False
    src_vocab_size: int | None = None
    tgt_vocab_size: int | None = None
    bos_id: int | None = BOS_ID
    eos_id: int = EOS_ID
    pad_id: int = PAD_ID
    seq2seq_metrics: tuple[str, ...] = ("accuracy",)

    # ------------------------------------------------------------------ strings
    def encode_source(self, text: str) -> torch.Tensor:
        """One source from its text: ``(S,)`` int64 ids or ``(S, D_in)`` float32 features."""
        raise NotImplementedError

    def decode_source(self, src: torch.Tensor) -> str:
        """The text of one source (``(S,)`` ids or ``(S, D_in)`` features, valid steps only)."""
        raise NotImplementedError

    def encode_target(self, text: str) -> torch.Tensor:
        """One target ``(T,)`` int64 from its text, ending with ``eos_id``."""
        raise NotImplementedError

    def decode_target(self, ids: Iterable[int]) -> str:
        """The text of predicted or target ids (up to the end id)."""
        raise NotImplementedError

    def source_batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(src, src_lengths)`` for sources given as text, right-padded, ready for decoding."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
            raise InputError(f"texts: expected a non-empty list of strings, got {describe(texts)}")
        sources = [self.encode_source(t) for t in texts]
        return pad_sequences(sources, padding_value=self.pad_id if self.input_kind == "tokens" else 0)

    # ------------------------------------------------------------------ decoding and metrics
    def max_target_len(self, src_lengths: torch.Tensor) -> int:
        """The most target tokens (end included) any of these sources can need: ``max_len`` of decoding."""
        return int(src_lengths.max()) + 1

    def decode_options(self, src_lengths: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments of ``rnnkit.models.decoding``'s functions for sources of these lengths:
        ``max_len`` (``(B,)``: each source's own :meth:`max_target_len`, so that a source decodes the
        same in any batch), ``bos_id``, ``eos_id``, ``pad_id``."""
        limits = torch.tensor([self.max_target_len(n) for n in src_lengths.reshape(-1, 1).cpu()],
                              dtype=torch.long, device=src_lengths.device)
        return {"max_len": limits, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}

    def metric_sums(self, predictions: Any, batch: Seq2SeqBatch) -> dict[str, float]:
        """Additive counts of one batch's predictions (see :func:`predicted_sequences` for the forms
        ``predictions`` may take); sum them over batches with :func:`add_sums`, then
        :meth:`finalize_metrics`. The default counts exact matches with the targets."""
        predicted = self._predictions(predictions, batch)
        correct = sum(p == t for p, t in zip(predicted, batch.target_sequences()))
        return {"sequences": len(predicted), "correct": correct}

    def finalize_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """The metrics (:attr:`seq2seq_metrics`) from summed counts: ``accuracy`` = exact sequences."""
        return {"accuracy": sums["correct"] / max(sums["sequences"], 1)}

    def evaluate(self, pairs: Iterable[tuple[Any, Seq2SeqBatch]]) -> dict[str, float]:
        """The metrics over ``(predictions, batch)`` pairs, e.g. a whole split decoded batch by batch."""
        total: dict[str, float] = {}
        for predictions, batch in pairs:
            add_sums(total, self.metric_sums(predictions, batch))
        if not total:
            raise InputError("pairs: expected at least one (predictions, batch) pair, got none")
        return self.finalize_metrics(total)

    def _predictions(self, predictions: Any, batch: Seq2SeqBatch) -> list[tuple[int, ...]]:
        predicted = predicted_sequences(predictions, self.eos_id)
        if len(predicted) != len(batch):
            raise InputError(f"predictions: expected {len(batch)} sequences (the batch size), got {len(predicted)}")
        return predicted


class GeneratedSeq2SeqTask(Seq2SeqTask):
    """Shared machinery of generated sequence-to-sequence tasks (reverse, addition, sort, convex hull).

    Subclasses set ``size_range`` (the training sizes ``(lo, hi)``) and implement :meth:`generate`,
    a function of ``(B, lo, hi, generator)``. Train batch ``k`` of seed ``s`` is ``generate(B, lo, hi,
    generator(name, "train", s, k))``; ``val`` and ``test`` are ``eval_examples`` examples each, drawn
    once from seeds keyed by the split's name and the size, cached, and cut into batches in order
    (each cut to its own longest sequence).
    """

    #: Test sizes as multiples of the largest training size.
    length_factors: tuple[int, ...] = (1, 2, 4)
    size_range: tuple[int, int] = (1, 1)

    @property
    def test_lengths(self) -> tuple[int, ...]:
        return tuple(f * self.size_range[1] for f in self.length_factors)

    def __init__(self, *, eval_examples: int = 1000, **options: Any) -> None:
        check_positive_int("eval_examples", eval_examples)
        super().__init__(eval_examples=eval_examples, **options)
        self.eval_examples = eval_examples
        self._eval_cache: dict[tuple[str, int | None], Seq2SeqBatch] = {}

    def _set_range(self, names: tuple[str, str], lo: object, hi: object) -> None:
        check_positive_int(names[0], lo, minimum=self.min_size)
        check_positive_int(names[1], hi, minimum=self.min_size)
        if hi < lo:
            raise InputError(f"{names[1]}: expected at least {names[0]} = {lo}, got {hi}")
        self.size_range = (lo, hi)
        self.default_seq_len = hi

    def sizes(self, seq_len: int | None) -> tuple[int, int]:
        """The size range for a requested ``seq_len``: the training range for ``None``, else ``(seq_len, seq_len)``."""
        if seq_len is None:
            return self.size_range
        if seq_len < self.min_size:
            raise InputError(f"seq_len: expected at least {self.min_size} for {self.name}, got {seq_len}")
        return seq_len, seq_len

    #: The smallest size an explicit ``seq_len`` (or the training range) may ask for.
    min_size: int = 1

    def generate(self, batch_size: int, lo: int, hi: int, gen: torch.Generator) -> Seq2SeqBatch:
        """``batch_size`` fresh examples of sizes uniform in ``[lo, hi]`` drawn from ``gen``."""
        raise NotImplementedError

    def train_batches(
        self, batch_size: int, seq_len: int | None = None, seed: int = 0, start: int = 0
    ) -> Iterator[Seq2SeqBatch]:
        check_train_args(batch_size, seq_len, seed, start)
        lo, hi = self.sizes(seq_len)

        def batches() -> Iterator[Seq2SeqBatch]:
            k = start
            while True:
                yield self.generate(batch_size, lo, hi, generator(self.name, "train", seed, k))
                k += 1

        return batches()

    def eval_batches(self, split: str, batch_size: int, seq_len: int | None = None) -> Iterator[Seq2SeqBatch]:
        check_eval_args(split, batch_size, seq_len)
        data = self.eval_set(split, seq_len)
        n = self.eval_examples
        return (data.take(i, min(i + batch_size, n)) for i in range(0, n, batch_size))

    def eval_set(self, split: str, seq_len: int | None = None) -> Seq2SeqBatch:
        """The whole ``split`` at ``seq_len`` as one batch of ``eval_examples`` examples (cached)."""
        lo, hi = self.sizes(seq_len)
        key = (split, seq_len)
        if key not in self._eval_cache:
            self._eval_cache[key] = self.generate(self.eval_examples, lo, hi, generator(self.name, split, seq_len))
        return self._eval_cache[key]


def draw_sizes(batch_size: int, lo: int, hi: int, gen: torch.Generator) -> torch.Tensor:
    """``(B,)`` int64 sizes uniform in ``[lo, hi]``."""
    return torch.randint(lo, hi + 1, (batch_size,), generator=gen)


__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "POINTER_EOS", "SPECIALS", "GeneratedSeq2SeqTask", "Seq2SeqBatch", "Seq2SeqTask",
    "Vocabulary", "add_sums", "collate_seq2seq", "draw_sizes", "predicted_sequences", "shift_right",
]
