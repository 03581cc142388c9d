"""Decoding encoder-decoder models one step at a time: greedy, sampling and batched beam search.

Every function works on a model with the decoding interface of :class:`~rnnkit.models.seq2seq.Seq2Seq`
and :class:`~rnnkit.models.pointer.PointerNetwork`:

    memory, state = model.decode_init(src, src_lengths)        # read the source once
    logits, state = model.decode_step(tokens, state, memory)   # tokens (B,) -> logits (B, V)

where ``state`` and ``memory`` are tensors or (named) tuples of batch-first tensors: beam search
repeats them per beam and reorders the state as beams move, and the decoder's state keeps a constant
size per step (the source is read through the fixed ``memory``). The first step's ``tokens`` are
``bos_id`` (None for a pointer network, which starts from a learned vector).

A hypothesis ends at ``eos_id`` (included in it) or after ``max_len`` tokens; log-probabilities are
the model's own (``log_softmax`` of the logits, before any temperature).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from rnnkit.errors import InputError, check_choice, check_positive_int
from rnnkit.layers import map_state
from rnnkit.models.model import sample_token, sampling_generator


class DecodeResult(NamedTuple):
    """One hypothesis per source: ``tokens`` (B, L) padded with ``pad_id`` after each sequence's end,
    ``lengths`` (B,) tokens per sequence (its EOS included), ``log_probs`` (B,) their summed log-probs."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    log_probs: torch.Tensor


class BeamResult(NamedTuple):
    """The n best hypotheses per source, best first: ``tokens`` (B, N, max_len) padded with ``pad_id``,
    ``lengths`` (B, N), ``scores`` (B, N) (the ranking: log-prob over the length penalty) and
    ``log_probs`` (B, N). A slot no hypothesis reached has score ``-inf`` and length 0."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor
    log_probs: torch.Tensor


def length_penalty(length: int | torch.Tensor, alpha: float, kind: str = "gnmt"):
    """The divisor of a hypothesis's log-prob: ``((5 + |Y|) / 6) ** alpha`` (``"gnmt"``, Wu et al. 2016,
    "Google's Neural Machine Translation System", eq. 14) or ``|Y| ** alpha`` (``"length"``: the mean
    log-prob per token at ``alpha = 1``). ``alpha = 0`` ranks by the plain log-prob."""
    if kind == "gnmt":
        return ((5 + length) / 6) ** alpha
    return length ** alpha


def _check_common(bos_id, eos_id, pad_id) -> None:
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
        if value is not None:
            check_positive_int(name, value, minimum=0)
    check_positive_int("pad_id", pad_id, minimum=0)


def _check_eos(eos_id: int | None, logits: torch.Tensor) -> None:
    """Raise InputError unless the end token is an id of the model's ``(B, V)`` output."""
    if eos_id is not None and eos_id >= logits.shape[-1]:
        raise InputError(f"eos_id: expected an id in [0, {logits.shape[-1]}) (the model's outputs), got {eos_id}")


def _first_tokens(bos_id: int | None, batch: int, device) -> torch.Tensor | None:
    return None if bos_id is None else torch.full((batch,), bos_id, dtype=torch.long, device=device)


def _limits(max_len, batch: int, device) -> torch.Tensor:
    """``max_len`` as ``(B,)`` longs: one int for every source, or a length per source (so that a
    source's hypotheses do not depend on which other sources share its batch)."""
    if not isinstance(max_len, torch.Tensor):
        check_positive_int("max_len", max_len)
        return torch.full((batch,), max_len, dtype=torch.long, device=device)
    integer = not (max_len.dtype.is_floating_point or max_len.dtype.is_complex or max_len.dtype == torch.bool)
    if max_len.dim() != 1 or max_len.shape[0] != batch or not integer:
        raise InputError(f"max_len: expected an int or ({batch},) integer tensor (one limit per source), "
                         f"got {max_len.dtype} tensor of shape {tuple(max_len.shape)}")
    if bool((max_len < 1).any()):
        raise InputError(f"max_len: expected every limit >= 1, got minimum {int(max_len.min())}")
    return max_len.to(device=device, dtype=torch.long)


def _batch_size(memory: Any) -> tuple[int, torch.device]:
    leaf = memory
    while not isinstance(leaf, torch.Tensor):
        leaf = leaf[0]
    return leaf.shape[0], leaf.device


