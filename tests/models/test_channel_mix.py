"""The RWKV channel mix as the residual blocks' MLP (rnnkit.models.channel_mix): its formula, the
token-shift state it adds to each block, lengths, save/load, configuration and the CLI. Step ==
forward, state carry and generation run in test_model.py and test_generate.py."""

from __future__ import annotations

import json

import pytest
import torch

from rnnkit import InputError
from rnnkit.cli import build_parser, main
from rnnkit.models import SequenceModel
from rnnkit.models.channel_mix import MLP_KINDS, ChannelMix
from rnnkit.models.model import BlockState

f64 = torch.float64
CHANNEL_MIXES = ["rwkv_channel_mix", "rwkv7_channel_mix"]


def _model(mlp: str, **fields) -> SequenceModel:
    torch.manual_seed(0)
    return SequenceModel(vocab_size=11, d_model=8, block="residual", layer="gru", num_layers=2, mlp=mlp,
                         mlp_ratio=1.5, **fields).double().eval()


@pytest.mark.parametrize("receptance", [True, False])
def test_channel_mix_computes_its_formula(receptance):
    """out_t = [sigmoid(W_r x^r_t) ⊙] W_v ReLU(W_k x^k_t)^2 with x^*_t = (1 - mu_*) x_t + mu_* x_{t-1}."""
    torch.manual_seed(0)
    D, hidden, T = 5, 7, 6
    mix = ChannelMix(D, hidden, receptance=receptance, depth=0.25).double()
    with torch.no_grad():
        for p in mix.parameters():
            p.normal_()  # mixes outside [0, 1] too: the formula holds for any value
    x, shift = torch.randn(2, T, D, dtype=f64), torch.randn(2, D, dtype=f64)
    out, last = mix(x, shift)
    for t in range(T):
        previous = shift if t == 0 else x[:, t - 1]
        xk = (1 - mix.mix_k) * x[:, t] + mix.mix_k * previous
        want = torch.relu(xk @ mix.key.weight.T) ** 2 @ mix.value.weight.T
        if receptance:
            xr = (1 - mix.mix_r) * x[:, t] + mix.mix_r * previous
            want = torch.sigmoid(xr @ mix.receptance.weight.T) * want
        torch.testing.assert_close(out[:, t], want, atol=1e-12, rtol=0)
        stepped, carried = mix.step(x[:, t], previous)
        torch.testing.assert_close(stepped, want, atol=1e-12, rtol=0)
        assert torch.equal(carried, x[:, t])
    assert torch.equal(last, x[:, -1])
    names = {name for name, _ in mix.named_parameters()}
    assert names == {"mix_k", "key.weight", "value.weight"} | ({"mix_r", "receptance.weight"} if receptance else set())


@pytest.mark.parametrize("receptance, exponent", [(True, 0.5), (False, 0.5**4)])
def test_mixes_start_as_the_authors_by_depth(receptance, exponent):
    D = 6
    mix = ChannelMix(D, 4, receptance=receptance, depth=0.5)
    want = 1 - (torch.arange(D, dtype=f64) / D) ** exponent
    torch.testing.assert_close(mix.mix_k.double(), want, atol=1e-7, rtol=0)
    if receptance:
        torch.testing.assert_close(mix.mix_r.double(), want, atol=1e-7, rtol=0)


@pytest.mark.parametrize("mlp", CHANNEL_MIXES)
def test_each_block_carries_the_mlps_last_input(mlp):
    model = _model(mlp)
    state = model.init_state(3)
    assert all(isinstance(block, BlockState) and block.mlp.shape == (3, 8) for block in state)
    assert model.state_size == _model("gelu").state_size + 2 * 8
    assert model.state_size_at(5) == model.state_size
    x = torch.randint(0, 11, (3, 7))
    with torch.no_grad():
        _, state = model(x[:, :3])
        carried, _ = model.step(x[:, 3], state)
        forgotten, _ = model.step(x[:, 3], tuple(block._replace(mlp=torch.zeros_like(block.mlp)) for block in state))
    assert (carried - forgotten).abs().max() > 1e-3  # the carried shift is read


@pytest.mark.parametrize("mlp", CHANNEL_MIXES)
def test_lengths_give_each_sequence_its_own_outputs_and_final_state(mlp):
    model = _model(mlp)
    x = torch.randint(0, 11, (3, 7))
    lengths = torch.tensor([7, 4, 1])
    with torch.no_grad():
        out, final = model(x, lengths=lengths)
        for b in range(3):
            L = int(lengths[b])
            alone, alone_final = model(x[b : b + 1, :L])
            torch.testing.assert_close(out[b : b + 1, :L], alone, atol=1e-10, rtol=0)
            for block, block_alone in zip(final, alone_final):
                torch.testing.assert_close(block.mlp[b : b + 1], block_alone.mlp, atol=1e-12, rtol=0)
                torch.testing.assert_close(block.mixer[b : b + 1], block_alone.mixer, atol=1e-12, rtol=0)


def test_save_and_load_keep_the_channel_mix(tmp_path):
    model = _model("rwkv7_channel_mix").float()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["mlp"] == "rwkv7_channel_mix"
    loaded = SequenceModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded.body.blocks[0].mlp, ChannelMix) and not loaded.body.blocks[0].mlp.has_receptance
    x = torch.randint(0, 11, (2, 6))
    torch.testing.assert_close(loaded(x)[0], model(x)[0], atol=0, rtol=0)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(block="residual", mlp="swiglu"), r"mlp: expected one of .*rwkv_channel_mix.*, got 'swiglu'"),
        (dict(block="stacked", mlp="rwkv_channel_mix"), "mlp: expected 'gelu' with block='stacked'"),
    ],
)
def test_bad_mlp_is_a_clear_error(fields, match):
    with pytest.raises(InputError, match=match):
        SequenceModel(vocab_size=5, d_model=4, layer="gru", **fields)


def test_cli_trains_with_a_channel_mix(tmp_path, capsys):
    choices = next(a.choices for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions
                   if a.dest == "mlp")
    assert list(choices) == list(MLP_KINDS)
    out = tmp_path / "run"
    argv = ["train", "--task", "adding", "--task-opt", "eval_examples=4", "--model", "gru", "--block", "residual",
            "--mlp", "rwkv_channel_mix", "--d-model", "4", "--steps", "2", "--batch-size", "2", "--seq-len", "6",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    assert SequenceModel.from_pretrained(out).config.mlp == "rwkv_channel_mix"
    assert main(argv[:-1] + [str(tmp_path / "stacked"), "--block", "stacked"]) == 2
    assert "mlp: expected 'gelu' with block='stacked'" in capsys.readouterr().err
