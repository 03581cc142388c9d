"""Aaren (Feng, Tung, Hajimirsadeghi, Bengio & Ahmed 2024, "Attention as an RNN"): softmax attention
of a learned query over the prefix, computed as a many-to-many RNN.

    s_t = q . k_t / sqrt(K)        o_t = sum_{i<=t} exp(s_i) v_i / sum_{i<=t} exp(s_i)

per head, with ``k_t = W_k x_t``, ``v_t = W_v x_t``, ``q`` a learned vector per head (the paper's
query token) and ``y_t = W_o [o_t]_heads``. The state is the running maximum ``m`` of the scores, the
numerator ``a = sum exp(s_i - m) v_i`` and the denominator ``c = sum exp(s_i - m)``, so no
exponential is taken of a positive number (log-sum-exp stabilisation):

    m_t = max(m_{t-1}, s_t)
    a_t = a_{t-1} exp(m_{t-1} - m_t) + v_t exp(s_t - m_t)        c_t = c_{t-1} exp(m_{t-1} - m_t) + exp(s_t - m_t)

Modes: ``recurrent``, the update above one step at a time (the definition, constant memory), and
``parallel``, the paper's parallel prefix scan: the triples ``(m, a, c)`` of single steps combine by
the associative operator ``(m_A, a_A, c_A) ⊕ (m_B, a_B, c_B) = (m, a_A e^{m_A - m} + a_B e^{m_B - m},
c_A e^{m_A - m} + c_B e^{m_B - m})``, ``m = max(m_A, m_B)``, run as a Hillis-Steele scan in
``ceil(log2(T + 1))`` rounds of whole-tensor ops (the carried state is the scan's first element).
Both equal softmax attention of ``q`` over the prefix computed directly (``tests/layers/test_aaren.py``).

The zero state is the empty prefix: ``c = 0`` marks it (after any step ``c >= 1``, since the step
attaining the maximum contributes ``exp(0)``), and its ``m`` is then read as minus infinity, so the
initial state is all zeros (as export's manifest records) and no score underflows against it.
Projections are initialised as ``torch.nn.Linear``; ``q`` as ``N(0, 1/K)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from rnnkit.layers._multihead import MultiHeadRecurrence, check_head_config, merge_heads, split_heads
from rnnkit.layers.registry import make_config, register
from rnnkit.ops.padding import freeze_padding, lowest_where_empty, valid_mask


@dataclass
class AarenConfig:
    """Options of :class:`Aaren`."""

    d_model: int  # input and output width D
    num_heads: int = 4  # H, each with its own learned query
    head_dim: int | None = None  # K = V per head; default d_model // H

    def __post_init__(self) -> None:
        self.head_dim = check_head_config(self.d_model, self.num_heads, self.head_dim)


class AarenState(NamedTuple):
    """The prefix's softmax statistics per head: ``m`` (B, H) the running maximum score, ``a``
    (B, H, V) the numerator and ``c`` (B, H) the denominator, both scaled by ``exp(-m)``; ``c = 0``
    is the empty prefix."""

    m: torch.Tensor
    a: torch.Tensor
    c: torch.Tensor


def _combine(earlier: AarenState, later: AarenState) -> AarenState:
    """The scan's associative operator: the statistics of two adjacent segments joined."""
    m = torch.maximum(earlier.m, later.m)
    w_earlier, w_later = torch.exp(earlier.m - m), torch.exp(later.m - m)
    return AarenState(m, earlier.a * w_earlier[..., None] + later.a * w_later[..., None],
                      earlier.c * w_earlier + later.c * w_later)


def prefix_softmax_recurrent(s: torch.Tensor, v: torch.Tensor, state: AarenState, lengths=None):
    """The definition, one step at a time: ``s`` (B, H, T) scores, ``v`` (B, H, T, V) values ->
    ``o`` (B, H, T, V) and the final :class:`AarenState`."""
    outputs = []
    for t in range(s.shape[2]):
        m_prev = lowest_where_empty(state.m, state.c)
        step = _combine(AarenState(m_prev, state.a, state.c),
                        AarenState(s[:, :, t], v[:, :, t], torch.ones_like(s[:, :, t])))
        outputs.append(step.a / step.c[..., None])
        state = freeze_padding(t, lengths, step, state)
    return torch.stack(outputs, 2), state


