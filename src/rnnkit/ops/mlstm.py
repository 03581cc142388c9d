"""The mLSTM cell of xLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory", eq. 19-27)
with its max-stabiliser, in three interchangeable forms.

    m_t = max(log f_t + m_{t-1}, log i_t)                       stabiliser (B, H)
    i'_t = exp(log i_t - m_t)       f'_t = exp(log f_t + m_{t-1} - m_t)
    C_t = f'_t C_{t-1} + i'_t k_t v_t^T                          (B, H, K, V)
    n_t = f'_t n_{t-1} + i'_t k_t                                (B, H, K)
    h_t = C_t^T q_t / (max(|n_t^T q_t|, exp(-m_t)) + eps)

``C`` and ``n`` are the paper's states scaled by ``exp(-m_t)``; ``exp(-m_t)`` in the denominator is
the paper's lower bound 1 in the same scale. ``log i`` is the input gate's pre-activation
(exponential gate), ``log f`` the log of the forget gate (``logsigmoid`` of its pre-activation
in xLSTM). ``m_0 = 0``.

Chunkwise: ``m_t`` unrolls to ``max(m_0 + b_t, max_{j<=t} (b_t - b_j + log i_j))`` with ``b`` the
cumulative log forget gate, so each step's stabiliser is a row maximum of the intra-chunk log-weight
matrix and the carried one; every exponential taken is of a log weight minus its row's maximum
(``<= 0``), and the chunk form reproduces the loop's ``m_t``, ``C_t``, ``n_t`` and ``h_t`` (up to
rounding), not an approximation with a different stabiliser.

Padding (``lengths``): steps past a length have ``log f = 0``, ``log i = -inf`` and ``q = k = v =
0``, so the state (``m`` included) is left as it was.

Example:
    >>> q, k, v = (torch.randn(2, 4, 100, 16) for _ in range(3))
    >>> log_i, log_f = torch.randn(2, 4, 100), F.logsigmoid(torch.randn(2, 4, 100) + 3)
    >>> h, (C, n, m) = mlstm_chunk(q, k, v, log_i, log_f)     # h (2, 4, 100, 16)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from rnnkit.errors import InputError, check_lengths, check_positive_int, check_tensor, describe
from rnnkit.ops.gated_linear_attention import DEFAULT_CHUNK, _pad_time, decay_matrix_log, suffix_sum


class MLSTMState(NamedTuple):
    """mLSTM state: ``C`` (B, H, K, V) and ``n`` (B, H, K) scaled by ``exp(-m)``, ``m`` (B, H)."""

    C: torch.Tensor
    n: torch.Tensor
    m: torch.Tensor


def _check_inputs(q, k, v, log_i, log_f, state, lengths):
    for name, t in (("q", q), ("k", k), ("v", v), ("log_i", log_i), ("log_f", log_f)):
        check_tensor(name, t)
        if not t.dtype.is_floating_point:
            raise InputError(f"{name}: expected a floating dtype, got {t.dtype}")
    if q.dim() != 4 or q.shape[2] < 1:
        raise InputError(f"q: expected shape (B, H, T, K) with T >= 1, got {tuple(q.shape)}")
    B, H, T, K = q.shape
    if k.shape != q.shape:
        raise InputError(f"k: expected shape (B, H, T, K) = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != (B, H, T):
        raise InputError(f"v: expected shape (B, H, T, V) = ({B}, {H}, {T}, V), got {tuple(v.shape)}")
    for name, t in (("log_i", log_i), ("log_f", log_f)):
        if t.shape != (B, H, T):
            raise InputError(f"{name}: expected shape (B, H, T) = {(B, H, T)}, got {tuple(t.shape)}")
    V = v.shape[-1]
    if state is None:
        state = MLSTMState(q.new_zeros(B, H, K, V), q.new_zeros(B, H, K), q.new_zeros(B, H))
    else:
        if not isinstance(state, tuple) or len(state) != 3:
            raise InputError(f"state: expected an MLSTMState (C, n, m), got {describe(state)}")
        for name, t, shape in zip(("state.C", "state.n", "state.m"), state, ((B, H, K, V), (B, H, K), (B, H))):
            check_tensor(name, t)
            if t.shape != shape:
                raise InputError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        state = MLSTMState(*state)
    lengths = check_lengths(lengths, B, T, q.device)
    if lengths is not None:
        mask = (torch.arange(T, device=q.device)[None, :] < lengths[:, None])[:, None]  # (B, 1, T)
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        q, k, v = (torch.where(mask[..., None], t, zero) for t in (q, k, v))
        log_f = torch.where(mask, log_f, zero)
        log_i = torch.where(mask, log_i, torch.full((), -math.inf, dtype=q.dtype, device=q.device))
    return q, k, v, log_i, log_f, state


def mlstm_recurrent(q, k, v, log_i, log_f, state=None, lengths=None, eps: float = 1e-6):
    """The step-by-step loop that defines the cell (see the module docstring).

    Args:
        q, k: ``(B, H, T, K)`` (any scaling of k is the caller's).
        v: ``(B, H, T, V)``.
        log_i: ``(B, H, T)`` input gate pre-activation (``i = exp(log_i)``).
        log_f: ``(B, H, T)`` log forget gate (``<= 0`` for a contraction).
        state: :class:`MLSTMState` or None (zeros).
        lengths: optional ``(B,)`` ints in ``[1, T]``.
        eps: added to the denominator.

    Returns:
        ``h`` ``(B, H, T, V)`` and the final :class:`MLSTMState`.
    """
    q, k, v, log_i, log_f, (C, n, m) = _check_inputs(q, k, v, log_i, log_f, state, lengths)
    hs = []
    # unbind once: indexing x[:, :, t] in the loop would make backward write a full-size zero
    # gradient per step (O(T^2) memory traffic).
    for q_t, k_t, v_t, li_t, lf_t in zip(q.unbind(2), k.unbind(2), v.unbind(2), log_i.unbind(2), log_f.unbind(2)):
        m_new = torch.maximum(lf_t + m, li_t)  # (B, H)
        i_gate = torch.exp(li_t - m_new)[..., None]  # (B, H, 1)
        f_gate = torch.exp(lf_t + m - m_new)[..., None]  # (B, H, 1)
        C = f_gate[..., None] * C + (i_gate * k_t)[..., None] * v_t[..., None, :]  # (B, H, K, V)
        n = f_gate * n + i_gate * k_t  # (B, H, K)
        m = m_new
        num = (q_t[..., None, :] @ C)[..., 0, :]  # C^T q_t (B, H, V)
        den = torch.maximum((q_t * n).sum(-1).abs(), torch.exp(-m))[..., None] + eps
        hs.append(num / den)
    return torch.stack(hs, 2), MLSTMState(C, n, m)


def mlstm_parallel(q, k, v, log_i, log_f, state=None, lengths=None, eps: float = 1e-6):
    """The quadratic form: the whole sequence as one block (same signature as the loop)."""
    q, k, v, log_i, log_f, state = _check_inputs(q, k, v, log_i, log_f, state, lengths)
    return _chunked(q, k, v, log_i, log_f, state, q.shape[2], eps)


def mlstm_chunk(q, k, v, log_i, log_f, state=None, lengths=None, eps: float = 1e-6, chunk_size: int = DEFAULT_CHUNK):
    """Chunkwise form (same signature as the loop, plus ``chunk_size``, any positive int)."""
    check_positive_int("chunk_size", chunk_size)
    q, k, v, log_i, log_f, state = _check_inputs(q, k, v, log_i, log_f, state, lengths)
    return _chunked(q, k, v, log_i, log_f, state, min(chunk_size, q.shape[2]), eps)


def _chunked(q, k, v, log_i, log_f, state, C, eps):
    B, H, T, K = q.shape
    V = v.shape[-1]
    N = math.ceil(T / C)
    pad = N * C - T
    G = B * H
    # Padded steps: log f = 0, log i = -inf (no input), k = v = 0: they change nothing.
    q, k, v, log_f = (_pad_time(t, pad) for t in (q, k, v, log_f))
    if pad:
        log_i = F.pad(log_i, (0, pad), value=-math.inf)
    q = q.reshape(G, N, C, K)
    k = k.reshape(G, N, C, K)
    v = v.reshape(G, N, C, V)
    log_f = log_f.reshape(G, N, C)
    log_i = log_i.reshape(G, N, C)
    b = log_f.cumsum(-1)  # (G, N, C) cumulative log forget gate from the chunk start
    b_last = b[..., -1]  # (G, N)

    # Chunk contributions to the end-of-chunk state, stabilised by their own maximum a_n.
    w_end = suffix_sum(log_f[..., None])[..., 0] + log_i  # (G, N, C) log weight of step j at the chunk end
    a = w_end.amax(-1)  # (G, N); -inf for a chunk of padding only
    a_safe = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    k_end = k * torch.exp(w_end - a_safe[..., None])[..., None]  # (G, N, C, K)
    U = k_end.transpose(-1, -2) @ v  # (G, N, K, V)
    u = k_end.sum(2)  # (G, N, K) the normaliser's share

    S, n, m = state.C.reshape(G, K, V), state.n.reshape(G, K), state.m.reshape(G)
    S_starts, n_starts, m_starts = [], [], []
    # unbind, not U[:, i]: each indexed slice's backward would zero-fill a full-size gradient.
    for b_i, a_i, U_i, u_i in zip(b_last.unbind(1), a.unbind(1), U.unbind(1), u.unbind(1)):
        S_starts.append(S)
        n_starts.append(n)
        m_starts.append(m)
        m_new = torch.maximum(m + b_i, a_i)
        carry, new = torch.exp(m + b_i - m_new)[:, None], torch.exp(a_i - m_new)[:, None]  # (G, 1)
        S = carry[..., None] * S + new[..., None] * U_i
        n = carry * n + new * u_i
        m = m_new
    S_start = torch.stack(S_starts, 1)  # (G, N, K, V)
    n_start = torch.stack(n_starts, 1)  # (G, N, K)
    m_start = torch.stack(m_starts, 1)  # (G, N)

    log_w = decay_matrix_log(log_f, b) + log_i[..., None, :]  # (G, N, C, C) log weight of j at row i, -inf for j > i
    m_inter = m_start[..., None] + b  # (G, N, C) the carried stabiliser decayed to step i
    m_row = torch.maximum(m_inter, log_w.amax(-1))  # (G, N, C) = the loop's m_t
    scores = (q @ k.transpose(-1, -2)) * torch.exp(log_w - m_row[..., None])  # (G, N, C, C), weights <= 1
    q_inter = q * torch.exp(m_inter - m_row)[..., None]  # (G, N, C, K)
    num = scores @ v + q_inter @ S_start  # (G, N, C, V)
    den = scores.sum(-1) + (q_inter * n_start[:, :, None, :]).sum(-1)  # (G, N, C) n_t^T q_t
    h = num / (torch.maximum(den.abs(), torch.exp(-m_row)) + eps)[..., None]
    h = h.reshape(B, H, N * C, V)[:, :, :T]
    return h, MLSTMState(S.reshape(B, H, K, V), n.reshape(B, H, K), m.reshape(B, H))
