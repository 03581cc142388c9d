"""Per-chunk batched products written straight into a slice of a larger buffer.

The chunk kernels' carry loops form, for chunk ``n``, a batch of small products whose result
belongs in ``X[:, n]`` of a ``(G, N, R, M)`` buffer. ``torch.bmm``/``baddbmm`` give their fast
batched path only to a contiguous result; for such a slice they fall back to one matrix at a
time, so a plain loop would have to write into a temporary and copy it into place, an extra pass
over memory per product (``benchmarks/delta_speed.py`` measures the carry loops).

The CBLAS batch interface of MKL (``cblas_sgemm_batch``, ``cblas_dgemm_batch``) takes one
address per matrix, so any batch strides do. PyTorch's x86 CPU builds link MKL into
``libtorch_cpu`` and export these symbols; :class:`ChunkProducts` calls them through ``ctypes``
when they are there (same BLAS, same threads as ``torch.bmm``), and otherwise, or under a
``TorchDispatchMode`` (FLOP counters, fake tensors, tracing must see the products as torch ops),
runs ``torch.bmm``/``baddbmm`` into a temporary and copies. Both paths compute the same products.

Every integer argument is passed as a one-element int64 array and the group count as an int64:
with one group, MKL's 32-bit (LP64) interface reads the low half of each, which on a
little-endian machine is the same number, so a build with either integer width reads the right
sizes. A self-test against ``torch.bmm`` runs when the library is first looked up.
``RNNKIT_NO_BLAS=1`` disables the MKL path.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from rnnkit.ops._lazy import LazyResource

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_SYMBOLS = {torch.float32: "cblas_sgemm_batch", torch.float64: "cblas_dgemm_batch"}


def _find_functions() -> dict[torch.dtype, ctypes._CFuncPtr]:
    if sys.byteorder != "little":
        raise RuntimeError("the integer-width-agnostic calling convention needs a little-endian machine")
    if "mkl" not in torch.__config__.show().lower():
        raise RuntimeError("this PyTorch build does not use MKL")
    library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    functions = {}
    for dtype, name in _SYMBOLS.items():
        fn = getattr(library, name)  # AttributeError when not exported
        fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 13 + [ctypes.c_int64, ctypes.c_void_p]
        fn.restype = None
        functions[dtype] = fn
    return functions


def _self_test(functions) -> None:
    gen = torch.Generator().manual_seed(0)
    for dtype in _SYMBOLS:
        a = torch.randn(3, 2, 5, 4, dtype=dtype, generator=gen)
        b = torch.randn(3, 6, 4, dtype=dtype, generator=gen).transpose(-1, -2)  # (3, 4, 6), column-major
        c = torch.randn(3, 2, 5, 6, dtype=dtype, generator=gen)
        want = c[:, 1] * 0.5 - 2 * a[:, 1] @ b
        ChunkProducts(a, b, c, alpha=-2.0, beta=0.5, functions=functions)(1)
        if not torch.allclose(c[:, 1], want, rtol=1e-5, atol=1e-5):
            raise RuntimeError(f"{_SYMBOLS[dtype]} gave a wrong product in its self-test")


def _load() -> dict[torch.dtype, ctypes._CFuncPtr]:
    functions = _find_functions()
    _self_test(functions)
    return functions


_FUNCTIONS = LazyResource(_load, "RNNKIT_NO_BLAS")


def _library() -> dict[torch.dtype, ctypes._CFuncPtr] | None:
    return _FUNCTIONS.get()


def available() -> bool:
    """Whether products run through MKL's batch interface (looked up on the first call)."""
    return _FUNCTIONS.get() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return _FUNCTIONS.unavailable_reason()


def _reset_for_tests() -> None:
    _FUNCTIONS.reset()


def _operand(t: torch.Tensor) -> tuple[int, int] | None:
    """(transpose flag, leading dimension) of ``t``'s last two dims read as a row-major matrix, or
    None when neither its rows nor its columns are contiguous."""
    if t.stride(-1) == 1 and t.stride(-2) >= max(1, t.shape[-1]):
        return _NO_TRANS, t.stride(-2)
    if t.stride(-2) == 1 and t.stride(-1) >= max(1, t.shape[-2]):
        return _TRANS, t.stride(-1)
    return None


