"""Encoder-decoder models: any registered recurrence as encoder and decoder, with attention.

    src (B, S) ids or (B, S, D_in) features --embed--> encoder --> memory (B, S, D_enc)
                                                          |
                                       bridge: final state / pooled memory -> decoder state
                                                          v
    tgt_in (B, T) ids --embed--> decoder (stacked causal layers) --attention over memory--> logits (B, T, V)

- Sutskever, Vinyals & Le 2014, "Sequence to Sequence Learning with Neural Networks": ``attention="none"``,
  the decoder starts from the encoder's final state (``bridge="copy"``) and sees nothing else of the source.
- Bahdanau, Cho & Bengio 2015: ``attention="additive"``, ``score(h, m) = v^T tanh(W_q h + W_k m)``.
- Luong, Pham & Manning 2015: ``"dot"`` (``h . m``) and ``"general"`` (``h^T W m``); the attentional
  vector ``h~_t = tanh(W_c [c_t; h_t])`` feeds the output layer and, with ``input_feeding=True``,
  the next decoder step (concatenated with the next input embedding and projected to ``D``).
- ``"multihead"``: scaled dot-product attention with ``num_heads`` heads (Vaswani et al. 2017).

Every attention kind follows Luong's order: the decoder steps first, then its output ``h_t`` attends
over the memory. Without input feeding nothing of step ``t``'s attention reaches step ``t + 1``, so
teacher-forced training runs the decoder once over the whole target in its fastest mode and attends
for all steps at once; with input feeding (or scheduled sampling, whose inputs are the model's own
predictions) the decoder runs one ``step`` at a time. Both paths compute the same function
(``tests/models/test_seq2seq.py`` holds them equal in fp64).

**Bridge** (the decoder's initial state):

- ``"copy"``: the encoder's final state is the decoder's initial state (Sutskever et al.). Needs states
  of the same structure and shapes: the same causal layer, options and number of layers on both sides.
- ``"project"``: a summary of the source, the encoder output at each sequence's last valid step (a
  causal encoder) or its masked mean over time (a bidirectional one), ``(B, D_enc)``, is mapped by one
  learned linear layer into each floating tensor of each decoder layer's state, reshaped to that
  tensor's shape; so an LSTM gets ``h`` and ``c``, a matrix-state layer its ``(H, K, V)`` matrix,
  a Mamba layer its convolution buffer and SSM state. A layer whose state is or holds a cache of past
  steps (``attention``'s KV cache, ``based``'s sliding window: slots with validity flags and positions,
  which a projection would fill with invented steps), or counts its steps (the test-time-training
  layers' position in a mini-batch), instead reads the projected summary as its first input: one
  ``step`` from its initial state. Non-floating state parts keep their initial values.
- ``"zeros"``: the decoder's own initial state; the source reaches it through attention only.
- ``"auto"``: ``copy`` when the encoder is causal and uses the decoder's layer, options and number of
  layers, else ``project``.

Padding: ``src_lengths`` masks the source everywhere (encoder, pooling, attention); values in the
source padding (NaN included) never reach an output or a gradient. Logits at target padding
(``t >= tgt_lengths``) are exactly zero.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch
from torch import nn

from rnnkit.errors import InputError, check_choice, check_lengths, check_positive_int, check_probability, describe
from rnnkit.layers import build, flatten_state, map_state, names, spec
from rnnkit.layers.base import Recurrence, length_mask
from rnnkit.models.io import Pretrained
from rnnkit.models.model import build_body

ATTENTION_KINDS = ("none", "additive", "dot", "general", "multihead")
BRIDGES = ("auto", "copy", "project", "zeros")
_RESERVED_OPTIONS = {"d_model", "layer", "num_layers", "dropout", "bidirectional"}
_WRAPPERS = ("stacked", "bidirectional")


# ---------------------------------------------------------------------------------------- config
def check_layer_field(name: str, layer: object, causal: bool) -> None:
    """Raise InputError unless ``layer`` names a registered recurrence (not a wrapper; causal if asked)."""
    if layer not in names():
        raise InputError(f"{name}: expected one of {names()}, got {layer!r}")
    layer_spec = spec(layer)
    if layer in _WRAPPERS:
        raise InputError(f"{name}: expected a recurrence (wrappers are set by the config's fields), got {layer!r}")
    if causal and not layer_spec.cls.causal:
        raise InputError(f"{name}: expected a causal recurrence, got {layer!r}")


def check_options_field(name: str, options: object) -> None:
    """Raise InputError unless ``options`` is a dict of a layer's own options."""
    if not isinstance(options, dict):
        raise InputError(f"{name}: expected a dict, got {describe(options)}")
    reserved = sorted(_RESERVED_OPTIONS & set(options))
    if reserved:
        raise InputError(f"{name}: expected only the layer's own options, got {reserved} (set these as config fields)")


