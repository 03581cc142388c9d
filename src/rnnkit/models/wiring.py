"""From a task to the model that fits it: head, input kind and output sizes.

A task says what it feeds and what it asks for (``input_kind``, ``target``, vocabulary or feature
sizes, classes per head); this module is the one place that turns that into :class:`ModelConfig`
fields. It reads those attributes only, so models do not import tasks (nor tasks models).
"""

from __future__ import annotations

from typing import Any

from rnnkit.errors import InputError
from rnnkit.models.model import ModelConfig
from rnnkit.models.pointer import PointerConfig
from rnnkit.models.seq2seq import Seq2SeqConfig
from rnnkit.targets import TARGET_KINDS, target_kind

#: The model head each task target needs (the ``head`` column of :data:`rnnkit.targets.TARGET_KINDS`).
HEAD_FOR_TARGET = {name: kind.head for name, kind in TARGET_KINDS.items()}


def task_io(task: Any) -> dict[str, Any]:
    """The :class:`ModelConfig` fields a task fixes: ``head``, ``vocab_size``, ``d_input``, ``n_outputs``.

    Token tasks set ``vocab_size`` (``d_input`` None), feature tasks ``d_input`` (``vocab_size`` None);
    ``n_outputs`` is the target's width (``n_classes`` for class and multi-label targets, ``d_output``
    for real values) times the task's heads per step.
    """
    if getattr(task, "seq2seq", False):
        raise InputError(
            f"task: expected a task for a SequenceModel, got the sequence-to-sequence task {task.name!r}; wire a "
            "Seq2Seq or PointerNetwork to it with seq2seq_config_for (docs/seq2seq.md)"
        )
    kind = target_kind(task.target, "task.target")
    tokens = task.input_kind == "tokens"
    return {
        "head": kind.head,
        "vocab_size": task.vocab_size if tokens else None,
        "d_input": None if tokens else task.d_input,
        "n_outputs": getattr(task, kind.width) * task.n_heads,
    }


def model_config_for(task: Any, **options: Any) -> ModelConfig:
    """A :class:`ModelConfig` wired to ``task`` (:func:`task_io`), with ``options`` for the rest
    (``layer``, ``d_model``, ``num_layers``, ...).

    Raises:
        InputError: ``options`` sets a field the task fixes.
    """
    wired = task_io(task)
    clash = sorted(set(options) & set(wired))
    if clash:
        raise InputError(f"model options: expected none of the fields the task fixes {sorted(wired)}, got {clash}")
    config = ModelConfig(**wired, **options)
    check_fits(config, task)
    return config


def check_fits(config: ModelConfig, task: Any) -> None:
    """Raise InputError unless ``config`` has the head and sizes ``task`` needs, and is causal where
    the task asks for a prediction at every step.

    An ``lm`` head (and any task with ``predicts_next_step``) predicts each step's target (the next
    token or frame) from the steps before it; a
    bidirectional layer also reads the steps after it, where the answer is, so training would learn
    to copy and the model could not generate.
    """
    wired = task_io(task)
    for name, expected in wired.items():
        got = getattr(config, name)
        if expected is not None and got != expected:
            raise InputError(f"model.{name}: expected {expected!r} for task {task.name!r}, got {got!r}")
    if (config.head == "lm" or getattr(task, "predicts_next_step", False)) and config.bidirectional:
        raise InputError(
            f"bidirectional: expected False for task {task.name!r}, whose model predicts the next token or frame at every "
            "step (a bidirectional layer would read the answer), got True"
        )


def seq2seq_io(task: Any) -> dict[str, Any]:
    """The config fields a sequence-to-sequence task fixes: for a pointer task (outputs are source
    positions) the :class:`~rnnkit.models.PointerConfig` field ``d_input``; otherwise the
    :class:`~rnnkit.models.Seq2SeqConfig` fields ``tgt_vocab_size`` and ``src_vocab_size`` (token
    sources) or ``src_d_input`` (feature sources)."""
    if not getattr(task, "seq2seq", False):
        raise InputError(f"task: expected a sequence-to-sequence task, got {task.name!r} "
                         "(wire it with model_config_for)")
    if task.pointer:
        return {"d_input": task.d_input}
    tokens = task.input_kind == "tokens"
    return {"tgt_vocab_size": task.tgt_vocab_size, "src_vocab_size": task.src_vocab_size if tokens else None,
            "src_d_input": None if tokens else task.d_input}


def seq2seq_config_for(task: Any, **options: Any):
    """A :class:`~rnnkit.models.PointerConfig` (pointer tasks) or :class:`~rnnkit.models.Seq2SeqConfig`
    wired to a sequence-to-sequence ``task`` (:func:`seq2seq_io`), with ``options`` for the rest
    (``encoder_layer``, ``attention``, ``d_model``, ...).

    Raises:
        InputError: ``options`` sets a field the task fixes, or a field the config does not have.
    """
    wired = seq2seq_io(task)
    clash = sorted(set(options) & set(wired))
    if clash:
        raise InputError(f"model options: expected none of the fields the task fixes {sorted(wired)}, got {clash}")
    cls = PointerConfig if task.pointer else Seq2SeqConfig
    return cls.from_dict({**wired, **options})


def check_seq2seq_fits(config: Any, task: Any) -> None:
    """Raise InputError unless ``config`` (a Seq2Seq or pointer config) has the kind and sizes ``task`` needs."""
    wired = seq2seq_io(task)
    kind = "PointerConfig" if task.pointer else "Seq2SeqConfig"
    if isinstance(config, PointerConfig) != bool(task.pointer):
        raise InputError(f"model: expected a {kind} for task {task.name!r}, got a {type(config).__name__}")
    for name, expected in wired.items():
        got = getattr(config, name)
        if got != expected:
            raise InputError(f"model.{name}: expected {expected!r} for task {task.name!r}, got {got!r}")


__all__ = ["HEAD_FOR_TARGET", "check_fits", "check_seq2seq_fits", "model_config_for", "seq2seq_config_for",
           "seq2seq_io", "task_io"]
