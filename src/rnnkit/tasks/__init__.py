"""Tasks: synthetic probes and real data sets, each a :class:`Task` in a registry.

Example:
    >>> from rnnkit.tasks import build_task, task_names
    >>> task_names()[:4]
    ['adding', 'copy', 'induction_heads', 'modular_sum']
    >>> task = build_task("parity", variable_length=True)
    >>> batch = next(task.train_batches(batch_size=16, seed=0))
    >>> batch.x.shape, batch.y.shape, batch.lengths.shape
    (torch.Size([16, 64]), torch.Size([16]), torch.Size([16]))

A user's own data: ``build_task("sequences", path="data.csv", label="y")`` reads a long-format CSV/Parquet
table or an ``.npz`` file; :class:`DatasetTask` wraps any ``torch`` (or Hugging Face) data set, and
:func:`collate_sequences` pads ragged examples into a :class:`Batch`.

Adding a task is one module here with a ``@register_task("name")`` class and one import line below.
A task outside the package needs neither: ``build_task("my_module:MyTask")`` (``rnnkit train --task
my_module:MyTask``) imports it, and a package can declare it in the ``rnnkit.tasks`` entry-point group.
"""

from rnnkit.tasks.base import (
    IGNORE_INDEX,
    Batch,
    SyntheticTask,
    Task,
    build_task,
    derive_seed,
    register_task,
    restore_task,
    task_class,
    task_description,
    task_names,
    task_options,
    task_reference,
)

from rnnkit.tasks.text_stream import StreamingTextTask  # noqa: E402  isort: skip
from rnnkit.tasks.collate import IndexedTask, collate_sequences  # noqa: E402  isort: skip
from rnnkit.tasks.dataset import DatasetTask  # noqa: E402  isort: skip

# Imported for their registration side effect.
from rnnkit.tasks import adding, copy_memory, parity, shakespeare, text  # noqa: E402,F401  isort: skip
from rnnkit.tasks import (  # noqa: E402,F401  isort: skip
    fashion_mnist, forecast, induction_heads, memory_curricula, mqar, selective_copy, sequences, set_disjointness,
    state_tracking, ucr,
)
from rnnkit.tasks import g2p, pointer_tasks, seq2seq_tasks  # noqa: E402,F401  isort: skip

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "StreamingTextTask",
    "DatasetTask",
    "IndexedTask",
    "SyntheticTask",
    "Task",
    "build_task",
    "collate_sequences",
    "derive_seed",
    "register_task",
    "restore_task",
    "task_class",
    "task_description",
    "task_names",
    "task_options",
    "task_reference",
]
