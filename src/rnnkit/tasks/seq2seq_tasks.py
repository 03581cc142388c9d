"""Generated token-to-token probes for encoder-decoder models: ``reverse`` and ``addition``.

- ``reverse``: write the source backwards, the toy task on which Sutskever et al. (2014) motivate
  reversing the source (every output depends on an input as far back as the sequence is long).
- ``addition``: ``"123+4589"`` -> ``"4712"``, the digit-string addition of Zaremba & Sutskever (2014),
  "Learning to Execute", read and answered left to right, so the carries run against the reading order.

Both use one vocabulary for source and target (the special ids first, see
:mod:`rnnkit.tasks.seq2seq_base`) and measure length generalisation: train on sizes up to ``hi``,
test at ``test_lengths`` = 1x, 2x and 4x ``hi``.
"""

from __future__ import annotations

from typing import Iterable

import torch

from rnnkit.errors import InputError, check_positive_int, describe
from rnnkit.tasks.base import IGNORE_INDEX, register_task
from rnnkit.tasks.seq2seq_base import (
    BOS_ID, EOS_ID, PAD_ID, GeneratedSeq2SeqTask, Seq2SeqBatch, Vocabulary, collate_seq2seq, draw_sizes, shift_right,
)


class _TokenTask(GeneratedSeq2SeqTask):
    """A generated task whose source and target are strings over one :class:`Vocabulary` (``self.vocab``);
    ``separator`` joins symbols in text (``" "`` for multi-character symbols, ``""`` for characters)."""

    input_kind = "tokens"
    separator = " "
    vocab: Vocabulary

    def _set_vocab(self, symbols: Iterable[str]) -> None:
        self.vocab = Vocabulary(symbols)
        self.src_vocab_size = self.vocab_size = self.tgt_vocab_size = self.n_classes = len(self.vocab)

    def _split(self, name: str, text: object) -> list[str]:
        if not isinstance(text, str):
            raise InputError(f"{name}: expected a string, got {describe(text)}")
        symbols = text.split() if self.separator == " " else [c for c in text if not c.isspace()]
        if not symbols:
            raise InputError(f"{name}: expected at least one symbol, got {text!r}")
        return symbols

    def encode_source(self, text: str) -> torch.Tensor:
        return torch.tensor(self.vocab.encode("text", self._split("text", text)), dtype=torch.long)

    def decode_source(self, src: torch.Tensor) -> str:
        return self.separator.join(self.vocab.decode(src.tolist()))

    def encode_target(self, text: str) -> torch.Tensor:
        return torch.tensor(self.vocab.encode("text", self._split("text", text)) + [EOS_ID], dtype=torch.long)

    def decode_target(self, ids: Iterable[int]) -> str:
        return self.separator.join(self.vocab.decode(ids))


