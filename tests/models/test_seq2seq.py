"""Encoder-decoder models: every registered causal layer as the decoder, a representative set of
encoders (bidirectional and residual included), both teacher-forcing paths, the bridges, source
masking, scheduled sampling, the loss, pointer networks, the set encoder, saving and loading."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import rnnkit
from rnnkit.errors import InputError
from rnnkit.layers import flatten_state
from rnnkit.models import PointerNetwork, Seq2Seq, Seq2SeqConfig, seq2seq_loss, teacher_forcing_probability
from rnnkit.models.pointer import PointerConfig
from tests.helpers import assert_close

WRAPPERS = ("bidirectional", "stacked")
CAUSAL_LAYERS = [n for n in rnnkit.layers.names() if n not in WRAPPERS]
D = 8


def tiny_options(layer: str) -> dict:
    """The layer's first contract-suite configuration: small enough for every test here."""
    return dict(next(iter(rnnkit.layers.spec(layer).test_configs.values())))


def batch(seed=0, b=3, s=6, t=5, src_vocab=7, tgt_vocab=6):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, src_vocab, (b, s), generator=g)
    tgt_in = torch.randint(0, tgt_vocab, (b, t), generator=g)
    src_lengths = torch.tensor([s] + [max(1, s - 2 - i) for i in range(b - 1)])
    tgt_lengths = torch.tensor([t] + [max(1, t - 1 - i) for i in range(b - 1)])
    return src, src_lengths, tgt_in, tgt_lengths


def make(seed=0, dtype=torch.float64, **fields) -> Seq2Seq:
    torch.manual_seed(seed)
    fields = {"src_vocab_size": 7, "tgt_vocab_size": 6, "d_model": D, **fields}
    return Seq2Seq(**fields).to(dtype).eval()


def valid_mask(lengths, steps):
    return (torch.arange(steps)[None, :] < lengths[:, None])[..., None]


# ------------------------------------------------------------------------------ every decoder
@pytest.mark.parametrize("layer", CAUSAL_LAYERS)
def test_every_causal_layer_decodes_both_paths_equal_and_trains(layer):
    """Whole-sequence decoder pass == one step at a time (fp64), for every causal layer as decoder
    under a projected bridge from a GRU encoder; every parameter gets a finite gradient."""
    model = make(encoder_layer="gru", decoder_layer=layer, decoder_options=tiny_options(layer), attention="general")
    assert model.bridge.kind == "project"
    src, sl, tin, tl = batch()
    seq = model(src, sl, tin, tl, path="sequence")
    step = model(src, sl, tin, tl, path="step")
    assert seq.shape == (3, 5, 6)
    assert_close(step, seq, dtype=torch.float64)
    assert torch.equal(seq * ~valid_mask(tl, 5), torch.zeros_like(seq))  # zero at target padding
    model.train()
    seq2seq_loss(model(src, sl, tin, tl), tin, tl).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.src_embedding.weight.grad.abs().sum() > 0  # the source reaches the loss
    assert model.bridge.projections[0][0].weight.grad.abs().sum() > 0  # through the bridge too


ENCODERS = [
    {"encoder_layer": "lstm"},
    {"encoder_layer": "gru", "bidirectional": True},
    {"encoder_layer": "lstm", "bidirectional": True, "encoder_layers": 2},
    {"encoder_layer": "mamba", "encoder_options": tiny_options("mamba")},
    {"encoder_layer": "mlstm", "encoder_block": "residual", "encoder_options": tiny_options("mlstm")},
    {"encoder_layer": "attention", "encoder_options": tiny_options("attention"), "bidirectional": True},
    {"encoder_layer": "gla", "encoder_block": "residual", "bidirectional": True, "encoder_options": tiny_options("gla")},
]


def check_source_padding_is_inert(model):
    """NaN and Inf written into the source padding of a feature batch change no logit and no gradient
    (they are removed before the source projection); returns the clean batch and its logits."""
    g = torch.Generator().manual_seed(1)
    src = torch.randn(3, 6, 3, generator=g, dtype=torch.float64)
    sl = torch.tensor([6, 4, 1])
    tin = torch.randint(0, 6, (3, 4), generator=g)
    poisoned = src.clone()
    poisoned[1, 4:] = float("nan")
    poisoned[2, 1:] = float("inf")
    grads = []
    for source in (src, poisoned):
        model.zero_grad()
        logits = model(source, sl, tin)
        logits.sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        if source is src:
            clean = logits.detach()
    assert torch.equal(logits, clean)
    assert all(torch.isfinite(gr).all() for gr in grads[0]) and model.src_embedding.weight.grad.abs().sum() > 0
    assert len(grads[0]) == len(grads[1]) and all(torch.equal(a, b) for a, b in zip(*grads))
    return src, sl, tin, clean