class ChunkProducts:
    """``C[:, n] = alpha * A[:, n] @ B[:, n] + beta * C[:, n]`` for one chunk ``n`` per call.

    Args:
        A: ``(G, N, m, k)``, or ``(G, m, k)`` for the same matrices at every ``n``.
        B: ``(G, N, k, p)`` or ``(G, k, p)``.
        C: ``(G, N, m, p)`` or ``(G, m, p)`` (a running state, say), rows contiguous; written in
            place, any batch strides. At least one of the three has the ``N`` dimension.
        alpha, beta: scalars (``beta = 0``: ``C``'s old values are not read).

    The tensors are read and written at call time (their addresses are taken once): an operand
    updated in place between calls, such as a running state, is read as it then is. A matrix with
    contiguous rows or columns (a transposed view included) is read in place; other layouts, like
    every tensor off the MKL path, go through ``torch.bmm`` and a copy.
    """

    def __init__(self, A, B, C, alpha: float = 1.0, beta: float = 0.0, functions=None):
        chunked = [t.shape[1] for t in (A, B, C) if t.dim() == 4]
        if not chunked:
            raise ValueError("A, B, C: expected at least one with a chunk dimension (G, N, ., .), got all 3-D")
        G, N = C.shape[0], chunked[0]
        m, p, k = C.shape[-2], C.shape[-1], A.shape[-1]
        for name, t, shape in (("A", A, (m, k)), ("B", B, (k, p)), ("C", C, (m, p))):
            if t.dim() not in (3, 4) or tuple(t.shape[-2:]) != shape or t.shape[0] != G or (t.dim() == 4 and t.shape[1] != N):
                raise ValueError(f"{name}: expected ({G}, [{N},] {shape[0]}, {shape[1]}), got {tuple(t.shape)}")
            if t.dtype != C.dtype or t.device != C.device:
                raise ValueError(f"{name}: expected {C.dtype} on {C.device}, got {t.dtype} on {t.device}")
        self.A, self.B, self.C, self.alpha, self.beta, self.N = A, B, C, alpha, beta, N
        functions = functions or self._blas_for(A, B, C)  # given: the loader's self-test
        layouts = [_operand(t) for t in (A, B, C)]
        if functions is None or None in layouts or layouts[2][0] != _NO_TRANS:
            self.fn = None
            self.tmp = torch.empty((G, m, p), dtype=C.dtype, device=C.device)
            return
        self.fn = functions[C.dtype]
        (ta, lda), (tb, ldb), (_, ldc) = layouts
        # One-element int64 arrays: see the module docstring on integer widths.
        self.ints = torch.tensor([ta, tb, m, p, k, lda, ldb, ldc, G], dtype=torch.int64)
        self.scalars = torch.tensor([alpha, beta], dtype=C.dtype)
        self.addresses = [self._addresses(t, N) for t in (A, B, C)]  # (N, G) int64 each
        self.bases = tuple(x.data_ptr() for x in self.addresses)
        i, s = self.ints.data_ptr(), self.scalars.data_ptr()
        self.sizes = (i, i + 8, i + 16, i + 24, i + 32)
        self.lds = (i + 40, i + 48, i + 56)
        self.group_size = i + 64
        self.alpha_ptr, self.beta_ptr = s, s + self.scalars.element_size()
        self.row_bytes = G * 8

    @staticmethod
    def _blas_for(*tensors):
        if any(t.device.type != "cpu" or type(t) is not torch.Tensor for t in tensors):
            return None
        if tensors[0].dtype not in _SYMBOLS or _get_current_dispatch_mode() is not None:
            return None
        return _library()

    @staticmethod
    def _addresses(t: torch.Tensor, N: int) -> torch.Tensor:
        size = t.element_size()
        per_g = torch.arange(t.shape[0], dtype=torch.int64) * (t.stride(0) * size) + t.data_ptr()
        if t.dim() == 3:
            return per_g.expand(N, -1).contiguous()
        per_n = torch.arange(N, dtype=torch.int64) * (t.stride(1) * size)
        return per_n[:, None] + per_g

    def __call__(self, n: int) -> None:
        if not 0 <= n < self.N:  # the MKL path would write outside C
            raise IndexError(f"n: expected a chunk index in [0, {self.N}), got {n}")
        if self.fn is None:
            self._fallback(n)
            return
        offset = n * self.row_bytes
        a, b, c = (base + offset for base in self.bases)
        ta, tb, m, p, k = self.sizes
        lda, ldb, ldc = self.lds
        self.fn(_ROW_MAJOR, ta, tb, m, p, k, self.alpha_ptr, a, lda, b, ldb, self.beta_ptr, c, ldc, 1,
                self.group_size)

    def _fallback(self, n: int) -> None:
        a, b, c = (t[:, n] if t.dim() == 4 else t for t in (self.A, self.B, self.C))
        target = c if c.is_contiguous() else self.tmp  # torch's batched path needs a contiguous result
        if self.beta == 0:
            torch.bmm(a, b, out=target)
            if self.alpha != 1:
                target.mul_(self.alpha)
        else:
            torch.baddbmm(c, a, b, beta=self.beta, alpha=self.alpha, out=target)
        if target is not c:
            c.copy_(target)
