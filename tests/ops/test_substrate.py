"""The substrate under the kernels: the import rule between ops modules, the native library loaded
only by the kernels that use it, and the workspace pool's configuration."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rnnkit.errors import InputError
from rnnkit.ops import _native, _workspace
from rnnkit.ops.gated_linear_attention import gated_linear_attention

OPS = Path(__file__).resolve().parents[2] / "src" / "rnnkit" / "ops"
#: Modules that exist to serve their siblings (public names only cross between modules).
SUBSTRATE = {"_native", "_workspace", "_chunk_math", "_forms", "_lazy", "_rows", "_blas", "padding"}


def private_imports(source: str, filename: str = "<ops module>") -> list[str]:
    """Where ``source`` reaches a private (underscore) name of a sibling ops module, or imports a
    private sibling module that is not part of the substrate."""
    tree = ast.parse(source, filename)
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative import: a sibling
                module = "rnnkit.ops." + module if module else "rnnkit.ops"
            if module == "rnnkit.ops":
                for alias in node.names:
                    if alias.name.startswith("_") and alias.name not in SUBSTRATE:
                        found.append(f"{filename}:{node.lineno}: imports module {alias.name}")
                    modules.add(alias.asname or alias.name)
            elif module.startswith("rnnkit.ops."):
                for alias in node.names:
                    if alias.name.startswith("_"):
                        found.append(f"{filename}:{node.lineno}: imports {module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("rnnkit.ops.") and alias.asname:
                    modules.add(alias.asname)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_")):
            found.append(f"{filename}:{node.lineno}: uses {node.value.id}.{node.attr}")
    return found


def test_ops_modules_use_only_public_names_of_their_siblings():
    sources = sorted(OPS.glob("*.py"))
    assert len(sources) > 10, sources
    found = [hit for path in sources for hit in private_imports(path.read_text(), path.name)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source", [
    "from rnnkit.ops.gated_linear_attention import _mm",
    "from .delta_rule import _check_inputs",
    "from rnnkit.ops import _cpu_scan",
    "from rnnkit.ops import _native\nx = _native._LIBRARY",
    "import rnnkit.ops.scan as s\ns._forms('chunk', 4)",
])
def test_import_rule_catches_private_names(source):
    assert private_imports(source)


def test_import_rule_allows_public_substrate_names():
    assert not private_imports("from rnnkit.ops import _native\nfrom rnnkit.ops._chunk_math import mm\n_native.ptr(None)")


def test_gla_does_not_build_the_native_library(monkeypatch, tmp_path):
    """The chunk GLA kernel uses no compiled code: running it (forward and backward, both decay
    kinds) must not compile or load the library."""
    monkeypatch.setenv("RNNKIT_CACHE_DIR", str(tmp_path))
    builds = []
    monkeypatch.setattr(_native, "build", lambda: builds.append(1) or (_ for _ in ()).throw(RuntimeError("no")))
    _native.reset()
    try:
        for per_dim in (False, True):
            q, k, v = (torch.randn(2, 2, 40, 4, requires_grad=True) for _ in range(3))
            g = torch.nn.functional.logsigmoid(torch.randn(2, 2, 40, *((4,) if per_dim else ())))
            y, S = gated_linear_attention(q, k, v, g, mode="chunk", chunk_size=16)
            (y.sum() + S.sum()).backward()
        assert builds == []
    finally:
        _native.reset()


@pytest.fixture
def fresh_pool(monkeypatch):
    """A pool that reads its cap from the environment at its first request."""
    pool = _workspace.BufferPool()
    monkeypatch.setattr(_workspace, "POOL", pool)
    return pool


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf", "4GB"])
def test_malformed_pool_size_names_the_variable(monkeypatch, fresh_pool, value):
    monkeypatch.setenv("RNNKIT_CHUNK_POOL_MB", value)
    q, k, v = (torch.randn(1, 1, 8, 2) for _ in range(3))
    with pytest.raises(InputError, match=rf"RNNKIT_CHUNK_POOL_MB: expected a non-negative number.*got {value!r}"):
        gated_linear_attention(q, k, v, torch.zeros(1, 1, 8), mode="chunk", chunk_size=4)


def test_pool_size_is_the_sum_of_its_variables(monkeypatch, fresh_pool):
    monkeypatch.setenv("RNNKIT_SCAN_POOL_MB", "0.5")
    monkeypatch.setenv("RNNKIT_CHUNK_POOL_MB", " 2 ")
    assert _workspace.pool_bytes() == int(2.5 * (1 << 20))
    monkeypatch.delenv("RNNKIT_SCAN_POOL_MB")
    monkeypatch.delenv("RNNKIT_CHUNK_POOL_MB")
    assert _workspace.pool_bytes() == (1024 + 4096) << 20
    fresh_pool.empty(torch.Size((4,)), torch.float32)
    assert fresh_pool.max_bytes == (1024 + 4096) << 20


def test_malformed_pool_size_does_not_break_import():
    env = dict(os.environ, RNNKIT_SCAN_POOL_MB="abc", RNNKIT_CHUNK_POOL_MB="abc")
    proc = subprocess.run([sys.executable, "-c", "import rnnkit.ops, rnnkit.layers"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
