"""The RWKV channel mix: the MLP half of an RWKV block, as the MLP of residual blocks.

``rwkv_channel_mix`` (RWKV-4 to RWKV-6; the channel mixing of Peng et al. 2024, "Eagle and Finch"),
on the block's normed input ``x`` ``(B, T, D)``:

    x^k_t = x_t + (x_{t-1} - x_t) ⊙ mu_k          x^r_t = x_t + (x_{t-1} - x_t) ⊙ mu_r
    out_t = sigmoid(W_r x^r_t) ⊙ W_v ReLU(W_k x^k_t)^2

a token shift (a learned per-channel interpolation with the previous token), a squared-ReLU key of
width ``hidden`` and a receptance gate. ``rwkv7_channel_mix`` (RWKV-7; Peng et al. 2025) drops the
receptance: ``out_t = W_v ReLU(W_k x^k_t)^2``.

Each step reads the previous step's input, so the MLP has a state: ``x_{t-1}`` ``(B, D)`` (zeros
before the first step), carried by :class:`rnnkit.models.model.ResidualBlock` next to its mixer's.
The mixes start as in the authors' code, ``mu = 1 - (i / D)^(1 - depth)`` over channels ``i``
(RWKV-7: ``^((1 - depth)^4)``), with ``depth`` the block's index / number of blocks; the linear maps
take PyTorch's default initialisation.
"""

from __future__ import annotations

import torch
from torch import nn

from rnnkit.layers._shift import at_last_step, previous_inputs

#: The MLPs a residual block can use: ``gelu`` (``Linear -> GELU -> Linear``, stateless) and the two
#: RWKV channel mixes.
MLP_KINDS = ("gelu", "rwkv_channel_mix", "rwkv7_channel_mix")


class ChannelMix(nn.Module):
    """RWKV channel mix (see the module docstring).

    Args:
        d_model: D.
        hidden: width of the squared-ReLU key.
        receptance: True for RWKV-4..6's sigmoid receptance gate, False for RWKV-7's variant.
        depth: the block's index / number of blocks, in ``[0, 1]``, for the mixes' initialisation.

    Shapes: ``forward``: x ``(B, T, D)``, shift ``(B, D)`` -> ``(B, T, D)`` and the new shift
    ``(B, D)`` (x at each sequence's last valid step); ``step``: x_t ``(B, D)``, shift ``(B, D)`` ->
    ``(B, D)`` and ``x_t``.
    """

    def __init__(self, d_model: int, hidden: int, receptance: bool = True, depth: float = 0.0) -> None:
        super().__init__()
        self.mix_k = nn.Parameter(torch.empty(d_model))
        self.key = nn.Linear(d_model, hidden, bias=False)
        self.value = nn.Linear(hidden, d_model, bias=False)
        if receptance:
            self.mix_r = nn.Parameter(torch.empty(d_model))
            self.receptance = nn.Linear(d_model, d_model, bias=False)
        self.has_receptance = receptance
        self.depth = depth
        self.reset_parameters()

    def reset_parameters(self) -> None:
        shallow = 1.0 - self.depth  # the authors' ratio_1_to_almost0
        D = self.mix_k.numel()
        ddd = torch.arange(D, dtype=torch.float64) / D
        with torch.no_grad():
            if self.has_receptance:
                self.mix_k.copy_(1 - ddd**shallow)
                self.mix_r.copy_(1 - ddd**shallow)
            else:
                self.mix_k.copy_(1 - ddd ** (shallow**4))
        for linear in [self.key, self.value] + ([self.receptance] if self.has_receptance else []):
            linear.reset_parameters()

    def _mix(self, x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """The output for inputs ``x`` and their previous inputs ``previous`` (same shape, ``(..., D)``)."""
        xx = previous - x
        out = self.value(torch.relu(self.key(x + xx * self.mix_k)).square())
        if self.has_receptance:
            out = torch.sigmoid(self.receptance(x + xx * self.mix_r)) * out
        return out

    def forward(
        self, x: torch.Tensor, shift: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._mix(x, previous_inputs(x, shift)), at_last_step(x, lengths, 1)

    def step(self, x_t: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._mix(x_t, shift), x_t
