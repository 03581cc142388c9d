"""The (gated) delta rule: a matrix-state recurrence that overwrites what a key retrieves.

Per batch element and head, with state ``S`` of shape ``(K, V)`` (keys index rows)::

    S_t = g_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        y_t = S_t^T q_t

This is the transpose of the ``S_t = S_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T``, ``y_t = S_t q_t``
written in the papers (``(V, K)`` state); the ``(K, V)`` layout matches the gated linear-attention
kernels, whose state is also ``sum k v^T``. Without ``log_gate`` (``g_t = 1``) it is DeltaNet
(Schlag et al. 2021; Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length", Eq. 1); with a scalar gate per head and step it is Gated DeltaNet (Yang, Kautz &
Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule", Eq. 10). With unit-norm
keys, ``beta_t`` in ``(0, 2)`` gives the transition ``I - beta k k^T`` an eigenvalue ``1 - beta`` in
``(-1, 1)``; beyond 1 it is negative, which Grazzi et al. 2025 ("Unlocking State-Tracking in Linear
RNNs Through Negative Eigenvalues") show is what lets a linear RNN track parity.

Forms, one signature (``q, k, v, beta, log_gate=None, initial_state=None, lengths=None``):

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

from rnnkit.errors import InputError, check_positive_int, check_tensor, describe

#: Default chunk length of :func:`delta_rule_chunk` (see ``benchmarks/delta_speed.py``).
CHUNK_SIZE = 32


# --------------------------------------------------------------------------- validation
def _check_inputs(q, k, v, beta, log_gate, initial_state, lengths):
    """Validate the op's arguments; return ``lengths`` as a (B,) int64 tensor or None."""
    for name, t in (("q", q), ("k", k), ("v", v), ("beta", beta)):
        check_tensor(name, t)
    if q.dim() != 4 or k.shape != q.shape:
        raise InputError(f"q, k: expected equal 4-D shapes (B, T, H, K), got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, H, _ = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise InputError(f"v: expected shape (B, T, H, V) = ({B}, {T}, {H}, V), got {tuple(v.shape)}")
    if beta.shape != (B, T, H):
        raise InputError(f"beta: expected shape (B, T, H) = ({B}, {T}, {H}), got {tuple(beta.shape)}")
    if log_gate is not None and (not isinstance(log_gate, torch.Tensor) or log_gate.shape != (B, T, H)):
        raise InputError(f"log_gate: expected None or shape (B, T, H) = ({B}, {T}, {H}), got {describe(log_gate)}")
    tensors = [q, k, v, beta] + ([log_gate] if log_gate is not None else [])
    if initial_state is not None:
        want = (B, H, q.shape[-1], v.shape[-1])
        if not isinstance(initial_state, torch.Tensor) or initial_state.shape != want:
            raise InputError(f"initial_state: expected None or shape (B, H, K, V) = {want}, got {describe(initial_state)}")
        tensors.append(initial_state)
    if not q.is_floating_point() or any(t.dtype != q.dtype for t in tensors):
        raise InputError(f"q, k, v, beta, ...: expected one floating dtype, got {[t.dtype for t in tensors]}")
    if T < 1:
        raise InputError(f"q: expected at least one time step (T >= 1), got shape {tuple(q.shape)}")
    if lengths is None:
        return None
    if isinstance(lengths, (list, tuple)):
        lengths = torch.tensor(lengths, dtype=torch.long, device=q.device)
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (B,) or lengths.is_floating_point():
        raise InputError(f"lengths: expected None or an integer tensor of shape (B,) = ({B},), got {describe(lengths)}")
    if B and (int(lengths.min()) < 1 or int(lengths.max()) > T):
        raise InputError(f"lengths: expected values in [1, T] = [1, {T}], got {lengths.tolist()}")
    return lengths.to(device=q.device, dtype=torch.long)


def _freeze_padding(q, k, v, beta, log_gate, lengths):
    """Make the steps past each length exact identities: beta = 0, gate = 1, and finite q, k, v."""
    if lengths is None:
        return q, k, v, beta, log_gate
    valid = torch.arange(q.shape[1], device=q.device)[None, :] < lengths[:, None]  # (B, T)
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    vh = valid[:, :, None]  # (B, T, 1)
    beta = torch.where(vh, beta, zero)
    if log_gate is not None:
        log_gate = torch.where(vh, log_gate, zero)
    # beta = 0 alone would give 0 * NaN = NaN for non-finite padding, so the vectors are zeroed too.
    q, k, v = (torch.where(vh[..., None], t, zero) for t in (q, k, v))
    return q, k, v, beta, log_gate


# --------------------------------------------------------------------------- recurrent (definition)
def delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_gate: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (gated) delta rule as a loop over time: the definition the other forms must match.

    Args:
        q: ``(B, T, H, K)`` queries.
        k: ``(B, T, H, K)`` keys (L2-normalised by the layers; any values are allowed here).
        v: ``(B, T, H, V)`` values.
        beta: ``(B, T, H)`` write strengths (``(0, 1)``, or ``(0, 2)`` for negative eigenvalues).
        log_gate: ``(B, T, H)`` log of the decay ``g_t`` (``<= 0``), or None for ``g_t = 1``.
        initial_state: ``(B, H, K, V)`` state ``S_0``, or None for zeros.
        lengths: ``(B,)`` valid lengths in ``[1, T]``; steps past a length leave the state unchanged
            (``beta = 0``, ``g = 1``), so the final state is the one at the last valid step.

    Returns:
        ``y`` ``(B, T, H, V)`` with ``y_t = S_t^T q_t``, and the final state ``(B, H, K, V)``.

    Example:
        >>> q, k = torch.randn(2, 10, 4, 16), F.normalize(torch.randn(2, 10, 4, 16), dim=-1)
        >>> y, S = delta_rule_recurrent(q, k, torch.randn(2, 10, 4, 32), torch.rand(2, 10, 4))
        >>> y.shape, S.shape   # (2, 10, 4, 32), (2, 4, 16, 32)
    """
    lengths = _check_inputs(q, k, v, beta, log_gate, initial_state, lengths)
    q, k, v, beta, log_gate = _freeze_padding(q, k, v, beta, log_gate, lengths)
    B, T, H, K = q.shape
    S = initial_state if initial_state is not None else q.new_zeros(B, H, K, v.shape[-1])
    ys = []
    for t in range(T):
        y_t, S = delta_rule_step(q[:, t], k[:, t], v[:, t], beta[:, t], None if log_gate is None else log_gate[:, t], S)
        ys.append(y_t)
    return torch.stack(ys, 1), S  # (B, T, H, V)


def delta_rule_step(q_t, k_t, v_t, beta_t, log_gate_t, S):
    """One step: ``q_t, k_t`` (B, H, K), ``v_t`` (B, H, V), ``beta_t, log_gate_t`` (B, H) or None,
    ``S`` (B, H, K, V) -> ``y_t`` (B, H, V) and the next ``S``."""
    if log_gate_t is not None:
        S = S * log_gate_t.exp()[..., None, None]
    retrieved = torch.einsum("bhk,bhkv->bhv", k_t, S)  # (B, H, V): what k_t currently reads
    S = S + k_t[..., :, None] * (beta_t[..., None] * (v_t - retrieved))[..., None, :]
    return torch.einsum("bhk,bhkv->bhv", q_t, S), S


# --------------------------------------------------------------------------- chunkwise (WY/UT)
def delta_rule_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_gate: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise (gated) delta rule; same arguments and result as :func:`delta_rule_recurrent`.

    Args:
        chunk_size: ``C``, steps per chunk. ``T`` need not be a multiple: the last chunk is padded
            with identity steps.

    Example:
        >>> y, S = delta_rule_chunk(q, k, v, beta, log_gate, chunk_size=32)
    """
    lengths = _check_inputs(q, k, v, beta, log_gate, initial_state, lengths)
    check_positive_int("chunk_size", chunk_size)
    q, k, v, beta, log_gate = _freeze_padding(q, k, v, beta, log_gate, lengths)
    return _wy_chunks(q, k, v, beta, log_gate, initial_state, min(chunk_size, q.shape[1]))


def delta_rule_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_gate: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadratic form: the WY/UT representation of the whole sequence as one ``(T, T)`` chunk.

    Same arguments and result as :func:`delta_rule_recurrent`; ``O(T^2)`` memory.
    """
    lengths = _check_inputs(q, k, v, beta, log_gate, initial_state, lengths)
    q, k, v, beta, log_gate = _freeze_padding(q, k, v, beta, log_gate, lengths)
    return _wy_chunks(q, k, v, beta, log_gate, initial_state, q.shape[1])


def _wy_chunks(q, k, v, beta, log_gate, initial_state, C):
    """The chunkwise algorithm of the module docstring on validated, padding-frozen inputs."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    pad = (-T) % C
    N = (T + pad) // C

    def chunked(t: torch.Tensor) -> torch.Tensor:
        # (B, T, H, ...) -> (N, B, H, C, ...), chunk-major so that the loop over chunks reads
        # contiguous slices and autograd stacks their gradients once (indexing a (B, H, N, ...)
        # tensor per chunk costs a full-size zero gradient per chunk in the backward).
        # Padded steps are zeros: beta = 0 and log gate 0 make them identities.
        if pad:
            t = torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        t = t.reshape(B, N, C, H, *t.shape[3:])  # (B, N, C, H, ...)
        return t.permute(1, 0, 3, 2, *range(4, t.dim())).contiguous()

    q, k, v, beta = chunked(q), chunked(k), chunked(v), chunked(beta)  # (N, B, H, C, K|V), (N, B, H, C)
    kb = k * beta[..., None]  # (N, B, H, C, K)
    kk = kb @ k.transpose(-1, -2)  # (N, B, H, C, C): beta_i k_i . k_j
    qk = q @ k.transpose(-1, -2)  # (N, B, H, C, C): q_i . k_j
    if log_gate is None:
        # The solve only reads the strictly lower triangle (unit diagonal assumed), so kk is used as is.
        qk = qk.tril()
        rhs = torch.cat([v * beta[..., None], kb], -1)  # (N, B, H, C, V + K)
        k_end = k
        qg = q
        gate_end = None
    else:
        log_gate = chunked(log_gate)  # (N, B, H, C)
        gamma = log_gate.cumsum(-1)  # (N, B, H, C): inclusive cumulative log gate
        seg = _segment_sums(log_gate)  # (N, B, H, C, C): gamma_i - gamma_j for i >= j, else -inf
        decay = seg.exp()  # (N, B, H, C, C)
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

    S = initial_state.reshape(B * H, K, V) if initial_state is not None else q.new_zeros(B * H, K, V)
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
    y = y.permute(1, 0, 3, 2, 4).reshape(B, N * C, H, V)[:, :T]  # (B, T, H, V)
    return y, S.view(B, H, K, V)


def _segment_sums(log_gate: torch.Tensor) -> torch.Tensor:
    """``(..., C)`` log gates -> ``(..., C, C)`` with entry ``[i, j] = sum_{j < l <= i} log_gate_l``
    (``gamma_i - gamma_j``) for ``i >= j`` and ``-inf`` above the diagonal.

    Summed term by term rather than as a difference of cumulative sums: once ``gamma`` has grown to
    a few hundred, ``gamma_i - gamma_j`` for nearby steps would lose about ``|gamma|`` ulps in fp32
    and turn decays near 1 into errors of 1e-5.
    """
    C = log_gate.shape[-1]
    ones = torch.ones(C, C, dtype=torch.bool, device=log_gate.device)
    terms = log_gate[..., :, None].expand(*log_gate.shape, C)  # [l, j] = log_gate_l
    terms = terms.masked_fill(~ones.tril(-1), 0.0)  # keep l > j
    return terms.cumsum(-2).masked_fill(~ones.tril(), -torch.inf)  # [i, j] = sum_{j < l <= i}
