"""The mLSTM cell of xLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory", eq. 19-27)
with its max-stabiliser, in three interchangeable forms run by one entry, :func:`mlstm` with
``mode=``: :func:`mlstm_recurrent` (the loop, the definition), :func:`mlstm_parallel` (the whole
sequence as one block) and :func:`mlstm_chunk` (chunkwise).

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
rounding), not an approximation with a different stabiliser. With mild forget gates (every
within-chunk cumulative ``|b| <= MILD_BOUND``) the maximum over ``j`` is a cumulative maximum of
``log i_j - b_j`` and the chunk form runs as :class:`_ChunkwiseMLSTM`, a hand-written forward and
backward on reused buffers; stronger gates take autograd through the segment-sum form.

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
from torch.autograd.function import once_differentiable

from rnnkit.errors import InputError, check_lengths, check_positive_int, check_tensor, describe
from rnnkit.ops._chunk_math import addmm_, causal_float, common_dtype, decay_matrix_log, mm, pad_time, suffix_sum
from rnnkit.ops._forms import run_form
from rnnkit.ops._rows import row_pass
from rnnkit.ops._workspace import into, workspace, workspace_like
from rnnkit.ops.gated_linear_attention import DEFAULT_CHUNK
from rnnkit.ops.padding import valid_mask, zero_padding

#: The hand-written kernel runs when every within-chunk cumulative log forget gate is within this
#: bound (differences of cumulative sums then exact to ~1e-6); stronger decays take the autograd
#: form with segment sums.
MILD_BOUND = 16.0

#: In the kernel, the intra-chunk weights ``exp(c_j - X_i)`` are taken as the product of a row
#: factor ``exp(Y_n - X_i)`` and the column factor ``exp(c_j - Y_n)`` already applied to the keys for
#: the chunk's end state, when every row factor's exponent is at most this (and at most a quarter of
#: the dtype's overflow exponent): the factors stay far from overflow and underflow, and no (C, C)
#: weight matrix is formed (four passes: subtract, clamp, exp, mask); the row factors and the causal
#: mask are applied in the pass that takes the scores' row sums.
ROW_FACTOR_BOUND = 20.0


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
        mask = valid_mask(lengths, T)  # (B, T)
        q, k, v, log_f = zero_padding(mask, q, k, v, log_f)
        log_i = torch.where(mask[:, None], log_i, torch.full((), -math.inf, dtype=q.dtype, device=q.device))
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


#: Forms :func:`mlstm` runs, ``recurrent`` (the definition) first.
_FORMS = {"recurrent": mlstm_recurrent, "parallel": mlstm_parallel, "chunk": mlstm_chunk}
MLSTM_MODES = tuple(_FORMS)


def mlstm(q, k, v, log_i, log_f, state=None, lengths=None, *, eps: float = 1e-6, mode: str = "chunk",
          chunk_size: int = DEFAULT_CHUNK):
    """The mLSTM cell in the form ``mode`` (see the module docstring for the recurrence).

    Args:
        q, k: ``(B, H, T, K)``; v: ``(B, H, T, V)``; log_i, log_f: ``(B, H, T)``; state:
            :class:`MLSTMState` or None; lengths: ``(B,)`` or None; eps: as :func:`mlstm_recurrent`.
        mode: ``"recurrent"`` (the loop, the definition), ``"parallel"`` (one block) or ``"chunk"``
            (chunkwise, the default).
        chunk_size: steps per chunk of the ``chunk`` form.

    Returns:
        ``h`` ``(B, H, T, V)`` and the final :class:`MLSTMState`.

    Raises:
        InputError: an unknown ``mode``, or bad shapes, dtypes, state or lengths.
    """
    return run_form(mode, _FORMS, (q, k, v, log_i, log_f, state, lengths, eps), chunk_size)


def _chunked(q, k, v, log_i, log_f, state, C, eps):
    """Core of the parallel and chunk forms on validated inputs, chunks of ``C`` steps."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    N = math.ceil(T / C)
    pad = N * C - T
    G = B * H
    # Padded steps: log f = 0, log i = -inf (no input), k = v = 0: they change nothing.
    q, k, v, log_f = (pad_time(t, pad) for t in (q, k, v, log_f))
    if pad:
        log_i = F.pad(log_i, (0, pad), value=-math.inf)
    q = q.reshape(G, N, C, K)
    k = k.reshape(G, N, C, K)
    v = v.reshape(G, N, C, V)
    log_f = log_f.reshape(G, N, C)
    log_i = log_i.reshape(G, N, C)
    S0, n0, m0 = state.C.reshape(G, K, V), state.n.reshape(G, K), state.m.reshape(G)
    tensors = common_dtype(q, k, v, log_i, log_f, S0, n0, m0)
    # Mild decays (every within-chunk cumulative log forget gate within MILD_BOUND): the kernel
    # below; strong ones keep the segment sums of the autograd form, whose rounding does not grow
    # with the cumulative decay.
    b = tensors[4].detach().cumsum(-1)
    if b.numel() and bool(b.abs().max() <= MILD_BOUND):
        with torch.autocast(q.device.type, enabled=False):
            h, S, n, m = _ChunkwiseMLSTM.apply(*tensors, eps)
    else:
        h, S, n, m = _chunked_strong(*tensors, eps)
    h = h.reshape(B, H, N * C, V)[:, :, :T]
    return h, MLSTMState(S.reshape(B, H, K, V), n.reshape(B, H, K), m.reshape(B, H))


