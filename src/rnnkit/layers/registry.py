"""The layer registry: ``register`` puts a recurrence under the contract tests, the CLI and the models."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from rnnkit.errors import InputError
from rnnkit.layers.base import MODE_NAMES, Recurrence

R = TypeVar("R", bound=type[Recurrence])


@dataclass(frozen=True)
class LayerSpec:
    """What the registry knows about one recurrence.

    Attributes:
        name: registry key, as passed to :func:`build`.
        cls: the ``Recurrence`` subclass.
        description: one line for ``rnnkit list``.
        test_configs: small configurations (without ``d_model``, which the contract suite draws)
            that the shared contract tests run; name -> keyword arguments.
    """

    name: str
    cls: type[Recurrence]
    description: str
    test_configs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def modes(self) -> tuple[str, ...]:
        return self.cls.MODES


_REGISTRY: dict[str, LayerSpec] = {}


def register(
    name: str, *, description: str = "", test_configs: dict[str, dict[str, Any]] | None = None
) -> Callable[[R], R]:
    """Class decorator that registers a recurrence under ``name``.

    Example:
        >>> @register("elman", test_configs={"tanh": {}, "relu": {"nonlinearity": "relu"}})
        ... class Elman(Recurrence): ...
    """

    def decorate(cls: R) -> R:
        if name in _REGISTRY:
            raise InputError(f"register: name {name!r} is already registered to {_REGISTRY[name].cls.__name__}")
        if not cls.MODES or cls.MODES[0] != "recurrent":
            raise InputError(f"register: {cls.__name__}.MODES must start with 'recurrent', got {cls.MODES}")
        unknown = [m for m in cls.MODES if m not in MODE_NAMES]
        if unknown:
            raise InputError(f"register: {cls.__name__}.MODES: expected names from {MODE_NAMES}, got {unknown}")
        cls.name = name
        doc = (cls.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = LayerSpec(
            name=name,
            cls=cls,
            description=description or (doc[0] if doc else ""),
            test_configs=dict(test_configs or {"default": {}}),
        )
        return cls

    return decorate


def names() -> list[str]:
    """Registered layer names, sorted."""
    return sorted(_REGISTRY)


def spec(name: str) -> LayerSpec:
    """The :class:`LayerSpec` of a registered layer."""
    if name not in _REGISTRY:
        raise InputError(f"layer: expected one of {names()}, got {name!r}")
    return _REGISTRY[name]


def build(name: str, **config: Any) -> Recurrence:
    """Build a registered recurrence.

    Args:
        name: a name from :func:`names`.
        **config: the layer's configuration (``d_model`` and layer-specific options).

    Example:
        >>> layer = build("lstm", d_model=64, hidden_size=128)
        >>> y, state = layer(torch.randn(2, 10, 64))   # y: (2, 10, 128)
    """
    return spec(name).cls(**config)


def make_config(config_cls: type, layer: str, kwargs: dict[str, Any]) -> Any:
    """Instantiate a config dataclass, turning unknown or missing fields into a clear InputError."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    renamed = getattr(config_cls, "RENAMED", {})
    for old, new in renamed.items():
        if old in kwargs and old not in fields:
            if new in kwargs:
                raise InputError(f"{layer}: {old!r} is the former name of {new!r}; give one of them, got both")
            # Configurations saved under the former name (checkpoints, results files) keep loading.
            kwargs = {(new if key == old else key): value for key, value in kwargs.items()}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise InputError(f"{layer}: unknown option(s) {unknown}; expected a subset of {sorted(fields)}")
    missing = [
        f.name
        for f in dataclasses.fields(config_cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in kwargs
    ]
    if missing:
        raise InputError(f"{layer}: missing required option(s) {missing}")
    return config_cls(**kwargs)