@pytest.mark.parametrize("encoder", ENCODERS, ids=lambda e: "-".join(str(v) for v in e.values() if not isinstance(v, dict)))
@pytest.mark.parametrize("attention", ["none", "additive", "multihead"])
def test_encoders_mask_source_padding(encoder, attention):
    """Padding is inert (NaN there changes nothing), and a padded batch equals each sequence alone."""
    fields = dict(encoder, attention=attention, num_heads=2 if attention == "multihead" else 1)
    model = make(src_vocab_size=None, src_d_input=3, **fields)
    src, sl, tin, logits = check_source_padding_is_inert(model)
    for b in range(3):
        alone = model(src[b : b + 1, : sl[b]], None, tin[b : b + 1])
        assert_close(alone[0], logits[b], dtype=torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("layer", CAUSAL_LAYERS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_every_layer_as_encoder(layer, bidirectional):
    """Every registered recurrence as the encoder, one or both directions: source padding inert, both
    decoder paths equal."""
    model = make(encoder_layer=layer, encoder_options=tiny_options(layer), bidirectional=bidirectional,
                 attention="additive", src_vocab_size=None, src_d_input=3)
    src, sl, tin, logits = check_source_padding_is_inert(model)
    assert_close(model(src, sl, tin, path="step"), logits, dtype=torch.float64)


@pytest.mark.parametrize("attention", ["additive", "dot", "general", "multihead"])
@pytest.mark.parametrize("feeding", [False, True])
def test_decode_step_equals_teacher_forcing(attention, feeding):
    """The decoding interface (decode_init, decode_step fed the true tokens) computes the training
    forward's logits, with and without input feeding."""
    model = make(attention=attention, input_feeding=feeding, num_heads=2, bidirectional=attention == "general")
    src, sl, tin, tl = batch(2)
    logits = model(src, sl, tin)
    memory, state = model.decode_init(src, sl)
    steps = []
    for t in range(tin.shape[1]):
        out, state = model.decode_step(tin[:, t], state, memory)
        steps.append(out)
    assert_close(torch.stack(steps, 1), logits, dtype=torch.float64)


def test_input_feeding_changes_the_function_and_sequence_path_refuses_it():
    plain = make(attention="general")
    fed = make(attention="general", input_feeding=True)
    src, sl, tin, tl = batch()
    assert not torch.allclose(plain(src, sl, tin), fed(src, sl, tin))
    with pytest.raises(InputError, match="path"):
        fed(src, sl, tin, path="sequence")
    # The next step reads the attentional vector of the step before.
    memory, state = fed.decode_init(src, sl)
    _, state = fed.decode_step(tin[:, 0], state, memory)
    assert state.feed.shape == (3, D) and state.feed.abs().sum() > 0
    fed_logits, _ = fed.decode_step(tin[:, 1], state, memory)
    unfed_logits, _ = fed.decode_step(tin[:, 1], state._replace(feed=torch.zeros_like(state.feed)), memory)
    assert not torch.allclose(fed_logits, unfed_logits)


def test_attention_weights_ignore_source_padding():
    model = make(attention="additive")
    src, sl, _, _ = batch()
    memory, state = model.decode_init(src, sl)
    h = torch.randn(3, 2, model.decoder.d_output, dtype=torch.float64)
    _, weights = model.attention(h, memory)
    assert torch.equal(weights * ~memory.mask[:, None], torch.zeros_like(weights))
    assert_close(weights.sum(-1), torch.ones(3, 2, dtype=torch.float64), dtype=torch.float64)


# ------------------------------------------------------------------------------ bridges
def test_copy_bridge_hands_over_the_encoder_state():
    model = make(encoder_layer="lstm", decoder_layer="lstm", encoder_layers=2, decoder_layers=2, attention="none")
    assert model.bridge.kind == "copy"
    src, sl, _, _ = batch()
    _, state = model.decode_init(src, sl)
    x = model.src_embedding(src)
    _, final = model.encoder(x, None, sl)
    for got, want in zip(flatten_state(state.rnn), flatten_state(final)):
        assert torch.equal(got, want)


def test_zeros_bridge_starts_from_the_initial_state_and_copy_refuses_other_structures():
    model = make(bridge="zeros", decoder_layer="gru")
    src, sl, _, _ = batch()
    _, state = model.decode_init(src, sl)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in flatten_state(state.rnn))
    for fields in ({"encoder_layer": "gru"}, {"bidirectional": True}, {"decoder_layers": 2}):
        with pytest.raises(InputError, match="bridge"):
            make(bridge="copy", **fields)


def test_project_bridge_writes_every_floating_state_part():
    model = make(encoder_layer="gru", decoder_layer="lstm", decoder_layers=2)
    src, sl, _, _ = batch()
    _, state = model.decode_init(src, sl)
    assert all(t.abs().sum() > 0 for t in flatten_state(state.rnn))


# ------------------------------------------------------------------------------ scheduled sampling
def test_scheduled_sampling_is_deterministic_and_feeds_model_samples():
    model = make(attention="general")
    src, sl, tin, tl = batch(3)
    run = lambda p, seed, tgt=tin: model(src, sl, tgt, tl, teacher_forcing=p, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(0.5, 7), run(0.5, 7))
    assert_close(run(1.0, 7), model(src, sl, tin, tl), dtype=torch.float64)
    # At probability 0 the true tokens after the first are never read.
    other = tin.clone()
    other[:, 1:] = (other[:, 1:] + 1) % 6
    assert torch.equal(run(0.0, 3), run(0.0, 3, other))
    assert not torch.equal(run(1.0, 3), run(1.0, 3, other))
    with pytest.raises(InputError, match="teacher_forcing"):
        run(1.5, 0)


def test_teacher_forcing_schedules():
    assert teacher_forcing_probability(0, "linear", slope=0.1) == 1.0
    assert teacher_forcing_probability(5, "linear", slope=0.1) == pytest.approx(0.5)
    assert teacher_forcing_probability(50, "linear", slope=0.1, minimum=0.2) == 0.2
    assert teacher_forcing_probability(10, "exponential", k=0.9) == pytest.approx(0.9 ** 10)
    assert teacher_forcing_probability(100, "inverse_sigmoid", k=10) == pytest.approx(10 / (10 + math.exp(10)))
    assert teacher_forcing_probability(10 ** 9, "inverse_sigmoid", k=10) == 0.0
    for schedule in ("linear", "exponential", "inverse_sigmoid"):
        values = [teacher_forcing_probability(s, schedule) for s in range(0, 20000, 1000)]
        assert all(a >= b for a, b in zip(values, values[1:])) and values[0] <= 1 and values[-1] < values[0]
    for kwargs, name in (({"schedule": "cosine"}, "schedule"), ({"schedule": "exponential", "k": 2}, "k"),
                         ({"schedule": "inverse_sigmoid", "k": 0.5}, "k"), ({"step": -1}, "step")):
        with pytest.raises(InputError, match=name):
            teacher_forcing_probability(**{"step": 1, **kwargs})


# ------------------------------------------------------------------------------ loss
def test_loss_matches_cross_entropy_and_masks_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 7, (3, 5), generator=g)
    lengths = torch.tensor([5, 2, 3])
    mask = valid_mask(lengths, 5)[..., 0]
    for eps in (0.0, 0.1):
        want = F.cross_entropy(logits[mask], targets[mask], label_smoothing=eps)
        assert_close(seq2seq_loss(logits, targets, lengths, label_smoothing=eps), want, dtype=torch.float64)
    total = seq2seq_loss(logits, targets, lengths, reduction="sum")
    assert_close(total, F.cross_entropy(logits[mask], targets[mask], reduction="sum"), dtype=torch.float64)
    poisoned = logits.detach().clone()
    poisoned[1, 2:] = float("nan")
    wild = targets.clone()
    wild[1, 2:] = 99
    poisoned.requires_grad_(True)
    loss = seq2seq_loss(poisoned, wild, lengths, label_smoothing=0.1)
    loss.backward()
    assert torch.isfinite(poisoned.grad).all() and torch.equal(poisoned.grad[1, 2:], torch.zeros(3, 7, dtype=torch.float64))
    assert_close(loss, seq2seq_loss(logits, targets, lengths, label_smoothing=0.1), dtype=torch.float64)
    with pytest.raises(InputError, match="targets"):
        seq2seq_loss(logits, targets.clamp(max=6) + 1, lengths)
    with pytest.raises(InputError, match="label_smoothing"):
        seq2seq_loss(logits, targets, lengths, label_smoothing=1.0)


