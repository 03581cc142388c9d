"""What the diagonal linear recurrences (LRU, S4D, RG-LRU/Hawk, Mamba) share.

Each of these layers computes ``h_t = a_t * h_{t-1} + b_t`` with an elementwise ``a_t``, so besides
its own per-step loop (mode ``recurrent``, the definition) it runs every form of
:func:`rnnkit.ops.linear_scan` as a mode of the same name. This module holds the pieces they have in
common: the scan call with ``lengths``, complex states stored as real tensors, and a float-range check.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from rnnkit.errors import InputError, check_positive_int, describe
from rnnkit.layers.base import Recurrence, map_state
from rnnkit.ops.padding import freeze, step_valid

#: Forms of :func:`rnnkit.ops.linear_scan` each diagonal layer offers as a mode of the same name.
SCAN_MODES = ("parallel", "chunk", "fused")


def check_float(name: str, value: object, low: float = -math.inf, high: float = math.inf, *,
                open_low: bool = False) -> float:
    """Raise InputError unless ``value`` is a real number in ``[low, high]`` (``(low, high]`` if open_low)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InputError(f"{name}: expected a finite number, got {describe(value)}")
    if value > high or value < low or (open_low and value == low):
        left = "(" if open_low else "["
        raise InputError(f"{name}: expected a number in {left}{low}, {high}], got {value!r}")
    return float(value)


def check_ssm_options(d_model: object, d_state: object, dt_min: object, dt_max: object) -> None:
    """The options the state space layers (S4D, S4, S5) share: widths, an even ``d_state`` (conjugate
    pairs of modes) and the range ``0 < dt_min <= dt_max`` of their initial step sizes."""
    check_positive_int("d_model", d_model)
    check_positive_int("d_state", d_state, minimum=2)
    if d_state % 2:
        raise InputError(f"d_state: expected an even number (conjugate pairs), got {d_state}")
    check_float("dt_min", dt_min, 0.0, math.inf, open_low=True)
    check_float("dt_max", dt_max, dt_min, math.inf)


def log_uniform(n: int, low: float, high: float) -> torch.Tensor:
    """``(n,)`` logarithms drawn uniformly from ``[log low, log high]``: the initial ``log dt`` of the SSMs."""
    return torch.rand(n) * (math.log(high) - math.log(low)) + math.log(low)


def scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, lengths: torch.Tensor | None, mode: str) -> torch.Tensor:
    """``h_t = a_t * h_{t-1} + b_t`` for all t by :func:`rnnkit.ops.linear_scan` in ``mode``.

    Args:
        a, b: ``(B, T, *S)`` real or complex; h0: ``(B, *S)``; lengths: ``(B,)`` or None (steps past a
        length keep the state, so ``h[:, -1]`` is the state at each sequence's last valid step).

    Returns:
        ``h`` ``(B, T, *S)``.
    """
    from rnnkit.ops import linear_scan

    return linear_scan(a, b, h0, lengths=lengths, mode=mode)


def zoh_parts(A_re: torch.Tensor, A_im: torch.Tensor, dt: torch.Tensor):
    """Zero-order hold of the complex diagonal ``A = A_re + i A_im`` with step ``dt`` (broadcast), as
    (real, imaginary) pairs in real arithmetic (which every export target has; ONNX has no complex
    tensors): ``dt A``, ``dA = exp(dt A) = e^a (cos b, sin b)`` and ``dB = (exp(dt A) - 1) / A``, with
    ``expm1(a + ib) = (expm1(a) cos b - 2 sin^2(b / 2), e^a sin b)`` (exact near 0) and the complex
    quotient by ``A`` over ``|A|^2``."""
    a, b = dt * A_re, dt * A_im
    e, cos, sin = torch.exp(a), torch.cos(b), torch.sin(b)
    dA = (e * cos, e * sin)
    half = torch.sin(b / 2)
    m_re, m_im = torch.expm1(a) * cos - 2 * half * half, e * sin  # expm1(dt A)
    norm = A_re * A_re + A_im * A_im
    dB = ((m_re * A_re + m_im * A_im) / norm, (m_im * A_re - m_re * A_im) / norm)
    return (a, b), dA, dB


def to_complex(state: torch.Tensor) -> torch.Tensor:
    """A complex state stored as real ``(..., 2)`` (real, imaginary) -> complex ``(...)``.

    States are kept real so that they share the layer's dtype like every other rnnkit state.
    """
    return torch.complex(state[..., 0], state[..., 1])


def to_real(h: torch.Tensor) -> torch.Tensor:
    """Complex ``(...)`` -> real ``(..., 2)`` (inverse of :func:`to_complex`)."""
    return torch.stack([h.real, h.imag], -1)




class DiagonalRecurrence(Recurrence):
    """Base of the diagonal layers: ``recurrent`` loops over ``_step``; other modes call ``_scan_forward``.

    Subclasses implement ``_step`` (the cell, which defines the layer), ``_init_state`` and
    ``_scan_forward(x, state, lengths, mode)``, which computes all of ``a_t`` and ``b_t`` at once and
    hands them to :func:`scan`.
    """

    MODES: ClassVar[tuple[str, ...]] = ("recurrent",) + SCAN_MODES

    @property
    def modes(self) -> tuple[str, ...]:
        """The class's modes, without ``fused`` where the compiled scan kernel is unavailable."""
        from rnnkit.ops import fused_available

        return tuple(m for m in type(self).MODES if m != "fused" or fused_available())

    def _auto_mode(self, x: torch.Tensor) -> str:
        # linear_scan's own choice: the fused kernel on the CPU where it compiled, else chunk.
        from rnnkit.ops.scan import resolve_mode

        return resolve_mode("auto", x.device, x.dtype)

    def _forward(self, x, state, lengths, mode):
        if mode != "recurrent":
            return self._scan_forward(x, state, lengths, mode)
        ys = []
        for t, x_t in enumerate(x.unbind(1)):
            y_t, new = self._step(x_t, state)
            valid = step_valid(t, lengths)
            state = map_state(lambda n, o: freeze(valid, n, o), new, state)
            ys.append(y_t)
        return torch.stack(ys, 1), state

    def _scan_forward(self, x, state, lengths, mode):
        raise NotImplementedError
