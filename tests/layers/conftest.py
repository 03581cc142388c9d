"""Fixtures for the layer tests."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Run each layer test on one intra-op thread, then restore the setting.

    The contract shapes are tiny, so threads buy nothing; and under ``pytest -n N`` several workers
    each spinning up a full OpenMP pool oversubscribe the cores (seconds per call instead of ms).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
