"""Pure tensor functions: sequence kernels and scans (no nn.Module)."""
