"""Taking a trained :class:`~rnnkit.models.SequenceModel` out of Python-rnnkit.

Two programs, each written as a ``torch.export`` program (``.pt2``: ``torch.export.load`` runs it
with PyTorch alone) and/or an ONNX file (``.onnx``, from PyTorch's dynamo exporter; onnxruntime
and the other ONNX runtimes run it):

- ``forward``: ``(x, lengths) -> (output, *final_state)``, the whole-sequence forward over ``T``
  steps, ``T`` fixed when exporting (shorter sequences are right-padded and ``lengths``, in
  ``[1, T]``, says where each ends), any batch size. ``x`` is ``(B, T)`` int64 token ids or
  ``(B, T, d_input)`` features; ``output`` is what :meth:`SequenceModel.forward` returns
  (``(B, T, n_outputs)`` logits for an ``lm`` head, ``(B, n_outputs)`` for ``classify`` and
  ``regress``); ``final_state`` is the state at each sequence's last valid step, ready for ``step``.
- ``step``: ``(x_t, *state) -> (logits, *next_state)``, one step of an ``lm`` model with its
  recurrent state passed in and out as a flat tuple of tensors, any batch size.

A state is a tree of tensors (a tuple with a state per layer, named tuples inside); the programs
take and return its leaves in :func:`rnnkit.layers.flatten_state` order. ``manifest.json`` records
each leaf's name (its path in the tree: ``state.0.h``), shape and dtype, and the tree itself, so
that a caller can rebuild it (:func:`state_from_leaves`). The initial state is zeros.

``forward`` runs one of the layer's modes: the first, from the fastest, that the format can
express; the manifest says which. A program that a model cannot give in a format (``step`` of a
model that is not causal or has no ``lm`` head, a forward that no mode traces) raises
:class:`~rnnkit.errors.ExportError` saying why. docs/layers.md lists what each layer exports to
(``tests/models/test_export.py`` derives that table and checks it).

Example:
    >>> model.export("out", format="both", what="both", seq_len=128)
    >>> step = torch.export.load("out/step.pt2").module()
    >>> logits, *state = step(x_t, *state)       # state: the leaves, as the manifest lists them
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from rnnkit.atomic import write_atomic, write_json_atomic
from rnnkit.errors import ExportError, InputError, check_positive_int, describe
from rnnkit.layers import flatten_state, map_state
from rnnkit.models.io import read_json
from rnnkit.targets import PER_STEP_HEADS

#: Export formats: ``torch.export`` programs and ONNX files.
FORMATS = ("pt2", "onnx")
#: The programs a model exports.
PROGRAMS = ("forward", "step")
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "rnnkit-export"
MANIFEST_VERSION = 1
#: The symbol of the free batch dimension in the manifest's shapes.
BATCH = "B"
#: Batch size of the example inputs the programs are traced with (any size >= 1 runs them): not 1,
#: which tracing would take for a constant.
_EXAMPLE_BATCH = 2
#: ONNX models this large may keep their weights in a ``.data`` file named after the graph's file
#: (a protobuf file holds at most 2 GiB), so they are written in place instead of renamed into it.
_ONNX_INLINE_BYTES = 1 << 30
#: Loggers that print whole graphs when a mode fails to trace, which the next mode then replaces.
_TRACE_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export", "torch.onnx")


def parse_choices(name: str, value: str | Sequence[str], options: tuple[str, ...]) -> tuple[str, ...]:
    """``value`` (an option, ``"both"`` or a sequence of options) as a tuple in ``options``' order.

    Raises:
        InputError: an unknown or empty choice.
    """
    given = options if value == "both" else (value,) if isinstance(value, str) else tuple(value)
    unknown = [v for v in given if v not in options]
    if unknown or not given:
        raise InputError(f"{name}: expected one of {list(options)}, 'both' or a list of them, got {value!r}")
    return tuple(option for option in options if option in given)


# --------------------------------------------------------------------------------- state layout
def describe_state(state: Any, prefix: str = "state") -> tuple[Any, list[tuple[str, torch.Tensor]]]:
    """The tree of ``state`` as JSON and its ``(name, leaf)`` pairs in :func:`flatten_state` order.

    In the tree a leaf is its index in the flat tuple, a tuple is ``{"type", "fields", "items"}``
    (``fields`` the field names of a named tuple, whose class name ``type`` gives; None for a plain
    tuple). Names are paths below ``prefix``: ``state.0.h`` is field ``h`` of the first layer's state.
    """
    leaves: list[tuple[str, torch.Tensor]] = []

    def walk(part: Any, path: str) -> Any:
        if isinstance(part, torch.Tensor):
            leaves.append((path, part))
            return len(leaves) - 1
        if not isinstance(part, tuple):
            raise ExportError(f"state: expected a tensor or a tuple of tensors at {path}, got {describe(part)}")
        fields = getattr(part, "_fields", None)
        keys = list(fields) if fields else [str(i) for i in range(len(part))]
        items = [walk(item, f"{path}.{key}") for key, item in zip(keys, part)]
        return {"type": type(part).__name__ if fields else "tuple", "fields": list(fields) if fields else None,
                "items": items}

    return walk(state, prefix), leaves


_NAMED: dict[tuple[str, tuple[str, ...]], type] = {}


def state_from_leaves(tree: Any, leaves: Sequence[torch.Tensor]) -> Any:
    """Rebuild a state from the manifest's ``state.tree`` and its leaves (a named tuple of the
    recorded class name and fields where the model had one, so ``state[0].h`` reads as in rnnkit).

    Raises:
        InputError: ``leaves`` does not hold one tensor per leaf of ``tree``.
    """
    expected = _count_leaves(tree)
    if len(leaves) != expected:
        raise InputError(f"leaves: expected {expected} tensors for this state, got {len(leaves)}")
    return _rebuild(tree, leaves)


def _rebuild(tree: Any, leaves: Sequence[torch.Tensor]) -> Any:
    if isinstance(tree, int):
        return leaves[tree]
    return _tuple_of(tree, [_rebuild(item, leaves) for item in tree["items"]])


def _tuple_of(tree: dict[str, Any], items: list[Any]) -> tuple:
    if not tree["fields"]:
        return tuple(items)
    key = (tree["type"], tuple(tree["fields"]))
    if key not in _NAMED:
        _NAMED[key] = collections.namedtuple(*key)
    return _NAMED[key](*items)


def _count_leaves(tree: Any) -> int:
    return 1 if isinstance(tree, int) else sum(_count_leaves(item) for item in tree["items"])


def _leaf_specs(leaves: list[tuple[str, torch.Tensor]]) -> list[dict[str, Any]]:
    """Name, shape (batch first as ``B``) and dtype of each leaf."""
    return [{"name": name, "shape": [BATCH, *leaf.shape[1:]], "dtype": _dtype_name(leaf.dtype)}
            for name, leaf in leaves]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------- programs
class ForwardProgram(nn.Module):
    """``(x, lengths) -> (output, *final_state)`` of a model in one ``mode`` (what ``forward`` exports)."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output, state = self.model(x, lengths=lengths, mode=self.mode)
        return (output, *flatten_state(state))


