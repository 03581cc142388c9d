"""The compiled CPU library (``_cpu_scan.cpp``): build, cache, load and its ABI, nothing else.

The library holds the fused linear scan (used by :mod:`rnnkit.ops.scan`), the chunk kernels'
fused row pass (:mod:`rnnkit.ops._rows`) and Mamba's fused selective scan
(:mod:`rnnkit.ops.selective_scan`). Why compiled loops: on a CPU the first two are memory-bound,
and every PyTorch form of them pays extra passes over memory; one C++ loop that reads its inputs
once and writes its output once runs at the speed of a copy (``benchmarks/scan_speed.py``). The
selective scan's PyTorch forms write a ``(B, T, E, N)`` tensor per step of the recurrence that the
compiled one keeps in registers (``benchmarks/mamba_speed.py``). The source
includes no torch headers, so it builds with the system compiler, without network, GPU or ninja.

Build: ``$RNNKIT_CXX``, ``$CXX``, ``g++``, ``c++`` or ``clang++`` (the first found) with
``-O3 -march=$RNNKIT_MARCH -shared -fPIC`` (``RNNKIT_MARCH`` defaults to ``native``; a named
target such as ``x86-64-v3``, AVX2 without AVX-512, builds for a narrower CPU than this one), into
``$RNNKIT_CACHE_DIR`` (default ``~/.cache/rnnkit``, or the temporary directory when that is not
writable) under a name keyed by a hash of the source, the flags, the compiler's version and the
CPU, written to a temporary file and renamed into place so concurrent processes never load a
half-written library. ``RNNKIT_NO_COMPILE=1`` disables it. Nothing is compiled at import, only
at the first :func:`library` call; any failure (no compiler, compile error, unloadable library) is
recorded, never raised: :func:`available` returns False, :func:`unavailable_reason` says why, and
the callers fall back to PyTorch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from rnnkit.errors import InputError, check_choice
from rnnkit.ops._lazy import LazyResource

SOURCE = Path(__file__).with_name("_cpu_scan.cpp")
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17", "-pthread")
_MARCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
#: dtypes with a scan symbol (``rnnkit_scan_{fwd,bwd}_<suffix>``), and their symbol suffixes.
SCAN_DTYPES = {torch.float32: "f32", torch.float64: "f64", torch.complex64: "c64", torch.complex128: "c128"}
#: dtypes with a row-pass symbol (``rnnkit_row_pass_<suffix>``).
ROW_DTYPES = {torch.float32: "f32", torch.float64: "f64"}
#: dtypes of the channels-last kernels: the selective scan (``rnnkit_selective_{fwd,bwd}_<suffix>``)
#: and the short convolution (``rnnkit_conv_{fwd,bwd}_<suffix>``), with ``rnnkit_lanes_<suffix>``,
#: their elements per vector.
CHANNELS_LAST_DTYPES = {torch.float32: "f32", torch.float64: "f64"}
ABI_VERSION = 6


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
    raise RuntimeError("compiling the rnnkit kernel library failed:\n" + "\n".join(errors))


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build()))
    if lib.rnnkit_scan_abi_version() != ABI_VERSION:
        raise RuntimeError(f"stale kernel library: ABI {lib.rnnkit_scan_abi_version()}, expected {ABI_VERSION}")
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in SCAN_DTYPES.values():
        fwd = getattr(lib, f"rnnkit_scan_fwd_{suffix}")
        fwd.argtypes, fwd.restype = [p, p, p, p, i64, i64, i64, c_int], None
        bwd = getattr(lib, f"rnnkit_scan_bwd_{suffix}")
        bwd.argtypes, bwd.restype = [p, p, p, p, p, p, p, i64, i64, i64, c_int], None
    for suffix in ROW_DTYPES.values():
        rows = getattr(lib, f"rnnkit_row_pass_{suffix}")
        rows.argtypes = [i64, i64, i64, p, i64, i64, p, p, i64, p, p, p, p, p, i64, p, p, p, c_int, c_int]
        rows.restype = None
    for suffix in CHANNELS_LAST_DTYPES.values():
        lanes = getattr(lib, f"rnnkit_lanes_{suffix}")
        lanes.argtypes, lanes.restype = [], c_int
        for name, pointers in (("selective_fwd", 15), ("selective_bwd", 23), ("conv_fwd", 6), ("conv_bwd", 10)):
            fn = getattr(lib, f"rnnkit_{name}_{suffix}")
            fn.argtypes, fn.restype = [p] * pointers + [c_int], None
        ceiling = getattr(lib, f"rnnkit_exp_fma_ceiling_{suffix}")
        ceiling.argtypes, ceiling.restype = [i64, c_int], ctypes.c_double
    return lib


_LIBRARY = LazyResource(_load, "RNNKIT_NO_COMPILE")


def library() -> ctypes.CDLL | None:
    """The loaded library (compiled on the first call), or None when it is unavailable."""
    return _LIBRARY.get()


def available() -> bool:
    """Whether the kernel is compiled and loaded (compiles it on the first call)."""
    return _LIBRARY.get() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return _LIBRARY.unavailable_reason()


def reset() -> None:
    """Forget the loaded library and any failure, so the next call re-reads the environment."""
    _LIBRARY.reset()


def lanes(dtype: torch.dtype) -> int:
    """Elements per vector of the channels-last kernels for ``dtype`` (in ``CHANNELS_LAST_DTYPES``)."""
    return getattr(library(), f"rnnkit_lanes_{CHANNELS_LAST_DTYPES[dtype]}")()


#: The channels-last kernels split each batch row's channels into ranges so that there are at least
#: this many (row, range) units, enough for every thread of a typical CPU even at batch size 1.
#: The split depends on the shape only, so their results do not depend on the number of threads.
MIN_UNITS = 16


def channel_parts(batch: int, channels: int, dtype: torch.dtype, partial_width: int = 0) -> int:
    """Channel ranges per batch row of a channels-last kernel (see :data:`MIN_UNITS`).

    ``partial_width``: the kernel keeps, per range, sums over its channels of this width per step
    (the selective scan's dB and dC, ``N``); the ranges are then capped so that those partial sums
    stay within a quarter of a ``(B, T, channels)`` tensor."""
    blocks = -(-channels // lanes(dtype))
    parts = min(blocks, -(-MIN_UNITS // batch))
    if partial_width:
        parts = min(parts, channels // (4 * partial_width))
    return max(1, parts)


def work_dtype(*tensors: torch.Tensor | None) -> tuple[torch.dtype, torch.dtype]:
    """The promoted dtype of ``tensors`` (None skipped) and the one a channels-last kernel computes
    it in: itself in ``CHANNELS_LAST_DTYPES``, else fp32 (bf16 and fp16 are computed in fp32)."""
    dtypes = [t.dtype for t in tensors if t is not None]
    dtype = dtypes[0]
    for other in dtypes[1:]:
        dtype = torch.promote_types(dtype, other)
    return dtype, dtype if dtype in CHANNELS_LAST_DTYPES else torch.float32


def resolve_fused(mode: str, modes: tuple[str, ...], device: torch.device, fallback: str) -> str:
    """The form an op entry with a compiled ``fused`` form runs ``mode`` as: ``auto`` is ``fused``
    on the CPU where the library is available (and not while ``torch.compile`` or ``torch.export``
    traces), else ``fallback``; ``fused`` is checked.

    Raises:
        InputError: ``mode`` is not in ``modes``, or ``fused`` off the CPU or without the library.
    """
    check_choice("mode", mode, modes)
    if mode == "auto":
        # torch.compile and torch.export cannot trace into a ctypes call: they get the PyTorch form.
        traceable = torch.compiler.is_compiling()
        return "fused" if device.type == "cpu" and available() and not traceable else fallback
    if mode == "fused":
        if device.type != "cpu":
            raise InputError(f"mode: 'fused' is a CPU kernel; expected CPU tensors, got {device} (use mode='auto')")
        if not available():
            raise InputError(f"mode: 'fused' expected the compiled CPU kernel, which is unavailable "
                             f"({unavailable_reason()}); use mode='auto' or {fallback!r}")
    return mode


def ptr(x: torch.Tensor | None) -> int | None:
    """``x``'s data address for a ``void*`` argument (None passes a null pointer)."""
    return None if x is None else x.data_ptr()
