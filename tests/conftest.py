"""Test-wide settings."""

import os

import torch

# Each pytest-xdist worker is its own process: with torch's default of one thread per core, two
# workers on two cores oversubscribe the CPU and OpenMP barriers spin, slowing small ops ~100x.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
