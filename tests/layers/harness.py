"""The Recurrence contract as reusable checks (docs/design.md, "The contract suite").

Every check takes a *layer factory* ``make(d_model, dtype) -> Recurrence`` (a fresh layer in eval
mode, so stochastic wrappers such as dropout are deterministic) and raises ``AssertionError`` with
the numbers when the layer breaks the contract. ``tests/layers/test_contract.py`` runs them over
every registered layer and test configuration; ``tests/layers/test_harness.py`` runs them on
deliberately broken layers to show that they can fail.

Checks (numbers as in docs/design.md):

1. :func:`check_modes_equal`: a mode == the ``recurrent`` reference in outputs, final state and the
   gradients of a loss touching both w.r.t. the input, the initial state and every parameter;
2. :func:`check_state_carry`: ``x[:, :t]`` then ``x[:, t:]`` with the returned state == ``x`` at once;
3. :func:`check_variable_lengths`: padded batch == each sequence alone; padding filled with 1e3,
   Inf or NaN changes nothing (``torch.equal``); outputs past each length are exactly zero;
4. :func:`check_gradcheck`: ``torch.autograd.gradcheck`` on a tiny fp64 padded batch;
5. :func:`check_step`: ``step`` repeated T times == ``forward``;
6. :func:`check_bad_inputs`: bad input raises ``InputError`` saying "expected ...";
7. :func:`check_state_api` and :func:`check_auto_mode`: ``state_size``, ``init_state`` layout, ``auto``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pytest
import torch
from torch.autograd.gradcheck import GradcheckError

import rnnkit
from rnnkit.errors import InputError
from rnnkit.layers import MODE_NAMES, Recurrence, flatten_state, map_state
from tests.helpers import assert_close

LayerFactory = Callable[[int, torch.dtype], Recurrence]  # (d_model, dtype) -> fresh layer, eval mode
State = Any


# --------------------------------------------------------------------------- factories and cases
def registry_factory(name: str, config: dict[str, Any]) -> LayerFactory:
    """Factory building registered layer ``name`` with ``config`` (without ``d_model``)."""

    def make(d_model: int, dtype: torch.dtype) -> Recurrence:
        return rnnkit.layers.build(name, d_model=d_model, **config).to(dtype).eval()

    return make


def class_factory(cls: type[Recurrence], **config: Any) -> LayerFactory:
    """Factory building an (unregistered) Recurrence class directly."""

    def make(d_model: int, dtype: torch.dtype) -> Recurrence:
        return cls(d_model=d_model, **config).to(dtype).eval()

    return make


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Shape:
    """One input shape; ``lengths`` (B,) makes it a right-padded batch."""

    B: int
    T: int
    D: int
    dtype: torch.dtype
    lengths: tuple[int, ...] | None = None

    @property
    def id(self) -> str:
        padded = "-padded" if self.lengths is not None else ""
        return f"B{self.B}-T{self.T}-D{self.D}-{dtype_name(self.dtype)}{padded}"


def staggered_lengths(T: int) -> tuple[int, int, int]:
    """Lengths of a B=3 padded batch: one full, one about half, one a single step."""
    return (T, T // 2 + 1, 1)


@dataclass(frozen=True)
class LayerCase:
    """One registered layer in one of its test configurations."""

    name: str
    config_name: str
    config: dict[str, Any]
    modes: tuple[str, ...]  # the instance's modes (a config may offer fewer than the class)
    causal: bool

    @property
    def id(self) -> str:
        return f"{self.name}-{self.config_name}"

    def make(self, d_model: int, dtype: torch.dtype) -> Recurrence:
        return registry_factory(self.name, self.config)(d_model, dtype)


def registry_cases(d_model: int) -> list[LayerCase]:
    """Every registered layer x test configuration, with the modes an instance at ``d_model`` offers."""
    cases = []
    for name in rnnkit.layers.names():
        spec = rnnkit.layers.spec(name)
        for config_name, config in spec.test_configs.items():
            try:
                modes = rnnkit.layers.build(name, d_model=d_model, **config).modes
            except Exception:  # noqa: BLE001 - the class's modes; test_declaration reports the error
                modes = spec.modes
            cases.append(LayerCase(name, config_name, dict(config), tuple(modes), spec.cls.causal))
    return cases


def pytest_params(
    cases: list[LayerCase], modes: str | None, shapes: Any = (None,), causal_only: bool = False
) -> list[Any]:
    """pytest params (layer, [mode], [shape...]) with ids ``<layer>-<config>[-<mode>][-<shape>]``.

    Args:
        cases: from :func:`registry_cases`.
        modes: ``"all"`` (every mode), ``"fast"`` (every mode but the reference) or None (no mode).
        shapes: Shape objects, (Shape, extra) pairs, or (None,) for none.
        causal_only: skip non-causal (bidirectional) layers, with the reason.
    """
    params = []
    for case in cases:
        marks = []
        if causal_only and not case.causal:
            reason = (
                f"{case.name} is not causal: its output at t depends on inputs after t, "
                "so step and split-sequence state carry are undefined"
            )
            marks = [pytest.mark.skip(reason=reason)]
        mode_list = [None] if modes is None else list(case.modes if modes == "all" else case.modes[1:])
        for mode in mode_list:
            for shape in shapes:
                values = [case] + ([mode] if mode is not None else [])
                shape_id = None
                if isinstance(shape, Shape):
                    values.append(shape)
                    shape_id = shape.id
                elif shape is not None:
                    values += list(shape)
                    shape_id = shape[0].id
                ident = "-".join(p for p in (case.id, mode, shape_id) if p)
                params.append(pytest.param(*values, id=ident, marks=marks))
    return params


# --------------------------------------------------------------------------- state utilities
def unflatten_state(template: State, leaves: list[torch.Tensor]) -> State:
    """Inverse of ``flatten_state``: ``leaves`` poured into ``template``'s structure."""
    it = iter(leaves)
    state = map_state(lambda _: next(it), template)
    leftover = list(it)
    if leftover:
        raise ValueError(f"unflatten_state: {len(leftover)} leaves left over")
    return state


