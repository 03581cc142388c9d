"""Fixtures for the layer tests."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Run each layer test on one intra-op thread, then restore the setting.

    The contract shapes are tiny, so threads buy nothing but OpenMP barrier overhead: a serial
    ``pytest tests/layers`` takes ~3x longer on two threads than on one. (Under ``pytest -n N``,
    ``tests/conftest.py`` already pins each worker to one thread.)
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
