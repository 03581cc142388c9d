"""Workspace memory of the CPU kernels: one pool of reused large buffers.

Why a pool: the kernels' large tensors (the fused scan's ``h`` and its gradients; the chunk
kernels' ``(G, N, C, *)`` intermediates) are tens of MiB, so a fresh one comes from ``mmap`` and
page-faults 4 KiB at a time on its first write, which costs as much as the kernel's own work
(``benchmarks/scan_speed.py`` and ``benchmarks/chunk_speed.py`` measure both). A training loop
asks for the same shapes every step, so :data:`POOL` hands back a buffer whose storage nobody else
references any more (every tensor, view, autograd saved tensor, numpy or DLPack export of it holds
a reference; the pool's own is then the only one left). Fresh buffers of at least
:data:`HUGE_PAGE_MIN_BYTES` are advised to use 2 MiB pages before their first write (Linux), one
fault per 2 MiB instead of per 4 KiB.

Size: the pool keeps at most ``RNNKIT_SCAN_POOL_MB + RNNKIT_CHUNK_POOL_MB`` MiB (defaults 1024 and
4096: the budgets of the two kinds of kernel it serves; both 0 disables it), read once, at the
first request. The oldest free buffers are dropped first, and a request that does not fit is
served fresh, unpooled. A malformed value raises :class:`~rnnkit.errors.InputError` naming the
variable at that first request (importing rnnkit never fails on it).
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading

import torch

from rnnkit.errors import InputError

#: Outputs at least this large are advised to use huge pages before their first write, and pooled.
HUGE_PAGE_MIN_BYTES = 8 << 20
#: The pool's size variables (MiB) and their defaults; the pool's cap is their sum.
POOL_VARIABLES = {"RNNKIT_SCAN_POOL_MB": 1024.0, "RNNKIT_CHUNK_POOL_MB": 4096.0}

_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14  # Linux's value on every architecture rnnkit builds for


def pool_bytes() -> int:
    """The pool's cap in bytes from :data:`POOL_VARIABLES` (each a non-negative number of MiB).

    Raises:
        InputError: a variable holds something other than a finite number >= 0.
    """
    total = 0.0
    for name, default in POOL_VARIABLES.items():
        raw = os.environ.get(name, "").strip()
        if not raw:
            total += default
            continue
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise InputError(f"{name}: expected a non-negative number of MiB (0 disables), got {raw!r}")
        total += value
    return int(total * (1 << 20))


def _find_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_MADVISE = _find_madvise()


def advise_huge_pages(t: torch.Tensor) -> None:
    """Ask the kernel to back the whole 2 MiB pages inside ``t``'s memory with huge pages (Linux,
    transparent huge pages in ``madvise`` mode). A hint: failures are ignored, the memory works
    either way."""
    if _MADVISE is None:
        return
    start = t.data_ptr()
    begin = (start + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    end = (start + t.numel() * t.element_size()) & ~(_HUGE_PAGE - 1)
    if end > begin:
        _MADVISE(begin, end - begin, _MADV_HUGEPAGE)


def _storage_use_count(t: torch.Tensor) -> int | None:
    """References to ``t``'s storage (tensors, views, saved tensors, numpy/DLPack exports), or None."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    storage = t.untyped_storage()
    return count(storage._cdata) - 1  # minus the temporary `storage` object itself


def _fresh(shape, dtype: torch.dtype) -> torch.Tensor:
    """A new contiguous CPU tensor; large ones advised to use huge pages."""
    out = torch.empty(shape, dtype=dtype)
    if out.numel() * out.element_size() >= HUGE_PAGE_MIN_BYTES:
        advise_huge_pages(out)
    return out


class BufferPool:
    """Large CPU buffers, reused once nothing but the pool holds them (see the module docstring).

    Args:
        max_bytes: the cap; None reads it from the environment (:func:`pool_bytes`) at the first
            request.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.buffers: list[torch.Tensor] = []  # flat, oldest first
        self.lock = threading.Lock()

    def _free(self, buf: torch.Tensor) -> bool:
        return _storage_use_count(buf) == 1  # only self.buffers holds it

    def empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous CPU tensor of ``shape`` and ``dtype``."""
        if self.max_bytes is None:
            self.max_bytes = pool_bytes()
        n = math.prod(shape)
        nbytes = n * dtype.itemsize
        if nbytes < HUGE_PAGE_MIN_BYTES or self.max_bytes <= 0 or _storage_use_count(torch.empty(0)) is None:
            return _fresh(shape, dtype)
        with self.lock:
            for i, buf in enumerate(self.buffers):
                if buf.dtype == dtype and buf.numel() == n and self._free(buf):
                    self.buffers.append(self.buffers.pop(i))  # most recently used last
                    return buf.view(shape)
            held = sum(b.numel() * b.element_size() for b in self.buffers)
            for buf in list(self.buffers):
                if held + nbytes <= self.max_bytes:
                    break
                if self._free(buf):
                    # by identity: list.remove compares tensors with ==, which fails on a match of shapes
                    del self.buffers[next(i for i, b in enumerate(self.buffers) if b is buf)]
                    held -= buf.numel() * buf.element_size()
            out = _fresh((n,), dtype)
            if held + nbytes <= self.max_bytes:
                self.buffers.append(out)
            return out.view(shape)

    def clear(self) -> None:
        with self.lock:
            self.buffers.clear()


#: The one pool every CPU kernel borrows from.
POOL = BufferPool()


def into(op, *args, out: torch.Tensor, **kwargs) -> torch.Tensor:
    """``op(*args, out=out, **kwargs)``: a kernel's write into its preallocated buffer (often a
    strided slice of it). While ``torch.compile`` traces, which takes no ``out=`` into a strided
    tensor (a graph break), the same result is computed and then copied into ``out``.

    Example:
        >>> into(torch.addcmul, b, a, prev, out=h[:, :, j])    # h[:, :, j] = b + a * prev
    """
    if torch.compiler.is_compiling():
        return out.copy_(op(*args, **kwargs))
    return op(*args, out=out, **kwargs)


def workspace(shape, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor of ``shape`` in ``like``'s dtype and device, from
    :data:`POOL` on the CPU."""
    if like.device.type != "cpu":
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return POOL.empty(torch.Size(shape), like.dtype)


def workspace_like(t: torch.Tensor) -> torch.Tensor:
    """:func:`workspace` of ``t``'s shape."""
    return workspace(t.shape, t)
