"""rnnkit's exception family and the checks that raise it at the public boundary.

Every check here raises :class:`InputError` with a message of the form
``"<argument>: expected <X>, got <Y>"`` so a user can fix the call without reading rnnkit's code.
These are real ``if`` checks, never ``assert`` (which vanishes under ``python -O``).
"""

from __future__ import annotations

from typing import Sequence

import torch


class InputError(ValueError):
    """Bad input or configuration at rnnkit's public boundary.

    A ``ValueError`` so that generic handlers keep working; the message names the argument and
    says what was expected and what was given.
    """


class ExportError(InputError):
    """A model, layer or mode that an export format cannot express (:mod:`rnnkit.models.export`).

    The message names what was asked for (program, format, layer) and why it cannot be written.
    """


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN or infinite during training."""


class ConvergenceError(RuntimeError):
    """An iterative solver stopped without reaching its tolerance (:mod:`rnnkit.ops.newton`).

    Not an :class:`InputError`: the call was valid, the iteration failed on these values. The message
    says how far it got (iterations, last residual, tolerance) and what to change; ``info`` holds the
    solver's diagnostics (a :class:`~rnnkit.ops.newton.NewtonInfo`: the residual of every iteration).
    """

    def __init__(self, message: str, info: object = None) -> None:
        super().__init__(message)
        self.info = info


class DiskFullError(InputError, OSError):
    """A write failed because its file system is full (or the user's quota is spent).

    An :class:`InputError` (the fix is outside rnnkit: free space or write elsewhere) and an
    ``OSError`` (what the failed write raised), so handlers of either kind see it. ``errno`` and
    ``filename`` are those of the failed write; the message names the file and says the disk is full.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "disk full"


def describe(x: object) -> str:
    """Short description of a value for error messages: shape, dtype and device for tensors."""
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"
    if isinstance(x, (tuple, list)):
        return f"{type(x).__name__} of {len(x)} items"
    return f"{type(x).__name__} {x!r}"


def check_tensor(name: str, x: object) -> torch.Tensor:
    """Raise InputError unless ``x`` is a tensor."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name}: expected a torch.Tensor, got {describe(x)}")
    return x


def check_floating(name: str, x: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Raise InputError unless ``x`` is floating point (and of ``dtype`` when given)."""
    if not (x.is_floating_point() or x.is_complex()):
        raise InputError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise InputError(
            f"{name}: expected dtype {dtype} (the layer's parameter dtype; convert with "
            f".to({dtype}) or move the layer with layer.to({x.dtype})), got {x.dtype}"
        )


def check_shape(name: str, x: torch.Tensor, expected: Sequence[int | None], symbols: str) -> None:
    """Raise InputError unless ``x.shape`` matches ``expected`` (``None`` matches any size).

    Args:
        name: argument name for the message.
        x: the tensor to check.
        expected: one entry per dimension; ``None`` accepts any size.
        symbols: the dimension letters for the message, e.g. ``"(B, T, D)"``.
    """
    want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
    if x.dim() != len(expected):
        raise InputError(
            f"{name}: expected a {len(expected)}-D tensor {symbols} = {want}, "
            f"got {x.dim()}-D shape {tuple(x.shape)}"
        )
    for size, want_size in zip(x.shape, expected):
        if want_size is not None and size != want_size:
            raise InputError(f"{name}: expected shape {symbols} = {want}, got {tuple(x.shape)}")


def check_device(name: str, x: torch.Tensor, device: torch.device) -> None:
    """Raise InputError unless ``x`` lives on ``device``."""
    if x.device.type != device.type or (
        device.index is not None and x.device.index is not None and x.device.index != device.index
    ):
        raise InputError(f"{name}: expected a tensor on {device}, got one on {x.device}")


def check_lengths(
    lengths: object, batch_size: int, max_len: int, device: torch.device
) -> torch.Tensor | None:
    """Validate right-padding lengths and return them as an int64 tensor on ``device``.

    Args:
        lengths: ``None`` or a 1-D integer tensor / sequence of ints of size ``B``, each in ``[1, T]``.
        batch_size: ``B``.
        max_len: ``T``.
        device: the input's device.

    Returns:
        ``None`` or a ``(B,)`` int64 tensor on ``device``.
    """
    if lengths is None:
        return None
    if isinstance(lengths, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in lengths):
            raise InputError(f"lengths: expected integers, got {list(lengths)!r}")
        lengths = torch.tensor(lengths, dtype=torch.long)
    if not isinstance(lengths, torch.Tensor):
        raise InputError(f"lengths: expected a 1-D integer tensor of shape (B,), got {describe(lengths)}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise InputError(f"lengths: expected an integer dtype, got {lengths.dtype}")
    if lengths.dim() != 1 or lengths.shape[0] != batch_size:
        raise InputError(
            f"lengths: expected shape (B,) = ({batch_size},), got {tuple(lengths.shape)}"
        )
    # ``torch.export`` traces without values: reading them would fail the trace, so an exported
    # program takes the lengths as given (its manifest states the range it expects).
    if batch_size > 0 and not torch.compiler.is_exporting():
        low, high = int(lengths.min()), int(lengths.max())
        if low < 1 or high > max_len:
            raise InputError(
                f"lengths: expected every value in [1, T] = [1, {max_len}], got min {low}, max {high}"
            )
    return lengths.to(device=device, dtype=torch.long)


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Raise InputError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise InputError(f"{name}: expected one of {list(choices)}, got {value!r}")


def check_bool(name: str, value: object) -> None:
    """Raise InputError unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise InputError(f"{name}: expected a bool, got {describe(value)}")


def check_positive_int(name: str, value: object, minimum: int = 1) -> None:
    """Raise InputError unless ``value`` is an int >= ``minimum`` (bools are rejected).

    A ``torch.SymInt`` (a size that ``torch.export`` or ``torch.compile`` keeps symbolic) counts as an int.
    """
    if not isinstance(value, (int, torch.SymInt)) or isinstance(value, bool):
        raise InputError(f"{name}: expected an int >= {minimum}, got {describe(value)}")
    if value < minimum:
        raise InputError(f"{name}: expected an int >= {minimum}, got {value}")


#: The largest seed torch's generators accept (``torch.manual_seed`` takes unsigned 64-bit seeds).
MAX_SEED = 2**64 - 1


def check_seed(name: str, value: object) -> None:
    """Raise InputError unless ``value`` is an int in ``[0, 2**64 - 1]`` (what a torch generator takes)."""
    check_positive_int(name, value, minimum=0)
    if value > MAX_SEED:
        raise InputError(f"{name}: expected an int in [0, 2**64 - 1], got {value}")


def check_probability(name: str, value: object) -> None:
    """Raise InputError unless ``value`` is a real number in [0, 1)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise InputError(f"{name}: expected a number in [0, 1), got {value!r}")
