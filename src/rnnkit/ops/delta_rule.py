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

One entry, :func:`delta_rule` with ``mode=``, runs three forms with one signature (``q, k, v,
beta, log_decay=None, state=None, lengths=None``), laid out head-first as the gated
linear-attention op (:mod:`rnnkit.ops.gated_linear_attention`):

- :func:`delta_rule_recurrent`: the loop over time, the definition;
- :func:`delta_rule_chunk`: chunkwise. Inside a chunk of ``C`` steps the product of Householder-like
  transitions is put in WY/UT form (Yang et al. 2024, Sec. 3): with ``gamma_i`` the cumulative log
  gate inside the chunk and ``M_ij = exp(gamma_i - gamma_j)`` (``i >= j``),
  ``A = (I + tril(diag(beta) (K K^T * M), -1))^{-1} diag(beta)``, ``U = A V``,
  ``W = A diag(exp(gamma)) K``. The chunk writes ``Delta = U - W S_0`` and then
  ``Y = diag(exp(gamma)) Q S_0 + (tril(Q K^T) * M) Delta``,
  ``S_C = exp(gamma_C) S_0 + (K * exp(gamma_C - gamma))^T Delta``. The unit-lower-triangular
  inverse is formed explicitly, by one batched triangular solve against the identity; only the two
  small products with ``S_0`` run in a loop over chunks; everything else is batched over all
  chunks at once, and the backward is written by hand (:class:`_ChunkwiseDelta`);
- :func:`delta_rule_parallel`: the same WY/UT form with one chunk spanning the whole sequence: the
  quadratic ``(T, T)`` masked form, with no loop over chunks. It costs ``O(T^2 (K + V))`` time and
  ``O(T^2)`` memory, so it only pays for short sequences.

Numerics: gates enter only as ``exp`` of differences of cumulative log gates taken *forwards* in time
(``gamma_i - gamma_j`` with ``i >= j``, ``gamma_C - gamma_i``, ``gamma_i``), which are all ``<= 0``;
nothing is ever divided by a cumulative product, so a chunk whose decay underflows to 0 in fp32 is
still exact (the entries become 0, never ``0/0``). The masked upper triangle is filled with ``-inf``
before ``exp`` so neither it nor its gradient can overflow.

A second entry, :func:`dplr_delta_rule`, generalises the transition to diagonal plus low rank,
``S_t = (diag(exp(g_t)) + a_t b_t^T) S_{t-1} + k_t v_t^T`` with a decay per key dimension and
separate write and read vectors ``a``, ``b`` (RWKV-7), in the same three forms; its chunkwise form
(:func:`dplr_delta_rule_chunk`) solves the same kind of unit-lower-triangular system per chunk, with
per-dimension decayed scores, and has a hand-written backward too (:class:`_ChunkwiseDPLR`).

Shapes: ``B`` batch, ``T`` time, ``H`` heads, ``K`` key/query dim, ``V`` value dim.
"""

from __future__ import annotations

import math

import torch

from rnnkit.errors import InputError, check_lengths, check_positive_int, check_tensor, describe
from rnnkit.ops._blas import ChunkProducts
from rnnkit.ops._chunk_math import (
    addmm_,
    causal_float,
    chunk_backward,
    decay_matrix_log,
    mm,
    mm_into,
    pad_time,
    rowdot,
)
from rnnkit.ops._forms import run_form
from rnnkit.ops._rows import row_pass
from rnnkit.ops._workspace import into, workspace, workspace_like
from rnnkit.ops.gated_linear_attention import SCORE_FACTOR_BOUND
from rnnkit.ops.padding import valid_mask, zero_padding

#: Default chunk length of :func:`delta_rule_chunk` (see ``benchmarks/delta_speed.py``).
CHUNK_SIZE = 32

#: Chunks longer than this (the parallel form's one chunk, or a larger ``chunk_size``) form ``U`` and
#: ``W`` by triangular solves rather than products with the explicit inverse (see ``_ChunkwiseDelta``).
DIRECT_SOLVE_ABOVE = 32


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
    return _check_state_dtype_lengths(q, v, tensors, state, lengths, "q, k, v, beta, ...")


def _check_state_dtype_lengths(q, v, tensors, state, lengths, names):
    """What both entries check after their own shapes: the state ``(B, H, K, V)`` or None, one
    floating dtype over ``tensors`` and the state, ``T >= 1``; returns ``lengths`` checked."""
    B, H, T, K = q.shape
    if state is not None:
        want = (B, H, K, v.shape[-1])
        if not isinstance(state, torch.Tensor) or state.shape != want:
            raise InputError(f"state: expected None or shape (B, H, K, V) = {want}, got {describe(state)}")
        tensors = [*tensors, state]
    if not q.is_floating_point() or any(t.dtype != q.dtype for t in tensors):
        raise InputError(f"{names}: expected one floating dtype, got {[t.dtype for t in tensors]}")
    if T < 1:
        raise InputError(f"q: expected at least one time step (T >= 1), got shape {tuple(q.shape)}")
    return check_lengths(lengths, B, T, q.device)


def _freeze_padding(q, k, v, beta, log_decay, lengths):
    """Make the steps past each length exact identities: beta = 0, decay 1, and finite q, k, v."""
    if lengths is None:
        return q, k, v, beta, log_decay
    valid = valid_mask(lengths, q.shape[2])  # (B, T)
    # beta = 0 alone would give 0 * NaN = NaN for non-finite padding, so the vectors are zeroed too.
    q, k, v, beta = zero_padding(valid, q, k, v, beta)
    if log_decay is not None:
        (log_decay,) = zero_padding(valid, log_decay)
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


#: Forms :func:`delta_rule` runs, ``recurrent`` (the definition) first.
_FORMS = {"recurrent": delta_rule_recurrent, "parallel": delta_rule_parallel, "chunk": delta_rule_chunk}
DELTA_RULE_MODES = tuple(_FORMS)


def delta_rule(q, k, v, beta, log_decay=None, state=None, lengths=None, *, mode: str = "chunk",
               chunk_size: int = CHUNK_SIZE):
    """The (gated) delta rule in the form ``mode`` (see the module docstring for the recurrence).

    Args:
        q, k: ``(B, H, T, K)``; v: ``(B, H, T, V)``; beta: ``(B, H, T)``; log_decay: ``(B, H, T)`` or
            None; state: ``(B, H, K, V)`` or None; lengths: ``(B,)`` or None (as
            :func:`delta_rule_recurrent`).
        mode: ``"recurrent"`` (the loop, the definition), ``"parallel"`` (one ``(T, T)`` WY/UT block)
            or ``"chunk"`` (chunkwise WY/UT, the default).
        chunk_size: steps per chunk of the ``chunk`` form.

    Returns:
        ``y`` ``(B, H, T, V)`` and the final state ``(B, H, K, V)``.

    Raises:
        InputError: an unknown ``mode``, or bad shapes, dtypes or lengths.
    """
    return run_form(mode, _FORMS, (q, k, v, beta, log_decay, state, lengths), chunk_size)


def _wy_chunks(q, k, v, beta, log_decay, state, C):
    """The chunkwise algorithm of the module docstring on validated, padding-frozen inputs."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    N = -(-T // C)
    pad = N * C - T
    G = B * H
    # Padded steps are zeros: beta = 0 and log decay 0 make them identities.
    q, k, v, beta = (pad_time(t, pad) for t in (q, k, v, beta))
    q, k = q.reshape(G, N, C, K), k.reshape(G, N, C, K)  # (G, N, C, K)
    v = v.reshape(G, N, C, V)  # (G, N, C, V)
    beta = beta.reshape(G, N, C)  # (G, N, C)
    if log_decay is not None:
        log_decay = pad_time(log_decay, pad).reshape(G, N, C)  # (G, N, C)
    S0 = state.reshape(G, K, V) if state is not None else q.new_zeros(G, K, V)
    with torch.autocast(q.device.type, enabled=False):  # bf16 matmuls would not fit the out= buffers
        y, S = _ChunkwiseDelta.apply(q, k, v, beta, log_decay, S0)
    return y.reshape(B, H, N * C, V)[:, :, :T], S.view(B, H, K, V)  # (B, H, T, V), (B, H, K, V)


