"""One fused pass over the rows of a chunk kernel's ``(G, N, C, D)`` tensor.

Why: outside their matmuls the chunk kernels spend their time in passes over memory (scale the
rows of ``q`` by a decay, add a per-chunk vector, take a dot product with another tensor's rows,
sum a chunk's rows). In PyTorch each is a pass over tens of MiB, and a dot product of rows runs
as a batched matmul of 1 x D by D x 1, far below the matmul rate. :func:`row_pass` does a chain
of them in one read of its input, through the compiled library (:mod:`rnnkit.ops._native`; fp32
and fp64 on the CPU), and in PyTorch otherwise, with the same result up to rounding
(``benchmarks/chunk_speed.py`` and ``benchmarks/delta_speed.py`` time the kernels that use it).

Per row ``i`` of chunk ``g`` (the rows of ``x`` reshaped to ``(G * N * C, D)``; ``C`` rows per
chunk)::

    u = x_i + a_i vec_g                 t = u * s_i   (s_i a scalar per row, or elementwise with
                                                       a row of s; causal: t_id = 0 for d > i mod C)
    out_i = t  (or out_i += t)          dot_i = t . y_i  (or t . y_g; or u . y when asked)
    col_g = sum_i w_i t
"""

from __future__ import annotations

import torch

from rnnkit.ops import _native
from rnnkit.ops._native import ROW_DTYPES
from rnnkit.ops._native import ptr as _ptr


def _rows_view(t: torch.Tensor, D: int) -> tuple[int, int] | None:
    """(row stride, column stride) of ``t`` read as ``(rows, D)`` without a copy, or None."""
    if t.shape[-1] != D:
        return None
    for i in range(t.dim() - 2):
        if t.shape[i] != 1 and t.stride(i) != t.stride(i + 1) * t.shape[i + 1]:
            return None
    return (t.stride(-2) if t.dim() > 1 else 0), t.stride(-1)