def test_loss_smooths_over_allowed_classes_only():
    logits = torch.tensor([[[0.0, 1.0, float("-inf")]]], dtype=torch.float64, requires_grad=True)
    loss = seq2seq_loss(logits, torch.tensor([[1]]), label_smoothing=0.2)
    log_p = torch.log_softmax(torch.tensor([0.0, 1.0], dtype=torch.float64), -1)
    assert_close(loss, -(0.8 * log_p[1] + 0.2 * log_p.mean()), dtype=torch.float64)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


# ------------------------------------------------------------------------------ pointer networks
def pointer_batch(seed=0, b=3, n=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, 2, generator=g, dtype=torch.float64)
    lengths = torch.tensor([n] + [max(1, n - 1 - i) for i in range(b - 1)])
    targets = torch.stack([torch.cat([torch.randperm(int(l), generator=g), torch.zeros(n - int(l), dtype=torch.long)])
                           for l in lengths])
    return x, lengths, targets


def make_pointer(seed=0, **fields) -> PointerNetwork:
    torch.manual_seed(seed)
    return PointerNetwork(**{"d_input": 2, "d_model": D, **fields}).double().eval()


@pytest.mark.parametrize("fields", [
    {"encoder": "rnn"}, {"encoder": "rnn", "bidirectional": True, "decoder_layer": "gru"},
    {"encoder": "set", "process_steps": 3}, {"encoder": "set", "process_layer": "mingru", "mask_chosen": False},
    {"encoder": "rnn", "encoder_layer": "mamba", "encoder_options": tiny_options("mamba"),
     "decoder_layer": "attention", "decoder_options": tiny_options("attention")},
], ids=["rnn", "birnn-gru", "set", "set-mingru-nomask", "mamba-attention"])
def test_pointer_scores_step_equals_teacher_forcing_and_masks(fields):
    net = make_pointer(**fields)
    x, sl, targets = pointer_batch()
    scores = net(x, sl, targets, sl)  # (B, T, n)
    assert scores.shape == (3, 5, 5)
    memory, state = net.decode_init(x, sl)
    tokens, steps = None, []
    for t in range(5):
        out, state = net.decode_step(tokens, state, memory)
        steps.append(out)
        tokens = targets[:, t]
    steps = torch.stack(steps, 1)
    valid = valid_mask(sl, 5).expand_as(scores)
    assert torch.equal(torch.isinf(steps) & valid, torch.isinf(scores) & valid)
    finite = torch.isfinite(scores) & valid
    assert_close(steps[finite], scores[finite], dtype=torch.float64)
    for b, length in enumerate(sl.tolist()):
        assert torch.isinf(scores[b, :length, length:]).all()  # source padding is never pointed at
        for t in range(length):
            chosen = set(targets[b, :t].tolist())
            for j in range(length):
                assert bool(torch.isinf(scores[b, t, j])) == (net.config.mask_chosen and j in chosen)
    loss = seq2seq_loss(scores, targets, sl, label_smoothing=0.1)
    net.train()
    seq2seq_loss(net(x, sl, targets, sl), targets, sl).backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_read_process_write_is_order_invariant():
    """Permuting the input set leaves the process summary unchanged and permutes the pointer's
    scores with it."""
    net = make_pointer(encoder="set", process_steps=4)
    x, _, _ = pointer_batch(4, b=2, n=6)
    g = torch.Generator().manual_seed(5)
    targets = torch.stack([torch.randperm(6, generator=g) for _ in range(2)])  # (B, n): full permutations
    perm = torch.randperm(6, generator=g)
    inverse = perm.argsort()
    memory, state = net.decode_init(x)
    memory_p, state_p = net.decode_init(x[:, perm])
    for a, b in zip(flatten_state(state.rnn), flatten_state(state_p.rnn)):
        assert_close(b, a, dtype=torch.float64)
    scores = net(x, None, targets)
    scores_p = net(x[:, perm], None, inverse[targets])  # the same elements, at their new positions
    finite = torch.isfinite(scores)
    assert torch.equal(torch.isfinite(scores_p[..., inverse]), finite)
    assert_close(scores_p[..., inverse][finite], scores[finite], dtype=torch.float64)


