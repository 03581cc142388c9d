"""Causal sliding-window softmax attention whose key/value window is a recurrent state.

    y_t = sum_{s in (t - w, t]} softmax_s(q_t . k_s / sqrt(K)) v_s

The state is the last ``w - 1`` keys and values before the sequence and a validity flag per slot
(zeros at the start: no history; a slot counts when its flag is > 0.5, a step function whose
gradient is zero everywhere, as finite differences see it too), so a sequence can be split anywhere and ``step`` attends over the
same keys as the whole-sequence forms. One entry, :func:`sliding_window_attention` with ``mode=``,
runs three forms with one signature:

- :func:`sliding_window_attention_recurrent`: one query at a time over the shifting window;
- :func:`sliding_window_attention_parallel`: all queries against all keys under a band mask
  (``O(T^2)`` memory);
- :func:`sliding_window_attention_chunk`: queries in blocks of ``C``, each against the ``C + w - 1``
  keys it can see (``O(T (C + w))``); with no history and ``w >= T``, one causal call of
  ``torch.nn.functional.scaled_dot_product_attention`` instead.

Padding (``lengths``): the returned window is the one ending at each sequence's last valid step.

Example:
    >>> q, k, v = (torch.randn(2, 4, 100, 16) for _ in range(3))
    >>> y, window = sliding_window_attention_chunk(q, k, v, window=32)    # y (2, 4, 100, 16)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from rnnkit.errors import InputError, check_lengths, check_positive_int, check_tensor, describe
from rnnkit.ops._forms import run_form
from rnnkit.ops.padding import valid_mask, zero_padding


class WindowState(NamedTuple):
    """The last ``w - 1`` keys ``k`` (B, H, w-1, K), values ``v`` (B, H, w-1, V), and ``valid`` (B, w-1)
    (1 where the slot holds a real step, 0 before the first one), oldest first."""

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor


def empty_window(batch_size, num_heads, window, key_dim, value_dim, device=None, dtype=None) -> WindowState:
    """The state before any step: ``w - 1`` empty slots."""
    z = dict(device=device, dtype=dtype)
    return WindowState(
        torch.zeros(batch_size, num_heads, window - 1, key_dim, **z),
        torch.zeros(batch_size, num_heads, window - 1, value_dim, **z),
        torch.zeros(batch_size, window - 1, **z),
    )


def _check(q, k, v, window, state, lengths):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    check_positive_int("window", window, minimum=1)
    if q.dim() != 4 or q.shape[2] < 1:
        raise InputError(f"q: expected shape (B, H, T, K) with T >= 1, got {tuple(q.shape)}")
    B, H, T, K = q.shape
    if k.shape != q.shape:
        raise InputError(f"k: expected shape (B, H, T, K) = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != (B, H, T):
        raise InputError(f"v: expected shape (B, H, T, V) = ({B}, {H}, {T}, V), got {tuple(v.shape)}")
    V = v.shape[-1]
    if state is None:
        state = empty_window(B, H, window, K, V, q.device, q.dtype)
    else:
        if not isinstance(state, tuple) or len(state) != 3:
            raise InputError(f"state: expected a WindowState (k, v, valid), got {describe(state)}")
        W = window - 1
        for name, t, shape in zip(("state.k", "state.v", "state.valid"), state, ((B, H, W, K), (B, H, W, V), (B, W))):
            check_tensor(name, t)
            if t.shape != shape:
                raise InputError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
        state = WindowState(*state)
    lengths = check_lengths(lengths, B, T, q.device)
    if lengths is not None:
        # The whole-sequence forms multiply every key and value by an attention weight, zero past
        # a query's band: zeroed padding keeps a NaN written there out of the valid outputs.
        q, k, v = zero_padding(valid_mask(lengths, T), q, k, v)
    return q, k, v, state, lengths


def _all_keys(k, v, state):
    """History and new steps side by side: keys (B, H, W+T, K), values, validity (B, W+T)."""
    k_all = torch.cat([state.k, k], 2)
    v_all = torch.cat([state.v, v], 2)
    valid = torch.cat([state.valid, state.valid.new_ones(k.shape[0], k.shape[2])], 1)
    return k_all, v_all, valid


def _trim_empty(state: WindowState) -> tuple[WindowState, int]:
    """Drop leading history slots that are empty in every sequence (a fresh or short cache).

    Relative positions, hence the band, are unchanged; returns the kept history and its size.
    """
    W = state.valid.shape[1]
    if W == 0:
        return state, 0
    used = (state.valid > 0.5).any(0)  # (W,)
    if bool(used[0]):
        return state, W
    d = int(used.nonzero()[0]) if bool(used.any()) else W
    return WindowState(state.k[:, :, d:], state.v[:, :, d:], state.valid[:, d:]), W - d


def _keys_and_final(k, v, state, lengths, W):
    """The history still in use followed by the new steps (keys, values, validity), its history
    size, and the window of ``W`` slots ending at each sequence's last valid step.

    Why not one concatenation sliced for both: a full cache (``W = max_len``, 2,048 by default) is
    mostly empty while training on short sequences, and gathering the final window out of all
    ``W + T`` slots (and its backward) would make a short sequence's step cost as much as the
    whole cache; without ``lengths`` the window is a slice, and the attention reads only the
    history in use.
    """
    if lengths is None:
        # every sequence ends at T: the window is positions [T, T + W) of history + new steps
        T = k.shape[2]
        if T >= W:
            ones = state.valid.new_ones(k.shape[0], W)
            # copies: a view would keep all T steps of k and v alive for as long as the state lives
            final = WindowState(k[:, :, T - W :].clone(), v[:, :, T - W :].clone(), ones)
        else:
            final = _all_keys(k, v, WindowState(state.k[:, :, T:], state.v[:, :, T:], state.valid[:, T:]))
            final = WindowState(*final)
    else:
        final = _gather_window(*_all_keys(k, v, state), lengths, W)
    kept, used = _trim_empty(state)
    return (*_all_keys(k, v, kept), used, final)


def _gather_window(k_all, v_all, valid, lengths, W):
    """The ``W`` slots ending at each sequence's last valid step (positions ``[L, L + W)``)."""
    idx = lengths[:, None] + torch.arange(W, device=k_all.device)  # (B, W)
    B, H = k_all.shape[:2]
    take = lambda t: t.gather(2, idx[:, None, :, None].expand(B, H, W, t.shape[-1]))  # noqa: E731
    return WindowState(take(k_all), take(v_all), valid.gather(1, idx))