def row_pass(
    x: torch.Tensor,
    group: int,
    *,
    a: torch.Tensor | None = None,
    vec: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    write: bool = True,
    dot_with: torch.Tensor | None = None,
    col: bool = False,
    weights: torch.Tensor | None = None,
    causal: bool = False,
    dot_before_scale: bool = False,
    accumulate: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The fused row pass of the module docstring.

    Args:
        x: ``(..., C, D)`` with ``C = group`` rows per chunk; may be a broadcast (e.g. the gradient
            of a sum).
        group: rows per chunk ``C``.
        a: ``x.shape[:-1]`` per-row coefficient of ``vec`` (None: 1).
        vec: ``(..., D)`` one row per chunk (``x.shape[:-2]``), or ``(D,)`` for every chunk.
        scale: ``x.shape[:-1]`` per-row scalars, or ``x.shape`` for an elementwise factor.
        out: where ``t`` goes (contiguous, ``x.shape``; may be ``x``); None: a new tensor.
        write: False: ``t`` is not stored (only ``dot`` and ``col`` are wanted).
        dot_with: ``x.shape`` (row by row), ``(..., D)`` one row per chunk, or ``(D,)``.
        col: return ``col`` ``(..., D)``, the per-chunk sums of ``w_i t_i``.
        weights: ``x.shape[:-1]`` the ``w_i`` (None: 1).
        causal: zero the entries ``d > i mod C`` of ``t`` (``D = C``: the causal mask of a
            chunk's ``(C, C)`` scores, applied with the scale).
        dot_before_scale: the dot product is of ``u``, before the scale and the mask.
        accumulate: ``out += t`` instead of ``out = t`` (``out`` required).

    Returns:
        ``(out, dot, col)``: ``out`` (None when ``write`` is False), ``dot`` of shape
        ``x.shape[:-1]`` (None without ``dot_with``), ``col`` (None unless asked).
    """
    D = x.shape[-1]
    lead = x.shape[:-1]
    chunks = lead[:-1]
    if lead[-1] != group:
        raise ValueError(f"x: expected {group} rows per chunk in dim -2, got shape {tuple(x.shape)}")
    # shapes are checked here: the compiled pass trusts them, and a wrong one would read or write
    # outside the tensors
    per_chunk = torch.Size((*chunks, D))
    for name, t, allowed in (("a", a, (lead,)), ("weights", weights, (lead,)), ("scale", scale, (lead, x.shape)),
                             ("vec", vec, (per_chunk, torch.Size((D,)))),
                             ("dot_with", dot_with, (x.shape, per_chunk, torch.Size((D,)))),
                             ("out", out, (x.shape,))):
        if t is not None and t.shape not in allowed:
            raise ValueError(f"{name}: expected shape {' or '.join(str(tuple(s)) for s in allowed)}, got {tuple(t.shape)}")
    full_scale = scale is not None and scale.shape == x.shape
    if accumulate and out is None:
        raise ValueError("out: accumulate=True needs the tensor to add into")
    if not write and out is not None:
        raise ValueError("out: given with write=False, which stores nothing")
    if write and out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    # torch.compile cannot trace into the compiled pass (a graph break); it traces the same pass in torch ops.
    native = x.device.type == "cpu" and x.dtype in ROW_DTYPES and not torch.compiler.is_compiling()
    lib = _native.library() if native else None
    x_strides = _rows_view(x, D)
    # per-row and per-chunk operands are small (1/D of x): made contiguous; full-size ones must be
    a, vec, weights = (None if t is None else t.contiguous() for t in (a, vec, weights))
    if scale is not None and not full_scale:
        scale = scale.contiguous()
    if dot_with is not None and dot_with.shape != x.shape:
        dot_with = dot_with.contiguous()
    operands = [t for t in (a, vec, scale, out, dot_with, weights) if t is not None]
    if lib is None or x_strides is None or any(t.dtype != x.dtype or not t.is_contiguous() for t in operands):
        return _torch_row_pass(x, group, a, vec, scale, full_scale, out, dot_with, col, weights, causal,
                               dot_before_scale, accumulate)
    rows = x.numel() // D
    dot = torch.empty(lead, dtype=x.dtype, device=x.device) if dot_with is not None else None
    cols = torch.empty((*chunks, D), dtype=x.dtype, device=x.device) if col else None
    per_row = dot_with is not None and dot_with.shape == x.shape
    fn = getattr(lib, f"rnnkit_row_pass_{ROW_DTYPES[x.dtype]}")
    fn(rows, D, group, x.data_ptr(), *x_strides,
       _ptr(a), _ptr(vec), D if vec is not None and vec.dim() > 1 else 0,
       None if full_scale else _ptr(scale), _ptr(scale) if full_scale else None, _ptr(out),
       _ptr(dot_with) if per_row else None, None if per_row else _ptr(dot_with),
       D if dot_with is not None and not per_row and dot_with.dim() > 1 else 0,
       _ptr(dot), _ptr(weights), _ptr(cols), causal | dot_before_scale << 1 | accumulate << 2,
       torch.get_num_threads())
    return out, dot, cols


def _torch_row_pass(x, group, a, vec, scale, full_scale, out, dot_with, col, weights, causal, dot_before_scale,
                    accumulate):
    D = x.shape[-1]
    t = x
    if vec is not None:
        v = vec if vec.dim() == 1 else vec.unsqueeze(-2)
        t = t + (v if a is None else a.unsqueeze(-1) * v)
    dot = None
    if dot_with is not None:
        y = dot_with if dot_with.shape == x.shape else (dot_with if dot_with.dim() == 1 else dot_with.unsqueeze(-2))
        if dot_before_scale:
            dot = (t * y).sum(-1)
    if scale is not None:
        t = t * (scale if full_scale else scale.unsqueeze(-1))
    if causal:
        rows = torch.arange(x.shape[-2], device=x.device)
        t = torch.where(torch.arange(D, device=x.device)[None, :] <= rows[:, None], t, 0)
    if dot_with is not None and not dot_before_scale:
        dot = (t * y).sum(-1)
    if out is not None:
        if accumulate:
            out.add_(t)
        else:
            out.copy_(t)
            t = out
    cols = None
    if col:
        cols = (t if weights is None else t * weights.unsqueeze(-1)).sum(-2)
        if cols.shape[-1] != D:  # a broadcast x of a single row: keep the documented shape
            cols = cols.expand(*x.shape[:-2], D)
    return out, dot, cols
