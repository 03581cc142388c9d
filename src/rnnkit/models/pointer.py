"""Pointer networks and the Read-Process-Write set encoder.

- Vinyals, Fortunato & Jaitly 2015, "Pointer Networks": the output at each decoder step is the
  attention distribution over the input positions, ``u_j = v^T tanh(W_1 e_j + W_2 d_t)`` with ``e_j`` the
  encoder's outputs and ``d_t`` the decoder's; the next decoder input is the chosen element's
  embedding (a learned start vector first). Outputs are positions, so the output vocabulary is the
  input itself (convex hulls, sorting, routing). ``mask_chosen=True`` forbids choosing a position twice
  (the scores of chosen positions are ``-inf``), which makes every output a permutation prefix.
- Vinyals, Bengio & Kudlur 2016, "Order Matters: Sequence to Sequence for Sets": ``encoder="set"`` is
  the Read-Process-Write model. *Read* embeds each element on its own (``m_i``); *process* runs a
  recurrence with no input for ``P`` steps, each attending over the memories by content,
  ``q_t = f(q*_{t-1})``, ``a = softmax_i(m_i . q_t)``, ``r_t = sum_i a_i m_i``, ``q*_t = [q_t; r_t]``;
  *write* is the pointer decoder, started from ``q*_P`` through the bridge. Nothing in read or process
  depends on the order of the elements, so the summary ``q*_P`` is invariant to permuting them and the
  pointer's distributions permute with them.

Any registered causal recurrence serves as the process block and the decoder; the ``rnn`` encoder is
any recurrence (stacked or residual, bidirectional allowed), bridged as in :mod:`rnnkit.models.seq2seq`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch
from torch import nn

from rnnkit.errors import InputError, check_choice, check_lengths, check_positive_int, check_probability, describe
from rnnkit.layers import build
from rnnkit.layers.base import Recurrence, length_mask
from rnnkit.models.io import Pretrained
from rnnkit.models.model import build_body
from rnnkit.models.seq2seq import (
    BRIDGES, Bridge, ConfigDict, CrossAttention, Memory, check_bool_field, check_layer_field, check_options_field,
    check_source, pool_memory, source_mask, zero_padding,
)


@dataclass
class PointerConfig(ConfigDict):
    """Configuration of a :class:`PointerNetwork` (saved as JSON with it)."""

    d_input: int | None = None  # features per input element
    d_model: int = 128  # D
    encoder: str = "rnn"  # "rnn" (a sequence encoder) or "set" (Read-Process-Write)
    encoder_layer: str = "lstm"  # rnn encoder: any registered recurrence
    encoder_block: str = "stacked"  # rnn encoder: "stacked" or "residual"
    encoder_layers: int = 1
    encoder_options: dict = field(default_factory=dict)
    bidirectional: bool = False  # rnn encoder in both directions
    process_steps: int = 3  # set encoder: P
    process_layer: str = "lstm"  # set encoder: the process block's causal recurrence
    process_options: dict = field(default_factory=dict)
    decoder_layer: str = "lstm"  # any registered causal recurrence
    decoder_layers: int = 1
    decoder_options: dict = field(default_factory=dict)
    mask_chosen: bool = True  # a position is chosen at most once
    bridge: str = "auto"  # as Seq2SeqConfig.bridge ("copy" needs the rnn encoder)
    dropout: float = 0.0
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.d_input is None:
            raise InputError("d_input: expected the number of features per input element, got None")
        for name in ("d_input", "d_model", "encoder_layers", "process_steps", "decoder_layers"):
            check_positive_int(name, getattr(self, name))
        check_choice("encoder", self.encoder, ("rnn", "set"))
        check_layer_field("encoder_layer", self.encoder_layer, causal=True)
        check_layer_field("process_layer", self.process_layer, causal=True)
        check_layer_field("decoder_layer", self.decoder_layer, causal=True)
        check_choice("encoder_block", self.encoder_block, ("stacked", "residual"))
        for name in ("encoder_options", "process_options", "decoder_options"):
            check_options_field(name, getattr(self, name))
        for name in ("bidirectional", "mask_chosen"):
            check_bool_field(name, getattr(self, name))
        check_choice("bridge", self.bridge, BRIDGES)
        if self.encoder == "set" and self.bridge == "copy":
            raise InputError("bridge: expected 'auto', 'project' or 'zeros' with the set encoder (it has no "
                             "recurrent final state to copy), got 'copy'")
        check_probability("dropout", self.dropout)
        if not isinstance(self.mlp_ratio, (int, float)) or self.mlp_ratio <= 0:
            raise InputError(f"mlp_ratio: expected a positive number, got {self.mlp_ratio!r}")


class SetEncoder(nn.Module):
    """Read and process of Read-Process-Write (module docstring).

    Shapes: ``x`` (B, n, D_in) with ``mask`` (B, n) -> memories ``m`` (B, n, D) (zero at padding) and
    the summary ``q*_P`` (B, 2 D).
    """

    def __init__(self, d_input: int, d_model: int, process_steps: int, layer: str, options: dict) -> None:
        super().__init__()
        self.read = nn.Linear(d_input, d_model)
        self.process: Recurrence = build(layer, d_model=2 * d_model, **options)
        self.query = nn.Linear(self.process.d_output, d_model) if self.process.d_output != d_model else nn.Identity()
        self.process_steps = process_steps
        self.d_summary = 2 * d_model

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memories = zero_padding(self.read(zero_padding(x, mask)), mask)  # (B, n, D)
        batch = x.shape[0]
        q_star = memories.new_zeros(batch, self.d_summary)
        state = self.process.init_state(batch, device=x.device, dtype=memories.dtype)
        for _ in range(self.process_steps):
            y, state = self.process.step(q_star, state)
            q = self.query(y)  # (B, D)
            scores = (memories @ q[:, :, None]).squeeze(-1).masked_fill(~mask, float("-inf"))  # (B, n)
            read = (torch.softmax(scores, -1)[:, None] @ memories).squeeze(1)  # (B, D)
            q_star = torch.cat([q, read], -1)
        return memories, q_star


class PointerMemory(NamedTuple):
    """The pointer's fixed memory: ``attention`` (its :class:`~rnnkit.models.seq2seq.Memory` over the
    encoder outputs) and ``inputs`` (B, n, D), each element's embedding, the decoder's next input once
    it is chosen."""

    attention: Memory
    inputs: torch.Tensor


class PointerState(NamedTuple):
    """The pointer decoder's state: ``rnn`` (a tuple per decoder layer) and ``chosen`` (B, n), True at
    positions already chosen (all False without ``mask_chosen``)."""

    rnn: Any
    chosen: torch.Tensor


class PointerNetwork(Pretrained, nn.Module):
    """Pointer network with an ``rnn`` or ``set`` (Read-Process-Write) encoder (module docstring).

    Args:
        config: a :class:`PointerConfig`, or its fields as keywords.

    Shapes:
        ``forward(src, src_lengths, targets, tgt_lengths)``: ``src`` (B, n, D_in) elements,
        ``src_lengths`` (B,), ``targets`` (B, T) the positions to output in order, ``tgt_lengths`` (B,)
        -> scores ``(B, T, n)``: step ``t``'s logits over positions, ``-inf`` at source padding and (with
        ``mask_chosen``) at the positions of ``targets[:, :t]``; rows at target padding are zero. With
        ``mask_chosen``, ``T`` must not exceed a sequence's length. The loss is
        ``seq2seq_loss(scores, targets, tgt_lengths)``.
        Decoding (:mod:`rnnkit.models.decoding`, ``bos_id=None``): ``decode_init`` and ``decode_step``,
        whose tokens are positions.

    Example:
        >>> net = PointerNetwork(d_input=2, d_model=64, encoder="set", process_steps=5)
        >>> scores = net(points, lengths, order, lengths)   # (B, n, n)
    """

    CONFIG_KEY = "pointer"
    CONFIG_CLASS = PointerConfig

    def __init__(self, config: PointerConfig | None = None, **fields: Any) -> None:
        super().__init__()
        self.config = c = self.resolve_config(config, fields)
        d = c.d_model
        if c.encoder == "set":
            self.set_encoder = SetEncoder(c.d_input, d, c.process_steps, c.process_layer, c.process_options)
            self.encoder = None
            d_memory, d_summary = d, self.set_encoder.d_summary
        else:
            self.embedding = nn.Linear(c.d_input, d)
            self.encoder = build_body(SimpleNamespace(
                block=c.encoder_block, d_model=d, layer=c.encoder_layer, num_layers=c.encoder_layers,
                layer_options=c.encoder_options, dropout=c.dropout, bidirectional=c.bidirectional,
                mlp_ratio=c.mlp_ratio,
            ))
            d_memory = d_summary = self.encoder.d_output
        self.start = nn.Parameter(torch.zeros(d))  # the first decoder input (Vinyals et al.'s learned "go")
        nn.init.normal_(self.start, std=d ** -0.5)
        self.decoder: Recurrence = build(
            "stacked", d_model=d, layer=c.decoder_layer, num_layers=c.decoder_layers, dropout=c.dropout,
            **c.decoder_options,
        )
        same_layers = (c.encoder_layer, c.encoder_options) == (c.decoder_layer, c.decoder_options)
        self.bridge = Bridge(c.bridge, self.encoder, self.decoder.layers, d_summary, same_layers)
        self.pointer = CrossAttention("additive", self.decoder.d_output, d_memory, d)

    def encode(self, src: torch.Tensor, src_lengths=None, mode: str = "auto") -> tuple[PointerMemory, PointerState]:
        """Read the elements ``src`` (B, n, D_in): the pointer's :class:`PointerMemory` and the decoder's
        initial :class:`PointerState`."""
        src = check_source("src", src, None, self.config.d_input)
        lengths = check_lengths(src_lengths, src.shape[0], src.shape[1], src.device)
        mask = source_mask(src, lengths)
        if self.encoder is None:
            inputs, summary = self.set_encoder(src, mask)
            memory, final = inputs, None
        else:
            inputs = zero_padding(self.embedding(zero_padding(src, mask)), mask)
            memory, final = self.encoder(inputs, None, lengths, mode)
            memory = zero_padding(memory, mask)
            summary = pool_memory(memory, lengths, self.encoder.causal)
        state = PointerState(self.bridge(summary, final), torch.zeros_like(mask))
        return PointerMemory(self.pointer.prepare(memory, mask), inputs), state

    decode_init = encode

    def _scores(self, h: torch.Tensor, memory: PointerMemory, chosen: torch.Tensor) -> torch.Tensor:
        """Decoder outputs ``h`` (B, T, D_dec), ``chosen`` (B, T, n) -> scores (B, T, n)."""
        return self.pointer.scores(h, memory.attention).masked_fill(chosen, float("-inf"))

    def _check_positions(self, name: str, positions: object, rank: int, memory: PointerMemory) -> torch.Tensor:
        if not isinstance(positions, torch.Tensor) or positions.dim() != rank \
                or positions.dtype not in (torch.int64, torch.int32):
            raise InputError(f"{name}: expected integer positions of shape {'(B, T)' if rank == 2 else '(B,)'}, "
                             f"got {describe(positions)}")
        if positions.shape[0] != memory.inputs.shape[0]:
            raise InputError(f"{name}: expected batch size {memory.inputs.shape[0]}, got {describe(positions)}")
        return positions.long()

    def decode_step(self, tokens: torch.Tensor | None, state: PointerState, memory: PointerMemory):
        """One step: the previously chosen positions ``tokens`` (B,) (None at the first step) -> scores
        over positions (B, n) and the new state."""
        batch = memory.inputs.shape[0]
        if tokens is None:
            x_t = self.start.expand(batch, -1)
            chosen = state.chosen
        else:
            tokens = self._check_positions("tokens", tokens, 1, memory)
            width = memory.inputs.shape[1]
            if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= width):
                raise InputError(f"tokens: expected positions in [0, {width}), "
                                 f"got min {int(tokens.min())}, max {int(tokens.max())}")
            x_t = memory.inputs[torch.arange(batch, device=tokens.device), tokens]
            chosen = state.chosen
            if self.config.mask_chosen:
                chosen = chosen.scatter(1, tokens[:, None], True)
        h, rnn = self.decoder.step(x_t, state.rnn)
        return self._scores(h[:, None], memory, chosen[:, None])[:, 0], PointerState(rnn, chosen)

    def forward(self, src: torch.Tensor, src_lengths=None, targets: torch.Tensor | None = None, tgt_lengths=None,
                *, mode: str = "auto") -> torch.Tensor:
        """Teacher-forced pointer scores ``(B, T, n)`` (class docstring); the decoder runs once over the
        whole target, its inputs being the embeddings of the true previous positions."""
        memory, state = self.encode(src, src_lengths, mode)
        if targets is None:
            raise InputError("targets: expected the output positions (B, T), got None")
        targets = self._check_positions("targets", targets, 2, memory)
        batch, steps = targets.shape
        if steps < 1:
            raise InputError(f"targets: expected at least one step, got {describe(targets)}")
        lengths = check_lengths(tgt_lengths, batch, steps, targets.device)
        valid = torch.ones_like(targets, dtype=torch.bool) if lengths is None else length_mask(lengths, steps)
        src_len = memory.attention.mask.sum(1, keepdim=True)  # (B, 1)
        if bool(((targets < 0) | (targets >= src_len))[valid].any()):
            raise InputError("targets: expected positions within each source's length at valid steps, got one outside")
        targets = torch.where(valid, targets, torch.zeros_like(targets))
        index = targets[:, :-1, None].expand(-1, -1, memory.inputs.shape[-1])
        previous = memory.inputs.gather(1, index)  # (B, T - 1, D)
        x = torch.cat([self.start.expand(batch, 1, -1), previous], 1)  # (B, T, D)
        h, _ = self.decoder(x, state.rnn, lengths, mode)
        chosen = torch.zeros(batch, steps, memory.inputs.shape[1], dtype=torch.bool, device=targets.device)
        if self.config.mask_chosen:
            picked = torch.nn.functional.one_hot(targets, memory.inputs.shape[1]).bool() & valid[..., None]
            chosen = (picked.long().cumsum(1) - picked.long()).bool()  # positions chosen before step t
            if bool((chosen & picked).any()):
                raise InputError("targets: expected each position at most once per sequence with mask_chosen=True "
                                 "(a repeated position has score -inf), got a repeat")
        scores = self._scores(h, memory, chosen)
        return torch.where(valid[..., None], scores, torch.zeros((), dtype=scores.dtype, device=scores.device))


__all__ = ["PointerConfig", "PointerMemory", "PointerNetwork", "PointerState", "SetEncoder"]
