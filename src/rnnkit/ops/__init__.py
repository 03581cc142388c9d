"""Pure tensor functions: sequence kernels and scans (no nn.Module)."""

from rnnkit.ops.scan import (
    SCAN_MODES,
    fused_available,
    linear_scan,
    linear_scan_log,
    linear_scan_recurrent,
)

__all__ = ["SCAN_MODES", "fused_available", "linear_scan", "linear_scan_log", "linear_scan_recurrent"]
