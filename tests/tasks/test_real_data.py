"""Real-data tasks on small slices: the .ts parser, UCR/UEA splits, sequential Fashion-MNIST, forecasting.

Each group skips, with the install command as the reason, only when its package or files are absent
(`make install` installs them).
"""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest
import torch

from rnnkit.errors import InputError
from rnnkit.tasks import build_task
from rnnkit.tasks.fashion_mnist import fashion_mnist_dir
from rnnkit.tasks.ucr import read_ts
from tests.helpers import data_present

HAS_AEON = importlib.util.find_spec("aeon") is not None
NEEDS_AEON = pytest.mark.skipif(not HAS_AEON, reason="aeon wheel missing: pip install -c constraints.txt --no-deps aeon==1.6.0")
HAS_STATSMODELS = importlib.util.find_spec("statsmodels") is not None
NEEDS_STATSMODELS = pytest.mark.skipif(not HAS_STATSMODELS, reason="statsmodels missing: pip install -c constraints.txt statsmodels")


NEEDS_FASHION = pytest.mark.skipif(
    not data_present(fashion_mnist_dir), reason="Fashion-MNIST files missing: apt-get install dataset-fashion-mnist"
)


# ------------------------------------------------------------------------------------ .ts parser

TS_TEXT = """# a comment
% another comment style
@problemName Toy
@univariate false
@dimensions 2
@equalLength false
@classLabel true a b c

@data
1,2,3:4,5,6:b
7,?:8,9:a
0.5:1.5:c
"""


def test_read_ts_ragged_multichannel_missing(tmp_path):
    path = tmp_path / "toy.ts"
    path.write_text(TS_TEXT)
    data = read_ts(path)
    assert data.x.shape == (3, 3, 2) and data.lengths.tolist() == [3, 2, 1]
    assert data.labels == ["b", "a", "c"] and data.class_labels == ["a", "b", "c"]
    assert data.x[0].tolist() == [[1, 4], [2, 5], [3, 6]]
    assert torch.isnan(data.x[1, 1, 0]) and data.x[1, 1, 1] == 9
    assert (data.x[1, 2] == 0).all() and (data.x[2, 1:] == 0).all()  # right padding


@pytest.mark.parametrize("body,match", [
    ("1,2:3:a\n", "channels of one length"),
    ("1,2:a\n1,2:3,4:a\n", "same number of channels"),
    ("1,2:z\n", "expected labels from"),
    ("", "at least one case"),
])
def test_read_ts_errors(tmp_path, body, match):
    path = tmp_path / "bad.ts"
    path.write_text("@classLabel true a b\n@data\n" + body)
    with pytest.raises(InputError, match=match):
        read_ts(path)
    path.write_text("1,2:a\n")
    with pytest.raises(InputError, match="@header"):
        read_ts(path)


# ------------------------------------------------------------------------------------------ UCR/UEA


def one_nn_error(task) -> float:
    """Test error of 1-nearest-neighbour with Euclidean distance (on equal-length data sets)."""
    x_train, y_train, _ = task.splits["train"]
    x_test, y_test, _ = task.splits["test"]
    distances = torch.cdist(x_test.flatten(1).double(), x_train.flatten(1).double())  # (N_test, N_train)
    return float((y_train[distances.argmin(1)] != y_test).float().mean())


@NEEDS_AEON
@pytest.mark.parametrize("dataset,sizes,shape,classes,error", [
    ("GunPoint", (50, 150), (150, 1), 2, 0.087),
    ("ItalyPowerDemand", (67, 1029), (24, 1), 2, 0.045),
    ("ArrowHead", (36, 175), (251, 1), 3, 0.200),
])
def test_ucr_official_splits(dataset, sizes, shape, classes, error):
    task = build_task("ucr", dataset=dataset)
    assert (task.size("train"), task.size("test")) == sizes
    assert (task.default_seq_len, task.d_input) == shape and task.n_classes == classes and not task.ragged
    # The archive's published 1-NN Euclidean test error: proves data and labels are read and paired right
    # (per-channel standardisation is one affine map, so it leaves nearest neighbours unchanged).
    assert abs(one_nn_error(task) - error) < 0.0015
    x, _, _ = task.splits["train"]
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-2


