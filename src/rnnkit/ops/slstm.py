"""xLSTM's sLSTM cell (Beck et al. 2024, eq. 8-17, with its stabiliser) over a sequence, in two forms
run by one entry, :func:`slstm` with ``mode=``:

- ``"recurrent"``: :func:`slstm_recurrent`, the loop over :func:`slstm_cell` that autograd
  differentiates step by step. The definition.
- ``"fused"``: :func:`slstm_sequence`, the same loop on preallocated time-major buffers with a
  hand-written backward pass (as the classic cells' kernels in :mod:`rnnkit.ops.classic_rnn`): one
  ``(H, B, K) @ (H, K, 4K)`` batched matmul per step for the block-diagonal recurrence, the gate
  arithmetic on whole ``(H, B, K)`` slices, and the recurrent weight's gradient as one batched matmul
  over all steps at the end, instead of an autograd graph of a few dozen nodes per step.

One step, from the input's gate pre-activations ``pre_x = W x_t + b`` (gates z, i, f, o):

    [z~, i~, f~, o~] = pre_x + R h_{t-1}            R block-diagonal: H heads of K x K per gate
    m_t = max(log f_t + m_{t-1}, i~)                log f_t = logsigmoid(f~), or f~ (exponential forget gate)
    i'_t = exp(i~ - m_t)        f'_t = exp(log f_t + m_{t-1} - m_t)
    c_t = f'_t c_{t-1} + i'_t tanh(z~)              n_t = f'_t n_{t-1} + i'_t
    h_t = sigmoid(o~) c_t / n_t

``c`` and ``n`` are the paper's scaled by ``exp(-m_t)``. The zero state is "nothing read": where
``n = 0`` its ``m`` is read as minus infinity (:func:`~rnnkit.ops.padding.lowest_where_empty`), so
the first step's stabiliser is ``i~`` and ``n >= 1`` from then on. At a padding step (``lengths``)
the state is kept and the output is that kept state's ``h``, as the classic cells define it.

Shapes: ``pre_x`` ``(B, T, 4, H, K)``, ``recurrent`` ``(4, H, K, K)`` (gate, head, from, to),
state :class:`SLSTMState` of four ``(B, H K)`` -> ``h`` ``(B, T, H K)`` and the final state.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from rnnkit.errors import InputError, check_choice, check_lengths, check_tensor
from rnnkit.ops._forms import is_empty_batch
from rnnkit.ops.padding import freeze_padding, lowest_where_empty, valid_mask

#: Forms of :func:`slstm`, ``recurrent`` (the definition) first.
SLSTM_MODES = ("recurrent", "fused")


class SLSTMState(NamedTuple):
    """sLSTM state, each ``(B, H K)``: ``h`` the output, ``c`` the cell, ``n`` the normaliser (0 before
    the first step, then >= 1) and ``m`` the stabiliser."""

    h: torch.Tensor
    c: torch.Tensor
    n: torch.Tensor
    m: torch.Tensor


def slstm_cell(pre_x: torch.Tensor, state: SLSTMState, recurrent: torch.Tensor, exp_forget: bool) -> SLSTMState:
    """One step: ``pre_x`` (B, 4, H, K) the input's gate pre-activations, ``recurrent`` (4, H, K, K)
    -> the next :class:`SLSTMState`."""
    B, _, H, K = pre_x.shape
    h, c, n, m = state
    pre = pre_x + torch.einsum("bhk,ghkj->bghj", h.reshape(B, H, K), recurrent)  # (B, 4, H, K)
    z_pre, i_pre, f_pre, o_pre = (p.reshape(B, H * K) for p in pre.unbind(1))
    log_f = f_pre if exp_forget else F.logsigmoid(f_pre)
    decayed = log_f + lowest_where_empty(m, n)
    m_new = torch.maximum(decayed, i_pre)
    i_gate, f_gate = torch.exp(i_pre - m_new), torch.exp(decayed - m_new)
    c = f_gate * c + i_gate * torch.tanh(z_pre)
    n = f_gate * n + i_gate
    return SLSTMState(torch.sigmoid(o_pre) * c / n, c, n, m_new)


def slstm_recurrent(pre_x, state: SLSTMState, recurrent, exp_forget: bool = False, lengths=None):
    """The definition: :func:`slstm_cell` step by step, the state kept at padding; returns ``h``
    ``(B, T, H K)`` (the kept state's at padding) and the final :class:`SLSTMState`."""
    outputs = []
    for t in range(pre_x.shape[1]):
        state = freeze_padding(t, lengths, slstm_cell(pre_x[:, t], state, recurrent, exp_forget), state)
        outputs.append(state.h)
    return torch.stack(outputs, 1), state


# ------------------------------------------------------------------------------------- fused form
def _heads_first(t: torch.Tensor, H: int) -> torch.Tensor:
    """``(B, H K)`` -> ``(H, B, K)``."""
    return t.reshape(t.shape[0], H, -1).transpose(0, 1)


def _heads_last(t: torch.Tensor) -> torch.Tensor:
    """``(..., H, B, K)`` -> ``(..., B, H K)``."""
    return t.transpose(-3, -2).flatten(-2)


class _SLSTMSequence(torch.autograd.Function):
    """Time-major: ``xp`` (T, H, B, 4K) gate pre-activations (z, i, f, o blocks of K), states
    (H, B, K), ``rc`` (H, K, 4K) the recurrent blocks, ``mask`` (T, 1, B, 1) bool or None."""

    @staticmethod
    def forward(ctx, xp, h0, c0, n0, m0, rc, mask, exp_forget: bool):
        T, H, B, K4 = xp.shape
        K = K4 // 4
        # s[0] the initial state, s[t + 1] the (kept) state after step t; rows h, c, n, m
        s = xp.new_empty(T + 1, 4, H, B, K)
        for row, value in enumerate((h0, c0, n0, m0)):
            s[0, row] = value
        acts = xp.new_empty(T, 4, H, B, K)  # tanh(z~), i', f', sigmoid(o~)
        new = xp.new_empty(T, 3, H, B, K)  # the step's own (unkept) c, n, and log f's derivative factor
        route = xp.new_empty(T, H, B, K)  # the share of dm that goes to log f + m_{t-1} (1, 0, or 1/2 at a tie)
        if mask is not None:
            xp = xp.masked_fill(~mask, 0)  # padding may hold anything; its steps must stay finite
        for t in range(T):
            h, c, n, m = s[t].unbind(0)
            pre = torch.baddbmm(xp[t], h, rc).view(H, B, 4, K)
            z_pre, i_pre, f_pre, o_pre = pre.unbind(2)
            if exp_forget:
                log_f = f_pre
                new[t, 2].fill_(1)
            else:
                log_f = F.logsigmoid(f_pre)
                torch.sigmoid(-f_pre, out=new[t, 2])  # d logsigmoid(x) / dx = sigmoid(-x)
            decayed = log_f + lowest_where_empty(m, n)
            m_new = torch.maximum(decayed, i_pre)
            torch.sub(decayed.gt(i_pre).to(xp.dtype), decayed.eq(i_pre).to(xp.dtype), alpha=-0.5, out=route[t])
            z, i_gate, f_gate, o = acts[t].unbind(0)
            torch.tanh(z_pre, out=z)
            torch.exp(i_pre - m_new, out=i_gate)
            torch.exp(decayed - m_new, out=f_gate)
            torch.sigmoid(o_pre, out=o)
            c_new, n_new = new[t, 0], new[t, 1]
            torch.addcmul(i_gate * z, f_gate, c, out=c_new)
            torch.add(f_gate * n, i_gate, out=n_new)
            step = torch.stack([o * c_new / n_new, c_new, n_new, m_new])
            if mask is None:
                s[t + 1] = step
            else:
                torch.where(mask[t], step, s[t], out=s[t + 1])
        ctx.exp_forget = exp_forget
        ctx.save_for_backward(s, acts, new, route, rc, mask)
        return s[1:, 0].clone(), s[-1, 0].clone(), s[-1, 1].clone(), s[-1, 2].clone(), s[-1, 3].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_last, dc_last, dn_last, dm_last):
        s, acts, new, route, rc, mask = ctx.saved_tensors
        T, _, H, B, K = acts.shape
        zeros = s.new_zeros(H, B, K)
        # gradient w.r.t. the kept state after the current step: h, c, n, m
        g = torch.stack([t if t is not None else zeros for t in (dh_last, dc_last, dn_last, dm_last)])
        dpre = s.new_empty(T, H, B, 4, K)
        rc_t = rc.transpose(1, 2)  # (H, 4K, K)
        for t in range(T - 1, -1, -1):
            if dy is not None:
                g[0] += dy[t]
            d_new = g if mask is None else g * mask[t]
            dh, dc, dn, dm = d_new.unbind(0)
            _, c_prev, n_prev, _ = s[t].unbind(0)
            z, i_gate, f_gate, o = acts[t].unbind(0)
            c_new, n_new, dlogf_factor = new[t].unbind(0)
            ratio = c_new / n_new
            # h = o c / n
            do_pre = dh * ratio * o * (1 - o)
            dc = dc + dh * o / n_new
            dn = dn - dh * o * ratio / n_new
            # c = f' c_prev + i' z,  n = f' n_prev + i'
            a_f = (dc * c_prev + dn * n_prev) * f_gate  # d (log f + m_prev - m)
            a_i = (dc * z + dn) * i_gate  # d (i~ - m)
            dz_pre = dc * i_gate * (1 - z * z)
            dm_total = dm - a_i - a_f  # d m_t, to the branch of the max it came from
            d_decayed = a_f + dm_total * route[t]
            di_pre = a_i + dm_total * (1 - route[t])
            torch.stack([dz_pre, di_pre, d_decayed * dlogf_factor, do_pre], 2, out=dpre[t])
            d_old = torch.stack([
                torch.bmm(dpre[t].view(H, B, 4 * K), rc_t),
                dc * f_gate,
                dn * f_gate,
                torch.where(n_prev > 0, d_decayed, 0.0),
            ])
            g = d_old if mask is None else d_old + g * ~mask[t]
        flat = dpre.view(T, H, B, 4 * K)
        h_prev = s[:-1, 0].permute(1, 3, 0, 2).reshape(H, K, T * B)  # (H, K, T B)
        drc = torch.bmm(h_prev, flat.permute(1, 0, 2, 3).reshape(H, T * B, 4 * K))
        return flat, g[0], g[1], g[2], g[3], drc, None, None


