"""Bidirectional wrapper: run any causal recurrence forwards and on the time-reversed input.

Schuster & Paliwal, "Bidirectional Recurrent Neural Networks" (1997). With ``lengths``, the
backward direction reverses each sequence within its own length, so it starts at that sequence's
last valid step and padding stays at the end (as flax's ``Bidirectional`` does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from rnnkit.errors import InputError, check_choice
from rnnkit.layers.base import Recurrence
from rnnkit.layers.registry import build, make_config, register, spec


class BidirectionalState(NamedTuple):
    """State of both directions: each is the wrapped layer's state."""

    forward: Any
    backward: Any


@dataclass
class BidirectionalConfig:
    """Bidirectional options; every other keyword goes to the wrapped layer."""

    d_model: int  # input width D_in
    layer: str = "lstm"  # registered causal recurrence to run in both directions
    merge: str = "concat"  # "concat" (D_out = 2 * inner) or "sum" (D_out = inner)
    options: dict = field(default_factory=dict)  # the wrapped layer's options (besides d_model)

    def __post_init__(self) -> None:
        check_choice("merge", self.merge, ("concat", "sum"))
        if not spec(self.layer).cls.causal:
            raise InputError(f"layer: expected a causal recurrence, got {self.layer!r}")


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Reverse ``x`` (B, T, ...) in time within each sequence's length; padding stays in place."""
    if lengths is None:
        return x.flip(1)
    time = torch.arange(x.shape[1], device=x.device)[None, :]  # (1, T)
    index = torch.where(time < lengths[:, None], lengths[:, None] - 1 - time, time)  # (B, T)
    index = index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


@register(
    "bidirectional",
    description="Bidirectional wrapper around any causal recurrence (Schuster & Paliwal 1997)",
    test_configs={
        "lstm": {"layer": "lstm", "hidden_size": 4},
        "gru-sum": {"layer": "gru", "merge": "sum"},
        "elman-rnnkit": {"layer": "elman", "kernel": "rnnkit", "hidden_size": 4},
    },
)
class Bidirectional(Recurrence):
    """Runs a causal recurrence over the sequence and over its reverse, and merges the outputs.

    Args:
        d_model: input width D.
        layer: name of the wrapped layer (any registered causal recurrence).
        merge: ``"concat"`` or ``"sum"``.
        **options: the wrapped layer's other options (e.g. ``hidden_size``).

    Shapes: x ``(B, T, D)`` -> y ``(B, T, 2H)`` (concat) or ``(B, T, H)`` (sum), H the wrapped
    layer's output width; state :class:`BidirectionalState`. The returned backward state is the one
    after reading each sequence back to its first step. Not causal: there is no ``step``.

    Example:
        >>> layer = Bidirectional(d_model=16, layer="gru", hidden_size=32)
        >>> y, state = layer(torch.randn(4, 10, 16), lengths=torch.tensor([10, 7, 3, 1]))  # y (4, 10, 64)
    """

    causal = False
    delegates_auto = True

    def __init__(self, d_model: int, layer: str = "lstm", merge: str = "concat", **options: Any) -> None:
        super().__init__()
        self.config = make_config(
            BidirectionalConfig, "bidirectional", {"d_model": d_model, "layer": layer, "merge": merge, "options": options}
        )
        self.forward_layer = build(layer, d_model=d_model, **options)
        self.backward_layer = build(layer, d_model=d_model, **options)
        self.d_input = d_model
        inner = self.forward_layer.d_output
        self.d_output = 2 * inner if merge == "concat" else inner

    @property
    def modes(self) -> tuple[str, ...]:
        return self.forward_layer.modes

    def _init_state(self, batch_size, device, dtype):
        return BidirectionalState(
            self.forward_layer.init_state(batch_size, device=device, dtype=dtype),
            self.backward_layer.init_state(batch_size, device=device, dtype=dtype),
        )

    def state_size_at(self, length: int) -> int:
        return self.forward_layer.state_size_at(length) + self.backward_layer.state_size_at(length)

    def _forward(self, x, state, lengths, mode):
        y_fwd, s_fwd = self.forward_layer(x, state.forward, lengths, mode)
        y_bwd, s_bwd = self.backward_layer(reverse_padded(x, lengths), state.backward, lengths, mode)
        y_bwd = reverse_padded(y_bwd, lengths)
        y = torch.cat([y_fwd, y_bwd], -1) if self.config.merge == "concat" else y_fwd + y_bwd
        return y, BidirectionalState(s_fwd, s_bwd)
