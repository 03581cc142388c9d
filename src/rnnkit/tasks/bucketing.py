"""Length bucketing for ragged data sets: batches of similar lengths, so little of each batch is padding.

A random batch of sequences with lengths spread over [1, 1000] is mostly padding (every sequence is
padded to the batch's longest); sorting everything by length removes the padding but also the
randomness of the batches. The usual compromise (as in fairseq's and torchtext's bucket iterators):
shuffle, cut the data into pools of ``pool_batches`` batches, sort each pool by length, cut it into
batches, and shuffle the order of the batches. Everything is a pure function of ``(seed, epoch)``.

Example:
    >>> sampler = BucketBatchSampler(lengths, batch_size=32, seed=0)
    >>> loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=pad_collate)
    >>> for x, y, lengths in loader:            # x (B, T_max, ...) right-padded, lengths (B,)
    ...     out, _ = model(x, lengths=lengths)
    >>> sampler.set_epoch(1)                    # a new, still deterministic, order
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch

from rnnkit.errors import InputError, check_positive_int, describe


def bucket_batches(
    lengths: Sequence[int] | torch.Tensor,
    batch_size: int,
    *,
    pool_batches: int = 50,
    seed: int = 0,
    epoch: int = 0,
    drop_last: bool = False,
) -> list[list[int]]:
    """Indices grouped into batches of similar lengths.

    Args:
        lengths: ``(N,)`` length of every example (>= 1).
        batch_size: ``B``.
        pool_batches: batches per sorting pool; 1 is plain random batching, larger pools pad less
            but make batch composition less random.
        seed, epoch: the order is a pure function of both.
        drop_last: drop a final batch smaller than ``batch_size``.

    Returns:
        A list of batches (lists of example indices); every index appears exactly once (unless
        ``drop_last`` drops the remainder).
    """
    lengths = _check_lengths(lengths)
    check_positive_int("batch_size", batch_size)
    check_positive_int("pool_batches", pool_batches)
    check_positive_int("seed", seed, minimum=0)
    check_positive_int("epoch", epoch, minimum=0)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=gen)
    pool = batch_size * pool_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        # Stable sort, so ties keep the shuffled order.
        chunk = chunk[torch.sort(lengths[chunk], stable=True).indices]
        batches += [chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
    if drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    shuffle = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in shuffle]


def padding_fraction(lengths: Sequence[int] | torch.Tensor, batches: list[list[int]]) -> float:
    """Share of the padded ``(B, T_max)`` cells of ``batches`` that are padding."""
    lengths = _check_lengths(lengths)
    total = sum(len(b) * int(lengths[b].max()) for b in batches if b)
    valid = sum(int(lengths[b].sum()) for b in batches if b)
    return 1.0 - valid / max(total, 1)


class BucketBatchSampler(torch.utils.data.Sampler):
    """A ``batch_sampler`` for ``torch.utils.data.DataLoader`` built on :func:`bucket_batches`.

    Args:
        lengths: ``(N,)`` length of every example of the data set.
        batch_size, pool_batches, seed, drop_last: as in :func:`bucket_batches`.

    Call :meth:`set_epoch` before each epoch for a new order.
    """

    def __init__(self, lengths, batch_size: int, *, pool_batches: int = 50, seed: int = 0,
                 drop_last: bool = False) -> None:
        self.lengths = _check_lengths(lengths)
        check_positive_int("batch_size", batch_size)
        check_positive_int("pool_batches", pool_batches)
        check_positive_int("seed", seed, minimum=0)
        self.batch_size, self.pool_batches, self.seed, self.drop_last = batch_size, pool_batches, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        check_positive_int("epoch", epoch, minimum=0)
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        return bucket_batches(self.lengths, self.batch_size, pool_batches=self.pool_batches, seed=self.seed,
                              epoch=self.epoch, drop_last=self.drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else len(self._batches())


def pad_sequences(sequences: Sequence[torch.Tensor], padding_value: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``B`` tensors of shapes ``(T_i, ...)`` into ``(B, T_max, ...)`` plus ``(B,)`` lengths."""
    if not isinstance(sequences, (list, tuple)) or not sequences:
        raise InputError(f"sequences: expected a non-empty list of tensors, got {describe(sequences)}")
    first = sequences[0]
    for i, seq in enumerate(sequences):
        if not isinstance(seq, torch.Tensor) or seq.dim() < 1 or seq.shape[0] < 1:
            raise InputError(f"sequences[{i}]: expected a tensor (T, ...) with T >= 1, got {describe(seq)}")
        if seq.shape[1:] != first.shape[1:] or seq.dtype != first.dtype:
            raise InputError(
                f"sequences[{i}]: expected trailing shape {tuple(first.shape[1:])} and dtype {first.dtype} "
                f"like sequences[0], got {tuple(seq.shape[1:])} and {seq.dtype}"
            )
    lengths = torch.tensor([s.shape[0] for s in sequences], dtype=torch.long)
    out = first.new_full((len(sequences), int(lengths.max()), *first.shape[1:]), padding_value)
    for i, seq in enumerate(sequences):
        out[i, : seq.shape[0]] = seq
    return out, lengths


def pad_collate(items: Sequence[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``collate_fn`` for ``(sequence (T_i, ...), target)`` items: ``(x, y, lengths)`` with ``x`` right-padded."""
    x, lengths = pad_sequences([item[0] for item in items])
    y = torch.stack([torch.as_tensor(item[1]) for item in items])
    return x, y, lengths


def _check_lengths(lengths) -> torch.Tensor:
    if isinstance(lengths, torch.Tensor):
        tensor = lengths
    elif isinstance(lengths, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in lengths):
        tensor = torch.tensor(lengths, dtype=torch.long)
    else:
        raise InputError(f"lengths: expected a 1-D sequence of ints, got {describe(lengths)}")
    if tensor.dim() != 1 or tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.numel() == 0:
        raise InputError(f"lengths: expected a non-empty 1-D integer tensor, got {describe(tensor)}")
    if int(tensor.min()) < 1:
        raise InputError(f"lengths: expected every length >= 1, got min {int(tensor.min())}")
    return tensor.long()
