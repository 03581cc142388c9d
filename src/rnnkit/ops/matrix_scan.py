"""Matrix scans: ``h_t = A_t h_{t-1} + b_t`` over time with a ``K x K`` matrix per step and block.

The linear recurrence behind each step of a Newton solve of a nonlinear RNN (:mod:`rnnkit.ops.newton`)
whose Jacobian is dense (``K`` = the state size, one block) or block-diagonal (ParaLSTM's ``2 x 2``
blocks, one per channel). The diagonal case (``K = 1``) is :func:`rnnkit.ops.linear_scan`.

One public entry, :func:`matrix_scan`, with one signature across its forms:

- ``recurrent``: :func:`matrix_scan_recurrent`, the plain loop (one matrix-vector product per step),
  autograd through it. The definition.
- ``parallel``: an associative (Hillis-Steele) scan, ``ceil(log2 T)`` passes of the combine
  ``(A1, b1) . (A2, b2) = (A2 A1, A2 b1 + b2)``. Each pass multiplies ``K x K`` matrices at every step:
  ``O(T log T K^3)`` work and ``O(T K^2)`` memory per level, against the loop's ``O(T K^2)`` work, in
  ``log T`` sequential steps instead of ``T``.
- ``chunk``: chunks of ``chunk_size`` steps; one pass over the chunks' steps (all chunks at once)
  forms each step's product of the chunk's matrices so far and its state from a zero start, a short
  loop carries the true state across chunks, and every state is then one product away:
  ``O(T K^3)`` work, ``chunk_size + T / chunk_size`` sequential steps.
- ``auto``: ``parallel`` up to :data:`PARALLEL_MAX_T` steps, ``chunk`` above (where the ``log T``
  factor of work and the per-level copies outweigh the fewer sequential steps).

Every form is built from differentiable torch operations, so autograd differentiates each.
"""

from __future__ import annotations

import torch

from rnnkit.errors import InputError, check_choice, check_lengths, check_positive_int, check_tensor
from rnnkit.ops._forms import run_form
from rnnkit.ops.padding import freeze_padding, valid_mask

#: Forms :func:`matrix_scan` accepts, ``recurrent`` (the definition) first.
MATRIX_SCAN_MODES = ("recurrent", "parallel", "chunk", "auto")
#: ``auto`` runs ``parallel`` up to this many steps and ``chunk`` above.
PARALLEL_MAX_T = 1024


def _check_inputs(A, b, h0, lengths):
    A, b = check_tensor("A", A), check_tensor("b", b)
    for name, x in (("A", A), ("b", b)):
        if not x.is_floating_point():
            raise InputError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if A.dim() < 4 or A.shape[-1] != A.shape[-2]:
        raise InputError(f"A: expected a tensor of shape (B, T, *S, K, K) (square blocks), got shape {tuple(A.shape)}")
    if tuple(b.shape) != tuple(A.shape[:-1]):
        raise InputError(f"b: expected shape (B, T, *S, K) = {tuple(A.shape[:-1])}, got {tuple(b.shape)}")
    if b.dtype != A.dtype or b.device != A.device:
        raise InputError(f"b: expected dtype {A.dtype} on {A.device} (those of A), got {b.dtype} on {b.device}")
    if A.shape[1] < 1:
        raise InputError(f"A: expected at least one time step (T >= 1), got shape {tuple(A.shape)}")
    if h0 is not None:
        h0 = check_tensor("h0", h0)
        want = (A.shape[0],) + tuple(A.shape[2:-1])
        if tuple(h0.shape) != want:
            raise InputError(f"h0: expected shape (B, *S, K) = {want}, got {tuple(h0.shape)}")
        if h0.dtype != A.dtype or h0.device != A.device:
            raise InputError(f"h0: expected dtype {A.dtype} on {A.device} (those of A), got {h0.dtype} on {h0.device}")
    return A, b, h0, check_lengths(lengths, A.shape[0], A.shape[1], A.device)