def prefix_softmax_scan(s: torch.Tensor, v: torch.Tensor, state: AarenState, lengths=None):
    """The parallel prefix scan (Hillis-Steele) over the carried state and the ``T`` steps; same
    arguments and results as :func:`prefix_softmax_recurrent`. Padding steps are the operator's
    identity ``(lowest, 0, 0)``, so the last element is the state at each sequence's last valid step."""
    ones = torch.ones_like(s)
    valid = valid_mask(lengths, s.shape[2])
    if valid is not None:
        mask = valid[:, None, :]  # (B, 1, T)
        s = torch.where(mask, s, torch.full((), torch.finfo(s.dtype).min, dtype=s.dtype, device=s.device))
        ones = mask.to(s.dtype).expand_as(s)
        v = torch.where(mask[..., None], v, torch.zeros((), dtype=v.dtype, device=v.device))
    first = lowest_where_empty(state.m, state.c)
    scan = AarenState(torch.cat([first[..., None], s], 2), torch.cat([state.a[:, :, None], v], 2),
                      torch.cat([state.c[..., None], ones], 2))  # (B, H, T + 1, ...)
    length, shift = s.shape[2] + 1, 1
    while shift < length:
        head = AarenState(scan.m[:, :, :shift], scan.a[:, :, :shift], scan.c[:, :, :shift])
        earlier = AarenState(scan.m[:, :, :-shift], scan.a[:, :, :-shift], scan.c[:, :, :-shift])
        later = AarenState(scan.m[:, :, shift:], scan.a[:, :, shift:], scan.c[:, :, shift:])
        joined = _combine(earlier, later)
        scan = AarenState(*(torch.cat([h, j], 2) for h, j in zip(head, joined)))
        shift *= 2
    o = scan.a[:, :, 1:] / scan.c[:, :, 1:, None]
    final = AarenState(scan.m[:, :, -1], scan.a[:, :, -1], scan.c[:, :, -1])
    # The carried-in empty state stays empty (zeros) only if no step is valid, which lengths >= 1 rules out.
    return o, final


@register(
    "aaren",
    description="Aaren (Feng et al. 2024): attention of a learned query over the prefix as an RNN, prefix-scan mode",
    test_configs={"default": {"num_heads": 1}, "heads": {"num_heads": 2, "head_dim": 3}},
)
class Aaren(MultiHeadRecurrence):
    """Attention as an RNN (see the module docstring).

    Args: the fields of :class:`AarenConfig`.

    Shapes: x ``(B, T, D)`` -> y ``(B, T, D)``; state :class:`AarenState` ``m`` (B, H), ``a`` (B, H, K),
    ``c`` (B, H): ``H (K + 2)`` floats.

    Example:
        >>> layer = Aaren(d_model=64, num_heads=4)
        >>> y, state = layer(torch.randn(2, 100, 64), mode="parallel")   # y (2, 100, 64)
    """

    MODES = ("recurrent", "parallel")

    def __init__(self, **config) -> None:
        super().__init__()
        self.config = c = make_config(AarenConfig, "aaren", config)
        self.d_input = self.d_output = c.d_model
        width = c.num_heads * c.head_dim
        self.kv_proj = nn.Linear(c.d_model, 2 * width, bias=False)
        self.o_proj = nn.Linear(width, c.d_model, bias=False)
        self.query = nn.Parameter(torch.randn(c.num_heads, c.head_dim) / math.sqrt(c.head_dim))

    def _auto_mode(self, x: torch.Tensor) -> str:
        return "recurrent" if x.shape[1] == 1 else "parallel"

    def _init_state(self, batch_size, device, dtype):
        c = self.config
        z = dict(device=device, dtype=dtype)
        return AarenState(torch.zeros(batch_size, c.num_heads, **z),
                          torch.zeros(batch_size, c.num_heads, c.head_dim, **z),
                          torch.zeros(batch_size, c.num_heads, **z))

    def scores_and_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``s`` (B, H, T) the query's scores and ``v`` (B, H, T, K) the values of ``x`` (B, T, D)."""
        c = self.config
        k, v = (split_heads(t, c.num_heads) for t in self.kv_proj(x).chunk(2, -1))  # (B, H, T, K)
        s = torch.einsum("bhtk,hk->bht", k, self.query) / math.sqrt(c.head_dim)
        return s, v

    def _forward(self, x, state, lengths, mode):
        s, v = self.scores_and_values(x)
        run = prefix_softmax_recurrent if mode == "recurrent" else prefix_softmax_scan
        o, state = run(s, v, AarenState(*state), lengths)
        return self.o_proj(merge_heads(o)), state
