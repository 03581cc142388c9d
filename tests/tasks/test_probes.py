"""Targets of the synthetic probes, recomputed by plain loops; test lengths; curricula; JRT layout.

The shared contract (shapes, determinism by seed, ``start``, disjoint splits) runs over these tasks in
test_tasks.py; here each task's answer is checked against a direct reading of its definition.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from rnnkit.errors import InputError
from rnnkit.models import SequenceModel
from rnnkit.tasks import IGNORE_INDEX, build_task
from rnnkit.train import loss_and_counts

PROBES = ["induction_heads", "modular_sum", "mqar", "n_dms", "n_parity", "permutation_composition",
          "selective_copy", "set_disjointness"]


@pytest.mark.parametrize("name", PROBES)
def test_test_lengths_are_valid_and_grow(name):
    task = build_task(name)
    lengths = task.test_lengths
    assert lengths[0] == task.default_seq_len and list(lengths) == sorted(set(lengths)) and len(lengths) >= 2
    for T in lengths:
        batch = next(task.eval_batches("test", 8, T))
        assert batch.x.shape[:2] == (8, T)


def test_selective_copy_targets():
    task = build_task("selective_copy", n_symbols=5, n_colors=6, context=20)
    batch = next(task.train_batches(64, seed=1))
    x, y = batch.x, batch.y
    assert x.shape == (64, 25) and task.vocab_size == 8
    for row_x, row_y in zip(x, y):
        context, markers = row_x[:20], row_x[20:]
        data = [int(v) for v in context if v != 0]
        assert len(data) == 5 and all(1 <= v <= 6 for v in data)
        assert (markers == 7).all()
        assert row_y[20:].tolist() == data and (row_y[:20] == IGNORE_INDEX).all()
    # the data positions vary between examples (the point of the task)
    assert len({tuple((r[:20] != 0).nonzero().flatten().tolist()) for r in x}) > 50
    with pytest.raises(InputError, match="context"):
        build_task("selective_copy", n_symbols=5, context=4)
    with pytest.raises(InputError, match="2 \\* n_symbols"):
        task.train_batches(2, seq_len=9)


def test_mqar_targets():
    N, Q, V = 6, 4, 40
    task = build_task("mqar", num_kv_pairs=N, vocab_size=V, num_queries=Q)
    K = (V - 1) // 2
    batch = next(task.train_batches(64, seq_len=40, seed=2))
    for row_x, row_y in zip(batch.x, batch.y):
        keys, values = row_x[0 : 2 * N : 2].tolist(), row_x[1 : 2 * N : 2].tolist()
        assert len(set(keys)) == N and all(1 <= k <= K for k in keys)
        assert all(K < v < V for v in values)
        binding = dict(zip(keys, values))
        asked = [(t, int(row_x[t])) for t in range(2 * N, 40) if row_x[t] != 0]
        assert len(asked) == Q and len({k for _, k in asked}) == Q
        for t in range(40):
            expected = binding[int(row_x[t])] if t >= 2 * N and row_x[t] != 0 else IGNORE_INDEX
            assert int(row_y[t]) == expected
    assert batch.num_tokens == 64 * Q
    with pytest.raises(InputError, match="vocab_size"):
        build_task("mqar", num_kv_pairs=10, vocab_size=20)
    with pytest.raises(InputError, match="num_queries"):
        build_task("mqar", num_kv_pairs=4, num_queries=5)
    with pytest.raises(InputError, match="2 \\* num_kv_pairs \\+ num_queries = 24"):
        build_task("mqar").train_batches(2, seq_len=23)


@pytest.mark.parametrize("small_first", [False, True], ids=["large-first", "small-first"])
@pytest.mark.parametrize("repeat", [False, True])
def test_set_disjointness_targets(repeat, small_first):
    task = build_task("set_disjointness", size_b=3, n_elements=50, repeat_context=repeat, small_first=small_first)
    S, E = 51, 52
    for T in task.test_lengths[:2] + (task.default_seq_len + 3,):
        a = task.size_a(T)
        batch = next(task.train_batches(32, seq_len=T, seed=3))
        for row, answer in zip(batch.x.tolist(), batch.y.tolist()):
            assert row[-1] == E
            body = row[next(i for i, v in enumerate(row) if v != 0) :]
            assert all(v == 0 for v in row[: len(row) - len(body)])
            context = body[:-1]
            if repeat:
                half = (len(context) - 1) // 2
                assert context[half] == S and context[:half] == context[half + 1 :]
                context = context[:half]
            if small_first:
                set_b, set_a = context[:3], context[4:]
                assert context[3] == S and len(set_a) == a
            else:
                set_a, set_b = context[:a], context[a + 1 :]
                assert context[a] == S and len(set_b) == 3
            assert len(set(set_a)) == a and len(set(set_b)) == 3
            assert set(set_a) & set(set_b) == {answer}
    # JRT doubles the context: same first-set size at (about) twice the length
    plain = build_task("set_disjointness")
    jrt = build_task("set_disjointness", repeat_context=True)
    assert plain.size_a(plain.default_seq_len) == jrt.size_a(jrt.default_seq_len) == 16
    assert jrt.default_seq_len == 2 * plain.default_seq_len
    with pytest.raises(InputError, match="first set of one"):
        plain.train_batches(2, seq_len=5)
    with pytest.raises(InputError, match="n_elements"):
        build_task("set_disjointness", n_elements=20).train_batches(2, seq_len=60)


def test_set_disjointness_small_first_is_the_same_sets_reordered():
    """The order option keeps the task contract (shapes, determinism by seed, disjoint splits) and draws
    the same sets as the default order for the same seed, so the two orders are a paired comparison."""
    large, small = build_task("set_disjointness", eval_examples=50), build_task("set_disjointness", eval_examples=50,
                                                                               small_first=True)
    T, a, b = 30, small.size_a(30), small.size_b
    assert small.default_seq_len == large.default_seq_len and small.size_a(T) == large.size_a(T)
    first = list(itertools.islice(small.train_batches(4, T, seed=3), 3))
    again = list(itertools.islice(build_task("set_disjointness", small_first=True).train_batches(4, T, seed=3), 3))
    assert all(torch.equal(p.x, q.x) and torch.equal(p.y, q.y) for p, q in zip(first, again))
    assert not torch.equal(first[0].x, next(small.train_batches(4, T, seed=4)).x)
    assert not torch.equal(first[0].x, first[1].x)
    reference = next(large.train_batches(4, T, seed=3))
    pad = T - (a + 1 + b + 1)
    assert first[0].x.shape == (4, T) and first[0].y.shape == (4,) and torch.equal(first[0].y, reference.y)
    assert torch.equal(first[0].x[:, pad : pad + b], reference.x[:, pad + a + 1 : pad + a + 1 + b])  # B moved first
    assert torch.equal(first[0].x[:, pad + b + 1 : -1], reference.x[:, pad : pad + a])  # then A

    def rows(batches):
        return {tuple(r.tolist()) for batch in batches for r in batch.x}

    val, test = rows(small.eval_batches("val", 16, T)), rows(small.eval_batches("test", 16, T))
    train = rows(b for seed in range(3) for b in itertools.islice(small.train_batches(32, T, seed=seed), 4))
    assert len(val) == len(test) == 50 and not val & test and not val & train and not test & train
    with pytest.raises(InputError, match="small_first"):
        build_task("set_disjointness", small_first=1)


def test_modular_sum_targets():
    task = build_task("modular_sum", modulus=7)
    batch = next(task.train_batches(16, seq_len=30, seed=0))
    for row_x, row_y in zip(batch.x.tolist(), batch.y.tolist()):
        total = 0
        for v, target in zip(row_x, row_y):
            total = (total + v) % 7
            assert target == total


@pytest.mark.parametrize("group,order", [("S3", 6), ("S5", 120)])
def test_permutation_composition_targets(group, order):
    task = build_task("permutation_composition", group=group)
    n = int(group[1])
    perms = list(itertools.permutations(range(n)))
    assert task.n_classes == task.vocab_size == order and [tuple(p) for p in task.perms.tolist()] == perms
    batch = next(task.train_batches(8, seq_len=20, seed=1))
    for row_x, row_y in zip(batch.x.tolist(), batch.y.tolist()):
        state = tuple(range(n))  # identity
        for token, target in zip(row_x, row_y):
            step = perms[token]
            state = tuple(step[state[k]] for k in range(n))  # apply the prefix, then this token
            assert perms[target] == state
    # S3 is not abelian, so the order of composition matters and the table is not symmetric
    assert not torch.equal(task.table, task.table.T)
    with pytest.raises(InputError, match="group"):
        build_task("permutation_composition", group="S4")


@pytest.mark.parametrize("name", ["n_parity", "n_dms"])
def test_memory_curricula_targets(name):
    n = 3
    task = build_task(name, n=n, curriculum="single", stage_steps=0)
    batch = next(task.train_batches(16, seq_len=20, seed=0))
    for row_x, row_y in zip(batch.x.tolist(), batch.y.tolist()):
        for t, target in enumerate(row_y):
            if name == "n_parity":
                expected = sum(row_x[t - n + 1 : t + 1]) % 2 if t >= n - 1 else IGNORE_INDEX
            else:
                expected = int(row_x[t] == row_x[t - n]) if t >= n else IGNORE_INDEX
            assert target == expected


@pytest.mark.parametrize("name", ["n_parity", "n_dms"])
def test_single_head_curriculum(name):
    task = build_task(name, n=3, curriculum="single", stage_steps=2)
    assert task.n_heads == 1 and [task.stage(k) for k in range(8)] == [1, 1, 2, 2, 3, 3, 3, 3]
    reference = {m: build_task(name, n=m, stage_steps=0) for m in (1, 2, 3)}
    for k, batch in enumerate(itertools.islice(task.train_batches(4, seq_len=12, seed=0), 6)):
        assert batch.y.shape == (4, 12)
        assert torch.equal(batch.y, reference[task.stage(k)].targets_for(batch.x, task.stage(k)))
    # val/test are the final stage
    val = next(task.eval_batches("val", 4, 12))
    assert torch.equal(val.y, reference[3].targets_for(val.x, 3))


@pytest.mark.parametrize("name", ["n_parity", "n_dms"])
def test_multi_head_curriculum(name):
    task = build_task(name, n=3, curriculum="multi", stage_steps=2)
    assert task.n_heads == 3
    for k, batch in enumerate(itertools.islice(task.train_batches(4, seq_len=12, seed=0), 6)):
        assert batch.y.shape == (4, 12, 3)
        for head in range(3):
            if head + 1 <= task.stage(k):
                assert torch.equal(batch.y[..., head], task.targets_for(batch.x, head + 1))
            else:
                assert (batch.y[..., head] == IGNORE_INDEX).all()
    val = next(task.eval_batches("val", 4, 12))
    assert val.y.shape == (4, 12, 3) and (val.y[:, -1] != IGNORE_INDEX).all()
    assert val.num_tokens == int((val.y != IGNORE_INDEX).sum())


def test_multi_head_loss_reads_heads_separately():
    task = build_task("n_dms", n=2, curriculum="multi", stage_steps=0)
    batch = next(task.train_batches(3, seq_len=10))
    model = SequenceModel(vocab_size=2, head="lm", n_outputs=task.n_classes * task.n_heads, layer="gru", d_model=8)
    output, _ = model(batch.x)
    assert output.shape == (3, 10, 4)
    loss, counts = loss_and_counts(output, batch, task.target)
    logits = output.view(3, 10, 2, 2)  # (B, T, H, C)
    valid = batch.y != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[valid], batch.y[valid])
    assert torch.allclose(loss, expected) and counts["count"] == int(valid.sum())
    assert counts["correct"] == int((logits.argmax(-1) == batch.y)[valid].sum())


def test_induction_heads_targets():
    task = build_task("induction_heads", vocab_size=9)
    batch = next(task.train_batches(64, seq_len=30, seed=4))
    for row, answer in zip(batch.x.tolist(), batch.y.tolist()):
        triggers = [t for t, v in enumerate(row) if v == 8]
        assert len(triggers) == 2 and triggers[1] == 29 and triggers[0] <= 27
        assert row[triggers[0] + 1] == answer and answer != 8
    with pytest.raises(InputError, match="at least 3"):
        task.train_batches(2, seq_len=2)
