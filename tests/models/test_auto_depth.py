"""Depth-dependent layer options set by the stacks: a layer with a ``depth`` option (hgrn2's forget-gate
floor, the RWKV layers' initialisation) gets its block's index / number of blocks unless it is given."""

from __future__ import annotations

import pytest
import torch

from rnnkit import InputError
from rnnkit.layers import build
from rnnkit.layers.pattern import expand_pattern, with_depth
from rnnkit.models import ModelConfig, SequenceModel

HGRN2 = {"num_heads": 2, "expand_ratio": 2}


def _depths(model: SequenceModel) -> list[float | None]:
    """Each block's layer's ``depth`` option (None for a layer without one); a bidirectional block's
    forward layer stands for both."""
    layers = [b.mixer for b in model.body.blocks] if model.config.block == "residual" else list(model.body.layers)
    layers = [getattr(layer, "forward_layer", layer) for layer in layers]
    return [getattr(layer.config, "depth", None) for layer in layers]


@pytest.mark.parametrize("block", ["residual", "stacked"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_depth_is_the_blocks_position(block, bidirectional):
    model = SequenceModel(vocab_size=5, d_model=8, block=block, layer="hgrn2", num_layers=4, layer_options=HGRN2,
                          bidirectional=bidirectional, head="classify", n_outputs=2)
    assert _depths(model) == [0.0, 0.25, 0.5, 0.75]


def test_the_position_changes_what_hgrn2_computes():
    """The deepest block of a model equals a standalone layer built with its position as depth."""
    torch.manual_seed(0)
    model = SequenceModel(vocab_size=5, d_model=8, block="residual", layer="hgrn2", num_layers=2, layer_options=HGRN2)
    deepest = model.body.blocks[1].mixer.double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    for depth, same in ((0.5, True), (0.0, False)):
        layer = build("hgrn2", d_model=8, depth=depth, **HGRN2).double()
        layer.load_state_dict(deepest.state_dict())
        assert torch.allclose(layer(x)[0], deepest(x)[0], atol=1e-12, rtol=0) == same


def test_given_depths_win_and_other_layers_are_left_alone():
    model = SequenceModel(vocab_size=5, d_model=8, block="residual", num_layers=6,
                          layer="gru,hgrn2:depth=0.1:num_heads=2:expand_ratio=2,rwkv7:num_heads=2:decay_rank=2")
    assert _depths(model) == [None, 0.1, 2 / 6, None, 0.1, 5 / 6]
    shared = SequenceModel(vocab_size=5, d_model=8, block="stacked", layer="hgrn2", num_layers=3,
                           layer_options={**HGRN2, "depth": 0.3})
    assert _depths(shared) == [0.3, 0.3, 0.3]
    assert with_depth(expand_pattern("elman", 2)) == [("elman", {}), ("elman", {})]


def test_auto_depth_off_and_configs_saved_before_it_keep_the_layers_default(tmp_path):
    fields = dict(vocab_size=5, d_model=8, block="residual", layer="hgrn2", num_layers=3, layer_options=HGRN2)
    assert _depths(SequenceModel(**fields, auto_depth=False)) == [0.0, 0.0, 0.0]
    assert _depths(SequenceModel(ModelConfig.from_dict(fields))) == [0.0, 0.0, 0.0]  # no auto_depth entry
    model = SequenceModel(**fields)
    model.save_pretrained(tmp_path)
    loaded = SequenceModel.from_pretrained(tmp_path)
    assert loaded.config.auto_depth is True and _depths(loaded) == [0.0, 1 / 3, 2 / 3]
    x = torch.randint(0, 5, (2, 6))
    torch.testing.assert_close(loaded(x)[0], model(x)[0], atol=0, rtol=0)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(auto_depth=1), "auto_depth: expected a bool, got 1"),
        (dict(layer_options={"auto_depth": False}), r"layer_options: expected only the layer's own options"),
    ],
)
def test_bad_auto_depth_is_a_clear_error(fields, match):
    with pytest.raises(InputError, match=match):
        ModelConfig(vocab_size=5, layer="hgrn2", **fields)
