"""Exported programs run like the eager model: ``forward`` and ``step`` (with the state carried over
several steps) as ``torch.export`` programs (loaded with ``torch.export.load``) and ONNX files (run
by onnxruntime), at the fp32 tolerance (1e-5); the manifest; ``rnnkit export`` end to end; clear
errors for what cannot be exported; and docs/layers.md's export table, derived here layer by layer.

Exporting is slow (tracing, ONNX conversion), so a default run exports two layers (an LSTM, whose
state is a tuple of named tuples, and S4D, a complex-valued SSM that steps in real arithmetic) and
the CLI's minGRU; ``-m slow`` exports every registered layer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import rnnkit
from rnnkit.cli import main
from rnnkit.errors import ExportError, InputError
from rnnkit.layers import flatten_state
from rnnkit.models import SequenceModel
from rnnkit.models.export import (
    FORMATS, MANIFEST_NAME, PROGRAMS, ExportedModel, describe_state, export_model, read_manifest, state_from_leaves,
)
from tests.helpers import assert_close
from tests.test_docs import readme_layer_column

ROOT = Path(__file__).resolve().parents[2]
ort = pytest.importorskip("onnxruntime")

SEQ_LEN = 6  # T of the exported forward programs
BATCH = 3  # the batch the programs run on: not the one they were traced with
STEPS = 4  # steps carried after the forward's final state
VOCAB = 7
DEFAULT_LAYERS = ("lstm", "s4d")


def model_for(name: str) -> SequenceModel:
    """A tiny token model around layer ``name`` (its first test configuration); the wrappers wrap
    a classic cell (``stacked``: two LSTM layers, ``bidirectional``: a GRU)."""
    torch.manual_seed(0)
    options = dict(next(iter(rnnkit.layers.spec(name).test_configs.values())))
    if name == "stacked":
        fields = dict(layer="lstm", num_layers=2, layer_options={"hidden_size": 4})
    elif name == "bidirectional":
        fields = dict(layer=options.pop("layer"), bidirectional=True, layer_options=options)
    else:
        fields = dict(layer=name, layer_options=options)
    return SequenceModel(vocab_size=VOCAB, d_model=8, **fields).eval()


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` (B, T) ids, ``lengths`` (B,) of a right-padded batch and ``tokens`` (STEPS, B) to step on."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (BATCH, SEQ_LEN), generator=gen)
    tokens = torch.randint(0, VOCAB, (STEPS, BATCH), generator=gen)
    return x, torch.tensor([SEQ_LEN, 4, 1]), tokens


# --------------------------------------------------------------------------------- runners
def pt2_runner(path: Path):
    """Run a ``.pt2`` program as a user without rnnkit would: ``torch.export.load(...).module()``."""
    program = torch.export.load(path).module()
    return lambda *args: [t.detach() for t in program(*args)]


def onnx_runner(path: Path):
    """Run an ONNX file with onnxruntime, feeding inputs by the names the manifest gives."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return lambda *args: [torch.from_numpy(o) for o in session.run(None, {n: a.numpy() for n, a in zip(names, args)})]


RUNNERS = {"pt2": pt2_runner, "onnx": onnx_runner}


def check_forward(model: SequenceModel, run, mode: str, what: str) -> list[torch.Tensor]:
    """The exported forward == the eager forward in the same mode (output and every state leaf)."""
    x, lengths, _ = inputs()
    with torch.no_grad():
        output, state = model(x, lengths=lengths, mode=mode)
    got = run(x, lengths)
    expected = [output, *flatten_state(state)]
    assert len(got) == len(expected), f"{what}: {len(got)} outputs, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(got, expected)):
        assert_close(a, e, what=f"{what} output {i}")
    return expected[1:]


