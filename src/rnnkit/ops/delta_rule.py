"""The (gated) delta rule: a matrix-state recurrence that overwrites what a key retrieves.

Per batch element and head, with state ``S`` of shape ``(K, V)`` (keys index rows)::

    S_t = g_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        y_t = S_t^T q_t

This is the transpose of the ``S_t = S_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T``, ``y_t = S_t q_t``
written in the papers (``(V, K)`` state); the ``(K, V)`` layout matches the gated linear-attention
kernels, whose state is also ``sum k v^T``. Without ``log_decay`` (``g_t = 1``) it is DeltaNet
(Schlag et al. 2021; Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length", Eq. 1); with a scalar gate per head and step it is Gated DeltaNet (Yang, Kautz &
Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule", Eq. 10). With unit-norm
keys, ``beta_t`` in ``(0, 2)`` gives the transition ``I - beta k k^T`` an eigenvalue ``1 - beta`` in
``(-1, 1)``; beyond 1 it is negative, which Grazzi et al. 2025 ("Unlocking State-Tracking in Linear
RNNs Through Negative Eigenvalues") show is what lets a linear RNN track parity.

Forms, one signature (``q, k, v, beta, log_decay=None, state=None, lengths=None``), laid out
head-first as the gated linear-attention op (:mod:`rnnkit.ops.gated_linear_attention`):

- :func:`delta_rule_recurrent`: the loop over time, the definition;
- :func:`delta_rule_chunk`: chunkwise. Inside a chunk of ``C`` steps the product of Householder-like
  transitions is put in WY/UT form (Yang et al. 2024, Sec. 3): with ``gamma_i`` the cumulative log
  gate inside the chunk and ``M_ij = exp(gamma_i - gamma_j)`` (``i >= j``),
  ``A = (I + tril(diag(beta) (K K^T * M), -1))^{-1} diag(beta)`` by one triangular solve, ``U = A V``,
  ``W = A diag(exp(gamma)) K``. The chunk writes ``Delta = U - W S_0`` and then
  ``Y = diag(exp(gamma)) Q S_0 + (tril(Q K^T) * M) Delta``,
  ``S_C = exp(gamma_C) S_0 + (K * exp(gamma_C - gamma))^T Delta``. Only the two small products
  with ``S_0`` run in a loop over chunks; everything else is batched over all chunks at once;
- :func:`delta_rule_parallel`: the same WY/UT form with one chunk spanning the whole sequence: the
  quadratic ``(T, T)`` masked form, with no loop at all. It costs ``O(T^2 (K + V))`` time and
  ``O(T^2)`` memory, so it only pays for short sequences.

Numerics: gates enter only as ``exp`` of differences of cumulative log gates taken *forwards* in time
(``gamma_i - gamma_j`` with ``i >= j``, ``gamma_C - gamma_i``, ``gamma_i``), which are all ``<= 0``;
nothing is ever divided by a cumulative product, so a chunk whose decay underflows to 0 in fp32 is
still exact (the entries become 0, never ``0/0``). The masked upper triangle is filled with ``-inf``
before ``exp`` so neither it nor its gradient can overflow.

Shapes: ``B`` batch, ``T`` time, ``H`` heads, ``K`` key/query dim, ``V`` value dim.
"""

from __future__ import annotations

import torch

from rnnkit.errors import InputError, check_lengths, check_positive_int, check_tensor, describe
from rnnkit.ops.gated_linear_attention import segment_sum

#: Default chunk length of :func:`delta_rule_chunk` (see ``benchmarks/delta_speed.py``).
CHUNK_SIZE = 32


