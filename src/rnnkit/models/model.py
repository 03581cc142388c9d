"""SequenceModel: input embedding or projection -> a stack of blocks -> a head.

Blocks are either ``stacked`` (the classic deep RNN: layer after layer with dropout between) or
``residual`` (pre-norm blocks ``x + mixer(norm(x))``, ``x + MLP(norm(x))`` with any registered
recurrence as the mixer; the MLP a GELU MLP or an RWKV channel mix, :mod:`rnnkit.models.channel_mix`).
Heads (one per target kind of :mod:`rnnkit.targets`): per step, ``lm`` (class logits at every step,
e.g. the next token, optionally tied to the embedding; Press & Wolf 2017), ``regress_per_step`` (real
values at every step) and ``multilabel`` (one logit per label at every step); per sequence,
``classify`` and ``regress`` (one prediction from the last valid step or the masked mean over time).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import (
    InputError, check_choice, check_lengths, check_positive_int, check_probability, check_seed, describe,
)
from rnnkit.layers import build
from rnnkit.layers.base import Recurrence, State, length_mask
from rnnkit.layers.pattern import common_modes, expand_pattern, parse_pattern, with_depth
from rnnkit.models.channel_mix import MLP_KINDS, ChannelMix
from rnnkit.targets import HEADS, KIND_OF_HEAD, PER_STEP_HEADS


@dataclass
class ModelConfig:
    """Configuration of a :class:`SequenceModel` (saved as JSON with checkpoints)."""

    vocab_size: int | None = None  # token input: ids in [0, vocab_size) are embedded
    d_input: int | None = None  # feature input: (B, T, d_input) floats are projected
    d_model: int = 256  # width of the blocks
    block: str = "stacked"  # "stacked" (classic RNN stack) or "residual" (pre-norm mixer + MLP)
    layer: str | list = "lstm"  # registered recurrence used in every block, or a layer pattern cycled to depth
    num_layers: int = 1  # L
    layer_options: dict = field(default_factory=dict)  # extra options of each layer
    bidirectional: bool = False  # run every layer in both directions (not causal: no step/generate)
    dropout: float = 0.0  # between layers (stacked) / on block outputs (residual), training only
    mlp_ratio: float = 4.0  # residual blocks: MLP hidden width = mlp_ratio * d_model
    mlp: str = "gelu"  # residual blocks' MLP: "gelu", "rwkv_channel_mix" or "rwkv7_channel_mix" (token shift)
    # Set each block's `depth` option (block index / num_layers) in layers that take one (hgrn2, rwkv6,
    # rwkv7) unless layer_options or the pattern entry gives it. Configs saved without this field load
    # with False: their models were built with every block at the layer's default depth.
    auto_depth: bool = True
    head: str = "lm"  # "lm", "classify", "regress", "regress_per_step" or "multilabel"
    n_outputs: int | None = None  # classes (lm, classify), values (regress*), labels (multilabel); lm: vocab_size
    pooling: str = "last"  # classify/regress: "last" valid step or masked "mean"
    tie_embeddings: bool = False  # lm with token input: share the embedding and output matrices

    def __post_init__(self) -> None:
        if (self.vocab_size is None) == (self.d_input is None):
            raise InputError(
                f"vocab_size/d_input: expected exactly one of them (tokens or features), "
                f"got vocab_size={self.vocab_size!r}, d_input={self.d_input!r}"
            )
        for name in ("vocab_size", "d_input"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        check_positive_int("d_model", self.d_model)
        check_choice("block", self.block, ("stacked", "residual"))
        check_positive_int("num_layers", self.num_layers)
        if not isinstance(self.layer_options, dict):
            raise InputError(f"layer_options: expected a dict, got {describe(self.layer_options)}")
        reserved = {"d_model", "layer", "num_layers", "dropout", "bidirectional", "auto_depth"}
        for name, options in [("layer_options", self.layer_options)] + [
            (f"layer (entry {index}, {layer!r})", entry) for index, (layer, entry) in enumerate(parse_pattern(self.layer))
        ]:
            clash = sorted(reserved & set(options))
            if clash:
                raise InputError(
                    f"{name}: expected only the layer's own options, got {clash} "
                    "(set these as ModelConfig fields: layer, num_layers, dropout, bidirectional, auto_depth)"
                )
        if not isinstance(self.bidirectional, bool):
            raise InputError(f"bidirectional: expected a bool, got {self.bidirectional!r}")
        check_probability("dropout", self.dropout)
        if not isinstance(self.mlp_ratio, (int, float)) or self.mlp_ratio <= 0:
            raise InputError(f"mlp_ratio: expected a positive number, got {self.mlp_ratio!r}")
        check_choice("mlp", self.mlp, MLP_KINDS)
        if self.mlp != "gelu" and self.block != "residual":
            raise InputError(f"mlp: expected 'gelu' with block={self.block!r} (only residual blocks have an MLP), "
                             f"got {self.mlp!r}")
        if not isinstance(self.auto_depth, bool):
            raise InputError(f"auto_depth: expected a bool, got {self.auto_depth!r}")
        check_choice("head", self.head, HEADS)
        check_choice("pooling", self.pooling, ("last", "mean"))
        if self.head == "lm":
            if self.vocab_size is None and self.n_outputs is None:
                raise InputError("n_outputs: expected the number of classes per step for an lm head on features, got None")
            self.n_outputs = self.n_outputs or self.vocab_size
        elif self.n_outputs is None:
            raise InputError(f"n_outputs: expected an int for head={self.head!r}, got None")
        check_positive_int("n_outputs", self.n_outputs)
        if self.tie_embeddings and (self.head != "lm" or self.vocab_size is None or self.n_outputs != self.vocab_size):
            raise InputError("tie_embeddings: expected head='lm' with token input (vocab_size set), got otherwise")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"model config: unknown field(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**{"auto_depth": False, **data})


class BlockState(NamedTuple):
    """State of a residual block whose MLP reads the previous step (an RWKV channel mix): the mixer's
    state and the MLP's last input ``(B, D)``."""

    mixer: State
    mlp: torch.Tensor