def check_steps(model: SequenceModel, run, state: list[torch.Tensor], what: str) -> None:
    """``STEPS`` exported steps from ``state`` (the forward's final state), each fed the program's
    own previous state, == eager steps from the same state."""
    _, _, tokens = inputs()
    template = model.init_state(BATCH)
    tree, _ = describe_state(template)
    eager_state = state_from_leaves(tree, state)
    leaves = list(state)
    for t, token in enumerate(tokens):
        with torch.no_grad():
            logits, eager_state = model.step(token, eager_state)
        got = run(token, *leaves)
        expected = [logits, *flatten_state(eager_state)]
        assert len(got) == len(expected), f"{what}: {len(got)} outputs, expected {len(expected)}"
        for i, (a, e) in enumerate(zip(got, expected)):
            assert_close(a, e, what=f"{what} step {t} output {i}")
        leaves = got[1:]


# --------------------------------------------------------------------------------- per layer
def export_row(name: str, out_dir: Path) -> dict[str, str]:
    """Export layer ``name``'s model in every format and program, check each artefact against the
    eager model, and return its row of the docs table: ``yes``, the forward's mode, or ``no``."""
    model = model_for(name)
    row = {}
    for fmt in FORMATS:
        directory = out_dir / fmt
        manifest = {"artefacts": {}}
        try:
            manifest = export_model(model, directory, format=fmt, what="forward", seq_len=SEQ_LEN)
            mode = manifest["artefacts"][f"forward.{fmt}"]["mode"]
            row[f"forward {fmt}"] = mode
            final = check_forward(model, RUNNERS[fmt](directory / f"forward.{fmt}"), mode, f"{name} forward.{fmt}")
        except ExportError:
            row[f"forward {fmt}"] = "no"
            with torch.no_grad():
                final = flatten_state(model(inputs()[0], lengths=inputs()[1])[1])
        try:
            export_model(model, directory, format=fmt, what="step")
            row[f"step {fmt}"] = "yes"
            check_steps(model, RUNNERS[fmt](directory / f"step.{fmt}"), final, f"{name} step.{fmt}")
        except ExportError as error:
            assert not model.body.causal, f"{name}: a causal lm model must export step.{fmt}: {error}"
            row[f"step {fmt}"] = "no"
    return row


def docs_table() -> dict[str, dict[str, str]]:
    """``layer -> {column: cell}`` of the export table in docs/layers.md."""
    text = (ROOT / "docs" / "layers.md").read_text()
    lines = text[text.index("## Export"):].splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| layer |"))
    columns = [c.strip() for c in lines[header].strip("|").split("|")]
    rows = {}
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = dict(zip(columns[1:], cells[1:]))
    return rows


def readme_export_cell(row: dict[str, str]) -> str:
    """The README's one-cell summary of a docs row: the formats, and which programs if not both."""
    formats = [f for f in FORMATS if row[f"forward {f}"] != "no" or row[f"step {f}"] != "no"]
    programs = [p for p in PROGRAMS if all(row[f"{p} {f}"] != "no" for f in formats)]
    cell = ", ".join(formats) or "none"
    return cell if len(programs) == len(PROGRAMS) else f"{cell} ({' and '.join(programs)} only)"


LAYER_CASES = [
    pytest.param(name, marks=() if name in DEFAULT_LAYERS else pytest.mark.slow) for name in rnnkit.layers.names()
]


@pytest.mark.parametrize("name", LAYER_CASES)
def test_exported_programs_match_eager_and_the_docs_table(name: str, tmp_path: Path) -> None:
    row = export_row(name, tmp_path)
    documented = docs_table().get(name)
    assert documented == row, (
        f"docs/layers.md export row of {name!r}: documented {documented}, measured {row}; the row reads\n"
        f"| `{name}` | " + " | ".join(row[c] for c in docs_table_columns()) + " |"
    )
    assert readme_layer_column("export")[name] == readme_export_cell(row), f"README export cell of {name!r}"


def docs_table_columns() -> list[str]:
    return [f"{p} {f}" for p in ("step", "forward") for f in FORMATS]


def test_export_tables_list_every_layer_once() -> None:
    table = docs_table()
    assert sorted(table) == rnnkit.layers.names()
    assert all(list(cells) == docs_table_columns() for cells in table.values()), "docs/layers.md export columns"
    assert sorted(readme_layer_column("export")) == rnnkit.layers.names()