# --------------------------------------------------------------------------- validation
def _check_inputs(q, k, v, beta, log_decay, state, lengths):
    """Validate the op's arguments; return ``lengths`` as a (B,) int64 tensor or None."""
    for name, t in (("q", q), ("k", k), ("v", v), ("beta", beta)):
        check_tensor(name, t)
    if q.dim() != 4 or k.shape != q.shape:
        raise InputError(f"q, k: expected equal 4-D shapes (B, H, T, K), got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, H, T, K = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, H, T):
        raise InputError(f"v: expected shape (B, H, T, V) = ({B}, {H}, {T}, V), got {tuple(v.shape)}")
    if beta.shape != (B, H, T):
        raise InputError(f"beta: expected shape (B, H, T) = ({B}, {H}, {T}), got {tuple(beta.shape)}")
    if log_decay is not None and (not isinstance(log_decay, torch.Tensor) or log_decay.shape != (B, H, T)):
        raise InputError(f"log_decay: expected None or shape (B, H, T) = ({B}, {H}, {T}), got {describe(log_decay)}")
    tensors = [q, k, v, beta] + ([log_decay] if log_decay is not None else [])
    if state is not None:
        want = (B, H, K, v.shape[-1])
        if not isinstance(state, torch.Tensor) or state.shape != want:
            raise InputError(f"state: expected None or shape (B, H, K, V) = {want}, got {describe(state)}")
        tensors.append(state)
    if not q.is_floating_point() or any(t.dtype != q.dtype for t in tensors):
        raise InputError(f"q, k, v, beta, ...: expected one floating dtype, got {[t.dtype for t in tensors]}")
    if T < 1:
        raise InputError(f"q: expected at least one time step (T >= 1), got shape {tuple(q.shape)}")
    return check_lengths(lengths, B, T, q.device)


def _freeze_padding(q, k, v, beta, log_decay, lengths):
    """Make the steps past each length exact identities: beta = 0, decay 1, and finite q, k, v."""
    if lengths is None:
        return q, k, v, beta, log_decay
    valid = (torch.arange(q.shape[2], device=q.device)[None, :] < lengths[:, None])[:, None]  # (B, 1, T)
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    beta = torch.where(valid, beta, zero)
    if log_decay is not None:
        log_decay = torch.where(valid, log_decay, zero)
    # beta = 0 alone would give 0 * NaN = NaN for non-finite padding, so the vectors are zeroed too.
    q, k, v = (torch.where(valid[..., None], t, zero) for t in (q, k, v))
    return q, k, v, beta, log_decay


# --------------------------------------------------------------------------- recurrent (definition)
def delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (gated) delta rule as a loop over time: the definition the other forms must match.

    Args:
        q: ``(B, H, T, K)`` queries (any scaling is the caller's).
        k: ``(B, H, T, K)`` keys (L2-normalised by the layers; any values are allowed here).
        v: ``(B, H, T, V)`` values.
        beta: ``(B, H, T)`` write strengths (``(0, 1)``, or ``(0, 2)`` for negative eigenvalues).
        log_decay: ``(B, H, T)`` log of the decay ``g_t`` (``<= 0``), or None for ``g_t = 1``.
        state: ``(B, H, K, V)`` initial state ``S_0``, or None for zeros.
        lengths: ``(B,)`` valid lengths in ``[1, T]``; steps past a length leave the state unchanged
            (``beta = 0``, ``g = 1``), so the final state is the one at the last valid step.

    Returns:
        ``y`` ``(B, H, T, V)`` with ``y_t = S_t^T q_t``, and the final state ``(B, H, K, V)``.

    Example:
        >>> q, k = torch.randn(2, 4, 10, 16), F.normalize(torch.randn(2, 4, 10, 16), dim=-1)
        >>> y, S = delta_rule_recurrent(q, k, torch.randn(2, 4, 10, 32), torch.rand(2, 4, 10))
        >>> y.shape, S.shape   # (2, 4, 10, 32), (2, 4, 16, 32)
    """
    lengths = _check_inputs(q, k, v, beta, log_decay, state, lengths)
    q, k, v, beta, log_decay = _freeze_padding(q, k, v, beta, log_decay, lengths)
    B, H, T, K = q.shape
    S = state if state is not None else q.new_zeros(B, H, K, v.shape[-1])
    ys = []
    for t in range(T):
        g_t = None if log_decay is None else log_decay[:, :, t]
        y_t, S = delta_rule_step(q[:, :, t], k[:, :, t], v[:, :, t], beta[:, :, t], g_t, S)
        ys.append(y_t)
    return torch.stack(ys, 2), S  # (B, H, T, V)


def delta_rule_step(q_t, k_t, v_t, beta_t, log_decay_t, S):
    """One step: ``q_t, k_t`` (B, H, K), ``v_t`` (B, H, V), ``beta_t, log_decay_t`` (B, H) or None,
    ``S`` (B, H, K, V) -> ``y_t`` (B, H, V) and the next ``S``."""
    if log_decay_t is not None:
        S = S * log_decay_t.exp()[..., None, None]
    retrieved = torch.einsum("bhk,bhkv->bhv", k_t, S)  # (B, H, V): what k_t currently reads
    S = S + k_t[..., :, None] * (beta_t[..., None] * (v_t - retrieved))[..., None, :]
    return torch.einsum("bhk,bhkv->bhv", q_t, S), S


# --------------------------------------------------------------------------- chunkwise (WY/UT)
def delta_rule_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise (gated) delta rule; same arguments and result as :func:`delta_rule_recurrent`.

    Args:
        chunk_size: ``C``, steps per chunk. ``T`` need not be a multiple: the last chunk is padded
            with identity steps.

    Cost per head: ``O(T C (K + V) + T K V)`` time, ``O(T (C + K + V) + (T / C) K V)`` memory.

    Example:
        >>> y, S = delta_rule_chunk(q, k, v, beta, log_decay, chunk_size=32)
    """
    check_positive_int("chunk_size", chunk_size)
    lengths = _check_inputs(q, k, v, beta, log_decay, state, lengths)
    q, k, v, beta, log_decay = _freeze_padding(q, k, v, beta, log_decay, lengths)
    return _wy_chunks(q, k, v, beta, log_decay, state, min(chunk_size, q.shape[2]))


def delta_rule_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadratic form: the WY/UT representation of the whole sequence as one ``(T, T)`` chunk.

    Same arguments and result as :func:`delta_rule_recurrent`; ``O(T^2)`` memory.
    """
    lengths = _check_inputs(q, k, v, beta, log_decay, state, lengths)
    q, k, v, beta, log_decay = _freeze_padding(q, k, v, beta, log_decay, lengths)
    return _wy_chunks(q, k, v, beta, log_decay, state, q.shape[2])


def _wy_chunks(q, k, v, beta, log_decay, state, C):
    """The chunkwise algorithm of the module docstring on validated, padding-frozen inputs."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    pad = (-T) % C
    N = (T + pad) // C

    def chunked(t: torch.Tensor) -> torch.Tensor:
        # (B, H, T, ...) -> (N, B, H, C, ...), chunk-major so that the loop over chunks reads
        # contiguous slices and autograd stacks their gradients once (indexing a (B, H, N, ...)
        # tensor per chunk costs a full-size zero gradient per chunk in the backward).
        # Padded steps are zeros: beta = 0 and log decay 0 make them identities.
        if pad:
            t = torch.nn.functional.pad(t, (0, 0) * (t.dim() - 3) + (0, pad))
        t = t.reshape(B, H, N, C, *t.shape[3:])  # (B, H, N, C, ...)
        return t.movedim(2, 0).contiguous()

    q, k, v, beta = chunked(q), chunked(k), chunked(v), chunked(beta)  # (N, B, H, C, K|V), (N, B, H, C)
    kb = k * beta[..., None]  # (N, B, H, C, K)
    kk = kb @ k.transpose(-1, -2)  # (N, B, H, C, C): beta_i k_i . k_j
    qk = q @ k.transpose(-1, -2)  # (N, B, H, C, C): q_i . k_j
    if log_decay is None:
        # The solve only reads the strictly lower triangle (unit diagonal assumed), so kk is used as is.
        qk = qk.tril()
        rhs = torch.cat([v * beta[..., None], kb], -1)  # (N, B, H, C, V + K)
        k_end = k
        qg = q
        gate_end = None
    else:
        log_decay = chunked(log_decay)  # (N, B, H, C)
        gamma = log_decay.cumsum(-1)  # (N, B, H, C): inclusive cumulative log decay
        decay = segment_sum(log_decay).exp()  # (N, B, H, C, C): exp(gamma_i - gamma_j) for i >= j, else 0
        kk = kk * decay
        qk = qk * decay
        g_in = gamma.exp()[..., None]  # (N, B, H, C, 1): decay from the chunk start to step i
        rhs = torch.cat([v * beta[..., None], kb * g_in], -1)
        qg = q * g_in
        k_end = k * decay[..., -1, :, None]  # decay from step i to the chunk end, exp(gamma_C - gamma_i)
        gate_end = gamma[..., -1].exp().reshape(N, B * H, 1, 1)
    uw = torch.linalg.solve_triangular(kk, rhs, upper=False, unitriangular=True)
    u, w = uw[..., :V], uw[..., V:]  # (N, B, H, C, V), (N, B, H, C, K)
    # y = qg S_0 + qk (u - w S_0) = (qg - qk w) S_0 + qk u: all but the S_0 product batched.
    y_local = qk @ u  # (N, B, H, C, V)
    q_state = qg - qk @ w  # (N, B, H, C, K)

    S = state.reshape(B * H, K, V) if state is not None else q.new_zeros(B * H, K, V)
    starts = []
    us = u.reshape(N, B * H, C, V).unbind(0)
    ws = w.reshape(N, B * H, C, K).unbind(0)
    k_ends = k_end.reshape(N, B * H, C, K).transpose(-1, -2).unbind(0)  # (B H, K, C) each
    for n in range(N):
        starts.append(S)
        delta = torch.baddbmm(us[n], ws[n], S, alpha=-1)  # (B H, C, V): what the chunk actually writes
        carried = S if gate_end is None else S * gate_end[n]
        S = torch.baddbmm(carried, k_ends[n], delta)  # (B H, K, V)
    y = y_local + q_state @ torch.stack(starts).view(N, B, H, K, V)  # (N, B, H, C, V)
    y = y.permute(1, 2, 0, 3, 4).reshape(B, H, N * C, V)[:, :, :T]  # (B, H, T, V)
    return y, S.view(B, H, K, V)
