"""The classic cells (Elman, LSTM, GRU): their definitions and whole-sequence kernels.

One entry per cell, :func:`elman`, :func:`lstm` and :func:`gru`, each with ``mode=``:

- ``"recurrent"``: :func:`elman_recurrent`, :func:`lstm_recurrent`, :func:`gru_recurrent`, plain
  loops over the cells (:func:`elman_cell`, :func:`lstm_cell`, :func:`gru_cell`) that autograd
  differentiates step by step. The definition.
- ``"fused"``: the input projection hoisted out of the loop, then :func:`elman_sequence`,
  :func:`lstm_sequence` or :func:`gru_sequence`, whole-sequence kernels with hand-written backward
  passes (below).

Why not autograd through a Python loop: autograd records one small weight-gradient GEMM per time
step for the recurrent matrix, which at D=1024 streams the 16 MiB gradient buffer through memory T
times. These kernels instead keep the per-step backward to one ``(B, G) @ (G, R)`` matmul plus the
gate math, stack the gate gradients, and form every weight gradient with one large matmul at the
end. The input projection ``x @ W_ih^T + b`` is hoisted out of the time loop by the caller (it is a
single batched matmul and autograd differentiates it well), so the kernels take ``xp`` directly.

Why they look the way they do: at the widths these layers run at on CPU (D = 256..1024, B ~ 16), an
elementwise op on a ``(B, H)`` slice costs a few microseconds of dispatch, as much as its arithmetic,
so the time loops issue as few ops as possible:

- buffers are preallocated; ops write with ``out=`` or in place into views made with one ``unbind``
  per block of steps (made per block, not per sequence, so that thousands of views do not outlive
  Python's young GC generations and trigger full collections, each costly with torch imported);
- the backward never differentiates op by op: whatever does not depend on the incoming gradient
  (activation derivatives, peephole terms, the padding mask) is folded, a block of steps at a time
  with large ops, into coefficients, so that a backward step is one broadcast multiply per group of
  gates and the ``(B, G) @ (G, R)`` matmul, whose bias slot adds ``dy``. Gate gradients land where
  the next op reads them, e.g. the LSTM's row ``[dc_prev, di, df, dg, do]`` serves both the matmul
  (``[di..do]``, also ``d xp``) and the next step (``dc_prev``);
- the per-step matmul gets its weight copied once per call into the layout MKL's 16-row GEMM runs
  fastest on, which depends on whether the weight fits in cache (``_step_matmul``);
- padding costs the GRU nothing (a +inf update-gate bias makes ``z = 1``, which copies the state
  exactly and zeroes every gate gradient there) and the others one ``torch.where`` per step.

All tensors here are time-major: ``xp`` is ``(T, B, G)``, which keeps each step's slice contiguous.
``mask`` is ``(T, B, 1)`` bool (True at valid steps) or None; at an invalid step the state is frozen
(and the output is that frozen state; the layers zero it), exactly as the ``*_recurrent``
reference loops define.

The ``*_recurrent`` loops are the specification; the op tests and the layers' contract tests
compare these kernels against them, gradients included, and run ``gradcheck`` on them in fp64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from rnnkit.errors import InputError, check_choice, check_lengths, check_tensor
from rnnkit.ops._forms import is_empty_batch
from rnnkit.ops._workspace import into
from rnnkit.ops.padding import freeze_padding, valid_mask

#: Forms the classic entries run, ``recurrent`` (the definition) first.
CLASSIC_MODES = ("recurrent", "fused")

#: Steps per block of the forward loops (bounds how many views are alive at once).
_STEPS = 32
#: Target size of one block of backward coefficients: big enough to amortise the ops that compute
#: them, small enough to still be in cache when the time loop reads them.
_BLOCK_BYTES = 2 << 20
#: Above this size, a step's matmul runs with the weight as the wide operand (see _step_matmul).
_WIDE_WEIGHT_BYTES = 6 << 20


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _rows(weight: torch.Tensor) -> torch.Tensor:
    """``weight^T`` laid out row-major, for ``h @ W^T`` as a plain (NN) GEMM."""
    return weight.t().contiguous()


def _step_matmul(m: torch.Tensor, batch: int):
    """``f(out, bias, a)`` computing ``out = bias + a @ m`` for one step's ``a`` ``(B, K)``, ``m`` ``(K, N)``.

    ``out`` may be ``bias`` (accumulate in place). A weight that fits in cache goes to MKL row-major
    as is (an NN GEMM, faster than the GEMM with the transposed view). A weight too large for the
    cache is multiplied the other way round, ``(m^T a^T)^T``, so that it is the GEMM's tall operand,
    which streams it once; below the threshold that order is the slower one, hence
    ``_WIDE_WEIGHT_BYTES`` (both orders are timed by ``benchmarks/classic_speed.py``). The two
    transposing copies it costs are ``(B, K)`` and ``(B, N)``, small.
    """
    K, N = m.shape
    if m.numel() * m.element_size() <= _WIDE_WEIGHT_BYTES:
        m = m.contiguous()

        def row_major(out, bias, a):
            return torch.addmm(bias, a, m, out=out)

        return row_major
    mt = m.t().contiguous()  # (N, K)
    at, prod = m.new_empty(K, batch), m.new_empty(N, batch)

    def weight_major(out, bias, a):
        at.copy_(a.t())
        torch.mm(mt, at, out=prod)
        return torch.add(bias, prod.t(), out=out)

    return weight_major


def _block_size(T: int, step_bytes: int) -> int:
    """Steps per block of backward coefficients that take ``step_bytes`` per step."""
    return max(1, min(T, _BLOCK_BYTES // step_bytes))


def _blocks_backward(T: int, size: int) -> list[tuple[int, int]]:
    """``(t0, t1)`` blocks of ``size`` steps covering ``0..T-1``, last block first."""
    return [(max(t1 - size, 0), t1) for t1 in range(T, 0, -size)]


def _per_step(buf: torch.Tensor, t0: int, t1: int, save: bool):
    """Views of steps ``t0..t1-1`` of ``buf``, or ``t1 - t0`` views of its single scratch slot."""
    return buf[t0:t1].unbind(0) if save else buf.expand(t1 - t0, *buf.shape[1:]).unbind(0)


def _grad_y(grad_y: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_zeros(like.shape) if grad_y is None else grad_y


def _last_grad(grad_y: torch.Tensor, grad_last: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """Total gradient w.r.t. the last output: through ``y`` and through the final state."""
    if grad_last is None:
        return out.copy_(grad_y[-1])
    return torch.add(grad_y[-1], grad_last, out=out)


# ------------------------------------------------------------------------------------------ Elman
def _elman_loop(xp, h0, w_hh, relu: bool, mask):
    """Forward recurrence; returns ``hs`` ``(T + 1, B, H)`` with ``hs[0] = h0``."""
    T, B, H = xp.shape
    hs = xp.new_empty(T + 1, B, H)
    hs[0] = h0
    matmul = _step_matmul(w_hh.t(), B)
    act = torch.relu_ if relu else torch.tanh_
    new = xp.new_empty(B, H) if mask is not None else None
    for t0 in range(0, T, _STEPS):
        t1 = min(t0 + _STEPS, T)
        x_, h_ = xp[t0:t1].unbind(0), hs[t0 : t1 + 1].unbind(0)
        if mask is None:
            for j in range(t1 - t0):
                act(matmul(h_[j + 1], x_[j], h_[j]))
        else:
            valid_ = mask[t0:t1].unbind(0)
            for j in range(t1 - t0):
                act(matmul(new, x_[j], h_[j]))
                torch.where(valid_[j], new, h_[j], out=h_[j + 1])
    return hs


class _ElmanSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp, h0, w_hh, relu: bool, mask):
        # xp (T, B, H) includes both biases; h0 (B, H); w_hh (H, H)
        hs = _elman_loop(xp, h0, w_hh, relu, mask)
        ctx.relu = relu
        ctx.save_for_backward(hs, w_hh, mask)
        return hs[1:].clone(), hs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_last):
        hs, w_hh, mask = ctx.saved_tensors
        T, B, H = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
        h = hs[1:]
        dy = _grad_y(dy, h)
        # da_t = dh_t k_t with k = act'(pre), for every step at once; 0 at padding, where h_t is
        # copied, not computed (the copy passes dh_t on to h_{t-1}: `keep`).
        k = (h > 0).to(h.dtype) if ctx.relu else torch.addcmul(h.new_ones(()), h, h, value=-1)
        keep = None
        if mask is not None:
            k.mul_(mask)
            keep = (~mask).to(h.dtype)  # (T, B, 1)
        da = torch.empty_like(h)  # gradient w.r.t. each step's pre-activation; also d xp
        pair = h.new_empty(2, B, H)  # the total gradient w.r.t. h_t, two buffers taking turns
        dh = _last_grad(dy, dh_last, pair[(T - 1) % 2])  # dh_t lives in pair[t % 2]
        matmul = _step_matmul(w_hh, B)
        for t0, t1 in _blocks_backward(T, _STEPS):
            lo = max(t0 - 1, 0)
            da_, k_, dy_ = da[t0:t1].unbind(0), k[t0:t1].unbind(0), dy[lo:t1].unbind(0)
            keep_ = keep[t0:t1].unbind(0) if keep is not None else None
            for t in range(t1 - 1, t0 - 1, -1):
                j = t - t0
                torch.mul(dh, k_[j], out=da_[j])
                if t > 0:
                    nxt = matmul(pair[(t - 1) % 2], dy_[t - 1 - lo], da_[j])
                    if keep_ is not None:
                        nxt.addcmul_(dh, keep_[j])
                    dh = nxt
        dh0 = da[0] @ w_hh
        if keep is not None:
            dh0.addcmul_(dh, keep[0])
        dw_hh = da.reshape(T * B, H).t() @ hs[:-1].reshape(T * B, H)
        return da, dh0, dw_hh, None, None


# ------------------------------------------------------------------------------------------- GRU
def _gru_loop(xp, h0, w_hh, b_hh, mask, save: bool):
    """Forward recurrence.

    Returns ``hs`` ``(T + 1, B, H)`` (``hs[0] = h0``), ``a`` ``(T, B, 3H)`` holding ``[r, z, W_hn h +
    b_hn]`` per step, and ``ns`` the candidates ``n``: ``(T, B, H)`` when ``save``, else scratch.
    """
    T, B, H3 = xp.shape
    H = H3 // 3
    if mask is not None:
        xp = xp.masked_fill(~mask, 0)  # padding may hold anything; the z = 1 freeze needs finite n
    # Bias of the per-step matmul, which then runs in place: r and z take their whole input there;
    # n's input half stays out because r gates only the hidden half.
    a = xp.new_empty(T, B, H3)
    if b_hh is None:
        a[..., : 2 * H] = xp[..., : 2 * H]
        a[..., 2 * H :] = 0
    else:
        into(torch.add, xp[..., : 2 * H], b_hh[: 2 * H], out=a[..., : 2 * H])
        a[..., 2 * H :] = b_hh[2 * H :]
    if mask is not None:
        # z = sigmoid(+inf) = 1 exactly, and lerp(n, h, 1) == h exactly (lerp computes
        # end - (end - start)(1 - weight) for weight >= 0.5): padding copies the state.
        a[..., H : 2 * H].masked_fill_(~mask, float("inf"))
    hs = xp.new_empty(T + 1, B, H)
    hs[0] = h0
    ns = xp.new_empty(T if save else 1, B, H)
    matmul = _step_matmul(w_hh.t(), B)
    for t0 in range(0, T, _STEPS):
        t1 = min(t0 + _STEPS, T)
        blk = a[t0:t1]
        a_, rz_, r_ = blk.unbind(0), blk[..., : 2 * H].unbind(0), blk[..., :H].unbind(0)
        z_, hn_ = blk[..., H : 2 * H].unbind(0), blk[..., 2 * H :].unbind(0)
        xn_, h_, n_ = xp[t0:t1, :, 2 * H :].unbind(0), hs[t0 : t1 + 1].unbind(0), _per_step(ns, t0, t1, save)
        for j in range(t1 - t0):
            matmul(a_[j], a_[j], h_[j])
            rz_[j].sigmoid_()
            torch.addcmul(xn_[j], r_[j], hn_[j], out=n_[j]).tanh_()
            torch.lerp(n_[j], h_[j], z_[j], out=h_[j + 1])  # (1 - z) n + z h
    return hs, a, ns


def _gru_coefficients(k, a, n, h_prev) -> None:
    """Fill ``k`` ``(T', B, 3, H)`` with what multiplies dh_t in ``[d r_pre, d z_pre, d hn]``.

    With h_t = n + z (h_{t-1} - n) and kn = (1 - z)(1 - n^2) (so that d n_pre = dh kn):
    d hn = dh kn r,  d r_pre = dh kn r hn (1 - r),  d z_pre = dh (h_{t-1} - n) z (1 - z); the
    direct path is d h_{t-1} = dh z. At padding z = 1 exactly, so all three are 0 there.
    """
    H = n.shape[-1]
    r, z, hn = a[..., :H], a[..., H : 2 * H], a[..., 2 * H :]
    kr, kz, khn = k.unbind(2)
    # x - x y == x (1 - y): written in place, without a temporary
    into(torch.addcmul, n.new_ones(()), n, n, value=-1, out=khn)
    khn.addcmul_(khn, z, value=-1).mul_(r)
    into(torch.mul, khn, hn, out=kr).addcmul_(kr, r, value=-1)
    into(torch.sub, h_prev, n, out=kz).mul_(z).addcmul_(kz, z, value=-1)


class _GRUSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp, h0, w_hh, b_hh, mask):
        # xp (T, B, 3H) = x W_ih^T + b_ih, gate order r, z, n as torch.nn.GRU; h0 (B, H); w_hh (3H, H)
        hs, a, ns = _gru_loop(xp, h0, w_hh, b_hh, mask, save=True)
        ctx.save_for_backward(hs, a, ns, w_hh)
        ctx.has_bias = b_hh is not None
        return hs[1:].clone(), hs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_last):
        hs, a, ns, w_hh = ctx.saved_tensors
        T, B, H = ns.shape
        z = a[..., H : 2 * H]
        dy = _grad_y(dy, ns)
        dhs = ns.new_empty(T, B, H)  # total gradient w.r.t. each h_t
        _last_grad(dy, dh_last, dhs[-1])
        g = a.new_empty(T, B, 3 * H)  # per step [d r_pre, d z_pre, d hn]; turned into d xp at the end
        size = _block_size(T, 3 * B * H * a.element_size())
        coef = a.new_empty(size, B, 3, H)
        tmp = a.new_empty(B, H)
        matmul = _step_matmul(w_hh, B)
        for t0, t1 in _blocks_backward(T, size):
            _gru_coefficients(coef[: t1 - t0], a[t0:t1], ns[t0:t1], hs[t0:t1])
            lo = max(t0 - 1, 0)
            g_, g3_ = g[t0:t1].unbind(0), g[t0:t1].unflatten(-1, (3, H)).unbind(0)
            k_, z_ = coef.unbind(0), z[t0:t1].unbind(0)
            dh_, dhu_, dy_ = dhs[lo:t1].unbind(0), dhs[t0:t1].unsqueeze(2).unbind(0), dy[lo:t1].unbind(0)
            for t in range(t1 - 1, t0 - 1, -1):
                j = t - t0
                torch.mul(dhu_[j], k_[j], out=g3_[j])
                if t > 0:
                    # dh_{t-1} = dy_{t-1} + dh_t z_t + [d r_pre, d z_pre, d hn] W_hh
                    torch.addcmul(dy_[t - 1 - lo], dh_[t - lo], z_[j], out=tmp)
                    matmul(dh_[t - 1 - lo], tmp, g_[j])
        dh0 = torch.addmm(dhs[0] * z[0], g[0], w_hh)
        flat = g.view(T * B, 3 * H)
        dw_hh = flat.t() @ hs[:-1].reshape(T * B, H)
        db_hh = flat.sum(0) if ctx.has_bias else None
        # n's input half is not gated by r: its gradient is dh kn, written over d hn, which only
        # the weight gradients above needed.
        dn = g[..., 2 * H :]
        into(torch.addcmul, ns.new_ones(()), ns, ns, value=-1, out=dn)
        dn.addcmul_(dn, z, value=-1).mul_(dhs)
        return g, dh0, dw_hh, db_hh, None


# ------------------------------------------------------------------------------------------ LSTM
def _lstm_loop(xp, h0, c0, w_hh, peephole, w_hr, mask, save: bool):
    """Forward recurrence.

    Returns ``s`` ``(T + 1, B, R + H)`` holding ``[h_t, c_t]`` (``s[0]`` the initial state), the
    activated gates ``(T, B, 4H)``, ``tanh(c_t)`` ``(T, B, H)`` and, with a projection, the
    unprojected outputs ``(T, B, H)``; without ``save`` the last three are one step of scratch.
    """
    T, B, H4 = xp.shape
    H, R = H4 // 4, h0.shape[1]
    # h and c side by side, so that one torch.where freezes both at a padding step
    s = xp.new_empty(T + 1, B, R + H)
    s[0, :, :R] = h0
    s[0, :, R:] = c0
    # The per-step matmul accumulates in place into a copy of xp, made with one large op when the
    # gates are kept for the backward (cheaper than copying a bias slot at every step), else a step
    # at a time into one slot of scratch that stays in cache. In fp32/fp64 the copy also doubles
    # g's pre-activation (as does W_hh^T below) so that one sigmoid over the contiguous row
    # activates all four gates, with tanh(x) = 2 sigmoid(2x) - 1 (absolute error ~1 ulp of 1; too
    # coarse in bf16/fp16).
    fold = xp.element_size() >= 4
    steps = T if save else 1
    gates = xp.new_empty(steps, B, H4)
    scale = xp.new_ones(H4)
    if fold:
        scale[2 * H : 3 * H] = 2
        minus_one = xp.new_full((), -1)
    matmul = _step_matmul(w_hh.t() * scale, B)
    if save:
        torch.mul(xp, scale, out=gates)
    tanh_c = xp.new_empty(steps, B, H)
    ms = xp.new_empty(steps, B, H) if w_hr is not None else None
    w_hr_t = _rows(w_hr) if w_hr is not None else None
    if peephole is not None:
        p_if, p_o = peephole[:2], peephole[2]  # (2, H), (H,)
    if mask is not None:
        new = xp.new_empty(B, R + H)
        new_h, new_c = new[:, :R], new[:, R:]
    for t0 in range(0, T, _STEPS):
        t1 = min(t0 + _STEPS, T)
        s_, h_, c_ = s[t0 : t1 + 1].unbind(0), s[t0 : t1 + 1, :, :R].unbind(0), s[t0 : t1 + 1, :, R:].unbind(0)
        g = gates[t0:t1] if save else gates.expand(t1 - t0, B, H4)
        x_ = xp[t0:t1].unbind(0)
        g_, if_, gi_ = g.unbind(0), g[..., : 2 * H].unbind(0), g[..., :H].unbind(0)
        gf_, gg_, go_ = g[..., H : 2 * H].unbind(0), g[..., 2 * H : 3 * H].unbind(0), g[..., 3 * H :].unbind(0)
        sig_ = g_ if peephole is None else g[..., : 3 * H].unbind(0)  # o waits for its peephole
        tc_ = _per_step(tanh_c, t0, t1, save)
        if w_hr is not None:
            m_ = _per_step(ms, t0, t1, save)
        if peephole is not None:
            if2_ = g[..., : 2 * H].unflatten(-1, (2, H)).unbind(0)  # (B, 2, H)
            cu_ = s[t0:t1, :, R:].unsqueeze(2).unbind(0)  # (B, 1, H)
        if mask is not None:
            valid_ = mask[t0:t1].unbind(0)
        for j in range(t1 - t0):
            c, h = (c_[j + 1], h_[j + 1]) if mask is None else (new_c, new_h)
            if not save:
                torch.mul(x_[j], scale, out=g_[j])
            matmul(g_[j], g_[j], h_[j])
            if peephole is not None:
                if2_[j].addcmul_(p_if, cu_[j])
            if fold:
                sig_[j].sigmoid_()
                torch.add(minus_one, gg_[j], alpha=2, out=gg_[j])
            else:
                if_[j].sigmoid_()
                gg_[j].tanh_()
                if peephole is None:
                    go_[j].sigmoid_()
            torch.mul(gf_[j], c_[j], out=c).addcmul_(gi_[j], gg_[j])
            if peephole is not None:
                go_[j].addcmul_(p_o, c).sigmoid_()  # the output gate peeks at the new cell (Gers et al. 2002)
            torch.tanh(c, out=tc_[j])
            if w_hr is None:
                torch.mul(go_[j], tc_[j], out=h)
            else:
                torch.mm(torch.mul(go_[j], tc_[j], out=m_[j]), w_hr_t, out=h)
            if mask is not None:
                torch.where(valid_[j], new, s_[j], out=s_[j + 1])
    return s, gates, tanh_c, ms


def _lstm_coefficients(k, gates, cs, tc, peephole, mask) -> None:
    """Fill ``k`` ``(T', B, 6, H)`` with what the gradients of a step are multiples of.

    With dm the gradient w.r.t. the unprojected output m_t = o tanh(c_t), dc the cell gradient
    from step t + 1 and dct = dc + dm A_c the total one w.r.t. c_t:
        d o_pre = dm A_o,   A_o = tanh(c) o (1 - o),   A_c = o (1 - tanh(c)^2) + A_o p_o,
        [dc_prev, d i_pre, d f_pre, d g_pre] = dct [F, A_i, A_f, A_g],
        A_i = g i (1 - i),  A_f = c_{t-1} f (1 - f),  A_g = i (1 - g^2),  F = f + A_i p_i + A_f p_f.
    ``k[:, :, j]`` holds A_o, A_c, F, A_i, A_f, A_g. At padding the state is copied instead: every
    A is 0 and F is 1 (the loop passes dh through itself).
    """
    H = tc.shape[-1]
    i, f, g, o = gates.unflatten(-1, (4, H)).unbind(-2)
    a_o, a_c, f_, a_i, a_f, a_g = k.unbind(2)
    # x - x y == x (1 - y): written in place, without a temporary
    torch.mul(tc, o, out=a_o).addcmul_(a_o, o, value=-1)
    torch.addcmul(o, torch.mul(tc, tc, out=a_c), o, value=-1, out=a_c)
    torch.mul(g, i, out=a_i).addcmul_(a_i, i, value=-1)
    torch.mul(cs[:-1], f, out=a_f).addcmul_(a_f, f, value=-1)
    torch.addcmul(i, torch.mul(g, g, out=a_g), i, value=-1, out=a_g)
    f_.copy_(f)
    if peephole is not None:
        a_c.addcmul_(a_o, peephole[2])
        f_.addcmul_(a_i, peephole[0]).addcmul_(a_f, peephole[1])
    if mask is not None:
        invalid = ~mask  # (T', B, 1)
        k.masked_fill_(invalid.unsqueeze(-1), 0)
        f_.masked_fill_(invalid, 1)


def _peephole_grad(dgates, cs) -> torch.Tensor:
    """``(3, H)``: sums over steps and batch of d i_pre c_{t-1}, d f_pre c_{t-1} and d o_pre c_t.

    Chunked over time so that the products are small temporaries instead of ``(T, B, H)`` ones.
    """
    T, B, H4 = dgates.shape
    H = H4 // 4
    out = dgates.new_zeros(3, H)
    size = _block_size(T, 3 * B * H * dgates.element_size())
    tmp = dgates.new_empty(size, B, 3, H)
    for t0 in range(0, T, size):
        t1 = min(t0 + size, T)
        d = dgates[t0:t1].unflatten(-1, (4, H))  # (T', B, 4, H)
        p = tmp[: t1 - t0]
        torch.mul(d[:, :, :2], cs[t0:t1].unsqueeze(2), out=p[:, :, :2])
        torch.mul(d[:, :, 3], cs[t0 + 1 : t1 + 1], out=p[:, :, 2])
        out.add_(p.sum((0, 1)))
    return out


class _LSTMSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xp, h0, c0, w_hh, peephole, w_hr, mask):
        # xp (T, B, 4H) includes both biases, gate order i, f, g, o as torch.nn.LSTM;
        # h0 (B, R) with R = proj size or H; c0 (B, H); w_hh (4H, R); peephole (3, H) rows i, f, o;
        # w_hr (R, H) projection or None.
        s, gates, tanh_c, ms = _lstm_loop(xp, h0, c0, w_hh, peephole, w_hr, mask, save=True)
        R = h0.shape[1]
        ctx.save_for_backward(s, gates, tanh_c, ms, w_hh, peephole, w_hr, mask)
        ctx.proj_size = R
        y = s[1:, :, :R].clone(memory_format=torch.contiguous_format)
        return y, s[-1, :, :R].clone(), s[-1, :, R:].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_last, dc_last):
        s, gates, tanh_c, ms, w_hh, peephole, w_hr, mask = ctx.saved_tensors
        T, B, H4 = gates.shape
        H, R = H4 // 4, ctx.proj_size
        hs, cs = s[..., :R], s[..., R:]  # (T + 1, B, R), (T + 1, B, H)
        dy = _grad_y(dy, hs[1:])
        # The total gradient w.r.t. each h_t: all kept when the projection's weight gradient needs
        # them, otherwise two buffers take turns.
        dhs = gates.new_empty(T if w_hr is not None else 2, B, R)
        dh = _last_grad(dy, dh_last, dhs[-1] if w_hr is not None else dhs[(T - 1) % 2])  # else dh_t in dhs[t % 2]
        dc = dc_last if dc_last is not None else gates.new_zeros(B, H)
        # Per step [dc_prev, d i_pre, d f_pre, d g_pre, d o_pre]: the last four are the matmul's
        # operand and d xp, the first is the next (earlier) step's cell gradient.
        row = gates.new_empty(T, B, 5 * H)
        dgates = row[..., H:]  # (T, B, 4H) gate order i, f, g, o
        size = _block_size(T, 6 * B * H * gates.element_size())
        coef = gates.new_empty(size, B, 6, H)
        ao_, ac_, k4_ = coef[:, :, 0].unbind(0), coef[:, :, 1].unbind(0), coef[:, :, 2:].unbind(0)
        dct = gates.new_empty(B, H)  # total gradient w.r.t. c_t
        dctu = dct.unsqueeze(1)
        dm = gates.new_empty(B, H) if w_hr is not None else None
        keep = (~mask).to(gates.dtype) if mask is not None else None  # (T, B, 1)
        matmul = _step_matmul(w_hh, B)
        for t0, t1 in _blocks_backward(T, size):
            _lstm_coefficients(
                coef[: t1 - t0], gates[t0:t1], cs[t0 : t1 + 1], tanh_c[t0:t1], peephole,
                mask[t0:t1] if mask is not None else None,
            )
            lo = max(t0 - 1, 0)
            blk = row[t0:t1]
            dc_, do_, dg_ = blk[..., :H].unbind(0), blk[..., 4 * H :].unbind(0), blk[..., H:].unbind(0)
            fifg_ = blk[..., : 4 * H].unflatten(-1, (4, H)).unbind(0)  # (B, 4, H)
            dy_ = dy[lo:t1].unbind(0)
            dh_ = dhs[lo:t1].unbind(0) if w_hr is not None else None
            keep_ = keep[t0:t1].unbind(0) if keep is not None else None
            for t in range(t1 - 1, t0 - 1, -1):
                j = t - t0
                dm_t = torch.mm(dh, w_hr, out=dm) if w_hr is not None else dh  # d (o tanh c)
                torch.addcmul(dc, dm_t, ac_[j], out=dct)
                torch.mul(dm_t, ao_[j], out=do_[j])
                torch.mul(dctu, k4_[j], out=fifg_[j])
                dc = dc_[j]
                if t > 0:
                    out = dh_[t - 1 - lo] if dh_ is not None else dhs[(t - 1) % 2]
                    nxt = matmul(out, dy_[t - 1 - lo], dg_[j])
                    if keep_ is not None:
                        nxt.addcmul_(dh, keep_[j])  # h was copied through padding
                    dh = nxt
        dh0 = dgates[0] @ w_hh
        if keep is not None:
            dh0.addcmul_(dh, keep[0])
        dc0 = dc.clone()
        flat = dgates.reshape(T * B, H4)
        dw_hh = flat.t() @ hs[:-1].reshape(T * B, R)
        dpeephole = _peephole_grad(dgates, cs) if peephole is not None else None
        dw_hr = None
        if w_hr is not None:
            if mask is not None:
                dhs.mul_(mask)  # a frozen output was copied, not projected
            dw_hr = dhs.reshape(T * B, R).t() @ ms.reshape(T * B, H)
        return dgates, dh0, dc0, dw_hh, dpeephole, dw_hr, None


# ------------------------------------------------------------------------------------ public ops
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

    Example:
        >>> y, h = elman_sequence(torch.randn(10, 4, 32), torch.zeros(4, 32), torch.randn(32, 32) / 8)
    """
    if _needs_grad(xp, h0, w_hh):
        return _ElmanSequence.apply(xp, h0, w_hh, relu, mask)
    hs = _elman_loop(xp, h0, w_hh, relu, mask)
    return hs[1:], hs[-1].clone()


def gru_sequence(xp, h0, w_hh, b_hh=None, mask=None):
    """GRU recurrence (torch.nn.GRU's formulation) over a whole sequence.

    Args:
        xp: ``(T, B, 3H)`` input projection ``x W_ih^T + b_ih``, gates ordered r, z, n.
        h0: ``(B, H)``; w_hh: ``(3H, H)``; b_hh: ``(3H,)`` or None; mask: ``(T, B, 1)`` bool or None.

    Returns:
        ``y`` ``(T, B, H)`` and the final state ``(B, H)``.

    Example:
        >>> y, h = gru_sequence(torch.randn(10, 4, 96), torch.zeros(4, 32), torch.randn(96, 32) / 8)
    """
    if _needs_grad(xp, h0, w_hh, b_hh):
        return _GRUSequence.apply(xp, h0, w_hh, b_hh, mask)
    hs, _, _ = _gru_loop(xp, h0, w_hh, b_hh, mask, save=False)
    return hs[1:], hs[-1].clone()


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

    Example:
        >>> y, h, c = lstm_sequence(torch.randn(10, 4, 128), torch.zeros(4, 32), torch.zeros(4, 32),
        ...                         torch.randn(128, 32) / 8)
    """
    if _needs_grad(xp, h0, c0, w_hh, peephole, w_hr):
        return _LSTMSequence.apply(xp, h0, c0, w_hh, peephole, w_hr, mask)
    s, _, _, _ = _lstm_loop(xp, h0, c0, w_hh, peephole, w_hr, mask, save=False)
    R = h0.shape[1]
    return s[1:, :, :R], s[-1, :, :R].clone(), s[-1, :, R:].clone()


# ------------------------------------------------------------------------------ the definitions
class LSTMState(NamedTuple):
    """LSTM state: ``h`` (B, R) the last output (R = proj_size or H), ``c`` (B, H) the cell."""

    h: torch.Tensor
    c: torch.Tensor


def run_cell(cell, x, state, lengths):
    """The reference loop of a classic cell: ``state = cell(x_t, state)`` for each step of ``x``
    ``(B, T, D)``, the state frozen at padding; returns the outputs ``(B, T, *)`` (the state, or its
    ``h`` for a named state such as :class:`LSTMState`) and the final state."""
    ys = []
    for t, x_t in enumerate(x.unbind(1)):
        state = freeze_padding(t, lengths, cell(x_t, state), state)
        ys.append(state if isinstance(state, torch.Tensor) else state.h)
    return torch.stack(ys, 1), state


def elman_cell(x_t, h, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity: str):
    """One Elman step: ``x_t`` (B, D), ``h`` (B, H) -> next ``h`` (B, H)."""
    pre = F.linear(x_t, weight_ih, bias_ih) + F.linear(h, weight_hh, bias_hh)
    return torch.relu(pre) if nonlinearity == "relu" else torch.tanh(pre)


def elman_recurrent(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity="tanh", lengths=None):
    """The plain loop that defines the Elman recurrence.

    Args:
        x: ``(B, T, D)``; h0: ``(B, H)``; weights as ``torch.nn.RNN`` layer 0; lengths: ``(B,)`` or None.

    Returns:
        ``y`` ``(B, T, H)`` and the final ``h`` ``(B, H)`` (at each sequence's last valid step).
    """
    return run_cell(lambda x_t, h: elman_cell(x_t, h, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity),
                     x, h0, lengths)


def gru_cell(x_t, h, weight_ih, weight_hh, bias_ih, bias_hh):
    """One GRU step (``torch.nn.GRU``'s formulation): ``x_t`` (B, D), ``h`` (B, H) -> next ``h``."""
    xr, xz, xn = F.linear(x_t, weight_ih, bias_ih).chunk(3, 1)
    hr, hz, hn = F.linear(h, weight_hh, bias_hh).chunk(3, 1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def gru_recurrent(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, lengths=None):
    """The plain loop that defines the GRU recurrence.

    Args:
        x: ``(B, T, D)``; h0: ``(B, H)``; weights as ``torch.nn.GRU`` layer 0; lengths: ``(B,)`` or None.

    Returns:
        ``y`` ``(B, T, H)`` and the final ``h`` ``(B, H)`` (at each sequence's last valid step).
    """
    return run_cell(lambda x_t, h: gru_cell(x_t, h, weight_ih, weight_hh, bias_ih, bias_hh), x, h0, lengths)


def lstm_cell(x_t, state, weight_ih, weight_hh, bias_ih, bias_hh, peephole=None, weight_hr=None) -> LSTMState:
    """One LSTM step: ``x_t`` (B, D), ``state`` (h (B, R), c (B, H)) -> next state."""
    h, c = state
    gates = F.linear(x_t, weight_ih, bias_ih) + F.linear(h, weight_hh, bias_hh)  # (B, 4H)
    gi, gf, gg, go = gates.chunk(4, 1)
    if peephole is not None:
        gi = gi + peephole[0] * c
        gf = gf + peephole[1] * c
    c = torch.sigmoid(gf) * c + torch.sigmoid(gi) * torch.tanh(gg)
    if peephole is not None:
        go = go + peephole[2] * c
    h = torch.sigmoid(go) * torch.tanh(c)
    if weight_hr is not None:
        h = F.linear(h, weight_hr)
    return LSTMState(h, c)


def lstm_recurrent(x, state, weight_ih, weight_hh, bias_ih, bias_hh, peephole=None, weight_hr=None, lengths=None):
    """The plain loop that defines the LSTM recurrence.

    Args:
        x: ``(B, T, D)``; state: :class:`LSTMState`; weights as ``torch.nn.LSTM`` layer 0 plus
            ``peephole`` ``(3, H)`` (rows i, f, o) or None; lengths: ``(B,)`` or None.

    Returns:
        ``y`` ``(B, T, R)`` and the final :class:`LSTMState` (at each sequence's last valid step).
    """
    return run_cell(
        lambda x_t, st: lstm_cell(x_t, st, weight_ih, weight_hh, bias_ih, bias_hh, peephole, weight_hr), x, state, lengths
    )


# ------------------------------------------------------------------------------ the entries
def _prepare(mode: str, x: torch.Tensor, lengths):
    """Check ``mode``, ``x`` (B, T, D) and ``lengths``; returns lengths as a (B,) int64 tensor or None."""
    check_choice("mode", mode, CLASSIC_MODES)
    check_tensor("x", x)
    if x.dim() != 3:
        raise InputError(f"x: expected shape (B, T, D), got {tuple(x.shape)}")
    return check_lengths(lengths, x.shape[0], x.shape[1], x.device)


def _zeros_if_none(state, x, batch_shapes):
    """``state``, or zeros of ``(B, n)`` for each ``n`` in ``batch_shapes`` (a tuple for several)."""
    if state is not None:
        return state
    zeros = [x.new_zeros(x.shape[0], n) for n in batch_shapes]
    return zeros[0] if len(zeros) == 1 else LSTMState(*zeros)


def _time_major(x, weight_ih, bias, lengths):
    """``(T, B, G)`` input projection and ``(T, B, 1)`` validity mask (or None) of the fused forms."""
    mask = valid_mask(lengths, x.shape[1])
    return F.linear(x.transpose(0, 1), weight_ih, bias), None if mask is None else mask.t().unsqueeze(-1)


def _summed(a, b):
    return a if b is None else a + b


def elman(x, h0, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *, nonlinearity: str = "tanh", lengths=None,
          mode: str = "fused"):
    """The Elman recurrence ``h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)`` over a sequence.

    Args:
        x: ``(B, T, D)``; h0: ``(B, H)`` or None (zeros); weight_ih ``(H, D)``, weight_hh ``(H, H)``, biases ``(H,)``
            or None (``torch.nn.RNN`` layer 0); nonlinearity: ``"tanh"`` or ``"relu"``;
            lengths: ``(B,)`` or None (the state is kept through padding).
        mode: ``"recurrent"`` (the definition) or ``"fused"`` (:func:`elman_sequence`).

    Returns:
        ``y`` ``(B, T, H)`` (the frozen state at padding steps) and the final ``h`` ``(B, H)``.
    """
    lengths = _prepare(mode, x, lengths)
    check_choice("nonlinearity", nonlinearity, ("tanh", "relu"))
    h0 = _zeros_if_none(h0, x, (weight_hh.shape[1],))
    if mode == "recurrent" or is_empty_batch(x):
        return elman_recurrent(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, nonlinearity, lengths)
    bias = None if bias_ih is None else _summed(bias_ih, bias_hh)
    xp, mask = _time_major(x, weight_ih, bias, lengths)
    y, h = elman_sequence(xp, h0, weight_hh, nonlinearity == "relu", mask)
    return y.transpose(0, 1), h


def gru(x, h0, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *, lengths=None, mode: str = "fused"):
    """The GRU recurrence (``torch.nn.GRU``'s formulation) over a sequence.

    Args:
        x: ``(B, T, D)``; h0: ``(B, H)`` or None (zeros); weight_ih ``(3H, D)``, weight_hh ``(3H, H)``, biases
            ``(3H,)`` or None, gates ordered r, z, n; lengths: ``(B,)`` or None.
        mode: ``"recurrent"`` (the definition) or ``"fused"`` (:func:`gru_sequence`).

    Returns:
        ``y`` ``(B, T, H)`` (the frozen state at padding steps) and the final ``h`` ``(B, H)``.
    """
    lengths = _prepare(mode, x, lengths)
    h0 = _zeros_if_none(h0, x, (weight_hh.shape[1],))
    if mode == "recurrent" or is_empty_batch(x):
        return gru_recurrent(x, h0, weight_ih, weight_hh, bias_ih, bias_hh, lengths)
    xp, mask = _time_major(x, weight_ih, bias_ih, lengths)  # b_hn is gated by r: b_hh stays apart
    y, h = gru_sequence(xp, h0, weight_hh, bias_hh, mask)
    return y.transpose(0, 1), h


def lstm(x, state, weight_ih, weight_hh, bias_ih=None, bias_hh=None, *, peephole=None, weight_hr=None,
         lengths=None, mode: str = "fused"):
    """The LSTM recurrence (forget gate; optional peepholes and projection) over a sequence.

    Args:
        x: ``(B, T, D)``; state: :class:`LSTMState` (``h`` (B, R), ``c`` (B, H)) or None (zeros);
            weight_ih
            ``(4H, D)``, weight_hh ``(4H, R)``, biases ``(4H,)`` or None, gates ordered i, f, g, o;
            peephole: ``(3, H)`` (rows i, f, o) or None; weight_hr: ``(R, H)`` or None;
            lengths: ``(B,)`` or None.
        mode: ``"recurrent"`` (the definition) or ``"fused"`` (:func:`lstm_sequence`).

    Returns:
        ``y`` ``(B, T, R)`` (the frozen output at padding steps) and the final :class:`LSTMState`.
    """
    lengths = _prepare(mode, x, lengths)
    state = _zeros_if_none(state, x, (weight_hh.shape[1], weight_hh.shape[0] // 4))
    if mode == "recurrent" or is_empty_batch(x):
        return lstm_recurrent(x, LSTMState(*state), weight_ih, weight_hh, bias_ih, bias_hh, peephole, weight_hr,
                              lengths)
    bias = None if bias_ih is None else _summed(bias_ih, bias_hh)
    xp, mask = _time_major(x, weight_ih, bias, lengths)
    y, h, c = lstm_sequence(xp, state[0], state[1], weight_hh, peephole, weight_hr, mask)
    return y.transpose(0, 1), LSTMState(h, c)
