"""A stack of recurrences with dropout between layers (the classic deep RNN).

Each layer reads the previous layer's output; dropout (Zaremba, Sutskever & Vinyals 2014: on the
non-recurrent connections only) is applied between layers, never on the last layer's output.
``layer`` is a layer pattern (:mod:`rnnkit.layers.pattern`), so one stack may mix layer types
(``"lstm,gru"``); such a stack runs the modes all its layers declare, and ``auto`` lets each layer
pick its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rnnkit.errors import InputError, check_positive_int, check_probability
from rnnkit.layers.base import Recurrence
from rnnkit.layers.pattern import common_modes, expand_pattern, parse_pattern, with_depth
from rnnkit.layers.registry import build, make_config, register


@dataclass
class StackedConfig:
    """Stacked options; every other keyword goes to each layer."""

    d_model: int  # input width of the first layer
    layer: str | list = "lstm"  # registered recurrence used at every level, or a layer pattern
    num_layers: int = 2  # L
    dropout: float = 0.0  # dropout probability between layers (training only)
    bidirectional: bool = False  # wrap each layer in the bidirectional wrapper
    auto_depth: bool = True  # set `depth` (index / num_layers) in layers that take one, unless given
    options: dict = field(default_factory=dict)  # per-layer options (besides d_model)

    def __post_init__(self) -> None:
        parse_pattern(self.layer)
        check_positive_int("num_layers", self.num_layers)
        check_probability("dropout", self.dropout)
        if not isinstance(self.bidirectional, bool):
            raise InputError(f"bidirectional: expected a bool, got {self.bidirectional!r}")
        if not isinstance(self.auto_depth, bool):
            raise InputError(f"auto_depth: expected a bool, got {self.auto_depth!r}")


@register(
    "stacked",
    description="Stack of any recurrence with inter-layer dropout",
    test_configs={
        "lstm2": {"layer": "lstm", "num_layers": 2, "hidden_size": 4, "dropout": 0.25},
        "gru3": {"layer": "gru", "num_layers": 3},
        "lstm2-peephole": {"layer": "lstm", "num_layers": 2, "peephole": True},
        "mixed": {"layer": "lstm,gru:hidden_size=3,elman", "num_layers": 4, "dropout": 0.25},
        # Titans' memory as a layer (MAL): the memory, then sliding-window attention on its output.
        "titans-mal": {"layer": "titans:num_heads=1:head_dim=2:mini_batch_size=3,"
                                "attention:num_heads=1:head_dim=2:window=4", "num_layers": 2},
    },
)
class Stacked(Recurrence):
    """``num_layers`` recurrences, each reading the previous one's output.

    Args:
        d_model: input width D of the first layer.
        layer: registered recurrence name, or a layer pattern (:mod:`rnnkit.layers.pattern`) cycled
            to ``num_layers``.
        num_layers: L.
        dropout: inter-layer dropout probability.
        bidirectional: wrap each layer in :class:`~rnnkit.layers.bidirectional.Bidirectional`
            (then the stack is not causal and has no ``step``).
        auto_depth: give each layer that has a ``depth`` option (``hgrn2``, ``rwkv6``, ``rwkv7``) its
            position, index / ``num_layers``, unless ``options`` or its pattern entry sets it.
        **options: options of every layer (e.g. ``hidden_size``).

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D_out)`` (the last layer's width); state: a tuple of the
    L layers' states.

    Example:
        >>> stack = Stacked(d_model=16, layer="lstm", num_layers=2, hidden_size=32, dropout=0.1)
        >>> y, state = stack(torch.randn(4, 10, 16))   # y (4, 10, 32), state: 2 LSTMStates
    """

    delegates_auto = True

    def __init__(
        self,
        d_model: int,
        layer: str | list = "lstm",
        num_layers: int = 2,
        dropout: float = 0.0,
        bidirectional: bool = False,
        auto_depth: bool = True,
        **options: Any,
    ) -> None:
        super().__init__()
        self.config = make_config(
            StackedConfig,
            "stacked",
            dict(d_model=d_model, layer=layer, num_layers=num_layers, dropout=dropout,
                 bidirectional=bidirectional, auto_depth=auto_depth, options=options),
        )
        layers, width = [], d_model
        entries = expand_pattern(layer, num_layers, options)
        for name, layer_options in with_depth(entries) if auto_depth else entries:
            if bidirectional:
                block = build("bidirectional", d_model=width, layer=name, **layer_options)
            else:
                block = build(name, d_model=width, **layer_options)
            layers.append(block)
            width = block.d_output
        self.layers = nn.ModuleList(layers)
        self.dropout = nn.Dropout(dropout)
        self.d_input, self.d_output = d_model, width
        self.causal = not bidirectional  # instance-level: a bidirectional stack has no step

    @property
    def modes(self) -> tuple[str, ...]:
        # The modes every layer offers; "recurrent" is always among them.
        return common_modes(self.layers)

    def _init_state(self, batch_size, device, dtype):
        return tuple(layer.init_state(batch_size, device=device, dtype=dtype) for layer in self.layers)

    def state_size_at(self, length: int) -> int:
        return sum(layer.state_size_at(length) for layer in self.layers)

    def _forward(self, x, state, lengths, mode):
        finals = []
        for index, (layer, layer_state) in enumerate(zip(self.layers, state)):
            if index > 0:
                x = self.dropout(x)
            x, final = layer(x, layer_state, lengths, mode)
            finals.append(final)
        return x, tuple(finals)

    def _step(self, x_t, state):
        finals = []
        for index, (layer, layer_state) in enumerate(zip(self.layers, state)):
            if index > 0:
                x_t = self.dropout(x_t)
            x_t, final = layer._inner_step(x_t, layer_state)
            finals.append(final)
        return x_t, tuple(finals)
