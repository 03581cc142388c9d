"""``torch.compile`` runs every registered layer in every mode as eager does.

For each layer (its first test configuration) and mode, a compiled layer and the eager one compute
the outputs and final state of a batch from a random initial state, and the gradients of a loss
touching both with respect to the input, the initial state and every parameter; they must agree at
the fp32 tolerances (tests/helpers.py). A default run compiles with the ``aot_eager`` backend:
dynamo's graphs and AOTAutograd's forward and backward graphs, run by eager kernels, which is where
a compile breaks, without generating code. ``-m slow`` compiles with ``inductor`` (generated C++,
a few seconds per graph on a CPU), on a right-padded batch.

The default run also counts each compile's graph breaks, and the modes that break must be the ones
docs/layers.md lists ("Graph breaks"), so that the documentation follows the code. It calls without
``lengths``: validating them reads their values, one more break in every layer and mode.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo

import rnnkit
from rnnkit.layers import flatten_state, map_state
from tests.helpers import assert_close

ROOT = Path(__file__).resolve().parents[2]
B, T, D = 2, 10, 8
#: The reference loop unrolls into one graph node per step and breaks nowhere: a few steps test it.
T_RECURRENT = 3
CHUNK = 4  # chunk_size (and block size) where a layer takes one: several chunks in T steps, so the carry runs


def make_layer(name: str) -> rnnkit.layers.Recurrence:
    config = dict(next(iter(rnnkit.layers.spec(name).test_configs.values())))
    for option in ("chunk_size", "log_block_size"):
        if option in config:
            config[option] = CHUNK
    torch.manual_seed(0)
    return rnnkit.layers.build(name, d_model=D, **config).eval()


def run(layer, call, mode: str, padded: bool) -> list[torch.Tensor]:
    """Outputs, final state and the gradients (input, initial state, parameters) of one call."""
    gen = torch.Generator().manual_seed(1)
    steps = T_RECURRENT if mode == "recurrent" else T
    lengths = (steps, steps - 1) if padded else None
    x = torch.randn(B, steps, D, generator=gen).requires_grad_()
    state = map_state(lambda t: torch.randn(t.shape, generator=gen).requires_grad_(), layer.init_state(B))
    layer.zero_grad(set_to_none=True)
    y, final = call(x, state, lengths=None if lengths is None else torch.tensor(lengths), mode=mode)
    outputs = [y, *flatten_state(final)]
    weights = [torch.randn(o.shape, generator=gen) for o in outputs]
    sum((o * w).sum() for o, w in zip(outputs, weights)).backward()
    # No gradient (an input the loss does not reach) is a zero one: the compiled backward may give zeros.
    inputs = [x, *flatten_state(state), *layer.parameters()]
    return [o.detach() for o in outputs] + [torch.zeros_like(t) if t.grad is None else t.grad for t in inputs]


def compile_and_compare(name: str, mode: str, backend: str, padded: bool = False) -> int:
    """Compare compiled with eager; return the number of graph breaks the compile took."""
    layer = make_layer(name)
    if mode not in layer.modes:
        pytest.skip(f"{name}: mode {mode!r} is unavailable here (no compiled kernel)")
    expected = run(layer, layer, mode, padded)
    torch._dynamo.reset()  # each case compiles afresh, never against another case's cache limit
    torch._dynamo.utils.counters.clear()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    actual = run(layer, torch.compile(layer, backend=counting), mode, padded)
    assert graphs, f"{name}/{mode}: torch.compile captured no graph (it ran everything eagerly)"
    n_out = 1 + len(flatten_state(layer.init_state(1)))
    for i, (a, e) in enumerate(zip(actual, expected)):
        kind = "value" if i < n_out else "grad"
        assert_close(a, e, kind=kind, what=f"{name}/{mode} ({backend}) {'output' if i < n_out else 'gradient'} {i}")
    return sum(torch._dynamo.utils.counters["graph_break"].values())


def documented_breaks() -> dict[str, set[str]]:
    """``layer -> modes that graph-break`` from docs/layers.md's "Graph breaks" table."""
    text = (ROOT / "docs" / "layers.md").read_text()
    section = text[text.index("### Graph breaks"):]
    rows = {}
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 2:
            rows[cells[0].strip("`")] = {m.strip() for m in cells[1].split(",") if m.strip() not in ("", "none")}
    return rows


CASES = [(name, mode) for name in rnnkit.layers.names() for mode in rnnkit.layers.spec(name).modes]


@pytest.mark.parametrize("name, mode", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_compiled_layer_matches_eager(name: str, mode: str) -> None:
    breaks = compile_and_compare(name, mode, "aot_eager")
    documented = documented_breaks()
    assert name in documented, f"docs/layers.md: no graph-break row for {name!r}"
    assert (mode in documented[name]) == (breaks > 0), (
        f"{name}/{mode}: {breaks} graph breaks, but docs/layers.md lists {sorted(documented[name]) or 'none'}; "
        f"reasons: {dict(torch._dynamo.utils.counters['graph_break'])}"
    )


@pytest.mark.slow
@pytest.mark.parametrize("name, mode", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_inductor_compiled_layer_matches_eager(name: str, mode: str) -> None:
    compile_and_compare(name, mode, "inductor", padded=True)


def test_graph_break_table_lists_every_layer() -> None:
    assert sorted(documented_breaks()) == rnnkit.layers.names()
    unknown = {n: m - set(rnnkit.layers.spec(n).modes) for n, m in documented_breaks().items()}
    assert not any(unknown.values()), f"docs/layers.md lists modes a layer does not have: {unknown}"
