"""The Task contract, the Batch it yields, and the task registry.

A task is a source of batches with fixed train/val/test splits::

    task = build_task("copy", delay=100)
    for batch in task.train_batches(batch_size=32, seed=0):        # infinite, deterministic by seed
        logits = model(batch.x, lengths=batch.lengths)
    for batch in task.eval_batches("val", batch_size=256):          # finite, always the same

Shapes: ``B`` batch, ``T`` time, ``D_in`` input features. Every batch is built on the CPU; the trainer
moves it with :meth:`Batch.to`.

Determinism: a batch is a pure function of its coordinates (task options, seed, split, batch index),
so ``train_batches(..., start=k)`` jumps straight to batch ``k`` and a resumed run continues exactly
where it stopped. Seeds for those coordinates come from :func:`derive_seed`.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, TypeVar

import torch

from rnnkit.errors import InputError, check_choice, check_positive_int, describe
from rnnkit.targets import IGNORE_INDEX, METRICS, TARGETS

INPUT_KINDS = ("tokens", "features")
EVAL_SPLITS = ("val", "test")


@dataclass
class Batch:
    """One batch of a task.

    Attributes:
        x: inputs. ``(B, T)`` int64 token ids when the task's ``input_kind`` is ``"tokens"``, else
            ``(B, T, D_in)`` float32 features.
        y: targets, as the task's ``target`` declares (the table :data:`rnnkit.targets.TARGET_KINDS`):
            ``(B, T)`` int64 class ids with ``IGNORE_INDEX`` (-100) where nothing is predicted
            for ``"per_step"`` (``(B, T, H)`` for a task with ``n_heads = H > 1``: one class
            per head per step); ``(B,)`` int64 classes for ``"classify"``; ``(B, d_output)``
            float32 for ``"regress"``; ``(B, T, d_output)`` float32 for ``"regress_per_step"``;
            ``(B, T, n_classes)`` float32 0/1 labels for ``"multilabel"``. Real-valued per-step
            targets are masked by ``lengths``; NaN at a valid step means "no target there".
        lengths: ``(B,)`` int64 valid lengths, each in ``[1, T]``, for right-padded batches; ``None``
            when every sequence fills all ``T`` steps.
        reset: streaming tasks only: ``True`` when this window starts new streams (the trainer resets
            the recurrent state), ``False`` when it continues the previous window's streams. Always
            ``True`` for tasks made of independent sequences.
    """

    x: torch.Tensor
    y: torch.Tensor
    lengths: torch.Tensor | None
    reset: bool = True

    @property
    def num_tokens(self) -> int:
        """Number of predicted targets, for throughput figures such as tokens/s.

        Per-step class targets (2-D or 3-D integer ``y``) count the entries that are not ``IGNORE_INDEX``;
        real-valued and multi-label per-step targets (3-D float ``y``) count the valid steps;
        per-sequence targets (classification, regression) count one per sequence.
        """
        if self.y.dim() >= 2 and not self.y.is_floating_point():
            return int((self.y != IGNORE_INDEX).sum())
        if self.y.dim() == 3:
            return int(self.lengths.sum()) if self.lengths is not None else self.y.shape[0] * self.y.shape[1]
        return int(self.y.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy of the batch with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.x), move(self.y), move(self.lengths), self.reset)


class Task:
    """Base class of every task; subclasses register with :func:`register_task`.

    Class attributes (set by each subclass; instance attributes where they depend on options or data):
        name: registry key, set by :func:`register_task`.
        description: one line for ``rnnkit list``.
        input_kind: ``"tokens"`` (``x`` is ``(B, T)`` int64) or ``"features"`` (``(B, T, D_in)`` float32).
        vocab_size: number of token ids, for ``"tokens"`` input.
        d_input: ``D_in``, for ``"features"`` input.
        target: what the task predicts, a name of :data:`rnnkit.targets.TARGET_KINDS`: ``"per_step"``
            (a class per step), ``"classify"`` (a class per sequence), ``"regress"`` (values per
            sequence), ``"regress_per_step"`` (values per step) or ``"multilabel"`` (0/1 labels per
            step); see :class:`Batch` for ``y``.
        n_classes: number of classes for ``"per_step"`` and ``"classify"`` targets, of labels for ``"multilabel"``.
        d_output: width of the ``"regress"`` and ``"regress_per_step"`` targets.
        predicts_next_step: ``True`` when a per-step target is the next step of the input (forecasting),
            so the model must be causal (no bidirectional layers). Tasks with ``"per_step"`` targets
            (an ``lm`` head) are always treated so.
        streaming: ``True`` when training batches are consecutive windows of ``B`` parallel streams
            whose recurrent state the trainer carries across windows (truncated BPTT).
        metrics: what the trainer reports, from :data:`rnnkit.targets.METRICS`: ``loss`` per target,
            ``bpc``/``bpb`` bits per character/byte of the text (see :meth:`units_per_target`),
            ``accuracy``, ``mse``, ``f1``.
        default_seq_len: the ``T`` used when ``seq_len=None``.
        n_heads: ``H``, per-step targets per step (multi-head curricula); the model's head then emits
            ``H * n_classes`` logits per step, read as ``(H, n_classes)``. 1 for every other task.
        test_lengths: the ``T`` values at which the benchmark evaluates the test split; lengths beyond
            the training ``T`` measure length generalisation. Default ``(default_seq_len,)``.

    Instances also carry ``options``: the resolved constructor options, enough to rebuild the task
    with ``build_task(task.name, **task.options)``.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    input_kind: str = "tokens"
    vocab_size: int | None = None
    d_input: int | None = None
    target: str = "per_step"
    n_classes: int | None = None
    d_output: int | None = None
    streaming: bool = False
    predicts_next_step: bool = False
    metrics: tuple[str, ...] = ("loss",)
    default_seq_len: int = 0
    n_heads: int = 1

    @property
    def test_lengths(self) -> tuple[int, ...]:
        return (self.default_seq_len,)

    def __init__(self, **options: Any) -> None:
        self.options: dict[str, Any] = dict(options)

    def train_batches(
        self, batch_size: int, seq_len: int | None = None, seed: int = 0, start: int = 0
    ) -> Iterator[Batch]:
        """Infinite iterator of training batches.

        Args:
            batch_size: ``B``.
            seq_len: ``T``; ``None`` means ``default_seq_len``.
            seed: the same ``(batch_size, seq_len, seed)`` gives the same batches.
            start: number of batches to skip; costs O(1), so a resumed run continues exactly where it
                stopped.

        Returns:
            An endless iterator of :class:`Batch`.
        """
        raise NotImplementedError

    def eval_batches(self, split: str, batch_size: int, seq_len: int | None = None) -> Iterator[Batch]:
        """Finite, deterministic iteration over the ``"val"`` or ``"test"`` split.

        Args:
            split: ``"val"`` or ``"test"``.
            batch_size: ``B``.
            seq_len: ``T``; ``None`` means ``default_seq_len``.

        Returns:
            An iterator of :class:`Batch` that visits the whole split once.
        """
        raise NotImplementedError

    def portable_state(self) -> dict[str, Any]:
        """What evaluating and decoding need beyond ``options``, saved with every model trained on the task.

        JSON-serialisable: a vocabulary or tokenizer, normalisation statistics, column names. With it,
        :meth:`restore` rebuilds a task that encodes, decodes and prepares inputs exactly as at training
        time even after the data has moved or changed. Generated tasks have nothing to add: ``{}``.
        """
        return {}

    @classmethod
    def restore(cls, options: dict[str, Any], state: dict[str, Any]) -> "Task":
        """The task a model was trained on, from its saved ``options`` and :meth:`portable_state`.

        Tasks that learn something from their data (a vocabulary, statistics) override this so the
        restored task uses ``state`` instead of recomputing it, and reads its data only when batches
        are asked for. The default rebuilds the task from ``options``.
        """
        return cls(**options)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids ``(len(text),)`` int64 of ``text``; only for tasks with a text vocabulary."""
        raise InputError(f"{self.name}.encode: expected a task with a text vocabulary, got {self.name!r}")

    def decode(self, ids: Any) -> str:
        """Text of a 1-D sequence of token ids; only for tasks with a text vocabulary."""
        raise InputError(f"{self.name}.decode: expected a task with a text vocabulary, got {self.name!r}")

    def stream_decoder(self) -> "StreamDecoder":
        """A decoder for ids that arrive one at a time, as sampling produces them.

        ``decoder.decode(ids)`` returns the text those ids complete; ``decoder.decode([], final=True)``
        whatever is still pending. Tasks whose tokens can end inside a character (byte-level
        vocabularies) hold the partial character back; the default decodes each call on its own.
        """
        return StreamDecoder(self.decode)

    def units_per_target(self, split: str) -> dict[str, float]:
        """Characters (``"bpc"``) and bytes (``"bpb"``) of the original text per predicted target in ``split``.

        The trainer divides the bits per target by these, so ``bpc`` and ``bpb`` are measured per
        character and per byte of the text whatever a token stands for. An absent entry means one
        per target (a character-level task's ``bpc``).
        """
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"


class StreamDecoder:
    """The default :meth:`Task.stream_decoder`: each call decoded on its own by ``decode``."""

    def __init__(self, decode: Callable[[Any], str]) -> None:
        self._decode = decode

    def decode(self, ids: Any, final: bool = False) -> str:
        """The text of ``ids``; ``final`` changes nothing here, since nothing is held back."""
        return self._decode(ids) if len(ids) else ""


T_ = TypeVar("T_", bound=type[Task])

_REGISTRY: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[T_], T_]:
    """Class decorator that registers a :class:`Task` subclass under ``name``.

    The class's declared attributes are checked here, so a malformed task fails at import rather
    than inside a training loop.

    Example:
        >>> @register_task("my_task")
        ... class MyTask(Task):
        ...     '''One line shown by `rnnkit list`.'''
    """

    def decorate(cls: T_) -> T_:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise InputError(f"register_task({name!r}): expected a Task subclass, got {describe(cls)}")
        if name in _REGISTRY:
            raise InputError(
                f"register_task: expected a new name, got {name!r} (already registered to "
                f"{_REGISTRY[name].__name__})"
            )
        check_choice(f"{cls.__name__}.input_kind", cls.input_kind, INPUT_KINDS)
        check_choice(f"{cls.__name__}.target", cls.target, TARGETS)
        unknown = [m for m in cls.metrics if m not in METRICS]
        if unknown:
            raise InputError(f"{cls.__name__}.metrics: expected names from {METRICS}, got {unknown}")
        cls.name = name
        if not cls.description:
            doc = (cls.__doc__ or "").strip().splitlines()
            cls.description = doc[0] if doc else ""
        _REGISTRY[name] = cls
        return cls

    return decorate


#: Entry-point group through which installed packages register tasks (``name = "module:Class"``).
ENTRY_POINT_GROUP = "rnnkit.tasks"

_entry_points_loaded = False


def _load_entry_points() -> None:
    """Register the tasks that installed packages declare in the ``rnnkit.tasks`` entry-point group.

    Loaded once, on the first lookup, so a plug-in package costs nothing until a task is named.
    An entry point's name is its task name; a class that is not yet registered is registered under it.
    """
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name in _REGISTRY:
            continue
        try:
            cls = point.load()
        except Exception as error:  # a broken plug-in must not take every other task down with it
            warnings.warn(f"task plug-in {point.name!r} ({point.value}) could not be loaded: {error}", RuntimeWarning)
            continue
        if cls.name != point.name:
            register_task(point.name)(cls)


def _import_task_class(reference: str) -> type[Task]:
    """The :class:`Task` subclass named by ``"module:Class"`` (a user's own task, not registered)."""
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise InputError(f"task: expected a registered name or 'module:Class', got {reference!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise InputError(f"task: expected an importable module {module_name!r} (from {reference!r}), got {error}") from None
    cls = module
    for part in attr.split("."):
        cls = getattr(cls, part, None)
        if cls is None:
            raise InputError(f"task: expected {module_name!r} to define {attr!r}, got no such attribute")
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise InputError(f"task: expected {reference!r} to be a Task subclass, got {describe(cls)}")
    check_choice(f"{cls.__name__}.input_kind", cls.input_kind, INPUT_KINDS)
    check_choice(f"{cls.__name__}.target", cls.target, TARGETS)
    if not cls.__dict__.get("name"):
        cls.name = reference  # what messages and run summaries call it
    return cls


def task_reference(task: Task | type[Task]) -> str:
    """The name that rebuilds ``task`` with :func:`build_task`: its registry name, or ``"module:Class"``
    for a task class that is not registered (a user's plug-in passed as ``--task module:Class``)."""
    cls = task if isinstance(task, type) else type(task)
    name = getattr(task, "name", "")
    if name and (_REGISTRY.get(name) is cls or (name in _REGISTRY and not issubclass(cls, Task))):
        return name  # registered, or an object standing in for a registered task (it delegates to one)
    return f"{cls.__module__}:{cls.__qualname__}"


def task_names() -> list[str]:
    """Registered task names, sorted (including plug-ins declared through the ``rnnkit.tasks`` entry points)."""
    _load_entry_points()
    return sorted(_REGISTRY)


def task_options(name: str) -> list[str]:
    """The option names that :func:`build_task` accepts for task ``name``, sorted."""
    cls = task_class(name)
    params = inspect.signature(cls.__init__).parameters.values()
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sorted(p.name for p in params if p.name != "self" and p.kind in kinds)


def build_task(name: str, **options: Any) -> Task:
    """Build a registered task, or a user's own :class:`Task` subclass named ``"module:Class"``.

    Args:
        name: one of :func:`task_names`, or ``"module:Class"`` for a class importable from the
            current environment (the working directory is on the import path of ``rnnkit``'s CLI).
        **options: the task's constructor options (see its docstring); unknown names raise.

    Returns:
        The :class:`Task` instance.

    Example:
        >>> task = build_task("adding")
        >>> batch = next(task.train_batches(batch_size=4, seq_len=50))
        >>> batch.x.shape, batch.y.shape
        (torch.Size([4, 50, 2]), torch.Size([4, 1]))
    """
    valid = task_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise InputError(f"build_task({name!r}): expected options from {valid}, got unknown {unknown}")
    return task_class(name)(**options)


def task_class(name: str) -> type[Task]:
    """The :class:`Task` subclass called ``name`` (its class attributes describe it): a registered name,
    a plug-in's entry-point name, or ``"module:Class"``."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return _import_task_class(name)
    _load_entry_points()
    if name not in _REGISTRY:
        raise InputError(f"task: expected one of {task_names()} or 'module:Class', got {name!r}")
    return _REGISTRY[name]


def task_description(task: Task) -> dict[str, Any]:
    """``{"name", "options", "state"}``: what :func:`restore_task` needs to rebuild ``task`` for a saved model."""
    return {"name": task_reference(task), "options": dict(getattr(task, "options", {})), "state": task.portable_state()}


def restore_task(description: dict[str, Any]) -> Task:
    """The task described by a saved run's ``{"name", "options", "state"}`` (see :meth:`Task.restore`)."""
    if not isinstance(description, dict) or not isinstance(description.get("name"), str):
        raise InputError(f"checkpoint: expected a task description with a name, got {describe(description)}")
    cls = task_class(description["name"])
    return cls.restore(dict(description.get("options", {})), dict(description.get("state") or {}))


def derive_seed(*keys: object) -> int:
    """A 63-bit seed determined by ``keys`` (ints and strings), well mixed.

    Used to give every (task, split, seed, batch index) its own ``torch.Generator`` so any batch can
    be built directly. A cryptographic hash rather than arithmetic on the keys, so neighbouring
    seeds and indices give unrelated streams and ``("val", ...)`` never meets a train seed.
    """
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generator(*keys: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``keys``."""
    return torch.Generator().manual_seed(derive_seed(*keys))


def check_train_args(batch_size: object, seq_len: object, seed: object, start: object) -> None:
    """Validate the common arguments of ``train_batches`` (``seq_len`` may be ``None``)."""
    check_positive_int("batch_size", batch_size)
    if seq_len is not None:
        check_positive_int("seq_len", seq_len)
    check_positive_int("seed", seed, minimum=0)
    check_positive_int("start", start, minimum=0)


def check_eval_args(split: object, batch_size: object, seq_len: object) -> None:
    """Validate the common arguments of ``eval_batches`` (``seq_len`` may be ``None``)."""
    check_choice("split", split, EVAL_SPLITS)
    check_positive_int("batch_size", batch_size)
    if seq_len is not None:
        check_positive_int("seq_len", seq_len)


class SyntheticTask(Task):
    """Shared machinery of generated tasks (copy, adding, parity).

    Subclasses implement :meth:`generate`, a vectorised function of ``(B, T, generator)``, and
    :meth:`resolve_seq_len`. Train batch ``k`` of seed ``s`` is ``generate(B, T, generator(name,
    "train", s, k))``. The val and test splits are ``eval_examples`` examples drawn once from fixed
    seeds keyed by the split's name (never a train key), cached per ``T``, and cut into batches in
    order; the last batch holds the remainder.
    """

    #: Test lengths as multiples of the default (training) length: 2x and 4x probe length generalisation.
    length_factors: tuple[int, ...] = (1, 2, 4)

    @property
    def test_lengths(self) -> tuple[int, ...]:
        # Only the lengths this task's options can build (e.g. a set that outgrows its alphabet is left out).
        lengths = []
        for factor in self.length_factors:
            try:
                lengths.append(self.resolve_seq_len(factor * self.default_seq_len))
            except InputError:
                continue
        return tuple(lengths)

    def __init__(self, *, eval_examples: int = 1000, **options: Any) -> None:
        check_positive_int("eval_examples", eval_examples)
        super().__init__(eval_examples=eval_examples, **options)
        self.eval_examples = eval_examples
        self._eval_cache: dict[tuple[str, int], Batch] = {}

    def resolve_seq_len(self, seq_len: int | None) -> int:
        """``T`` for a requested ``seq_len`` (``None`` -> default); raise if the task can't use it."""
        return self.default_seq_len if seq_len is None else seq_len

    def generate(self, batch_size: int, seq_len: int, gen: torch.Generator) -> Batch:
        """``batch_size`` fresh examples of length ``seq_len`` drawn from ``gen``."""
        raise NotImplementedError

    def train_batches(
        self, batch_size: int, seq_len: int | None = None, seed: int = 0, start: int = 0
    ) -> Iterator[Batch]:
        check_train_args(batch_size, seq_len, seed, start)
        T = self.resolve_seq_len(seq_len)

        # A plain function returning a generator, so bad arguments raise at the call, not at next().
        def batches() -> Iterator[Batch]:
            k = start
            while True:
                yield self.generate(batch_size, T, generator(self.name, "train", seed, k))
                k += 1

        return batches()

    def eval_batches(self, split: str, batch_size: int, seq_len: int | None = None) -> Iterator[Batch]:
        check_eval_args(split, batch_size, seq_len)
        data = self.eval_set(split, self.resolve_seq_len(seq_len))
        n = self.eval_examples
        return (_take(data, i, min(i + batch_size, n)) for i in range(0, n, batch_size))

    def eval_set(self, split: str, seq_len: int) -> Batch:
        """The whole ``split`` as one batch of ``eval_examples`` examples (cached)."""
        key = (split, seq_len)
        if key not in self._eval_cache:
            self._eval_cache[key] = self.generate(
                self.eval_examples, seq_len, generator(self.name, split, seq_len)
            )
        return self._eval_cache[key]


def _take(batch: Batch, lo: int, hi: int) -> Batch:
    """Examples ``lo:hi`` of a batch of independent sequences, copied so the cache stays intact."""
    lengths = None if batch.lengths is None else batch.lengths[lo:hi].clone()
    return Batch(batch.x[lo:hi].clone(), batch.y[lo:hi].clone(), lengths, batch.reset)
