"""Generation: prefill-then-step equals a full forward, ragged prompt batches equal prompts run alone,
top-k / top-p / seed semantics, streaming, and clear errors."""

from __future__ import annotations

import pytest
import torch

from rnnkit import InputError
from rnnkit.models import SequenceModel

CONFIGS = {
    "stacked-lstm2": dict(block="stacked", layer="lstm", num_layers=2),
    "stacked-gru": dict(block="stacked", layer="gru"),
    "residual-elman": dict(block="residual", layer="elman", num_layers=2),
    "residual-gru-channel-mix": dict(block="residual", layer="gru", num_layers=2, mlp="rwkv_channel_mix"),
}


def _lm(name, dtype=torch.float64):
    torch.manual_seed(0)
    return SequenceModel(vocab_size=13, d_model=8, **CONFIGS[name]).to(dtype).eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_then_step_equals_a_full_forward_for_ragged_prompts(name):
    model = _lm(name)
    lengths = torch.tensor([5, 1, 3])
    full = torch.randint(0, 13, (3, 9))  # prompt (up to 5) followed by continuation tokens
    with torch.no_grad():
        for b in range(3):
            L = int(lengths[b])
            prompt = full[b : b + 1, :5].clone()
            prompt[:, L:] = 7  # padding content must not matter
            logits, state = model(prompt, lengths=lengths[b : b + 1])
            stepped = [logits[:, L - 1]]
            for t in range(L, 9):
                out, state = model.step(full[b : b + 1, t], state)
                stepped.append(out)
            reference, _ = model(full[b : b + 1])
            torch.testing.assert_close(torch.cat(stepped), reference[0, L - 1 :], atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ragged_batch_generation_equals_each_prompt_alone(name):
    model = _lm(name)
    prompts = [torch.tensor([1, 2, 3, 4, 5]), torch.tensor([6]), [7, 8, 9]]
    batched = model.generate(prompts, 6, top_k=1)  # greedy: independent of the sampler's stream
    assert batched.shape == (3, 6)
    for b, prompt in enumerate(prompts):
        alone = model.generate(torch.as_tensor(prompt)[None], 6, top_k=1)
        assert torch.equal(batched[b : b + 1], alone)
    # Greedy continuation == argmax of a full forward over the growing sequence.
    seq = torch.tensor([[1, 2, 3, 4, 5]])
    for t in range(6):
        nxt = model(seq)[0][:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(seq[0, 5:], batched[0])
    # The same prompts as a padded tensor with prompt_lengths.
    padded = torch.tensor([[1, 2, 3, 4, 5], [6, 0, 0, 0, 0], [7, 8, 9, 0, 0]])
    assert torch.equal(model.generate(padded, 6, top_k=1, prompt_lengths=[5, 1, 3]), batched)


def test_top_p_seed_and_streaming():
    model = _lm("stacked-lstm2", torch.float32)
    prompt = torch.randint(0, 13, (4, 3))
    greedy = model.generate(prompt, 8, top_k=1)
    assert torch.equal(model.generate(prompt, 8, top_p=1e-6, seed=1), greedy)  # the nucleus is the top token
    assert torch.equal(model.generate(prompt, 8, top_p=1.0, seed=5), model.generate(prompt, 8, seed=5))
    a = model.generate(prompt, 8, temperature=1.5, top_p=0.8, seed=3)
    assert torch.equal(a, model.generate(prompt, 8, temperature=1.5, top_p=0.8, seed=3))
    streamed = torch.stack(list(model.stream(prompt, 8, temperature=1.5, top_p=0.8, seed=3)), 1)
    assert torch.equal(streamed, a)
    rng = torch.get_rng_state()
    model.generate(prompt, 3)  # seed=None must not touch the global RNG
    assert torch.equal(rng, torch.get_rng_state())


def test_top_p_keeps_exactly_the_nucleus():
    from rnnkit.models.model import sample_token

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    seen = {int(sample_token(logits, 1.0, None, 0.75, gen)) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
    seen = {int(sample_token(logits, 1.0, None, 0.81, gen)) for _ in range(300)}
    assert seen == {0, 1, 2}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=[], max_new_tokens=2), "non-empty list"),
        (dict(prompt=[[1, 2], []], max_new_tokens=2), r"prompt\[1\]: expected at least one token"),
        (dict(prompt=[[1, 2], [1.5]], max_new_tokens=2), r"prompt\[1\]"),
        (dict(prompt=torch.zeros(2, 0, dtype=torch.long), max_new_tokens=2), "T0 >= 1"),
        (dict(prompt=torch.tensor([[1, 13]]), max_new_tokens=2), r"\[0, 13\)"),
        (dict(prompt=torch.tensor([[1, 2]]), max_new_tokens=-1), "max_new_tokens"),
        (dict(prompt=torch.tensor([[1, 2]]), max_new_tokens=2, temperature=0.0), "temperature"),
        (dict(prompt=torch.tensor([[1, 2]]), max_new_tokens=2, top_k=0), "top_k"),
        (dict(prompt=torch.tensor([[1, 2]]), max_new_tokens=2, top_p=0.0), "top_p"),
        (dict(prompt=torch.tensor([[1, 2]]), max_new_tokens=2, top_p=1.5), "top_p"),
        (dict(prompt=torch.tensor([[1, 2]]), max_new_tokens=2, seed=-1), "seed"),
        (dict(prompt=torch.tensor([[1, 2]]), max_new_tokens=2, seed=2**64), r"seed: expected an int in \[0, 2\*\*64 - 1\]"),
        (dict(prompt=torch.tensor([[1, 2]]), max_new_tokens=2, prompt_lengths=[3]), "lengths"),
        (dict(prompt=[[1, 2]], max_new_tokens=2, prompt_lengths=[2]), "prompt_lengths"),
    ],
)
def test_bad_generation_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(InputError, match=match):
        _lm("stacked-gru").generate(**kwargs)


def test_bidirectional_and_non_lm_models_refuse_to_generate():
    torch.manual_seed(0)
    bi = SequenceModel(vocab_size=5, d_model=4, layer="gru", bidirectional=True, block="residual")
    with pytest.raises(InputError, match="causal"):
        bi.generate(torch.tensor([[1, 2]]), 3)
    clf = SequenceModel(vocab_size=5, d_model=4, head="classify", n_outputs=2)
    with pytest.raises(InputError, match="lm model"):
        clf.generate(torch.tensor([[1, 2]]), 3)