def state_names(state: State, path: str = "state") -> list[str]:
    """Readable names of a state's leaves, in ``flatten_state`` order (``state.h``, ``state[1].c``)."""
    if isinstance(state, torch.Tensor):
        return [path]
    fields = getattr(state, "_fields", None)
    names: list[str] = []
    for i, part in enumerate(state):
        names += state_names(part, f"{path}.{fields[i]}" if fields else f"{path}[{i}]")
    return names


def batch_slice(state: State, b: int) -> State:
    """The state of sequence ``b`` alone (every leaf is batch-first)."""
    return map_state(lambda s: s[b : b + 1], state)


def random_state(layer: Recurrence, batch_size: int, dtype: torch.dtype) -> State:
    """A random, non-zero and *reachable* state: the recurrent reference run over a random prefix.

    Running the layer (rather than drawing ``randn`` leaves) keeps any invariant a state must hold
    (positive normalisers, running maxima) for every present and future layer.
    """
    prefix = torch.randn(batch_size, 3, layer.d_input, dtype=dtype)
    with torch.no_grad():
        _, state = layer(prefix, mode="recurrent")
    return map_state(lambda s: s.detach().clone(), state)


def assert_same_structure(actual: State, expected: State, what: str) -> None:
    """Same nesting, types and leaf shapes (values not compared)."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape:
            raise AssertionError(f"{what}: expected a tensor of shape {tuple(expected.shape)}, got {_describe(actual)}")
        return
    if type(actual) is not type(expected) or len(actual) != len(expected):
        raise AssertionError(f"{what}: expected {type(expected).__name__} of {len(expected)}, got {_describe(actual)}")
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_same_structure(a, e, f"{what}[{i}]")


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}"
    if isinstance(x, tuple):
        return f"{type(x).__name__} of {len(x)}"
    return type(x).__name__


def assert_states_close(actual: State, expected: State, dtype: torch.dtype, what: str) -> None:
    assert_same_structure(actual, expected, what)
    for name, a, e in zip(state_names(expected, what), flatten_state(actual), flatten_state(expected)):
        assert_close(a, e, dtype=dtype, kind="value", what=name)


def assert_states_equal(actual: State, expected: State, what: str) -> None:
    assert_same_structure(actual, expected, what)
    for name, a, e in zip(state_names(expected, what), flatten_state(actual), flatten_state(expected)):
        if not torch.equal(a, e):
            raise AssertionError(f"{name}: not bitwise equal; max-abs difference {(a - e).abs().max().item():.3e}")


# --------------------------------------------------------------------------- forward + gradients
@dataclass
class Run:
    """One forward/backward: outputs, final state and named gradients of a fixed random loss."""

    y: torch.Tensor
    state: State
    grads: dict[str, torch.Tensor]


def loss_weights(layer: Recurrence, B: int, T: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Random weights for ``loss = sum(y * w_y) + sum_leaves sum(state * w_s)`` (touches y and state)."""
    w_y = torch.randn(B, T, layer.d_output, dtype=dtype)
    w_s = [torch.randn_like(s) for s in flatten_state(layer.init_state(B, dtype=dtype))]
    return w_y, w_s