def _attend(scores, mask, values):
    scores = scores.masked_fill(~mask, -math.inf)
    return torch.softmax(scores, -1) @ values


def sliding_window_attention_parallel(q, k, v, window, state=None, lengths=None):
    """All queries against all keys with a band mask (same signature as the loop)."""
    q, k, v, state, lengths = _check(q, k, v, window, state, lengths)
    T = q.shape[2]
    k_all, v_all, valid, W, final = _keys_and_final(k, v, state, lengths, window - 1)
    pos_q = W + torch.arange(T, device=q.device)[:, None]  # (T, 1) position of query t among all keys
    pos_k = torch.arange(W + T, device=q.device)[None, :]  # (1, W+T)
    band = (pos_k <= pos_q) & (pos_k > pos_q - window)  # (T, W+T)
    mask = band & (valid[:, None, None, :] > 0.5)  # (B, 1, T, W+T)
    y = _attend(q @ k_all.transpose(-1, -2) * q.shape[-1] ** -0.5, mask, v_all)
    return y, final


def sliding_window_attention_chunk(q, k, v, window, state=None, lengths=None, chunk_size: int = 64):
    """Blocks of ``C`` queries, each against the ``C + w - 1`` keys it can see (same signature)."""
    check_positive_int("chunk_size", chunk_size)
    q, k, v, state, lengths = _check(q, k, v, window, state, lengths)
    B, H, T, K = q.shape
    W, C = window - 1, min(chunk_size, T)
    N = math.ceil(T / C)
    pad = N * C - T
    k_all, v_all, valid, used, final = _keys_and_final(k, v, state, lengths, W)
    if used == 0 and window >= T:
        # No history in use and a band wider than the sequence: plain causal attention, which
        # PyTorch's fused kernel computes without materialising the scores (padding queries, after
        # every valid one, are the only ones that see padding keys, as in the blocks below).
        return F.scaled_dot_product_attention(q, k, v, is_causal=True), final
    # Each block looks back W slots; no further than the data goes (a short or fresh cache and a
    # short sequence need far fewer than window - 1), with empty slots in front where needed.
    W = min(W, used + T - 1)
    if W > used:
        front = lambda t: t.new_zeros(*t.shape[:2], W - used, t.shape[-1])  # noqa: E731
        k_all, v_all = torch.cat([front(k_all), k_all], 2), torch.cat([front(v_all), v_all], 2)
        valid = torch.cat([valid.new_zeros(B, W - used), valid], 1)
    if pad:
        zeros = lambda t: t.new_zeros(*t.shape[:2], pad, t.shape[-1])  # noqa: E731
        q, k_all, v_all = torch.cat([q, zeros(q)], 2), torch.cat([k_all, zeros(k_all)], 2), torch.cat([v_all, zeros(v_all)], 2)
        # Padding keys count as valid: only padding queries (after every real one) can see them,
        # and a padding query must not see an all-masked row (softmax NaN, and NaN gradients).
        valid = torch.cat([valid, valid.new_ones(B, pad)], 1)
    # Block n holds queries at positions W + nC + [0, C) and sees keys at nC + [0, C + W).
    k_blocks = k_all.unfold(2, C + W, C).transpose(-1, -2)  # (B, H, N, C+W, K)
    v_blocks = v_all.unfold(2, C + W, C).transpose(-1, -2)  # (B, H, N, C+W, V)
    valid_blocks = valid.unfold(1, C + W, C)  # (B, N, C+W)
    qb = q.reshape(B, H, N, C, K)
    pos_q = W + torch.arange(C, device=q.device)[:, None]  # within a block
    pos_k = torch.arange(C + W, device=q.device)[None, :]
    band = (pos_k <= pos_q) & (pos_k > pos_q - window)  # (C, C+W)
    mask = band & (valid_blocks[:, None, :, None, :] > 0.5)  # (B, 1, N, C, C+W)
    y = _attend(qb @ k_blocks.transpose(-1, -2) * K**-0.5, mask, v_blocks)  # (B, H, N, C, V)
    return y.reshape(B, H, N * C, -1)[:, :, :T], final