# --------------------------------------------------------------------------------- API
def test_manifest_describes_inputs_outputs_and_state(tmp_path: Path) -> None:
    model = model_for("lstm")
    manifest = model.export(tmp_path, what="step")
    assert manifest == read_manifest(tmp_path)
    assert sorted(manifest["artefacts"]) == ["step.pt2"] and not (tmp_path / "forward.pt2").exists()
    assert manifest["input"] == {"kind": "tokens", "vocab_size": VOCAB} and manifest["dtype"] == "float32"
    leaves = manifest["state"]["leaves"]
    assert [leaf["name"] for leaf in leaves] == ["state.0.h", "state.0.c"]
    assert leaves[0] == {"name": "state.0.h", "shape": ["B", 6], "dtype": "float32"}
    step = manifest["artefacts"]["step.pt2"]
    assert [i["name"] for i in step["inputs"]] == ["x_t", "state.0.h", "state.0.c"]
    assert [o["name"] for o in step["outputs"]] == ["logits", "next_state.0.h", "next_state.0.c"]
    assert step["outputs"][0]["shape"] == ["B", VOCAB]
    # The tree rebuilds rnnkit's layout: a tuple of one LSTMState(h, c).
    state = state_from_leaves(manifest["state"]["tree"], [torch.zeros(2, 6), torch.ones(2, 6)])
    assert type(state) is tuple and type(state[0]).__name__ == "LSTMState" and bool(state[0].c.all())
    with pytest.raises(InputError, match="expected 2 tensors for this state, got 1"):
        state_from_leaves(manifest["state"]["tree"], [torch.zeros(2, 6)])


def test_exported_model_runs_with_state_trees(tmp_path: Path) -> None:
    model = model_for("gru")
    model.export(tmp_path, what="both", seq_len=SEQ_LEN)
    exported = ExportedModel(tmp_path)
    x, lengths, tokens = inputs()
    with torch.no_grad():
        expected, state = model(x, lengths=lengths, mode=exported.manifest["artefacts"]["forward.pt2"]["mode"])
    output, carried = exported(x, lengths)
    assert_close(output, expected, what="forward")
    for token in tokens:
        with torch.no_grad():
            logits, state = model.step(token, state)
        got, carried = exported.step(token, carried)
        assert_close(got, logits, what="step logits")
        assert_close(carried[0], state[0], what="step state")
    zero = exported.init_state(2)
    assert zero[0].shape == (2, 6) and not bool(zero[0].any())


def test_hybrid_stack_exports_forward_and_step(tmp_path: Path) -> None:
    """A layer pattern's mixed state (a recurrence's tensor, attention's rotary cache) exports as one
    flat tuple of leaves, in the mode every block declares."""
    torch.manual_seed(0)
    model = SequenceModel(vocab_size=VOCAB, d_model=8, block="residual", num_layers=3,
                          layer="mingru,attention:window=3:num_heads=2").eval()
    manifest = export_model(model, tmp_path, format="pt2", what="both", seq_len=SEQ_LEN)
    mode = manifest["artefacts"]["forward.pt2"]["mode"]
    assert mode in model.body.modes and "fused" not in model.body.modes
    names = [leaf["name"] for leaf in manifest["state"]["leaves"]]
    assert names[0] == "state.0" and "state.1.k" in names and "state.1.position" in names and names[-1] == "state.2"
    final = check_forward(model, pt2_runner(tmp_path / "forward.pt2"), mode, "hybrid forward.pt2")
    check_steps(model, pt2_runner(tmp_path / "step.pt2"), final, "hybrid step.pt2")


