"""Mamba's selective scan (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", Algorithm 2), with the optional step-size bias and softplus, ``D`` skip and ``SiLU(z)`` gate
of the Mamba block:

    h_t = exp(delta_t A) ⊙ h_{t-1} + (delta_t u_t) B_t        h_t (E, N) per batch element
    y_t = (h_t C_t + D ⊙ u_t) ⊙ SiLU(z_t)                      y_t (E,)

with ``delta_t``, ``u_t``, ``z_t`` ``(E,)`` per channel, ``B_t``, ``C_t`` ``(N,)`` shared by the
channels, ``A`` ``(E, N)`` (negative for a contraction) and ``D`` ``(E,)``; without ``D`` the skip
term is 0, without ``z`` the gate is 1. Given ``delta_bias`` ``(E,)`` and/or ``delta_softplus``,
the step size is ``softplus(delta_t + delta_bias)`` (``torch.nn.functional.softplus``) or
``delta_t + delta_bias`` in place of ``delta_t``. ``allow_neg_eigval=True`` takes the transition
``2 exp(delta_t A) - 1`` in ``(-1, 1)`` instead of ``exp(delta_t A)`` in ``(0, 1)`` (Grazzi et al.
2025, "Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues", Sec. 4); the fused
kernel computes ``exp(delta A)`` itself, so that option runs the block forms (``auto``: ``chunk``).
One entry, :func:`selective_scan` with ``mode=``:

- ``recurrent``: :func:`selective_scan_recurrent`, the loop over :func:`selective_scan_step`, the
  definition;
- ``parallel``, ``chunk``: the decays ``exp(delta A)`` and inputs ``delta u B`` of a block of steps
  formed at once, ``(B, Tb, E, N)``, and scanned by that form of :func:`rnnkit.ops.linear_scan`;
- ``fused``: one compiled CPU kernel (:mod:`rnnkit.ops._native`) for the whole recurrence, skip,
  gate and step-size softplus included, in the design of the paper's CUDA kernel: per batch row
  and channel the discretisation, the scan over the ``(N,)`` state held in registers and the
  contraction with ``C`` in one pass, so no ``(B, T, E, N)`` tensor is ever written. Its backward
  recomputes the states chunk by chunk in reverse from checkpoints saved every
  ``steps_per_block`` steps (``(B, T / steps_per_block, E, N)``, default every 64 steps); that
  backward is not itself differentiable (no second derivatives). fp32 and fp64 run as they are;
  other floating dtypes (bf16, fp16) are computed in fp32 and the results cast back. Available
  where the compiled library is (else ``mode="fused"`` raises, as :func:`rnnkit.ops.linear_scan`'s
  does). Threads split the work into (batch row, channel range) units that depend on the shape
  only, so the result does not depend on the number of threads;
- ``auto``: ``fused`` on the CPU where the compiled library is available, ``chunk`` otherwise.

Memory of the block forms: the expanded ``(B, T, E, N)`` tensors are never formed for the whole
sequence when ``steps_per_block`` is given: time runs in blocks of that many steps carrying the
state, and under autograd each block is recomputed in the backward pass (activation
checkpointing), so only the ``(B, T, E)``-sized inputs and one ``(B, E, N)`` state per block are
kept (``benchmarks/mamba_memory.py`` measures it).

Padding (``lengths``): steps past a length have decay 1 and input 0, so the state is kept (and the
output there reads the kept state, with that step's ``C``, skip and gate), in every form.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from rnnkit.errors import InputError, check_bool, check_choice, check_lengths, check_positive_int, check_tensor
from rnnkit.ops import _native, _workspace
from rnnkit.ops._forms import is_empty_batch
from rnnkit.ops._native import CHANNELS_LAST_DTYPES, ptr
from rnnkit.ops.padding import freeze_padding, valid_mask
from rnnkit.ops.scan import LINEAR_SCAN_MODES, linear_scan

#: Forms :func:`selective_scan` runs, ``recurrent`` (the definition) first.
SELECTIVE_SCAN_MODES = LINEAR_SCAN_MODES
#: Steps between the fused backward's checkpoints when ``steps_per_block`` is not given.
FUSED_CHECKPOINT_STEPS = 64


def _check_inputs(delta, Bm, Cm, u, A, h0, lengths, D=None, z=None, delta_bias=None, delta_softplus=False,
                  allow_neg_eigval=False):
    for name, t in (("delta", delta), ("B", Bm), ("C", Cm), ("u", u), ("A", A)):
        check_tensor(name, t)
    if delta.dim() != 3 or delta.shape[1] < 1:
        raise InputError(f"delta: expected shape (B, T, E) with T >= 1, got {tuple(delta.shape)}")
    B, T, E = delta.shape
    if u.shape != delta.shape:
        raise InputError(f"u: expected shape (B, T, E) = {(B, T, E)}, got {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != E:
        raise InputError(f"A: expected shape (E, N) = ({E}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    for name, t in (("B", Bm), ("C", Cm)):
        if t.shape != (B, T, N):
            raise InputError(f"{name}: expected shape (B, T, N) = {(B, T, N)}, got {tuple(t.shape)}")
    if h0 is not None:
        check_tensor("h0", h0)
        if h0.shape != (B, E, N):
            raise InputError(f"h0: expected shape (B, E, N) = {(B, E, N)}, got {tuple(h0.shape)}")
    if D is not None and check_tensor("D", D).shape != (E,):
        raise InputError(f"D: expected shape (E,) = ({E},), got {tuple(D.shape)}")
    if z is not None and check_tensor("z", z).shape != delta.shape:
        raise InputError(f"z: expected shape (B, T, E) = {(B, T, E)}, got {tuple(z.shape)}")
    if delta_bias is not None and check_tensor("delta_bias", delta_bias).shape != (E,):
        raise InputError(f"delta_bias: expected shape (E,) = ({E},), got {tuple(delta_bias.shape)}")
    check_bool("delta_softplus", delta_softplus)
    check_bool("allow_neg_eigval", allow_neg_eigval)
    return check_lengths(lengths, B, T, delta.device)


def _step_sizes(delta, delta_bias, delta_softplus):
    """The step sizes the recurrence uses: ``delta (+ delta_bias)``, through softplus when asked."""
    if delta_bias is not None:
        delta = delta + delta_bias
    return F.softplus(delta) if delta_softplus else delta


def _skip_and_gate(y, u, D, z):
    """``(y + D u) SiLU(z)``, each part only when given; shapes ``(..., E)``."""
    if D is not None:
        y = y + D * u
    return y if z is None else y * F.silu(z)


def selective_scan_step(delta_t, B_t, C_t, u_t, A, h, D=None, z_t=None, allow_neg_eigval=False):
    """One step: ``delta_t``, ``u_t``, ``z_t`` (B, E), ``B_t``, ``C_t`` (B, N), ``A`` (E, N), ``D``
    (E,), ``h`` (B, E, N) -> ``y_t`` (B, E) and the next ``h``."""
    h = _update(delta_t, B_t, u_t, A, h, allow_neg_eigval)
    return _skip_and_gate(_read(h, C_t), u_t, D, z_t), h


def _transition(delta_A: torch.Tensor, allow_neg_eigval: bool) -> torch.Tensor:
    """``exp(delta A)``, or ``2 exp(delta A) - 1`` with negative eigenvalues allowed."""
    decay = torch.exp(delta_A)
    return 2 * decay - 1 if allow_neg_eigval else decay


def _update(delta_t, B_t, u_t, A, h, allow_neg_eigval=False):
    decay = _transition(delta_t[..., None] * A, allow_neg_eigval)
    return decay * h + (delta_t * u_t)[..., None] * B_t[:, None, :]  # (B, E, N)


def _read(h, C_t):
    return (h * C_t[:, None, :]).sum(-1)  # (B, E)


def selective_scan_recurrent(delta, Bm, Cm, u, A, h0=None, lengths=None, *, D=None, z=None, delta_bias=None,
                             delta_softplus=False, allow_neg_eigval=False):
    """The loop that defines the selective scan (see the module docstring).

    Args:
        delta: ``(B, T, E)`` step sizes; Bm, Cm: ``(B, T, N)``; u: ``(B, T, E)`` inputs; A: ``(E, N)``;
        h0: ``(B, E, N)`` initial state, zeros if None; lengths: optional ``(B,)`` ints in ``[1, T]``;
        D: optional ``(E,)`` skip; z: optional ``(B, T, E)`` gate input; delta_bias: optional
        ``(E,)``; delta_softplus: the step size is ``softplus(delta + delta_bias)``;
        allow_neg_eigval: the transition is ``2 exp(delta A) - 1``.

    Returns:
        ``y`` ``(B, T, E)`` and the final state ``(B, E, N)`` (at each sequence's last valid step).
    """
    lengths = _check_inputs(delta, Bm, Cm, u, A, h0, lengths, D, z, delta_bias, delta_softplus, allow_neg_eigval)
    delta = _step_sizes(delta, delta_bias, delta_softplus)
    h = h0 if h0 is not None else delta.new_zeros(delta.shape[0], *A.shape)
    ys = []
    gates = z.unbind(1) if z is not None else [None] * delta.shape[1]
    steps = zip(delta.unbind(1), Bm.unbind(1), Cm.unbind(1), u.unbind(1), gates)
    for t, (delta_t, B_t, C_t, u_t, z_t) in enumerate(steps):
        h = freeze_padding(t, lengths, _update(delta_t, B_t, u_t, A, h, allow_neg_eigval), h)
        ys.append(_skip_and_gate(_read(h, C_t), u_t, D, z_t))
    return torch.stack(ys, 1), h


# ----------------------------------------------------------------------------------- block forms
def _scan_block(delta, Bm, Cm, u, h0, A, valid, mode, allow_neg_eigval=False):
    """One block of steps by :func:`linear_scan` in ``mode``; ``valid`` (B, Tb) bool or None."""
    dA = _transition(delta[..., None] * A, allow_neg_eigval)  # (B, Tb, E, N)
    dBu = (delta * u)[..., None] * Bm[:, :, None, :]  # (B, Tb, E, N)
    if valid is not None:
        keep = valid[..., None, None]
        dA = torch.where(keep, dA, torch.ones((), dtype=dA.dtype, device=dA.device))
        dBu = torch.where(keep, dBu, torch.zeros((), dtype=dBu.dtype, device=dBu.device))
    h = linear_scan(dA, dBu, h0, mode=mode)  # (B, Tb, E, N)
    y = torch.einsum("bten,btn->bte", h, Cm)  # (B, Tb, E)
    # A copy, not a view: a view of h[:, -1] would keep the block's whole (B, Tb, E, N) alive.
    return y, h[:, -1].clone()


def scan_blocks(delta, Bm, Cm, u, A, h0, lengths, scan_mode: str, steps_per_block: int | None,
                allow_neg_eigval: bool = False):
    """``y`` (B, T, E) before the skip and gate, and the final state, by time blocks of
    ``steps_per_block`` steps (None: one block) each scanned by :func:`linear_scan` in
    ``scan_mode`` and recomputed in the backward pass; arguments as :func:`selective_scan`'s,
    already checked."""
    B, T, _ = delta.shape
    block = T if steps_per_block is None else steps_per_block
    h = h0 if h0 is not None else delta.new_zeros(B, *A.shape)
    valid = valid_mask(lengths, T)
    recompute = torch.is_grad_enabled()
    ys = []
    for start in range(0, T, block):
        sl = slice(start, start + block)
        args = (delta[:, sl], Bm[:, sl], Cm[:, sl], u[:, sl], h, A, None if valid is None else valid[:, sl], scan_mode,
                allow_neg_eigval)
        if recompute:
            # Keep only the block's (B, Tb, E)-sized inputs; rebuild its (B, Tb, E, N) expanded
            # state in the backward pass instead of storing it.
            y_b, h = checkpoint(_scan_block, *args, use_reentrant=False)
        else:
            y_b, h = _scan_block(*args)
        ys.append(y_b)
    return (ys[0] if len(ys) == 1 else torch.cat(ys, 1)), h


# ----------------------------------------------------------------------------------- fused kernel
def fused_available() -> bool:
    """Whether the compiled selective-scan kernel is usable (compiles it on the first call)."""
    return _native.available()


def resolve_mode(mode: str, device: torch.device) -> str:
    """The form ``mode`` runs as on ``device`` (``auto`` resolved; ``fused`` checked).

    Raises:
        InputError: for an unknown mode, or ``fused`` where the compiled kernel cannot run.
    """
    return _native.resolve_fused(mode, SELECTIVE_SCAN_MODES, device, "chunk")


def _int64s(*values: int):
    return (ctypes.c_int64 * len(values))(*values)


def _rows(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x`` with a contiguous last dim (a copy only when it has not): the kernel takes any strides
    of the leading dims, e.g. the halves of an ``in_proj`` output or the columns of ``x_proj``'s."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


class _FusedSelectiveScan(torch.autograd.Function):
    """``(y, h_T)`` of the selective scan by the compiled kernel, all tensors of one dtype in
    ``CHANNELS_LAST_DTYPES``; the backward recomputes the states from per-chunk checkpoints."""

    @staticmethod
    def forward(ctx, delta, Bm, Cm, u, A, h0, D, z, delta_bias, lengths, K: int, softplus: bool):
        lib = _native.library()
        sfx = CHANNELS_LAST_DTYPES[delta.dtype]
        delta, Bm, Cm, u, z = (_rows(t) for t in (delta, Bm, Cm, u, z))
        A, D, h0, delta_bias = (None if t is None else t.contiguous() for t in (A, D, h0, delta_bias))
        B, T, E = delta.shape
        N = A.shape[1]
        lanes = _native.lanes(delta.dtype)
        parts = _native.channel_parts(B, E, delta.dtype, partial_width=N)
        dims = (B, T, E, N, K, parts, softplus)
        strides = [s for t in (delta, u, Bm, Cm, z if z is not None else delta) for s in t.stride()[:2]]
        y = _workspace.workspace((B, T, E), delta)
        hT = torch.empty(B, E, N, dtype=delta.dtype)
        ckpt = torch.empty(B, -(-T // K), N, -(-E // lanes) * lanes, dtype=delta.dtype) if any(ctx.needs_input_grad) else None
        getattr(lib, f"rnnkit_selective_fwd_{sfx}")(
            _int64s(*dims), _int64s(*strides), ptr(delta), ptr(u), ptr(Bm), ptr(Cm), ptr(A), ptr(D), ptr(z),
            ptr(delta_bias), ptr(h0), ptr(lengths), ptr(y), ptr(hT), ptr(ckpt), torch.get_num_threads())
        if ckpt is not None:
            ctx.save_for_backward(delta, Bm, Cm, u, A, D, z, delta_bias, lengths, ckpt)
            ctx.dims, ctx.strides, ctx.has_h0 = dims, strides, h0 is not None
        return y, hT

    @staticmethod
    @once_differentiable
    def backward(ctx, gy, ghT):
        delta, Bm, Cm, u, A, D, z, delta_bias, lengths, ckpt = ctx.saved_tensors
        lib = _native.library()
        sfx = CHANNELS_LAST_DTYPES[delta.dtype]
        B, T, E, N, _, parts, _ = ctx.dims
        gy, ghT = gy.contiguous(), ghT.contiguous()
        need = ctx.needs_input_grad
        ddelta, du = _workspace.workspace((B, T, E), delta), _workspace.workspace((B, T, E), delta)
        dz = _workspace.workspace((B, T, E), delta) if z is not None and need[7] else None
        dBp, dCp = (torch.empty(parts, B, T, N, dtype=delta.dtype) for _ in range(2))
        dAp = torch.empty(B, E, N, dtype=delta.dtype)
        dDp = torch.empty(B, E, dtype=delta.dtype) if D is not None else None
        dh0 = torch.empty(B, E, N, dtype=delta.dtype) if ctx.has_h0 and need[5] else None
        dbiasp = torch.empty(B, E, dtype=delta.dtype) if delta_bias is not None else None
        getattr(lib, f"rnnkit_selective_bwd_{sfx}")(
            _int64s(*ctx.dims), _int64s(*ctx.strides), ptr(delta), ptr(u), ptr(Bm), ptr(Cm), ptr(A), ptr(D),
            ptr(z), ptr(delta_bias), ptr(lengths), ptr(ckpt), ptr(gy), ptr(ghT), ptr(ddelta), ptr(du), ptr(dBp),
            ptr(dCp), ptr(dAp), ptr(dDp), ptr(dz), ptr(dh0), ptr(dbiasp), torch.get_num_threads())
        dB, dC = (t[0] if parts == 1 else t.sum(0) for t in (dBp, dCp))
        dD, dbias = (None if t is None else t.sum(0) for t in (dDp, dbiasp))
        return ddelta, dB, dC, du, dAp.sum(0), dh0, dD, dz, dbias, None, None, None


def _scan_fused(delta, Bm, Cm, u, A, h0, lengths, D, z, delta_bias, delta_softplus, steps_per_block):
    """The fused form; inputs of other dtypes than the kernel's are computed in fp32 (or the
    widest of them) and the results cast back."""
    tensors = (delta, Bm, Cm, u, A, h0, D, z, delta_bias)
    dtype, work = _native.work_dtype(*tensors)
    delta, Bm, Cm, u, A, h0, D, z, delta_bias = (None if t is None else t.to(work) for t in tensors)
    K = FUSED_CHECKPOINT_STEPS if steps_per_block is None else steps_per_block
    lengths = None if lengths is None else lengths.contiguous()  # read through a raw pointer
    y, h = _FusedSelectiveScan.apply(delta, Bm, Cm, u, A, h0, D, z, delta_bias, lengths, K, delta_softplus)
    return y.to(dtype), h.to(dtype)


# ----------------------------------------------------------------------------------- public entry
def selective_scan(delta, Bm, Cm, u, A, h0=None, *, D=None, z=None, delta_bias=None, delta_softplus: bool = False,
                   lengths=None, mode: str = "auto", steps_per_block: int | None = None, allow_neg_eigval: bool = False):
    """Mamba's selective scan in the form ``mode`` (see the module docstring).

    Args:
        delta: ``(B, T, E)`` step sizes (positive); Bm, Cm: ``(B, T, N)`` input and output maps;
            u: ``(B, T, E)`` inputs; A: ``(E, N)`` state matrix (diagonal per channel);
            h0: ``(B, E, N)`` initial state, zeros if None; D: optional ``(E,)`` skip weights;
            z: optional ``(B, T, E)`` gate input (the output is multiplied by ``SiLU(z)``);
            delta_bias: optional ``(E,)`` added to ``delta``; delta_softplus: the step size is
            ``softplus(delta + delta_bias)`` (Mamba's); lengths: optional ``(B,)`` in ``[1, T]``.
        mode: ``"recurrent"`` (the loop, the definition), ``"parallel"``, ``"chunk"`` (time blocks
            scanned by that :func:`rnnkit.ops.linear_scan` form), ``"fused"`` (the compiled
            kernel) or ``"auto"`` (the default).
        steps_per_block: the block forms run in blocks of this many steps, each recomputed in the
            backward pass under autograd (None: one block); the fused form saves its state every
            this many steps for its backward (None: 64); ignored by ``recurrent``.
        allow_neg_eigval: the transition is ``2 exp(delta A) - 1`` (Grazzi et al. 2025); not taken
            by ``fused`` (``auto`` then runs ``chunk``).

    Returns:
        ``y`` ``(B, T, E)`` with ``y_t = (h_t C_t + D u_t) SiLU(z_t)`` and the final state ``(B, E, N)``.

    Raises:
        InputError: an unknown ``mode``, ``"fused"`` where the compiled kernel is unavailable or
            off the CPU or with ``allow_neg_eigval``, or bad shapes or lengths.

    Example:
        >>> y, h = selective_scan(torch.rand(2, 50, 8), torch.randn(2, 50, 4), torch.randn(2, 50, 4),
        ...                       torch.randn(2, 50, 8), -torch.rand(8, 4))   # y (2, 50, 8), h (2, 8, 4)
    """
    check_choice("mode", mode, SELECTIVE_SCAN_MODES)
    extras = {"D": D, "z": z, "delta_bias": delta_bias, "delta_softplus": delta_softplus,
              "allow_neg_eigval": allow_neg_eigval}
    if mode == "recurrent" or is_empty_batch(delta):
        return selective_scan_recurrent(delta, Bm, Cm, u, A, h0, lengths, **extras)
    lengths = _check_inputs(delta, Bm, Cm, u, A, h0, lengths, **extras)
    if steps_per_block is not None:
        check_positive_int("steps_per_block", steps_per_block)
    if allow_neg_eigval:
        if mode == "fused":
            raise InputError("mode: expected one of ['recurrent', 'parallel', 'chunk', 'auto'] with allow_neg_eigval=True "
                             "(the fused kernel computes exp(delta A) itself), got 'fused'")
        mode = "chunk" if mode == "auto" else mode
    mode = resolve_mode(mode, delta.device)
    if mode == "fused":
        return _scan_fused(delta, Bm, Cm, u, A, h0, lengths, D, z, delta_bias, delta_softplus, steps_per_block)
    y, h = scan_blocks(_step_sizes(delta, delta_bias, delta_softplus), Bm, Cm, u, A, h0, lengths, mode,
                       steps_per_block, allow_neg_eigval)
    return _skip_and_gate(y, u, D, z), h


__all__ = ["FUSED_CHECKPOINT_STEPS", "SELECTIVE_SCAN_MODES", "fused_available", "resolve_mode", "scan_blocks",
           "selective_scan", "selective_scan_recurrent", "selective_scan_step"]