def slstm_sequence(pre_x, state: SLSTMState, recurrent, exp_forget: bool = False, lengths=None):
    """The fused form: same arguments and results as :func:`slstm_recurrent`."""
    B, T, _, H, K = pre_x.shape
    xp = pre_x.permute(1, 3, 0, 2, 4).reshape(T, H, B, 4 * K)
    rc = recurrent.permute(1, 2, 0, 3).reshape(H, K, 4 * K)  # (H, K, 4K): column blocks z, i, f, o
    valid = valid_mask(lengths, T)
    mask = None if valid is None else valid.t()[:, None, :, None]  # (T, 1, B, 1)
    parts = [_heads_first(part, H) for part in state]
    ys, *final = _SLSTMSequence.apply(xp, *parts, rc, mask, exp_forget)
    return _heads_last(ys).transpose(0, 1), SLSTMState(*(_heads_last(part) for part in final))


def slstm(pre_x, state, recurrent, *, exp_forget: bool = False, lengths=None, mode: str = "fused"):
    """The sLSTM cell over a sequence (module docstring).

    Args:
        pre_x: ``(B, T, 4, H, K)`` gate pre-activations from the input (gates z, i, f, o).
        state: :class:`SLSTMState` (four ``(B, H K)``) or None (zeros: nothing read).
        recurrent: ``(4, H, K, K)`` the recurrent blocks.
        exp_forget: exponential forget gate (``log f = f~``) instead of a sigmoid one.
        lengths: ``(B,)`` or None.
        mode: ``"recurrent"`` (the definition) or ``"fused"``.

    Returns:
        ``h`` ``(B, T, H K)`` (the kept state's at padding) and the final :class:`SLSTMState`.

    Example:
        >>> h, state = slstm(torch.randn(2, 10, 4, 3, 8), None, torch.randn(4, 3, 8, 8) / 8)
    """
    check_choice("mode", mode, SLSTM_MODES)
    check_tensor("pre_x", pre_x)
    if pre_x.dim() != 5 or pre_x.shape[2] != 4:
        raise InputError(f"pre_x: expected shape (B, T, 4, H, K), got {tuple(pre_x.shape)}")
    B, T, _, H, K = pre_x.shape
    check_tensor("recurrent", recurrent)
    if tuple(recurrent.shape) != (4, H, K, K):
        raise InputError(f"recurrent: expected shape (4, H, K, K) = {(4, H, K, K)}, got {tuple(recurrent.shape)}")
    lengths = check_lengths(lengths, B, T, pre_x.device)
    if state is None:
        state = SLSTMState(*(pre_x.new_zeros(B, H * K) for _ in range(4)))
    if mode == "recurrent" or is_empty_batch(pre_x):
        return slstm_recurrent(pre_x, SLSTMState(*state), recurrent, exp_forget, lengths)
    return slstm_sequence(pre_x, SLSTMState(*state), recurrent, exp_forget, lengths)