def test_pointer_rejects_positions_outside_the_source():
    net = make_pointer()
    x, sl, targets = pointer_batch()
    bad = targets.clone()
    bad[2, 0] = 4  # sequence 2 has 3 elements
    with pytest.raises(InputError, match="targets"):
        net(x, sl, bad, sl)
    repeat = targets.clone()
    repeat[0, 1] = repeat[0, 0]
    with pytest.raises(InputError, match="at most once"):
        net(x, sl, repeat, sl)
    make_pointer(mask_chosen=False)(x, sl, repeat, sl)  # repeats are allowed without the mask
    with pytest.raises(InputError, match="bridge"):
        PointerConfig(d_input=2, encoder="set", bridge="copy")


# ------------------------------------------------------------------------------ config, save, load
def test_config_round_trips_and_rejects_bad_fields():
    config = Seq2SeqConfig(src_vocab_size=5, tgt_vocab_size=4, attention="multihead", num_heads=2,
                           decoder_options={"hidden_size": 6})
    assert Seq2SeqConfig.from_dict(config.to_dict()) == config
    pointer = PointerConfig(d_input=2, encoder="set")
    assert PointerConfig.from_dict(pointer.to_dict()) == pointer
    cases = [
        ({"src_vocab_size": 5}, "tgt_vocab_size"),
        ({"tgt_vocab_size": 4}, "src_vocab_size"),
        ({"src_vocab_size": 5, "tgt_vocab_size": 4, "decoder_layer": "bidirectional"}, "decoder_layer"),
        ({"src_vocab_size": 5, "tgt_vocab_size": 4, "attention": "luong"}, "attention"),
        ({"src_vocab_size": 5, "tgt_vocab_size": 4, "attention": "none", "input_feeding": True}, "input_feeding"),
        ({"src_vocab_size": 5, "tgt_vocab_size": 4, "decoder_options": {"num_layers": 2}}, "decoder_options"),
        ({"src_vocab_size": 5, "tgt_vocab_size": 4, "attention": "multihead", "num_heads": 3, "d_model": 8}, "num_heads"),
    ]
    for fields, name in cases:
        with pytest.raises(InputError, match=name):
            Seq2SeqConfig(**fields)
    with pytest.raises(InputError, match="unknown"):
        Seq2SeqConfig.from_dict({"tgt_vocab_size": 4, "src_vocab_size": 5, "heads": 2})
    with pytest.raises(InputError, match="dot"):
        make(attention="dot", bidirectional=True)