def _chunked_strong(q, k, v, log_i, log_f, S, n, m, eps):
    """Autograd through the stabilised chunk form with log weights from segment sums (strong
    decays); q, k (G, N, C, K), v (G, N, C, V), gates (G, N, C), state S (G, K, V), n (G, K), m (G)."""
    G, N, C, K = q.shape
    V = v.shape[-1]
    b = log_f.cumsum(-1)  # (G, N, C) cumulative log forget gate from the chunk start
    b_last = b[..., -1]  # (G, N)

    # Chunk contributions to the end-of-chunk state, stabilised by their own maximum a_n.
    w_end = suffix_sum(log_f[..., None])[..., 0] + log_i  # (G, N, C) log weight of step j at the chunk end
    a = w_end.amax(-1)  # (G, N); -inf for a chunk of padding only
    a_safe = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    k_end = k * torch.exp(w_end - a_safe[..., None])[..., None]  # (G, N, C, K)
    U = k_end.transpose(-1, -2) @ v  # (G, N, K, V)
    u = k_end.sum(2)  # (G, N, K) the normaliser's share

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
    return h, S, n, m


def _weights_factor(rise: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the kernel's intra-chunk weights are formed from row and column factors: every row
    factor's exponent ``rise = Y_n - X_i`` (G, N, C) within :data:`ROW_FACTOR_BOUND` and a quarter of
    ``dtype``'s overflow exponent (fp32 and bf16: 22; fp16: 2.8), so that the row factors, and the
    gradients they scale, stay finite."""
    bound = min(ROW_FACTOR_BOUND, math.log(torch.finfo(dtype).max) / 4)
    return bool(rise.max() <= bound)


def _ones(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.ones(n, dtype=like.dtype, device=like.device)


class _ChunkwiseMLSTM(torch.autograd.Function):
    """Chunkwise mLSTM for mild decays, with a hand-written backward.

    q, k (G, N, C, K); v (G, N, C, V); log_i, log_f (G, N, C); state S0 (G, K, V), n0 (G, K),
    m0 (G). With ``b`` the cumulative log forget gate from the chunk start and ``c_j = log i_j - b_j``,
    the loop's stabiliser is ``m_t = b_i + X_i`` with ``X_i = max(m_n, max_{j<=i} c_j)`` (a
    cumulative maximum; ``m_n`` the stabiliser entering chunk n), so every exponential is of a
    difference with that maximum: intra-chunk weights ``P_ij = exp(c_j - X_i)``, the carried
    state's read-out factor ``exp(m_n - X_i)``, the chunk's share of its end state
    ``exp(c_j - Y_n)`` and the carry ``exp(m_n - Y_n)`` with ``Y_n = max(m_n, max_j c_j)`` and
    ``m_{n+1} = b_C + Y_n``; all ``<= 0`` in the exponent. When every ``Y_n - X_i`` is within
    :data:`ROW_FACTOR_BOUND` (:func:`_weights_factor`), ``P_ij = exp(Y_n - X_i) exp(c_j - Y_n)``: the
    scores are ``q k_end^T`` with ``k_end = k exp(c - Y_n)`` (the chunk's end-state keys), rows
    scaled by ``exp(Y_n - X_i)`` and masked to ``j <= i``, and no ``(C, C)`` weight matrix is formed.
    A row factor may be large but its product with each unmasked column factor is a weight ``<= 1``.

    Backward. ``h`` depends on the stabilisers only through the denominator: with every stabiliser
    held fixed the kernel is a gated linear attention (``C``, ``n`` carried with decay
    ``exp(b_C)``, input weight ``exp(log i)``), whose gradients follow GLA's pattern
    (``dL/d log i_j = k_j . dk_j``, ``dL/db_i = q_i . dq_i - k_i . dk_i`` plus
    ``<dS_{n+1}, S_{n+1}> + <dn_{n+1}, n_{n+1}>`` for the chunk's last step). The stabilisers
    themselves then add: ``dh_t/dm_t = -h_t eps / (max(|n_t^T q_t|, exp(-m_t)) + eps)`` (the
    scaled-out form ``h_t = C~_t^T q_t / (max(|n~_t^T q_t|, 1) + eps exp(m_t))`` shows this is the
    whole dependence, lower bound active or not), and for the returned state
    ``dL/dm - <dL/dC, C> - <dL/dn, n>``; both flow back along the maximum that chose each ``m_t``
    (to ``log i`` of the argmax and the forget gates after it, or to the carried ``m``), as the
    loop's ``torch.maximum`` sends them. The initial ``m_0`` scales ``C_0`` and ``n_0``:
    ``dL/dm_0 = <dL/dC_0, C_0> + <dL/dn_0, n_0>`` plus its share of that flow.
    Large tensors are workspace buffers written by ``out=`` ops (see ``_ChunkwiseGLA``).
    """

    @staticmethod
    def forward(ctx, q, k, v, log_i, log_f, S0, n0, m0, eps):
        G, N, C, K = q.shape
        V = v.shape[-1]
        b = log_f.cumsum(-1)  # (G, N, C)
        c = log_i - b  # (G, N, C): log weight of step j relative to the chunk's cumulative decay
        c_max, c_arg = c.max(-1)  # (G, N)
        # Stabilisers at the chunk boundaries (the only sequential part besides the state carry).
        m_at = q.new_empty(N + 1, G)  # m_at[n] enters chunk n; m_at[N] is the final m
        Y = q.new_empty(N, G)
        m_at[0] = m0
        b_last, c_max_t = b[..., -1].t(), c_max.t()  # (N, G)
        for n in range(N):
            torch.maximum(m_at[n], c_max_t[n], out=Y[n])
            torch.add(Y[n], b_last[n], out=m_at[n + 1])
        m_start, Y = m_at[:N].t(), Y.t()  # (G, N)
        carry_wins = m_start >= c_max  # the carried m chose Y_n (else log i at c_arg)
        alpha = torch.exp(m_start - Y)  # (G, N) carry factor, <= 1
        e = torch.exp(c - Y[..., None])  # (G, N, C) weight of step j in the chunk's end state, <= 1
        # k_end = e k and u (G, N, K), the normaliser's share of the chunk's end state, in one pass
        k_end, _, u = row_pass(k, C, scale=e, out=workspace_like(k), col=True)
        U = mm(k_end.transpose(-1, -2), v)  # (G, N, K, V) each chunk's share of its end state
        S_start = workspace((G, N, K, V), q)
        n_start = q.new_empty(G, N, K)
        S_start[:, 0] = S0
        n_start[:, 0] = n0
        a4, a3 = alpha[..., None, None], alpha[..., None]
        for n in range(N - 1):
            into(torch.addcmul, U[:, n], a4[:, n], S_start[:, n], out=S_start[:, n + 1])
            into(torch.addcmul, u[:, n], a3[:, n], n_start[:, n], out=n_start[:, n + 1])
        S = torch.addcmul(U[:, -1], a4[:, -1], S_start[:, -1])
        n_fin = torch.addcmul(u[:, -1], a3[:, -1], n_start[:, -1])
        del U

        c_cum, c_cum_arg = torch.cummax(c, -1)  # (G, N, C)
        inter_wins = m_start[..., None] >= c_cum  # m_t came from the carried m (else log i at c_cum_arg)
        X = torch.maximum(c_cum, m_start[..., None])  # (G, N, C) = m_t - b_t
        # P: the weights (G, N, C, C), or their row factors (G, N, C) when they factor (see the class
        # docstring; then the causal mask is applied with them): the scores are (q k^T) ⊙ P or
        # (q k_end^T) scaled by rows and masked, and their gradient is taken w.r.t. that product.
        rise = Y[..., None] - X  # (G, N, C) >= 0
        factor = _weights_factor(rise, q.dtype)
        if factor:
            P = rise.exp_()
            scores = mm(q, k_end.transpose(-1, -2))  # (G, N, C, C), times P below
        else:
            P = workspace((G, N, C, C), q)
            torch.sub(c[..., None, :], X[..., :, None], out=P)  # c_j - X_i <= 0 for j <= i
            # Clamped: exp of an argument where the result underflows (or of -inf) runs far slower
            # than exp of a normal argument (benchmarks/chunk_speed.py); a weight below the smallest normal number is
            # rounding anyway. Above the diagonal the argument may be positive: clamped to 0, then
            # masked.
            P.clamp_(min=math.log(torch.finfo(q.dtype).tiny) + 1, max=0).exp_().mul_(causal_float(C, q))
            scores = mm(q, k.transpose(-1, -2))  # (G, N, C, C), times P below
        # n_t^T q_t (G, N, C): the scores' row sums plus the carried normaliser's share, each taken
        # in the pass that forms its left factor
        _, den, _ = row_pass(scores, C, scale=P, causal=factor, out=scores, dot_with=_ones(C, q))
        r = torch.exp(m_start[..., None] - X)  # (G, N, C) read-out factor of the carried state, <= 1
        q_inter, den_inter, _ = row_pass(q, C, scale=r, out=workspace_like(q), dot_with=n_start)
        den += den_inter
        num = addmm_(mm(q_inter, S_start), scores, v)  # (G, N, C, V) C_t^T q_t
        lower = torch.exp(-(b + X))  # exp(-m_t)
        active = den.abs() > lower  # |n_t^T q_t| is the denominator, else the lower bound
        Dn = torch.maximum(den.abs(), lower).add_(eps)
        h = num.div_(Dn[..., None])
        ctx.eps = eps
        ctx.factor = factor
        ctx.save_for_backward(
            q, k, v, k_end, q_inter, r, e, P, scores, S_start, n_start, S, n_fin, S0, n0, alpha, h, Dn,
            torch.where(active, den.sign(), 0), c_arg, carry_wins, c_cum_arg, inter_wins,
        )
        return h, S, n_fin, m_at[N].clone()

    @staticmethod
    @once_differentiable  # a second derivative through this backward is not implemented
    def backward(ctx, dh, dS_fin, dn_fin, dm_fin):
        with torch.autocast(dh.device.type, enabled=False):
            return _ChunkwiseMLSTM._backward(ctx, dh, dS_fin, dn_fin, dm_fin)

    @staticmethod
    def _backward(ctx, dh, dS_fin, dn_fin, dm_fin):
        (q, k, v, k_end, q_inter, r, e, P, scores, S_start, n_start, S_fin, n_fin, S0, n0, alpha, h, Dn,
         den_sign, c_arg, carry_wins, c_cum_arg, inter_wins) = ctx.saved_tensors
        G, N, C, K = q.shape
        # written contiguous (dh may be a broadcast): the batched matmuls read only dnum
        dnum, dDn, _ = row_pass(dh, C, scale=Dn.reciprocal(), out=workspace_like(h), dot_with=h)
        dDn.neg_()  # (G, N, C) dL/dDn = -h . dh / Dn
        dden = dDn * den_sign  # 0 where the lower bound is the denominator
        g_m = dDn * ctx.eps  # (G, N, C) dL/dm_t through the eps of the denominator

        # State gradients: from each chunk's read-out, then carried backwards; dU[:, n] = dL/dS_{n+1}.
        dS_start = mm(q_inter.transpose(-1, -2), dnum)  # (G, N, K, V)
        _, _, dn_start = row_pass(q_inter, C, write=False, col=True, weights=dden)  # (G, N, K)
        dU = workspace(S_start.shape, q)
        du = torch.empty_like(n_start)
        if dS_fin is None:
            dU[:, -1].zero_()
        else:
            dU[:, -1] = dS_fin
        if dn_fin is None:
            du[:, -1].zero_()
        else:
            du[:, -1] = dn_fin
        a4, a3 = alpha[..., None, None], alpha[..., None]
        # <dL/dS_{n+1}, S_{n+1}> per chunk (the end-of-chunk states are S_start shifted by one,
        # then the final state), taken in the loop while dU[:, n] is in cache
        d_end = q.new_empty(N, G)
        prod = torch.empty_like(S_fin)  # (G, K, V), stays in cache
        for n in range(N - 1, -1, -1):
            S_next = S_fin if n == N - 1 else S_start[:, n + 1]
            torch.sum(torch.mul(dU[:, n], S_next, out=prod).view(G, -1), -1, out=d_end[n])
            if n:
                into(torch.addcmul, dS_start[:, n], a4[:, n], dU[:, n], out=dU[:, n - 1])
                into(torch.addcmul, dn_start[:, n], a3[:, n], du[:, n], out=du[:, n - 1])
        dS0 = torch.addcmul(dS_start[:, 0], a4[:, 0], dU[:, 0])
        dn0 = torch.addcmul(dn_start[:, 0], a3[:, 0], du[:, 0])
        del dS_start
        d_end = d_end.t()  # (G, N)
        d_end[:, :-1] += (du[:, :-1] * n_start[:, 1:]).sum(-1)
        d_end[:, -1] += (du[:, -1] * n_fin).sum(-1)

        dscores = mm(dnum, v.transpose(-1, -2))
        row_pass(dscores, C, a=dden, vec=_ones(C, q), scale=P, causal=ctx.factor, out=dscores)  # (G, N, C, C)
        dv = addmm_(mm(scores.transpose(-1, -2), dnum), k_end, dU)
        dq = mm(dnum, S_start.transpose(-1, -2))
        row_pass(dq, C, a=dden, vec=n_start, scale=r, out=dq)  # (dq_inter + dden n^T) r
        dk_end = mm(v, dU.transpose(-1, -2))  # w.r.t. k_end, less du
        # Gates with every stabiliser held fixed: log i_j enters as exp(log i_j) k_j, b as GLA's
        # decays (only through exp(b_i - b_j) and the chunk's end); dlog_i = k . dk (G, N, C).
        if ctx.factor:  # the scores' keys are k_end: their gradient joins dk_end before the e scale
            dq = addmm_(dq, dscores, k_end)
            dk, dlog_i, _ = row_pass(addmm_(dk_end, dscores.transpose(-1, -2), q), C, vec=du, scale=e,
                                     out=dk_end, dot_with=k)
        else:
            dq = addmm_(dq, dscores, k)
            row_pass(dk_end, C, vec=du, scale=e, out=dk_end)
            dk = addmm_(dk_end, dscores.transpose(-1, -2), q)
            _, dlog_i, _ = row_pass(dk, C, write=False, dot_with=k)
        del dscores, dnum, dU

        # q_t . dq_t without a pass over dq: num_t and n_t^T q_t are linear in q_t, so
        # q_t . dq_t = d/ds L(s q_t) at s = 1 = (dL/dDn_t) (|n_t^T q_t| [bound inactive] - Dn_t),
        # i.e. -eps dL/dDn_t, or -(exp(-m_t) + eps) dL/dDn_t where the lower bound is the denominator
        db = torch.where(den_sign != 0, ctx.eps, Dn).mul_(dDn).neg_().sub_(dlog_i)
        db[..., -1] += d_end
        # The stabilisers: m_t = b_t + X_t with X_t = max(m_n, max_{j<=t} c_j), c_j = log i_j - b_j.
        db += g_m
        dc = torch.zeros_like(db)
        dc.scatter_add_(-1, c_cum_arg, torch.where(inter_wins, 0, g_m))
        g_start = torch.where(inter_wins, g_m, 0).sum(-1)  # (G, N) dL/dm_n from the rows of chunk n
        # the chunk boundaries, backwards: m_{n+1} = b_C + max(m_n, max_j c_j)
        g = torch.zeros(G, dtype=q.dtype, device=q.device) if dm_fin is None else dm_fin.clone()
        if dS_fin is not None:
            g -= (dS_fin * S_fin).sum((-1, -2))
        if dn_fin is not None:
            g -= (dn_fin * n_fin).sum(-1)
        g_end = q.new_empty(N, G)  # dL/dm_{n+1}
        wins_t, g_start_t = carry_wins.t().to(q.dtype), g_start.t()
        for n in range(N - 1, -1, -1):
            g_end[n] = g
            g = torch.addcmul(g_start_t[n], wins_t[n], g)
        g_end = g_end.t()  # (G, N)
        db[..., -1] += g_end
        dc.scatter_add_(-1, c_arg[..., None], torch.where(carry_wins, 0, g_end)[..., None])
        dlog_i += dc
        db -= dc
        dlog_f = db.flip(-1).cumsum(-1).flip(-1)  # b_t = sum_{s<=t} log f_s
        dm0 = g + (dS0 * S0).sum((-1, -2)) + (dn0 * n0).sum(-1)
        return dq, dk, dv, dlog_i, dlog_f, dS0, dn0, dm0, None
