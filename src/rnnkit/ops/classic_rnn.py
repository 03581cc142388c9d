"""Whole-sequence kernels for the classic cells (Elman, LSTM, GRU) with hand-written backward passes.

Why not autograd through a Python loop: autograd records one small weight-gradient GEMM per time
step for the recurrent matrix, which at D=1024 streams the 16 MiB gradient buffer through memory T
times. These kernels instead keep the per-step backward to one ``(B, G) @ (G, R)`` matmul plus the
gate math, stack the gate gradients, and form every weight gradient with one large matmul at the
end. The input projection ``x @ W_ih^T + b`` is hoisted out of the time loop by the caller (it is a
single batched matmul and autograd differentiates it well), so the kernels take ``xp`` directly.

All tensors here are time-major: ``xp`` is ``(T, B, G)``, which keeps each step's slice contiguous.
``mask`` is ``(T, B, 1)`` bool (True at valid steps) or None; at an invalid step the state is frozen
and the output is zero, exactly as the layers' ``*_recurrent`` reference loops define.

The plain loops in ``rnnkit.layers.{elman,lstm,gru}`` are the specification; the contract tests
compare these kernels against them, gradients included, and run ``gradcheck`` on them in fp64.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _freeze(mask_t: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> None:
    """In place: keep ``old`` where the step is padding (``new`` is a preallocated slot)."""
    if mask_t is not None:
        new.copy_(torch.where(mask_t, new, old))


class _ElmanSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp, h0, w_hh, relu: bool, mask):
        # xp (T, B, H) includes both biases; h0 (B, H); w_hh (H, H)
        T, B, H = xp.shape
        hs = xp.new_empty(T + 1, B, H)  # hs[t + 1] is h_t; hs[0] the initial state
        hs[0] = h0
        w_hh_t = w_hh.t()
        for t in range(T):
            h = hs[t + 1]
            torch.addmm(xp[t], hs[t], w_hh_t, out=h)
            h.relu_() if relu else h.tanh_()
            _freeze(None if mask is None else mask[t], h, hs[t])
        ctx.relu = relu
        ctx.save_for_backward(hs, w_hh, mask)
        return hs[1:].clone(), hs[T].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_last):
        hs, w_hh, mask = ctx.saved_tensors
        T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
        da = hs.new_empty(T, B, H)  # gradient w.r.t. the pre-activation at each step
        dh = dh_last.clone() if dh_last is not None else hs.new_zeros(B, H)
        for t in range(T - 1, -1, -1):
            h = hs[t + 1]
            dr = dh if dy is None else dh + dy[t]
            if ctx.relu:
                torch.mul(dr, h > 0, out=da[t])
            else:
                torch.mul(dr, 1 - h * h, out=da[t])
            dh_prev = da[t] @ w_hh
            if mask is not None:
                da[t].mul_(mask[t])
                dh_prev = torch.where(mask[t], dh_prev, dh)
            dh = dh_prev
        dw_hh = da.reshape(T * B, H).t() @ hs[:-1].reshape(T * B, H)
        return da, dh, dw_hh, None, None


class _GRUSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp, h0, w_hh, b_hh, mask):
        # xp (T, B, 3H) = x W_ih^T + b_ih, gate order r, z, n as torch.nn.GRU; h0 (B, H); w_hh (3H, H)
        T, B, H3 = xp.shape
        H = H3 // 3
        hs = xp.new_empty(T + 1, B, H)
        hs[0] = h0
        rz = xp.new_empty(T, B, 2 * H)  # activated reset and update gates
        ns = xp.new_empty(T, B, H)  # candidate state
        hn = xp.new_empty(T, B, H)  # W_hn h + b_hn, needed for the reset gate's gradient
        w_hh_t = w_hh.t()
        hp = xp.new_empty(B, H3)
        for t in range(T):
            h_prev = hs[t]
            if b_hh is None:
                torch.mm(h_prev, w_hh_t, out=hp)
            else:
                torch.addmm(b_hh, h_prev, w_hh_t, out=hp)
            torch.add(xp[t, :, : 2 * H], hp[:, : 2 * H], out=rz[t]).sigmoid_()
            r, z = rz[t, :, :H], rz[t, :, H:]
            hn[t] = hp[:, 2 * H :]
            n = ns[t]
            torch.addcmul(xp[t, :, 2 * H :], r, hn[t], out=n).tanh_()
            h = hs[t + 1]
            # h = (1 - z) * n + z * h_prev = n + z * (h_prev - n)
            torch.sub(h_prev, n, out=h)
            h.mul_(z).add_(n)
            _freeze(None if mask is None else mask[t], h, h_prev)
        ctx.save_for_backward(hs, rz, ns, hn, w_hh, mask)
        ctx.has_bias = b_hh is not None
        return hs[1:].clone(), hs[T].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_last):
        hs, rz, ns, hn, w_hh, mask = ctx.saved_tensors
        T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
        dxp = hs.new_empty(T, B, 3 * H)  # gradient w.r.t. the pre-activations (r, z, n) on the input side
        dhp = hs.new_empty(T, B, 3 * H)  # ... and on the hidden side (n differs: it is gated by r)
        dh = dh_last.clone() if dh_last is not None else hs.new_zeros(B, H)
        for t in range(T - 1, -1, -1):
            h_prev, n = hs[t], ns[t]
            r, z = rz[t, :, :H], rz[t, :, H:]
            dr_total = dh if dy is None else dh + dy[t]
            dn_pre = dxp[t, :, 2 * H :]
            torch.mul(dr_total, 1 - z, out=dn_pre)
            dn_pre.mul_(1 - n * n)
            # reset gate
            torch.mul(dn_pre, hn[t], out=dxp[t, :, :H])
            dxp[t, :, :H].mul_(r * (1 - r))
            # update gate
            torch.mul(dr_total, h_prev - n, out=dxp[t, :, H : 2 * H])
            dxp[t, :, H : 2 * H].mul_(z * (1 - z))
            dhp[t, :, : 2 * H] = dxp[t, :, : 2 * H]
            torch.mul(dn_pre, r, out=dhp[t, :, 2 * H :])
            dh_prev = torch.addcmul(dhp[t] @ w_hh, dr_total, z)
            if mask is not None:
                dxp[t].mul_(mask[t])
                dhp[t].mul_(mask[t])
                dh_prev = torch.where(mask[t], dh_prev, dh)
            dh = dh_prev
        dhp_flat = dhp.reshape(T * B, 3 * H)
        dw_hh = dhp_flat.t() @ hs[:-1].reshape(T * B, H)
        db_hh = dhp_flat.sum(0) if ctx.has_bias else None
        return dxp, dh, dw_hh, db_hh, None


class _LSTMSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp, h0, c0, w_hh, peephole, w_hr, mask):
        # xp (T, B, 4H) includes both biases, gate order i, f, g, o as torch.nn.LSTM;
        # h0 (B, R) with R = proj size or H; c0 (B, H); w_hh (4H, R); peephole (3, H) rows i, f, o;
        # w_hr (R, H) projection or None.
        T, B, H4 = xp.shape
        H = H4 // 4
        R = h0.shape[1]
        gates = torch.empty_like(xp)  # activated gates
        cs = xp.new_empty(T + 1, B, H)
        cs[0] = c0
        hs = xp.new_empty(T + 1, B, R)
        hs[0] = h0
        tanh_c = xp.new_empty(T, B, H)
        ms = xp.new_empty(T, B, H) if w_hr is not None else None  # pre-projection outputs
        w_hh_t = w_hh.t()
        for t in range(T):
            g, c_prev, c = gates[t], cs[t], cs[t + 1]
            torch.addmm(xp[t], hs[t], w_hh_t, out=g)
            gi, gf, gg, go = g[:, :H], g[:, H : 2 * H], g[:, 2 * H : 3 * H], g[:, 3 * H :]
            if peephole is None:
                g[:, : 2 * H].sigmoid_()
            else:
                gi.addcmul_(peephole[0], c_prev).sigmoid_()
                gf.addcmul_(peephole[1], c_prev).sigmoid_()
            gg.tanh_()
            torch.mul(gf, c_prev, out=c)
            c.addcmul_(gi, gg)
            if peephole is not None:
                go.addcmul_(peephole[2], c)  # the output gate peeks at the new cell (Gers et al. 2002)
            go.sigmoid_()
            torch.tanh(c, out=tanh_c[t])
            if w_hr is None:
                torch.mul(go, tanh_c[t], out=hs[t + 1])
            else:
                torch.mul(go, tanh_c[t], out=ms[t])
                torch.mm(ms[t], w_hr.t(), out=hs[t + 1])
            if mask is not None:
                _freeze(mask[t], c, c_prev)
                _freeze(mask[t], hs[t + 1], hs[t])
        ctx.save_for_backward(gates, cs, hs, tanh_c, ms, w_hh, peephole, w_hr, mask)
        return hs[1:].clone(), hs[T].clone(), cs[T].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_last, dc_last):
        gates, cs, hs, tanh_c, ms, w_hh, peephole, w_hr, mask = ctx.saved_tensors
        T, B, H4 = gates.shape
        H, R = H4 // 4, hs.shape[2]
        dgates = torch.empty_like(gates)  # gradient w.r.t. the gate pre-activations
        dhs = hs.new_empty(T, B, R) if w_hr is not None else None  # gradient w.r.t. each projected output
        dh = dh_last.clone() if dh_last is not None else hs.new_zeros(B, R)
        dc = dc_last.clone() if dc_last is not None else hs.new_zeros(B, H)
        for t in range(T - 1, -1, -1):
            g, c_prev, c, tc = gates[t], cs[t], cs[t + 1], tanh_c[t]
            gi, gf, gg, go = g[:, :H], g[:, H : 2 * H], g[:, 2 * H : 3 * H], g[:, 3 * H :]
            dgi, dgf, dgg, dgo = (dgates[t, :, k * H : (k + 1) * H] for k in range(4))
            dr = dh if dy is None else dh + dy[t]
            if w_hr is not None:
                dhs[t] = dr
                dm = dr @ w_hr
            else:
                dm = dr
            torch.mul(dm, tc, out=dgo)
            dgo.mul_(go * (1 - go))
            dct = torch.addcmul(dc, dm * go, 1 - tc * tc)
            if peephole is not None:
                dct.addcmul_(dgo, peephole[2])
            torch.mul(dct, gg, out=dgi)
            dgi.mul_(gi * (1 - gi))
            torch.mul(dct, c_prev, out=dgf)
            dgf.mul_(gf * (1 - gf))
            torch.mul(dct, gi, out=dgg)
            dgg.mul_(1 - gg * gg)
            dc_prev = dct.mul_(gf)
            if peephole is not None:
                dc_prev.addcmul_(dgi, peephole[0]).addcmul_(dgf, peephole[1])
            if mask is not None:
                dgates[t].mul_(mask[t])
                if dhs is not None:
                    dhs[t].mul_(mask[t])
                dh = torch.where(mask[t], dgates[t] @ w_hh, dh)
                dc = torch.where(mask[t], dc_prev, dc)
            else:
                dh = dgates[t] @ w_hh
                dc = dc_prev
        dflat = dgates.reshape(T * B, H4)
        dw_hh = dflat.t() @ hs[:-1].reshape(T * B, R)
        dpeephole = None
        if peephole is not None:
            dpeephole = torch.stack(
                [
                    (dgates[:, :, :H] * cs[:-1]).sum((0, 1)),
                    (dgates[:, :, H : 2 * H] * cs[:-1]).sum((0, 1)),
                    (dgates[:, :, 3 * H :] * cs[1:]).sum((0, 1)),
                ]
            )
        dw_hr = None
        if w_hr is not None:
            dw_hr = dhs.reshape(T * B, R).t() @ ms.reshape(T * B, H)
        return dgates, dh, dc, dw_hh, dpeephole, dw_hr, None


def elman_sequence(xp, h0, w_hh, relu: bool = False, mask=None):
    """Elman recurrence h_t = act(xp_t + h_{t-1} W_hh^T) over a whole sequence.

    Args:
        xp: ``(T, B, H)`` input projection including both biases.
        h0: ``(B, H)`` initial state.
        w_hh: ``(H, H)`` recurrent weight.
        relu: ReLU instead of tanh.
        mask: optional ``(T, B, 1)`` bool, True at valid steps.

    Returns:
        ``y`` ``(T, B, H)`` and the final state ``(B, H)``.
    """
    return _ElmanSequence.apply(xp, h0, w_hh, relu, mask)


def gru_sequence(xp, h0, w_hh, b_hh=None, mask=None):
    """GRU recurrence (torch.nn.GRU's formulation) over a whole sequence.

    Args:
        xp: ``(T, B, 3H)`` input projection ``x W_ih^T + b_ih``, gates ordered r, z, n.
        h0: ``(B, H)``; w_hh: ``(3H, H)``; b_hh: ``(3H,)`` or None; mask: ``(T, B, 1)`` bool or None.

    Returns:
        ``y`` ``(T, B, H)`` and the final state ``(B, H)``.
    """
    return _GRUSequence.apply(xp, h0, w_hh, b_hh, mask)


def lstm_sequence(xp, h0, c0, w_hh, peephole=None, w_hr=None, mask=None):
    """LSTM recurrence (forget gate; optional peepholes and projection) over a whole sequence.

    Args:
        xp: ``(T, B, 4H)`` input projection including both biases, gates ordered i, f, g, o.
        h0: ``(B, R)`` initial output (R = projection size, or H).
        c0: ``(B, H)`` initial cell.
        w_hh: ``(4H, R)``; peephole: ``(3, H)`` (rows i, f, o) or None; w_hr: ``(R, H)`` or None.
        mask: ``(T, B, 1)`` bool or None.

    Returns:
        ``y`` ``(T, B, R)``, final ``h`` ``(B, R)`` and final ``c`` ``(B, H)``.
    """
    return _LSTMSequence.apply(xp, h0, c0, w_hh, peephole, w_hr, mask)
