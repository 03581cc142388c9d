"""GateLoop: Katsch 2023, "GateLoop: Fully Data-Controlled Linear Recurrence for Sequence Modeling",
section 3. Per head, with a complex state ``S`` ``(K, V)``:

    a_t = sigmoid(W_a x_t) exp(i theta_t)          theta_t = W_theta x_t   (B, H, K): magnitude and phase
    S_t = diag(a_t) S_{t-1} + k_t v_t^T            y_t = Re(S_t^T q_t)
    out_t = W_o (RMSNorm_h(y_t) ⊙ SiLU(W_g x_t))

a linear recurrence whose transition is data-controlled in both magnitude (forgetting) and phase
(rotation), with real ``q, k, v``. The state is kept as its real and imaginary parts, ``(B, H, 2, K,
V)``.

Kernel: the rotation goes into the keys and queries, so the chunk form is
:mod:`rnnkit.ops.gated_linear_attention` with a real, per-key-dimension decay. With ``Theta_t`` the
cumulative phase, ``Re(q_t . k_j e^{i(Theta_t - Theta_j)}) = [q_t cos Theta_t, q_t sin Theta_t] .
[k_j cos Theta_j, k_j sin Theta_j]``, so the op runs on ``2K`` key dimensions with ``log |a_t|``
for both halves; its state ``[C; D]`` is the complex state seen in the frame of ``Theta``,
``S = e^{i Theta} (C - i D)``, converted at the start and the end of a call. ``Theta`` is summed in
float64 so that its rounding does not grow with the sequence. ``recurrent`` is the loop above, in
real arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnnkit.errors import check_positive_int
from rnnkit.layers._multihead import (
    HeadNorm,
    MultiHeadRecurrence,
    check_head_config,
    check_positive_number,
    check_power_of_two,
    merge_heads,
    split_heads,
)
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.gated_linear_attention import DEFAULT_CHUNK, gated_linear_attention
from rnnkit.ops.padding import freeze_padding, valid_mask


@dataclass
class GateLoopConfig:
    """Options of :class:`GateLoop`."""

    d_model: int  # input and output width D
    num_heads: int = 4  # H
    key_dim: int | None = None  # K per head (complex transitions); default D / (2 H), at least 1
    value_dim: int | None = None  # V per head; default D / H
    norm_eps: float = 1e-5  # of the per-head RMSNorm
    chunk_size: int = DEFAULT_CHUNK  # C of the chunk mode (a power of two)

    def __post_init__(self) -> None:
        self.value_dim = check_head_config(self.d_model, self.num_heads, self.value_dim, "value_dim")
        if self.key_dim is None:
            self.key_dim = max(1, self.d_model // (2 * self.num_heads))
        check_positive_int("key_dim", self.key_dim)
        check_positive_number("norm_eps", self.norm_eps)
        check_power_of_two("chunk_size", self.chunk_size)


@register(
    "gateloop",
    description="GateLoop (Katsch 2023): data-controlled complex decay (magnitude and phase), outer-product state",
    test_configs={
        "default": {"num_heads": 2, "key_dim": 2, "value_dim": 3, "chunk_size": 16},
        "one-head": {"num_heads": 1, "key_dim": 3, "chunk_size": 8},
    },
)
class GateLoop(MultiHeadRecurrence):
    """GateLoop layer (see the module docstring for the math and the kernel).

    Args: the fields of :class:`GateLoopConfig`.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state ``(B, H, 2, K, V)`` (real and imaginary parts).

    Example:
        >>> layer = GateLoop(d_model=64, num_heads=4)
        >>> y, S = layer(torch.randn(2, 100, 64))      # y (2, 100, 64), S (2, 4, 2, 8, 16)
    """

    MODES = ("recurrent", "chunk")

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = c = make_config(GateLoopConfig, "gateloop", config)
        H, K, V = c.num_heads, c.key_dim, c.value_dim
        self.d_input = self.d_output = c.d_model
        self.q_proj = nn.Linear(c.d_model, H * K, bias=False)
        self.k_proj = nn.Linear(c.d_model, H * K, bias=False)
        self.v_proj = nn.Linear(c.d_model, H * V, bias=False)
        self.a_proj = nn.Linear(c.d_model, 2 * H * K, bias=True)  # log-magnitude and phase of a_t
        self.g_proj = nn.Linear(c.d_model, H * V, bias=False)  # output gate
        self.o_proj = nn.Linear(H * V, c.d_model, bias=False)
        self.norm = HeadNorm(H, V, kind="rms", eps=c.norm_eps)

    def _init_state(self, batch_size, device, dtype):
        c = self.config
        return torch.zeros(batch_size, c.num_heads, 2, c.key_dim, c.value_dim, device=device, dtype=dtype)

    def _forward(self, x, state, lengths, mode):
        c = self.config
        H = c.num_heads
        q = split_heads(self.q_proj(x), H) * c.key_dim**-0.5  # (B, H, T, K)
        k = split_heads(self.k_proj(x), H)
        v = split_heads(self.v_proj(x), H)  # (B, H, T, V)
        magnitude, phase = self.a_proj(x).chunk(2, -1)
        log_a = split_heads(F.logsigmoid(magnitude), H)  # (B, H, T, K) log |a_t|
        theta = split_heads(phase, H)
        if mode == "recurrent":
            o, S = self._loop(q, k, v, log_a, theta, state, lengths)
        else:
            o, S = self._chunk(q, k, v, log_a, theta, state, lengths)
        return self.o_proj(self.norm(merge_heads(o), self.g_proj(x))), S

    @staticmethod
    def _loop(q, k, v, log_a, theta, state, lengths):
        """The definition, step by step, on the real and imaginary parts of ``S``."""
        re, im = state.unbind(2)  # (B, H, K, V) each
        ys = []
        steps = zip(*(t.unbind(2) for t in (q, k, v, log_a, theta)))
        for t, (q_t, k_t, v_t, log_a_t, theta_t) in enumerate(steps):
            m = torch.exp(log_a_t)[..., None]  # (B, H, K, 1)
            cos, sin = torch.cos(theta_t)[..., None], torch.sin(theta_t)[..., None]
            new = (m * (cos * re - sin * im) + k_t[..., :, None] * v_t[..., None, :], m * (sin * re + cos * im))
            re, im = freeze_padding(t, lengths, new, (re, im))
            ys.append(torch.einsum("bhk,bhkv->bhv", q_t, re))
        return torch.stack(ys, 2), torch.stack([re, im], 2)

    def _chunk(self, q, k, v, log_a, theta, state, lengths):
        """Gated linear attention on ``2K`` rotated key dimensions (see the module docstring)."""
        if lengths is not None:  # padding must not turn the frame after the last valid step
            valid = valid_mask(lengths, theta.shape[2])[:, None, :, None]  # (B, 1, T, 1)
            theta = torch.where(valid, theta, torch.zeros((), dtype=theta.dtype, device=theta.device))
        Theta = theta.to(torch.float64).cumsum(2)  # (B, H, T, K)
        cos, sin = torch.cos(Theta).to(q.dtype), torch.sin(Theta).to(q.dtype)
        q2 = torch.cat([q * cos, q * sin], -1)  # (B, H, T, 2K)
        k2 = torch.cat([k * cos, k * sin], -1)
        re, im = state.unbind(2)
        o, S2 = gated_linear_attention(q2, k2, v, torch.cat([log_a, log_a], -1), torch.cat([re, -im], 2), lengths,
                                       mode="chunk", chunk_size=self.config.chunk_size)
        C, D = S2.chunk(2, 2)  # (B, H, K, V) each; S = e^{i Theta_T} (C - i D)
        cos_T, sin_T = (t[:, :, -1, :, None] for t in (cos, sin))  # Theta at the last step (padding adds none)
        return o, torch.stack([cos_T * C + sin_T * D, sin_T * C - cos_T * D], 2)
