"""Gated outer-product recurrences (gated linear attention) in three interchangeable forms.

    S_t = G_t ⊙ S_{t-1} + k_t v_t^T          S_t (K, V) per head
    y_t = S_t^T q_t                           y_t (V,)

with ``G_t = exp(g_t)`` either one scalar per head (``log_decay`` of shape ``(B, H, T)``: linear
attention, RetNet, Mamba-2) or one value per key dimension broadcast over ``V`` (``log_decay`` of
shape ``(B, H, T, K)``: GLA, Yang et al. 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training", eq. 3).

Forms (same signature, same result):

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
last step of the first half; the halves recurse down to single steps.

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
import torch.nn.functional as F

from rnnkit.errors import InputError, check_lengths, check_positive_int, check_tensor, describe

#: Chunk size measured fastest on a 2-core CPU (benchmarks/chunk_speed.py).
DEFAULT_CHUNK = 64


def _check_inputs(q, k, v, log_decay, state, lengths):
    """Validate shapes at the public boundary; returns (q, k, v, log_decay, state, mask)."""
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
    lengths = check_lengths(lengths, B, T, q.device)
    mask = None
    if lengths is not None:
        mask = torch.arange(T, device=q.device)[None, :] < lengths[:, None]  # (B, T)
        m4 = mask[:, None, :, None]  # (B, 1, T, 1)
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        q, k, v = (torch.where(m4, t, zero) for t in (q, k, v))
        log_decay = torch.where(m4 if log_decay.dim() == 4 else m4[..., 0], log_decay, zero)
    return q, k, v, log_decay, state, mask


def gated_linear_attention_recurrent(q, k, v, log_decay, state=None, lengths=None):
    """The step-by-step loop that defines the recurrence (see the module docstring).

    Args:
        q: ``(B, H, T, K)`` queries (any scaling is the caller's).
        k: ``(B, H, T, K)`` keys.
        v: ``(B, H, T, V)`` values.
        log_decay: ``(B, H, T)`` (scalar per head) or ``(B, H, T, K)`` (per key dimension), ``<= 0``
            for a contraction (not enforced: the loop is defined for any value).
        state: ``(B, H, K, V)`` initial state, zeros if None.
        lengths: optional ``(B,)`` ints in ``[1, T]``.

    Returns:
        ``y`` ``(B, H, T, V)`` and the final state ``(B, H, K, V)``.
    """
    q, k, v, g, S, _ = _check_inputs(q, k, v, log_decay, state, lengths)
    per_dim = g.dim() == 4
    ys = []
    # unbind once: indexing x[:, :, t] in the loop would make backward write a full-size zero
    # gradient per step (O(T^2) memory traffic).
    for q_t, k_t, v_t, g_t in zip(q.unbind(2), k.unbind(2), v.unbind(2), g.unbind(2)):
        decay = torch.exp(g_t)  # (B, H, K) or (B, H)
        decay = decay[..., None] if per_dim else decay[..., None, None]
        S = decay * S + k_t[..., :, None] * v_t[..., None, :]  # (B, H, K, V)
        ys.append((q_t[..., None, :] @ S)[..., 0, :])  # S^T q_t (B, H, V)
    return torch.stack(ys, 2), S


def gated_linear_attention_parallel(q, k, v, log_decay, state=None, lengths=None):
    """The quadratic masked form: the whole sequence as one block (same signature as the loop).

    Scalar decay: ``y = ((q k^T) ⊙ D) v + (q ⊙ exp(b)) S_0`` with ``D_ij = exp(b_i - b_j)`` for
    ``j <= i``, ``b`` the cumulative log decay; memory ``O(T^2)`` per head. Per-key-dimension decay
    uses the dyadic split of the module docstring over the whole (power-of-two padded) sequence.
    """
    q, k, v, g, S, _ = _check_inputs(q, k, v, log_decay, state, lengths)
    T = q.shape[2]
    block = 1 << (T - 1).bit_length() if g.dim() == 4 else T
    return _chunked(q, k, v, g, S, block)


def gated_linear_attention_chunk(q, k, v, log_decay, state=None, lengths=None, chunk_size=DEFAULT_CHUNK):
    """Chunkwise form (same signature as the loop, plus ``chunk_size``).

    Args:
        chunk_size: ``C``, steps per chunk; a power of two for per-key-dimension decay. ``T`` need
            not be a multiple of ``C`` (the last chunk is padded with steps that change nothing).

    Cost per head: ``O(T C (K + V) + T K V)`` time, ``O(T (K + V) + (T / C) K V)`` memory.
    """
    check_positive_int("chunk_size", chunk_size)
    q, k, v, g, S, _ = _check_inputs(q, k, v, log_decay, state, lengths)
    if g.dim() == 4 and chunk_size & (chunk_size - 1):
        raise InputError(f"chunk_size: expected a power of two for per-dimension decay, got {chunk_size}")
    return _chunked(q, k, v, g, S, min(chunk_size, _pow2_at_least(q.shape[2]) if g.dim() == 4 else q.shape[2]))


def _pow2_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _pad_time(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Right-pad dimension 2 (time) with zeros."""
    if not pad:
        return t
    widths = [0, 0] * (t.dim() - 3) + [0, pad]
    return F.pad(t, widths)


def _chunked(q, k, v, g, S, C):
    """Core of the parallel and chunk forms on validated inputs; ``g`` (B,H,T) or (B,H,T,K)."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    N = math.ceil(T / C)
    pad = N * C - T
    per_dim = g.dim() == 4
    G = B * H
    # Padding steps have g = 0 and k = 0: they carry the state through unchanged.
    q, k, v, g = (_pad_time(t, pad) for t in (q, k, v, g))
    q = q.reshape(G, N, C, K)
    k = k.reshape(G, N, C, K)
    v = v.reshape(G, N, C, V)
    g = g.reshape(G, N, C, K if per_dim else 1)
    b = g.cumsum(2)  # (G, N, C, Kg) cumulative log decay from the chunk start, inclusive
    b_last = b[:, :, -1:]  # (G, N, 1, Kg) total log decay of each chunk

    # Each chunk's own contribution to the state at its end: sum_j exp(b_C - b_j) k_j v_j^T, with
    # b_C - b_j summed directly (suffix sums) rather than subtracted, which would lose |b_j| ulp.
    k_end = k * torch.exp(suffix_sum(g))  # (G, N, C, K), factors <= 1
    U = k_end.transpose(-1, -2) @ v  # (G, N, K, V)
    chunk_decay = torch.exp(b_last).transpose(-1, -2)  # (G, N, Kg, 1)
    # The only sequential part: carry the state across chunk boundaries.
    S = S.reshape(G, K, V)
    starts = []
    # unbind, not U[:, n]: each indexed slice's backward would zero-fill a full-size gradient.
    for decay_n, U_n in zip(chunk_decay.unbind(1), U.unbind(1)):
        starts.append(S)
        S = decay_n * S + U_n
    S_start = torch.stack(starts, 1)  # (G, N, K, V) state entering each chunk

    y = (q * torch.exp(b)) @ S_start  # (G, N, C, V) the carried state read out, decayed to step i
    if per_dim:
        y = y + _intra_per_dim(q, k, v, g)
    else:
        y = y + _intra_scalar(q, k, v, g, b)
    y = y.reshape(B, H, N * C, V)[:, :, :T]
    return y, S.reshape(B, H, K, V)


def suffix_sum(g: torch.Tensor) -> torch.Tensor:
    """``out[..., j, :] = sum_{s > j} g[..., s, :]``: exclusive suffix sums along dimension -2."""
    incl = g.flip(-2).cumsum(-2).flip(-2)
    return torch.cat([incl[..., 1:, :], torch.zeros_like(incl[..., :1, :])], -2)


def segment_sum(g: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum_{j < s <= i} g[..., s]`` for ``j <= i``, ``-inf`` above the diagonal.

    ``g`` (..., C) -> (..., C, C). Summed segment by segment (as Mamba-2's ``segsum``) instead of
    as ``b_i - b_j`` of cumulative sums, whose rounding grows with ``|b|`` rather than with the
    segment: with strong decays ``|b|`` reaches hundreds inside one chunk.
    """
    C = g.shape[-1]
    rep = g[..., :, None].expand(*g.shape, C)  # (..., C, C) rep[i, j] = g_i
    strict = torch.ones(C, C, dtype=torch.bool, device=g.device).tril(-1)
    seg = rep.masked_fill(~strict, 0).cumsum(-2)  # sum over s in (j, i]
    return seg.masked_fill(~causal_mask(C, g.device), -math.inf)


def decay_matrix_log(g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``b_i - b_j`` for ``j <= i`` and ``-inf`` above the diagonal; ``g`` (..., C), ``b`` its cumsum.

    When every ``|b|`` is at most 16 the difference of cumulative sums is exact to ~1e-6 in the
    exponent and takes one pass; otherwise (strong decays) :func:`segment_sum` keeps the rounding
    to that of each segment. Both give the same matrix up to rounding.
    """
    if b.numel() and bool(b.detach().abs().max() <= 16):
        return (b[..., :, None] - b[..., None, :]).masked_fill(~causal_mask(b.shape[-1], b.device), -math.inf)
    return segment_sum(g)


def causal_mask(C: int, device: torch.device) -> torch.Tensor:
    """``(C, C)`` bool, True where ``j <= i``."""
    return torch.ones(C, C, dtype=torch.bool, device=device).tril()


def _intra_scalar(q, k, v, g, b):
    """Within-chunk part for scalar decay: ``((q k^T) ⊙ exp(b_i - b_j) [j <= i]) v``; g, b (G, N, C, 1)."""
    D = torch.exp(decay_matrix_log(g[..., 0], b[..., 0]))  # (G, N, C, C), zero above the diagonal
    return ((q @ k.transpose(-1, -2)) * D) @ v


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
