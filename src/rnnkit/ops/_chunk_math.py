"""Chunk math shared by the chunkwise kernels (gated linear attention, delta rule, mLSTM).

The pieces that every ``(G, N, C, *)`` chunk kernel needs: batched products into workspace buffers
(:func:`mm`, :func:`addmm_`, and :func:`mm_into` for a strided block of rows), the backward wrapper
of their autograd Functions (:func:`chunk_backward`), row dot products (:func:`rowdot`), causal
masks, the decay matrices of a chunk in log space (:func:`decay_matrix_log`, :func:`segment_sum`,
:func:`suffix_sum`), dtype promotion (:func:`common_dtype`) and time padding (:func:`pad_time`).

Why in one place: the three kernels take the same decays through the same numerics (every
exponential of a difference ``b_i - b_j`` with ``j <= i``, so ``<= 0``), and a fix to one of these
pieces must reach all three.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from rnnkit.ops._blas import ChunkProducts
from rnnkit.ops._workspace import workspace


def chunk_backward(body):
    """The ``backward`` of a chunk kernel's ``torch.autograd.Function``: ``body(ctx, *grads)`` with
    autocast off (the kernels' ``out=`` buffers take one dtype), once differentiable (a second
    derivative through a hand-written backward is not implemented).

    Example:
        >>> backward = chunk_backward(_backward)     # in the class body, after _backward
    """

    @once_differentiable
    def backward(ctx, *grads):
        with torch.autocast(grads[0].device.type, enabled=False):
            return body(ctx, *grads)

    return staticmethod(backward)


def pad_time(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Right-pad dimension 2 (time) with zeros."""
    if not pad:
        return t
    widths = [0, 0] * (t.dim() - 3) + [0, pad]
    return F.pad(t, widths)


def common_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in their widest dtype (as given when they already share one).

    Why: under autocast the projections arrive in bf16 while decays, gates and states stay fp32; the
    chunk kernels' ``out=`` workspace buffers take one dtype, and the kernels run with autocast off."""
    if len({t.dtype for t in tensors}) == 1:
        return tensors
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    return tuple(t.to(dtype) for t in tensors)


def mm(a, b, out=None):
    """Batched matmul over leading dims (G, N) as one 3-D bmm; ``out`` a contiguous buffer."""
    shape = (*a.shape[:-1], b.shape[-1])
    out = workspace(shape, a) if out is None else out
    torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out=out.view(-1, *shape[-2:]))
    return out


def mm_into(a, b, out):
    """``out = a @ b`` batched over the leading dims, in place, where ``out`` is a view whose
    matrices have contiguous rows but whose batch is strided (a block of rows of a larger buffer):
    ``torch.bmm`` would compute into a temporary and copy. Runs as one call of
    :class:`~rnnkit.ops._blas.ChunkProducts` with the whole batch as a single chunk."""
    m, p = out.shape[-2:]
    flat = [t.reshape(-1, 1, *t.shape[-2:]) for t in (a, b)]
    ChunkProducts(*flat, out.view(-1, 1, m, p))(0)
    return out


def addmm_(out, a, b, alpha=1):
    """``out += alpha * a @ b`` batched over leading dims, in place.

    Spelt ``baddbmm(o, ..., out=o)``, the same in-place kernel as ``o.baddbmm_``, because
    ``torch.utils.flop_counter`` counts ``aten.baddbmm`` but not the in-place overload (the
    benchmarks' GFLOP/s would miss these products)."""
    o = out.view(-1, *out.shape[-2:])
    torch.baddbmm(o, a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), alpha=alpha, out=o)
    return out


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1)`` without writing the product (one batched matmul, which on a
    CPU beats a multiply and a sum: ``benchmarks/chunk_speed.py``)."""
    return torch.einsum("...i,...i->...", a, b)


def causal_float(C: int, like: torch.Tensor) -> torch.Tensor:
    """``(C, C)`` ones on and below the diagonal, zeros above, in ``like``'s dtype and device."""
    return torch.ones(C, C, dtype=like.dtype, device=like.device).tril_()


def suffix_sum(g: torch.Tensor) -> torch.Tensor:
    """``out[..., j, :] = sum_{s > j} g[..., s, :]``: exclusive suffix sums along dimension -2."""
    incl = g.flip(-2).cumsum(-2).flip(-2)
    return torch.cat([incl[..., 1:, :], torch.zeros_like(incl[..., :1, :])], -2)


def segment_sum(g: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum_{j < s <= i} g[..., s]`` for ``j <= i``, ``-inf`` above the diagonal.

    ``g`` (..., C) -> (..., C, C). Summed segment by segment (as Mamba-2's ``segsum``) instead of
    as ``b_i - b_j`` of cumulative sums, whose rounding grows with ``|b|`` rather than with the
    segment: with strong decays ``|b|`` reaches hundreds inside one chunk.
    """
    C = g.shape[-1]
    rep = g[..., :, None].expand(*g.shape, C)  # (..., C, C) rep[i, j] = g_i
    strict = torch.ones(C, C, dtype=torch.bool, device=g.device).tril(-1)
    seg = rep.masked_fill(~strict, 0).cumsum(-2)  # sum over s in (j, i]
    return seg.masked_fill(~causal_mask(C, g.device), -math.inf)


def decay_matrix_log(g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``b_i - b_j`` for ``j <= i`` and ``-inf`` above the diagonal; ``g`` (..., C), ``b`` its cumsum.

    When every ``|b|`` is at most 16 the difference of cumulative sums is exact to ~1e-6 in the
    exponent and takes one pass; otherwise (strong decays) :func:`segment_sum` keeps the rounding
    to that of each segment. Both give the same matrix up to rounding.
    """
    if b.numel() and bool(b.detach().abs().max() <= 16):
        return (b[..., :, None] - b[..., None, :]).masked_fill(~causal_mask(b.shape[-1], b.device), -math.inf)
    return segment_sum(g)


def causal_mask(C: int, device: torch.device) -> torch.Tensor:
    """``(C, C)`` bool, True where ``j <= i``."""
    return torch.ones(C, C, dtype=torch.bool, device=device).tril()