@register_task("reverse")
class ReverseTask(_TokenTask):
    """Reverse a sequence of random symbols (sequence to sequence).

    Source: ``n`` symbols drawn uniformly from ``n_symbols``, ``n`` uniform in ``[min_len, max_len]``;
    target: the same symbols in reverse order, then the end token. Text form: space-separated symbol
    numbers, ``"3 1 4"`` -> ``"4 1 3"`` (symbols ``1..n_symbols`` are ids ``3..n_symbols + 2``).

    Args:
        n_symbols: the alphabet size (default 10).
        min_len, max_len: the training range of ``n`` (default 2..10).
        eval_examples: examples in each of val and test (default 1000).

    ``seq_len`` is ``n`` (every example of that length); ``test_lengths`` = ``max_len`` x (1, 2, 4).
    Metric: exact-sequence ``accuracy``.

    Example:
        >>> task = build_task("reverse", max_len=6)
        >>> batch = next(task.train_batches(batch_size=4))
        >>> batch.src.shape[0], batch.targets.shape[0], task.decode_target(task.encode_target("3 1 4"))
        (4, 4, '3 1 4')
    """

    def __init__(self, *, n_symbols: int = 10, min_len: int = 2, max_len: int = 10, eval_examples: int = 1000) -> None:
        check_positive_int("n_symbols", n_symbols, minimum=2)
        super().__init__(eval_examples=eval_examples, n_symbols=n_symbols, min_len=min_len, max_len=max_len)
        self._set_range(("min_len", "max_len"), min_len, max_len)
        self.n_symbols = n_symbols
        self._set_vocab(str(i) for i in range(1, n_symbols + 1))

    def generate(self, batch_size: int, lo: int, hi: int, gen: torch.Generator) -> Seq2SeqBatch:
        lengths = draw_sizes(batch_size, lo, hi, gen)  # (B,)
        S = int(lengths.max())
        symbols = torch.randint(3, 3 + self.n_symbols, (batch_size, S), generator=gen)  # (B, S)
        steps = torch.arange(S + 1)
        src = torch.where(steps[:S] < lengths[:, None], symbols, PAD_ID)
        backwards = (lengths[:, None] - 1 - steps[:S]).clamp(min=0)  # (B, S): source step read at t
        reversed_ = symbols.gather(1, backwards)
        targets = torch.cat([reversed_, torch.zeros(batch_size, 1, dtype=torch.long)], 1)  # (B, S + 1)
        targets = torch.where(steps < lengths[:, None], targets, IGNORE_INDEX)
        targets = torch.where(steps == lengths[:, None], EOS_ID, targets)
        tgt_lengths = lengths + 1
        return Seq2SeqBatch(src, lengths, shift_right(targets, tgt_lengths, BOS_ID, PAD_ID), targets, tgt_lengths)


@register_task("addition")
class AdditionTask(_TokenTask):
    """Add two decimal numbers written as digit strings: ``"123+4589"`` -> ``"4712"`` (Zaremba & Sutskever 2014).

    Each operand has a digit count uniform in ``[min_digits, max_digits]`` (independently), a first
    digit other than 0 (unless it has one digit) and uniform other digits; the target is the sum's
    digits, then the end token. Source and target are read most significant digit first.

    Args:
        min_digits, max_digits: the training range of digits per operand (default 1..5).
        eval_examples: examples in each of val and test (default 1000).

    ``seq_len`` is the digit count of both operands; ``test_lengths`` = ``max_digits`` x (1, 2, 4).
    Metric: exact-sequence ``accuracy``.

    Example:
        >>> task = build_task("addition")
        >>> task.decode_source(task.encode_source("123+4589")), task.decode_target(task.encode_target("4712"))
        ('123+4589', '4712')
    """

    separator = ""

    def __init__(self, *, min_digits: int = 1, max_digits: int = 5, eval_examples: int = 1000) -> None:
        super().__init__(eval_examples=eval_examples, min_digits=min_digits, max_digits=max_digits)
        self._set_range(("min_digits", "max_digits"), min_digits, max_digits)
        self._set_vocab("0123456789+")

    def max_target_len(self, src_lengths: torch.Tensor) -> int:
        return int(src_lengths.max())  # the sum has at most max(digits) + 1 <= S - 1 digits, then the end

    def _operands(self, batch_size: int, lo: int, hi: int, gen: torch.Generator) -> list[int]:
        digits = draw_sizes(batch_size, lo, hi, gen)  # (B,)
        values = torch.randint(0, 10, (batch_size, hi), generator=gen)  # (B, hi)
        values[:, 0] = torch.where(digits > 1, torch.randint(1, 10, (batch_size,), generator=gen), values[:, 0])
        return [int("".join(map(str, row[:d]))) for row, d in zip(values.tolist(), digits.tolist())]

    def generate(self, batch_size: int, lo: int, hi: int, gen: torch.Generator) -> Seq2SeqBatch:
        a, b = self._operands(batch_size, lo, hi, gen), self._operands(batch_size, lo, hi, gen)
        sources = [self.encode_source(f"{x}+{y}") for x, y in zip(a, b)]
        targets = [self.encode_target(str(x + y)) for x, y in zip(a, b)]
        return collate_seq2seq(sources, targets, bos_id=BOS_ID, pad_id=PAD_ID)


__all__ = ["AdditionTask", "ReverseTask"]