class StepProgram(nn.Module):
    """``(x_t, *state) -> (logits, *next_state)`` of an ``lm`` model (what ``step`` exports), the
    state rebuilt from its leaves in the layout of ``template`` (a state of the model)."""

    def __init__(self, model: nn.Module, template: Any) -> None:
        super().__init__()
        self.model, self.template = model, template

    def forward(self, x_t: torch.Tensor, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        found = iter(leaves)
        state = map_state(lambda _: next(found), self.template)
        logits, state = self.model.step(x_t, state)
        return (logits, *flatten_state(state))


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode with no parameter requiring a gradient (an inference program; the
    fast forms write into preallocated buffers, which autograd forbids on tensors it tracks), and
    the trace loggers quiet; everything restored afterwards."""
    training = model.training
    grads = [(p, p.requires_grad) for p in model.parameters()]
    levels = [(logging.getLogger(name), logging.getLogger(name).level) for name in _TRACE_LOGGERS]
    model.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    for logger, _ in levels:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        model.train(training)
        for p, flag in grads:
            p.requires_grad_(flag)
        for logger, level in levels:
            logger.setLevel(level)


def _trace(program: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """``torch.export`` of ``program`` with the batch (dimension 0 of every input) left free.

    A failed trace prints its partial graph to stderr; the error, which says why, is what callers
    report (a forward then tries its next mode), so that print is dropped.
    """
    batch = {0: torch.export.Dim("batch", min=1)}
    # The dynamic shapes follow the signature: the program's *leaves gather into one tuple.
    dynamic = (batch, tuple(batch for _ in args[1:])) if isinstance(program, StepProgram) else (batch,) * len(args)
    with contextlib.redirect_stderr(io.StringIO()):
        return torch.export.export(program, args, dynamic_shapes=dynamic, strict=False)


def _reason(error: BaseException) -> str:
    """The first line of an error, for the list of reasons an export failed."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


class _Mismatch(Exception):
    """A written program that runs but disagrees with the eager model (or does not run)."""


#: How far a program's outputs may be from the eager model's before :func:`_check` rejects it, per
#: dtype: a few ulp of the magnitudes involved (the tests hold fp32 programs to 1e-5).
_CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def _check(fmt: str, program: torch.export.ExportedProgram, path: str, names: list[str],
           args: tuple[torch.Tensor, ...], expected: list[torch.Tensor]) -> bool:
    """Run the program just written to ``path`` on ``args`` (a batch size it was not traced with)
    and compare with ``expected``, the eager model's outputs. False when it cannot be run here
    (ONNX without onnxruntime).

    Raises:
        _Mismatch: it fails or disagrees.
    """
    if fmt == "pt2":
        run = program.module()  # the program just saved
        try:
            got = [t.detach() for t in run(*args)]
        except Exception as error:  # noqa: BLE001 - reported as the reason
            raise _Mismatch(f"the program fails at batch {args[0].shape[0]}: {_reason(error)}") from error
    else:
        try:
            import onnxruntime
        except ImportError:
            return False
        try:
            session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            wanted = {i.name for i in session.get_inputs()}
            feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, args) if n in wanted}
            got = [torch.from_numpy(o) for o in session.run(None, feeds)]
        except Exception as error:  # noqa: BLE001 - onnxruntime's own errors are reported as the reason
            raise _Mismatch(f"onnxruntime fails at batch {args[0].shape[0]}: {_reason(error)}") from error
    if len(got) != len(expected):
        raise _Mismatch(f"the program gives {len(got)} outputs, expected {len(expected)}")
    for i, (a, e) in enumerate(zip(got, expected)):
        e = e.detach().cpu()
        bound = _CHECK_TOLERANCE.get(e.dtype, 3e-2)
        if a.shape != e.shape or not torch.allclose(a.to(e.dtype), e, rtol=bound, atol=bound):
            error = (a.to(e.dtype) - e).abs().max().item() if a.shape == e.shape else f"shape {tuple(a.shape)}"
            raise _Mismatch(f"output {i} differs from the eager model's (max error {error})")
    return True