def check_bool_field(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InputError(f"{name}: expected a bool, got {value!r}")


class ConfigDict:
    """JSON round-trip of a config dataclass: ``to_dict`` and ``from_dict`` (unknown fields rejected)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"model config: unknown field(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)


@dataclass
class Seq2SeqConfig(ConfigDict):
    """Configuration of a :class:`Seq2Seq` model (saved as JSON with it)."""

    tgt_vocab_size: int | None = None  # V: target ids in [0, V) are embedded and predicted
    src_vocab_size: int | None = None  # token source: ids in [0, src_vocab_size) are embedded
    src_d_input: int | None = None  # feature source: (B, S, src_d_input) floats are projected
    d_model: int = 256  # D: embedding, encoder block and decoder input width
    encoder_layer: str = "lstm"  # any registered recurrence
    encoder_block: str = "stacked"  # "stacked" or "residual" (see ModelConfig.block)
    encoder_layers: int = 1
    encoder_options: dict = field(default_factory=dict)  # the encoder layer's own options
    bidirectional: bool = False  # bidirectional encoder
    decoder_layer: str = "lstm"  # any registered causal recurrence (stacked blocks)
    decoder_layers: int = 1
    decoder_options: dict = field(default_factory=dict)
    attention: str = "general"  # "none", "additive", "dot", "general" or "multihead"
    num_heads: int = 1  # heads of "multihead" attention
    input_feeding: bool = False  # feed the attentional vector h~_{t-1} into step t (Luong)
    bridge: str = "auto"  # "auto", "copy", "project" or "zeros" (module docstring)
    dropout: float = 0.0  # between layers and before the output layer, training only
    mlp_ratio: float = 4.0  # residual encoder blocks: MLP width = mlp_ratio * D
    tie_embeddings: bool = False  # share the target embedding and the output matrix (Press & Wolf 2017)

    def __post_init__(self) -> None:
        if self.tgt_vocab_size is None:
            raise InputError("tgt_vocab_size: expected the target vocabulary size, got None")
        check_positive_int("tgt_vocab_size", self.tgt_vocab_size)
        if (self.src_vocab_size is None) == (self.src_d_input is None):
            raise InputError(
                f"src_vocab_size/src_d_input: expected exactly one of them (tokens or features), "
                f"got src_vocab_size={self.src_vocab_size!r}, src_d_input={self.src_d_input!r}"
            )
        for name in ("src_vocab_size", "src_d_input", "d_model", "encoder_layers", "decoder_layers", "num_heads"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        check_layer_field("encoder_layer", self.encoder_layer, causal=True)
        check_layer_field("decoder_layer", self.decoder_layer, causal=True)
        check_choice("encoder_block", self.encoder_block, ("stacked", "residual"))
        check_options_field("encoder_options", self.encoder_options)
        check_options_field("decoder_options", self.decoder_options)
        for name in ("bidirectional", "input_feeding", "tie_embeddings"):
            check_bool_field(name, getattr(self, name))
        check_choice("attention", self.attention, ATTENTION_KINDS)
        check_choice("bridge", self.bridge, BRIDGES)
        if self.input_feeding and self.attention == "none":
            raise InputError("input_feeding: expected False with attention='none' (nothing to feed), got True")
        if self.attention == "multihead" and self.d_model % self.num_heads:
            raise InputError(f"num_heads: expected a divisor of d_model = {self.d_model}, got {self.num_heads}")
        check_probability("dropout", self.dropout)
        if not isinstance(self.mlp_ratio, (int, float)) or self.mlp_ratio <= 0:
            raise InputError(f"mlp_ratio: expected a positive number, got {self.mlp_ratio!r}")


# ---------------------------------------------------------------------------------------- attention
class Memory(NamedTuple):
    """What the decoder attends over, computed once per source: ``keys`` (B, S, D_k) (or (B, H, S, K)),
    ``values`` (B, S, D_v) (or (B, H, S, K)) and ``mask`` (B, S), True at valid source steps."""

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor


class CrossAttention(nn.Module):
    """Attention of decoder outputs over an encoder memory (module docstring for the score functions).

    Args:
        kind: ``"additive"``, ``"dot"``, ``"general"`` or ``"multihead"``.
        d_query: width of the queries (the decoder's output width).
        d_memory: width of the memory (the encoder's output width).
        d_model: width of the additive score's hidden layer and of the multi-head projections.
        num_heads: heads of ``"multihead"``.

    Shapes: query ``(B, T, d_query)``, memory ``(B, S, d_memory)`` -> context ``(B, T, d_context)``
    and weights ``(B, T, S)`` (the mean over heads for ``multihead``); ``d_context`` is ``d_memory``,
    or ``d_model`` for ``multihead``.
    """

    def __init__(self, kind: str, d_query: int, d_memory: int, d_model: int, num_heads: int = 1) -> None:
        super().__init__()
        check_choice("attention", kind, ATTENTION_KINDS[1:])
        self.kind, self.num_heads = kind, num_heads
        self.d_context = d_memory
        if kind == "dot" and d_query != d_memory:
            raise InputError(
                f"attention: 'dot' expected the decoder output width to equal the encoder's ({d_memory}), "
                f"got {d_query}; use 'general'"
            )
        if kind == "general":
            self.key = nn.Linear(d_memory, d_query, bias=False)
        elif kind == "additive":
            self.key = nn.Linear(d_memory, d_model, bias=False)
            self.query = nn.Linear(d_query, d_model)
            self.energy = nn.Linear(d_model, 1, bias=False)
        elif kind == "multihead":
            self.query = nn.Linear(d_query, d_model)
            self.key = nn.Linear(d_memory, d_model)
            self.value = nn.Linear(d_memory, d_model)
            self.out = nn.Linear(d_model, d_model)
            self.d_context = d_model

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, H, T, D / H)."""
        return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

    def prepare(self, memory: torch.Tensor, mask: torch.Tensor) -> Memory:
        """Project the memory once per source: ``memory`` (B, S, D_m), ``mask`` (B, S) -> :class:`Memory`."""
        keys = values = memory
        if self.kind in ("general", "additive"):
            keys = self.key(memory)
        elif self.kind == "multihead":
            keys, values = self._heads(self.key(memory)), self._heads(self.value(memory))
        return Memory(keys, values, mask)

    def scores(self, query: torch.Tensor, memory: Memory) -> torch.Tensor:
        """Masked scores: ``query`` (B, T, D_q) -> (B, T, S), or (B, H, T, S) for ``multihead``;
        ``-inf`` at source padding."""
        if self.kind == "additive":
            hidden = torch.tanh(self.query(query)[:, :, None] + memory.keys[:, None])  # (B, T, S, D)
            scores = self.energy(hidden).squeeze(-1)
        elif self.kind == "multihead":
            q = self._heads(self.query(query))  # (B, H, T, K)
            scores = q @ memory.keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
        else:
            scores = query @ memory.keys.transpose(-1, -2)
        mask = memory.mask[:, None, None] if self.kind == "multihead" else memory.mask[:, None]
        return scores.masked_fill(~mask, float("-inf"))

    def forward(self, query: torch.Tensor, memory: Memory) -> tuple[torch.Tensor, torch.Tensor]:
        weights = torch.softmax(self.scores(query, memory), -1)
        context = weights @ memory.values
        if self.kind == "multihead":
            batch, heads, steps = context.shape[:3]
            context = self.out(context.transpose(1, 2).reshape(batch, steps, -1))
            weights = weights.mean(1)
        return context, weights


# ---------------------------------------------------------------------------------------- encoder side
def pool_memory(outputs: torch.Tensor, lengths: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """A source summary ``(B, D)`` from encoder outputs ``(B, S, D)``: the output at each sequence's last
    valid step for a causal encoder (it has read everything there), the masked mean otherwise."""
    if causal:
        if lengths is None:
            return outputs[:, -1]
        return outputs[torch.arange(outputs.shape[0], device=outputs.device), lengths - 1]
    if lengths is None:
        return outputs.mean(1)
    mask = length_mask(lengths, outputs.shape[1]).to(outputs.dtype)[..., None]
    return (outputs * mask).sum(1) / lengths.to(outputs.dtype)[:, None]


def source_mask(src: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """``(B, S)`` True at valid source steps."""
    if lengths is None:
        return torch.ones(src.shape[0], src.shape[1], dtype=torch.bool, device=src.device)
    return length_mask(lengths, src.shape[1])


def zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` (B, S, ...) with the steps outside ``mask`` (B, S) set to zero by selection, so that NaN there
    reaches neither the values nor (through a later product) the gradients."""
    return torch.where(mask.view(*mask.shape, *([1] * (x.dim() - 2))), x, torch.zeros((), dtype=x.dtype, device=x.device))


def check_source(name: str, src: object, vocab_size: int | None, d_input: int | None) -> torch.Tensor:
    """Validate ``(B, S)`` token ids (``vocab_size`` set) or ``(B, S, d_input)`` features."""
    if not isinstance(src, torch.Tensor):
        raise InputError(f"{name}: expected a tensor, got {describe(src)}")
    if vocab_size is not None:
        if src.dim() != 2 or src.dtype not in (torch.int64, torch.int32):
            raise InputError(f"{name}: expected integer token ids of shape (B, S), got {describe(src)}")
        if src.numel() and (int(src.min()) < 0 or int(src.max()) >= vocab_size):
            raise InputError(
                f"{name}: expected token ids in [0, {vocab_size}), got min {int(src.min())}, max {int(src.max())}"
            )
    elif src.dim() != 3 or src.shape[-1] != d_input or not src.dtype.is_floating_point:
        raise InputError(f"{name}: expected float features of shape (B, S, {d_input}), got {describe(src)}")
    if src.shape[1] < 1:
        raise InputError(f"{name}: expected at least one step, got {describe(src)}")
    return src


def _structure(state: Any) -> Any:
    """The structure, per-sequence shapes and dtypes of a state (comparable with ``==``)."""
    if isinstance(state, torch.Tensor):
        return tuple(state.shape[1:]), state.dtype
    return type(state).__name__, tuple(_structure(part) for part in state)


def _has_slot_flags(state: Any) -> bool:
    """Whether a state holds validity flags of cache slots (a field ``valid`` or ``*_valid``) or a step
    counter (``count``: the test-time-training layers' position in their mini-batch), parts that
    hold whole numbers a projection would not write."""
    if isinstance(state, torch.Tensor):
        return False
    names = getattr(state, "_fields", ())
    flags = any(n in ("valid", "count") or n.endswith("_valid") for n in names)
    return flags or any(_has_slot_flags(p) for p in state)


def _is_cache(layer: Recurrence) -> bool:
    """A layer whose state is (or holds) a cache of past steps: it fills with the context, or it keeps
    validity flags per slot (a sliding window). Writing into such a state would invent cached steps."""
    return layer.state_size_at(0) < layer.state_size or _has_slot_flags(layer.init_state(1, device="meta"))


class Bridge(nn.Module):
    """The decoder's initial state from the encoder (module docstring: ``copy``/``project``/``zeros``).

    Args:
        kind: one of :data:`BRIDGES`.
        encoder: the encoder body (its final state is what ``copy`` passes on).
        decoder_layers: the decoder's layers, bottom first (a ``stacked`` decoder's ``layers``).
        d_summary: width of the source summary ``project`` reads.
        same_layers: the encoder and decoder use the same layer with the same options (``auto`` copies
            only then).

    ``encoder`` None (a set encoder, whose summary is not a recurrent state) rules out ``copy``.
    """

    def __init__(self, kind: str, encoder: Recurrence | None, decoder_layers, d_summary: int,
                 same_layers: bool = False) -> None:
        super().__init__()
        check_choice("bridge", kind, BRIDGES)
        same = encoder is not None and encoder.causal and _structure(encoder.init_state(1, device="meta")) == \
            _structure(tuple(layer.init_state(1, device="meta") for layer in decoder_layers))
        if kind == "copy" and not same:
            raise InputError(
                "bridge: 'copy' expected an encoder whose final state has the decoder's structure and shapes "
                "(the same causal layer, options and number of layers), got different ones; use 'project'"
            )
        # States of two layer families may share shapes by accident; "auto" copies only a layer's own state.
        self.kind = ("copy" if same and same_layers else "project") if kind == "auto" else kind
        self.decoder_layers = list(decoder_layers)  # not registered again: the decoder owns them
        self.projections = nn.ModuleList()
        if self.kind == "project":
            for layer in self.decoder_layers:
                if _is_cache(layer):
                    self.projections.append(nn.ModuleList([nn.Linear(d_summary, layer.d_input)]))
                else:
                    leaves = [t for t in flatten_state(layer.init_state(1, device="meta")) if t.is_floating_point()]
                    self.projections.append(nn.ModuleList(nn.Linear(d_summary, t.numel()) for t in leaves))

    def forward(self, summary: torch.Tensor, encoder_state: Any) -> tuple:
        """``summary`` (B, d_summary), the encoder's final state -> the decoder's state (a tuple per layer)."""
        if self.kind == "copy":
            return tuple(encoder_state)
        batch, device, dtype = summary.shape[0], summary.device, summary.dtype
        states = tuple(layer.init_state(batch, device=device, dtype=dtype) for layer in self.decoder_layers)
        if self.kind == "zeros":
            return states
        bridged = []
        for layer, state, projections in zip(self.decoder_layers, states, self.projections):
            if _is_cache(layer):
                _, state = layer.step(projections[0](summary), state)
            else:
                linears = iter(projections)
                state = map_state(
                    lambda t: next(linears)(summary).view(t.shape) if t.is_floating_point() else t, state
                )
            bridged.append(state)
        return tuple(bridged)


# ---------------------------------------------------------------------------------------- the model
class DecoderState(NamedTuple):
    """The decoder's state between steps: ``rnn`` (the decoder stack's state, a tuple per layer) and
    ``feed`` (B, D), the previous attentional vector (``(B, 0)`` without input feeding)."""

    rnn: Any
    feed: torch.Tensor


class Seq2Seq(Pretrained, nn.Module):
    """Encoder-decoder with attention, any registered recurrence on either side (module docstring).

    Args:
        config: a :class:`Seq2SeqConfig`, or its fields as keywords.

    Shapes:
        ``forward(src, src_lengths, tgt_in, tgt_lengths)``: ``src`` (B, S) ids or (B, S, D_in) features,
        ``src_lengths`` (B,), ``tgt_in`` (B, T) ids (the targets shifted right behind a start token),
        ``tgt_lengths`` (B,) -> logits ``(B, T, V)``.
        Decoding, one step at a time: ``memory, state = decode_init(src, src_lengths)``, then
        ``logits (B, V), state = decode_step(tokens (B,), state, memory)``
        (see :mod:`rnnkit.models.decoding`).

    Example:
        >>> model = Seq2Seq(src_vocab_size=30, tgt_vocab_size=40, d_model=64, attention="additive")
        >>> logits = model(src, src_lengths, tgt_in, tgt_lengths)   # (B, T, 40)
    """

    CONFIG_KEY = "seq2seq"
    CONFIG_CLASS = Seq2SeqConfig

    def __init__(self, config: Seq2SeqConfig | None = None, **fields: Any) -> None:
        super().__init__()
        self.config = c = self.resolve_config(config, fields)
        d = c.d_model
        if c.src_vocab_size is not None:
            self.src_embedding: nn.Module = nn.Embedding(c.src_vocab_size, d)
        else:
            self.src_embedding = nn.Linear(c.src_d_input, d)
        self.encoder: Recurrence = build_body(SimpleNamespace(
            block=c.encoder_block, d_model=d, layer=c.encoder_layer, num_layers=c.encoder_layers,
            layer_options=c.encoder_options, dropout=c.dropout, bidirectional=c.bidirectional, mlp_ratio=c.mlp_ratio,
        ))
        self.tgt_embedding = nn.Embedding(c.tgt_vocab_size, d)
        self.feed_proj = nn.Linear(2 * d, d) if c.input_feeding else None
        self.decoder: Recurrence = build(
            "stacked", d_model=d, layer=c.decoder_layer, num_layers=c.decoder_layers, dropout=c.dropout,
            **c.decoder_options,
        )
        same_layers = (c.encoder_layer, c.encoder_options) == (c.decoder_layer, c.decoder_options)
        self.bridge = Bridge(c.bridge, self.encoder, self.decoder.layers, self.encoder.d_output, same_layers)
        d_dec, d_enc = self.decoder.d_output, self.encoder.d_output
        if c.attention == "none":
            self.attention = None
            d_pre = d_dec
        else:
            self.attention = CrossAttention(c.attention, d_dec, d_enc, d, c.num_heads)
            self.combine = nn.Linear(self.attention.d_context + d_dec, d)
            d_pre = d
        self.dropout = nn.Dropout(c.dropout)
        self.out = nn.Linear(d_pre, c.tgt_vocab_size)
        if c.tie_embeddings:
            if d_pre != d:
                raise InputError(f"tie_embeddings: expected the decoder output width to equal d_model = {d}, got {d_pre}")
            self.out.weight = self.tgt_embedding.weight

    # ------------------------------------------------------------------ encoder
    def encode(self, src: torch.Tensor, src_lengths=None, mode: str = "auto") -> tuple[Memory, DecoderState]:
        """Read the source: ``src`` (B, S) ids or (B, S, D_in), ``src_lengths`` (B,) -> the attention
        :class:`Memory` and the decoder's initial :class:`DecoderState`."""
        c = self.config
        src = check_source("src", src, c.src_vocab_size, c.src_d_input)
        device = next(self.parameters()).device
        lengths = check_lengths(src_lengths, src.shape[0], src.shape[1], device)
        mask = source_mask(src, lengths)
        if c.src_vocab_size is None:
            src = zero_padding(src, mask)  # before the projection: NaN * 0 would poison its weight gradient
        x = zero_padding(self.src_embedding(src), mask)  # (B, S, D)
        outputs, final = self.encoder(x, None, lengths, mode)
        outputs = zero_padding(outputs, mask)  # residual blocks write MLP(norm(0)) there; the memory is zero
        summary = pool_memory(outputs, lengths, self.encoder.causal)
        rnn = self.bridge(summary, final)
        memory = self.attention.prepare(outputs, mask) if self.attention is not None else Memory(outputs, outputs, mask)
        feed = outputs.new_zeros(src.shape[0], c.d_model if c.input_feeding else 0)
        return memory, DecoderState(rnn, feed)

    decode_init = encode

    # ------------------------------------------------------------------ decoder
    def _readout(self, h: torch.Tensor, memory: Memory) -> torch.Tensor:
        """Decoder outputs ``h`` (B, T, D_dec) -> the vectors the output layer reads (B, T, D_pre):
        ``h`` itself without attention, else ``tanh(W_c [context; h])``."""
        if self.attention is None:
            return h
        context, _ = self.attention(h, memory)
        return torch.tanh(self.combine(torch.cat([context, h], -1)))

    def _check_tokens(self, name: str, tokens: object, rank: int) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != rank or tokens.dtype not in (torch.int64, torch.int32):
            raise InputError(f"{name}: expected integer token ids of shape {'(B, T)' if rank == 2 else '(B,)'}, "
                             f"got {describe(tokens)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.tgt_vocab_size):
            raise InputError(f"{name}: expected token ids in [0, {self.config.tgt_vocab_size}), "
                             f"got min {int(tokens.min())}, max {int(tokens.max())}")
        return tokens

    def decode_step(self, tokens: torch.Tensor | None, state: DecoderState, memory: Memory):
        """One decoder step: the previous tokens ``(B,)`` -> logits ``(B, V)`` for the next and the new state."""
        if tokens is None:
            raise InputError("tokens: expected the previous token ids (B,) (a start token first), got None")
        tokens = self._check_tokens("tokens", tokens, 1)
        logits, state = self._step(self.tgt_embedding(tokens), state, memory)
        return logits, state

    def _step(self, x_t: torch.Tensor, state: DecoderState, memory: Memory):
        if self.feed_proj is not None:
            x_t = self.feed_proj(torch.cat([x_t, state.feed], -1))
        h, rnn = self.decoder.step(x_t, state.rnn)
        pre = self._readout(h[:, None], memory)[:, 0]  # (B, D_pre)
        feed = pre if self.feed_proj is not None else state.feed
        return self.out(self.dropout(pre)), DecoderState(rnn, feed)

    def forward(
        self,
        src: torch.Tensor,
        src_lengths=None,
        tgt_in: torch.Tensor | None = None,
        tgt_lengths=None,
        *,
        mode: str = "auto",
        path: str = "auto",
        teacher_forcing: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits.

        Args:
            src: ``(B, S)`` source ids or ``(B, S, D_in)`` features.
            src_lengths: ``(B,)`` valid source lengths (None: all ``S``).
            tgt_in: ``(B, T)`` decoder inputs: a start token, then the targets but the last.
            tgt_lengths: ``(B,)`` valid target lengths (None: all ``T``).
            mode: the encoder's and the whole-sequence decoder's mode.
            path: ``"sequence"`` (one decoder pass over all steps; not with input feeding or scheduled
                sampling), ``"step"`` (one decoder ``step`` per target step) or ``"auto"`` (``sequence``
                where it applies).
            teacher_forcing: scheduled sampling (Bengio et al. 2015): at each step after the first, each
                sequence reads the true previous token with this probability and otherwise a token
                sampled from the model's own previous prediction (see
                :func:`rnnkit.models.losses.teacher_forcing_probability` for schedules). 1: plain
                teacher forcing.
            generator: the random generator of scheduled sampling, on the model's device (same generator
                state, same draws); None draws from torch's global generator.

        Returns:
            logits ``(B, T, V)``, exactly zero at target padding.
        """
        c = self.config
        if tgt_in is None:
            raise InputError("tgt_in: expected the decoder input ids (B, T), got None")
        tgt_in = self._check_tokens("tgt_in", tgt_in, 2)
        check_choice("path", path, ("auto", "sequence", "step"))
        if not isinstance(teacher_forcing, (int, float)) or isinstance(teacher_forcing, bool) \
                or not 0 <= teacher_forcing <= 1:
            raise InputError(f"teacher_forcing: expected a probability in [0, 1], got {teacher_forcing!r}")
        needs_step = c.input_feeding or teacher_forcing < 1
        if path == "sequence" and needs_step:
            raise InputError("path: expected 'step' or 'auto' with input feeding or scheduled sampling "
                             "(each step reads the previous step's output), got 'sequence'")
        memory, state = self.encode(src, src_lengths, mode)
        if tgt_in.shape[0] != src.shape[0] or tgt_in.shape[1] < 1:
            raise InputError(f"tgt_in: expected shape (B, T) with B = {src.shape[0]} and T >= 1, got {describe(tgt_in)}")
        lengths = check_lengths(tgt_lengths, tgt_in.shape[0], tgt_in.shape[1], tgt_in.device)
        if path == "sequence" or (path == "auto" and not needs_step):
            h, _ = self.decoder(self.tgt_embedding(tgt_in), state.rnn, lengths, mode)  # (B, T, D_dec)
            logits = self.out(self.dropout(self._readout(h, memory)))
        else:
            logits = self._teacher_steps(tgt_in, state, memory, teacher_forcing, generator)
        if lengths is not None:
            logits = zero_padding(logits, length_mask(lengths, tgt_in.shape[1]))
        return logits

    def _teacher_steps(self, tgt_in, state, memory, teacher_forcing, generator) -> torch.Tensor:
        """The decoder one step at a time over ``tgt_in`` (B, T), with scheduled sampling below 1."""
        batch, steps = tgt_in.shape
        if teacher_forcing < 1:
            coins = torch.rand(batch, steps, generator=generator, device=tgt_in.device) < teacher_forcing
        outputs, tokens = [], tgt_in[:, 0]
        for t in range(steps):
            if t > 0 and teacher_forcing < 1:
                probs = torch.softmax(outputs[-1].detach().float(), -1)
                sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                tokens = torch.where(coins[:, t], tgt_in[:, t], sampled)
            elif t > 0:
                tokens = tgt_in[:, t]
            logits, state = self._step(self.tgt_embedding(tokens), state, memory)
            outputs.append(logits)
        return torch.stack(outputs, 1)


__all__ = [
    "ATTENTION_KINDS", "BRIDGES", "Bridge", "CrossAttention", "DecoderState", "Memory", "Seq2Seq", "Seq2SeqConfig",
    "pool_memory",
]
