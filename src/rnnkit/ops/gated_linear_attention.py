"""Gated outer-product recurrences (gated linear attention) in three interchangeable forms.

    S_t = G_t ⊙ S_{t-1} + k_t v_t^T          S_t (K, V) per head
    y_t = S_t^T q_t                           y_t (V,)

with ``G_t = exp(g_t)`` either one scalar per head (``log_decay`` of shape ``(B, H, T)``: linear
attention, RetNet, Mamba-2) or one value per key dimension broadcast over ``V`` (``log_decay`` of
shape ``(B, H, T, K)``: GLA, Yang et al. 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training", eq. 3).

One entry, :func:`gated_linear_attention` with ``mode=``, runs three forms (same signature, same
result):

- :func:`gated_linear_attention_recurrent`: the loop over time, the definition;
- :func:`gated_linear_attention_parallel`: the quadratic masked form over the whole sequence;
- :func:`gated_linear_attention_chunk`: chunkwise (Yang et al. 2024, section 3.2): quadratic work
  inside chunks of ``C`` steps as large batched matmuls over all chunks at once, and a sequential
  carry of the ``(K, V)`` state between chunks.

Numerics. Decays live in log space. Inside a chunk, ``b_i = sum_{s<=i} g_s`` (from the chunk start);
every exponential the kernels take is of a difference ``b_i - b_j`` with ``j <= i`` (or of ``b_i``
itself), so it is ``<= 0``: nothing is ever divided by a cumulative decay, and a chunk whose total
decay underflows to zero gives zeros, not ``inf * 0``. For per-key-dimension decay the intra-chunk
scores ``sum_d q_id k_jd exp(b_id - b_jd)`` cannot be one matmul of rescaled ``q`` and ``k``
without such a division; the chunk is split recursively in halves (a dyadic version of GLA's
secondary chunking): the pairs (i in the second half, j in the first half) of each block are one
matmul of ``q_i exp(b_i - b_m)`` and ``k_j exp(b_m - b_j)``, both factors ``<= 1``, with ``m`` the
last step of the first half; the halves recurse down to single steps. When every ``|b|`` of a
call stays within ``SCORE_FACTOR_BOUND`` (mild decays, the usual case) the scores are one matmul of
``q exp(b)`` and ``k exp(-b)`` instead, exact and far from overflow.

Negative decays: ``decay_sign`` (the shape of ``log_decay``, entries +1 or -1) makes the decay
``G_t = sign_t exp(g_t)``, in ``(-1, 1)`` for ``g < 0`` (Grazzi et al. 2025, "Unlocking
State-Tracking in Linear RNNs Through Negative Eigenvalues"). The log-space forms cannot take a
negative decay directly, so the parallel and chunk forms fold the signs into the keys and queries:
with ``sigma_t = prod_{s<=t} sign_s`` (per key dimension), ``S~_t = sigma_t S_t`` follows the same
recurrence with decay ``exp(g_t)``, key ``sigma_t k_t`` and query ``sigma_t q_t`` (since
``sigma_t^2 = 1``), and the final state is ``sigma_T S~_T``. The signs carry no gradient.

Padding: with ``lengths`` (B,), steps ``t >= lengths[b]`` have ``g = 0`` and ``k = v = q = 0``, so
they leave the state unchanged and the returned state is the one at each sequence's last valid step.

Example:
    >>> q, k, v = (torch.randn(2, 4, 100, 16) for _ in range(3))
    >>> g = torch.nn.functional.logsigmoid(torch.randn(2, 4, 100))   # scalar decay per head
    >>> y, S = gated_linear_attention_chunk(q, k, v, g)                # y (2, 4, 100, 16), S (2, 4, 16, 16)
"""

from __future__ import annotations

import math

import torch

from rnnkit.errors import InputError, check_lengths, check_positive_int, check_tensor, describe
from rnnkit.ops._chunk_math import (
    addmm_,
    causal_float,
    chunk_backward,
    common_dtype,
    decay_matrix_log,
    mm,
    pad_time,
    suffix_sum,
)
from rnnkit.ops._forms import run_form
from rnnkit.ops._workspace import into, workspace, workspace_like
from rnnkit.ops.padding import valid_mask, zero_padding