def _write(fmt: str, program: torch.export.ExportedProgram, path: Path, names: tuple[list[str], list[str]],
           args: tuple[torch.Tensor, ...], expected: list[torch.Tensor]) -> bool:
    """Write ``program`` in ``fmt`` to ``path``, first checked against the eager model (:func:`_check`):
    a program that disagrees is never written. Returns whether the check could run."""
    inputs, outputs = names
    checked = []

    def save_checked(tmp: str) -> None:
        if fmt == "pt2":
            torch.export.save(program, tmp)
        else:
            onnx_program = torch.onnx.export(program, (), dynamo=True, input_names=inputs, output_names=outputs,
                                             verbose=False, optimize=False)
            onnx_program.save(tmp)
        checked.append(_check(fmt, program, tmp, inputs, args, expected))

    if fmt == "onnx":
        _require_onnx()
    size = sum(t.numel() * t.element_size() for t in program.state_dict.values())
    if fmt == "onnx" and size > _ONNX_INLINE_BYTES:
        # The weights go to a .data file named after the graph's file, so it is written in place.
        save_checked(str(path))
    else:
        write_atomic(path, save_checked)
    return checked[0]


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401  (the exporter needs both; say so before it fails deeper)
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ExportError(
            f"format 'onnx': expected the optional packages onnx and onnxscript (pip install 'rnnkit[export]'), "
            f"got {error}"
        ) from None


