"""Mamba's selective scan (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
Spaces", Algorithm 2), without the ``D`` skip:

    h_t = exp(delta_t A) ⊙ h_{t-1} + (delta_t u_t) B_t        h_t (E, N) per batch element
    y_t = h_t C_t                                              y_t (E,)

with ``delta_t``, ``u_t`` ``(E,)`` per channel, ``B_t``, ``C_t`` ``(N,)`` shared by the channels and
``A`` ``(E, N)`` (negative for a contraction). One entry, :func:`selective_scan` with ``mode=``:

- ``recurrent``: :func:`selective_scan_recurrent`, the loop over :func:`selective_scan_step`, the
  definition;
- ``parallel``, ``chunk``, ``fused``, ``auto``: the decays ``exp(delta A)`` and inputs
  ``delta u B`` of a block of steps formed at once, ``(B, Tb, E, N)``, and scanned by that form of
  :func:`rnnkit.ops.linear_scan`.

Memory: the expanded ``(B, T, E, N)`` tensors are never formed for the whole sequence when
``steps_per_block`` is given: time runs in blocks of that many steps carrying the state, and under
autograd each block is recomputed in the backward pass (activation checkpointing), so only the
``(B, T, E)``-sized inputs and one ``(B, E, N)`` state per block are kept
(``benchmarks/mamba_memory.py`` measures it).

Padding (``lengths``): steps past a length have decay 1 and input 0, so the state is kept (and
the output there reads the kept state).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from rnnkit.errors import InputError, check_choice, check_lengths, check_positive_int, check_tensor
from rnnkit.ops.padding import freeze_padding, valid_mask
from rnnkit.ops.scan import LINEAR_SCAN_MODES, linear_scan

#: Forms :func:`selective_scan` runs, ``recurrent`` (the definition) first; the others are the
#: :func:`rnnkit.ops.linear_scan` forms of the same names.
SELECTIVE_SCAN_MODES = LINEAR_SCAN_MODES


def _check_inputs(delta, Bm, Cm, u, A, h0, lengths):
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
    return check_lengths(lengths, B, T, delta.device)


def selective_scan_step(delta_t, B_t, C_t, u_t, A, h):
    """One step: ``delta_t``, ``u_t`` (B, E), ``B_t``, ``C_t`` (B, N), ``A`` (E, N), ``h`` (B, E, N)
    -> ``y_t`` (B, E) and the next ``h``."""
    h = _update(delta_t, B_t, u_t, A, h)
    return _read(h, C_t), h


def _update(delta_t, B_t, u_t, A, h):
    return torch.exp(delta_t[..., None] * A) * h + (delta_t * u_t)[..., None] * B_t[:, None, :]  # (B, E, N)


def _read(h, C_t):
    return (h * C_t[:, None, :]).sum(-1)  # (B, E)


def selective_scan_recurrent(delta, Bm, Cm, u, A, h0=None, lengths=None):
    """The loop that defines the selective scan (see the module docstring).

    Args:
        delta: ``(B, T, E)`` step sizes; Bm, Cm: ``(B, T, N)``; u: ``(B, T, E)`` inputs; A: ``(E, N)``;
        h0: ``(B, E, N)`` initial state, zeros if None; lengths: optional ``(B,)`` ints in ``[1, T]``.

    Returns:
        ``y`` ``(B, T, E)`` and the final state ``(B, E, N)`` (at each sequence's last valid step).
    """
    lengths = _check_inputs(delta, Bm, Cm, u, A, h0, lengths)
    h = h0 if h0 is not None else delta.new_zeros(delta.shape[0], *A.shape)
    ys = []
    steps = zip(delta.unbind(1), Bm.unbind(1), Cm.unbind(1), u.unbind(1))
    for t, (delta_t, B_t, C_t, u_t) in enumerate(steps):
        h = freeze_padding(t, lengths, _update(delta_t, B_t, u_t, A, h), h)
        ys.append(_read(h, C_t))
    return torch.stack(ys, 1), h


def _scan_block(delta, Bm, Cm, u, h0, A, valid, mode):
    """One block of steps by :func:`linear_scan` in ``mode``; ``valid`` (B, Tb) bool or None."""
    dA = torch.exp(delta[..., None] * A)  # (B, Tb, E, N)
    dBu = (delta * u)[..., None] * Bm[:, :, None, :]  # (B, Tb, E, N)
    if valid is not None:
        keep = valid[..., None, None]
        dA = torch.where(keep, dA, torch.ones((), dtype=dA.dtype, device=dA.device))
        dBu = torch.where(keep, dBu, torch.zeros((), dtype=dBu.dtype, device=dBu.device))
    h = linear_scan(dA, dBu, h0, mode=mode)  # (B, Tb, E, N)
    y = torch.einsum("bten,btn->bte", h, Cm)  # (B, Tb, E)
    # A copy, not a view: a view of h[:, -1] would keep the block's whole (B, Tb, E, N) alive.
    return y, h[:, -1].clone()


def selective_scan(delta, Bm, Cm, u, A, h0=None, *, lengths=None, mode: str = "auto",
                   steps_per_block: int | None = None):
    """Mamba's selective scan in the form ``mode`` (see the module docstring).

    Args:
        delta: ``(B, T, E)`` step sizes (positive); Bm, Cm: ``(B, T, N)`` input and output maps;
            u: ``(B, T, E)`` inputs; A: ``(E, N)`` state matrix (diagonal per channel);
            h0: ``(B, E, N)`` initial state, zeros if None; lengths: optional ``(B,)`` in ``[1, T]``.
        mode: ``"recurrent"`` (the loop, the definition) or a :func:`rnnkit.ops.linear_scan` form:
            ``"parallel"``, ``"chunk"``, ``"fused"``, ``"auto"`` (the default).
        steps_per_block: the scan forms run in blocks of this many steps, each recomputed in the
            backward pass under autograd (None: one block); ignored by ``recurrent``.

    Returns:
        ``y`` ``(B, T, E)`` with ``y_t = h_t C_t`` and the final state ``(B, E, N)``.

    Raises:
        InputError: an unknown ``mode``, or bad shapes or lengths.

    Example:
        >>> y, h = selective_scan(torch.rand(2, 50, 8), torch.randn(2, 50, 4), torch.randn(2, 50, 4),
        ...                       torch.randn(2, 50, 8), -torch.rand(8, 4))   # y (2, 50, 8), h (2, 8, 4)
    """
    check_choice("mode", mode, SELECTIVE_SCAN_MODES)
    if mode == "recurrent":
        return selective_scan_recurrent(delta, Bm, Cm, u, A, h0, lengths)
    lengths = _check_inputs(delta, Bm, Cm, u, A, h0, lengths)
    B, T, _ = delta.shape
    if steps_per_block is not None:
        check_positive_int("steps_per_block", steps_per_block)
    block = T if steps_per_block is None else steps_per_block
    h = h0 if h0 is not None else delta.new_zeros(B, *A.shape)
    valid = valid_mask(lengths, T)
    recompute = torch.is_grad_enabled()
    ys = []
    for start in range(0, T, block):
        sl = slice(start, start + block)
        args = (delta[:, sl], Bm[:, sl], Cm[:, sl], u[:, sl], h, A, None if valid is None else valid[:, sl], mode)
        if recompute:
            # Keep only the block's (B, Tb, E)-sized inputs; rebuild its (B, Tb, E, N) expanded
            # state in the backward pass instead of storing it.
            y_b, h = checkpoint(_scan_block, *args, use_reentrant=False)
        else:
            y_b, h = _scan_block(*args)
        ys.append(y_b)
    return (ys[0] if len(ys) == 1 else torch.cat(ys, 1)), h
