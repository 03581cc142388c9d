"""From a task to the model that fits it: head, input kind and output sizes.

A task says what it feeds and what it asks for (``input_kind``, ``target``, vocabulary or feature
sizes, classes per head); this module is the one place that turns that into :class:`ModelConfig`
fields. It reads those attributes only, so models do not import tasks (nor tasks models).
"""

from __future__ import annotations

from typing import Any

from rnnkit.errors import InputError
from rnnkit.models.model import ModelConfig

#: The model head each task target needs.
HEAD_FOR_TARGET = {"per_step": "lm", "classify": "classify", "regress": "regress"}


def task_io(task: Any) -> dict[str, Any]:
    """The :class:`ModelConfig` fields a task fixes: ``head``, ``vocab_size``, ``d_input``, ``n_outputs``.

    Token tasks set ``vocab_size`` (``d_input`` None), feature tasks ``d_input`` (``vocab_size`` None);
    ``n_outputs`` is classes x heads for per-step and classification targets, ``d_output`` for regression.
    """
    if task.target not in HEAD_FOR_TARGET:
        raise InputError(f"task.target: expected one of {sorted(HEAD_FOR_TARGET)}, got {task.target!r}")
    head = HEAD_FOR_TARGET[task.target]
    tokens = task.input_kind == "tokens"
    return {
        "head": head,
        "vocab_size": task.vocab_size if tokens else None,
        "d_input": None if tokens else task.d_input,
        "n_outputs": task.d_output if head == "regress" else task.n_classes * task.n_heads,
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

    An ``lm`` head predicts each step's target (the next token) from the steps before it; a
    bidirectional layer also reads the steps after it, where the answer is, so training would learn
    to copy and the model could not generate.
    """
    wired = task_io(task)
    for name, expected in wired.items():
        got = getattr(config, name)
        if expected is not None and got != expected:
            raise InputError(f"model.{name}: expected {expected!r} for task {task.name!r}, got {got!r}")
    if config.head == "lm" and config.bidirectional:
        raise InputError(
            f"bidirectional: expected False for task {task.name!r}, whose model predicts the next token at every "
            "step (a bidirectional layer would read the answer), got True"
        )


__all__ = ["HEAD_FOR_TARGET", "check_fits", "model_config_for", "task_io"]
