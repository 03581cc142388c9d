"""Choosing the training precision: fp32, or bf16 autocast where the device runs it fast."""

from __future__ import annotations

import torch

from rnnkit.errors import check_choice

PRECISIONS = ("fp32", "bf16")


def fast_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 autocast is a speed-up on ``device``: a CUDA device with bf16 support, or a CPU
    with AMX tiles or AVX512-BF16 (elsewhere oneDNN emulates bf16 and it is slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        hardware = any(probe() for probe in probes if probe is not None)
    except RuntimeError:  # a build without the CPU feature probes
        return False
    # The CPU may have the instructions while oneDNN is told not to use them (ONEDNN_MAX_CPU_ISA).
    return hardware and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``"auto"`` -> ``"bf16"`` where :func:`fast_bf16`, else ``"fp32"``; other values pass through."""
    check_choice("precision", precision, PRECISIONS + ("auto",))
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


def autocast(config) -> torch.autocast:
    """The autocast context of a training step under ``config.precision`` (a no-op for fp32)."""
    return torch.autocast(torch.device(config.device).type, dtype=torch.bfloat16, enabled=config.precision == "bf16")


__all__ = ["PRECISIONS", "autocast", "fast_bf16", "resolve_precision"]
