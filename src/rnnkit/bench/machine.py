"""The machine a measurement ran on, in one line, for every benchmark's header.

Speed depends on the CPU's model and instruction set (AVX-512 and bf16 matmul support change which
kernels PyTorch and oneDNN pick), so every printed timing names them next to torch's version and
thread count.
"""

from __future__ import annotations

import os
import platform

import torch

#: Instruction-set extensions that change which kernels run, as /proc/cpuinfo names them.
NOTABLE_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def _cpuinfo() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags from /proc/cpuinfo ("" and none elsewhere)."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return name, flags


def cpu_name() -> str:
    """The CPU's model name, or the platform's processor string where /proc/cpuinfo is absent."""
    return _cpuinfo()[0] or platform.processor() or platform.machine()


def describe() -> str:
    """One line: CPU model, logical CPUs, notable instruction sets, the instruction set PyTorch's own
    kernels were capped at (``ATEN_CPU_CAPABILITY``), torch version and its thread count.

    Example:
        >>> print(describe())  # doctest: +SKIP
        CPU: AMD EPYC (x86_64, 2 logical CPUs; avx2 fma avx512f avx512_bf16); torch 2.13.0+cpu kernels AVX512, 2 threads
    """
    name, flags = _cpuinfo()
    notable = " ".join(f for f in NOTABLE_FLAGS if f in flags) or "no notable extensions"
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "unknown"
    return (f"CPU: {name or cpu_name()} ({platform.machine()}, {os.cpu_count()} logical CPUs; {notable}); "
            f"torch {torch.__version__} kernels {capability}, {torch.get_num_threads()} threads")


__all__ = ["NOTABLE_FLAGS", "cpu_name", "describe"]
