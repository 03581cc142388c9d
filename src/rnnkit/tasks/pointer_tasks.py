"""Generated pointer-network probes: ``sort`` and ``convex_hull``, whose answers are input positions.

- ``sort``: order a set of random numbers, the Read-Process-Write experiment of Vinyals, Bengio &
  Kudlur (2016), "Order Matters: Sequence to Sequence for Sets" (numbers uniform in [0, 1]).
- ``convex_hull``: the vertices of the convex hull of planar points uniform in the unit square,
  Vinyals, Fortunato & Jaitly (2015), "Pointer Networks": trained on ``n`` = 5..50 points, scored by
  exact-sequence accuracy and by the share of the true hull's area the predicted polygon covers.

Layout (both): source position 0 is an end marker (features 0 and an ``is_end`` flag of 1), the
instance's element ``i`` is position ``i + 1`` (flag 0); the target is the answer's positions, then 0
(``eos_id``). So a ``PointerNetwork`` (``mask_chosen=True``) ends its output by pointing at the marker,
and decoding takes ``bos_id=None``, ``eos_id=0`` (:meth:`Seq2SeqTask.decode_options`). In text,
elements are listed in order and answers are 0-based element indices: ``"0.5 0.1 0.9"`` -> ``"1 0 2"``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from rnnkit.errors import InputError, describe
from rnnkit.tasks.base import register_task
from rnnkit.tasks.seq2seq_base import (
    POINTER_EOS, GeneratedSeq2SeqTask, Seq2SeqBatch, collate_seq2seq, draw_sizes,
)
from rnnkit.tasks.seq2seq_metrics import area_coverage, convex_hull


class _PointerTask(GeneratedSeq2SeqTask):
    """A generated pointer task over elements of ``d_element`` features (plus the end flag)."""

    input_kind = "features"
    pointer = True
    bos_id = None
    eos_id = POINTER_EOS
    pad_id = POINTER_EOS
    d_element = 1

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.d_input = self.d_element + 1

    def max_target_len(self, src_lengths: torch.Tensor) -> int:
        return int(src_lengths.max())  # every element at most once, then the marker

    def answer(self, elements: torch.Tensor) -> list[int]:
        """The 0-based element indices of the answer for one instance ``(n, d_element)``."""
        raise NotImplementedError

    def _with_marker(self, elements: torch.Tensor) -> torch.Tensor:
        """``(n, d_element)`` -> the source ``(n + 1, d_element + 1)``: the end marker, then the elements."""
        n = elements.shape[0]
        marker = torch.zeros(1, self.d_input)
        marker[0, -1] = 1.0
        return torch.cat([marker, torch.cat([elements.float(), torch.zeros(n, 1)], 1)], 0)

    def _instances(self, batch_size: int, lo: int, hi: int, gen: torch.Generator) -> list[torch.Tensor]:
        sizes = draw_sizes(batch_size, lo, hi, gen)
        values = torch.rand(batch_size, hi, self.d_element, generator=gen)  # (B, hi, d)
        return [values[i, : int(n)] for i, n in enumerate(sizes)]

    def generate(self, batch_size: int, lo: int, hi: int, gen: torch.Generator) -> Seq2SeqBatch:
        instances = self._instances(batch_size, lo, hi, gen)
        targets = [torch.tensor([i + 1 for i in self.answer(x)] + [POINTER_EOS]) for x in instances]
        return collate_seq2seq([self._with_marker(x) for x in instances], targets, bos_id=None, pad_id=self.pad_id)

    # ------------------------------------------------------------------ strings
    def _elements(self, text: object) -> torch.Tensor:
        if not isinstance(text, str):
            raise InputError(f"text: expected a string, got {describe(text)}")
        try:
            rows = [[float(v) for v in item.split(",")] for item in text.split()]
        except ValueError:
            raise InputError(f"text: expected space-separated elements of {self.d_element} comma-separated "
                             f"numbers, got {text!r}") from None
        if not rows or any(len(r) != self.d_element for r in rows):
            raise InputError(f"text: expected at least one element of {self.d_element} comma-separated numbers, "
                             f"got {text!r}")
        return torch.tensor(rows)

    def encode_source(self, text: str) -> torch.Tensor:
        return self._with_marker(self._elements(text))

    def decode_source(self, src: torch.Tensor) -> str:
        return " ".join(",".join(f"{v:g}" for v in row[:-1]) for row in src[1:].tolist())

    def encode_target(self, text: str) -> torch.Tensor:
        if not isinstance(text, str):
            raise InputError(f"text: expected a string, got {describe(text)}")
        try:
            indices = [int(v) for v in text.split()]
        except ValueError:
            raise InputError(f"text: expected space-separated element indices, got {text!r}") from None
        if any(i < 0 for i in indices):
            raise InputError(f"text: expected element indices >= 0, got {text!r}")
        return torch.tensor([i + 1 for i in indices] + [POINTER_EOS])

    def decode_target(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            if int(i) == POINTER_EOS:
                break
            out.append(str(int(i) - 1))
        return " ".join(out)


@register_task("sort")
class SortTask(_PointerTask):
    """Sort a set of random numbers by pointing at them in increasing order (pointer targets).

    ``n`` numbers uniform in [0, 1], ``n`` uniform in ``[min_n, max_n]`` (default 10 both, a size of
    Vinyals et al. 2016); the target is the positions of the numbers in increasing order, then the
    end marker (module docstring). ``d_input`` = 2: the number and the end flag.

    Args:
        min_n, max_n: the training range of ``n`` (default 10..10).
        eval_examples: examples in each of val and test (default 1000).

    ``seq_len`` is ``n``; ``test_lengths`` = ``max_n`` x (1, 2, 4). Metric: exact-sequence ``accuracy``.

    Example:
        >>> task = build_task("sort", min_n=5, max_n=5)
        >>> batch = next(task.train_batches(batch_size=2))
        >>> batch.src.shape, task.decode_target(task.encode_target("1 0 2"))
        (torch.Size([2, 6, 2]), '1 0 2')
    """

    def __init__(self, *, min_n: int = 10, max_n: int = 10, eval_examples: int = 1000) -> None:
        super().__init__(eval_examples=eval_examples, min_n=min_n, max_n=max_n)
        self._set_range(("min_n", "max_n"), min_n, max_n)

    def answer(self, elements: torch.Tensor) -> list[int]:
        return torch.sort(elements[:, 0], stable=True).indices.tolist()


@register_task("convex_hull")
class ConvexHullTask(_PointerTask):
    """Planar convex hull with a pointer network (Vinyals et al. 2015): point at the hull's vertices.

    ``n`` points uniform in the unit square, ``n`` uniform in ``[min_n, max_n]`` (the paper's 5..50);
    the target is the hull's vertices counter-clockwise starting from the lowest-indexed vertex (the
    paper's way to make the answer one sequence), then the end marker; the polygon closes implicitly
    (no repeated first vertex, which ``mask_chosen`` would forbid). ``d_input`` = 3: ``x``, ``y``, the
    end flag.

    Args:
        min_n, max_n: the training range of ``n`` (default 5..50; at least 3).
        eval_examples: examples in each of val and test (default 1000).

    ``seq_len`` is ``n``; ``test_lengths`` = (``min_n``, 2 ``min_n``, ``max_n``, 2 ``max_n``): the
    paper's 5, 10 and 50, and beyond the training sizes.

    Metrics: ``accuracy`` (the exact vertex sequence), ``area_coverage`` (mean over examples of the
    predicted polygon's area over the true hull's; a prediction that is not a simple polygon covers 0)
    and ``invalid`` (the share of such predictions, the paper's failures);
    :func:`~rnnkit.tasks.seq2seq_metrics.area_coverage` has the definition.

    Example:
        >>> task = build_task("convex_hull", min_n=5, max_n=10)
        >>> task.decode_target(task.encode_target("0 3 1")), task.test_lengths
        ('0 3 1', (5, 10, 20))
    """

    d_element = 2
    min_size = 3
    seq2seq_metrics = ("accuracy", "area_coverage", "invalid")

    @property
    def test_lengths(self) -> tuple[int, ...]:
        lo, hi = self.size_range
        return tuple(sorted({lo, 2 * lo, hi, 2 * hi}))

    def __init__(self, *, min_n: int = 5, max_n: int = 50, eval_examples: int = 1000) -> None:
        super().__init__(eval_examples=eval_examples, min_n=min_n, max_n=max_n)
        self._set_range(("min_n", "max_n"), min_n, max_n)

    def answer(self, elements: torch.Tensor) -> list[int]:
        return convex_hull(elements)

    def metric_sums(self, predictions: Any, batch: Seq2SeqBatch) -> dict[str, float]:
        predicted = self._predictions(predictions, batch)
        sums = {"sequences": len(predicted), "correct": 0, "coverage": 0.0, "invalid": 0}
        for i, (p, t) in enumerate(zip(predicted, batch.target_sequences())):
            points = batch.src[i, 1 : int(batch.src_lengths[i]), :2]
            coverage = area_coverage(points, [j - 1 for j in p])
            sums["correct"] += p == t
            sums["coverage"] += coverage
            sums["invalid"] += coverage == 0
        return sums

    def finalize_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["sequences"], 1)
        return {"accuracy": sums["correct"] / n, "area_coverage": sums["coverage"] / n, "invalid": sums["invalid"] / n}


__all__ = ["ConvexHullTask", "SortTask"]
