"""The op-family contract as reusable checks: covering a new op is one :class:`Family` entry.

An op family is an entry ``entry(*args, lengths=..., mode=..., **options)`` whose ``"recurrent"``
mode is the definition. For every other mode, :func:`check_form` runs the form and the reference on
the same inputs and compares, with ``tests/helpers.assert_close`` and its tolerance table:

- every output and every part of the final state;
- the gradients of a random linear loss over all of them w.r.t. every floating input, the initial
  state included when one is given;
- in fp64 (form and reference in fp64) and in fp32 (the form in fp32 against the reference in fp64,
  so the form's own error is what is measured), with and without ``lengths`` and an initial state.

Outputs past a sequence's length are compared only where the family defines them
(``defined_past_length``). :func:`check_padding_ignored` fills the padding of every per-step input
with NaN and requires the valid outputs and the final state to be bit-identical to those of a
zero-padded run; :func:`check_bad_mode` requires an unknown mode to raise ``InputError`` listing
the choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import pytest
import torch

from rnnkit.errors import InputError
from tests.helpers import assert_close

#: ``inputs(B, T, gen) -> {name: value}`` in fp64, in the entry's positional order; tensors,
#: (named) tuples of tensors (states) and plain values (e.g. a window length) are allowed.
Inputs = Callable[[int, int, torch.Generator], dict[str, Any]]


@dataclass(frozen=True)
class Family:
    """One op family: its entry, the forms to hold to ``"recurrent"``, and how to make inputs."""

    name: str
    entry: Callable[..., Any]
    modes: tuple[str, ...]
    inputs: Inputs
    time_dims: Mapping[str, int]  # inputs with a time axis -> that axis
    output_time_dim: int  # time axis of the first output
    state: str  # the name of the initial-state input (None for zeros is tried too)
    keywords: tuple[str, ...] = ()  # inputs passed by keyword
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # mode -> extra kwargs
    defined_past_length: bool = True
    nan_padding_safe: bool = True  # False: the callers zero the padding, the op relies on it

    def run(self, args: dict[str, Any], lengths, mode: str):
        positional = [v for k, v in args.items() if k not in self.keywords]
        keywords = {k: args[k] for k in self.keywords}
        out = self.entry(*positional, lengths=lengths, mode=mode, **keywords, **self.options.get(mode, {}))
        return out if isinstance(out, tuple) else (out,)


def _flatten(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple):
        return [t for part in value for t in _flatten(part)]
    return []


def _rebuild(value, leaves: list[torch.Tensor]):
    """``value`` with its tensors replaced, in order, by ``leaves`` (consumed)."""
    if isinstance(value, torch.Tensor):
        return leaves.pop(0)
    if isinstance(value, tuple):
        parts = [_rebuild(part, leaves) for part in value]
        return type(value)(*parts) if hasattr(value, "_fields") else tuple(parts)
    return value


def _as(args: dict[str, Any], dtype: torch.dtype) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """The arguments with every tensor replaced by a fresh leaf of ``dtype`` requiring gradients,
    and those leaves in order."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in _flatten(tuple(args.values()))]
    pool = list(leaves)
    return {k: _rebuild(v, pool) for k, v in args.items()}, leaves


def _valid(lengths, T: int, out: torch.Tensor, time_dim: int) -> torch.Tensor:
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)
    shape = [1] * out.dim()
    shape[0], shape[time_dim] = mask.shape
    return mask.view(shape)


def _outputs_and_grads(family: Family, args, lengths, mode, dtype, weights_seed=1):
    fresh, leaves = _as(args, dtype)
    outs = _flatten(family.run(fresh, lengths, mode))
    if lengths is not None and not family.defined_past_length:
        outs[0] = outs[0] * _valid(lengths, outs[0].shape[family.output_time_dim], outs[0], family.output_time_dim)
    gen = torch.Generator().manual_seed(weights_seed)
    loss = sum((o * torch.randn(o.shape, dtype=torch.float64, generator=gen).to(o.dtype)).sum() for o in outs)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    return outs, grads


def make_args(family: Family, B: int, T: int, with_state: bool, seed: int = 0) -> dict[str, Any]:
    args = family.inputs(B, T, torch.Generator().manual_seed(seed))
    if not with_state:
        args[family.state] = None
    return args


def check_form(family: Family, mode: str, dtype: torch.dtype, T: int, lengths, with_state: bool) -> None:
    """``mode`` == ``"recurrent"`` in outputs, final state and gradients (see the module docstring)."""
    args = make_args(family, len(lengths) if lengths else 2, T, with_state)
    ref, ref_grads = _outputs_and_grads(family, args, lengths, "recurrent", torch.float64)
    outs, grads = _outputs_and_grads(family, args, lengths, mode, dtype)
    assert len(outs) == len(ref), f"{family.name}/{mode}: {len(outs)} outputs, the reference has {len(ref)}"
    for i, (a, b) in enumerate(zip(outs, ref)):
        assert_close(a, b, dtype=dtype, what=f"{family.name}/{mode}: output {i}")
    names = [n for n, v in args.items() for _ in _flatten(v)]
    for name, a, b in zip(names, grads, ref_grads):
        assert_close(a, b, dtype=dtype, kind="grad", what=f"{family.name}/{mode}: d/d {name}")


def check_padding_ignored(family: Family, mode: str, T: int = 21, lengths=(21, 9)) -> None:
    """NaN in the padding of every per-step input changes no valid output and no final state."""
    if not family.nan_padding_safe:
        pytest.skip(f"{family.name}: its callers zero the padding (NaN there reaches the outputs)")
    args = make_args(family, len(lengths), T, with_state=True)
    clean = dict(args)
    dirty = dict(args)
    for name, dim in family.time_dims.items():
        x = args[name]
        valid = _valid(lengths, T, x, dim)
        clean[name] = torch.where(valid, x, torch.zeros((), dtype=x.dtype))
        dirty[name] = torch.where(valid, x, torch.full((), float("nan"), dtype=x.dtype))
    with torch.no_grad():
        a = _flatten(family.run(clean, list(lengths), mode))
        b = _flatten(family.run(dirty, list(lengths), mode))
    a[0] = torch.where(_valid(lengths, T, a[0], family.output_time_dim), a[0], 0)
    b[0] = torch.where(_valid(lengths, T, b[0], family.output_time_dim), b[0], 0)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{family.name}/{mode}: NaN padding changed output {i}"


def check_bad_mode(family: Family) -> None:
    args = make_args(family, 2, 3, with_state=True)
    with pytest.raises(InputError, match=r"mode: expected one of \[.*'recurrent'.*\], got 'no-such-mode'"):
        family.run(args, None, "no-such-mode")