def test_feature_input_classifier_exports_forward_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SequenceModel(d_input=3, d_model=8, layer="gru", head="classify", n_outputs=4, pooling="mean").eval()
    manifest = model.export(tmp_path, what="forward", seq_len=SEQ_LEN)
    artefact = manifest["artefacts"]["forward.pt2"]
    assert artefact["inputs"][0] == {"name": "x", "shape": ["B", SEQ_LEN, 3], "dtype": "float32"}
    assert artefact["outputs"][0] == {"name": "logits", "shape": ["B", 4], "dtype": "float32"}
    x, lengths = torch.randn(BATCH, SEQ_LEN, 3), torch.tensor([6, 2, 5])
    with torch.no_grad():
        expected, _ = model(x, lengths=lengths, mode=artefact["mode"])
    got = pt2_runner(tmp_path / "forward.pt2")(x, lengths)
    assert_close(got[0], expected, what="classifier logits")
    with pytest.raises(ExportError, match="what='step': expected a model with a per-step head"):
        model.export(tmp_path, what="step")


def test_unexportable_requests_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = model_for("gru")
    with pytest.raises(ExportError, match="what='step': expected a causal model, got layer 'lstm' with bidi"):
        model_for("bidirectional").export(tmp_path, what="step")
    with pytest.raises(InputError, match="seq_len: expected the sequence length T"):
        model.export(tmp_path, what="forward")
    with pytest.raises(InputError, match="format: expected one of \\['pt2', 'onnx'\\]"):
        model.export(tmp_path, format="tflite", what="step")
    with pytest.raises(InputError, match="what: expected one of"):
        model.export(tmp_path, what="backward")
    with pytest.raises(InputError, match="model: expected a SequenceModel"):
        export_model(torch.nn.Linear(2, 2), tmp_path, what="step")
    monkeypatch.setitem(__import__("sys").modules, "onnxscript", None)  # as if the export extra were missing
    with pytest.raises(ExportError, match="format 'onnx': expected the optional packages onnx and onnxscript"):
        model.export(tmp_path, format="onnx", what="step")
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_export_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    model = model_for("gru").train()
    flags = [p.requires_grad for p in model.parameters()]
    model.export(tmp_path, what="step")
    assert model.training and [p.requires_grad for p in model.parameters()] == flags


# --------------------------------------------------------------------------------- CLI
def test_cli_exports_a_trained_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, out = tmp_path / "run", tmp_path / "exported"
    train = ["train", "--task", "copy", "--task-opt", "n_symbols=2", "--task-opt", "delay=3", "--task-opt",
             "eval_examples=4", "--model", "mingru", "--d-model", "4", "--steps", "2", "--batch-size", "2",
             "--no-progress", "--out", str(run)]
    assert main(train) == 0
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--format", "both"]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert sorted(manifest["artefacts"]) == ["forward.onnx", "forward.pt2", "step.onnx", "step.pt2"]
    assert str(out / "step.onnx") in printed
    seq_len = 2 * 2 + 3 + 1  # the copy task's default length, which the run trained at
    assert manifest["artefacts"]["forward.pt2"]["seq_len"] == seq_len
    model = SequenceModel.from_pretrained(run).eval()
    x = torch.randint(0, 10, (BATCH, seq_len))
    lengths = torch.tensor([seq_len, 3, 1])
    for fmt in FORMATS:
        mode = manifest["artefacts"][f"forward.{fmt}"]["mode"]
        with torch.no_grad():
            expected, state = model(x, lengths=lengths, mode=mode)
        got = RUNNERS[fmt](out / f"forward.{fmt}")(x, lengths)
        assert_close(got[0], expected, what=f"cli forward.{fmt}")
        step = RUNNERS[fmt](out / f"step.{fmt}")
        leaves = got[1:]
        for token in torch.randint(0, 10, (STEPS, BATCH)):
            with torch.no_grad():
                logits, state = model.step(token, state)
            got_logits, *leaves = step(token, *leaves)
            assert_close(got_logits, logits, what=f"cli step.{fmt}")


def test_cli_export_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnkit export: error: --checkpoint: expected a directory written by `rnnkit train`"), err
    assert err.count("\n") == 1


def test_docs_name_the_export_command() -> None:
    """The README shows the command and the loading snippet that this file tests."""
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"rnnkit export --checkpoint \S+ --out \S+", readme)
    assert "torch.export.load" in readme and MANIFEST_NAME in readme