def test_bad_inputs_name_the_argument():
    model = make()
    src, sl, tin, tl = batch()
    with pytest.raises(InputError, match="src"):
        model(src.float(), sl, tin)
    with pytest.raises(InputError, match="tgt_in"):
        model(src, sl, tin + 6)
    with pytest.raises(InputError, match="tgt_in"):
        model(src, sl, None)
    with pytest.raises(InputError, match="lengths"):
        model(src, torch.tensor([7, 1, 1]), tin)
    with pytest.raises(InputError, match="tokens"):
        memory, state = model.decode_init(src, sl)
        model.decode_step(None, state, memory)


@pytest.mark.parametrize("kind", ["seq2seq", "pointer"])
def test_save_and_load_round_trip(tmp_path, kind):
    if kind == "seq2seq":
        model = make(attention="additive", input_feeding=True, tie_embeddings=True, bidirectional=True)
        args = batch()
    else:
        model = make_pointer(encoder="set")
        x, sl, targets = pointer_batch()
        args = (x, sl, targets, sl)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).double().eval()
    assert loaded.config == model.config
    assert torch.equal(loaded(*args), model(*args))
    with pytest.raises(InputError, match=model.CONFIG_KEY):
        (PointerNetwork if kind == "seq2seq" else Seq2Seq).from_pretrained(tmp_path)


def test_tied_embeddings_share_one_matrix():
    model = make(tie_embeddings=True)
    assert model.out.weight is model.tgt_embedding.weight
    with pytest.raises(InputError, match="tie_embeddings"):
        make(tie_embeddings=True, attention="none", decoder_options={"hidden_size": 5})


def test_float32_training_steps_reduce_the_loss():
    """A few AdamW steps on a copy task: the plain PyTorch loop of docs/seq2seq.md learns."""
    model = make(dtype=torch.float32, attention="additive", d_model=16).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(2, 7, (16, 5), generator=g)
    targets = torch.cat([src % 6, torch.ones(16, 1, dtype=torch.long)], 1)  # copy, then EOS = 1
    tgt_in = torch.cat([torch.zeros(16, 1, dtype=torch.long), targets[:, :-1]], 1)  # BOS = 0
    losses = []
    for _ in range(30):
        loss = seq2seq_loss(model(src, None, tgt_in), targets, label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
