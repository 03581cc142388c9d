"""A user's own task: ``module:Class`` names, the ``rnnkit.tasks`` entry points, and the task state saved
with a model so evaluating and decoding never need the original data."""

import json
import textwrap

import pytest
import torch

from rnnkit.cli import main
from rnnkit.errors import InputError
from rnnkit.tasks import base, build_task, restore_task, task_class, task_description, task_names, task_reference

# A character task whose vocabulary is learned from a file: the kind of state that must travel with a model.
PLUGIN_SOURCE = '''
import torch
from rnnkit.tasks import Batch, Task


class FileChars(Task):
    """Next-character prediction on one text file."""

    input_kind = "tokens"
    target = "per_step"
    metrics = ("loss", "bpc")
    default_seq_len = 8

    def __init__(self, path: str = "corpus.txt"):
        super().__init__(path=path)
        self.path = path
        self.vocab = None

    def _text(self):
        with open(self.path) as f:
            return f.read()

    def _ensure_vocab(self):
        if self.vocab is None:
            self.vocab = sorted(set(self._text()))

    @property
    def vocab_size(self):
        self._ensure_vocab()
        return len(self.vocab)

    @property
    def n_classes(self):
        return self.vocab_size

    def portable_state(self):
        self._ensure_vocab()
        return {"vocab": self.vocab}

    @classmethod
    def restore(cls, options, state):
        task = cls(**options)
        task.vocab = list(state["vocab"])
        return task

    def encode(self, text):
        self._ensure_vocab()
        return torch.tensor([self.vocab.index(c) for c in text], dtype=torch.int64)

    def decode(self, ids):
        return "".join(self.vocab[int(i)] for i in ids)

    def _batch(self, offset, batch_size, seq_len):
        ids = self.encode(self._text())
        n = ids.numel() - seq_len - 1
        starts = [(offset + 3 * b) % n for b in range(batch_size)]
        x = torch.stack([ids[s:s + seq_len] for s in starts])
        y = torch.stack([ids[s + 1:s + seq_len + 1] for s in starts])
        return Batch(x, y, None)

    def train_batches(self, batch_size, seq_len=None, seed=0, start=0):
        seq_len = seq_len or self.default_seq_len
        def batches():
            k = start
            while True:
                yield self._batch(k + seed, batch_size, seq_len)
                k += 1
        return batches()

    def eval_batches(self, split, batch_size, seq_len=None):
        return iter([self._batch(1 if split == "val" else 2, batch_size, seq_len or self.default_seq_len)])
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A module ``my_tasks`` in a fresh working directory, with a corpus next to it."""
    (tmp_path / "my_tasks.py").write_text(PLUGIN_SOURCE)
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 20)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path


def test_module_class_builds_a_task_that_is_not_registered(plugin):
    task = build_task("my_tasks:FileChars", path="corpus.txt")
    assert type(task).__name__ == "FileChars" and task.vocab_size == len(set(open("corpus.txt").read()))
    assert task_reference(task) == "my_tasks:FileChars"
    assert "my_tasks:FileChars" not in task_names()
    assert task_reference(build_task("parity")) == "parity"


@pytest.mark.parametrize(
    "name, message",
    [
        ("no_such_module_xyz:Task", "importable module"),
        ("my_tasks:Missing", "no such attribute"),
        ("my_tasks:torch", "Task subclass"),
        ("my_tasks:", "'module:Class'"),
    ],
)
def test_bad_module_class_names_are_input_errors(plugin, name, message):
    with pytest.raises(InputError, match=message):
        task_class(name)


def test_state_travels_with_the_description(plugin):
    task = build_task("my_tasks:FileChars", path="corpus.txt")
    description = json.loads(json.dumps(task_description(task)))
    assert description["state"]["vocab"] == task.vocab
    (plugin / "corpus.txt").unlink()  # the data is gone: the restored task still encodes and decodes
    restored = restore_task(description)
    assert restored.decode(restored.encode("the fox")) == "the fox"
    assert restored.vocab_size == task.vocab_size


def test_cli_trains_a_plugin_task_and_decodes_after_the_corpus_moved(plugin, capsys):
    out_dir = plugin / "run"
    argv = ["train", "--task", "my_tasks:FileChars", "--model", "gru", "--d-model", "8", "--steps", "3",
            "--batch-size", "4", "--no-progress", "--out", str(out_dir), "--sample-length", "5"]
    assert main(argv) == 0
    info = json.loads((out_dir / "train.json").read_text())
    assert info["task"]["name"] == "my_tasks:FileChars" and info["task"]["state"]["vocab"]
    (plugin / "corpus.txt").rename(plugin / "moved.txt")
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out_dir), "--prompt", "the ", "--length", "10"]) == 0
    assert capsys.readouterr().out.startswith("the ")


def test_resume_names_a_changed_vocabulary_by_digest(plugin, capsys):
    out_dir = plugin / "run"
    argv = ["train", "--task", "my_tasks:FileChars", "--model", "gru", "--d-model", "8", "--steps", "2",
            "--batch-size", "4", "--no-progress", "--out", str(out_dir), "--sample-length", "0",
            "--checkpoint-every", "1"]
    assert main(argv) == 0
    (plugin / "corpus.txt").write_text("an entirely different text with Zebras and Quokkas! " * 20)
    capsys.readouterr()
    assert main(argv[:argv.index("--steps") + 1] + ["4"] + argv[argv.index("--steps") + 2:] + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "task.state: checkpoint 'sha256:" in err and "Zebras" not in err


ENTRY_POINTS = """[rnnkit.tasks]
file_chars = my_tasks:FileChars
"""


def test_entry_point_plugins_are_registered_on_first_lookup(plugin, monkeypatch):
    dist = plugin / "my_tasks_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-tasks-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.setattr(base, "_entry_points_loaded", False)
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    assert "file_chars" in task_names()
    task = build_task("file_chars", path="corpus.txt")
    assert task_reference(task) == "file_chars"
    assert task.encode("fox").dtype == torch.int64


def test_a_broken_entry_point_warns_and_leaves_the_others(plugin, monkeypatch):
    dist = plugin / "broken_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent("""\
        [rnnkit.tasks]
        broken = no_such_module_xyz:Task
        """))
    monkeypatch.setattr(base, "_entry_points_loaded", False)
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    with pytest.warns(RuntimeWarning, match="broken"):
        names = task_names()
    assert "parity" in names and "broken" not in names
