"""Decoding: beam search against exhaustive search, beam 1 against greedy, batched beams against one
source at a time, returned scores against the model's teacher-forced log-probabilities; sampling."""

from __future__ import annotations

import itertools

import pytest
import torch

from rnnkit.errors import InputError
from rnnkit.models import PointerNetwork, Seq2Seq
from rnnkit.models.decoding import beam_search, greedy_decode, length_penalty, sample_decode
from tests.helpers import assert_close

BOS, EOS = 0, 1


def make(seed=0, vocab=3, **fields) -> Seq2Seq:
    torch.manual_seed(seed)
    fields = {"src_vocab_size": 5, "tgt_vocab_size": vocab, "d_model": 6, "attention": "additive", **fields}
    model = Seq2Seq(**fields).double().eval()
    with torch.no_grad():  # a wider spread of probabilities than the initialisation gives
        model.out.weight.mul_(4)
    return model


def sources(seed=0, b=3, s=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5, (b, s), generator=g), torch.tensor([s] + [max(1, s - 1 - i) for i in range(b - 1)])


@torch.no_grad()
def teacher_forced_log_probs(model, src, src_lengths, seqs: list[list[int]]) -> torch.Tensor:
    """Sum of the model's log-probabilities of each sequence ``seqs[i]`` given ``src[i]`` (B,)."""
    steps = max(len(s) for s in seqs)
    targets = torch.tensor([s + [0] * (steps - len(s)) for s in seqs])
    tgt_in = torch.cat([torch.full((len(seqs), 1), BOS), targets[:, :-1]], 1)
    lengths = torch.tensor([len(s) for s in seqs])
    log_probs = torch.log_softmax(model(src, src_lengths, tgt_in, lengths), -1).gather(-1, targets[..., None])[..., 0]
    mask = torch.arange(steps)[None, :] < lengths[:, None]
    return torch.where(mask, log_probs, 0.0).sum(1)


def all_hypotheses(vocab: int, max_len: int) -> list[list[int]]:
    """Every output of at most ``max_len`` tokens: ending at its first EOS, or ``max_len`` tokens without."""
    others = [v for v in range(vocab) if v != EOS]
    out = []
    for n in range(max_len):
        out += [list(p) + [EOS] for p in itertools.product(others, repeat=n)]
    out += [list(p) for p in itertools.product(others, repeat=max_len)]
    return out


def hypotheses_of(result, b: int) -> list[tuple[list[int], float]]:
    return [(result.tokens[b, i, : result.lengths[b, i]].tolist(), float(result.scores[b, i]))
            for i in range(result.tokens.shape[1]) if result.lengths[b, i] > 0]


@pytest.mark.parametrize("max_len, beam_size", [(2, 3), (3, 9)])
@pytest.mark.parametrize("alpha, penalty", [(0.0, "gnmt"), (0.8, "gnmt"), (1.0, "length")])
def test_beam_equals_exhaustive_search(max_len, beam_size, alpha, penalty):
    """With beam_size >= V ** (max_len - 1) nothing is ever pruned (beam = V at max_len 2): the n-best
    list is exactly the best of all hypotheses, ranked by the length-penalised score."""
    model = make(input_feeding=True)
    src, sl = sources()
    result = beam_search(model, src, sl, beam_size=beam_size, max_len=max_len, bos_id=BOS, eos_id=EOS,
                         n_best=beam_size, alpha=alpha, penalty=penalty)
    hyps = all_hypotheses(3, max_len)
    for b in range(src.shape[0]):
        log_probs = teacher_forced_log_probs(model, src[b : b + 1].expand(len(hyps), -1),
                                             sl[b : b + 1].expand(len(hyps)), hyps)
        scores = [float(lp) / length_penalty(len(h), alpha, penalty) for h, lp in zip(hyps, log_probs)]
        ranked = sorted(zip(hyps, scores), key=lambda hs: -hs[1])[:beam_size]
        got = hypotheses_of(result, b)
        assert [h for h, _ in got] == [h for h, _ in ranked]
        assert_close(torch.tensor([s for _, s in got]), torch.tensor([s for _, s in ranked]), dtype=torch.float64)