def run_with_grads(
    layer: Recurrence,
    x: torch.Tensor,
    state0: State,
    lengths: Any,
    mode: str,
    weights: tuple[torch.Tensor, list[torch.Tensor]],
) -> Run:
    """Forward in ``mode`` and the gradients of the weighted loss w.r.t. x, state0 and parameters."""
    x = x.detach().clone().requires_grad_()
    state0 = map_state(lambda s: s.detach().clone().requires_grad_(), state0)
    y, state = layer(x, state0, lengths=lengths, mode=mode)
    w_y, w_s = weights
    loss = (y * w_y).sum() + sum((s * w).sum() for s, w in zip(flatten_state(state), w_s))
    named = [("x", x)]
    named += list(zip((f"initial {n}" for n in state_names(state0)), flatten_state(state0)))
    named += [(f"parameter {n}", p) for n, p in layer.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [t for _, t in named], allow_unused=True)
    return Run(
        y=y.detach(),
        state=map_state(torch.Tensor.detach, state),
        # An unused input has gradient zero; autograd reports it as None.
        grads={n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(named, grads)},
    )


def assert_runs_close(got: Run, ref: Run, dtype: torch.dtype, label: str) -> None:
    assert_close(got.y, ref.y, dtype=dtype, kind="value", what=f"{label}: y")
    assert_states_close(got.state, ref.state, dtype, f"{label}: final state")
    for name, g_ref in ref.grads.items():
        assert_close(got.grads[name], g_ref, dtype=dtype, kind="grad", what=f"{label}: d loss / d {name}")


# --------------------------------------------------------------------------- 1. modes == reference
def check_modes_equal(make: LayerFactory, mode: str, shape: Shape, seed: int = 0) -> None:
    """``mode`` == ``recurrent`` in y, final state and all gradients (check 1)."""
    torch.manual_seed(seed)
    layer = make(shape.D, shape.dtype)
    x = torch.randn(shape.B, shape.T, shape.D, dtype=shape.dtype)
    state0 = random_state(layer, shape.B, shape.dtype)
    weights = loss_weights(layer, shape.B, shape.T, shape.dtype)
    lengths = list(shape.lengths) if shape.lengths is not None else None
    ref = run_with_grads(layer, x, state0, lengths, "recurrent", weights)
    got = run_with_grads(layer, x, state0, lengths, mode, weights)
    assert_runs_close(got, ref, shape.dtype, f"{mode} vs recurrent, {shape.id}")


# --------------------------------------------------------------------------- 2. state carry
def check_state_carry(make: LayerFactory, mode: str, shape: Shape, splits: tuple[int, ...], seed: int = 0) -> None:
    """Feeding ``x[:, :t]`` then ``x[:, t:]`` with the returned state == feeding ``x`` (check 2)."""
    torch.manual_seed(seed)
    layer = make(shape.D, shape.dtype)
    x = torch.randn(shape.B, shape.T, shape.D, dtype=shape.dtype)
    state0 = random_state(layer, shape.B, shape.dtype)
    with torch.no_grad():
        y_all, s_all = layer(x, state0, mode=mode)
        for t in splits:
            y1, s1 = layer(x[:, :t], state0, mode=mode)
            y2, s2 = layer(x[:, t:], s1, mode=mode)
            label = f"{mode}, split at t={t} of {shape.id}"
            assert_close(torch.cat([y1, y2], 1), y_all, dtype=shape.dtype, what=f"{label}: y")
            assert_states_close(s2, s_all, shape.dtype, f"{label}: final state")


