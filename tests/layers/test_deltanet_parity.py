"""Grazzi et al. 2025 reproduced: DeltaNet learns parity and extrapolates only with negative eigenvalues.

"Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues" (ICLR 2025), Sec. 5.1: with
``beta`` in ``(0, 1)`` every transition ``I - beta k k^T`` has eigenvalues in ``[0, 1]`` and a
linear RNN of this kind cannot represent parity at arbitrary length; with ``beta`` in ``(0, 2)``
(``allow_neg_eigval=True``) a reflection ``I - 2 k k^T`` flips the state on every 1, and the model
learns a solution that holds far beyond the training length. Here both variants train on parity
strings of length 1..``TRAIN_LEN`` and are tested on 2000 strings of exactly ``4 * TRAIN_LEN`` bits.

The configuration: one residual DeltaNet block, ``d_model=32``, 2 heads of 16, no short
convolution (``use_short_conv=False``), AdamW lr 3e-3 without weight decay (the paper's
``weight_decay: 0.0``), batch 64, 1500 steps on strings of 1..64 bits, tested on 256 (about 70 s
per run on one core; the three tests below take 218 s). Measured with 1 thread: accuracy on 2000
strings of exactly 4x (8x) the longest training length; ``neg`` = ``allow_neg_eigval``; the row
marked * used a short convolution frozen at the identity (the function of no convolution, another
initialisation):

    configuration                                   neg    seed 0: 4x (8x)   seed 1: 4x (8x)   seed 2: 4x (8x)
    this test: no short conv, no weight decay,      True   1.000             1.000             1.000 (0.991)
      lengths 1..64 (seeds 3 and 4: 1.000 (1.000))
    ... lengths 1..32 (tested at 128)               True   1.000 (1.000)     1.000 (1.000)     0.970 (0.708)
    ... lengths 1..32                               False  0.496 (0.503)     0.502 (0.514)
    this test's configuration                       False  0.498 (1x: 0.497)
    * no short conv, weight decay 0.01, 1..32       True   0.746 (0.521)
    short conv W=4, weight decay 0.01, lengths 1..32 (the layer's and Trainer's defaults):
                                                    True   0.961 (0.854)
      ... lr 1e-2 / training length 16              True   0.972 / 0.962
      ... fixed length 32 instead of 1..32          True   0.496 (not learnt)
      ... 2 layers / 3000 steps / conv W=2          True   0.942 / 0.972 / 0.989
      (the defaults)                                False  0.527 (1x: 0.66)
    short conv W=4, no weight decay, lengths 1..32  True   0.991 (0.942)     0.879 (0.698)
      ... 3000 steps                                True   0.996 (0.938)     0.987 (0.921)
      ... conv W=2                                  True   0.953 (0.745)     0.988 (0.914)
      ... 4 heads of 8                              True   0.973 (0.804)     0.631 (0.542)
      ... d_model 16, 4 heads of 4 (paper's size)   True   0.981 (0.912)
      ... lengths 1..64 (tested at 256 and 512)     True   0.991 (0.930)     0.998 (0.920)

Why the short convolution is left out: its taps barely move from their ``Conv1d`` initialisation
(after training, the q/k/v channels' taps all still have mean ``|w|`` 0.2-0.3, the current step's no
larger than the three before it), so the key and value that a 1 writes depend on the three bits
before it. Reflections along keys that change with the context do not compose to an exact sign
flip: with the convolution the trained models reached 99% at 4x in some seeds only, and lost more
at 8x. Without it each bit has one key, one value and one ``beta``; the trained model reflects on
a 1 (``beta`` 1.99-2.0 in both heads of a no-convolution run) along a key nearly orthogonal to the
0's (cosine 0.05-0.13): the paper's construction. Training on 1..64 bits rather than 1..32 makes the
solution exact more reliably (a third seed reached 0.970 at 4x on 1..32; on 1..64 its reflecting
head has ``beta`` 1.999 on a 1 and a 0-key at cosine 1e-4 to the 1-key). Weight decay keeps
``W_beta`` from growing far enough to saturate ``2 sigmoid`` (0.746 at 4x with 0.01).
"""

from __future__ import annotations

import pytest

from rnnkit.bench.extrapolation import extrapolation_run

TRAIN_LEN = 64
TEST_LEN = 4 * TRAIN_LEN
STEPS = 1500


def parity_extrapolation(allow_neg_eigval: bool, seed: int = 0, **layer_options) -> dict[str, float]:
    """Train DeltaNet on parity (lengths 1..TRAIN_LEN); test accuracies at TRAIN_LEN and 4 x TRAIN_LEN."""
    options = {"num_heads": 2, "head_dim": 16, "use_short_conv": False, **layer_options}
    result = extrapolation_run("deltanet", "parity", allow_neg_eigval, seed, STEPS, TRAIN_LEN, factor=4, **options)
    return {"train_len": result["train_len"], "4x": result["long"]}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_negative_eigenvalues_learn_parity_and_extrapolate(seed):
    """The bar: >= 99% on strings 4x longer than any seen in training, for two seeds."""
    result = parity_extrapolation(allow_neg_eigval=True, seed=seed)
    print(f"allow_neg_eigval=True, seed {seed}: {result}")  # shown with pytest -s
    assert result["train_len"] >= 0.99 and result["4x"] >= 0.99, f"allow_neg_eigval=True, seed {seed}: {result}"


@pytest.mark.slow
def test_positive_eigenvalues_do_not():
    """The same model and training with beta in (0, 1): parity at 4x stays near chance."""
    result = parity_extrapolation(allow_neg_eigval=False)
    print(f"allow_neg_eigval=False: {result}")
    assert result["4x"] < 0.75, f"allow_neg_eigval=False: {result}"