#: Default chunk size: large enough for efficient batched matmuls, small enough that the (C, C)
#: scores stay in cache (benchmarks/chunk_speed.py compares chunk sizes).
DEFAULT_CHUNK = 64
#: Per-key-dimension decay: when every cumulative log decay of a chunk is within this bound, the
#: intra-chunk scores factor into exp(b_i) and exp(-b_j) (at most e^20 ~ 5e8 apart from 1);
#: otherwise the recursive halving below, which never exponentiates a positive sum.
SCORE_FACTOR_BOUND = 20.0


def _check_inputs(q, k, v, log_decay, state, lengths, decay_sign=None):
    """Validate shapes at the public boundary; returns (q, k, v, log_decay, state, mask, decay_sign)
    with the padding's signs set to +1 (a kept state)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("log_decay", log_decay)):
        check_tensor(name, t)
        if not t.dtype.is_floating_point:
            raise InputError(f"{name}: expected a floating dtype, got {t.dtype}")
    if q.dim() != 4:
        raise InputError(f"q: expected shape (B, H, T, K), got {tuple(q.shape)}")
    B, H, T, K = q.shape
    if k.shape != q.shape:
        raise InputError(f"k: expected shape (B, H, T, K) = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != (B, H, T):
        raise InputError(f"v: expected shape (B, H, T, V) = ({B}, {H}, {T}, V), got {tuple(v.shape)}")
    if log_decay.shape not in ((B, H, T), (B, H, T, K)):
        raise InputError(
            f"log_decay: expected shape (B, H, T) = {(B, H, T)} or (B, H, T, K) = {(B, H, T, K)}, "
            f"got {tuple(log_decay.shape)}"
        )
    if T < 1:
        raise InputError(f"q: expected at least one time step, got shape {tuple(q.shape)}")
    V = v.shape[-1]
    if state is None:
        state = q.new_zeros(B, H, K, V)
    else:
        check_tensor("state", state)
        if state.shape != (B, H, K, V):
            raise InputError(f"state: expected shape (B, H, K, V) = {(B, H, K, V)}, got {describe(state)}")
    if decay_sign is not None:
        check_tensor("decay_sign", decay_sign)
        if decay_sign.shape != log_decay.shape:
            raise InputError(f"decay_sign: expected the shape of log_decay {tuple(log_decay.shape)}, "
                             f"got {tuple(decay_sign.shape)}")
        decay_sign = decay_sign.detach()
    lengths = check_lengths(lengths, B, T, q.device)
    mask = None
    if lengths is not None:
        mask = valid_mask(lengths, T)  # (B, T)
        q, k, v, log_decay = zero_padding(mask, q, k, v, log_decay)
        if decay_sign is not None:
            keep = mask[:, None].view(B, 1, T, *([1] * (decay_sign.dim() - 3)))
            decay_sign = torch.where(keep, decay_sign, torch.ones((), dtype=decay_sign.dtype, device=q.device))
    return q, k, v, log_decay, state, mask, decay_sign


def _fold_signs(q, k, g, sign):
    """The parallel and chunk forms' view of signed decays (module docstring): ``sigma`` (the
    cumulative product of ``sign``) folded into q and k; returns q, k and the factor ``sigma_T``
    ``(B, H, K, 1)`` or ``(B, H, 1, 1)`` of the final state, None without signs."""
    if sign is None:
        return q, k, None
    sigma = torch.cumprod(sign.to(q.dtype), 2)  # (B, H, T) or (B, H, T, K), entries +-1
    per_step = sigma if g.dim() == 4 else sigma[..., None]  # (B, H, T, K or 1)
    return q * per_step, k * per_step, per_step[:, :, -1, :, None]


def gated_linear_attention_recurrent(q, k, v, log_decay, state=None, lengths=None, decay_sign=None):
    """The step-by-step loop that defines the recurrence (see the module docstring).

    Args:
        q: ``(B, H, T, K)`` queries (any scaling is the caller's).
        k: ``(B, H, T, K)`` keys.
        v: ``(B, H, T, V)`` values.
        log_decay: ``(B, H, T)`` (scalar per head) or ``(B, H, T, K)`` (per key dimension), ``<= 0``
            for a contraction (not enforced: the loop is defined for any value).
        state: ``(B, H, K, V)`` initial state, zeros if None.
        lengths: optional ``(B,)`` ints in ``[1, T]``.
        decay_sign: optional, the shape of ``log_decay``, +1 or -1: the decay is
            ``decay_sign * exp(log_decay)`` (no gradient flows to the signs).

    Returns:
        ``y`` ``(B, H, T, V)`` and the final state ``(B, H, K, V)``.
    """
    q, k, v, g, S, _, sign = _check_inputs(q, k, v, log_decay, state, lengths, decay_sign)
    per_dim = g.dim() == 4
    signs = sign.unbind(2) if sign is not None else [None] * g.shape[2]
    ys = []
    # unbind once: indexing x[:, :, t] in the loop would make backward write a full-size zero
    # gradient per step (O(T^2) memory traffic).
    for q_t, k_t, v_t, g_t, sign_t in zip(q.unbind(2), k.unbind(2), v.unbind(2), g.unbind(2), signs):
        y_t, S = gated_linear_attention_step(q_t, k_t, v_t, g_t, S, sign_t, per_dim)
        ys.append(y_t)
    return torch.stack(ys, 2), S


def gated_linear_attention_step(q_t, k_t, v_t, log_decay_t, S, sign_t=None, per_dim: bool = True):
    """One step of the recurrence, unchecked: ``q_t, k_t`` (B, H, K), ``v_t`` (B, H, V),
    ``log_decay_t`` (B, H, K) (``per_dim``) or (B, H), ``sign_t`` its shape or None, ``S``
    (B, H, K, V) -> ``y_t = S^T q_t`` (B, H, V) and the next ``S``."""
    decay = torch.exp(log_decay_t)
    decay = decay if sign_t is None else decay * sign_t
    decay = decay[..., None] if per_dim else decay[..., None, None]
    S = decay * S + k_t[..., :, None] * v_t[..., None, :]  # (B, H, K, V)
    return (q_t[..., None, :] @ S)[..., 0, :], S


def gated_linear_attention_parallel(q, k, v, log_decay, state=None, lengths=None, decay_sign=None):
    """The quadratic masked form: the whole sequence as one block (same signature as the loop).

    Scalar decay: ``y = ((q k^T) ⊙ D) v + (q ⊙ exp(b)) S_0`` with ``D_ij = exp(b_i - b_j)`` for
    ``j <= i``, ``b`` the cumulative log decay; memory ``O(T^2)`` per head. Per-key-dimension decay
    uses the dyadic split of the module docstring over the whole (power-of-two padded) sequence.
    """
    q, k, v, g, S, _, sign = _check_inputs(q, k, v, log_decay, state, lengths, decay_sign)
    T = q.shape[2]
    block = 1 << (T - 1).bit_length() if g.dim() == 4 else T
    return _chunked(q, k, v, g, S, block, sign)


def gated_linear_attention_chunk(q, k, v, log_decay, state=None, lengths=None, decay_sign=None,
                                 chunk_size=DEFAULT_CHUNK):
    """Chunkwise form (same signature as the loop, plus ``chunk_size``).

    Args:
        chunk_size: ``C``, steps per chunk; a power of two for per-key-dimension decay. ``T`` need
            not be a multiple of ``C`` (the last chunk is padded with steps that change nothing).

    Cost per head: ``O(T C (K + V) + T K V)`` time, ``O(T (K + V) + (T / C) K V)`` memory.
    """
    check_positive_int("chunk_size", chunk_size)
    q, k, v, g, S, _, sign = _check_inputs(q, k, v, log_decay, state, lengths, decay_sign)
    if g.dim() == 4 and chunk_size & (chunk_size - 1):
        raise InputError(f"chunk_size: expected a power of two for per-dimension decay, got {chunk_size}")
    return _chunked(q, k, v, g, S, min(chunk_size, _pow2_at_least(q.shape[2]) if g.dim() == 4 else q.shape[2]), sign)


#: Forms :func:`gated_linear_attention` runs, ``recurrent`` (the definition) first.
_FORMS = {
    "recurrent": gated_linear_attention_recurrent,
    "parallel": gated_linear_attention_parallel,
    "chunk": gated_linear_attention_chunk,
}
GLA_MODES = tuple(_FORMS)


def gated_linear_attention(q, k, v, log_decay, state=None, lengths=None, *, mode: str = "chunk",
                           chunk_size: int = DEFAULT_CHUNK, decay_sign=None):
    """Gated linear attention in the form ``mode`` (see the module docstring for the recurrence).

    Args:
        q: ``(B, H, T, K)`` queries; k: ``(B, H, T, K)`` keys; v: ``(B, H, T, V)`` values.
        log_decay: ``(B, H, T)`` (scalar per head) or ``(B, H, T, K)`` (per key dimension).
        state: ``(B, H, K, V)`` initial state, zeros if None.
        lengths: optional ``(B,)`` ints in ``[1, T]``.
        mode: ``"recurrent"`` (the loop, the definition), ``"parallel"`` (quadratic masked form) or
            ``"chunk"`` (chunkwise, the default).
        chunk_size: steps per chunk of the ``chunk`` form (a power of two for per-key decay).
        decay_sign: optional, the shape of ``log_decay``, +1 or -1: the decay is
            ``decay_sign * exp(log_decay)``, in ``(-1, 1)`` (negative eigenvalues; no gradient).

    Returns:
        ``y`` ``(B, H, T, V)`` and the final state ``(B, H, K, V)``.

    Raises:
        InputError: an unknown ``mode``, or bad shapes, dtypes or lengths.
    """
    return run_form(mode, _FORMS, (q, k, v, log_decay, state, lengths, decay_sign), chunk_size)


def _pow2_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _chunked(q, k, v, g, S, C, sign=None):
    """Core of the parallel and chunk forms on validated inputs; ``g`` (B,H,T) or (B,H,T,K); ``sign``
    None or +-1 of g's shape (folded into q and k, :func:`_fold_signs`)."""
    q, k, sigma_T = _fold_signs(q, k, g, sign)
    y, S = _chunked_unsigned(q, k, v, g, S, C)
    return y, S if sigma_T is None else S * sigma_T.to(S.dtype)


def _chunked_unsigned(q, k, v, g, S, C):
    B, H, T, K = q.shape
    V = v.shape[-1]
    N = math.ceil(T / C)
    pad = N * C - T
    per_dim = g.dim() == 4
    G = B * H
    # Padding steps have g = 0 and k = 0: they carry the state through unchanged.
    q, k, v, g = (pad_time(t, pad) for t in (q, k, v, g))
    q = q.reshape(G, N, C, K)
    k = k.reshape(G, N, C, K)
    v = v.reshape(G, N, C, V)
    g = g.reshape(G, N, C, K if per_dim else 1)
    S = S.reshape(G, K, V)
    q, k, v, g, S = common_dtype(q, k, v, g, S)
    b = mode = None
    if not g.requires_grad and not bool(g.any()):
        mode = "none"  # plain linear attention: the unit decay factors left out
    else:
        b = _chunk_cumsum(g.detach())  # (G, N, C, Kg) cumulative log decay from the chunk start, inclusive
        # Mild decays: differences of cumulative sums are exact to ~1e-6 and the scores may factor.
        lo, hi = torch.aminmax(b)
        mild = max(-float(lo), float(hi)) <= SCORE_FACTOR_BOUND
        fixed = not per_dim and not g.requires_grad and N > 1 and bool((g == g[:, :1, :1]).all())
        if per_dim and not mild:
            y, S = _chunked_per_dim_strong(q, k, v, g, S)
            return y.reshape(B, H, N * C, V)[:, :, :T], S.reshape(B, H, K, V)
        # A decay fixed per head (RetNet) has one (C, C) decay matrix for all chunks; strong scalar
        # decays need the matrix's segment sums; otherwise the scores factor into q e^b and k e^-b.
        mode = ("matrix_fixed" if fixed else "matrix") if fixed or not mild else "factor"
        mode += "" if mild else "_strong"
    with torch.autocast(q.device.type, enabled=False):  # bf16 matmuls would not fit the fp32 out= buffers
        y, S = _ChunkwiseGLA.apply(q, k, v, g if b is not None else None, b, S, mode)
    return y.reshape(B, H, N * C, V)[:, :, :T], S.reshape(B, H, K, V)


def _chunked_per_dim_strong(q, k, v, g, S):
    """Per-key-dimension decay too strong to factor (autograd through the recursive halving);
    q, k, g (G, N, C, K), v (G, N, C, V), S (G, K, V)."""
    b = g.cumsum(2)
    b_last = b[:, :, -1:]
    # b_C - b_j summed directly (suffix sums): as a difference it would lose |b_j| ulp.
    k_end = k * torch.exp(suffix_sum(g))
    U = k_end.transpose(-1, -2) @ v  # (G, N, K, V)
    S_start, S = _carry(S, torch.exp(b_last).transpose(-1, -2), U)
    y = (q * torch.exp(b)) @ S_start + _intra_per_dim(q, k, v, g)
    return y, S


def _carry(S, decay, U):
    """The only sequential part: ``S_{n+1} = decay_n S_n + U_n`` across chunk boundaries.

    S (G, K, V), decay (G, N, Kg, 1) or None (no decay), U (G, N, K, V); returns the state entering
    each chunk (G, N, K, V) and the final state."""
    starts = []
    # unbind, not U[:, n]: each indexed slice's backward would zero-fill a full-size gradient.
    decays = decay.unbind(1) if decay is not None else [None] * U.shape[1]
    for decay_n, U_n in zip(decays, U.unbind(1)):
        starts.append(S)
        S = U_n + S if decay_n is None else torch.addcmul(U_n, decay_n, S)
    return torch.stack(starts, 1), S


class _ChunkwiseGLA(torch.autograd.Function):
    """Chunkwise gated linear attention with a hand-written backward.

    q, k (G, N, C, K); v (G, N, C, V); g (G, N, C, Kg) log decays (Kg = 1 or K) or None (no decay),
    b its within-chunk cumulative sum (no gradient); S0 (G, K, V). ``mode``: ``"none"`` (no
    decay), ``"factor"`` (scores = (q e^b)(k e^-b)^T, every |b| within SCORE_FACTOR_BOUND),
    ``"matrix"`` / ``"matrix_fixed"`` (scalar decay: scores = (q k^T) ⊙ D, D from
    :func:`decay_matrix_log`, one D for all chunks when the decay is fixed per head), with suffix
    ``"_strong"`` when some |b| exceeds SCORE_FACTOR_BOUND.

    Forward, with ``b_C`` the chunk's total log decay:
    ``y = (q e^b) S_n + scores v``, ``U_n = (k e^{b_C - b})^T v``, ``S_{n+1} = e^{b_C} S_n + U_n``.
    Backward by hand: every large tensor is a reused workspace buffer written by an ``out=`` op, no
    (C, C) temporary beyond the scores and their gradient, and the incoming gradient is made
    contiguous once (a broadcast gradient, e.g. of ``y.sum()``, would send every batched matmul that
    reads it down PyTorch's one-matrix-at-a-time path). The decay's gradient uses that b enters only
    through ``e^{b_i - b_j}`` (as in Yang et al. 2024, GLA, section 4.2): within a chunk
    ``dL/db_i = q_i ⊙ dq_i - k_i ⊙ dk_i``, for ``b_C`` add ``sum_v dS_{n+1} ⊙ S_{n+1}``, and ``dg``
    is the reverse cumulative sum of ``dL/db`` over the chunk plus that.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, b, S0, mode):
        G, N, C, K = q.shape
        V = v.shape[-1]
        D = eb = None
        if mode == "none":
            qf, kf, q_dec, k_end, decay = q, k, q, k, None
        else:
            b_last = b[:, :, -1:]
            eb = torch.exp(b, out=workspace_like(b))
            q_dec = torch.mul(q, eb, out=workspace_like(q))  # factors <= 1 for a contraction
            if mode == "factor":
                # |b| <= SCORE_FACTOR_BOUND: e^b and e^-b are far from overflow and underflow
                qf, kf = q_dec, torch.div(k, eb, out=workspace_like(k))
                k_end = torch.mul(kf, torch.exp(b_last), out=workspace_like(k))
            else:
                qf, kf = q, k
                if mode.startswith("matrix_fixed"):  # every chunk has the same matrix: build it once
                    D = torch.exp(decay_matrix_log(g[:, :1, :, 0], b[:, :1, :, 0]))  # (G, 1, C, C)
                else:
                    D = torch.exp(decay_matrix_log(g[..., 0], b[..., 0]))  # (G, N, C, C), 0 above the diagonal
                k_end = torch.mul(k, _end_factor(g, b, mode), out=workspace_like(k))
            decay = torch.exp(b_last).transpose(-1, -2)  # (G, N, Kg, 1)
        U = mm(k_end.transpose(-1, -2), v)  # (G, N, K, V) each chunk's own share of its end state
        # The only sequential part: the state entering each chunk, written in place.
        S_start = workspace((G, N, K, V), q)
        S_start[:, 0] = S0
        for n in range(N - 1):
            if decay is None:
                into(torch.add, U[:, n], S_start[:, n], out=S_start[:, n + 1])
            else:
                into(torch.addcmul, U[:, n], decay[:, n], S_start[:, n], out=S_start[:, n + 1])
        S = U[:, -1] + S_start[:, -1] if decay is None else torch.addcmul(U[:, -1], decay[:, -1], S_start[:, -1])
        del U
        scores = mm(qf, kf.transpose(-1, -2))  # (G, N, C, C)
        if D is None:
            scores.mul_(causal_float(C, q))  # finite products: |b| <= SCORE_FACTOR_BOUND in "factor" mode
        else:
            scores.mul_(D)
        y = addmm_(mm(q_dec, S_start), scores, v)
        ctx.mode = mode
        ctx.save_for_backward(k, v, g, b, eb, qf, kf, q_dec, k_end, scores, D, S_start, S, decay)
        return y, S

    @staticmethod
    def _backward(ctx, dy, dS_final):
        k, v, g, b, eb, qf, kf, q_dec, k_end, scores, D, S_start, S_final, decay = ctx.saved_tensors
        mode = ctx.mode
        G, N, C, K = k.shape
        V = v.shape[-1]
        if dy.is_contiguous():
            dyc = dy
        else:
            dyc = workspace_like(dy)
            dyc.copy_(dy)
        # State gradients: from each chunk's readout, then carried backwards; dU_n = dL/dS_{n+1}.
        dS_start = mm(q_dec.transpose(-1, -2), dyc)  # (G, N, K, V)
        dU = workspace((G, N, K, V), k)
        if dS_final is None:
            dU[:, -1].zero_()
        else:
            dU[:, -1] = dS_final
        for n in range(N - 1, 0, -1):
            if decay is None:
                into(torch.add, dS_start[:, n], dU[:, n], out=dU[:, n - 1])
            else:
                into(torch.addcmul, dS_start[:, n], decay[:, n], dU[:, n], out=dU[:, n - 1])
        dS0 = dS_start[:, 0] + dU[:, 0] if decay is None else torch.addcmul(dS_start[:, 0], decay[:, 0], dU[:, 0])
        del dS_start
        dscores = mm(dyc, v.transpose(-1, -2))  # (G, N, C, C)
        if D is None:
            dscores.mul_(causal_float(C, k))
        else:
            dscores.mul_(D)
        dv = addmm_(mm(scores.transpose(-1, -2), dyc), k_end, dU)
        dq_dec = mm(dyc, S_start.transpose(-1, -2))  # (G, N, C, K)
        dkf = mm(dscores.transpose(-1, -2), qf)
        dk_end = mm(v, dU.transpose(-1, -2))
        if mode == "none":
            return addmm_(dq_dec, dscores, kf), dkf.add_(dk_end), dv, None, None, dS0, None
        need_g = ctx.needs_input_grad[3]
        if mode == "factor":
            dq = addmm_(dq_dec, dscores, kf)  # gradient w.r.t. q e^b
            dqf = None
        else:
            dqf = mm(dscores, kf)
        del dscores
        # q and k enter as (q e^b, k e^-b) in "factor" mode and as themselves in "matrix" mode: take
        # the gradients w.r.t. those first; dL/db = q . dq - k . dk is the same in both terms.
        if mode == "factor":
            dqs = dq  # w.r.t. q e^b
            dks = dkf.addcmul_(dk_end, decay.transpose(-1, -2))  # w.r.t. k e^-b: dkf + dk_end e^{b_C}
        else:
            dqs = dq = dqf.addcmul_(dq_dec, eb)
            dks = dk = dkf.addcmul_(dk_end, _end_factor(g, b, mode))
        del dk_end, dq_dec
        dg = None
        if need_g:
            db = torch.mul(qf, dqs, out=workspace_like(k)).addcmul_(kf, dks, value=-1)  # (G, N, C, K)
            if g.shape[-1] == 1:
                db = db.sum(-1, keepdim=True)
            # the end-of-chunk states S_{n+1}: S_start shifted by one, then the final state
            prod = workspace_like(dU)
            into(torch.mul, dU[:, :-1], S_start[:, 1:], out=prod[:, :-1])
            into(torch.mul, dU[:, -1], S_final, out=prod[:, -1])
            db_last = prod.sum(-1)
            del prod
            db_last = db_last.sum(-1, keepdim=True) if g.shape[-1] == 1 else db_last  # (G, N, Kg)
            # dg_s = sum_{i >= s} db_i + db_last: a reverse cumulative sum, as a matmul with ones on
            # and above the diagonal (faster than cumsum along a middle dimension)
            upper = causal_float(C, db).transpose(0, 1)
            dg = mm(upper.expand(G * N, C, C), db.view(G * N, C, -1)).view(db.shape).add_(db_last[:, :, None])
            del db
        if mode == "factor":
            dq = dqs.mul_(eb)
            dk = dks.div_(eb)
        return dq, dk, dv, dg, None, dS0, None

    backward = chunk_backward(_backward)


def _chunk_cumsum(g: torch.Tensor) -> torch.Tensor:
    """Cumulative sums over dimension 2 of ``g`` (G, N, C, Kg), into a workspace buffer; for wide
    ``Kg`` as a batched matmul with a lower-triangular ones matrix (a CPU's cumsum along a middle
    dimension is strided and slow; ``benchmarks/chunk_speed.py``)."""
    G, N, C, Kg = g.shape
    out = workspace_like(g)
    if Kg < 16:
        return torch.cumsum(g, 2, out=out)
    torch.bmm(causal_float(C, g).expand(G * N, C, C), g.reshape(G * N, C, Kg), out=out.view(G * N, C, Kg))
    return out


def _end_factor(g, b, mode):
    """``exp(b_C - b_j)`` (G, N, C, Kg); with strong decays from suffix sums, since the difference
    of cumulative sums would lose ``|b_j|`` ulp."""
    return torch.exp(suffix_sum(g) if mode.endswith("_strong") else b[:, :, -1:] - b)


def _intra_per_dim(q, k, v, g):
    """Within-chunk part for per-key-dimension decay by recursive halving; g (G, N, C, K), C = 2^p.

    Bottom-up over block sizes s = 2, 4, ..., C: the rows of each block's second half receive the
    scores against its first half, one batched matmul per level.
    """
    G, N, C, K = q.shape
    V = v.shape[-1]
    y = (q * k).sum(-1, keepdim=True) * v  # i == j: decay factor exp(0) = 1
    s = 2
    while s <= C:
        h = s // 2
        q1, q2 = q.reshape(G, N, C // s, 2, h, K).unbind(3)  # (G, N, C/s, h, K) each
        k1, _ = k.reshape(G, N, C // s, 2, h, K).unbind(3)
        g1, g2 = g.reshape(G, N, C // s, 2, h, K).unbind(3)
        v1, _ = v.reshape(G, N, C // s, 2, h, V).unbind(3)
        # Decay from the midpoint m (last step of the first half) to i in the second half, and from
        # j in the first half to m, each summed within its half: the rounding is that of a half
        # block's total decay, not of the chunk's cumulative sum.
        c1 = g1.cumsum(-2)
        q2 = q2 * torch.exp(g2.cumsum(-2))  # factors <= 1
        k1 = k1 * torch.exp(c1[..., -1:, :] - c1)  # factors <= 1
        if h <= 2:
            # Tiny blocks: elementwise beats a batch of 1x1 / 2x2 matmuls.
            scores = (q2[..., :, None, :] * k1[..., None, :, :]).sum(-1)  # (G, N, C/s, h, h)
            part = (scores[..., None] * v1[..., None, :, :]).sum(-2)  # (G, N, C/s, h, V)
        else:
            part = (q2 @ k1.transpose(-1, -2)) @ v1  # (G, N, C/s, h, V)
        y1, y2 = y.reshape(G, N, C // s, 2, h, V).unbind(3)
        y = torch.stack([y1, y2 + part], 3).reshape(G, N, C, V)
        s *= 2
    return y
