"""The machine line every benchmark prints names the CPU, its instruction sets and torch's threads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnnkit.bench import machine

ROOT = Path(__file__).resolve().parents[2]


def test_describe_names_the_cpu_and_threads(monkeypatch):
    monkeypatch.setattr(machine, "_cpuinfo", lambda: ("Test CPU 9000", {"avx2", "fma", "avx512_bf16", "sse4_2"}))
    line = machine.describe()
    assert line.startswith("CPU: Test CPU 9000 (")
    assert "avx2 fma avx512_bf16" in line and "sse4_2" not in line
    assert f"{torch.get_num_threads()} threads" in line and torch.__version__ in line


def test_describe_without_cpuinfo(monkeypatch):
    monkeypatch.setattr(machine, "_cpuinfo", lambda: ("", set()))
    assert "no notable extensions" in machine.describe()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads /proc/cpuinfo")
def test_cpu_name_reads_this_machine():
    expected = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                    None)
    if expected is None:
        pytest.skip("this CPU's /proc/cpuinfo has no model name")
    assert machine.cpu_name() == expected


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")))
def test_every_benchmark_prints_the_machine(script):
    source = (ROOT / "benchmarks" / script).read_text()
    assert "print(describe())" in source, f"benchmarks/{script} does not print the machine it ran on"
