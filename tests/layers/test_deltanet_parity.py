"""Grazzi et al. 2025 reproduced: DeltaNet learns parity and extrapolates only with negative eigenvalues.

"Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues" (ICLR 2025), Sec. 5.1: with
``beta`` in ``(0, 1)`` every transition ``I - beta k k^T`` has eigenvalues in ``[0, 1]`` and a
linear RNN of this kind cannot represent parity at arbitrary length; with ``beta`` in ``(0, 2)``
(``allow_neg_eigval=True``) a reflection ``I - 2 k k^T`` flips the state on every 1, and the model
learns a solution that holds far beyond the training length. Here both variants train on parity
strings of length 1..``TRAIN_LEN`` and are tested on strings of exactly ``4 * TRAIN_LEN`` bits.
"""

from __future__ import annotations

import pytest
import torch

from rnnkit.models import SequenceModel
from rnnkit.tasks import build_task
from rnnkit.train import TrainConfig, Trainer

TRAIN_LEN = 32
TEST_LEN = 4 * TRAIN_LEN
STEPS = 1500


def parity_extrapolation(
    allow_neg_eigval: bool,
    seed: int = 0,
    steps: int = STEPS,
    train_len: int = TRAIN_LEN,
    d_model: int = 32,
    num_layers: int = 1,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    **layer_options,
) -> dict[str, float]:
    """Train DeltaNet on parity (lengths 1..train_len); test accuracies at train_len and 4 x train_len."""
    torch.manual_seed(seed)
    options = {"num_heads": 2, "head_dim": 16, **layer_options, "allow_neg_eigval": allow_neg_eigval}
    model = SequenceModel(
        vocab_size=2, d_model=d_model, block="residual", layer="deltanet", num_layers=num_layers, mlp_ratio=2.0,
        layer_options=options, head="classify", n_outputs=2,
    )
    config = TrainConfig(steps=steps, batch_size=64, seq_len=train_len, lr=lr, warmup_steps=50,
                         weight_decay=weight_decay, seed=seed, progress=False, log_every=10**9)
    trainer = Trainer(model, build_task("parity"), config)
    trainer.fit()
    result = {"train_len": trainer.evaluate("test")["accuracy"]}
    # Every test string has exactly 4x the training length (no padding, no shorter strings).
    long = build_task("parity", variable_length=False, eval_examples=2000)
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in long.eval_batches("test", batch_size=500, seq_len=4 * train_len):
            logits, _ = model(batch.x)
            correct += int((logits.argmax(-1) == batch.y).sum())
    result["4x"] = correct / long.eval_examples
    return result


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="measured 96.1% at 4x with allow_neg_eigval=True, short of the issue's 99% "
                   "(the separation from allow_neg_eigval=False, 52.7%, does reproduce); issue 4 stays open")
def test_negative_eigenvalues_learn_parity_and_extrapolate():
    """The issue's bar: >= 99% at 4x with negative eigenvalues, chance without.

    Measured (1 thread, this config): allow_neg_eigval=True 100% at the training length and 96.1% at
    4x; False 66% and 52.7%. The separation reproduces; the 99% bar at 4x is not reached yet (lr 1e-2
    gave 97.2%, training length 16 gave 96.2%), so this test fails until a config that saturates
    beta closer to 2 is found.
    """
    with_neg = parity_extrapolation(allow_neg_eigval=True)
    without = parity_extrapolation(allow_neg_eigval=False)
    assert with_neg["4x"] >= 0.99, f"allow_neg_eigval=True: {with_neg}"
    assert without["4x"] < 0.75, f"allow_neg_eigval=False: {without}"


