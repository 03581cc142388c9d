"""The fused CPU linear scan: ``_cpu_scan.cpp`` compiled at first use and called through ctypes.

Why a compiled loop: on a CPU a linear scan is memory-bound, and every PyTorch form of it pays extra
passes over memory (the eager loop dispatches two ops per step; the parallel forms read and write
the sequence ``log T`` times). One C++ loop reading ``a`` and ``b`` once and writing ``h`` once runs
at the speed of a copy. It includes no torch headers, so it builds in about a second with the
system compiler, without network, GPU or ninja.

Build: ``$RNNKIT_CXX``, ``$CXX``, ``g++``, ``c++`` or ``clang++`` (the first found) with
``-O3 -march=$RNNKIT_MARCH -shared -fPIC`` (``RNNKIT_MARCH`` defaults to ``native``; a named
target such as ``x86-64-v3``, AVX2 without AVX-512, builds for a narrower CPU than this one), into ``$RNNKIT_CACHE_DIR`` (default ``~/.cache/rnnkit``, or the
temporary directory when that is not writable) under a name keyed by a hash of the source, the
flags, the compiler's version and the CPU, written to a temporary file and renamed into place so
concurrent processes never load a half-written library. ``RNNKIT_NO_COMPILE=1`` disables the
kernel. Any failure (no compiler, compile error, unloadable library) is recorded, never raised at
import: :func:`available` returns False, :func:`unavailable_reason` says why, and ``mode="auto"``
falls back to the PyTorch forms.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from rnnkit.ops._lazy import LazyResource

SOURCE = Path(__file__).with_name("_cpu_scan.cpp")
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17", "-pthread")
_MARCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.complex64: "c64", torch.complex128: "c128"}
ABI_VERSION = 4



def _compiler() -> str | None:
    for name in (os.environ.get("RNNKIT_CXX"), os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def target_arch() -> str:
    """The ``-march`` the kernel is built for: ``$RNNKIT_MARCH``, default ``native``.

    Raises:
        RuntimeError: the variable is not a plain target name (recorded as the reason the kernel is
            unavailable, like any other build failure).
    """
    march = os.environ.get("RNNKIT_MARCH", "").strip() or "native"
    if not _MARCH.fullmatch(march):
        raise RuntimeError(f"RNNKIT_MARCH: expected a -march target such as 'native' or 'x86-64-v3', got {march!r}")
    return march


def flag_sets() -> list[tuple[str, ...]]:
    """Compiler flags to try in order: with ``-march``, then (for ``native`` only, which some
    compilers do not know) without; an explicit target is never silently dropped."""
    march = target_arch()
    flags = (BASE_FLAGS[0], f"-march={march}", *BASE_FLAGS[1:])
    return [flags, BASE_FLAGS] if march == "native" else [flags]


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the machine and, on Linux, the CPU's feature flags."""
    sig = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    sig += line
    except OSError:
        pass
    return sig


def _cache_dir() -> Path:
    env = os.environ.get("RNNKIT_CACHE_DIR")
    candidates = [Path(env)] if env else []
    xdg = os.environ.get("XDG_CACHE_HOME")
    candidates.append(Path(xdg) / "rnnkit" if xdg else Path.home() / ".cache" / "rnnkit")
    candidates.append(Path(tempfile.gettempdir()) / f"rnnkit-{os.getuid() if hasattr(os, 'getuid') else 'user'}")
    for path in candidates:
        try:
            path.mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
        except OSError:
            continue
    raise OSError(f"no writable cache directory among {[str(p) for p in candidates]}")


def _run_compiler(cxx: str, flags: tuple[str, ...], out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [cxx, *flags, str(SOURCE), "-o", str(out)], capture_output=True, text=True, timeout=300
    )


def build() -> Path:
    """Compile the kernel (or find it in the cache) and return the shared library's path.

    Raises:
        RuntimeError: no compiler, or the compiler failed (its message included).
    """
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (tried $RNNKIT_CXX, $CXX, g++, c++, clang++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = SOURCE.read_bytes()
    cache = _cache_dir()
    errors = []
    for flags in flag_sets():
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(),
                                         _cpu_signature().encode()])).hexdigest()[:20]
        target = cache / f"rnnkit_scan_{key}.so"
        if target.exists():
            return target
        fd, tmp = tempfile.mkstemp(prefix=target.stem, suffix=".so.tmp", dir=cache)
        os.close(fd)
        try:
            proc = _run_compiler(cxx, flags, Path(tmp))
            if proc.returncode == 0:
                os.replace(tmp, target)  # atomic: other processes see no file or the whole file
                return target
            errors.append(f"{cxx} {' '.join(flags)}: {proc.stderr.strip()[-2000:]}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("compiling the fused scan kernel failed:\n" + "\n".join(errors))


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build()))
    if lib.rnnkit_scan_abi_version() != ABI_VERSION:
        raise RuntimeError(f"stale kernel library: ABI {lib.rnnkit_scan_abi_version()}, expected {ABI_VERSION}")
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in DTYPES.values():
        fwd = getattr(lib, f"rnnkit_scan_fwd_{suffix}")
        fwd.argtypes, fwd.restype = [p, p, p, p, i64, i64, i64, c_int], None
        bwd = getattr(lib, f"rnnkit_scan_bwd_{suffix}")
        bwd.argtypes, bwd.restype = [p, p, p, p, p, p, p, i64, i64, i64, c_int], None
    for suffix in ("f32", "f64"):
        rows = getattr(lib, f"rnnkit_row_pass_{suffix}")
        rows.argtypes = [i64, i64, i64, p, i64, i64, p, p, i64, p, p, p, p, p, i64, p, p, p, c_int, c_int]
        rows.restype = None
    lib.rnnkit_advise_huge_pages.argtypes, lib.rnnkit_advise_huge_pages.restype = [p, i64], None
    return lib