# --------------------------------------------------------------------------- 3. variable lengths
def check_variable_lengths(make: LayerFactory, mode: str, shape: Shape, seed: int = 0) -> None:
    """Padded batch == each sequence alone; padding content is invisible (check 3)."""
    lengths = list(shape.lengths or staggered_lengths(shape.T))
    torch.manual_seed(seed)
    layer = make(shape.D, shape.dtype)
    B, T = len(lengths), shape.T
    x = torch.randn(B, T, shape.D, dtype=shape.dtype)
    state0 = random_state(layer, B, shape.dtype)
    padding = ~(torch.arange(T)[None, :] < torch.tensor(lengths)[:, None])  # (B, T) True past each length

    with torch.no_grad():
        y, state = layer(x, state0, lengths=lengths, mode=mode)
    assert_same_structure(state, state0, f"{mode}: final state")
    for b, L in enumerate(lengths):
        tail = y[b, L:]
        if tail.numel() and not bool((tail == 0).all()):
            raise AssertionError(
                f"{mode}, {shape.id}, lengths={lengths}: y[{b}, {L}:] (padding) must be exactly zero, "
                f"got max |y| {tail.abs().max().item():.3e}"
            )
        with torch.no_grad():
            y_b, s_b = layer(x[b : b + 1, :L], batch_slice(state0, b), mode=mode)
        label = f"{mode}, {shape.id}, lengths={lengths}: sequence {b} (length {L}) padded vs alone"
        assert_close(y[b : b + 1, :L], y_b, dtype=shape.dtype, what=f"{label}: y")
        assert_states_close(batch_slice(state, b), s_b, shape.dtype, f"{label}: final state")

    weights = loss_weights(layer, B, T, shape.dtype)
    clean = run_with_grads(layer, x, state0, lengths, mode, weights)
    for fill in (1e3, math.inf, math.nan):
        x_fill = x.masked_fill(padding[..., None], fill)
        with torch.no_grad():
            y_fill, state_fill = layer(x_fill, state0, lengths=lengths, mode=mode)
        label = f"{mode}, {shape.id}, lengths={lengths}, padding filled with {fill}"
        if not torch.equal(y_fill, y):
            diff = (y_fill - y).abs().nan_to_num(nan=math.inf).max().item()
            raise AssertionError(f"{label}: y changed (max-abs difference {diff:.3e}); padding must not leak")
        assert_states_equal(state_fill, state, f"{label}: final state")
        if math.isnan(fill):
            dirty = run_with_grads(layer, x_fill, state0, lengths, mode, weights)
            for name, g in dirty.grads.items():
                if name != "x" and not bool(torch.isfinite(g).all()):
                    raise AssertionError(f"{label}: d loss / d {name} is not finite")
                if name != "x":
                    assert_close(g, clean.grads[name], dtype=shape.dtype, kind="grad", what=f"{label}: d loss / d {name}")
            g_x = dirty.grads["x"]
            valid = ~padding[..., None].expand_as(g_x)
            if not bool(torch.isfinite(g_x[valid]).all()):
                raise AssertionError(f"{label}: d loss / d x is not finite at valid steps")


