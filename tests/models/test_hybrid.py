"""Hybrid stacks: layer patterns (rnnkit.layers.pattern) in SequenceModel, the CLI and the bench grid.

A pattern is cycled to the depth; the model's state is the tuple of its blocks' states of different
kinds, and everything that works for one layer type (step, state carry, generate, state sizes,
save/load, bench cells) works for the mix. Resume is covered by the ``parity-hybrid`` run of
``tests/train/resume_utils.py``; export by ``tests/models/test_export.py``.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from rnnkit import InputError, layers
from rnnkit.layers.pattern import expand_pattern, format_pattern, parse_pattern
from rnnkit.models import ModelConfig, SequenceModel
from tests.models.test_model import check_step_and_carry

GRIFFIN = "rglru,rglru,attention:window=4:num_heads=2"
HYBRIDS = {
    "griffin-residual": dict(block="residual", layer=GRIFFIN, num_layers=6),
    "jamba-residual": dict(block="residual", layer="mamba*3,attention:num_heads=2:max_len=32", num_layers=4),
    "xlstm-list": dict(block="residual", layer=[{"layer": "mlstm", "num_heads": 2}, "gru"], num_layers=3),
    "titans-mal": dict(block="residual", layer="titans:num_heads=2:mini_batch_size=3,attention:window=4:num_heads=2",
                       num_layers=4),
    "stacked-widths": dict(block="stacked", layer="lstm:hidden_size=5,gru,attention:window=3:num_heads=1",
                           num_layers=3),
}


def _lm(name: str, dtype=torch.float64) -> SequenceModel:
    torch.manual_seed(0)
    return SequenceModel(vocab_size=11, d_model=8, **HYBRIDS[name]).to(dtype).eval()


def _layer_names(model: SequenceModel) -> list[str]:
    if model.config.block == "stacked":
        return [layer.name for layer in model.body.layers]
    return [block.mixer.name for block in model.body.blocks]


# --------------------------------------------------------------------------------- parsing
def test_pattern_strings_lists_and_repeats():
    assert parse_pattern("lstm") == [("lstm", {})]
    assert parse_pattern("rglru*2,attention:window=1024") == parse_pattern(
        ["rglru", "rglru", {"layer": "attention", "window": 1024}]
    ) == [("rglru", {}), ("rglru", {}), ("attention", {"window": 1024})]
    assert parse_pattern("mamba+attention:rope=False") == [("mamba", {}), ("attention", {"rope": False})]
    names = [n for n, _ in expand_pattern("mlstm*7,gru", 16)]
    assert names == (["mlstm"] * 7 + ["gru"]) * 2
    assert [n for n, _ in expand_pattern("gru,lstm", 3)] == ["gru", "lstm", "gru"]  # a cut-off cycle
    # shared options under each entry's own, which win
    assert expand_pattern("gru,gru:hidden_size=3", 2, {"hidden_size": 4, "bias": False}) == [
        ("gru", {"hidden_size": 4, "bias": False}), ("gru", {"hidden_size": 3, "bias": False})]
    assert format_pattern(["rglru", "rglru", {"layer": "attention", "window": 8}]) == "rglru*2,attention:window=8"
    assert format_pattern("gru,gru,lstm", separator="+") == "gru*2+lstm"
    assert parse_pattern(format_pattern(GRIFFIN)) == parse_pattern(GRIFFIN)


@pytest.mark.parametrize(
    "pattern, match",
    [
        ("rglru,nope", "nope"),
        ("", "layer name"),
        ("gru,,lstm", "layer name"),
        ("gru*0", "repeat count"),
        ("attention:window", "name:key=value"),
        ([], "at least one"),
        ([{"window": 3}], "dicts with a 'layer'"),
        (3, "pattern string"),
    ],
)
def test_bad_patterns_are_clear_errors(pattern, match):
    with pytest.raises(InputError, match=match):
        parse_pattern(pattern)
    with pytest.raises(InputError, match=match):
        ModelConfig(vocab_size=5, layer=pattern)


def test_pattern_entries_may_not_set_the_stacks_fields():
    with pytest.raises(InputError, match="entry 1"):
        ModelConfig(vocab_size=5, layer="gru,lstm:num_layers=2")
    with pytest.raises(InputError, match="hidden_sizes"):  # an option the layer does not have
        SequenceModel(vocab_size=5, layer="gru,lstm:hidden_sizes=2", num_layers=2)


# --------------------------------------------------------------------------------- models
@pytest.mark.parametrize("name", sorted(HYBRIDS))
def test_hybrid_step_matches_forward_and_state_carries(name):
    model = _lm(name)
    x = torch.randint(0, 11, (3, 9))
    logits = check_step_and_carry(model, x)
    # every mode the stack declares computes the same function
    for mode in model.body.modes:
        torch.testing.assert_close(model(x, mode=mode)[0], logits, atol=1e-8, rtol=0)


def test_griffin_blocks_modes_and_state_sizes():
    model = _lm("griffin-residual")
    assert _layer_names(model) == ["rglru", "rglru", "attention"] * 2
    mixers = [block.mixer for block in model.body.blocks]
    assert model.body.modes == tuple(m for m in mixers[0].modes if m in mixers[2].modes)
    assert "fused" not in model.body.modes and model.body.modes[0] == "recurrent"
    assert model.state_size == sum(m.state_size for m in mixers) == model.body.state_size
    assert model.state_size == sum(t.numel() for t in layers.flatten_state(model.init_state(1)))
    # the attention blocks' KV caches fill up to their window; the recurrences' states do not grow
    recurrent = sum(m.state_size for m in mixers if m.name == "rglru")
    assert model.state_size_at(0) == recurrent + sum(m.state_size_at(0) for m in mixers if m.name == "attention")
    assert model.state_size_at(1) < model.state_size_at(3) == model.state_size_at(10**6) == model.state_size
    state = model.init_state(2)
    assert isinstance(state, tuple) and len(state) == 6 and isinstance(state[2], tuple) and state[2]._fields


def test_stacked_hybrid_chains_widths():
    model = _lm("stacked-widths")
    assert _layer_names(model) == ["lstm", "gru", "attention"]
    assert [layer.d_output for layer in model.body.layers] == [5, 5, 5]
    assert model.body.modes == ("recurrent",)


def test_hybrid_generates_with_constant_state():
    model = _lm("jamba-residual", torch.float32)
    assert _layer_names(model) == ["mamba", "mamba", "mamba", "attention"]
    prompt = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    a = model.generate(prompt, 7, top_k=3, seed=1)
    assert a.shape == (2, 7) and torch.equal(a, model.generate(prompt, 7, top_k=3, seed=1))


@pytest.mark.parametrize("name", ["griffin-residual", "xlstm-list"])
def test_hybrid_save_load_roundtrip(name, tmp_path):
    model = _lm(name, torch.float32)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["model"]["layer"]
    assert saved == HYBRIDS[name]["layer"]
    loaded = SequenceModel.from_pretrained(tmp_path).eval()
    assert _layer_names(loaded) == _layer_names(model)
    x = torch.randint(0, 11, (2, 6))
    torch.testing.assert_close(loaded(x)[0], model(x)[0], atol=0, rtol=0)


def test_configs_saved_before_patterns_still_load(tmp_path):
    """A config.json with a plain layer name (as every config before layer patterns) loads unchanged."""
    model = SequenceModel(vocab_size=7, d_model=4, layer="gru", num_layers=2)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["layer"] == "gru"
    loaded = SequenceModel.from_pretrained(tmp_path)
    assert [layer.name for layer in loaded.body.layers] == ["gru", "gru"]


def test_bench_grid_runs_a_hybrid_cell():
    from rnnkit.bench.grid import BUDGETS, build_cells, run_cell

    cells = build_cells(["gru+attention:window=4:num_heads=2", "mingru*2+attention:num_heads=2"], ["parity"], "small", 1)
    assert [c.model for c in cells] == ["gru+attention:num_heads=2:window=4", "mingru*2+attention:num_heads=2"]
    with pytest.raises(InputError, match="nope"):
        build_cells(["gru+nope"], ["parity"], "small", 1)
    with pytest.raises(InputError, match="num_heads"):
        build_cells(["gru+attention:num_heads=3"], ["parity"], "small", 1)  # 3 does not divide the width
    tiny = dataclasses.replace(BUDGETS["small"], name="tiny", steps=2, warmup=1, eval_examples=8, max_seconds=60.0)
    row = run_cell(dataclasses.replace(cells[0], budget=tiny, d_model=4))
    assert row["status"] == "ok", row
    assert row["layer"] == "gru+attention:num_heads=2:window=4" and row["layer_options"] == {}
    assert row["state_size"] > 0