_LIBRARY = LazyResource(_load, "RNNKIT_NO_COMPILE")


def _library() -> ctypes.CDLL | None:
    return _LIBRARY.get()


def available() -> bool:
    """Whether the kernel is compiled and loaded (compiles it on the first call)."""
    return _LIBRARY.get() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return _LIBRARY.unavailable_reason()


def _reset_for_tests() -> None:
    """Forget the loaded library and any failure, so the next call re-reads the environment."""
    _LIBRARY.reset()


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _dims(x: torch.Tensor) -> tuple[int, int, int]:
    B, T, S = x.shape
    return B, T, S


#: Outputs at least this large are advised to use huge pages before their first write, and pooled.
HUGE_PAGE_MIN_BYTES = 8 << 20


def _storage_use_count(t: torch.Tensor) -> int | None:
    """References to ``t``'s storage (tensors, views, saved tensors, numpy/DLPack exports), or None."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    storage = t.untyped_storage()
    return count(storage._cdata) - 1  # minus the temporary `storage` object itself


class OutputPool:
    """Large kernel outputs (``h``; ``da``, ``db``), reused once nothing but the pool holds them.

    Why: a fresh output over ~32 MiB comes from ``mmap`` and page-faults on its first write, which
    costs as much as the scan itself (see ``docs/benchmarks.md``). A training loop asks for the same
    shapes every step, so the pool hands back a buffer whose storage nobody else references any more
    (every tensor, view, autograd saved tensor, numpy or DLPack export of it holds a reference; the
    pool's own buffer is the only one left). At most ``max_bytes`` are kept; the oldest free
    buffers are dropped first, and a request that does not fit is served fresh, unpooled.
    ``RNNKIT_SCAN_POOL_MB`` sets the cap (default 1024; 0 disables the pool).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.buffers: list[torch.Tensor] = []  # flat, oldest first
        self.lock = threading.Lock()

    def _free(self, buf: torch.Tensor) -> bool:
        return _storage_use_count(buf) == 1  # only self.buffers holds it

    def empty(self, shape: torch.Size, dtype: torch.dtype, lib: ctypes.CDLL | None) -> torch.Tensor:
        n = math.prod(shape)
        nbytes = n * dtype.itemsize
        if nbytes < HUGE_PAGE_MIN_BYTES or self.max_bytes <= 0 or _storage_use_count(torch.empty(0)) is None:
            return _fresh(shape, dtype, lib)
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
            out = _fresh((n,), dtype, lib)
            if held + nbytes <= self.max_bytes:
                self.buffers.append(out)
            return out.view(shape)

    def clear(self) -> None:
        with self.lock:
            self.buffers.clear()


def _fresh(shape, dtype: torch.dtype, lib: ctypes.CDLL | None) -> torch.Tensor:
    """A new contiguous tensor; large ones get huge pages (see ``rnnkit_advise_huge_pages``) when
    the library is loaded (``lib`` None: plain pages)."""
    out = torch.empty(shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if nbytes >= HUGE_PAGE_MIN_BYTES and lib is not None:
        lib.rnnkit_advise_huge_pages(out.data_ptr(), nbytes)
    return out


def _pool_bytes() -> int:
    try:
        return int(float(os.environ.get("RNNKIT_SCAN_POOL_MB", "1024")) * (1 << 20))
    except ValueError:
        return 1 << 30


POOL = OutputPool(_pool_bytes())


def _empty(like: torch.Tensor, lib: ctypes.CDLL) -> torch.Tensor:
    return POOL.empty(like.shape, like.dtype, lib)


def forward(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``h`` (B, T, S) from contiguous ``a``, ``b`` (B, T, S) and ``h0`` (B, S) or None.

    ``out``, when given, is a contiguous (B, T, S) tensor of the same dtype to write ``h`` into.
    """
    lib = _library()
    h = _empty(b, lib) if out is None else out
    fn = getattr(lib, f"rnnkit_scan_fwd_{DTYPES[a.dtype]}")
    fn(_ptr(a), _ptr(b), _ptr(h0), _ptr(h), *_dims(a), torch.get_num_threads())
    return h


def backward(a, h, h0, g_out, need_a: bool, need_h0: bool):
    """``(da, db, dh0)`` of the scan (None where not needed) from contiguous tensors."""
    lib = _library()
    db = _empty(g_out, lib)
    da = _empty(a, lib) if need_a else None
    dh0 = torch.empty_like(h0, memory_format=torch.contiguous_format) if need_h0 else None
    fn = getattr(lib, f"rnnkit_scan_bwd_{DTYPES[a.dtype]}")
    fn(_ptr(a), _ptr(h), _ptr(h0), _ptr(g_out), _ptr(da), _ptr(db), _ptr(dh0), *_dims(a), torch.get_num_threads())
    return da, db, dh0