@pytest.mark.parametrize("fields", [
    {"attention": "none", "decoder_layer": "gru", "encoder_layer": "gru"},
    {"attention": "general", "input_feeding": True, "bidirectional": True},
    {"attention": "multihead", "num_heads": 2, "decoder_layer": "mingru"},
], ids=["none-gru", "general-feeding-bi", "multihead-mingru"])
def test_beam_one_is_greedy_and_scores_are_model_log_probs(fields):
    model = make(seed=1, vocab=5, **fields)
    src, sl = sources(1, b=4, s=5)
    greedy = greedy_decode(model, src, sl, max_len=6, bos_id=BOS, eos_id=EOS)
    beam = beam_search(model, src, sl, beam_size=1, max_len=6, bos_id=BOS, eos_id=EOS)
    assert torch.equal(beam.lengths[:, 0], greedy.lengths)
    for b in range(4):
        n = int(greedy.lengths[b])
        assert beam.tokens[b, 0, :n].tolist() == greedy.tokens[b, :n].tolist()
        assert (greedy.tokens[b, n:] == 0).all()  # pad_id after the end
    assert_close(beam.log_probs[:, 0], greedy.log_probs, dtype=torch.float64)
    wide = beam_search(model, src, sl, beam_size=4, max_len=6, bos_id=BOS, eos_id=EOS, n_best=3, alpha=0.6)
    seqs = [(b, wide.tokens[b, i, : wide.lengths[b, i]].tolist()) for b in range(4) for i in range(3)]
    recomputed = teacher_forced_log_probs(model, src[[b for b, _ in seqs]], sl[[b for b, _ in seqs]],
                                          [s for _, s in seqs])
    assert_close(wide.log_probs.reshape(-1), recomputed, dtype=torch.float64)
    penalties = length_penalty(wide.lengths.double(), 0.6)
    assert_close(wide.scores, wide.log_probs / penalties, dtype=torch.float64)
    assert (wide.scores[:, :-1] >= wide.scores[:, 1:]).all()  # best first


def test_batched_beams_equal_per_source_beams():
    model = make(seed=2, vocab=6, input_feeding=True, decoder_layer="lstm", decoder_layers=2)
    src, sl = sources(2, b=4, s=5)
    batched = beam_search(model, src, sl, beam_size=3, max_len=7, bos_id=BOS, eos_id=EOS, n_best=3, alpha=0.6)
    for b in range(4):
        alone = beam_search(model, src[b : b + 1, : sl[b]], None, beam_size=3, max_len=7, bos_id=BOS, eos_id=EOS,
                            n_best=3, alpha=0.6)
        assert torch.equal(alone.tokens[0], batched.tokens[b])
        assert torch.equal(alone.lengths[0], batched.lengths[b])
        assert_close(alone.scores[0], batched.scores[b], dtype=torch.float64)


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = make(seed=3, vocab=6)
    src, sl = sources(3)
    kwargs = dict(max_len=6, bos_id=BOS, eos_id=EOS)
    first = sample_decode(model, src, sl, seed=5, temperature=1.5, top_p=0.9, **kwargs)
    again = sample_decode(model, src, sl, seed=5, temperature=1.5, top_p=0.9, **kwargs)
    assert torch.equal(first.tokens, again.tokens)
    greedy = greedy_decode(model, src, sl, **kwargs)
    top1 = sample_decode(model, src, sl, seed=0, top_k=1, **kwargs)
    assert torch.equal(top1.tokens, greedy.tokens)
    samples = {tuple(sample_decode(model, src, sl, seed=s, **kwargs).tokens[0].tolist()) for s in range(8)}
    assert len(samples) > 1
    with pytest.raises(InputError, match="temperature"):
        sample_decode(model, src, sl, temperature=0.0, **kwargs)


def test_pointer_beam_never_repeats_a_position():
    torch.manual_seed(0)
    net = PointerNetwork(d_input=2, d_model=6, encoder="set").double().eval()
    x = torch.randn(2, 5, 2, dtype=torch.float64)
    lengths = torch.tensor([5, 4])
    result = beam_search(net, x, lengths, beam_size=4, max_len=4, n_best=4)
    for b, n in enumerate(lengths.tolist()):
        for i in range(4):
            seq = result.tokens[b, i].tolist()
            assert len(set(seq)) == 4 and max(seq) < n
    greedy = greedy_decode(net, x, lengths, max_len=4)
    assert torch.equal(beam_search(net, x, lengths, beam_size=1, max_len=4).tokens[:, 0], greedy.tokens)


