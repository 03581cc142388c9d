"""SequenceModel: step == forward, state carry, pooling with lengths, save/load."""

import json

import pytest
import torch

from rnnkit import InputError
from rnnkit.models import ModelConfig, SequenceModel

LM_CONFIGS = {
    "stacked-lstm2": dict(block="stacked", layer="lstm", num_layers=2),
    "stacked-gru-peep": dict(block="stacked", layer="lstm", layer_options={"peephole": True}),
    "residual-gru2": dict(block="residual", layer="gru", num_layers=2),
    "residual-elman-tied": dict(block="residual", layer="elman", tie_embeddings=True),
    # The RWKV channel mixes carry the previous step's MLP input in each block's state.
    "residual-rwkv6-channel-mix": dict(block="residual", layer="rwkv6", num_layers=2, mlp="rwkv_channel_mix",
                                       layer_options={"num_heads": 2, "mix_rank": 2, "decay_rank": 2}),
    "residual-gru-rwkv7-channel-mix": dict(block="residual", layer="gru", num_layers=2, mlp="rwkv7_channel_mix"),
}


def _lm(name: str) -> SequenceModel:
    torch.manual_seed(0)
    return SequenceModel(vocab_size=11, d_model=8, **LM_CONFIGS[name]).double().eval()


def check_step_and_carry(model: SequenceModel, x: torch.Tensor) -> torch.Tensor:
    """``step`` over ``x`` (B, T) equals ``forward``, and a forward split at T // 2 with the state carried
    equals the whole (fp64, 1e-10); returns the logits."""
    logits, _ = model(x)
    stepped, step_state = [], None
    for t in range(x.shape[1]):
        out, step_state = model.step(x[:, t], step_state)
        stepped.append(out)
    torch.testing.assert_close(torch.stack(stepped, 1), logits, atol=1e-10, rtol=0)
    split = x.shape[1] // 2
    first, mid = model(x[:, :split])
    second, _ = model(x[:, split:], mid)
    torch.testing.assert_close(torch.cat([first, second], 1), logits, atol=1e-10, rtol=0)
    return logits


@pytest.mark.parametrize("name", sorted(LM_CONFIGS))
def test_lm_step_matches_forward_and_state_carries(name):
    logits = check_step_and_carry(_lm(name), torch.randint(0, 11, (3, 9)))
    assert logits.shape == (3, 9, 11)


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("head", ["classify", "regress"])
def test_sequence_heads_respect_lengths(pooling, head):
    torch.manual_seed(0)
    model = SequenceModel(d_input=3, d_model=6, head=head, n_outputs=4, pooling=pooling, layer="gru").double().eval()
    x = torch.randn(3, 7, 3, dtype=torch.float64)
    lengths = torch.tensor([7, 4, 1])
    out, _ = model(x, lengths=lengths)
    assert out.shape == (3, 4)
    for b in range(3):
        alone, _ = model(x[b : b + 1, : lengths[b]])
        torch.testing.assert_close(out[b : b + 1], alone, atol=1e-10, rtol=0)
    padded = x.clone()
    padded[1, 4:] = float("nan")
    torch.testing.assert_close(model(padded, lengths=lengths)[0], out, atol=0, rtol=0)


def test_generate_is_reproducible_and_streams():
    model = _lm("stacked-lstm2").float()
    prompt = torch.randint(0, 11, (2, 5))
    a = model.generate(prompt, 12, temperature=0.9, top_k=5, seed=3)
    b = model.generate(prompt, 12, temperature=0.9, top_k=5, seed=3)
    assert a.shape == (2, 12) and torch.equal(a, b)
    streamed = torch.stack(list(model.stream(prompt, 12, temperature=0.9, top_k=5, seed=3)), 1)
    assert torch.equal(streamed, a)
    assert model.generate(prompt, 0, seed=3).shape == (2, 0)


def test_save_and_load_roundtrip(tmp_path):
    model = _lm("residual-elman-tied").float()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model"]["tie_embeddings"] is True
    loaded = SequenceModel.from_pretrained(tmp_path).eval()
    assert loaded.head.weight is loaded.embedding.weight  # still tied after loading
    x = torch.randint(0, 11, (2, 6))
    torch.testing.assert_close(loaded(x)[0], model(x)[0], atol=0, rtol=0)


def test_load_rejects_corrupted_and_mismatched_files(tmp_path):
    model = _lm("stacked-lstm2").float()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(InputError, match="safetensors"):
        SequenceModel.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"]["d_model"] = 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="expected shape"):
        SequenceModel.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(vocab_size=None, d_input=None), "exactly one"),
        (dict(vocab_size=5, block="tower"), "block"),
        (dict(vocab_size=5, layer="nope"), "layer"),
        (dict(vocab_size=5, head="classify"), "n_outputs"),
        (dict(vocab_size=5, layer_options={"num_layers": 2}), "layer_options"),
        (dict(d_input=3, tie_embeddings=True, n_outputs=3), "tie_embeddings"),
    ],
)
def test_bad_config_is_a_clear_error(fields, match):
    with pytest.raises(InputError, match=match):
        ModelConfig(**fields)


def test_bad_inputs_are_clear_errors():
    model = _lm("stacked-lstm2")
    with pytest.raises(InputError, match="token ids"):
        model(torch.randn(2, 3))
    with pytest.raises(InputError, match=r"\[0, 11\)"):
        model(torch.tensor([[0, 11]]))
    with pytest.raises(InputError, match="lengths"):
        model(torch.zeros(2, 3, dtype=torch.long), lengths=[3, 4])


def test_residual_step_checks_the_blocks_states_once_and_for_every_batch_size() -> None:
    # Blocks step their mixers without re-checking (the stack's check covers them): a bad mixer
    # state must still be reported, and the cached expected state must follow the batch size.
    model = SequenceModel(vocab_size=11, d_model=8, block="residual", layer="lstm", num_layers=2).eval()
    for batch in (2, 3, 2):
        _, state = model.step(torch.zeros(batch, dtype=torch.long))
        _, state = model.step(torch.ones(batch, dtype=torch.long), state)
    bad = (state[0], state[1]._replace(c=state[1].c[:, :-1]))
    with pytest.raises(InputError, match=r"state\[1\]\.c: expected shape \(2, 8\)"):
        model.step(torch.ones(2, dtype=torch.long), bad)
