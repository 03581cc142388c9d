"""Linear scans: ``h_t = a_t * h_{t-1} + b_t`` over time, elementwise in the state.

The recurrence behind minGRU, minLSTM, LRU, S4D, RG-LRU and Mamba. One public entry point,
:func:`linear_scan`, runs it in any of five interchangeable forms with one signature:

- ``recurrent``: :func:`linear_scan_recurrent`, the plain loop, autograd through it. The definition.
- ``parallel``: an associative (Hillis-Steele) scan over the whole sequence, ``ceil(log2 T)`` passes
  of the combine ``(a1, b1) . (a2, b2) = (a1 a2, a2 b1 + b2)``. It never divides by ``a`` and never
  takes a logarithm, so it is exact in the same sense as the loop when ``a`` is near 0, near 1,
  negative or complex (Blelloch 1990; Martin & Cundy 2018). The log-space form of Heinsen (2023),
  for ``a > 0`` and ``b > 0``, is :func:`linear_scan_log`.
- ``chunk``: the sequence cut into chunks of ``chunk_size`` steps; one pass over the chunks' steps
  (vectorised across chunks) finds each chunk's end state given a zero start, a short loop carries
  the true state across chunk boundaries, and a second pass writes every state. Memory is ``O(T)``
  whatever ``T`` (no ``log T`` levels), work is the loop's.
- ``fused``: a compiled CPU kernel (:mod:`rnnkit.ops._native`) that reads ``a`` and ``b`` once and
  writes ``h`` once; available when a C++ compiler is (else ``mode="fused"`` raises).
- ``auto``: ``fused`` on the CPU when it is available for the dtype, ``chunk`` otherwise (and
  while ``torch.compile`` traces, which cannot see into the compiled kernel).

Every form except ``recurrent`` runs under one custom autograd function whose backward is itself a
reverse linear scan (in the same form), not autograd through an unrolled graph:

    g_t = dL/dh_t + conj(a_{t+1}) g_{t+1},   dL/db_t = g_t,   dL/da_t = g_t conj(h_{t-1}),
    dL/dh0 = conj(a_1) g_1

(``conj`` is the identity for real dtypes; complex gradients follow PyTorch's conjugate-Wirtinger
convention). The backward saves ``a``, ``h`` and ``h0``: nothing per time step beyond the output.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from rnnkit.errors import InputError, check_choice, check_lengths, check_positive_int, check_tensor, describe
from rnnkit.ops import _native, _workspace
from rnnkit.ops._forms import is_empty_batch
from rnnkit.ops._native import SCAN_DTYPES, ptr
from rnnkit.ops._workspace import into
from rnnkit.ops.padding import freeze_padding, valid_mask

#: Forms :func:`linear_scan` accepts, ``recurrent`` (the definition) first.
LINEAR_SCAN_MODES = ("recurrent", "parallel", "chunk", "fused", "auto")

Form = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


# ----------------------------------------------------------------------------------- validation
def _check_inputs(a, b, h0, lengths):
    """Validate the public arguments; returns ``(a, b, h0, lengths)`` with lengths as int64 or None."""
    a, b = check_tensor("a", a), check_tensor("b", b)
    for name, x in (("a", a), ("b", b)):
        if not (x.is_floating_point() or x.is_complex()):
            raise InputError(f"{name}: expected a floating-point or complex tensor, got dtype {x.dtype}")
    if a.dim() < 2:
        raise InputError(f"a: expected a tensor of shape (B, T, *S) with at least 2 dims, got shape {tuple(a.shape)}")
    if a.shape != b.shape:
        raise InputError(f"b: expected the shape of a, (B, T, *S) = {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise InputError(f"b: expected the dtype of a ({a.dtype}), got {b.dtype}")
    if a.device != b.device:
        raise InputError(f"b: expected a tensor on {a.device} (the device of a), got one on {b.device}")
    if a.shape[1] < 1:
        raise InputError(f"a: expected at least one time step (T >= 1), got shape {tuple(a.shape)}")
    if h0 is not None:
        h0 = check_tensor("h0", h0)
        want = (a.shape[0],) + tuple(a.shape[2:])
        if tuple(h0.shape) != want:
            raise InputError(f"h0: expected shape (B, *S) = {want}, got {tuple(h0.shape)}")
        if h0.dtype != a.dtype:
            raise InputError(f"h0: expected the dtype of a ({a.dtype}), got {h0.dtype}")
        if h0.device != a.device:
            raise InputError(f"h0: expected a tensor on {a.device}, got one on {h0.device}")
    lengths = check_lengths(lengths, a.shape[0], a.shape[1], a.device)
    return a, b, h0, lengths


def _mask_padding(a, b, lengths):
    """Steps ``t >= lengths`` become ``a = 1, b = 0`` so the state is carried unchanged through them.

    ``torch.where`` (not multiplication) so that NaN or Inf written in the padding cannot leak into
    values or gradients.
    """
    if lengths is None:
        return a, b
    T = a.shape[1]
    valid = valid_mask(lengths, T)  # (B, T)
    valid = valid.view(valid.shape + (1,) * (a.dim() - 2))  # (B, T, 1, ...)
    one, zero = torch.ones((), dtype=a.dtype, device=a.device), torch.zeros((), dtype=a.dtype, device=a.device)
    return torch.where(valid, a, one), torch.where(valid, b, zero)


# ----------------------------------------------------------------------------------- the definition
def linear_scan_recurrent(
    a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """The plain loop that defines :func:`linear_scan` (autograd differentiates it step by step).

    Args:
        a: ``(B, T, *S)`` decay, real or complex.
        b: ``(B, T, *S)`` input, same dtype as ``a``.
        h0: ``(B, *S)`` initial state, or None for zeros.
        lengths: optional ``(B,)`` integers in ``[1, T]``; the state is frozen at steps ``t >= length``.

    Returns:
        ``h`` of shape ``(B, T, *S)`` with ``h_t = a_t * h_{t-1} + b_t`` and ``h_{-1} = h0``.

    Example:
        >>> a, b = torch.rand(2, 5, 3), torch.randn(2, 5, 3)
        >>> h = linear_scan_recurrent(a, b)   # (2, 5, 3)
    """
    a, b, h0, lengths = _check_inputs(a, b, h0, lengths)
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    hs = []
    # unbind, not a[:, t]: the backward of one unbind stacks T gradients once, while each a[:, t]
    # would scatter into its own zero-filled (B, T, *S) buffer, O(T^2) memory traffic in all.
    for t, (a_t, b_t) in enumerate(zip(a.unbind(1), b.unbind(1))):
        h = freeze_padding(t, lengths, a_t * h + b_t, h)
        hs.append(h)
    return torch.stack(hs, 1)


# ----------------------------------------------------------------------------------- PyTorch forms
# Each form takes contiguous ``a``, ``b`` of shape (B, T, S) and ``h0`` (B, S) or None, and returns
# ``h`` (B, T, S). They run without autograd (inside _LinearScan) and never modify their inputs.
def _scan_parallel(a, b, h0):
    """Hillis-Steele inclusive scan over T: after the pass with offset d, (A_t, H_t) compose steps t-2d+1..t."""
    A, H = a, b
    T, d = a.shape[1], 1
    while d < T:
        # Out of place: the right-hand sides read the previous level at t - d.
        H_next = H.clone()
        H_next[:, d:].addcmul_(A[:, d:], H[:, :-d])
        if 2 * d < T or h0 is not None:  # the last level's products only serve the h0 term
            A_next = A.clone()
            A_next[:, d:].mul_(A[:, :-d])
            A = A_next
        H = H_next
        d *= 2
    if h0 is None:
        return H if H is not b else b.clone()
    # A_t = prod_{s<=t} a_s, formed by products only (no division, so a = 0 is exact).
    return torch.addcmul(H, A, h0[:, None])


def _scan_chunk(a, b, h0, chunk_size):
    """Chunked scan: per-chunk end states from zero, a carry loop over chunks, then every state."""
    B, T, S = a.shape
    C = min(chunk_size, T)
    n = -(-T // C)  # number of chunks
    pad = n * C - T
    if pad:
        # Padded steps (a = 1, b = 0) sit after the last real step, so they change nothing returned.
        a = torch.cat([a, a.new_ones(B, pad, S)], 1)
        b = torch.cat([b, b.new_zeros(B, pad, S)], 1)
    a4, b4 = a.view(B, n, C, S), b.view(B, n, C, S)  # (B, n, C, S)
    # Pass 1: each chunk's end state from a zero start and its total decay, all chunks at once.
    decay, end = a4[:, :, 0].clone(), b4[:, :, 0].clone()  # (B, n, S)
    for j in range(1, C):
        decay.mul_(a4[:, :, j])
        end.mul_(a4[:, :, j]).add_(b4[:, :, j])
    # Carry across chunks: the state entering chunk k is start[:, k].
    start = torch.empty_like(end)  # (B, n, S)
    prev = h0 if h0 is not None else torch.zeros_like(end[:, 0])
    for k in range(n):
        start[:, k] = prev
        prev = torch.addcmul(end[:, k], decay[:, k], prev)
    # Pass 2: every state, all chunks at once from their true start.
    h4 = torch.empty_like(b4)  # (B, n, C, S)
    prev = start
    for j in range(C):
        prev = into(torch.addcmul, b4[:, :, j], a4[:, :, j], prev, out=h4[:, :, j])
    h = h4.view(B, n * C, S)
    return h[:, :T] if pad else h


def _reverse_with(form: Form, a_next: torch.Tensor, g_out: torch.Tensor) -> torch.Tensor:
    """``g_t = g_out_t + a_next_t * g_{t+1}`` (``g_T = 0``) with a forward form, by flipping time."""
    return form(a_next.flip(1), g_out.flip(1), None).flip(1)


def _conj(x: torch.Tensor) -> torch.Tensor:
    return x.conj() if x.is_complex() else x


def _scan_backward(a, h, h0, g_out, need_a: bool, need_h0: bool, reverse: Callable):
    """``(da, db, dh0)`` from ``g = reverse(a_next, g_out)``, the reverse scan over ``a_next_t = conj(a_{t+1})``."""
    ac = _conj(a)
    # The last entry multiplies g_T = 0: any value will do.
    a_next = torch.cat([ac[:, 1:], torch.zeros_like(ac[:, :1])], 1)
    g = reverse(a_next, g_out)
    da = dh0 = None
    if need_a:
        h_prev = torch.cat([(h0 if h0 is not None else torch.zeros_like(h[:, 0]))[:, None], h[:, :-1]], 1)
        da = g * _conj(h_prev)
    if need_h0:
        dh0 = ac[:, 0] * g[:, 0]
    return da, g, dh0


# ----------------------------------------------------------------------------------- fused kernel
def _dims(x: torch.Tensor) -> tuple[int, int, int]:
    B, T, S = x.shape
    return B, T, S


def _fused_forward(a, b, h0, out=None):
    """``h`` (B, T, S) by the compiled kernel from contiguous ``a``, ``b`` (B, T, S) and ``h0``
    (B, S) or None; ``out``, when given, a contiguous (B, T, S) tensor of the same dtype to write
    ``h`` into (by default a buffer of the workspace pool)."""
    lib = _native.library()
    h = _workspace.POOL.empty(b.shape, b.dtype) if out is None else out
    fn = getattr(lib, f"rnnkit_scan_fwd_{SCAN_DTYPES[a.dtype]}")
    fn(ptr(a), ptr(b), ptr(h0), ptr(h), *_dims(a), torch.get_num_threads())
    return h


def _fused_backward(a, h, h0, g_out, need_a: bool, need_h0: bool):
    """``(da, db, dh0)`` of the scan by the compiled kernel (None where not needed), from
    contiguous tensors."""
    lib = _native.library()
    db = _workspace.POOL.empty(g_out.shape, g_out.dtype)
    da = _workspace.POOL.empty(a.shape, a.dtype) if need_a else None
    dh0 = torch.empty_like(h0, memory_format=torch.contiguous_format) if need_h0 else None
    fn = getattr(lib, f"rnnkit_scan_bwd_{SCAN_DTYPES[a.dtype]}")
    fn(ptr(a), ptr(h), ptr(h0), ptr(g_out), ptr(da), ptr(db), ptr(dh0), *_dims(a), torch.get_num_threads())
    return da, db, dh0


# ----------------------------------------------------------------------------------- autograd
def _forms(mode: str, chunk_size: int):
    """``(forward(a, b, h0) -> h, backward(a, h, h0, g_out, need_a, need_h0) -> (da, db, dh0))``."""
    if mode == "fused":
        return _fused_forward, _fused_backward
    if mode == "parallel":
        form = _scan_parallel
    else:

        def form(a, b, h0):
            return _scan_chunk(a, b, h0, chunk_size)

    def backward(a, h, h0, g_out, need_a, need_h0):
        return _scan_backward(a, h, h0, g_out, need_a, need_h0, lambda a_next, g: _reverse_with(form, a_next, g))

    return form, backward


def _dense(x: torch.Tensor) -> torch.Tensor:
    """Contiguous with lazy conjugation/negation applied: what a raw data pointer must see."""
    return x.resolve_conj().resolve_neg().contiguous()


class _LinearScan(torch.autograd.Function):
    """``h = scan(a, b, h0)`` on (B, T, S) tensors with a reverse-scan backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, a, b, h0, mode: str, chunk_size: int):
        forward, backward = _forms(mode, chunk_size)
        a, b = _dense(a), _dense(b)
        h0c = _dense(h0) if h0 is not None else None
        h = forward(a, b, h0c)
        ctx.backward_form, ctx.mode, ctx.chunk_size = backward, mode, chunk_size
        ctx.has_h0 = h0 is not None
        ctx.save_for_backward(a, h, h0c)
        return h

    @staticmethod
    def backward(ctx, g_out):
        a, h, h0 = ctx.saved_tensors
        need_a, _, need_h0 = ctx.needs_input_grad[:3]
        need_h0 = need_h0 and ctx.has_h0
        if torch.is_grad_enabled():
            # create_graph=True: the same reverse scan, assembled from differentiable pieces (this
            # function again, in the same form) so that second derivatives exist.
            def reverse(a_next, g):
                return _LinearScan.apply(a_next.flip(1), g.flip(1), None, ctx.mode, ctx.chunk_size).flip(1)

            da, db, dh0 = _scan_backward(a, h, h0, g_out, need_a, need_h0, reverse)
            return da, db, dh0, None, None
        da, db, dh0 = ctx.backward_form(a, h, h0, _dense(g_out), need_a, need_h0)
        return da, db, dh0, None, None