class _ChunkwiseDelta(torch.autograd.Function):
    """Chunkwise (gated) delta rule with a hand-written backward.

    q, k (G, N, C, K); v (G, N, C, V); beta (G, N, C); g (G, N, C) log decays or None; S0 (G, K, V).
    Per chunk, with ``gamma`` the inclusive cumulative log decay, ``M_ij = exp(gamma_i - gamma_j)``
    (``i >= j``), ``e = exp(gamma)``, ``f = exp(gamma_C - gamma)`` (all 1 without decay)::

        A = tril(diag(beta) (k k^T ⊙ M), -1)     T = (I + A)^{-1}       [U | W] = T [beta v | beta e k]
        P = tril(q k^T) ⊙ M                      Delta_n = U - W S_n
        y = (e q) S_n + P Delta_n                S_{n+1} = e_C S_n + (f k)^T Delta_n

    ``T`` is formed explicitly, in the working precision (:func:`_unit_lower_inverse`): with ``T``
    at hand, ``U``, ``W`` and the backward's ``T^T dDelta`` are batched matmuls, and the solve's
    backward is two more. ``beta`` (and ``e``) scale the columns of ``T`` rather than ``v`` and
    ``k``. Chunks longer than ``DIRECT_SOLVE_ABOVE`` (the parallel form) solve for ``U`` and ``W``
    instead, for accuracy. Only the state products run in a loop over chunks (forwards for
    ``S_n``, backwards for ``dS_n`` and ``Delta_n dS_{n+1}^T``). As in
    :class:`~rnnkit.ops.gated_linear_attention._ChunkwiseGLA`, every large tensor is a reused
    workspace buffer written by an ``out=`` op and the incoming gradient is made contiguous once.

    Backward, per chunk: ``dDelta_n = P^T dy + (f k) dS_{n+1}``, ``dS_n = e_C dS_{n+1} + (e q)^T dy
    - W^T dDelta_n``; ``dU = dDelta``, ``dW = -dDelta S_n^T``; for ``X = T R`` with ``L = I + A``
    unit lower triangular, ``dR = T^T dX`` and ``dA = -tril(dR X^T, -1)``, which with ``Delta_n =
    U - W S_n`` reduce to ``dR = [dR_v | -dR_v S_n^T]`` and ``dA = -tril(dR_v Delta_n^T, -1)``
    (``dR_v = T^T dDelta``). The decay enters only through ``exp`` of differences of ``gamma`` (and
    ``gamma`` itself), so ``dL/dgamma_i`` collects ``x dx`` for every such factor ``x`` (row sums
    minus column sums for ``M``), and the log decay's gradient is the reverse cumulative sum of
    that over the chunk.
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, g, S0):
        G, N, C, K = q.shape
        V = v.shape[-1]
        gated = g is not None
        bc = beta[..., None]  # (G, N, C, 1)
        A = mm(k, k.transpose(-1, -2))  # (G, N, C, C) k_i . k_j, times beta_i below
        P = mm(q, k.transpose(-1, -2))  # (G, N, C, C) q_i . k_j
        M = e = f = e_end = None
        if gated:
            gamma = g.cumsum(-1)  # (G, N, C) inclusive cumulative log decay
            M = decay_matrix_log(g, gamma).exp_()  # (G, N, C, C): exp(gamma_i - gamma_j), 0 above the diagonal
            A.mul_(M).mul_(bc).tril_(-1)  # (the backward's x dx products need A's upper triangle zero)
            P.mul_(M)
            e = gamma.exp()[..., None]  # (G, N, C, 1) decay from the chunk start to step i
            f = M[..., -1, :, None]  # (G, N, C, 1) decay from step i to the chunk end, exp(gamma_C - gamma_i)
            e_end = e[..., -1:, :]  # (G, N, 1, 1)
            q_in = torch.mul(q, e, out=workspace_like(q))
            k_out = torch.mul(k, f, out=workspace_like(k))
        else:
            A.mul_(bc)
            P.mul_(causal_float(C, q))
            q_in, k_out = q, k
        # (G, N, C, C), in the working precision: forming it in fp64 costs time and barely moves
        # the kernel's error against an fp64 run (benchmarks/delta_speed.py). Long chunks need it
        # only for the backward.
        direct = C > DIRECT_SOLVE_ABOVE
        Tinv = _unit_lower_inverse(A) if not direct or any(ctx.needs_input_grad) else None
        if not direct:
            # [U | W] = T [beta v | beta e k], with beta (and e) scaling T's columns instead of v and
            # k: a pass over (C, C) matrices instead of two over (C, 64) ones, and no right-hand side.
            T_scaled = torch.mul(Tinv, beta[..., None, :], out=workspace_like(Tinv))
            U = mm(T_scaled, v)  # (G, N, C, V)
            if gated:
                T_scaled.mul_(e.transpose(-1, -2))
            W = mm(T_scaled, k)  # (G, N, C, K)
            del T_scaled
        else:
            # Long chunks (the parallel form): the inverse's entries grow with C, and a product with
            # it loses accuracy that solving against the right-hand side keeps (in fp32 with beta
            # near 2 the difference shows against the loop; tests/ops/test_delta_rule.py). The
            # right-hand sides are column-major so that LAPACK substitutes down each column, as the
            # loop does, rather than along rows as a row-major solve of X^T (I + A)^T = R^T would.
            U = _solve_unit_lower_(A, torch.mul(v, bc, out=_column_major(v)))  # (G, N, C, V)
            rhs = torch.mul(k, bc, out=_column_major(k))
            W = _solve_unit_lower_(A, rhs.mul_(e) if gated else rhs)  # (G, N, C, K)
        # The only sequential part: the state entering each chunk and what each chunk writes.
        S_start = workspace((G, N, K, V), q)
        Delta = U  # Delta_n = U_n - W_n S_n, overwritten chunk by chunk
        S = S0.clone()  # the running state, updated in place (its address is fixed for the plan)
        subtract_ws = ChunkProducts(W, S, Delta, alpha=-1.0, beta=1.0)  # Delta_n -= W_n S_n (G, C, V)
        write_state = ChunkProducts(k_out.transpose(-1, -2), Delta, S, beta=1.0)  # S += k_out_n^T Delta_n
        for n in range(N):
            S_start[:, n] = S
            subtract_ws(n)
            if gated:
                S.mul_(e_end[:, n])
            write_state(n)
        y = addmm_(mm(q_in, S_start), P, Delta)  # (G, N, C, V)
        del U
        ctx.save_for_backward(q, k, v, beta, P, Tinv, W, q_in, k_out, S_start, Delta, A if gated else None,
                              M, e, f, e_end)
        return y, S

    @staticmethod
    def _backward(ctx, dy, dS_final):
        q, k, v, beta, P, Tinv, W, q_in, k_out, S_start, Delta, A, M, e, f, e_end = ctx.saved_tensors
        G, N, C, K = q.shape
        V = v.shape[-1]
        gated = M is not None
        if dy.is_contiguous():
            dyc = dy
        else:
            dyc = workspace_like(dy)
            dyc.copy_(dy)
        # State gradients, carried backwards. Every product that involves dS_{n+1} or dDelta_n is
        # formed in the loop, where they are in cache: dDelta_n = P^T dy + (f k) dS_{n+1},
        # dR_v = T^T dDelta_n, k's share of the end state Delta_n dS_{n+1}^T, and dS_n; only dR_v
        # and Delta_n dS_{n+1}^T are written out. As one batched product after the loop
        # Delta_n dS_{n+1}^T would read its right operand transposed from memory and need every
        # dS_{n+1} copied out; here it reads them from cache, and the loop needs no dDelta and
        # (e q)^T dy tensors, which lowers a step's peak memory (benchmarks/delta_speed.py).
        dRv = workspace((G, N, C, V), q)  # T^T dDelta_n
        dk_end = workspace((G, N, C, K), q)  # Delta_n dS_{n+1}^T
        end_dot = q.new_empty(G, N) if gated else None  # <dS_{n+1}, S_n>, for the carried decay e_C
        dS = dS_final.clone() if dS_final is not None else q.new_zeros(G, K, V)  # updated in place
        delta = workspace((G, C, V), q)
        # every product of the loop as a plan of per-chunk addresses (ops/_blas.py): no views, no
        # dispatch, results straight into their chunk's slice
        k_share = ChunkProducts(Delta, dS.transpose(-1, -2), dk_end)  # Delta_n dS^T
        read_dy = ChunkProducts(P.transpose(-1, -2), dyc, delta)  # dDelta_n = P^T dy ...
        carry_in = ChunkProducts(k_out, dS, delta, beta=1.0)  # ... + (f k) dS
        solve_share = ChunkProducts(Tinv.transpose(-1, -2), delta, dRv)  # T^T dDelta_n
        state_q = ChunkProducts(q_in.transpose(-1, -2), dyc, dS, beta=1.0)  # dS += (e q)^T dy ...
        state_w = ChunkProducts(W.transpose(-1, -2), delta, dS, alpha=-1.0, beta=1.0)  # ... - W^T dDelta_n
        for n in range(N - 1, -1, -1):
            k_share(n)
            if gated:
                end_dot[:, n] = rowdot(dS.flatten(1), S_start[:, n].flatten(1))
            read_dy(n)
            carry_in(n)
            solve_share(n)
            if gated:
                dS.mul_(e_end[:, n])
            state_q(n)
            state_w(n)
        del delta, k_share, read_dy, carry_in, solve_share, state_q, state_w
        dS0 = dS
        dq_in = mm(dyc, S_start.transpose(-1, -2))  # (G, N, C, K)
        dP = mm(dyc, Delta.transpose(-1, -2))  # (G, N, C, C)
        xP = torch.mul(dP, P, out=workspace_like(P)) if gated else None  # x dx for the decay factors of P
        dP.mul_(M if gated else causal_float(C, q))  # now w.r.t. q k^T
        # Through X = T R with dU = dDelta and dW = -dDelta S_n^T: dR = T^T dX, so dR_v = T^T dDelta
        # and dR_k = -dR_v S_n^T; dA = -(dR_v U^T + dR_k W^T) = -dR_v (U - W S_n)^T = -dR_v Delta_n^T
        # below the diagonal. Two products where the four of dW, T^T dW and dR X^T took twice the
        # FLOPs; the minus signs are carried in the names ending in _neg.
        dRk_neg = mm(dRv, S_start.transpose(-1, -2))  # (G, N, C, K)
        dA_neg = mm(dRv, Delta.transpose(-1, -2))  # (G, N, C, C)
        if gated:
            xA = torch.mul(dA_neg, A, out=workspace_like(A))
            dA_neg.mul_(M)
        dA_neg.mul_(causal_float(C, q).tril_(-1))  # now -dL/d(kb k^T), strictly lower
        if gated:
            # (G, N, C): e enters as e q; the dot products are taken in the passes that scale
            _, dgamma_in, _ = row_pass(dq_in, C, scale=e[..., 0], out=dq_in, dot_with=q, dot_before_scale=True)
            dgamma_in.mul_(e[..., 0])
            _, xf, _ = row_pass(dk_end, C, scale=f[..., 0], out=dk_end, dot_with=k)  # k enters as f k; x dx of f
        dq = addmm_(dq_in, dP, k)
        dk = addmm_(dk_end, dP.transpose(-1, -2), q)  # (G, N, C, K)
        del dP
        # beta and the chunk-start decay e enter as R = [beta v | beta e k] and as the row factor
        # beta_i of A = beta_i k_i . k_j: with t = -(e dRk + dA k), dL/dbeta = sum(dRv v) + sum(t k)
        # and dk gets beta t, plus (beta dA)^T k through the k_j of A.
        if gated:
            _, dRk_dot, _ = row_pass(dRk_neg, C, scale=e[..., 0], out=dRk_neg, dot_with=k, dot_before_scale=True)
            dgamma_in.addcmul_(dRk_dot, beta * e[..., 0], value=-1)  # and as beta e k
        t_neg = addmm_(dRk_neg, dA_neg, k)  # (G, N, C, K)
        addmm_(dk, dA_neg.mul_(beta[..., None]).transpose(-1, -2), k, alpha=-1)
        del dA_neg
        # dbeta = sum(dRv v) - sum(t_neg k) (G, N, C), each in the pass that applies beta
        dv, dbeta, _ = row_pass(dRv, C, scale=beta, out=dRv, dot_with=v, dot_before_scale=True)
        _, dbeta_k, _ = row_pass(t_neg, C, scale=-beta, out=dk, accumulate=True, dot_with=k, dot_before_scale=True)
        dbeta.sub_(dbeta_k)
        dg = None
        if gated:
            # dL/dgamma_i: row minus column sums of x dx over M (in P and A), plus the terms of
            # e (above), f (k's decay to the chunk end) and e_C (the carried state).
            xP.sub_(xA)
            dgamma = dgamma_in.add_(xP.sum(-1)).sub_(xP.sum(-2)).sub_(xf)  # (G, N, C)
            dgamma[..., -1] += xf.sum(-1) + end_dot * e_end[..., 0, 0]
            dg = dgamma.flip(-1).cumsum(-1).flip(-1)  # dL/dg_s = sum over i >= s of dL/dgamma_i
        return dq, dk, dv, dbeta, dg, dS0

    backward = chunk_backward(_backward)


def _unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """``(I + A)^{-1}`` for strictly lower-triangular ``A`` (..., C, C); only the strictly lower
    triangle of ``A`` is read (its diagonal and upper triangle may hold anything).

    One batched triangular solve ``(I + A) T = I``, written in place into a workspace buffer that
    starts as the identity (``solve_triangular`` with ``out`` the right-hand side solves in place:
    no copy of ``A`` or of the result). LAPACK's substitution reads each matrix once, where a
    blocked forward substitution in batched matmuls takes several passes, with the same accuracy
    against an fp64 run (``benchmarks/delta_speed.py`` times the kernel).
    """
    T = workspace_like(A)
    T.copy_(torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A))
    return _solve_unit_lower_(A, T)


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised workspace buffer shaped as ``t`` (..., R, M), its last two dims column-major."""
    return workspace((*t.shape[:-2], t.shape[-1], t.shape[-2]), t).mT