# --------------------------------------------------------------------------------- export
def export_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    format: str | Sequence[str] = "pt2",
    what: str | Sequence[str] = "both",
    seq_len: int | None = None,
) -> dict[str, Any]:
    """Export ``model`` to ``out_dir``: ``forward.pt2``, ``step.pt2``, ``forward.onnx``,
    ``step.onnx`` (those asked for) and ``manifest.json``.

    Args:
        model: a :class:`~rnnkit.models.SequenceModel`, on the device the programs will run on.
        out_dir: directory to write into (created; files of the same names are replaced).
        format: ``"pt2"``, ``"onnx"``, ``"both"`` or a list of them.
        what: ``"forward"``, ``"step"``, ``"both"`` or a list of them.
        seq_len: ``T`` of the exported ``forward`` (needed with it).

    Returns:
        The manifest (also written as ``manifest.json``).

    Raises:
        ExportError: a program the model cannot give in a format, with the reason.
        InputError: bad arguments.
    """
    from rnnkit.models.model import SequenceModel

    if not isinstance(model, SequenceModel):
        raise InputError(f"model: expected a SequenceModel, got {describe(model)}")
    formats = parse_choices("format", format, FORMATS)
    programs = parse_choices("what", what, PROGRAMS)
    if "forward" in programs:
        if seq_len is None:
            raise InputError("seq_len: expected the sequence length T of the exported forward, got None")
        check_positive_int("seq_len", seq_len)
    config = model.config
    if "step" in programs:
        _check_steppable(model)
    ref = next(model.parameters())
    template = model.init_state(_EXAMPLE_BATCH, device=ref.device, dtype=ref.dtype)
    tree, leaves = describe_state(template)
    if any(bool(leaf.any()) for _, leaf in leaves):
        raise ExportError(f"state: expected a zero initial state (the manifest records zeros), got a non-zero one "
                          f"from layer {config.layer!r}")
    out_dir = Path(out_dir)
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "rnnkit_version": _rnnkit_version(),
        "torch_version": torch.__version__,
        "model": config.to_dict(),
        "dtype": _dtype_name(ref.dtype),
        "device": str(ref.device),
        "input": {"kind": "tokens", "vocab_size": config.vocab_size} if config.vocab_size is not None
        else {"kind": "features", "d_input": config.d_input},
        "head": config.head,
        "n_outputs": config.n_outputs,
        "state": {"initial": "zeros", "leaves": _leaf_specs(leaves), "tree": tree},
        "artefacts": {},
    }
    with _frozen(model):
        if "forward" in programs:
            _export_forward(model, out_dir, formats, seq_len, manifest, ref)
        if "step" in programs:
            _export_step(model, out_dir, formats, template, manifest, ref)
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    return manifest


def step_exportable(model: nn.Module) -> bool:
    """Whether ``model`` has a ``step`` program: a per-step head (a prediction at every step) on a
    causal body."""
    return model.config.head in PER_STEP_HEADS and model.body.causal


def _check_steppable(model: nn.Module) -> None:
    config = model.config
    if config.head not in PER_STEP_HEADS:
        raise ExportError(f"what='step': expected a model with a per-step head {PER_STEP_HEADS}, got "
                          f"head={config.head!r}, which reads whole sequences; export 'forward'")
    if not model.body.causal:
        raise ExportError(f"what='step': expected a causal model, got layer {config.layer!r} with "
                          f"bidirectional={config.bidirectional} (its output needs the whole sequence); "
                          "export 'forward'")


def _inputs(model: nn.Module, ref: torch.Tensor, steps: int | None) -> torch.Tensor:
    """Example ``x`` (B, T[, d_input]) or ``x_t`` (B[, d_input]) (``steps`` None)."""
    config = model.config
    shape = (_EXAMPLE_BATCH,) if steps is None else (_EXAMPLE_BATCH, steps)
    if config.vocab_size is not None:
        return torch.randint(0, config.vocab_size, shape, device=ref.device)
    return torch.randn(*shape, config.d_input, device=ref.device, dtype=ref.dtype)


