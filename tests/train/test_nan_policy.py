"""nan_policy: "raise" stops before the update with nothing written after the last good step;
"skip" skips and counts, and raises after max_skips consecutive skips. Non-finite values are injected."""

from __future__ import annotations

import pytest
import torch

from rnnkit import NonFiniteError
from rnnkit.models import SequenceModel
from rnnkit.tasks import Batch, build_task
from rnnkit.train import CheckpointManager, TrainConfig, Trainer


class Poisoned:
    """A task whose training batches at the given indices carry NaN inputs (so a NaN loss)."""

    def __init__(self, base, bad: set[int]) -> None:
        self.base, self.bad = base, bad

    def __getattr__(self, name):
        return getattr(self.base, name)

    def train_batches(self, batch_size, seq_len=None, seed=0, start=0):
        inner = self.base.train_batches(batch_size, seq_len, seed=seed, start=start)

        def batches():
            for index, batch in enumerate(inner, start):
                if index in self.bad:
                    batch = Batch(torch.full_like(batch.x, float("nan")), batch.y, batch.lengths, batch.reset)
                yield batch

        return batches()


def _trainer(tmp_path, bad=(), **overrides):
    torch.manual_seed(0)
    model = SequenceModel(d_input=2, d_model=8, head="regress", n_outputs=1, layer="gru")
    task = Poisoned(build_task("adding", eval_examples=8), set(bad))
    config = dict(steps=8, batch_size=4, seq_len=6, lr=1e-2, warmup_steps=1, progress=False, checkpoint_every=1,
                  keep_last=0)
    config.update(overrides)
    return Trainer(model, task, TrainConfig(**config), out_dir=tmp_path)


def _snapshots(trainer):
    """Weights and optimizer state after every step, keyed by step."""
    shots = {}

    def on_step(step, record):
        shots[step] = (
            {k: v.clone() for k, v in trainer.model.state_dict().items()},
            {k: v.clone() for state in trainer.optimizer.state.values() for k, v in [("exp_avg", state["exp_avg"])]},
        )

    return shots, on_step


def _assert_weights(model, expected):
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_raise_on_nan_loss_names_the_step_and_touches_nothing(tmp_path):
    trainer = _trainer(tmp_path, bad={3})
    shots, on_step = _snapshots(trainer)
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite loss \(nan\)") as info:
        trainer.fit(on_step)
    assert info.value.step == 3 and trainer.step == 3
    _assert_weights(trainer.model, shots[3][0])  # the weights after the last good step
    committed = [s for s, _ in CheckpointManager(tmp_path / "checkpoints").committed()]
    assert committed == [1, 2, 3]  # nothing after the last good step
    assert not (tmp_path / "model.safetensors").exists()


def test_raise_on_infinite_gradient_with_a_finite_loss(tmp_path):
    trainer = _trainer(tmp_path)
    shots, on_step = _snapshots(trainer)
    weight = trainer.model.head.weight
    weight.register_hook(lambda grad: grad * float("inf") if trainer.step == 5 else grad)
    with pytest.raises(NonFiniteError, match=r"step 5: .*gradient norm \(inf\)"):
        trainer.fit(on_step)
    _assert_weights(trainer.model, shots[5][0])
    assert max(s for s, _ in CheckpointManager(tmp_path / "checkpoints").committed()) == 5


def test_skip_counts_and_leaves_weights_and_moments_unchanged(tmp_path):
    trainer = _trainer(tmp_path, bad={2, 5, 6}, nan_policy="skip", max_skips=2)
    shots, on_step = _snapshots(trainer)
    result = trainer.fit(on_step)
    assert result["skipped"] == trainer.skipped == 3
    assert [r["skipped"] for r in trainer.history] == [0, 0, 1, 0, 0, 1, 1, 0]
    for skipped_step in (3, 6, 7):  # history step k is the k-th optimizer step (batch k - 1)
        before, after = shots[skipped_step - 1], shots[skipped_step]
        assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
        assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    for good_step in (2, 4, 8):
        assert not all(torch.equal(shots[good_step - 1][0][k], shots[good_step][0][k]) for k in shots[good_step][0])
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {8 - 3}
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_skip_raises_after_max_consecutive_skips(tmp_path):
    trainer = _trainer(tmp_path, bad={2, 3, 4}, nan_policy="skip", max_skips=2)
    with pytest.raises(NonFiniteError, match=r"step 4: .*3 consecutive steps .*max_skips=2"):
        trainer.fit()
    assert trainer.skipped == 3


def test_skip_resets_the_carried_state_of_a_stream(tmp_path):
    torch.manual_seed(0)
    base = build_task("shakespeare")
    model = SequenceModel(vocab_size=base.vocab_size, d_model=8, layer="lstm")
    task = Poisoned(base, set())
    config = TrainConfig(steps=3, batch_size=2, seq_len=8, progress=False, nan_policy="skip", eval_max_batches=1,
                         eval_batch_size=2)
    trainer = Trainer(model, task, config)
    # A NaN embedding row poisons the state; skipping that step must not carry the NaN state on.
    seen = []
    original = model.forward

    def spy(x, state=None, lengths=None, mode="auto"):
        seen.append(state)
        if trainer.step == 1:
            out, new_state = original(x, state, lengths, mode)
            return out * float("nan"), new_state
        return original(x, state, lengths, mode)

    model.forward = spy
    trainer.fit()
    assert trainer.skipped == 1
    assert seen[1] is not None and seen[2] is None  # carried into step 1, reset after the skipped step
