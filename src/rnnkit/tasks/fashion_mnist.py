"""Sequential Fashion-MNIST: classify 28x28 clothing images read one row (28 steps) or one pixel (784 steps) at a time.

Fashion-MNIST is Xiao, Rasul & Vollgraf (2017), "Fashion-MNIST: a Novel Image Dataset for
Benchmarking Machine Learning Algorithms" (MIT licence). Reading an image pixel by pixel is the
long-memory test of Le, Jaitly & Hinton (2015), "A Simple Way to Initialize Recurrent Networks of
Rectified Linear Units" (sequential MNIST), here on the harder clothing images.

The files come from Debian's ``dataset-fashion-mnist`` package (``apt-get install
dataset-fashion-mnist``), which puts the original IDX files in ``/usr/share/datasets/fashion-mnist``;
set ``RNNKIT_FASHION_MNIST_DIR`` to read them from elsewhere. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from rnnkit.errors import InputError, check_choice, check_positive_int
from rnnkit.tasks.base import Batch, Task, check_eval_args, check_train_args, generator, register_task

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
VAL_SIZE = 5000  # the last 5,000 training images are held out as val
MODES = ("row", "pixel")


def fashion_mnist_dir() -> Path:
    """The folder holding the four IDX files (``$RNNKIT_FASHION_MNIST_DIR`` or the Debian path)."""
    folder = Path(os.environ.get("RNNKIT_FASHION_MNIST_DIR", DEFAULT_DIR))
    missing = [name for pair in FILES.values() for name in pair if not (folder / name).is_file()]
    if missing:
        raise InputError(
            f"fashion_mnist: expected the IDX files in {folder}, got {missing} missing: install Debian's "
            "dataset-fashion-mnist package (apt-get install dataset-fashion-mnist) or set RNNKIT_FASHION_MNIST_DIR"
        )
    return folder


def read_idx(path: str | Path) -> np.ndarray:
    """Read a (gzipped) IDX file: images ``(N, 28, 28)`` or labels ``(N,)``, uint8.

    IDX: a 4-byte magic number (two zero bytes, the type code 0x08 for uint8, the number of
    dimensions), one big-endian uint32 per dimension, then the data in C order.
    """
    path = Path(path)
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InputError(f"{path}: expected an IDX file of uint8 (magic 0x0000 08 ..), got {raw[:4]!r}")
    ndim = raw[3]
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise InputError(f"{path}: expected {int(np.prod(shape))} values for shape {shape}, got {data.size}")
    return data.reshape(shape)


@lru_cache(maxsize=1)
def _load() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    folder = fashion_mnist_dir()
    out = {}
    for split, (images, labels) in FILES.items():
        out[split] = (torch.from_numpy(read_idx(folder / images).copy()), torch.from_numpy(read_idx(folder / labels).astype(np.int64)))
    return out


@register_task("fashion_mnist")
class FashionMNISTTask(Task):
    """Sequential Fashion-MNIST: 10-way classification of an image read row by row or pixel by pixel.

    Pixels are scaled to ``[0, 1]`` and standardised with the training set's mean and std (0.286,
    0.353). Splits: ``train`` the first 55,000 training images, ``val`` the last 5,000, ``test`` the
    10,000 test images.

    Args:
        mode: ``"row"`` (28 steps of 28 features) or ``"pixel"`` (784 steps of 1 feature) (default ``"row"``).
        eval_examples: cap on val/test images, the first ones of each split (default ``None``: all).

    Batches: ``x`` ``(B, T, D)`` float32 with ``(T, D) = (28, 28)`` or ``(784, 1)``, ``y`` ``(B,)``
    int64, ``lengths`` ``None``. ``seq_len`` must be ``None`` or ``T``.

    Example:
        >>> task = build_task("fashion_mnist", mode="pixel")
        >>> batch = next(task.train_batches(batch_size=2))
        >>> batch.x.shape
        torch.Size([2, 784, 1])
    """

    input_kind = "features"
    target = "classify"
    n_classes = 10
    metrics = ("loss", "accuracy")
    mean, std = 0.2860, 0.3530  # of the 60,000 training images, in [0, 1] units

    def __init__(self, *, mode: str = "row", eval_examples: int | None = None) -> None:
        check_choice("mode", mode, MODES)
        if eval_examples is not None:
            check_positive_int("eval_examples", eval_examples)
        super().__init__(mode=mode, eval_examples=eval_examples)
        self.mode, self.eval_examples = mode, eval_examples
        self.d_input, self.default_seq_len = (28, 28) if mode == "row" else (1, 784)
        data = _load()
        images, labels = data["train"]
        self.splits = {
            "train": (images[:-VAL_SIZE], labels[:-VAL_SIZE]),
            "val": (images[-VAL_SIZE:], labels[-VAL_SIZE:]),
            "test": data["test"],
        }

    def size(self, split: str) -> int:
        """Images in ``split`` (after the ``eval_examples`` cap for val/test)."""
        n = len(self.splits[split][1])
        return n if split == "train" or self.eval_examples is None else min(n, self.eval_examples)

    def _batch(self, split: str, index: torch.Tensor) -> Batch:
        images, labels = self.splits[split]
        x = (images[index].float() / 255 - self.mean) / self.std  # (B, 28, 28)
        x = x.reshape(len(index), self.default_seq_len, self.d_input)  # (B, T, D): rows, or pixels in raster order
        return Batch(x, labels[index].clone(), None)

    def _check_seq_len(self, seq_len: int | None) -> None:
        if seq_len is not None and seq_len != self.default_seq_len:
            raise InputError(f"seq_len: expected None or {self.default_seq_len} for mode={self.mode!r}, got {seq_len}")

    def train_batches(
        self, batch_size: int, seq_len: int | None = None, seed: int = 0, start: int = 0
    ) -> Iterator[Batch]:
        check_train_args(batch_size, seq_len, seed, start)
        self._check_seq_len(seq_len)
        N = self.size("train")

        def batches() -> Iterator[Batch]:
            k = start
            while True:
                index = torch.randint(0, N, (batch_size,), generator=generator("fashion_mnist", "train", seed, k))
                yield self._batch("train", index)
                k += 1

        return batches()

    def eval_batches(self, split: str, batch_size: int, seq_len: int | None = None) -> Iterator[Batch]:
        check_eval_args(split, batch_size, seq_len)
        self._check_seq_len(seq_len)
        n = self.size(split)
        return (self._batch(split, torch.arange(i, min(i + batch_size, n))) for i in range(0, n, batch_size))