@torch.no_grad()
def _decode_one_path(model, src, src_lengths, max_len, bos_id, eos_id, pad_id,
                     choose: Callable[[torch.Tensor], torch.Tensor]) -> DecodeResult:
    """Extend one hypothesis per source by ``choose(logits (B, V)) -> (B,)`` until EOS or ``max_len``."""
    _check_common(bos_id, eos_id, pad_id)
    memory, state = model.decode_init(src, src_lengths)
    batch, device = _batch_size(memory)
    limits = _limits(max_len, batch, device)
    tokens = _first_tokens(bos_id, batch, device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    total = torch.zeros(batch, dtype=torch.float64, device=device)
    chosen = []
    for t in range(1, int(limits.max()) + 1):
        logits, state = model.decode_step(tokens, state, memory)
        _check_eos(eos_id, logits)
        log_probs = torch.log_softmax(logits.double(), -1)
        tokens = choose(logits)
        total += torch.where(finished, 0.0, log_probs.gather(-1, tokens[:, None]).squeeze(1))
        lengths += (~finished).long()
        chosen.append(torch.where(finished, pad_id, tokens))
        if eos_id is not None:
            finished |= tokens == eos_id
        finished |= limits <= t
        if bool(finished.all()):
            break
    return DecodeResult(torch.stack(chosen, 1), lengths, total)


def greedy_decode(model, src, src_lengths=None, *, max_len: int | torch.Tensor, bos_id: int | None = None,
                  eos_id: int | None = None, pad_id: int = 0) -> DecodeResult:
    """The most likely token at every step.

    Args:
        model: a model with the decoding interface (module docstring), in eval mode.
        src: ``(B, S)`` source ids or ``(B, S, D_in)`` features; ``src_lengths`` ``(B,)``.
        max_len: the most tokens per hypothesis (EOS included): an int, or a ``(B,)`` tensor of
            one limit per source (a source's result then does not depend on its batch).
        bos_id: the start token (None for pointer networks); ``eos_id``: the end token (None: none).
        pad_id: written after each sequence's end.

    Returns:
        :class:`DecodeResult`.
    """
    return _decode_one_path(model, src, src_lengths, max_len, bos_id, eos_id, pad_id,
                            lambda logits: logits.argmax(-1))


def sample_decode(model, src, src_lengths=None, *, max_len: int | torch.Tensor, bos_id: int | None = None,
                  eos_id: int | None = None, pad_id: int = 0, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> DecodeResult:
    """Sampling with temperature, top-k and nucleus (top-p) filtering, as ``SequenceModel.generate``
    (same options and sampler); the same ``seed`` draws the same samples. Other arguments as
    :func:`greedy_decode`; ``log_probs`` are the model's, before temperature and filtering."""
    generator = sampling_generator(temperature, top_k, top_p, seed, next(model.parameters()).device)
    return _decode_one_path(model, src, src_lengths, max_len, bos_id, eos_id, pad_id,
                            lambda logits: sample_token(logits, temperature, top_k, top_p, generator))


@torch.no_grad()
def beam_search(model, src, src_lengths=None, *, beam_size: int = 5, max_len: int | torch.Tensor,
                bos_id: int | None = None, eos_id: int | None = None, n_best: int = 1, alpha: float = 0.0,
                penalty: str = "gnmt", pad_id: int = 0) -> BeamResult:
    """Batched beam search: ``beam_size`` hypotheses per source advanced together, one
    ``decode_step`` for the whole batch of ``B * beam_size`` hypotheses per step.

    At each step every live hypothesis is extended by every token; of these candidates, those among
    the ``beam_size`` best that end in ``eos_id`` are finished, and the ``beam_size`` best that do not
    stay alive (all live hypotheses have the same length, so the log-prob ranks them). A source is done
    once ``beam_size`` hypotheses have finished; at ``max_len`` the best live ones finish as they
    are. Finished hypotheses are ranked by ``log_prob / length_penalty(len, alpha, penalty)`` and the
    ``n_best`` best returned. With ``beam_size = 1`` this is greedy decoding; with ``beam_size >= V **
    (max_len - 1)`` no candidate is ever pruned and it is exhaustive search.

    Args:
        model, src, src_lengths, max_len, bos_id, eos_id, pad_id: as :func:`greedy_decode`.
        beam_size: hypotheses kept per source.
        n_best: hypotheses returned per source, at most ``beam_size``.
        alpha: length penalty exponent (:func:`length_penalty`); 0 ranks by log-prob.
        penalty: ``"gnmt"`` or ``"length"``.

    Returns:
        :class:`BeamResult`.
    """
    _check_common(bos_id, eos_id, pad_id)
    check_positive_int("beam_size", beam_size)
    check_positive_int("n_best", n_best)
    if n_best > beam_size:
        raise InputError(f"n_best: expected at most beam_size = {beam_size}, got {n_best}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha < 0:
        raise InputError(f"alpha: expected a number >= 0, got {alpha!r}")
    check_choice("penalty", penalty, ("gnmt", "length"))
    memory, state = model.decode_init(src, src_lengths)
    batch, device = _batch_size(memory)
    limits = _limits(max_len, batch, device)
    max_len = int(limits.max())
    k = beam_size
    per_beam = torch.arange(batch, device=device).repeat_interleave(k)  # (B K,)
    memory = map_state(lambda t: t.index_select(0, per_beam), memory)
    state = map_state(lambda t: t.index_select(0, per_beam), state)
    tokens = _first_tokens(bos_id, batch * k, device)
    neg_inf = float("-inf")
    alive = torch.full((batch, k), neg_inf, dtype=torch.float64, device=device)
    alive[:, 0] = 0.0  # one live hypothesis to start, so the first step does not fill the beam with copies
    alive_seq = torch.zeros(batch, k, 0, dtype=torch.long, device=device)
    pool_scores = torch.full((batch, k), neg_inf, dtype=torch.float64, device=device)
    pool_log_probs = pool_scores.clone()
    pool_seq = torch.full((batch, k, max_len), pad_id, dtype=torch.long, device=device)
    pool_len = torch.zeros(batch, k, dtype=torch.long, device=device)
    finished_count = torch.zeros(batch, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)[:, None]
    for t in range(1, max_len + 1):
        logits, state = model.decode_step(tokens, state, memory)
        _check_eos(eos_id, logits)
        vocab = logits.shape[-1]
        candidates = (alive[..., None] + torch.log_softmax(logits.double(), -1).view(batch, k, vocab))
        candidates = candidates.view(batch, k * vocab)
        last = limits == t  # (B,): sources at their limit, whose best live hypotheses finish now
        if eos_id is not None or bool(last.any()):
            top, index = candidates.topk(min(k, k * vocab), -1)
            ends = torch.isfinite(top) & ~done[:, None]
            at_end = last[:, None] if eos_id is None else (index % vocab == eos_id) | last[:, None]
            ends &= at_end
            seq = torch.cat([alive_seq[rows, index // vocab], (index % vocab)[..., None]], -1)  # (B, k, t)
            seq = torch.nn.functional.pad(seq, (0, max_len - t), value=pad_id)
            new_scores = torch.where(ends, top / length_penalty(t, alpha, penalty), neg_inf)
            scores = torch.cat([pool_scores, new_scores], 1)
            order = torch.sort(scores, stable=True, dim=-1, descending=True).indices[:, :k]
            pool_scores = scores.gather(1, order)
            pool_log_probs = torch.cat([pool_log_probs, torch.where(ends, top, neg_inf)], 1).gather(1, order)
            pool_seq = torch.cat([pool_seq, seq], 1)[rows, order]
            pool_len = torch.cat([pool_len, torch.where(ends, t, 0)], 1).gather(1, order)
            finished_count += ends.sum(1)
            done |= (finished_count >= k) | last
        if bool(done.all()):
            break
        if eos_id is not None:
            candidates = candidates.view(batch, k, vocab).index_fill(-1, torch.tensor([eos_id], device=device),
                                                                      neg_inf).view(batch, k * vocab)
        alive, index = candidates.topk(k, -1)
        origin, tokens = index // vocab, index % vocab
        alive_seq = torch.cat([alive_seq[rows, origin], tokens[..., None]], -1)
        state = map_state(lambda s: s.index_select(0, (rows * k + origin).view(-1)), state)
        tokens = tokens.view(-1)
    return BeamResult(pool_seq[:, :n_best], pool_len[:, :n_best], pool_scores[:, :n_best], pool_log_probs[:, :n_best])


__all__ = ["BeamResult", "DecodeResult", "beam_search", "greedy_decode", "length_penalty", "sample_decode"]
