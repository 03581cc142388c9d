"""Metrics of sequence-to-sequence tasks, as pure functions of predicted and reference sequences.

- :func:`edit_distance`: Levenshtein distance between two sequences (unit costs).
- :func:`closest_reference_errors`: the phoneme errors of one prediction against several correct
  pronunciations (the closest one counts), the unit of phoneme and word error rates.
- :func:`convex_hull`, :func:`polygon_area`, :func:`is_simple_polygon`, :func:`area_coverage`: the
  geometry behind the convex-hull task's area metric (Vinyals et al. 2015).

Sequences are any sequences of hashable symbols (token ids, phoneme strings); points are ``(n, 2)``
float tensors or nested sequences of ``(x, y)`` pairs.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

from rnnkit.errors import InputError, describe


def edit_distance(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """The Levenshtein distance: the fewest insertions, deletions and substitutions turning ``a`` into ``b``.

    Example:
        >>> edit_distance("kitten", "sitting")
        3
    """
    if len(a) < len(b):
        a, b = b, a  # one row of the shorter length
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def closest_reference_errors(
    prediction: Sequence[Hashable], references: Sequence[Sequence[Hashable]]
) -> tuple[int, int]:
    """``(edits, reference_length)`` against the reference closest to ``prediction`` by edit distance.

    A word with several correct pronunciations is scored against the one the prediction is nearest to
    (ties: the first listed), so predicting any of them costs nothing. Summing ``edits`` and
    ``reference_length`` over words and dividing gives the phoneme error rate; a word is wrong
    (word error rate) when its ``edits`` are not 0.
    """
    if not references:
        raise InputError("references: expected at least one reference sequence, got none")
    best = None
    for reference in references:
        edits = edit_distance(prediction, reference)
        if best is None or edits < best[0]:
            best = (edits, len(reference))
    return best


# ---------------------------------------------------------------------------------------- geometry
def _as_points(name: str, points) -> list[tuple[float, float]]:
    if isinstance(points, torch.Tensor):
        if points.dim() != 2 or points.shape[-1] != 2:
            raise InputError(f"{name}: expected points of shape (n, 2), got {describe(points)}")
        return [(float(x), float(y)) for x, y in points.tolist()]
    try:
        pairs = [(float(x), float(y)) for x, y in points]
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected a sequence of (x, y) pairs, got {describe(points)}") from None
    return pairs


def _cross(o, a, b) -> float:
    """The z component of ``(a - o) x (b - o)``: > 0 when ``o, a, b`` turn counter-clockwise."""
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def convex_hull(points) -> list[int]:
    """Indices of the convex hull's vertices, counter-clockwise, starting from the lowest index.

    Andrew's monotone chain; points on a hull edge (collinear) are not vertices. The start at the
    lowest index and the counter-clockwise order are Vinyals et al.'s (2015) convention for writing
    a hull as one sequence. Fewer than three distinct, non-collinear points give what remains of the
    chain (one or two indices).

    Args:
        points: ``(n, 2)``.

    Returns:
        The vertex indices, e.g. ``[0, 3, 1]``.
    """
    pts = _as_points("points", points)
    if not pts:
        raise InputError("points: expected at least one point, got none")
    order = sorted(range(len(pts)), key=lambda i: (pts[i], i))
    unique = [i for k, i in enumerate(order) if k == 0 or pts[i] != pts[order[k - 1]]]
    if len(unique) < 3:
        return sorted(unique)

    def half(indices):
        chain: list[int] = []
        for i in indices:
            while len(chain) >= 2 and _cross(pts[chain[-2]], pts[chain[-1]], pts[i]) <= 0:
                chain.pop()
            chain.append(i)
        return chain

    lower, upper = half(unique), half(unique[::-1])
    hull = lower[:-1] + upper[:-1]
    start = hull.index(min(hull))
    return hull[start:] + hull[:start]


def polygon_area(points) -> float:
    """The signed area of the polygon through ``points`` in order (shoelace formula): positive when
    counter-clockwise. ``(m, 2)``; fewer than three points have area 0."""
    pts = _as_points("points", points)
    total = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
        total += x0 * y1 - x1 * y0
    return total / 2


def _segments_meet(p, q, r, s) -> bool:
    """Whether the closed segments ``pq`` and ``rs`` share a point."""
    d1, d2, d3, d4 = _cross(r, s, p), _cross(r, s, q), _cross(p, q, r), _cross(p, q, s)
    if ((d1 > 0) != (d2 > 0)) and d1 != 0 and d2 != 0 and ((d3 > 0) != (d4 > 0)) and d3 != 0 and d4 != 0:
        return True

    def on(a, b, c):  # c collinear with ab and within its box
        return _cross(a, b, c) == 0 and min(a[0], b[0]) <= c[0] <= max(a[0], b[0]) \
            and min(a[1], b[1]) <= c[1] <= max(a[1], b[1])

    return on(r, s, p) or on(r, s, q) or on(p, q, r) or on(p, q, s)


def is_simple_polygon(points) -> bool:
    """Whether the closed polygon through ``points`` (``(m, 2)``, in order) is simple: at least three
    distinct vertices, non-zero area, and no two edges meeting except neighbours at their shared vertex."""
    pts = _as_points("points", points)
    m = len(pts)
    if m < 3 or len(set(pts)) != m or polygon_area(pts) == 0:
        return False
    edges = [(pts[i], pts[(i + 1) % m]) for i in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            if j == i + 1 or (i == 0 and j == m - 1):
                continue  # neighbours share a vertex by construction
            if _segments_meet(*edges[i], *edges[j]):
                return False
    return True


def area_coverage(points, predicted: Sequence[int]) -> float:
    """The share of the true convex hull's area that the predicted polygon covers (Vinyals et al. 2015's
    area metric for one example).

    Args:
        points: ``(n, 2)``, the instance.
        predicted: indices into ``points``, the predicted hull in order (either orientation).

    Returns:
        ``|area(predicted polygon)| / area(convex hull)``, in ``[0, 1]`` for a simple polygon through
        input points; 0 when the prediction is not a simple polygon (a repeated or out-of-range index,
        fewer than three vertices, crossing edges), which the paper counts as a failure.
    """
    pts = _as_points("points", points)
    hull_area = polygon_area([pts[i] for i in convex_hull(pts)])
    if hull_area <= 0:
        raise InputError("points: expected points spanning a positive area, got a degenerate set")
    predicted = [int(i) for i in predicted]
    if len(set(predicted)) != len(predicted) or any(not 0 <= i < len(pts) for i in predicted):
        return 0.0
    polygon = [pts[i] for i in predicted]
    if not is_simple_polygon(polygon):
        return 0.0
    return abs(polygon_area(polygon)) / hull_area


__all__ = [
    "area_coverage", "closest_reference_errors", "convex_hull", "edit_distance", "is_simple_polygon", "polygon_area",
]