# ----------------------------------------------------------------------------------- public entry
def fused_available(dtype: torch.dtype | None = None) -> bool:
    """Whether the compiled CPU kernel is usable (for ``dtype`` when given)."""
    return _native.available() and (dtype is None or dtype in SCAN_DTYPES)


def resolve_mode(mode: str, device: torch.device, dtype: torch.dtype) -> str:
    """The form ``mode`` runs as on ``device`` for ``dtype`` (``auto`` resolved; ``fused`` checked).

    Raises:
        InputError: for an unknown mode, or ``fused`` where the compiled kernel cannot run.
    """
    check_choice("mode", mode, LINEAR_SCAN_MODES)
    if mode == "auto":
        # torch.compile cannot trace the compiled kernel (a ctypes call, a graph break), but it traces chunk.
        fused = device.type == "cpu" and fused_available(dtype) and not torch.compiler.is_compiling()
        return "fused" if fused else "chunk"
    if mode == "fused":
        if device.type != "cpu":
            raise InputError(f"mode: 'fused' is a CPU kernel; expected CPU tensors, got {device} (use mode='auto')")
        if not _native.available():
            raise InputError(
                f"mode: 'fused' expected the compiled CPU kernel, which is unavailable "
                f"({_native.unavailable_reason()}); use mode='auto' or 'chunk'"
            )
        if dtype not in SCAN_DTYPES:
            raise InputError(f"a: mode 'fused' expected a dtype in {list(SCAN_DTYPES)}, got {dtype}")
    return mode