@NEEDS_AEON
def test_ucr_multivariate_and_ragged():
    motions = build_task("ucr", dataset="BasicMotions")
    assert (motions.size("train"), motions.size("test"), motions.d_input, motions.n_classes) == (40, 40, 6, 4)
    vowels = build_task("ucr", dataset="JapaneseVowels")
    assert (vowels.size("train"), vowels.size("test"), vowels.d_input, vowels.n_classes) == (270, 370, 12, 9)
    assert vowels.ragged and vowels.default_seq_len == 29
    every = torch.cat([vowels.splits[s][2] for s in ("train", "test")])
    assert int(every.min()) == 7 and int(every.max()) == 29  # the documented 7-29
    for split in ("train", "test"):
        x, _, lengths = vowels.splits[split]
        pad = torch.arange(29) >= lengths[:, None]
        assert (x[pad] == 0).all() and (x[~pad] != 0).any(-1).all()
    batch = next(vowels.eval_batches("test", 370))
    assert batch.lengths is not None and torch.equal(batch.lengths, vowels.splits["test"][2])
    assert next(motions.train_batches(4)).lengths is None


@NEEDS_AEON
def test_ucr_batches_determinism_and_holdout():
    task = build_task("ucr", dataset="GunPoint", val_fraction=0.2)
    assert task.size("train") + task.size("val") == 50 and task.size("val") == 10
    rows = lambda split: {tuple(r.flatten().tolist()) for r in task.splits[split][0]}  # noqa: E731
    assert not rows("train") & rows("val") and not rows("train") & rows("test")
    # stratified: both classes keep cases on each side
    assert set(task.splits["val"][1].tolist()) == set(task.splits["train"][1].tolist()) == {0, 1}
    a = list(itertools.islice(task.train_batches(8, seed=1), 3))
    b = list(itertools.islice(task.train_batches(8, seed=1), 3))
    c = list(itertools.islice(task.train_batches(8, seed=1, start=2), 1))
    assert all(torch.equal(p.x, q.x) and torch.equal(p.y, q.y) for p, q in zip(a, b))
    assert torch.equal(a[2].x, c[0].x) and not torch.equal(a[0].x, a[1].x)
    # a batch larger than the training set repeats cases, each at most ceil(B / N) times
    big = next(task.train_batches(100))
    assert big.x.shape == (100, 150, 1)
    assert sum(len(list(g)) for _, g in itertools.groupby(sorted(big.y.tolist()))) == 100
    assert sum(b.x.shape[0] for b in task.eval_batches("test", 64)) == 150
    with pytest.raises(InputError, match="seq_len"):
        task.train_batches(2, seq_len=100)
    with pytest.raises(InputError, match="dataset"):
        build_task("ucr", dataset="Nope")
    with pytest.raises(InputError, match="val_fraction"):
        build_task("ucr", val_fraction=1.0)


def test_ucr_missing_package_message(monkeypatch):
    from rnnkit.tasks import ucr as module

    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="--no-deps aeon==1.6.0"):
        module.ucr_dir()


# ------------------------------------------------------------------------------------ Fashion-MNIST


