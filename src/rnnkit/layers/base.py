"""The Recurrence contract shared by every layer in rnnkit.

Shapes: ``B`` batch, ``T`` time, ``D`` features; inputs are batch-first.

    y, state = layer(x, state=None, lengths=None, mode="auto")   # x (B, T, D_in) -> y (B, T, D_out)
    y_t, state = layer.step(x_t, state)                            # x_t (B, D_in) -> y_t (B, D_out)
    state = layer.init_state(batch_size)
    layer.state_size                                               # floats of state per sequence
    layer.state_size_at(T)                                         # ... after T steps (a KV cache grows)
    layer.modes                                                    # e.g. ("recurrent", "fused")

The base class validates everything at the public boundary (raising :class:`rnnkit.InputError`),
zeroes right padding so that nothing written there can reach valid outputs, resolves ``mode="auto"``
and fills in a zero initial state; subclasses implement ``_forward``, ``_step`` and ``_init_state``
on clean inputs.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch import nn

from rnnkit.errors import (
    InputError,
    check_choice,
    check_device,
    check_floating,
    check_lengths,
    check_positive_int,
    check_shape,
    check_tensor,
    describe,
)

#: Every mode name rnnkit knows, in the order of docs/design.md.
MODE_NAMES = ("recurrent", "parallel", "chunk", "conv", "fused", "newton")

State = Any  # a tensor, or a (named) tuple of states


def map_state(fn: Callable[..., torch.Tensor], *states: State) -> State:
    """Apply ``fn`` leaf-wise over one or more states of identical structure.

    Example:
        >>> detached = map_state(torch.Tensor.detach, state)
    """
    first = states[0]
    if isinstance(first, torch.Tensor):
        return fn(*states)
    if isinstance(first, tuple):
        parts = [map_state(fn, *group) for group in zip(*states)]
        # NamedTuples rebuild from positional fields, plain tuples from an iterable.
        return type(first)(*parts) if hasattr(first, "_fields") else tuple(parts)
    raise InputError(f"state: expected a tensor or a tuple of tensors, got {describe(first)}")


def _cast_state(state: State, dtype: torch.dtype, accepted: tuple[torch.dtype, ...]) -> State:
    """``state`` with every tensor of an ``accepted`` dtype cast to ``dtype``; anything else (including
    malformed parts, which validation reports next) is left as it is."""
    if isinstance(state, torch.Tensor):
        return state.to(dtype) if state.dtype in accepted else state
    if isinstance(state, tuple):
        parts = [_cast_state(part, dtype, accepted) for part in state]
        return type(state)(*parts) if hasattr(state, "_fields") else tuple(parts)
    return state


def flatten_state(state: State) -> list[torch.Tensor]:
    """All tensors of a state in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state]
    return [leaf for part in state for leaf in flatten_state(part)]


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``(B, T)`` bool mask, True at valid (non-padding) steps."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class Recurrence(nn.Module):
    """Base class of every rnnkit recurrence (see the module docstring for the contract).

    Subclasses set ``d_input`` and ``d_output`` and implement:

    - ``_forward(x, state, lengths, mode) -> (y, state)`` with ``x`` (B, T, D_in) already validated,
      padding already zeroed, ``state`` never ``None`` and ``mode`` one of ``self.modes``;
    - ``_step(x_t, state) -> (y_t, state)``;
    - ``_init_state(batch_size, device, dtype) -> state``.

    A layer that reads a per-step input besides ``x`` (CfC's elapsed time ``dt``) names it in
    :attr:`STEP_INPUTS`; callers pass it as a keyword argument of :meth:`forward` (``(B, T)``) and
    :meth:`step` (``(B,)``), the base class checks its shape, dtype and device, and hands it on as a
    keyword argument of ``_forward`` and ``_step`` (only when given).

    Outputs past a sequence's length are zeroed here; subclasses must return the state at each
    sequence's last valid step.
    """

    #: Modes this layer class implements; ``recurrent`` (the reference) is always first.
    MODES: ClassVar[tuple[str, ...]] = ("recurrent",)
    #: False for layers (bidirectional) whose output at t depends on inputs after t.
    causal: ClassVar[bool] = True
    #: Set by :func:`rnnkit.layers.register`.
    name: ClassVar[str] = ""
    #: Wrappers (stacks, bidirectional) pass ``mode="auto"`` down so each inner layer resolves it
    #: for its own device and shape.
    delegates_auto: ClassVar[bool] = False
    #: False for layers whose kernels need one dtype throughout (compiled scans, complex FFT
    #: convolutions): under ``torch.autocast`` they run with autocast off, in the parameters' dtype.
    autocast_safe: ClassVar[bool] = True
    #: Per-step inputs besides ``x`` that :meth:`forward` and :meth:`step` accept as keyword arguments.
    STEP_INPUTS: ClassVar[tuple[str, ...]] = ()
    #: True for layers with a ``depth`` option (their position in a stack, layer index / number of
    #: layers); stacks set it from each layer's position unless it is given
    #: (:func:`rnnkit.layers.pattern.with_depth`).
    takes_depth: ClassVar[bool] = False

    d_input: int
    d_output: int

    # ----------------------------------------------------------------- public contract
    @property
    def modes(self) -> tuple[str, ...]:
        """Modes this instance can run, ``recurrent`` first."""
        return type(self).MODES

    def forward(
        self,
        x: torch.Tensor,
        state: State | None = None,
        lengths: torch.Tensor | Sequence[int] | None = None,
        mode: str = "auto",
        check_finite: bool = False,
        **step_inputs: torch.Tensor | None,
    ) -> tuple[torch.Tensor, State]:
        """Run the recurrence over a whole sequence.

        Args:
            x: ``(B, T, D_in)`` input, same dtype and device as the layer's parameters.
            state: initial state as returned by :meth:`init_state` or a previous call; zeros if None.
            lengths: optional ``(B,)`` integers in ``[1, T]`` for right-padded batches. Outputs past a
                sequence's length are zero and the returned state is the one at its last valid step.
            mode: one of :attr:`modes` or ``"auto"`` (the fastest for this device and shape).
            check_finite: raise :class:`InputError` if a valid (non-padding) input, the passed-in
                state or a per-step input is NaN or Inf.
            **step_inputs: the layer's :attr:`STEP_INPUTS`, each ``(B, T)`` (None: the default).

        Returns:
            ``y`` of shape ``(B, T, D_out)`` and the final state.
        """
        x = self._check_x("x", x, rank=3)
        step_inputs = self._check_step_inputs(step_inputs, x, "(B, T)")
        batch_size, max_len = x.shape[0], x.shape[1]
        if max_len < 1:
            raise InputError(f"x: expected at least one time step (T >= 1), got shape {tuple(x.shape)}")
        lengths = check_lengths(lengths, batch_size, max_len, x.device)
        mask = None
        if lengths is not None:
            mask = length_mask(lengths, max_len)
            # Zero the padding so that no value written there (NaN, Inf) can reach a valid output,
            # a final state or a gradient: every mode then computes on identical valid inputs.
            x = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        if check_finite and not bool(torch.isfinite(x).all()):
            raise InputError("x: expected finite values at valid steps (check_finite=True), got NaN or Inf")
        mode = self._resolve_mode(mode, x)
        if batch_size == 0 and not self.delegates_auto:
            # An empty batch is a valid call with an empty result; the reference loop computes it
            # in every layer, while fast kernels need not accept zero-sized dimensions.
            mode = "recurrent"
        state = self._check_or_init_state(state, batch_size, x)
        if check_finite:
            checked = [("state", leaf) for leaf in flatten_state(state)]
            checked += [(name, value if mask is None else value[mask]) for name, value in step_inputs.items()]
            for name, value in checked:
                if not bool(torch.isfinite(value).all()):
                    raise InputError(f"{name}: expected finite values (check_finite=True), got NaN or Inf")
        with self._autocast_guard(x, mode) as cast:
            y, state = self._forward(cast(x), cast(state), lengths, mode, **step_inputs)
        if mask is not None:
            y = torch.where(mask[..., None], y, torch.zeros((), dtype=y.dtype, device=y.device))
        return y, state

    def step(
        self, x_t: torch.Tensor, state: State | None = None, **step_inputs: torch.Tensor | None
    ) -> tuple[torch.Tensor, State]:
        """Advance the recurrence by one time step with constant memory.

        Args:
            x_t: ``(B, D_in)`` input at one step.
            state: current state (zeros if None).
            **step_inputs: the layer's :attr:`STEP_INPUTS`, each ``(B,)`` (None: the default).

        Returns:
            ``y_t`` of shape ``(B, D_out)`` and the next state.
        """
        if not self.causal:
            raise InputError(
                f"step: expected a causal layer, got {type(self).__name__}, which is not causal (its output "
                "needs the whole sequence); use forward on complete sequences"
            )
        x_t = self._check_x("x_t", x_t, rank=2)
        step_inputs = self._check_step_inputs(step_inputs, x_t, "(B,)")
        state = self._check_or_init_state(state, x_t.shape[0], x_t)
        with self._autocast_guard(x_t, None) as cast:
            return self._step(cast(x_t), cast(state), **step_inputs)

    def _inner_step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """:meth:`step` for a wrapper (a stack) whose own checks of its input and state already cover
        this layer's: the checks are skipped, so that a decoding step through a stack validates once
        rather than once per layer. Under autocast the full :meth:`step` runs, because there it casts
        the state to the dtype of this layer's own input."""
        if x_t.device.type == "meta" or torch.is_autocast_enabled(x_t.device.type):
            return self.step(x_t, state)
        return self._step(x_t, state)

    def init_state(
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> State:
        """The initial state for ``batch_size`` sequences (zeros unless a layer learns it).

        Args:
            batch_size: ``B``.
            device: defaults to the parameters' device.
            dtype: defaults to the parameters' dtype.
        """
        check_positive_int("batch_size", batch_size, minimum=0)
        ref = self._reference_tensor()
        device = torch.device(device) if device is not None else (ref.device if ref is not None else torch.device("cpu"))
        dtype = dtype if dtype is not None else (ref.dtype if ref is not None else torch.get_default_dtype())
        return self._init_state(batch_size, device, dtype)

    @property
    def state_size(self) -> int:
        """Number of floats of recurrent state per sequence."""
        return sum(t.numel() for t in flatten_state(self.init_state(1, device="meta")))

    def state_size_at(self, length: int) -> int:
        """Floats of state per sequence once ``length`` steps have been read.

        A recurrence's state has the same size at every length (``state_size``); a layer whose
        memory grows with the context (``attention``: the KV cache) overrides this, and wrappers
        sum their layers'. Never more than ``state_size``.
        """
        check_positive_int("length", length, minimum=0)
        return self.state_size

    # ----------------------------------------------------------------- subclass hooks
    def _forward(self, x: torch.Tensor, state: State, lengths: torch.Tensor | None, mode: str):
        raise NotImplementedError

    def _step(self, x_t: torch.Tensor, state: State):
        raise NotImplementedError

    def _init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> State:
        raise NotImplementedError

    def _auto_mode(self, x: torch.Tensor) -> str:
        """The mode ``"auto"`` resolves to; by default the last (fastest) declared mode."""
        return self.modes[-1]

    # ----------------------------------------------------------------- validation helpers
    def _reference_tensor(self) -> torch.Tensor | None:
        for p in self.parameters():
            return p
        for b in self.buffers():
            return b
        return None

    def _check_x(self, name: str, x: object, rank: int) -> torch.Tensor:
        x = check_tensor(name, x)
        symbols = "(B, T, D_in)" if rank == 3 else "(B, D_in)"
        check_shape(name, x, [None] * (rank - 1) + [self.d_input], symbols)
        ref = self._reference_tensor()
        if ref is not None:
            autocast = torch.is_autocast_enabled(x.device.type) if x.device.type != "meta" else False
            check_floating(name, x, None if autocast else ref.dtype)
            check_device(name, x, ref.device)
        else:
            check_floating(name, x)
        return x

    def _check_step_inputs(
        self, given: dict[str, torch.Tensor | None], x: torch.Tensor, symbols: str
    ) -> dict[str, torch.Tensor]:
        """The given :attr:`STEP_INPUTS` (None dropped), each checked to be a floating tensor shaped
        like ``x`` without its feature axis, in ``x``'s dtype and on its device."""
        unknown = sorted(set(given) - set(self.STEP_INPUTS))
        if unknown:
            takes = f"its per-step inputs are {self.STEP_INPUTS}" if self.STEP_INPUTS else "it takes no per-step inputs"
            raise InputError(f"{', '.join(unknown)}: not an argument of {type(self).__name__} ({takes})")
        checked = {}
        for name, value in given.items():
            if value is None:
                continue
            value = check_tensor(name, value)
            shape = tuple(x.shape[:-1])
            if tuple(value.shape) != shape:
                raise InputError(f"{name}: expected shape {symbols} = {shape}, got {tuple(value.shape)}")
            check_floating(name, value, x.dtype)
            check_device(name, value, x.device)
            checked[name] = value
        return checked

    def _autocast_safe(self, x: torch.Tensor, mode: str | None) -> bool:
        """Whether the kernel this call runs (``mode``; None for :meth:`step`) takes autocast's mixed
        dtypes. The class's :attr:`autocast_safe` unless a layer's kernels differ by mode."""
        return self.autocast_safe

    @contextlib.contextmanager
    def _autocast_guard(self, x: torch.Tensor, mode: str | None) -> Iterator[Callable[[State], State]]:
        """Context for running a kernel: yields a cast for its inputs. Under autocast, a kernel that is
        not :meth:`_autocast_safe` runs with autocast off, its inputs cast to the parameters' dtype."""
        ref = self._reference_tensor()
        if ref is None or not torch.is_autocast_enabled(x.device.type) or self._autocast_safe(x, mode):
            yield lambda value: value
            return
        with torch.autocast(x.device.type, enabled=False):
            yield lambda value: _cast_state(value, ref.dtype, (torch.float16, torch.bfloat16))

    def _resolve_mode(self, mode: object, x: torch.Tensor) -> str:
        if mode == "auto":
            return "auto" if self.delegates_auto else self._auto_mode(x)
        check_choice("mode", mode, ("auto",) + tuple(self.modes))
        return mode  # type: ignore[return-value]

    def _check_or_init_state(self, state: State | None, batch_size: int, x: torch.Tensor) -> State:
        if state is None:
            return self.init_state(batch_size, device=x.device, dtype=x.dtype)
        if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
            # Under autocast a layer hands back its state in the autocast dtype (bf16); feeding it
            # back continues the stream in the dtype a fresh state of this call would have.
            lower = torch.get_autocast_dtype(x.device.type)
            state = _cast_state(state, x.dtype, (lower, torch.float16, torch.bfloat16, torch.float32))
        self._check_state_like(state, self._state_template(batch_size, x.dtype), "state", x)
        return state

    def _state_template(self, batch_size: int, dtype: torch.dtype) -> State:
        """The initial state on the meta device (shapes and dtypes only), which a passed-in state must
        match. Cached per batch size and dtype: the shapes follow from the layer's configuration,
        fixed at construction, and a decoding step would otherwise rebuild them at every token.
        Tracing (``torch.compile``, ``torch.export``) builds it afresh, leaving the module untouched."""
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return self.init_state(batch_size, device="meta", dtype=dtype)
        templates = self.__dict__.setdefault("_state_templates", {})
        key = (batch_size, dtype)
        if key not in templates:
            if len(templates) >= 8:  # a few batch sizes are reused (a last, smaller batch); bound the rest
                templates.clear()
            templates[key] = self.init_state(batch_size, device="meta", dtype=dtype)
        return templates[key]

    def _check_state_like(self, state: State, expected: State, path: str, x: torch.Tensor) -> None:
        if isinstance(expected, torch.Tensor):
            if not isinstance(state, torch.Tensor):
                raise InputError(f"{path}: expected a tensor of shape {tuple(expected.shape)}, got {describe(state)}")
            if state.shape != expected.shape:
                raise InputError(
                    f"{path}: expected shape {tuple(expected.shape)} (batch first), got {tuple(state.shape)}"
                )
            if state.dtype != expected.dtype:
                raise InputError(f"{path}: expected dtype {expected.dtype}, got {state.dtype}")
            check_device(path, state, x.device)
            return
        if not isinstance(state, tuple) or len(state) != len(expected):
            raise InputError(
                f"{path}: expected {type(expected).__name__} of {len(expected)} tensors, got {describe(state)}"
            )
        fields = getattr(expected, "_fields", None)
        for i, (part, want) in enumerate(zip(state, expected)):
            self._check_state_like(part, want, f"{path}.{fields[i]}" if fields else f"{path}[{i}]", x)

    def extra_repr(self) -> str:
        return f"d_input={self.d_input}, d_output={self.d_output}, modes={self.modes}"
