"""Fixtures of the task tests: a small corpus of real files for the ``text`` task."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from rnnkit.tasks import build_task

#: Lines the corpus files are made of: ASCII, accents, CJK, an emoji (4 UTF-8 bytes) and code.
LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: naïve café, smörgåsbord, 日本語のテキスト, emoji 🦊 and π ≈ 3.14159.",
    "def area(r):\n    return 3.14159 * r ** 2  # circle",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
]


def write_corpus(root: Path, n_files: int = 24) -> Path:
    """``n_files`` text files of a few hundred characters in ``root`` and ``root/sub``, plus files a
    corpus must skip: a binary file, a Latin-1 file, an empty file and a hidden directory."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    for i in range(n_files):
        folder = root / "sub" if i % 3 == 0 else root
        lines = [f"# document {i}"] + [LINES[(i + k) % len(LINES)] for k in range(6 + i % 5)]
        (folder / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "image.bin").write_bytes(bytes(range(256)) * 4)
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / "empty.txt").write_text("")
    (root / ".hidden").mkdir(exist_ok=True)
    (root / ".hidden" / "secret.txt").write_text("never read: hidden directories are skipped\n")
    return root


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A directory of 24 UTF-8 documents (and files the task skips)."""
    return write_corpus(tmp_path_factory.mktemp("text_corpus"))


@pytest.fixture
def make_task(text_corpus):
    """``build_task`` for the shared tests: the ``text`` task reads :func:`text_corpus`."""

    def make(name: str, **options):
        if name != "text":
            return build_task(name, **options)
        options = {"path": str(text_corpus), "val_fraction": 0.25, "test_fraction": 0.25, **options}
        with warnings.catch_warnings():  # the skipped binary and Latin-1 files; test_text.py checks the warning
            warnings.simplefilter("ignore", UserWarning)
            return build_task(name, **options)

    return make