def sliding_window_attention_recurrent(q, k, v, window, state=None, lengths=None):
    """The definition: one query at a time over the window of the last ``w`` keys.

    Args:
        q, k: ``(B, H, T, K)``; v: ``(B, H, T, V)``.
        window: ``w >= 1``, keys attended per query (the current one included).
        state: :class:`WindowState` or None (empty).
        lengths: optional ``(B,)`` ints in ``[1, T]``.

    Returns:
        ``y`` ``(B, H, T, V)`` and the :class:`WindowState` after each sequence's last valid step.
    """
    q, k, v, state, lengths = _check(q, k, v, window, state, lengths)
    wk, wv, wvalid = state
    ys = []
    for t in range(q.shape[2]):
        keys = torch.cat([wk, k[:, :, t, None]], 2)  # (B, H, w, K)
        vals = torch.cat([wv, v[:, :, t, None]], 2)
        valid = torch.cat([wvalid, wvalid.new_ones(wvalid.shape[0], 1)], 1)  # (B, w)
        scores = (keys @ q[:, :, t, :, None])[..., 0] * q.shape[-1] ** -0.5  # (B, H, w)
        ys.append(_attend(scores[:, :, None], (valid > 0.5)[:, None, None], vals)[:, :, 0])
        new = (keys[:, :, 1:], vals[:, :, 1:], valid[:, 1:])
        if lengths is not None:
            keep = t < lengths  # (B,)
            new = (torch.where(keep[:, None, None, None], new[0], wk), torch.where(keep[:, None, None, None], new[1], wv),
                   torch.where(keep[:, None], new[2], wvalid))
        wk, wv, wvalid = new
    return torch.stack(ys, 2), WindowState(wk, wv, wvalid)


#: Forms :func:`sliding_window_attention` runs, ``recurrent`` (the definition) first.
_FORMS = {
    "recurrent": sliding_window_attention_recurrent,
    "parallel": sliding_window_attention_parallel,
    "chunk": sliding_window_attention_chunk,
}
SLIDING_WINDOW_MODES = tuple(_FORMS)


def sliding_window_attention(q, k, v, window, state=None, lengths=None, *, mode: str = "chunk", chunk_size: int = 64):
    """Sliding-window attention in the form ``mode`` (see the module docstring).

    Args:
        q, k: ``(B, H, T, K)``; v: ``(B, H, T, V)``; window: ``w``, the steps each query sees (its own
            included); state: :class:`WindowState` or None; lengths: ``(B,)`` or None.
        mode: ``"recurrent"`` (one query at a time, the definition), ``"parallel"`` (band-masked
            ``(T, T)`` scores) or ``"chunk"`` (blocks of queries, the default).
        chunk_size: queries per block of the ``chunk`` form.

    Returns:
        ``y`` ``(B, H, T, V)`` and the final :class:`WindowState`.

    Raises:
        InputError: an unknown ``mode``, or bad shapes, window, state or lengths.
    """
    return run_form(mode, _FORMS, (q, k, v, window, state, lengths), chunk_size)
