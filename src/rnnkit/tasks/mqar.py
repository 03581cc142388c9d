"""Multi-query associative recall (MQAR).

From Arora et al. (2023), "Zoology: Measuring and Improving Recall in Efficient Language Models",
section 3: a context of key-value pairs, then several keys asked again later; at each queried key the
model must emit its value. Arora et al. (2024), "Simple linear attention language models balance the
recall-throughput tradeoff", use it to show that a recurrent model's recall is bounded by its state
size while attention recalls at any size.
"""

from __future__ import annotations

import torch

from rnnkit.errors import InputError, check_positive_int
from rnnkit.tasks.base import IGNORE_INDEX, Batch, SyntheticTask, register_task

BLANK = 0


@register_task("mqar")
class MQARTask(SyntheticTask):
    """MQAR: recall the value bound to each queried key.

    Layout of one sequence of length ``T`` (``N`` = ``num_kv_pairs``, ``Q`` = ``num_queries``)::

        x:  k_1 v_1 k_2 v_2 ... k_N v_N | 0 0 k_a 0 k_b 0 ... 0   (Q queried keys at random positions)
        y:  -100 ............... -100 | ... v_a ... v_b ...        (the value at each query position)

    Keys are distinct, uniform over ``1..K`` with ``K = (vocab_size - 1) // 2``; values are uniform
    (with repetition) over ``K + 1..vocab_size - 1``; ``0`` is the blank. The queried keys are ``Q``
    distinct keys of the context in random order, placed at uniform random distinct positions of the
    query region (Zoology draws positions from a power law; uniform keeps every gap equally likely).
    A model that ignores the keys scores accuracy ``1 / (vocab_size - 1 - K)``.

    Args:
        num_kv_pairs: ``N`` (default 8).
        vocab_size: token ids ``0..vocab_size - 1`` (default 64); needs ``K >= N``.
        num_queries: ``Q`` (default ``N``: every key is asked once).
        eval_examples: examples in each of val and test (default 1000).

    Batches: ``x`` ``(B, T)`` int64, ``y`` ``(B, T)`` int64, ``lengths`` ``None``; default
    ``T = 64``; any ``T >= 2 N + Q`` works (longer ``T`` = a longer gap before the queries).

    Example:
        >>> task = build_task("mqar", num_kv_pairs=4, vocab_size=32)
        >>> batch = next(task.train_batches(batch_size=2, seq_len=16))
        >>> batch.x.shape, batch.num_tokens
        (torch.Size([2, 16]), 8)
    """

    input_kind = "tokens"
    target = "per_step"
    metrics = ("loss", "accuracy")
    default_seq_len = 64

    def __init__(
        self, *, num_kv_pairs: int = 8, vocab_size: int = 64, num_queries: int | None = None,
        eval_examples: int = 1000,
    ) -> None:
        check_positive_int("num_kv_pairs", num_kv_pairs)
        check_positive_int("vocab_size", vocab_size, minimum=5)
        num_queries = num_kv_pairs if num_queries is None else num_queries
        check_positive_int("num_queries", num_queries)
        if num_queries > num_kv_pairs:
            raise InputError(f"num_queries: expected at most num_kv_pairs = {num_kv_pairs}, got {num_queries}")
        n_keys = (vocab_size - 1) // 2
        if n_keys < num_kv_pairs:
            raise InputError(
                f"vocab_size: expected at least 2 * num_kv_pairs + 1 = {2 * num_kv_pairs + 1} (distinct "
                f"keys), got {vocab_size}"
            )
        super().__init__(
            eval_examples=eval_examples, num_kv_pairs=num_kv_pairs, vocab_size=vocab_size, num_queries=num_queries
        )
        self.num_kv_pairs, self.num_queries, self.n_keys = num_kv_pairs, num_queries, n_keys
        self.vocab_size = self.n_classes = vocab_size
        self.default_seq_len = max(self.default_seq_len, 2 * num_kv_pairs + num_queries)

    def resolve_seq_len(self, seq_len: int | None) -> int:
        if seq_len is None:
            return self.default_seq_len
        shortest = 2 * self.num_kv_pairs + self.num_queries
        if seq_len < shortest:
            raise InputError(f"seq_len: expected at least 2 * num_kv_pairs + num_queries = {shortest}, got {seq_len}")
        return seq_len

    def generate(self, batch_size: int, seq_len: int, gen: torch.Generator) -> Batch:
        B, T, N, Q, K = batch_size, seq_len, self.num_kv_pairs, self.num_queries, self.n_keys
        R = T - 2 * N  # query region
        keys = torch.rand(B, K, generator=gen).argsort(dim=1)[:, :N] + 1  # (B, N): distinct keys in 1..K
        values = torch.randint(K + 1, self.vocab_size, (B, N), generator=gen)  # (B, N)
        x = torch.full((B, T), BLANK, dtype=torch.long)  # (B, T)
        x[:, 0 : 2 * N : 2] = keys
        x[:, 1 : 2 * N : 2] = values
        asked = torch.rand(B, N, generator=gen).argsort(dim=1)[:, :Q]  # (B, Q): which pairs are queried
        where = torch.rand(B, R, generator=gen).argsort(dim=1)[:, :Q] + 2 * N  # (B, Q): distinct positions
        x.scatter_(1, where, keys.gather(1, asked))
        y = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        y.scatter_(1, where, values.gather(1, asked))
        return Batch(x, y, None)
