"""Shared test helpers: the one tolerance table every numerical comparison in the suite uses.

Tolerances are those of docs/design.md ("Tolerances"):

| dtype    | values (outputs, states)  | gradients                 |
|----------|---------------------------|---------------------------|
| float64  | max-abs <= 1e-10          | max-abs <= 1e-10          |
| float32  | max-abs <= 1e-5           | relative RMS <= 1e-4      |
| bfloat16 | relative RMS <= 5e-3      | relative RMS <= 5e-3      |

Relative RMS is ``||actual - expected|| / ||expected||`` (Frobenius norms over the whole tensor).
Max-abs is measured on entries scaled by ``1 / max(1, |expected|)``: an absolute bound for entries
of magnitude <= 1 and a relative one above (an accumulator that sums T ~ 1 terms, as the state of
unnormalised linear attention does, cannot be closer than a few ulp of its magnitude in fp32).
Measured over every fp32 case of tests/layers/test_contract.py with the unscaled max-abs:
17 of 1,788 cases exceed 1e-5, all of them states or outputs of magnitude 10-280 (linear attention's
sums, mLSTM's normaliser, Based's kv state at T = 257) off by 1-6 ulp of that magnitude (one ulp of
70 is 7.6e-6, of 278 is 3.1e-5), with relative RMS errors <= 3e-7; a bound below one ulp cannot be
met by two summation orders. Every case with |expected| <= 1 is held to the absolute 1e-5.
Any NaN or Inf in either tensor fails: a comparison that "passes" on NaN proves nothing.
"""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: (dtype, kind) -> (metric, bound); metric is "max_abs" or "rel_rms".
TOLERANCES: dict[tuple[torch.dtype, str], tuple[str, float]] = {
    (torch.float64, "value"): ("max_abs", 1e-10),
    (torch.float64, "grad"): ("max_abs", 1e-10),
    (torch.float32, "value"): ("max_abs", 1e-5),
    (torch.float32, "grad"): ("rel_rms", 1e-4),
    (torch.bfloat16, "value"): ("rel_rms", 5e-3),
    (torch.bfloat16, "grad"): ("rel_rms", 5e-3),
}


def errors(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """``(max-abs error, relative RMS error)`` of ``actual`` against ``expected``, computed in fp64."""
    a, e = actual.detach().double(), expected.detach().double()
    diff = a - e
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    diff_norm, ref_norm = diff.norm().item(), e.norm().item()
    if diff_norm == 0.0:
        rel_rms = 0.0
    elif ref_norm == 0.0:
        rel_rms = math.inf
    else:
        rel_rms = diff_norm / ref_norm
    return max_abs, rel_rms


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    kind: str = "value",
    what: str = "tensor",
) -> None:
    """Assert ``actual`` matches ``expected`` within the tolerance for ``dtype`` and ``kind``.

    Args:
        actual: tensor under test.
        expected: reference tensor, same shape.
        dtype: row of the tolerance table; defaults to ``expected.dtype``.
        kind: ``"value"`` (outputs, states) or ``"grad"`` (gradients).
        what: name printed in the failure message, e.g. ``"y (fused vs recurrent)"``.

    Raises:
        AssertionError: on a shape mismatch, any non-finite entry, or an error above tolerance; the
            message gives max-abs and relative RMS errors, the tolerance and the worst entry.
    """
    dtype = dtype or expected.dtype
    if (dtype, kind) not in TOLERANCES:
        raise ValueError(
            f"assert_close: expected (dtype, kind) among {sorted((str(d), k) for d, k in TOLERANCES)}, "
            f"got ({dtype}, {kind!r})"
        )
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    for name, t in (("actual", actual), ("expected", expected)):
        bad = ~torch.isfinite(t.detach())
        if bad.any():
            first = tuple(bad.nonzero()[0].tolist())
            raise AssertionError(
                f"{what}: {name} has {int(bad.sum())} non-finite entries (first at index {first}: "
                f"{t.detach()[first].item()})"
            )
    metric, bound = TOLERANCES[(dtype, kind)]
    max_abs, rel_rms = errors(actual, expected)
    diff = (actual.detach().double() - expected.detach().double()).abs()
    scaled = (diff / expected.detach().double().abs().clamp(min=1.0)).max().item() if diff.numel() else 0.0
    value = scaled if metric == "max_abs" else rel_rms
    if value > bound:
        worst = _unravel(int(diff.argmax()), tuple(diff.shape))
        raise AssertionError(
            f"{what} ({dtype}, {kind}): max-abs error {max_abs:.3e} ({scaled:.3e} scaled by max(1, |expected|)), "
            f"rel-RMS error {rel_rms:.3e}; "
            f"tolerance {metric.replace('_', '-')} <= {bound:.0e}. Worst entry at {worst}: "
            f"actual {actual.detach()[worst].item():.10g}, expected {expected.detach()[worst].item():.10g}"
        )


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Multi-index of position ``flat`` in a row-major tensor of ``shape``."""
    index = []
    for size in reversed(shape):
        flat, i = divmod(flat, size)
        index.append(i)
    return tuple(reversed(index))


def data_present(locate) -> bool:
    """Whether ``locate()`` finds a data set's files: it raises ``InputError`` (naming the install
    command) when they are absent, which real-data tests turn into a skip."""
    from rnnkit.errors import InputError

    try:
        locate()
    except InputError:
        return False
    return True


# --------------------------------------------------------------------------- memory accounting
class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in elements) any op returns, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def saved_numel(fn):
    """``(fn(), elements of the distinct tensors autograd saves for backward while fn runs)``."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def under_threads(fn, counts=(1, 2)) -> list:
    """``[fn()]`` once under each ``torch.set_num_threads(n)`` of ``counts``; the count restored after."""
    before = torch.get_num_threads()
    try:
        results = []
        for n in counts:
            torch.set_num_threads(n)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(before)