class ResidualBlock(nn.Module):
    """Pre-norm block: ``x + mixer(norm(x))`` then ``x + MLP(norm(x))``.

    The state is the mixer's, or a :class:`BlockState` when the MLP carries the previous step's input
    (``mlp="rwkv_channel_mix"`` or ``"rwkv7_channel_mix"``).
    """

    def __init__(
        self, d_model: int, layer: str, options: dict, mlp_ratio: float, dropout: float, bidirectional: bool = False,
        mlp: str = "gelu", depth: float = 0.0,
    ) -> None:
        # layer: one registered name; options: its options (a pattern's entry over the shared ones);
        # depth: the block's index / number of blocks (the channel mix's initialisation).
        super().__init__()
        self.mixer_norm = nn.LayerNorm(d_model)
        if bidirectional:
            self.mixer = build("bidirectional", d_model=d_model, layer=layer, **options)
        else:
            self.mixer = build(layer, d_model=d_model, **options)
        # A mixer wider than the block (e.g. a bidirectional concat) is projected back.
        self.mixer_out = nn.Linear(self.mixer.d_output, d_model) if self.mixer.d_output != d_model else nn.Identity()
        self.mlp_norm = nn.LayerNorm(d_model)
        hidden = max(1, int(round(mlp_ratio * d_model)))
        self.carries_mlp = mlp != "gelu"
        if self.carries_mlp:
            self.mlp: nn.Module = ChannelMix(d_model, hidden, receptance=mlp == "rwkv_channel_mix", depth=depth)
        else:
            self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))
        self.dropout = nn.Dropout(dropout)
        self.d_model = d_model

    def init_state(self, batch_size: int, device, dtype) -> State:
        mixer = self.mixer.init_state(batch_size, device=device, dtype=dtype)
        if not self.carries_mlp:
            return mixer
        return BlockState(mixer, torch.zeros(batch_size, self.d_model, device=device, dtype=dtype))

    def state_size_at(self, length: int) -> int:
        return self.mixer.state_size_at(length) + (self.d_model if self.carries_mlp else 0)

    def _split(self, state) -> tuple[State, torch.Tensor | None]:
        """The mixer's state and the MLP's (None for a stateless MLP)."""
        return state if self.carries_mlp else (state, None)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        """The block's dropout; no call at all where it is the identity (inference, p = 0)."""
        return self.dropout(x) if self.training and self.dropout.p > 0 else x

    def _add_mlp(self, x, mixer_state, shift, channel_mix):
        """``x + MLP(norm(x))`` and the block's state; ``channel_mix(h, shift)`` runs a stateful MLP."""
        if not self.carries_mlp:
            return x + self._drop(self.mlp(self.mlp_norm(x))), mixer_state
        out, shift = channel_mix(self.mlp_norm(x), shift)
        return x + self._drop(out), BlockState(mixer_state, shift)

    def forward(self, x, state, lengths, mode):
        mixer_state, shift = self._split(state)
        y, mixer_state = self.mixer(self.mixer_norm(x), mixer_state, lengths, mode)
        x = x + self._drop(self.mixer_out(y))
        return self._add_mlp(x, mixer_state, shift, lambda h, s: self.mlp(h, s, lengths))

    def step(self, x_t, state):
        """One step on ``x_t`` ``(B, D)`` and a state the stack has checked. The same operations as
        :meth:`forward` at one step, called as functions rather than through the modules: at batch 1
        a decoding step is short enough for each module call's own overhead to count
        (``benchmarks/decode_speed.py``)."""
        mixer_state, shift = self._split(state)
        y_t, mixer_state = self.mixer._inner_step(_layer_norm(self.mixer_norm, x_t), mixer_state)
        if self.mixer.d_output != self.d_model:
            y_t = self.mixer_out(y_t)
        x_t = x_t + self._drop(y_t)
        h = _layer_norm(self.mlp_norm, x_t)
        if self.carries_mlp:
            out, shift = self.mlp.step(h, shift)
            return x_t + self._drop(out), BlockState(mixer_state, shift)
        up, act, down = self.mlp
        hidden = F.gelu(F.linear(h, up.weight, up.bias), approximate=act.approximate)
        return x_t + self._drop(F.linear(hidden, down.weight, down.bias)), mixer_state


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` as a function call."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class ResidualStack(Recurrence):
    """L residual blocks, as one recurrence whose state is the tuple of the blocks' states (each its
    mixer's, with the MLP's last input for a channel mix); block ``i``'s mixer is entry ``i`` of the
    layer pattern cycled to depth. A mixed stack runs the modes every mixer declares, and ``auto`` lets
    each mixer pick its own."""

    delegates_auto = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        entries = expand_pattern(config.layer, config.num_layers, config.layer_options)
        if getattr(config, "auto_depth", True):
            entries = with_depth(entries)
        mlp = getattr(config, "mlp", "gelu")
        self.blocks = nn.ModuleList(
            ResidualBlock(config.d_model, layer, options, config.mlp_ratio, config.dropout, config.bidirectional,
                          mlp=mlp, depth=index / len(entries))
            for index, (layer, options) in enumerate(entries)
        )
        self.final_norm = nn.LayerNorm(config.d_model)
        self.d_input = self.d_output = config.d_model
        self.causal = all(block.mixer.causal for block in self.blocks)

    @property
    def modes(self) -> tuple[str, ...]:
        return common_modes(block.mixer for block in self.blocks)

    def _init_state(self, batch_size, device, dtype):
        return tuple(b.init_state(batch_size, device, dtype) for b in self.blocks)

    def state_size_at(self, length: int) -> int:
        return sum(b.state_size_at(length) for b in self.blocks)

    def _forward(self, x, state, lengths, mode):
        finals = []
        for block, block_state in zip(self.blocks, state):
            x, final = block(x, block_state, lengths, mode)
            finals.append(final)
        return self.final_norm(x), tuple(finals)

    def _step(self, x_t, state):
        finals = []
        for block, block_state in zip(self.blocks, state):
            x_t, final = block.step(x_t, block_state)
            finals.append(final)
        return _layer_norm(self.final_norm, x_t), tuple(finals)


def build_body(config: Any) -> Recurrence:
    """The blocks of a model: ``stacked`` layers or ``residual`` blocks of ``config.layer`` (a name or a
    layer pattern).

    ``config`` is a :class:`ModelConfig` or any object with its fields ``block``, ``d_model``,
    ``layer``, ``num_layers``, ``layer_options``, ``dropout``, ``bidirectional`` and ``mlp_ratio``
    (the encoder of :class:`rnnkit.models.seq2seq.Seq2Seq` passes its own); ``mlp`` and
    ``auto_depth``, when it lacks them, are ``"gelu"`` and True.
    """
    if config.block == "stacked":
        # Layers default their width to d_model, so layer_options may widen them (hidden_size).
        return build(
            "stacked", d_model=config.d_model, layer=config.layer, num_layers=config.num_layers,
            dropout=config.dropout, bidirectional=config.bidirectional,
            auto_depth=getattr(config, "auto_depth", True), **config.layer_options,
        )
    return ResidualStack(config)


class SequenceModel(nn.Module):
    """Embedding/projection -> blocks -> head, any registered recurrence inside.

    Args:
        config: a :class:`ModelConfig`, or its fields as keywords.

    Shapes:
        tokens ``(B, T)`` int64 or features ``(B, T, d_input)`` ->
        per-step heads (``lm``, ``regress_per_step``, ``multilabel``): ``(B, T, n_outputs)`` (logits,
        values, label logits); ``classify``: logits ``(B, n_outputs)``; ``regress``: ``(B, n_outputs)``.
        The state is the body's state (see :meth:`init_state`).

    Example:
        >>> model = SequenceModel(vocab_size=84, d_model=256, layer="lstm", num_layers=2)
        >>> logits, state = model(torch.randint(0, 84, (8, 128)))    # (8, 128, 84)
        >>> logits, state = model(torch.randint(0, 84, (8, 128)), state)  # continues the streams
    """

    def __init__(self, config: ModelConfig | None = None, **fields: Any) -> None:
        super().__init__()
        if config is None:
            config = ModelConfig(**fields)
        elif fields:
            raise InputError(f"SequenceModel: expected a config or keywords, got both ({sorted(fields)})")
        self.config = config
        if config.vocab_size is not None:
            self.embedding: nn.Module = nn.Embedding(config.vocab_size, config.d_model)
        else:
            self.embedding = nn.Linear(config.d_input, config.d_model)
        self.body: Recurrence = build_body(config)
        self.head_dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(self.body.d_output, config.n_outputs)
        if config.tie_embeddings:
            if self.body.d_output != config.d_model:
                raise InputError(
                    f"tie_embeddings: expected the body's output width to equal d_model = {config.d_model}, "
                    f"got {self.body.d_output}"
                )
            self.head.weight = self.embedding.weight

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, out_dir) -> "Path":
        """Write ``config.json`` and ``model.safetensors`` to ``out_dir`` (atomically)."""
        from rnnkit.models.io import save_model

        return save_model(self, {"model": self.config.to_dict(), "rnnkit_version": _version()}, out_dir)

    @classmethod
    def from_pretrained(cls, directory, device: str | torch.device = "cpu") -> "SequenceModel":
        """Load a model saved by :meth:`save_pretrained` (or a Trainer checkpoint) onto ``device``."""
        from rnnkit.models.io import load_weights, read_config

        data = read_config(directory)
        if "model" not in data:
            raise InputError(f"checkpoint: expected a 'model' entry in {directory}/config.json, got keys {sorted(data)}")
        model = cls(ModelConfig.from_dict(data["model"]))
        load_weights(model, directory, device="cpu")
        return model.to(device)

    def export(self, out_dir, *, format="pt2", what="both", seq_len: int | None = None) -> dict[str, Any]:
        """Write this model's ``forward`` and/or ``step`` as ``torch.export`` programs (``.pt2``) and/or
        ONNX files, with ``manifest.json``; see :func:`rnnkit.models.export.export_model`.

        Example:
            >>> model.export("out", format="both", what="both", seq_len=128)
        """
        from rnnkit.models.export import export_model

        return export_model(self, out_dir, format=format, what=what, seq_len=seq_len)

    # ------------------------------------------------------------------ contract
    def init_state(self, batch_size: int, *, device=None, dtype=None):
        """The body's initial state for ``batch_size`` sequences."""
        return self.body.init_state(batch_size, device=device, dtype=dtype)

    @property
    def state_size(self) -> int:
        """Floats of recurrent state per sequence: the sum over the blocks' layers (of every kind, in a
        mixed stack)."""
        return self.body.state_size

    def state_size_at(self, length: int) -> int:
        """Floats of state per sequence after ``length`` steps (a KV cache in the stack grows up to its
        capacity; see :meth:`rnnkit.layers.Recurrence.state_size_at`)."""
        return self.body.state_size_at(length)

    def _embed(self, inputs: torch.Tensor, per_step: bool) -> torch.Tensor:
        """Embed ids / project features: ``(B, T)`` or ``(B, T, d_input)`` -> ``(B, T, D)``
        (without the T axis when ``per_step``)."""
        name = "x_t" if per_step else "x"
        if not isinstance(inputs, torch.Tensor):
            raise InputError(f"{name}: expected a tensor, got {describe(inputs)}")
        if self.config.vocab_size is not None:
            if inputs.dim() != (1 if per_step else 2) or inputs.dtype not in (torch.int64, torch.int32):
                want = "(B,)" if per_step else "(B, T)"
                raise InputError(f"{name}: expected integer token ids of shape {want}, got {describe(inputs)}")
            # torch.export traces without values (rnnkit.models.export), so the range is not read there.
            if not torch.compiler.is_exporting() and inputs.numel():
                low, high = (int(v) for v in torch.aminmax(inputs))
                if low < 0 or high >= self.config.vocab_size:
                    raise InputError(
                        f"{name}: expected token ids in [0, {self.config.vocab_size}), got min {low}, max {high}"
                    )
            return self.embedding(inputs)
        if inputs.dim() != (2 if per_step else 3) or inputs.shape[-1] != self.config.d_input:
            want = "(B, D_in)" if per_step else "(B, T, D_in)"
            raise InputError(
                f"{name}: expected features of shape {want} with D_in = {self.config.d_input}, got {describe(inputs)}"
            )
        return self.embedding(inputs)

    def forward(self, x: torch.Tensor, state=None, lengths=None, mode: str = "auto"):
        """Run the model over whole sequences.

        Args:
            x: ``(B, T)`` token ids or ``(B, T, d_input)`` features.
            state: the body's state from a previous call (TBPTT) or None.
            lengths: ``(B,)`` valid lengths of a right-padded batch, or None.
            mode: forwarded to every layer.

        Returns:
            Head output (see the class docstring) and the final state.
        """
        h = self._embed(x, per_step=False)  # (B, T, D)
        if h.dim() != 3 or h.shape[1] < 1:
            raise InputError(f"x: expected at least one time step, got {describe(x)}")
        lengths = check_lengths(lengths, h.shape[0], h.shape[1], h.device)
        y, state = self.body(h, state, lengths, mode)  # (B, T, D_out)
        y = self.head_dropout(y)
        if self.config.head in PER_STEP_HEADS:
            return self.head(y), state  # (B, T, n_outputs)
        return self.head(self._pool(y, lengths)), state  # (B, n_outputs)

    def _pool(self, y: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        batch, max_len = y.shape[0], y.shape[1]
        if self.config.pooling == "last":
            if lengths is None:
                return y[:, -1]
            return y[torch.arange(batch, device=y.device), lengths - 1]  # (B, D)
        if lengths is None:
            return y.mean(1)
        mask = length_mask(lengths, max_len).to(y.dtype)[..., None]  # (B, T, 1)
        return (y * mask).sum(1) / lengths.to(y.dtype)[:, None]

    def step(self, x_t: torch.Tensor, state=None):
        """One step of a per-step model: ``x_t`` (B,) ids or (B, d_input) -> output (B, n_outputs)."""
        if self.config.head not in PER_STEP_HEADS:
            raise InputError(f"step: expected a model with a per-step head {PER_STEP_HEADS}, got head={self.config.head!r}")
        h = self._embed(x_t, per_step=True)  # (B, D)
        y, state = self.body.step(h, state)
        return self.head(y), state

    def _generation_step(self, tokens: torch.Tensor, state):
        """:meth:`step` on the ``(B,)`` token ids the sampler drew and the state this model returned:
        both valid by construction, so nothing is checked (a check of the ids' range reads them, a
        device synchronisation per token)."""
        y, state = self.body._inner_step(self.embedding(tokens), state)
        return self.head(y), state

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor | Sequence[torch.Tensor | Sequence[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        prompt_lengths: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Continue prompts step by step with constant memory per step, from any per-step head.

        The prompts are read by one parallel ``forward`` (prefill); every new step is then one
        :meth:`step` on the recurrent state, so memory does not grow with the number of steps. What a
        step emits, and feeds back as the next input, follows the head (the ``feedback`` column of
        :data:`rnnkit.targets.TARGET_KINDS`):

        - ``lm`` on tokens: a token id sampled from the logits (temperature, top-k, nucleus);
        - ``multilabel`` on features: each label drawn from its own probability (Bernoulli), the 0/1
          frame fed back as the next input frame (``temperature`` scales the logits);
        - ``regress_per_step`` on features: the predicted values themselves (autoregressive
          forecasting; ``temperature``, ``top_k`` and ``top_p`` must stay at their defaults).

        Feature models feed their output back, so they need ``n_outputs == d_input``.

        Args:
            prompt: tokens: ``(B, T0)`` int64 ids, or a list of ``B`` 1-D id sequences of different
                lengths (right-padded internally). Features: ``(B, T0, d_input)`` floats, or a list of
                ``B`` tensors ``(T_i, d_input)``.
            max_new_tokens: number of steps to generate per sequence.
            temperature: softmax (or sigmoid) temperature (> 0); lower is greedier.
            top_k: sample only among the k most likely tokens (``top_k=1`` is greedy decoding).
            top_p: nucleus sampling (Holtzman et al. 2020, "The Curious Case of Neural Text
                Degeneration"): sample from the smallest set of tokens whose probability reaches
                ``top_p``, in (0, 1].
            seed: seed of the sampling generator (same seed, same samples); None draws a fresh one
                without touching the global RNG.
            prompt_lengths: ``(B,)`` valid lengths of a right-padded tensor prompt.

        Returns:
            ``(B, max_new_tokens)`` sampled ids, or ``(B, max_new_tokens, d_input)`` generated frames.

        Example:
            >>> ids = model.generate([torch.tensor([5, 2, 9]), torch.tensor([7])], 20, top_p=0.9, seed=0)
        """
        steps = list(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, prompt_lengths))
        if not steps:
            batch = len(prompt) if not isinstance(prompt, torch.Tensor) else prompt.shape[0]
            device = next(self.parameters()).device
            if self.config.vocab_size is not None:
                return torch.empty(batch, 0, dtype=torch.long, device=device)
            return torch.empty(batch, 0, self.config.d_input, device=device)
        return torch.stack(steps, 1)

    @torch.no_grad()
    def stream(
        self,
        prompt,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        prompt_lengths=None,
    ) -> Iterator[torch.Tensor]:
        """Like :meth:`generate` but yields each step's ``(B,)`` token or ``(B, d_input)`` frame as soon
        as it is produced.

        Example:
            >>> for token in model.stream(prompt, 100, temperature=0.8, seed=0):
            ...     print(task.decode(token), end="", flush=True)
        """
        feedback = self._check_generation(temperature, top_k, top_p)
        check_positive_int("max_new_tokens", max_new_tokens, minimum=0)
        device = next(self.parameters()).device
        generator = sampling_generator(temperature, top_k, top_p, seed, device)
        frame_width = None if feedback == "token" else self.config.d_input
        inputs, lengths = _prompt_batch(prompt, prompt_lengths, device, frame_width)
        draw = {
            "token": lambda out: sample_token(out, temperature, top_k, top_p, generator),
            "bernoulli": lambda out: torch.bernoulli(torch.sigmoid(out.float() / temperature), generator=generator),
            "value": lambda out: out.float(),
        }[feedback]
        # Prefill: one parallel pass; with ragged prompts the state is each sequence's at its own end.
        out, state = self(inputs, lengths=lengths)  # (B, T0, n_outputs)
        if lengths is None:
            out = out[:, -1]
        else:
            out = out[torch.arange(inputs.shape[0], device=device), lengths - 1]  # (B, n_outputs)
        step = self._generation_step if feedback == "token" else self.step
        for index in range(max_new_tokens):
            emitted = draw(out)
            yield emitted
            if index + 1 < max_new_tokens:  # no step is owed after the last one
                out, state = step(emitted, state)

    def _check_generation(self, temperature: object, top_k: object, top_p: object) -> str:
        """Raise InputError unless this model can generate with these settings; returns its feedback kind."""
        head = self.config.head
        feedback = KIND_OF_HEAD[head].feedback
        if feedback is None:
            raise InputError(f"generate: expected an lm model or another per-step head {PER_STEP_HEADS}, got head={head!r}")
        if feedback == "token" and self.config.vocab_size is None:
            raise InputError(f"generate: expected an lm model with token input (vocab_size set), got head={head!r} "
                             f"and vocab_size={self.config.vocab_size!r}")
        if feedback != "token" and self.config.n_outputs != self.config.d_input:
            raise InputError(
                f"generate: expected a {head} model whose outputs are its next input (n_outputs == d_input), got "
                f"n_outputs={self.config.n_outputs}, d_input={self.config.d_input!r}"
            )
        if not self.body.causal:
            raise InputError("generate: expected a causal model, got a bidirectional one (it needs the whole sequence)")
        if feedback != "token":
            for name, value in (("top_k", top_k), ("top_p", top_p)):
                if value is not None:
                    raise InputError(f"{name}: expected None for head={head!r} (no token to rank), got {value!r}")
            if feedback == "value" and temperature != 1:
                raise InputError(f"temperature: expected 1 for head={head!r} (its predictions are not sampled), "
                                 f"got {temperature!r}")
        return feedback


def _prompt_batch(prompt, prompt_lengths, device, frame_width: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token prompts ``(B, T0)`` ids (``frame_width`` None) or feature prompts ``(B, T0, frame_width)``
    floats on ``device``, and ``(B,)`` lengths (None when every prompt fills ``T0``)."""
    tokens = frame_width is None
    shape = "(B, T0)" if tokens else f"(B, T0, {frame_width})"
    row_shape = "a 1-D sequence of token ids" if tokens else f"a float tensor (T, {frame_width})"

    def acceptable(t: torch.Tensor, dims: int) -> bool:
        if tokens:
            return t.dim() == dims and t.dtype in (torch.int64, torch.int32)
        return t.dim() == dims + 1 and t.is_floating_point() and t.shape[-1] == frame_width

    if isinstance(prompt, torch.Tensor):
        if not acceptable(prompt, 2) or prompt.shape[0] < 1 or prompt.shape[1] < 1:
            what = "token ids" if tokens else "features"
            raise InputError(f"prompt: expected {what} of shape {shape} with B, T0 >= 1, got {describe(prompt)}")
        inputs = prompt.to(device)
        lengths = check_lengths(prompt_lengths, inputs.shape[0], inputs.shape[1], device)
        return inputs, lengths
    if prompt_lengths is not None:
        raise InputError("prompt_lengths: expected None for a list of prompts (their lengths are known), got lengths")
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise InputError(f"prompt: expected a {shape} tensor or a non-empty list of prompts, got {describe(prompt)}")
    rows = []
    for b, row in enumerate(prompt):
        if isinstance(row, torch.Tensor) and acceptable(row, 1):
            row = row.long().cpu() if tokens else row.float().cpu()
        elif tokens and isinstance(row, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in row):
            row = torch.tensor(row, dtype=torch.long)
        else:
            raise InputError(f"prompt[{b}]: expected {row_shape}, got {describe(row)}")
        if row.shape[0] < 1:
            raise InputError(f"prompt[{b}]: expected at least one {'token' if tokens else 'step'}, got none")
        rows.append(row)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    # Padding (id 0 or zero frames) never reaches a valid output.
    inputs = rows[0].new_zeros(len(rows), int(lengths.max()), *rows[0].shape[1:])
    for b, row in enumerate(rows):
        inputs[b, : len(row)] = row
    return inputs.to(device), lengths.to(device)


def sampling_generator(temperature: float, top_k: int | None, top_p: float | None, seed: int | None,
                       device: torch.device) -> torch.Generator:
    """Check the sampling options of :func:`sample_token` and return the generator for ``seed`` on
    ``device`` (a fresh one, seeded from fresh entropy, when ``seed`` is None)."""
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0 \
            or not math.isfinite(temperature):
        raise InputError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if top_k is not None:
        check_positive_int("top_k", top_k)
    if top_p is not None and (not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1):
        raise InputError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    if seed is not None:
        check_seed("seed", seed)
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()  # fresh entropy for this generator only; the global RNG is left alone
    return generator


def sample_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                 generator: torch.Generator) -> torch.Tensor:
    """One ``(B,)`` sample from ``(B, V)`` logits after temperature, top-k and nucleus filtering."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, -1)
        # Drop a token when the tokens ranked above it already reach top_p (the top one always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(1)


def _version() -> str:
    from rnnkit import __version__

    return __version__
