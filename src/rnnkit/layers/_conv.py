"""The short causal depthwise convolution that Mamba, Mamba-2, Hawk, GLA, DeltaNet, mLSTM and
linear attention put in front of their recurrences, with its input history as part of the state:
the module holding its weights; :func:`rnnkit.ops.short_conv` computes it."""

from __future__ import annotations

import torch
from torch import nn

from rnnkit.errors import check_choice, check_positive_int
from rnnkit.ops.short_conv import short_conv, short_conv_step

ACTIVATIONS = ("silu", "identity")


class ShortConv(nn.Module):
    """Causal depthwise convolution over time with its input history as state.

        y_t = act(bias + sum_{s=0}^{W-1} w_s ⊙ x_{t-W+1+s})

    The state is the last ``W - 1`` inputs, ``(B, D, W-1)``, oldest first; zeros at the start.
    Initialised as ``torch.nn.Conv1d`` (as in Mamba / Mamba-2): the same random draws, so a layer
    seeded alike starts alike. State dicts holding the weight in ``Conv1d``'s ``(D, 1, W)`` layout load.

    Args:
        channels: ``D``.
        kernel_size: ``W >= 2``.
        activation: ``"silu"`` (Mamba-2, GLA, DeltaNet) or ``"identity"``.
        bias: learn a bias.

    Example:
        >>> conv = ShortConv(8, 4)
        >>> y, state = conv(torch.randn(2, 10, 8), conv.init_state(2))   # y (2, 10, 8), state (2, 8, 3)
    """

    def __init__(self, channels: int, kernel_size: int = 4, activation: str = "silu", bias: bool = True) -> None:
        super().__init__()
        check_positive_int("conv_size", kernel_size, minimum=2)
        check_choice("conv_activation", activation, ACTIVATIONS)
        self.channels, self.kernel_size, self.activation = channels, kernel_size, activation
        conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=bias)
        self.weight = nn.Parameter(conv.weight.detach()[:, 0].clone())  # (D, W)
        self.bias = nn.Parameter(conv.bias.detach().clone()) if bias else None

    def init_state(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch_size, self.channels, self.kernel_size - 1, device=device, dtype=dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.dim() == 3 and weight.shape[1] == 1:
            state_dict[prefix + "weight"] = weight[:, 0]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self, x: torch.Tensor, state: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, T, D), any strides, ``state`` (B, D, W-1) -> ``y`` (B, T, D) and the state after
        each sequence's last valid step (``lengths`` (B,) or None); the op's own ``auto`` form (the
        compiled kernel on the CPU)."""
        return short_conv(x, self.weight, self.bias, state, lengths=lengths, activation=self.activation)

    def step(self, x_t: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: ``x_t`` (B, D), ``state`` (B, D, W-1) -> ``y_t`` (B, D) and the next state."""
        return short_conv_step(x_t, self.weight, self.bias, state, self.activation)