@NEEDS_FASHION
def test_fashion_mnist_row_and_pixel():
    row = build_task("fashion_mnist", mode="row", eval_examples=300)
    pixel = build_task("fashion_mnist", mode="pixel", eval_examples=300)
    assert (row.size("train"), row.size("val"), row.size("test")) == (55_000, 300, 300)
    assert build_task("fashion_mnist").size("test") == 10_000
    r = next(row.train_batches(16, seed=2))
    p = next(pixel.train_batches(16, seed=2))
    assert r.x.shape == (16, 28, 28) and p.x.shape == (16, 784, 1) and r.lengths is None
    assert torch.equal(r.x.reshape(16, 784, 1), p.x) and torch.equal(r.y, p.y)  # same images, raster order
    images, labels = row.splits["test"]
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [1000] * 10  # the test set is balanced
    first = next(row.eval_batches("test", 300))
    assert torch.equal(first.y, labels[:300])
    x = (images[:300].float() / 255 - row.mean) / row.std
    assert torch.allclose(first.x, x)
    with pytest.raises(InputError, match="seq_len"):
        pixel.train_batches(2, seq_len=28)


def test_fashion_mnist_missing_files_message(monkeypatch, tmp_path):
    from rnnkit.tasks.fashion_mnist import fashion_mnist_dir, read_idx

    monkeypatch.setenv("RNNKIT_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(InputError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist_dir()
    # IDX parsing on a hand-made file: magic, big-endian sizes, data
    path = tmp_path / "tiny-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + (2).to_bytes(4, "big") + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(range(12)))
    assert read_idx(path).tolist() == np.arange(12).reshape(2, 2, 3).tolist()
    path.write_bytes(bytes([0, 0, 9, 1]) + (1).to_bytes(4, "big") + b"x")
    with pytest.raises(InputError, match="IDX"):
        read_idx(path)


# ---------------------------------------------------------------------------------------- forecast


@NEEDS_STATSMODELS
def test_forecast_windows_and_splits():
    from rnnkit.tasks.forecast import load_series

    task = build_task("forecast", series="sunspots", context=22, horizon=2)
    raw = load_series("sunspots")
    assert len(raw) == 309
    batch = next(task.eval_batches("test", 4))
    origin = int(task.origins("test")[0])
    unscaled = batch.x[0, :, 0].double() * task.std + task.mean
    assert np.allclose(unscaled.numpy(), raw[origin - 22 : origin], atol=1e-3)
    assert np.allclose(batch.y[0].double().numpy() * task.std + task.mean, raw[origin : origin + 2], atol=1e-3)
    # chronological, non-overlapping targets
    targets = {s: set((task.origins(s)[:, None] + torch.arange(2)).flatten().tolist()) for s in ("train", "val", "test")}
    assert not targets["train"] & targets["val"] and not targets["val"] & targets["test"]
    assert max(targets["train"]) < min(targets["val"]) and max(targets["val"]) < min(targets["test"])
    assert sum(b.x.shape[0] for b in task.eval_batches("test", 16)) == len(task.origins("test"))
    # seasonal naive: the value 11 years before each target
    naive = task.seasonal_naive("test")
    o = task.origins("test").numpy()
    assert np.allclose(naive[:, 0], task.values.numpy()[o - 11]) and np.allclose(naive[:, 1], task.values.numpy()[o + 1 - 11])
    a = next(task.train_batches(8, seed=0))
    assert torch.equal(a.x, next(task.train_batches(8, seed=0)).x) and a.y.shape == (8, 2)
    with pytest.raises(InputError, match="context"):
        build_task("forecast", series="sunspots", context=250)  # no training window fits


@NEEDS_STATSMODELS
def test_forecast_co2_missing_values_and_arima():
    from rnnkit.tasks.forecast import load_series

    co2 = load_series("co2")
    assert len(co2) == 2284 and np.isfinite(co2).all()
    task = build_task("forecast", series="sunspots")
    preds, order = task.arima("test", max_p=2, max_q=0)  # a small order grid keeps the test quick
    target = task.targets("test")
    assert preds.shape == target.shape and order[1] == 0
    mse = float(((preds - target) ** 2).mean())
    # a fitted AR model beats predicting the mean and the seasonal-naive forecast on the solar cycle
    assert mse < 0.5 * float((target**2).mean())
    assert mse < float(((task.seasonal_naive("test") - target) ** 2).mean())