def _solve_unit_lower_(A: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Overwrite ``X`` (..., C, M) with ``(I + A)^{-1} X``, reading only the strictly lower triangle
    of ``A`` (..., C, C). ``solve_triangular`` given ``out`` equal to its right-hand side solves in
    place (no copy of ``A`` or ``X``). LAPACK has no half-precision solve, so bf16 and fp16 solve in
    fp32 and round once."""
    if A.dtype in (torch.float32, torch.float64):
        return torch.linalg.solve_triangular(A, X, upper=False, unitriangular=True, out=X)
    X.copy_(torch.linalg.solve_triangular(A.float(), X.float(), upper=False, unitriangular=True))
    return X


# --------------------------------------------------------------------------- diagonal plus low rank
#: Default chunk length of :func:`dplr_delta_rule_chunk`.
DPLR_CHUNK_SIZE = 32


def _check_dplr_inputs(q, k, v, a, b, log_decay, state, lengths):
    """Validate the diagonal-plus-low-rank op's arguments; return ``q, k, v, a, b, log_decay`` with
    the steps past each length set to zero."""
    for name, t in (("q", q), ("k", k), ("v", v), ("a", a), ("b", b), ("log_decay", log_decay)):
        check_tensor(name, t)
    if q.dim() != 4:
        raise InputError(f"q: expected shape (B, H, T, K), got {tuple(q.shape)}")
    B, H, T, K = q.shape
    for name, t in (("k", k), ("a", a), ("b", b), ("log_decay", log_decay)):
        if t.shape != q.shape:
            raise InputError(f"{name}: expected shape (B, H, T, K) = {tuple(q.shape)}, got {tuple(t.shape)}")
    if v.dim() != 4 or v.shape[:3] != (B, H, T):
        raise InputError(f"v: expected shape (B, H, T, V) = ({B}, {H}, {T}, V), got {tuple(v.shape)}")
    inputs = (q, k, v, a, b, log_decay)
    lengths = _check_state_dtype_lengths(q, v, inputs, state, lengths, "q, k, v, a, b, log_decay, ...")
    if lengths is not None:
        # zeros make a padded step the identity (no decay, no low-rank term, nothing written)
        inputs = zero_padding(valid_mask(lengths, T), *inputs)
    return inputs


def dplr_delta_rule_recurrent(q, k, v, a, b, log_decay, state=None, lengths=None):
    """The diagonal-plus-low-rank delta rule as a loop over time: the definition the other forms match.

    Per batch element and head, with state ``S`` ``(K, V)``::

        S_t = (diag(exp(g_t)) + a_t b_t^T) S_{t-1} + k_t v_t^T        y_t = S_t^T q_t

    the transition of RWKV-7 (Peng et al. 2025, "RWKV-7 Goose with Expressive Dynamic State
    Evolution", eq. 3, transposed to the ``(K, V)`` layout): ``a = -(eta ⊙ kappa)``, ``b = kappa``
    with the removal key ``kappa`` and the in-context learning rate ``eta``. With ``g = 0``,
    ``a = -beta k`` and ``b = k`` (and ``beta k`` written) it is the delta rule above.

    Args:
        q: ``(B, H, T, K)`` queries (any scaling is the caller's).
        k: ``(B, H, T, K)`` keys written.
        v: ``(B, H, T, V)`` values.
        a: ``(B, H, T, K)`` the low-rank term's write direction.
        b: ``(B, H, T, K)`` the low-rank term's read key.
        log_decay: ``(B, H, T, K)`` ``g``, the log of the diagonal (``<= 0`` for a contraction; not
            enforced).
        state: ``(B, H, K, V)`` initial state, zeros if None.
        lengths: optional ``(B,)`` ints in ``[1, T]``; steps past a length leave the state unchanged.

    Returns:
        ``y`` ``(B, H, T, V)`` and the final state ``(B, H, K, V)``.
    """
    q, k, v, a, b, g = _check_dplr_inputs(q, k, v, a, b, log_decay, state, lengths)
    B, H, T, K = q.shape
    S = state if state is not None else q.new_zeros(B, H, K, v.shape[-1])
    ys = []
    # unbind once: indexing in the loop would make backward write a full-size zero gradient per step
    for q_t, k_t, v_t, a_t, b_t, g_t in zip(*(t.unbind(2) for t in (q, k, v, a, b, g))):
        y_t, S = dplr_delta_rule_step(q_t, k_t, v_t, a_t, b_t, g_t, S)
        ys.append(y_t)
    return torch.stack(ys, 2), S


def dplr_delta_rule_step(q_t, k_t, v_t, a_t, b_t, log_decay_t, S):
    """One step: ``q_t, k_t, a_t, b_t, log_decay_t`` (B, H, K), ``v_t`` (B, H, V), ``S`` (B, H, K, V)
    -> ``y_t`` (B, H, V) and the next ``S``."""
    read = torch.einsum("bhk,bhkv->bhv", b_t, S)  # b_t^T S_{t-1}
    S = torch.exp(log_decay_t)[..., None] * S + a_t[..., :, None] * read[..., None, :] + k_t[..., :, None] * v_t[..., None, :]
    return torch.einsum("bhk,bhkv->bhv", q_t, S), S


def dplr_delta_rule_chunk(q, k, v, a, b, log_decay, state=None, lengths=None, chunk_size=DPLR_CHUNK_SIZE):
    """Chunkwise diagonal-plus-low-rank delta rule; same arguments and result as
    :func:`dplr_delta_rule_recurrent`, plus ``chunk_size`` (``C``, steps per chunk; ``T`` need not
    be a multiple).

    Within a chunk, with ``gamma_i`` the cumulative log decay to step ``i`` (a vector over ``K``)
    and ``h_i = b_i^T S_{i-1}`` the low-rank term's read, unrolling the recurrence gives
    ``S_i = e^{gamma_i} S_0 + sum_{j <= i} e^{gamma_i - gamma_j} (a_j h_j + k_j v_j^T)``, so the
    reads solve one unit-lower-triangular system per chunk,
    ``(I - L_ab) h = (b e^{gamma_{i-1}}) S_0 + L_ak v`` with ``L_xy[i, j] = sum_d x_id y_jd
    e^{gamma_{i-1,d} - gamma_{j,d}}`` for ``j < i``, solved for the two right-hand sides (the part
    from ``v`` and the factor of ``S_0``) of all chunks at once; only the state carry
    ``S_{n+1} = e^{gamma_C} S_n + (a e^{gamma_C - gamma})^T h + (k e^{gamma_C - gamma})^T v``
    loops over chunks, with the products that read ``S_n`` (``h``'s and ``y``'s shares), and
    ``y = (q e^{gamma}) S_n + M_qa h + M_qk v`` (``M_xy`` as ``L`` with ``j <= i`` and
    ``gamma_i``) is completed batched again. The backward is written by hand
    (:class:`_ChunkwiseDPLR`) and recomputes nothing larger than a chunk's ``(C, C)`` scores.

    Cost per head: ``O(T C (K + V) + T K V)`` time and ``O(T (C + K + V) + (T / C) K V)`` memory
    while the decays of a chunk stay within ``SCORE_FACTOR_BOUND`` of 1 in log space (then every
    decayed score is one product of ``x e^{gamma}`` and ``y e^{-gamma}``); beyond, the scores come
    from the exponent of every pair, ``O(T C K)`` time, in slices of bounded memory.
    """
    check_positive_int("chunk_size", chunk_size)
    inputs = _check_dplr_inputs(q, k, v, a, b, log_decay, state, lengths)
    return _dplr_chunks(*inputs, state, min(chunk_size, q.shape[2]))


def dplr_delta_rule_parallel(q, k, v, a, b, log_decay, state=None, lengths=None):
    """The chunkwise algorithm with one chunk spanning the sequence (same arguments and result as
    :func:`dplr_delta_rule_recurrent`): no loop, ``O(T^2)`` memory."""
    inputs = _check_dplr_inputs(q, k, v, a, b, log_decay, state, lengths)
    return _dplr_chunks(*inputs, state, q.shape[2])


#: Forms :func:`dplr_delta_rule` runs, ``recurrent`` (the definition) first.
_DPLR_FORMS = {"recurrent": dplr_delta_rule_recurrent, "parallel": dplr_delta_rule_parallel,
               "chunk": dplr_delta_rule_chunk}
DPLR_DELTA_RULE_MODES = tuple(_DPLR_FORMS)


def dplr_delta_rule(q, k, v, a, b, log_decay, state=None, lengths=None, *, mode: str = "chunk",
                    chunk_size: int = DPLR_CHUNK_SIZE):
    """The delta rule with a diagonal-plus-low-rank transition, ``S_t = (diag(exp(g_t)) + a_t b_t^T)
    S_{t-1} + k_t v_t^T``, ``y_t = S_t^T q_t`` (RWKV-7), in the form ``mode``.

    Args:
        q, k, a, b, log_decay: ``(B, H, T, K)``; v: ``(B, H, T, V)``; state: ``(B, H, K, V)`` or
            None; lengths: ``(B,)`` or None (as :func:`dplr_delta_rule_recurrent`).
        mode: ``"recurrent"`` (the loop, the definition), ``"parallel"`` (one chunk) or ``"chunk"``
            (the default).
        chunk_size: steps per chunk of the ``chunk`` form.

    Returns:
        ``y`` ``(B, H, T, V)`` and the final state ``(B, H, K, V)``.

    Raises:
        InputError: an unknown ``mode``, or bad shapes, dtypes or lengths.
    """
    return run_form(mode, _DPLR_FORMS, (q, k, v, a, b, log_decay, state, lengths), chunk_size)


def _dplr_chunks(q, k, v, a, b, g, state, C):
    """The chunkwise algorithm of :func:`dplr_delta_rule_chunk` on validated, padding-zeroed inputs."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    N = -(-T // C)
    pad = N * C - T
    G = B * H
    dtype = q.dtype
    # LAPACK has no half-precision triangular solve: bf16 and fp16 compute in fp32 and round once.
    work = torch.promote_types(dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        # zero steps past T are identities; (G, N, C, *) chunks
        q, k, a, b, g = (pad_time(t.to(work), pad).reshape(G, N, C, K) for t in (q, k, a, b, g))
        v = pad_time(v.to(work), pad).reshape(G, N, C, V)
        S0 = state.to(work).reshape(G, K, V) if state is not None else q.new_zeros(G, K, V)
        y, S = _ChunkwiseDPLR.apply(q, k, v, a, b, g, S0)
    return y.reshape(B, H, N * C, V)[:, :, :T].to(dtype), S.view(B, H, K, V).to(dtype)


def _dplr_score_mask(C: int, like: torch.Tensor) -> torch.Tensor:
    """``(2C, 2C)`` mask of the stacked scores ``[b; q] [a; k]^T``: the rows of ``b`` (the reads,
    before their own step) keep ``j < i``, the rows of ``q`` (after it) keep ``j <= i``, in both
    column blocks; in ``like``'s dtype."""
    pos = torch.arange(2 * C, device=like.device) % C
    after = (torch.arange(2 * C, device=like.device) >= C).long()
    return (pos[None, :] < pos[:, None] + after[:, None]).to(like.dtype)


def _dplr_log_map(C: int, like: torch.Tensor, mild: bool) -> torch.Tensor:
    """``(2C + 1, C)``: times ``g`` (C, K), the logs of a chunk's factors in one buffer: a row of
    zeros and the inclusive cumulative sums ``gamma_1 .. gamma_C`` (so rows ``0 .. C-1`` are the
    exclusive sums ``gamma_b`` and rows ``1 .. C`` are ``gamma``), then ``-gamma`` when ``mild``,
    otherwise ``gamma_C - gamma_i`` summed over the steps after ``i`` (never losing ``|gamma_i|``
    ulp)."""
    incl = causal_float(C, like)
    last = -incl if mild else incl.transpose(0, 1).triu(1)
    return torch.cat([incl.new_zeros(1, C), incl, last], 0)


def _dplr_stacked_logs(logs: torch.Tensor, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[gamma_b; gamma]`` and ``[gamma; gamma]`` (G, N, 2C, K) from the buffer of
    :func:`_dplr_log_map`: the exponents of the rows and columns of the stacked scores."""
    gamma = logs[:, :, 1:C + 1]
    return torch.cat([logs[:, :, :C], gamma], 2), torch.cat([gamma, gamma], 2)


def _pair_decays(gx, gy, keep):
    """``exp(gx_id - gy_jd)`` ``(..., R, R', K)`` where ``keep`` (R, R') is True, else 0 (the exponent
    masked to ``-inf`` first, so nothing above the kept entries can overflow)."""
    return torch.exp((gx[..., :, None, :] - gy[..., None, :, :]).masked_fill(~keep[..., None], -math.inf))


def _pair_slices(x: torch.Tensor, R2: int):
    """Slices of dimension 0 whose ``(..., R, R', K)`` pairwise decays stay within 64 MiB."""
    per_item = max(1, x[:1].numel() * R2 * x.element_size())
    step = max(1, (64 << 20) // per_item)
    return [slice(i, i + step) for i in range(0, x.shape[0], step)]


def _pairwise_scores(x, gx, y, gy, keep):
    """``s_ij = sum_d x_id y_jd exp(gx_id - gy_jd)`` where ``keep`` (R, R') is True, 0 elsewhere;
    ``x, gx`` (G, ..., R, K), ``y, gy`` (G, ..., R', K). The exact form for decays too strong to
    factor into ``x e^{gx}`` and ``y e^{-gy}``; ``O(R R' K)`` memory, in slices of ``G``."""
    out = x.new_empty(*x.shape[:-1], y.shape[-2])
    for sl in _pair_slices(x, y.shape[-2]):
        out[sl] = torch.einsum("...id,...jd,...ijd->...ij", x[sl], y[sl], _pair_decays(gx[sl], gy[sl], keep))
    return out


def _pairwise_scores_backward(ds, x, gx, y, gy, keep):
    """Gradients of :func:`_pairwise_scores` w.r.t. ``x`` and ``y`` given ``ds`` (zero where not
    kept); those w.r.t. ``gx`` and ``gy`` are ``x * dx`` and ``-y * dy``. The decays are recomputed
    slice by slice, never stored."""
    dx, dy = torch.empty_like(x), torch.empty_like(y)
    for sl in _pair_slices(x, y.shape[-2]):
        weighted = _pair_decays(gx[sl], gy[sl], keep).mul_(ds[sl][..., None])
        dx[sl] = torch.einsum("...ijd,...jd->...id", weighted, y[sl])
        dy[sl] = torch.einsum("...ijd,...id->...jd", weighted, x[sl])
    return dx, dy


class _ChunkwiseDPLR(torch.autograd.Function):
    """Chunkwise diagonal-plus-low-rank delta rule with a hand-written backward.

    q, k, a, b, g (G, N, C, K); v (G, N, C, V); S0 (G, K, V). Per chunk, with ``gamma`` the
    inclusive cumulative log decay (a row per step), ``gamma_b`` the exclusive one, ``E = e^gamma``,
    ``E_b = e^{gamma_b}``, ``E_C`` its last row and ``F = e^{-gamma}`` (mild decays, every
    ``|gamma| <= SCORE_FACTOR_BOUND``) or ``e^{gamma_C - gamma}`` (strong ones)::

        X1 = [b E_b; q E]    X2 = [a F; k F]                       (2C, K) each
        scores = mask ⊙ X1 X2^T = [[L_ab, L_ak], [M_qa, M_qk]]      (2C, 2C), strict above, causal below
        T = (I - L_ab)^{-1}    U = T L_ak v    W = T (b E_b)       h_n = U + W S_n
        y = (q E) S_n + [M_qa M_qk] [h_n; v]
        S_{n+1} = E_C ⊙ (S_n + X2^T [h_n; v])  (mild)     E_C ⊙ S_n + X2^T [h_n; v]  (strong)

    Strong decays cannot factor the scores (``e^{-gamma}`` would overflow), so they are formed
    from the exponent of every pair (:func:`_pairwise_scores`, recomputed in the backward rather
    than stored). ``[b; q]``, ``[a; k]``, ``[h; v]`` and ``[dR_v; dy]`` are stacked along the
    rows so that the scores, their gradient and the products through them are each one
    ``(2C, *)`` matmul. Only the products with the state or its gradient run in a loop over
    chunks, each formed there while ``S_n`` or ``dS_{n+1}`` is in cache: forwards ``W S_n``,
    ``(q E) S_n`` and the update; backwards ``X2 dS_{n+1}`` (``dh``'s and ``dv``'s shares),
    ``[h; v] dS_{n+1}^T`` (``dX2``'s), ``dS_n`` and ``gamma_C``'s gradient, so that no
    ``(G, N, K, V)`` tensor of carried gradients is stored; everything else is batched over all
    chunks at once.

    Backward, per chunk: ``dh = M_qa^T dy + X2_a (E_C ⊙ dS_{n+1})`` (mild; ``X2_a dS_{n+1}``
    strong), ``dS_n = E_C ⊙ dS_{n+1} + (q E)^T dy + W^T dh``. Then ``dR_v = T^T dh`` and, through
    ``[U | W] = T [L_ak v | b E_b]`` and ``h = U + W S_n``, ``dL_ab = dR_v h^T``; so
    ``dscores = mask ⊙ [dR_v; dy] [h; v]^T``, ``dX1 = [dR_v; dy] S_n^T + dscores X2``,
    ``dX2 = [h; v] (E_C ⊙ dS_{n+1})^T + dscores^T X1`` and ``dv = [L_ak; M_qk]^T [dR_v; dy] +
    X2_k (E_C ⊙ dS_{n+1})``. The decays enter only through the factors' exponents: the gradient
    w.r.t. each log factor is ``X ⊙ dX`` (``F``'s counted as ``-gamma`` in both cases: for strong
    decays its ``gamma_C`` share falls into the next term), w.r.t. ``gamma_C`` through ``E_C`` it is
    ``sum_v dS_{n+1} ⊙ S_{n+1}``, and ``dg`` is the transposed cumulative-sum map applied to them.
    """

    @staticmethod
    def forward(ctx, q, k, v, a, b, g, S0):
        G, N, C, K = q.shape
        V = v.shape[-1]
        # (G, N, 2C + 1, K) the logs of [1; E; F] (E_b is [1; E] less its last row), by one batched
        # product with the summation map
        logs = mm(_dplr_log_map(C, q, True).expand(G, N, 2 * C + 1, C), g)
        # over the whole buffer, which holds 0, gamma and -gamma: the same bound, read contiguously
        lo, hi = torch.aminmax(logs)
        mild = max(-float(lo), float(hi)) <= SCORE_FACTOR_BOUND
        if not mild:
            logs[:, :, C + 1:] = _dplr_log_map(C, q, False)[C + 1:] @ g
        fac = logs.exp_() if mild else torch.exp(logs, out=workspace_like(logs))
        F = fac[:, :, C + 1:]
        end = fac[:, :, C, :, None]  # (G, N, K, 1) E_C
        X1, X2 = workspace((G, N, 2 * C, K), q), workspace((G, N, 2 * C, K), q)
        for out, x, factor in ((X1[:, :, :C], b, fac[:, :, :C]), (X1[:, :, C:], q, fac[:, :, 1:C + 1]),
                               (X2[:, :, :C], a, F), (X2[:, :, C:], k, F)):
            into(torch.mul, x, factor, out=out)
        keep = _dplr_score_mask(C, q)
        x1 = x2 = None
        if mild:
            scores = mm(X1, X2.transpose(-1, -2)).mul_(keep)  # (G, N, 2C, 2C)
        else:
            x1, x2 = torch.cat([b, q], 2), torch.cat([a, k], 2)
            rows, cols = _dplr_stacked_logs(logs, C)
            scores = _pairwise_scores(x1, rows, x2, cols, keep.bool())
        # I - L_ab, for the triangular solves that read its strictly lower triangle
        A = torch.neg(scores[:, :, :C, :C], out=workspace((G, N, C, C), q))
        HV = workspace((G, N, 2 * C, V), q)  # [h; v]: h written chunk by chunk
        HV[:, :, C:] = v
        R = mm(scores[:, :, :C, C:], HV[:, :, C:])  # (G, N, C, V) L_ak v
        direct = C > DIRECT_SOLVE_ABOVE
        if direct:  # long chunks: solve rather than multiply by the inverse (see _ChunkwiseDelta)
            solver = A
            rhs = _column_major(R)
            rhs.copy_(R)
            HV[:, :, :C] = _solve_unit_lower_(A, rhs)
            W = _column_major(X1[:, :, :C])
            W.copy_(X1[:, :, :C])
            W = _solve_unit_lower_(A, W)
        else:
            solver = _unit_lower_inverse(A)
            mm_into(solver, R, HV[:, :, :C])
            W = mm(solver, X1[:, :, :C])  # (G, N, C, K)
        del R
        S_start = workspace((G, N, K, V), q)
        S = S0.clone()  # the running state, updated in place (its address is fixed for the plan)
        y = workspace((G, N, C, V), q)
        read = ChunkProducts(W, S, HV[:, :, :C], beta=1.0)  # h_n = U_n + W_n S_n
        # y's share of the state, formed while S_n is in cache rather than read back from S_start
        read_q = ChunkProducts(X1[:, :, C:], S, y)  # y_n = (q E)_n S_n
        write = ChunkProducts(X2.transpose(-1, -2), HV, S, beta=1.0)  # S += X2_n^T [h_n; v_n]
        for n in range(N):
            S_start[:, n] = S
            read(n)
            read_q(n)
            if mild:
                write(n)
                S.mul_(end[:, n])
            else:
                S.mul_(end[:, n])
                write(n)
        del read, read_q, write
        addmm_(y, scores[:, :, C:], HV)  # (G, N, C, V)
        ctx.mild, ctx.direct = mild, direct
        ctx.save_for_backward(X1, X2, fac, scores, solver, W, HV, S_start, S, x1, x2, logs if not mild else None)
        return y, S

    @staticmethod
    def _backward(ctx, dy, dS_final):
        X1, X2, fac, scores, solver, W, HV, S_start, S_final, x1, x2, logs = ctx.saved_tensors
        mild = ctx.mild
        G, N, C2, K = X1.shape
        C, V = C2 // 2, HV.shape[-1]
        end = fac[:, :, C, :, None]  # (G, N, K, 1)
        Z = workspace((G, N, 2 * C, V), X1)  # [dR_v; dy]
        dyc = Z[:, :, C:]
        dyc.copy_(dy)
        DH = mm(scores[:, :, C:, :C].transpose(-1, -2), dyc)  # (G, N, C, V) dh, from M_qa^T dy first
        DV = mm(scores[:, :, C:, C:].transpose(-1, -2), dyc)  # (G, N, C, V) dv, from M_qk^T dy first
        # Every product with dS_{n+1} is formed in the loop, where it is in cache: no (G, N, K, V)
        # copy of the carried gradient is written and read back by batched products after the loop.
        dX2 = workspace((G, N, 2 * C, K), X1)
        # sum_v dS_{n+1} ⊙ S_{n+1}: the gradient w.r.t. gamma_C via E_C, chunk-major so that each
        # chunk's sum is written in place; a multiply and a sum over a cached scratch, where a
        # batched matmul of 1 x V by V x 1 rows runs far below the matmul rate
        end_dot = X1.new_empty(N, G, K)
        dS = dS_final.clone() if dS_final is not None else X1.new_zeros(G, K, V)  # updated in place
        scratch = torch.empty_like(dS)
        # dS below is dS_{n+1}, times E_C when mild
        carry = ChunkProducts(X2[:, :, :C], dS, DH, beta=1.0)  # dh_n += X2_a dS
        carry_v = ChunkProducts(X2[:, :, C:], dS, DV, beta=1.0)  # dv_n += X2_k dS
        write_share = ChunkProducts(HV, dS.transpose(-1, -2), dX2)  # dX2_n = [h_n; v_n] dS^T
        state_q = ChunkProducts(X1[:, :, C:].transpose(-1, -2), dyc, dS, beta=1.0)  # dS += (q E)^T dy
        state_w = ChunkProducts(W.transpose(-1, -2), DH, dS, beta=1.0)  # dS += W^T dh
        for n in range(N - 1, -1, -1):
            torch.sum(torch.mul(dS, S_start[:, n + 1] if n + 1 < N else S_final, out=scratch), -1, out=end_dot[n])
            if mild:
                dS.mul_(end[:, n])
            for product in (carry, carry_v, write_share):
                product(n)
            if not mild:
                dS.mul_(end[:, n])
            state_q(n)
            state_w(n)
        del carry, carry_v, write_share, state_q, state_w, scratch
        end_dot = end_dot.permute(1, 0, 2)  # (G, N, K)
        if ctx.direct:
            rhs = _column_major(DH)
            rhs.copy_(DH)
            Z[:, :, :C] = torch.linalg.solve_triangular(solver.transpose(-1, -2), rhs, upper=True,
                                                        unitriangular=True, out=rhs)
        else:
            mm_into(solver.transpose(-1, -2), DH, Z[:, :, :C])  # dR_v = T^T dh
        del DH
        keep = _dplr_score_mask(C, X1)
        dscores = mm(Z, HV.transpose(-1, -2)).mul_(keep)  # (G, N, 2C, 2C)
        dX1 = mm(Z, S_start.transpose(-1, -2))  # (G, N, 2C, K)
        if mild:
            addmm_(dX1, dscores, X2)
            addmm_(dX2, dscores.transpose(-1, -2), X1)
        dv = addmm_(DV, scores[:, :, :C, C:].transpose(-1, -2), Z[:, :, :C])  # (G, N, C, V) += L_ak^T dR_v
        del Z
        F = fac[:, :, C + 1:]
        grads = []
        for dX, factor in ((dX1[:, :, :C], fac[:, :, :C]), (dX1[:, :, C:], fac[:, :, 1:C + 1]),
                           (dX2[:, :, :C], F), (dX2[:, :, C:], F)):
            grads.append(torch.mul(dX, factor, out=workspace((G, N, C, K), X1)))
        db, dq, da, dk = grads
        # the gradient w.r.t. the logs [gamma_b; gamma] of the factors (F's counted as -gamma)
        dlog = torch.mul(X1, dX1, out=workspace_like(X1))
        below = dlog[:, :, C:]
        below.addcmul_(X2[:, :, :C], dX2[:, :, :C], value=-1).addcmul_(X2[:, :, C:], dX2[:, :, C:], value=-1)
        del dX1, dX2
        if not mild:
            rows, cols = _dplr_stacked_logs(logs, C)
            dx1, dx2 = _pairwise_scores_backward(dscores, x1, rows, x2, cols, keep.bool())
            for out, part in ((db, dx1[:, :, :C]), (dq, dx1[:, :, C:]), (da, dx2[:, :, :C]), (dk, dx2[:, :, C:])):
                out.add_(part)
            dlog.addcmul_(x1, dx1)
            below.addcmul_(x2[:, :, :C], dx2[:, :, :C], value=-1).addcmul_(x2[:, :, C:], dx2[:, :, C:], value=-1)
        del dscores
        # gamma_C = the chunk's sum of g reaches every step's g
        incl = causal_float(C, X1)
        maps_t = torch.cat([incl.tril(-1), incl], 0).transpose(0, 1)  # (C, 2C): [gamma_b; gamma] = maps g
        dg = mm(maps_t.expand(G, N, C, 2 * C), dlog).add_(end_dot[:, :, None, :])
        return dq, dk, dv, da, db, dg, dS

    backward = chunk_backward(_backward)
