"""Multi-scale retention (Sun et al. 2023, "Retentive Network: A Successor to Transformer for Large
Language Models", eq. 1-8), the recurrent form:

    S_t = gamma_h S_{t-1} + k_t v_t^T        o_t = S_t^T q_t            (per head h, k scaled by K^-1/2)
    y_t = W_O (swish(W_G x_t) ⊙ GroupNorm_h(o_t))

with fixed per-head decays ``gamma_h = 1 - 2^(-5-h)`` (section 2.2, "multi-scale": every head its own
memory length, from 32 to ``2^(4+H)`` steps), one normalisation group per head, value heads twice the
key width (``V = 2K``, as the paper's ``d_v = 2 d``), and a swish output gate. Projections are
Xavier-uniform with gain ``2^-2.5`` (q, k, v, g) and 1 (out), as in the authors' torchscale
implementation.

xPos (section 2.1, eq. 5; ``xpos=True``, the default): q and k are rotated by their position,
``Q_n = (X W_Q)_n e^{i n theta}``, ``K_m = (X W_K)_m e^{-i m theta}``, so that with the decay the
retention weight of step ``m`` at step ``n`` is ``gamma^(n-m) Re[q_n conj(k_m) e^{i (n-m) theta}]``:
a relative position that rotates as well as fades (``gamma e^{i theta}`` is the paper's xPos). Each
pair of key dimensions ``(2j, 2j+1)`` turns at ``theta_j = 10000^(-j / (K/2 - 1))`` (the torchscale
angles; an odd K leaves its last dimension unrotated). In real arithmetic the recurrence is

    S_t = gamma_h R_theta^T S_{t-1} + k_t v_t^T        o_t = S_t^T q_t

(``R_theta`` the block rotation), kept in the frame of the current step, so the state needs no
position counter and a sequence can be split anywhere. The kernels see ``R^t q_t`` and ``R^t k_t``
with ``t`` counted from the start of each call, and the final state is turned back by ``R^-L``;
angles are taken in fp64, so fp32 rotations stay exact to rounding at any length within a call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rnnkit.errors import InputError, check_positive_int
from rnnkit.layers._multihead import HeadNorm, MultiHeadRecurrence, check_head_config, merge_heads, split_heads
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.gated_linear_attention import DEFAULT_CHUNK, gated_linear_attention


@dataclass
class RetNetConfig:
    """Options of :class:`RetNet`."""

    d_model: int  # input and output width D
    num_heads: int = 4  # H, each with its own decay gamma_h = 1 - 2^(-5-h)
    head_dim: int | None = None  # K per head; default d_model // num_heads
    value_factor: int = 2  # V = value_factor * K (the paper's d_v = 2 d)
    chunk_size: int = DEFAULT_CHUNK  # C of the chunk mode
    xpos: bool = True  # rotate q and k by their positions (the paper's xPos); False: decay only

    def __post_init__(self) -> None:
        self.head_dim = check_head_config(self.d_model, self.num_heads, self.head_dim)
        check_positive_int("value_factor", self.value_factor)
        check_positive_int("chunk_size", self.chunk_size)
        if not isinstance(self.xpos, bool):
            raise InputError(f"xpos: expected a bool, got {self.xpos!r}")


def retention_log_decay(num_heads: int) -> torch.Tensor:
    """``log(gamma_h)`` with ``gamma_h = 1 - 2^(-5-h)``, ``h = 0..H-1`` (Sun et al. 2023, section 2.2)."""
    return torch.log1p(-torch.exp2(-5.0 - torch.arange(num_heads, dtype=torch.float64)))


def xpos_angles(head_dim: int) -> torch.Tensor:
    """``theta_j = 10000^(-j / (P-1))``, ``j = 0..P-1``, ``P = K // 2`` (fp64): one angle per pair of
    key dimensions, from 1 rad per step down to 1e-4 (torchscale's ``RetNetRelPos``)."""
    return 10000.0 ** -torch.linspace(0, 1, head_dim // 2, dtype=torch.float64)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn each pair ``(x_2j, x_2j+1)`` of the last dimension by the angle whose cosine and sine are
    ``cos``, ``sin`` (``(..., P)``, broadcast against ``x[..., :2P:2]``); dimensions past ``2P`` stay."""
    P = cos.shape[-1]
    even, odd = x[..., 0 : 2 * P : 2], x[..., 1 : 2 * P : 2]
    turned = torch.stack([even * cos - odd * sin, odd * cos + even * sin], -1).flatten(-2)
    return torch.cat([turned, x[..., 2 * P :]], -1) if 2 * P < x.shape[-1] else turned


@register(
    "retnet",
    description="RetNet multi-scale retention (Sun et al. 2023): fixed per-head decays, group norm, swish gate",
    test_configs={"default": {"num_heads": 2, "head_dim": 3, "chunk_size": 16}},
)
class RetNet(MultiHeadRecurrence):
    """Multi-scale retention layer (see the module docstring for the math and reference).

    Args: the fields of :class:`RetNetConfig`.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state ``(B, H, K, V)``.

    Example:
        >>> layer = RetNet(d_model=64, num_heads=4)
        >>> y, S = layer(torch.randn(2, 100, 64))      # y (2, 100, 64), S (2, 4, 16, 32)
    """

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = c = make_config(RetNetConfig, "retnet", config)
        self.d_input = self.d_output = c.d_model
        self.value_dim = c.value_factor * c.head_dim
        key_width, value_width = c.num_heads * c.head_dim, c.num_heads * self.value_dim
        self.q_proj = nn.Linear(c.d_model, key_width, bias=False)
        self.k_proj = nn.Linear(c.d_model, key_width, bias=False)
        self.v_proj = nn.Linear(c.d_model, value_width, bias=False)
        self.g_proj = nn.Linear(c.d_model, value_width, bias=False)
        self.o_proj = nn.Linear(value_width, c.d_model, bias=False)
        self.norm = HeadNorm(c.num_heads, self.value_dim, kind="layer")
        # Fixed, not learned, and kept in fp64 outside the module's tensors: a buffer would be rounded to
        # the dtype the layer is built in, and casting the layer to fp64 afterwards could not undo that.
        self.log_gamma = retention_log_decay(c.num_heads)  # (H,) fp64
        # Angles stay fp64 (not a buffer, so a cast of the layer leaves them): positions times
        # angles are formed in fp64 and only their cosines and sines take the layer's dtype.
        self.theta = xpos_angles(c.head_dim) if c.xpos else None
        self.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written while the decays were a buffer carry them; they are recomputed instead.
        state_dict.pop(prefix + "log_gamma", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.g_proj):
            nn.init.xavier_uniform_(proj.weight, gain=2**-2.5)
        nn.init.xavier_uniform_(self.o_proj.weight)

    def _init_state(self, batch_size, device, dtype):
        c = self.config
        return torch.zeros(batch_size, c.num_heads, c.head_dim, self.value_dim, device=device, dtype=dtype)

    def _forward(self, x, state, lengths, mode):
        c = self.config
        B, T, _ = x.shape
        q = split_heads(self.q_proj(x), c.num_heads)  # (B, H, T, K)
        k = split_heads(self.k_proj(x), c.num_heads) * c.head_dim**-0.5  # (B, H, T, K)
        v = split_heads(self.v_proj(x), c.num_heads)  # (B, H, T, V)
        log_gamma = self.log_gamma.to(device=x.device, dtype=q.dtype)
        log_decay = log_gamma[None, :, None].expand(B, c.num_heads, T)  # (B, H, T)
        if self.theta is None:
            o, state = gated_linear_attention(q, k, v, log_decay, state, lengths, mode=mode, chunk_size=c.chunk_size)
        else:
            o, state = self._retain_rotated(mode, q, k, v, log_decay, state, lengths)
        y = self.norm(merge_heads(o), self.g_proj(x))  # swish(W_G x) ⊙ GroupNorm(o)
        return self.o_proj(y), state

    def _retain_rotated(self, mode, q, k, v, log_decay, state, lengths):
        """Retention with xPos: the kernel on ``R^t q_t``, ``R^t k_t`` (``t = 1..T`` in this call) from
        the incoming state, then the final state turned back into its last step's frame (``R^-L``)."""
        T = q.shape[2]
        theta = self.theta.to(q.device)
        angle = torch.arange(1, T + 1, device=q.device, dtype=torch.float64)[:, None] * theta  # (T, P)
        cos, sin = angle.cos().to(q.dtype), angle.sin().to(q.dtype)
        o, S = gated_linear_attention(rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin), v, log_decay, state,
                                      lengths, mode=mode, chunk_size=self.config.chunk_size)
        L = torch.full((q.shape[0],), T, device=q.device) if lengths is None else lengths  # (B,)
        back = -L.to(torch.float64)[:, None, None, None] * theta  # (B, 1, 1, P)
        S = rotate_pairs(S.transpose(-1, -2), back.cos().to(q.dtype), back.sin().to(q.dtype))  # (B, H, V, K)
        return o, S.transpose(-1, -2).contiguous()

