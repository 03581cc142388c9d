"""Saving and loading models: ``config.json`` + ``model.safetensors``, the layout users know.

Files are written with :func:`rnnkit.atomic.write_atomic`, so a crash mid-write never leaves a
truncated file under the final name. Loading validates everything before
touching the model, so a mismatched or corrupted file is a clear error, never a half-loaded model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rnnkit.atomic import write_atomic, write_json_atomic
from rnnkit.errors import InputError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_model(model: torch.nn.Module, config: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Save ``model``'s weights and its config dict to ``out_dir``.

    Tied parameters (one tensor under two names) are stored once, under their first name.
    """
    out_dir = Path(out_dir)
    seen: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key in seen and tensor.numel():
            continue
        seen[key] = name
        tensors[name] = tensor.detach().cpu().contiguous()
    write_atomic(out_dir / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json_atomic(out_dir / CONFIG_NAME, config)
    return out_dir


def read_json(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """The JSON in ``path``; a missing or malformed file is an :class:`InputError` naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what}: expected {path} to exist, got no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{what}: expected valid JSON in {path}, got {error}") from None


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a saved model directory."""
    return read_json(Path(directory) / CONFIG_NAME)


def read_weights(model: torch.nn.Module, directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` onto the CPU and check it fits ``model``; the model is not touched.

    Tensors are always read to the CPU first, so weights saved from a GPU load on a CPU-only machine.

    Raises:
        InputError: missing or corrupted file, missing or unexpected tensors, shape or dtype mismatches.
    """
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise InputError(f"checkpoint: expected {path} to exist, got no such file")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise InputError(f"checkpoint: expected a readable safetensors file at {path}, got error: {error}") from None
    expected = model.state_dict()
    # Tied parameters were stored once; give every alias the stored tensor.
    by_ptr: dict[int, str] = {}
    for name, tensor in expected.items():
        by_ptr.setdefault(tensor.data_ptr(), name)
    for name, tensor in expected.items():
        first = by_ptr[tensor.data_ptr()]
        if name not in tensors and first in tensors:
            tensors[name] = tensors[first]
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise InputError(
            f"checkpoint: expected the tensors of this model, got missing {missing[:8]} and unexpected {unexpected[:8]}"
        )
    for name, tensor in expected.items():
        if tensors[name].shape != tensor.shape:
            raise InputError(
                f"checkpoint: tensor {name}: expected shape {tuple(tensor.shape)}, got {tuple(tensors[name].shape)}"
            )
        if tensors[name].dtype.is_floating_point != tensor.dtype.is_floating_point:
            raise InputError(f"checkpoint: tensor {name}: expected dtype {tensor.dtype}, got {tensors[name].dtype}")
    return tensors


def load_weights(model: torch.nn.Module, directory: str | os.PathLike, device: str | torch.device = "cpu") -> None:
    """Load ``model.safetensors`` into ``model``, all or nothing (everything is checked first).

    ``device`` is accepted for backward compatibility; tensors are copied to wherever the model's
    parameters live.

    Raises:
        InputError: missing or corrupted file, missing or unexpected tensors, or shape mismatches.
    """
    model.load_state_dict(read_weights(model, directory), strict=True)



#: The model classes that save themselves with :class:`Pretrained`, by the key of their config in
#: ``config.json``; :func:`load_pretrained` picks from it.
PRETRAINED_CLASSES: dict[str, type] = {}


class Pretrained:
    """Mixin of the models configured by one dataclass: building from a config or its fields, and
    ``save_pretrained``/``from_pretrained`` (``config.json`` holds the config under ``CONFIG_KEY``,
    next to ``model.safetensors``). Subclasses set ``CONFIG_KEY`` and ``CONFIG_CLASS`` and are listed
    in :data:`PRETRAINED_CLASSES`."""

    CONFIG_KEY: str
    CONFIG_CLASS: type

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "CONFIG_KEY" in cls.__dict__:
            PRETRAINED_CLASSES[cls.CONFIG_KEY] = cls

    @classmethod
    def resolve_config(cls, config: Any, fields: dict[str, Any]) -> Any:
        """``config``, or one built from ``fields`` (giving both is an InputError)."""
        if config is None:
            return cls.CONFIG_CLASS(**fields)
        if fields:
            raise InputError(f"{cls.__name__}: expected a config or keywords, got both ({sorted(fields)})")
        return config

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``out_dir`` (atomically)."""
        from rnnkit import __version__

        return save_model(self, {self.CONFIG_KEY: self.config.to_dict(), "rnnkit_version": __version__}, out_dir)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu"):
        """Load a model saved by :meth:`save_pretrained` onto ``device``."""
        data = read_config(directory)
        if cls.CONFIG_KEY not in data:
            raise InputError(
                f"checkpoint: expected a {cls.CONFIG_KEY!r} entry in {directory}/config.json, got keys {sorted(data)}"
            )
        model = cls(cls.CONFIG_CLASS.from_dict(data[cls.CONFIG_KEY]))
        load_weights(model, directory)
        return model.to(device)


def load_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model saved in ``directory`` (by ``save_pretrained`` or a Trainer), as the class its
    ``config.json`` names: ``"model"`` a :class:`~rnnkit.models.SequenceModel`, ``"seq2seq"`` a
    :class:`~rnnkit.models.Seq2Seq`, ``"pointer"`` a :class:`~rnnkit.models.PointerNetwork`.

    Raises:
        InputError: no ``config.json``, or one that names none of these models.
    """
    import rnnkit.models  # noqa: F401  (defines every model class, which lists itself)
    from rnnkit.models.model import SequenceModel

    data = read_config(directory)
    if "model" in data:
        return SequenceModel.from_pretrained(directory, device)
    for key, cls in PRETRAINED_CLASSES.items():
        if key in data:
            return cls.from_pretrained(directory, device)
    expected = sorted(["model", *PRETRAINED_CLASSES])
    raise InputError(f"checkpoint: expected one of the entries {expected} in {directory}/config.json, "
                     f"got keys {sorted(data)}")