def _matvec(A: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``A @ h`` over the last two dims of ``A`` (..., K, K) and the last of ``h`` (..., K)."""
    return (A @ h.unsqueeze(-1)).squeeze(-1)


def _eye_like(A: torch.Tensor) -> torch.Tensor:
    return torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)


def _mask_padding(A, b, lengths):
    """Padded steps become ``A = I, b = 0`` (``torch.where``: NaN written there cannot leak)."""
    if lengths is None:
        return A, b
    valid = valid_mask(lengths, A.shape[1])  # (B, T)
    vb = valid.view(valid.shape + (1,) * (b.dim() - 2))
    A = torch.where(vb.unsqueeze(-1), A, _eye_like(A))
    return A, torch.where(vb, b, torch.zeros((), dtype=b.dtype, device=b.device))


def matrix_scan_recurrent(A, b, h0=None, lengths=None):
    """The plain loop that defines :func:`matrix_scan`: ``h_t = A_t h_{t-1} + b_t``, ``h_{-1} = h0``.

    Args:
        A: ``(B, T, *S, K, K)``.
        b: ``(B, T, *S, K)``.
        h0: ``(B, *S, K)`` or None for zeros.
        lengths: optional ``(B,)`` in ``[1, T]``; the state is frozen at steps ``t >= length``.

    Returns:
        ``h`` ``(B, T, *S, K)``.
    """
    A, b, h0, lengths = _check_inputs(A, b, h0, lengths)
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    hs = []
    for t, (A_t, b_t) in enumerate(zip(A.unbind(1), b.unbind(1))):
        h = freeze_padding(t, lengths, _matvec(A_t, h) + b_t, h)
        hs.append(h)
    return torch.stack(hs, 1)


def _fold_h0(A, b, h0):
    """``b`` with ``A_0 h0`` added at step 0, so the scan may start from zero."""
    if h0 is None:
        return b
    return torch.cat([(b[:, 0] + _matvec(A[:, 0], h0)).unsqueeze(1), b[:, 1:]], 1)


def _scan_parallel(A, b, h0):
    """Hillis-Steele: after the pass with offset d, (A_t, b_t) compose steps t-2d+1..t."""
    b = _fold_h0(A, b, h0)
    T, d = A.shape[1], 1
    while d < T:
        b_next = torch.cat([b[:, :d], _matvec(A[:, d:], b[:, :-d]) + b[:, d:]], 1)
        if 2 * d < T:  # the last level's products would compose nothing further
            A = torch.cat([A[:, :d], A[:, d:] @ A[:, :-d]], 1)
        b = b_next
        d *= 2
    return b


def _scan_chunk(A, b, h0, chunk_size):
    """Per-chunk products and zero-start states, a carry loop over chunks, then every state."""
    B, T = A.shape[:2]
    rest = A.shape[2:]  # (*S, K, K)
    C = min(chunk_size, T)
    n = -(-T // C)
    pad = n * C - T
    if pad:  # identity steps after the end change nothing returned
        A = torch.cat([A, _eye_like(A).expand(B, pad, *rest)], 1)
        b = torch.cat([b, b.new_zeros(B, pad, *b.shape[2:])], 1)
    A5, b5 = A.reshape(B, n, C, *rest), b.reshape(B, n, C, *b.shape[2:])  # (B, n, C, *S, K[, K])
    prods, locs = [A5[:, :, 0]], [b5[:, :, 0]]
    for j in range(1, C):
        prods.append(A5[:, :, j] @ prods[-1])
        locs.append(_matvec(A5[:, :, j], locs[-1]) + b5[:, :, j])
    prod, loc = torch.stack(prods, 2), torch.stack(locs, 2)  # (B, n, C, *S, K[, K])
    starts = []
    prev = torch.zeros_like(b5[:, 0, 0]) if h0 is None else h0
    for k in range(n):
        starts.append(prev)
        prev = _matvec(prod[:, k, -1], prev) + loc[:, k, -1]
    start = torch.stack(starts, 1).unsqueeze(2)  # (B, n, 1, *S, K)
    h = (_matvec(prod, start) + loc).reshape(B, n * C, *b.shape[2:])
    return h[:, :T] if pad else h


def matrix_scan(A, b, h0=None, *, lengths=None, mode: str = "auto", chunk_size: int = 64):
    """``h_t = A_t h_{t-1} + b_t`` for all ``t``, a ``K x K`` matrix per step and block.

    Args:
        A: ``(B, T, *S, K, K)`` transition matrices (``*S`` independent blocks, e.g. one per channel).
        b: ``(B, T, *S, K)`` inputs, same dtype and device.
        h0: ``(B, *S, K)`` initial state, or None for zeros.
        lengths: optional ``(B,)`` in ``[1, T]``: steps ``t >= length`` act as ``A = I, b = 0``
            (whatever they hold, NaN included), so ``h[:, -1]`` is each sequence's final state.
        mode: ``"recurrent"``, ``"parallel"``, ``"chunk"`` or ``"auto"`` (module docstring).
        chunk_size: steps per chunk of the ``chunk`` form.

    Returns:
        ``h`` ``(B, T, *S, K)``.

    Raises:
        InputError: mismatched shapes, dtypes or devices, bad ``lengths``, an unknown ``mode``.

    Example:
        >>> A = 0.5 * torch.randn(2, 100, 4, 4)
        >>> h = matrix_scan(A, torch.randn(2, 100, 4))    # (2, 100, 4)
    """
    check_choice("mode", mode, MATRIX_SCAN_MODES)
    check_positive_int("chunk_size", chunk_size)
    A, b, h0, lengths = _check_inputs(A, b, h0, lengths)
    if mode == "auto":
        mode = "parallel" if A.shape[1] <= PARALLEL_MAX_T else "chunk"
    if mode == "recurrent":
        return matrix_scan_recurrent(A, b, h0, lengths)
    A, b = _mask_padding(A, b, lengths)
    forms = {"recurrent": lambda A, b, h0: matrix_scan_recurrent(A, b, h0), "parallel": _scan_parallel,
             "chunk": _scan_chunk}
    return run_form(mode, forms, (A, b, h0), chunk_size)


__all__ = ["MATRIX_SCAN_MODES", "matrix_scan", "matrix_scan_recurrent"]