def linear_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    h0: torch.Tensor | None = None,
    *,
    lengths: torch.Tensor | None = None,
    mode: str = "auto",
    chunk_size: int = 64,
) -> torch.Tensor:
    """``h_t = a_t * h_{t-1} + b_t`` for all t, elementwise over the state dims ``*S``.

    Args:
        a: ``(B, T, *S)`` decay (any trailing state dims, e.g. ``(B, T, D)`` or ``(B, T, D, N)``);
            real or complex floating point. ``a`` does not broadcast: expand it first.
        b: ``(B, T, *S)`` input, same shape, dtype and device as ``a``.
        h0: ``(B, *S)`` initial state, or None for zeros.
        lengths: optional ``(B,)`` integers in ``[1, T]`` for right-padded batches: steps
            ``t >= length`` act as ``a = 1, b = 0`` (whatever ``a``, ``b`` hold there, NaN included),
            so ``h[:, -1]`` is the state at each sequence's last valid step.
        mode: ``"recurrent"``, ``"parallel"``, ``"chunk"``, ``"fused"`` or ``"auto"`` (module docstring).
        chunk_size: steps per chunk of the ``chunk`` form.

    Returns:
        ``h`` of shape ``(B, T, *S)``, the dtype of ``a``.

    Raises:
        InputError: on mismatched shapes/dtypes/devices, bad ``lengths``, an unknown ``mode``, or
            ``mode="fused"`` where the compiled kernel is unavailable.

    Example:
        >>> a = torch.rand(4, 1000, 64)            # decays in (0, 1)
        >>> b = torch.randn(4, 1000, 64)
        >>> h = linear_scan(a, b)                  # (4, 1000, 64); h[:, -1] is the final state
    """
    check_choice("mode", mode, LINEAR_SCAN_MODES)
    check_positive_int("chunk_size", chunk_size)
    a, b, h0, lengths = _check_inputs(a, b, h0, lengths)
    if mode == "recurrent" or is_empty_batch(a):  # the compiled kernel splits work by the batch size
        return linear_scan_recurrent(a, b, h0, lengths)
    mode = resolve_mode(mode, a.device, a.dtype)
    a, b = _mask_padding(a, b, lengths)
    shape = a.shape
    B, T = shape[0], shape[1]
    S = math.prod(shape[2:])
    h = _LinearScan.apply(a.reshape(B, T, S), b.reshape(B, T, S), None if h0 is None else h0.reshape(B, S), mode, chunk_size)
    return h.view(shape)