def test_bad_arguments_name_themselves():
    model = make()
    src, sl = sources()
    for kwargs, name in (({"beam_size": 0}, "beam_size"), ({"n_best": 4, "beam_size": 3}, "n_best"),
                         ({"alpha": -1.0}, "alpha"), ({"penalty": "wu"}, "penalty"), ({"max_len": 0}, "max_len"),
                         ({"eos_id": -1}, "eos_id"), ({"eos_id": 3}, "eos_id")):
        with pytest.raises(InputError, match=name):
            beam_search(model, src, sl, **{"max_len": 3, "bos_id": BOS, "eos_id": EOS, **kwargs})
    with pytest.raises(InputError, match="tokens"):
        greedy_decode(model, src, sl, max_len=3)  # a Seq2Seq model needs its start token


def test_search_stops_once_every_source_has_its_beam_finished():
    model = make(seed=4, vocab=4)
    with torch.no_grad():
        model.out.bias[EOS] = 30.0  # EOS first at every step, then the other tokens
    calls = []
    step = model.decode_step
    model.decode_step = lambda *args: calls.append(1) or step(*args)
    src, sl = sources(4)
    result = beam_search(model, src, sl, beam_size=2, max_len=20, bos_id=BOS, eos_id=EOS, n_best=2)
    assert len(calls) == 2  # [EOS] finishes at step 1, [x, EOS] at step 2: two per source
    assert (result.lengths == torch.tensor([1, 2])).all()
    calls.clear()
    greedy_decode(model, src, sl, max_len=20, bos_id=BOS, eos_id=EOS)
    assert len(calls) == 1


def test_per_source_max_len_decodes_each_source_as_alone():
    """A ``(B,)`` ``max_len`` stops each source at its own limit: batched results equal each source
    decoded alone with its limit, for beams and greedy, including hypotheses cut at the limit."""
    model = make(seed=5, vocab=6)
    with torch.no_grad():
        model.out.bias[EOS] = -30.0  # no hypothesis ends early: every one runs to its limit
    src, sl = sources(5, b=4, s=5)
    limits = torch.tensor([2, 5, 3, 1])
    batched = beam_search(model, src, sl, beam_size=3, max_len=limits, bos_id=BOS, eos_id=EOS, n_best=2)
    greedy = greedy_decode(model, src, sl, max_len=limits, bos_id=BOS, eos_id=EOS)
    for b, n in enumerate(limits.tolist()):
        one = src[b : b + 1, : sl[b]]
        alone = beam_search(model, one, None, beam_size=3, max_len=n, bos_id=BOS, eos_id=EOS, n_best=2)
        assert torch.equal(batched.lengths[b], alone.lengths[0]) and (alone.lengths[0] == n).all()
        assert torch.equal(batched.tokens[b, :, :n], alone.tokens[0])
        assert (batched.tokens[b, :, n:] == 0).all()
        assert_close(batched.scores[b], alone.scores[0], dtype=torch.float64)
        g = greedy_decode(model, one, None, max_len=n, bos_id=BOS, eos_id=EOS)
        assert int(greedy.lengths[b]) == n and torch.equal(greedy.tokens[b, :n], g.tokens[0])
    for bad in (torch.tensor([2, 3]), torch.tensor([2.0, 5.0, 3.0, 1.0]), torch.tensor([2, 0, 3, 1])):
        with pytest.raises(InputError, match="max_len"):
            beam_search(model, src, sl, max_len=bad, bos_id=BOS, eos_id=EOS)


def test_task_decode_options_give_each_source_its_own_limit():
    from rnnkit.tasks import build_task

    task = build_task("reverse")
    lengths = torch.tensor([3, 7, 5])
    limits = task.decode_options(lengths)["max_len"]
    assert limits.tolist() == [task.max_target_len(torch.tensor([n])) for n in (3, 7, 5)]
