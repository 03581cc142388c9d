"""Generation from per-step feature heads: multi-label frames drawn per label, real values fed back."""

from __future__ import annotations

import pytest
import torch

from rnnkit.errors import InputError
from rnnkit.models import SequenceModel
from tests.helpers import assert_close


def frame_model(head: str, width: int = 3, seed: int = 0) -> SequenceModel:
    torch.manual_seed(seed)
    return SequenceModel(d_input=width, head=head, n_outputs=width, d_model=8, layer="gru", num_layers=2).eval()


def test_regress_per_step_forecasts_autoregressively():
    model = frame_model("regress_per_step")
    prompt = torch.randn(2, 4, 3)
    out = model.generate(prompt, 5)
    assert out.shape == (2, 5, 3) and out.dtype == torch.float32
    # By hand: the prediction at the last prompt step, then each prediction fed back as the next input.
    with torch.no_grad():
        y, state = model(prompt)
        frame, expected = y[:, -1], []
        for _ in range(5):
            expected.append(frame)
            frame, state = model.step(frame, state)
        # The whole sequence in one pass gives the same predictions (the state is complete).
        whole, _ = model(torch.cat([prompt, torch.stack(expected[:-1], 1)], 1))
    assert_close(out, torch.stack(expected, 1))
    assert_close(out[:, 1:], whole[:, 4:])


def test_multilabel_draws_each_label_and_feeds_the_frame_back():
    model = frame_model("multilabel", width=4)
    prompt = [torch.rand(3, 4).round(), torch.rand(1, 4).round()]  # ragged prompts
    a = model.generate(prompt, 6, seed=1)
    b = model.generate(prompt, 6, seed=1)
    assert a.shape == (2, 6, 4) and torch.equal(a, b) and set(a.unique().tolist()) <= {0.0, 1.0}
    frames = list(model.stream(prompt, 6, seed=1))
    assert torch.equal(torch.stack(frames, 1), a)
    # A near-zero temperature is a threshold at probability 1/2: deterministic, whatever the seed.
    cold = model.generate(prompt, 6, temperature=1e-6, seed=2)
    assert torch.equal(cold, model.generate(prompt, 6, temperature=1e-6, seed=3))
    with torch.no_grad():
        y, state = model(torch.stack([prompt[0], torch.cat([prompt[1], torch.zeros(2, 4)])]), lengths=[3, 1])
        first = (y[torch.arange(2), torch.tensor([2, 0])] > 0).float()
        second, _ = model.step(first, state)
    assert torch.equal(cold[:, 0], first) and torch.equal(cold[:, 1], (second > 0).float())
    assert model.generate(prompt, 0).shape == (2, 0, 4)


def test_frame_generation_errors():
    wide = SequenceModel(d_input=3, head="multilabel", n_outputs=5, d_model=4, layer="gru")
    with pytest.raises(InputError, match=r"n_outputs == d_input\), got n_outputs=5, d_input=3"):
        wide.generate(torch.zeros(1, 2, 3), 2)
    model = frame_model("multilabel")
    with pytest.raises(InputError, match="top_k: expected None for head='multilabel'"):
        model.generate(torch.zeros(1, 2, 3), 2, top_k=2)
    with pytest.raises(InputError, match=r"prompt: expected features of shape \(B, T0, 3\)"):
        model.generate(torch.zeros(1, 2, 4), 2)
    with pytest.raises(InputError, match=r"prompt\[0\]: expected a float tensor \(T, 3\)"):
        model.generate([torch.zeros(2, 2)], 2)
    with pytest.raises(InputError, match="temperature: expected 1 for head='regress_per_step'"):
        frame_model("regress_per_step").generate(torch.zeros(1, 2, 3), 2, temperature=0.5)
    lm_on_features = SequenceModel(d_input=3, head="lm", n_outputs=3, d_model=4, layer="gru")
    with pytest.raises(InputError, match="lm model with token input"):
        lm_on_features.generate(torch.zeros(1, 2, 3), 2)