# ----------------------------------------------------------------------------------- log space
def _log_scan_block(log_a, log_b, h0):
    """Heinsen's form on one block: ``h_t = exp(A_t) h0 + exp(A_t + logcumsumexp(log b - A))``."""
    a_star = torch.cumsum(log_a, 1)  # (B, T, *S), A_t = sum_{s<=t} log a_s
    h = torch.exp(a_star + torch.logcumsumexp(log_b - a_star, 1))
    decay = torch.exp(a_star)  # prod_{s<=t} a_s
    return h if h0 is None else h + decay * h0[:, None], decay


def linear_scan_log(
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    h0: torch.Tensor | None = None,
    *,
    lengths: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Heinsen's (2023) log-space parallel scan for ``a > 0`` and ``b > 0``, given as logarithms.

    With ``A_t = sum_{s<=t} log a_s``, ``h_t = exp(A_t + logcumsumexp_{s<=t}(log b_s - A_s)) + exp(A_t) h0``:
    two parallel prefix ops (``cumsum``, ``logcumsumexp``) that autograd differentiates. This is the
    training form of minGRU/minLSTM in Feng et al. (2024), sec. 3 and appendix B, where ``b_t > 0``
    is kept by the ``g`` activation. ``h0`` enters linearly, so it may have any sign (a zero state
    would have no logarithm).

    Numerics: ``A_t`` and ``-A_s`` cancel, so the relative error of ``h_t`` grows like
    ``eps * |A_t|``, which over a long fp32 sequence (``|A_T|`` in the hundreds) exceeds 1e-5.
    ``block_size=C`` bounds it: the form runs inside blocks of ``C`` steps (all blocks at once, so
    ``|A|`` never exceeds ``C`` steps' worth) and the state is carried across block boundaries by
    :func:`linear_scan` in linear space. ``None`` runs the whole sequence as one chunk, exactly as
    the paper does. (Not the ``chunk_size`` of :func:`linear_scan`'s ``chunk`` form: a
    bound on cancellation, not a unit of work.)

    Args:
        log_a: ``(B, T, *S)`` real, ``log a_t``, finite (``a_t = 0`` is outside this form's domain).
        log_b: ``(B, T, *S)`` real, ``log b_t``.
        h0: ``(B, *S)`` initial state (any sign), or None for zeros.
        lengths: optional ``(B,)`` in ``[1, T]``; steps past it act as ``a = 1, b = 0``.
        block_size: steps per block, or None for one block.

    Returns:
        ``h`` ``(B, T, *S)``.

    Example:
        >>> z = torch.rand(2, 100, 8)
        >>> h = linear_scan_log(torch.log1p(-z), torch.log(z) + torch.randn(2, 100, 8), block_size=32)
    """
    log_a, log_b, h0, lengths = _check_inputs(log_a, log_b, h0, lengths)
    if log_a.is_complex():
        raise InputError(f"log_a: expected a real tensor (log of positive decays), got dtype {log_a.dtype}")
    if block_size is not None:
        check_positive_int("block_size", block_size)
    valid = None
    if lengths is not None:
        valid = valid_mask(lengths, log_a.shape[1])  # (B, T)
        valid = valid.view(valid.shape + (1,) * (log_a.dim() - 2))  # (B, T, 1, ...)
        # Padding becomes a = b = 1: finite, so no NaN/Inf from it reaches a gradient; its states are
        # replaced below by the state at the last valid step.
        zero = torch.zeros((), dtype=log_a.dtype, device=log_a.device)
        log_a, log_b = torch.where(valid, log_a, zero), torch.where(valid, log_b, zero)
    shape = log_a.shape
    B, T, S = shape[0], shape[1], shape[2:]
    if block_size is None or block_size >= T:
        h, _ = _log_scan_block(log_a, log_b, h0)
    else:
        C = block_size
        n = -(-T // C)
        pad = n * C - T
        if pad:  # a = b = 1 after the end: changes nothing returned
            log_a = torch.cat([log_a, log_a.new_zeros(B, pad, *S)], 1)
            log_b = torch.cat([log_b, log_b.new_zeros(B, pad, *S)], 1)
        # Every chunk from a zero start, all at once: chunks folded into the batch.
        local, decay = _log_scan_block(log_a.reshape(B * n, C, *S), log_b.reshape(B * n, C, *S), None)
        local, decay = local.view(B, n, C, *S), decay.view(B, n, C, *S)  # (B, n, C, *S)
        # The state at each chunk's end, carried across chunks in linear space (any sign of h0).
        ends = linear_scan(decay[:, :, -1].contiguous(), local[:, :, -1].contiguous(), h0)  # (B, n, *S)
        first = torch.zeros_like(ends[:, :1]) if h0 is None else h0[:, None]
        starts = torch.cat([first, ends[:, :-1]], 1)  # (B, n, *S) the state entering each chunk
        h = (local + decay * starts[:, :, None]).reshape(B, n * C, *S)[:, :T]
    if valid is not None:
        last = (lengths - 1).view((B, 1) + (1,) * len(S)).expand((B, 1) + tuple(S))
        h = torch.where(valid, h, torch.gather(h, 1, last))
    return h


__all__ = ["LINEAR_SCAN_MODES", "fused_available", "linear_scan", "linear_scan_log", "linear_scan_recurrent", "resolve_mode"]