# --------------------------------------------------------------------------- 4. gradcheck
def check_gradcheck(make: LayerFactory, mode: str, seed: int = 0) -> None:
    """``torch.autograd.gradcheck`` w.r.t. x, the initial state and all parameters (check 4).

    B=2, T=3, D=3 in fp64 with lengths [3, 2], so the padding path is differentiated too.
    """
    torch.manual_seed(seed)
    dtype, lengths = torch.float64, [3, 2]
    layer = make(3, dtype)
    x = torch.randn(2, 3, 3, dtype=dtype, requires_grad=True)
    state0 = random_state(layer, 2, dtype)
    leaves = [s.requires_grad_() for s in flatten_state(state0)]
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters() if p.requires_grad}
    names = list(params)

    def fn(x: torch.Tensor, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state = unflatten_state(state0, list(flat[: len(leaves)]))
        values = dict(zip(names, flat[len(leaves) :]))
        y, final = torch.func.functional_call(layer, values, (x,), {"state": state, "lengths": lengths, "mode": mode})
        return (y, *flatten_state(final))

    inputs = ["x"] + state_names(state0, "initial state") + [f"parameter {n}" for n in names]
    try:
        # fast_mode compares random projections v^T J u (numerical vs analytical): a wrong entry
        # anywhere in J shows up, at two forwards per input tensor instead of one per element, so
        # the cost does not grow with the parameter count. check_modes_equal compares every
        # gradient entry of each mode against autograd through the reference loop.
        torch.autograd.gradcheck(fn, (x, *leaves, *params.values()), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)
    except GradcheckError as err:
        raise AssertionError(f"gradcheck failed in mode {mode} (inputs in order: {inputs}):\n{err}") from None


# --------------------------------------------------------------------------- 5. step
def check_step(make: LayerFactory, shape: Shape, seed: int = 0) -> None:
    """``step`` repeated T times == ``forward`` in the recurrent mode (check 5; causal layers)."""
    torch.manual_seed(seed)
    layer = make(shape.D, shape.dtype)
    x = torch.randn(shape.B, shape.T, shape.D, dtype=shape.dtype)
    state0 = random_state(layer, shape.B, shape.dtype)
    with torch.no_grad():
        y_ref, s_ref = layer(x, state0, mode="recurrent")
        state, ys = state0, []
        for t in range(shape.T):
            y_t, state = layer.step(x[:, t], state)
            ys.append(y_t)
        # state=None means the layer's own initial state.
        y_none, s_none = layer.step(x[:, 0], None)
        y_init, s_init = layer.step(x[:, 0], layer.init_state(shape.B))
    assert_close(torch.stack(ys, 1), y_ref, dtype=shape.dtype, what=f"step x{shape.T} vs forward, {shape.id}: y")
    assert_states_close(state, s_ref, shape.dtype, f"step x{shape.T} vs forward, {shape.id}: final state")
    assert_close(y_none, y_init, dtype=shape.dtype, what="step(x_t, None) vs step(x_t, init_state): y_t")
    assert_states_close(s_none, s_init, shape.dtype, "step(x_t, None) vs step(x_t, init_state): state")


# --------------------------------------------------------------------------- 6. bad input
def _leaf_variants(state: State, change: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[tuple[str, State]]:
    """``state`` with one leaf at a time replaced by ``change(leaf)``."""
    leaves, names = flatten_state(state), state_names(state)
    for i, name in enumerate(names):
        yield name, unflatten_state(state, [change(s) if j == i else s for j, s in enumerate(leaves)])


def _wider(s: torch.Tensor) -> torch.Tensor:
    """One more feature in the last dimension (or a feature dimension added to a (B,) leaf)."""
    if s.dim() < 2:
        return s[..., None]
    if s.shape[-1] == 0:  # an empty leaf (e.g. no convolution history): its first feature
        return s.new_zeros(*s.shape[:-1], 1)
    return torch.cat([s, s[..., :1]], -1)


def bad_input_cases(layer: Recurrence) -> list[tuple[str, Callable[[], Any]]]:
    """``(label, thunk)`` pairs; each thunk must raise ``InputError`` with "expected" in the message."""
    B, T, D = 3, 5, layer.d_input
    x = torch.randn(B, T, D)
    state = layer.init_state(B)
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("forward: 2-D x", lambda: layer(x[:, 0])),
        ("forward: 4-D x", lambda: layer(x[None])),
        ("forward: wrong feature size", lambda: layer(torch.randn(B, T, D + 1))),
        ("forward: float64 x to a float32 layer", lambda: layer(x.double())),
        ("forward: integer x", lambda: layer(torch.randint(0, 3, (B, T, D)))),
        ("forward: not a tensor", lambda: layer(x.tolist())),
        ("lengths: 2-D", lambda: layer(x, lengths=torch.full((1, B), T))),
        ("lengths: float dtype", lambda: layer(x, lengths=torch.full((B,), float(T)))),
        ("lengths: wrong batch size", lambda: layer(x, lengths=torch.full((B + 1,), T))),
        ("lengths: contains 0", lambda: layer(x, lengths=torch.tensor([T, 0, 1]))),
        ("lengths: contains T+1", lambda: layer(x, lengths=torch.tensor([T + 1, T, 1]))),
        ("lengths: list with a float", lambda: layer(x, lengths=[T, 2.0, 1])),
        ("mode: unknown name", lambda: layer(x, mode="no-such-mode")),
        ("state: wrong batch size", lambda: layer(x, layer.init_state(B + 1))),
        ("state: float64 for a float32 layer", lambda: layer(x, layer.init_state(B, dtype=torch.float64))),
        ("check_finite: NaN at a valid step", lambda: layer(_with_nan(x, 1, T - 1), check_finite=True)),
        ("check_finite: Inf at a valid step", lambda: layer(_with_nan(x, 0, 0, math.inf), check_finite=True)),
        ("check_finite: NaN at a valid step of a padded batch",
         lambda: layer(_with_nan(x, 1, 1), lengths=[T, 2, 1], check_finite=True)),
    ]
    for m in MODE_NAMES:
        if m not in layer.modes:
            cases.append((f"mode: {m!r}, which this layer does not declare", lambda m=m: layer(x, mode=m)))
    for name, bad in _leaf_variants(state, _wider):
        cases.append((f"state: {name} with a wrong feature size", lambda bad=bad: layer(x, bad)))
    if isinstance(state, torch.Tensor):
        cases.append(("state: a tuple where a tensor is expected", lambda: layer(x, (state,))))
        cases.append(("state: a pair where a tensor is expected", lambda: layer(x, (state, state))))
    else:
        cases.append(("state: a tensor where a tuple is expected", lambda: layer(x, flatten_state(state)[0])))
        cases.append(("state: a tuple with a part missing", lambda: layer(x, tuple(state)[:-1])))
        cases.append(("state: a tuple with an extra part", lambda: layer(x, tuple(state) + (flatten_state(state)[0],))))
    if type(layer).causal:
        x_t = x[:, 0]
        cases += [
            ("step: 3-D x_t", lambda: layer.step(x)),
            ("step: 1-D x_t", lambda: layer.step(x_t[0])),
            ("step: wrong feature size", lambda: layer.step(torch.randn(B, D + 1))),
            ("step: float64 x_t", lambda: layer.step(x_t.double())),
            ("step: integer x_t", lambda: layer.step(torch.randint(0, 3, (B, D)))),
            ("step: state with wrong batch size", lambda: layer.step(x_t, layer.init_state(B + 1))),
            ("step: float64 state", lambda: layer.step(x_t, layer.init_state(B, dtype=torch.float64))),
        ]
        for name, bad in _leaf_variants(state, _wider):
            cases.append((f"step: {name} with a wrong feature size", lambda bad=bad: layer.step(x_t, bad)))
    return cases


def _with_nan(x: torch.Tensor, b: int, t: int, value: float = math.nan) -> torch.Tensor:
    x = x.clone()
    x[b, t, 0] = value
    return x


def check_bad_inputs(make: LayerFactory, name: str | None = None) -> None:
    """Every bad input raises ``InputError`` saying "expected ..." (check 6).

    Also: NaN only in padding with ``check_finite=True`` runs in every mode; a non-causal layer's
    ``step`` raises ``InputError``; and, given the registry ``name``, ``build`` rejects unknown
    options and an unknown layer name.
    """
    torch.manual_seed(0)
    layer = make(5, torch.float32)
    cases = bad_input_cases(layer)
    if name is not None:
        cases.append(("build: unknown option", lambda: rnnkit.layers.build(name, d_model=5, no_such_option=1)))
        cases.append(("build: unknown layer", lambda: rnnkit.layers.build("no-such-layer")))
    failures = []
    for label, thunk in cases:
        try:
            thunk()
        except InputError as err:
            if "expected" not in str(err):
                failures.append(f"{label}: InputError without 'expected ...': {err}")
        except Exception as err:  # noqa: BLE001 - any other exception type is the failure we report
            failures.append(f"{label}: raised {type(err).__name__} instead of InputError: {err}")
        else:
            failures.append(f"{label}: did not raise")
    if not type(layer).causal:
        with pytest.raises(InputError):  # the base class says why; no "expected" to check
            layer.step(torch.randn(3, layer.d_input))
    x = torch.randn(3, 5, layer.d_input)
    for mode in layer.modes:
        try:
            y, _ = layer(_with_nan(x, 1, 4), lengths=[5, 2, 1], mode=mode, check_finite=True)
        except InputError as err:
            failures.append(f"check_finite, mode {mode}: NaN only in padding raised: {err}")
        else:
            if not bool(torch.isfinite(y).all()):
                failures.append(f"check_finite, mode {mode}: NaN only in padding gave non-finite y")
    if failures:
        raise AssertionError(f"{len(failures)} bad-input case(s) failed:\n  " + "\n  ".join(failures))


# --------------------------------------------------------------------------- 7. state API and auto
def check_state_api(make: LayerFactory) -> None:
    """``state_size`` == numel of ``init_state(1)``; ``state_size_at`` grows to it; leaves batch-first;
    forward returns that layout."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        layer = make(5, dtype)
        one = layer.init_state(1)
        numel = sum(s.numel() for s in flatten_state(one))
        if layer.state_size != numel:
            raise AssertionError(f"state_size {layer.state_size} != total numel of init_state(1) {numel}")
        # A state may grow with the context (a KV cache) up to its capacity, never shrink or exceed it.
        sizes = [layer.state_size_at(T) for T in (0, 1, 7, 64, 10**9)]
        if sizes != sorted(sizes) or not all(isinstance(n, int) and 0 <= n <= numel for n in sizes) or sizes[-1] != numel:
            raise AssertionError(f"state_size_at(0, 1, 7, 64, 1e9) = {sizes}: expected ints, nondecreasing, "
                                 f"within [0, state_size = {numel}] and equal to it at 1e9")
        for B in (1, 3):
            state = layer.init_state(B)
            assert_same_structure(batch_slice(state, 0), one, f"init_state({B})[0:1] vs init_state(1)")
            for name, s in zip(state_names(state), flatten_state(state)):
                if s.dim() < 1 or s.shape[0] != B:
                    raise AssertionError(f"init_state({B}): {name} has shape {tuple(s.shape)}, expected batch first")
                if s.dtype != dtype:
                    raise AssertionError(f"init_state({B}): {name} has dtype {s.dtype}, expected the layer's {dtype}")
            other = torch.float64 if dtype == torch.float32 else torch.float32
            for name, s in zip(state_names(state), flatten_state(layer.init_state(B, dtype=other))):
                if s.dtype != other:
                    raise AssertionError(f"init_state({B}, dtype={other}): {name} has dtype {s.dtype}")
            with torch.no_grad():
                for mode in layer.modes:
                    _, final = layer(torch.randn(B, 4, layer.d_input, dtype=dtype), mode=mode)
                    assert_same_structure(final, state, f"mode {mode}: final state vs init_state({B})")
                    for name, s in zip(state_names(final), flatten_state(final)):
                        if s.dtype != dtype:
                            raise AssertionError(f"mode {mode}: final {name} has dtype {s.dtype}, expected {dtype}")


def check_auto_mode(make: LayerFactory, shape: Shape, seed: int = 0) -> None:
    """``mode="auto"`` (the default) runs and equals, bitwise, the result of some declared mode."""
    torch.manual_seed(seed)
    layer = make(shape.D, shape.dtype)
    x = torch.randn(shape.B, shape.T, shape.D, dtype=shape.dtype)
    state0 = random_state(layer, shape.B, shape.dtype)
    lengths = list(shape.lengths) if shape.lengths is not None else None
    with torch.no_grad():
        y_auto, s_auto = layer(x, state0, lengths=lengths)
        report = []
        for mode in layer.modes:
            y, s = layer(x, state0, lengths=lengths, mode=mode)
            same_state = all(torch.equal(a, b) for a, b in zip(flatten_state(s_auto), flatten_state(s)))
            if torch.equal(y_auto, y) and same_state:
                return
            report.append(f"{mode}: max-abs y difference {(y_auto - y).abs().max().item():.3e}")
    raise AssertionError(f"mode='auto' on {shape.id} equals no declared mode bitwise: " + "; ".join(report))


def check_declaration(make: LayerFactory) -> None:
    """The instance declares a valid contract: ``recurrent`` first, known modes, widths as built."""
    torch.manual_seed(0)
    layer = make(5, torch.float32)
    modes = layer.modes
    if not modes or modes[0] != "recurrent" or len(set(modes)) != len(modes):
        raise AssertionError(f"modes: expected distinct names starting with 'recurrent', got {modes}")
    unknown = [m for m in modes if m not in MODE_NAMES]
    if unknown:
        raise AssertionError(f"modes: expected names from {MODE_NAMES}, got {unknown}")
    if layer.d_input != 5:
        raise AssertionError(f"d_input: expected d_model = 5, got {layer.d_input}")
    if not isinstance(layer.d_output, int) or layer.d_output < 1:
        raise AssertionError(f"d_output: expected a positive int, got {layer.d_output!r}")
    if layer.training:
        raise AssertionError("factory must return the layer in eval mode")