def _x_spec(model: nn.Module, name: str, steps: int | None, ref: torch.Tensor) -> dict[str, Any]:
    config = model.config
    shape: list[Any] = [BATCH] if steps is None else [BATCH, steps]
    if config.vocab_size is not None:
        return {"name": name, "shape": shape, "dtype": "int64", "range": [0, config.vocab_size - 1]}
    return {"name": name, "shape": [*shape, config.d_input], "dtype": _dtype_name(ref.dtype)}


def _output_spec(model: nn.Module, seq_len: int | None, ref: torch.Tensor) -> dict[str, Any]:
    config = model.config
    name = "prediction" if config.head.startswith("regress") else "logits"
    per_step = config.head in PER_STEP_HEADS and seq_len is not None
    shape = [BATCH, seq_len, config.n_outputs] if per_step else [BATCH, config.n_outputs]
    return {"name": name, "shape": shape, "dtype": _dtype_name(ref.dtype)}


def _renamed(specs: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """State leaf specs with their leading ``state`` replaced by ``prefix``."""
    return [dict(spec, name=prefix + spec["name"].removeprefix("state")) for spec in specs]


def _check_inputs(model: nn.Module, ref: torch.Tensor, steps: int | None) -> torch.Tensor:
    """``x`` (or ``x_t``, ``steps`` None) for :func:`_check`: one more sequence than traced with."""
    gen = torch.Generator(device=ref.device).manual_seed(0)
    config = model.config
    shape = (_EXAMPLE_BATCH + 1,) if steps is None else (_EXAMPLE_BATCH + 1, steps)
    if config.vocab_size is not None:
        return torch.randint(0, config.vocab_size, shape, device=ref.device, generator=gen)
    return torch.randn(*shape, config.d_input, device=ref.device, dtype=ref.dtype, generator=gen)


def _export_forward(model, out_dir: Path, formats, seq_len: int, manifest: dict, ref: torch.Tensor) -> None:
    x = _inputs(model, ref, seq_len)
    lengths = torch.full((_EXAMPLE_BATCH,), seq_len, dtype=torch.long, device=ref.device)
    check_x = _check_inputs(model, ref, seq_len)
    check_lengths = torch.tensor([seq_len, max(1, seq_len // 2), 1], device=ref.device)
    leaves = manifest["state"]["leaves"]
    inputs = [_x_spec(model, "x", seq_len, ref),
              {"name": "lengths", "shape": [BATCH], "dtype": "int64", "range": [1, seq_len]}]
    outputs = [_output_spec(model, seq_len, ref), *_renamed(leaves, "final_state")]
    names = ([i["name"] for i in inputs], [o["name"] for o in outputs])
    # Fastest first: a layer lists its modes from the reference loop to its fastest form.
    candidates = list(reversed(model.body.modes))
    traced: dict[str, Any] = {}
    for fmt in formats:
        reasons = []
        for mode in candidates:
            if mode not in traced:
                try:
                    traced[mode] = _trace(ForwardProgram(model, mode), (x, lengths))
                except Exception as error:  # noqa: BLE001 - every failure is a reason to try the next mode
                    traced[mode] = error
            program = traced[mode]
            if isinstance(program, BaseException):
                reasons.append(f"{mode}: {_reason(program)}")
                continue
            with torch.no_grad():
                output, state = model(check_x, lengths=check_lengths, mode=mode)
            expected = [output, *flatten_state(state)]
            try:
                verified = _write(fmt, program, out_dir / f"forward.{fmt}", names, (check_x, check_lengths), expected)
            except ExportError:
                raise
            except Exception as error:  # noqa: BLE001 - a conversion or a check failed: the next mode
                reasons.append(f"{mode}: {_reason(error)}")
                continue
            manifest["artefacts"][f"forward.{fmt}"] = {
                "what": "forward", "format": fmt, "mode": mode, "seq_len": seq_len, "verified": verified,
                "inputs": inputs, "outputs": outputs,
            }
            break
        else:
            raise ExportError(f"what='forward', format={fmt!r}: no mode of layer {model.config.layer!r} exports: "
                              + "; ".join(reasons))


def _export_step(model, out_dir: Path, formats, template, manifest: dict, ref: torch.Tensor) -> None:
    x_t = _inputs(model, ref, None)
    leaves = manifest["state"]["leaves"]
    inputs = [_x_spec(model, "x_t", None, ref), *leaves]
    outputs = [_output_spec(model, None, ref), *_renamed(leaves, "next_state")]
    names = ([i["name"] for i in inputs], [o["name"] for o in outputs])
    try:
        program = _trace(StepProgram(model, template), (x_t, *flatten_state(template)))
    except Exception as error:  # noqa: BLE001 - reported with the layer's name
        raise ExportError(f"what='step': layer {model.config.layer!r} does not trace: {_reason(error)}") from error
    # The check starts from the state after one eager step: a state the model can be in.
    first, check_x = _check_inputs(model, ref, 2).unbind(1)
    with torch.no_grad():
        _, state = model.step(first)
        logits, after = model.step(check_x, state)
    args, expected = (check_x, *flatten_state(state)), [logits, *flatten_state(after)]
    for fmt in formats:
        try:
            verified = _write(fmt, program, out_dir / f"step.{fmt}", names, args, expected)
        except ExportError:
            raise
        except Exception as error:  # noqa: BLE001
            raise ExportError(f"what='step', format={fmt!r}: layer {model.config.layer!r} does not export: "
                              f"{_reason(error)}") from error
        manifest["artefacts"][f"step.{fmt}"] = {"what": "step", "format": fmt, "verified": verified,
                                                "inputs": inputs, "outputs": outputs}


def _rnnkit_version() -> str:
    from rnnkit import __version__

    return __version__


# --------------------------------------------------------------------------------- loading
def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``manifest.json`` of an export directory, checked to be one."""
    path = Path(directory) / MANIFEST_NAME
    manifest = read_json(path, "directory")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise InputError(f"directory: expected an rnnkit export manifest in {path}, got another file")
    if manifest.get("version") != MANIFEST_VERSION:
        raise InputError(f"{path}: expected manifest version {MANIFEST_VERSION}, got {manifest.get('version')!r}")
    return manifest


class ExportedModel:
    """The ``.pt2`` programs of an export directory, run with rnnkit's state trees.

    Args:
        directory: written by :func:`export_model` (``rnnkit export``) with ``format`` pt2.

    Example:
        >>> exported = ExportedModel("out")
        >>> logits, state = exported.step(x_t)                # zero state
        >>> logits, state = exported.step(x_next, state)      # state[0].h, as in rnnkit
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(directory)
        self._programs = {}
        for name, info in self.manifest["artefacts"].items():
            if info["format"] == "pt2":
                self._programs[info["what"]] = torch.export.load(self.directory / name).module()

    def _program(self, what: str):
        if what not in self._programs:
            found = sorted(self.manifest["artefacts"])
            raise InputError(f"{what}: expected {what}.pt2 in {self.directory}, got {found}")
        return self._programs[what]

    def init_state(self, batch_size: int) -> Any:
        """The zero state for ``batch_size`` sequences, as a tree."""
        check_positive_int("batch_size", batch_size)
        state = self.manifest["state"]
        leaves = [torch.zeros(batch_size, *leaf["shape"][1:], dtype=getattr(torch, leaf["dtype"]),
                              device=self.manifest["device"]) for leaf in state["leaves"]]
        return state_from_leaves(state["tree"], leaves)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        """``x`` (B, T) ids or (B, T, d_input) features, ``T`` the exported length -> output, final state."""
        program = self._program("forward")
        if lengths is None:
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        output, *leaves = program(x, lengths)
        return output, state_from_leaves(self.manifest["state"]["tree"], leaves)

    __call__ = forward

    def step(self, x_t: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """``x_t`` (B,) ids or (B, d_input) features and a state (zeros if None) -> logits (B, V), next state."""
        program = self._program("step")
        if state is None:
            state = self.init_state(x_t.shape[0])
        logits, *leaves = program(x_t, *flatten_state(state))
        return logits, state_from_leaves(self.manifest["state"]["tree"], leaves)


__all__ = [
    "BATCH", "FORMATS", "MANIFEST_NAME", "PROGRAMS", "ExportError", "ExportedModel", "ForwardProgram", "StepProgram",
    "describe_state", "export_model", "parse_choices", "read_manifest", "state_from_leaves", "step_exportable",
]
