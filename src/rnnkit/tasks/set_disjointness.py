"""Set disjointness, with just-read-twice (JRT) prompting.

From Arora et al. (2024), "Just read twice: closing the recall gap for recurrent language models",
section 3: given two sets ``A`` and ``B``, find what they share. A recurrent model reading ``A``
first must hold all of ``A`` in its state before it sees ``B``; feeding the context twice (JRT
prompting, section 4) lets the second pass over ``A`` be read knowing ``B``, so a small state suffices.
The same paper (section 3) shows that the order matters: a recurrent model does
well when the small set comes first (it stores ``B`` and checks ``A`` against it) and worse when the
large set comes first; ``small_first=True`` gives that order.
"""

from __future__ import annotations

import torch

from rnnkit.errors import InputError, check_positive_int
from rnnkit.tasks.base import Batch, SyntheticTask, register_task

BLANK = 0


@register_task("set_disjointness")
class SetDisjointnessTask(SyntheticTask):
    """Set disjointness: name the one element that two token sets share.

    Layout (``a`` = the size of ``A``, ``b`` = ``size_b``, ``S`` separator, ``E`` end/query token)::

        repeat_context=False:  0 ... 0 | A (a tokens) S B (b tokens) E
        repeat_context=True:   0 ... 0 | A S B S A S B E
        small_first=True:      0 ... 0 | B S A E     (and B S A S B S A E with repeat_context)

    ``A`` and ``B`` are drawn without replacement from the elements ``1..n_elements`` so that exactly
    one element lies in both, at a uniform position of each; the class is that element. The answer is
    read at ``E`` (the last step). ``a`` grows with ``T``: the largest ``a`` whose layout fits in
    ``T``, blank-padded on the left, so longer test sequences mean a larger first set. Chance accuracy
    is ``1 / b`` for a model that only remembers ``B``.

    Args:
        size_b: ``b``, the second set's size (default 4).
        n_elements: the element alphabet ``1..n_elements`` (default 128, room for
            the first set at 4x the default length).
        repeat_context: JRT prompting: the context ``A S B`` appears twice (default ``False``).
        small_first: the small set ``B`` comes before the large set ``A`` (default ``False``:
            the large set first, the order that needs the most state).
        eval_examples: examples in each of val and test (default 1000).

    Batches: ``x`` ``(B, T)`` int64 in ``0..n_elements + 2``, ``y`` ``(B,)`` int64, ``lengths``
    ``None``. Default ``T`` gives ``a = 16`` (``T = 22``, or 44 with ``repeat_context``).

    Example:
        >>> task = build_task("set_disjointness", size_b=2)
        >>> batch = next(task.train_batches(batch_size=2))
        >>> batch.x.shape, batch.y.shape
        (torch.Size([2, 20]), torch.Size([2]))
    """

    input_kind = "tokens"
    target = "classify"
    metrics = ("loss", "accuracy")
    default_size_a = 16

    def __init__(
        self, *, size_b: int = 4, n_elements: int = 128, repeat_context: bool = False, small_first: bool = False,
        eval_examples: int = 1000,
    ) -> None:
        check_positive_int("size_b", size_b)
        check_positive_int("n_elements", n_elements, minimum=2)
        for name, value in (("repeat_context", repeat_context), ("small_first", small_first)):
            if not isinstance(value, bool):
                raise InputError(f"{name}: expected a bool, got {value!r}")
        super().__init__(
            eval_examples=eval_examples, size_b=size_b, n_elements=n_elements, repeat_context=repeat_context,
            small_first=small_first,
        )
        self.size_b, self.n_elements, self.repeat_context = size_b, n_elements, repeat_context
        self.small_first = small_first
        self.sep, self.end = n_elements + 1, n_elements + 2
        self.vocab_size = self.n_classes = n_elements + 3
        self.passes = 2 if repeat_context else 1
        self.default_seq_len = self.layout_len(self.default_size_a)

    def layout_len(self, size_a: int) -> int:
        """``T`` of the layout without padding for a first set of ``size_a`` tokens."""
        context = size_a + 1 + self.size_b  # A S B
        return self.passes * context + (self.passes - 1) + 1  # separators between passes, then E

    def size_a(self, seq_len: int) -> int:
        """``a``: the largest first-set size whose layout fits in ``seq_len`` steps."""
        return (seq_len - self.passes) // self.passes - 1 - self.size_b

    def resolve_seq_len(self, seq_len: int | None) -> int:
        if seq_len is None:
            return self.default_seq_len
        a = self.size_a(seq_len)
        if a < 1:
            raise InputError(f"seq_len: expected at least {self.layout_len(1)} (a first set of one), got {seq_len}")
        if a + self.size_b - 1 > self.n_elements:
            raise InputError(
                f"seq_len: expected at most {self.layout_len(self.n_elements + 1 - self.size_b)} so that "
                f"the sets fit in n_elements = {self.n_elements} distinct elements, got {seq_len}"
            )
        return seq_len

    def generate(self, batch_size: int, seq_len: int, gen: torch.Generator) -> Batch:
        Bn, T, b = batch_size, seq_len, self.size_b
        a = self.size_a(T)
        # a + b - 1 distinct elements: the first a form A; the shared one is A's element at a random
        # slot, and B is it plus b - 1 fresh elements, shuffled.
        pool = torch.rand(Bn, self.n_elements, generator=gen).argsort(dim=1)[:, : a + b - 1] + 1  # (Bn, a+b-1)
        set_a = pool[:, :a]  # (Bn, a)
        shared = set_a.gather(1, torch.randint(0, a, (Bn, 1), generator=gen))  # (Bn, 1)
        set_b = torch.cat([shared, pool[:, a:]], dim=1)  # (Bn, b)
        set_b = set_b.gather(1, torch.rand(Bn, b, generator=gen).argsort(dim=1))  # shuffled
        sep = torch.full((Bn, 1), self.sep, dtype=torch.long)
        context = torch.cat([set_b, sep, set_a] if self.small_first else [set_a, sep, set_b], dim=1)  # (Bn, a+1+b)
        parts = [context]
        for _ in range(self.passes - 1):
            parts += [sep, context]
        parts.append(torch.full((Bn, 1), self.end, dtype=torch.long))
        body = torch.cat(parts, dim=1)  # (Bn, layout_len(a))
        x = torch.full((Bn, T), BLANK, dtype=torch.long)  # (Bn, T)
        x[:, T - body.shape[1] :] = body
        return Batch(x, shared[:, 0].clone(), None)
