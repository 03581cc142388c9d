"""Training a :class:`~rnnkit.models.SequenceModel` online inside the Trainer (``TrainConfig.online``).

Each optimizer step of the Trainer reads one batch as it does under backpropagation through time, but
steps through it one time step at a time with :class:`~rnnkit.train.online.OnlineGradient`: the
sensitivities of the state to the parameters (of the embedding or input projection and of the
blocks) are carried forward, so the gradient of every step's loss is complete at that step and
memory does not grow with ``T``. The weights are updated every ``online_every`` time steps, on the
mean loss of the predictions made since the previous update (a window without predictions, such as
the steps before the answer of ``adding``, makes no update), and once more at the end of the batch
for the steps left over; with ``online_every >= T`` there is one update per batch, on the gradient
that backpropagation through the whole batch gives. Updates inside a sequence change the weights the
later steps run with, and the sensitivities carried across an update were computed with the
previous weights: that is online RTRL (Williams & Zipser 1989), exact only up to that drift.

Which models and tasks (:func:`check_online`):

- ``rtrl``: one recurrent layer (``num_layers=1``) of an element-wise kind (:data:`ELEMENTWISE_LAYERS`):
  its state Jacobian is diagonal (``2 x 2`` blocks for ``lru`` and ``s4d``), which makes exact RTRL
  cost ``B S P`` memory. ``uoro``: any causal model.
- Any task whose loss is a sum over time steps: per-step targets (``copy``, language models), and
  per-sequence targets read at each sequence's last step (``adding``, ``--pooling last``). Streaming
  tasks carry the state and the sensitivities from one window to the next (no truncation), and a
  checkpoint holds them, so a resumed run continues exactly. Not: sequence-to-sequence tasks, mean
  pooling (the loss needs every step's output before its gradient is known), dropout, data
  parallelism, bf16.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from rnnkit.errors import InputError
from rnnkit.layers.pattern import expand_pattern
from rnnkit.models.model import SequenceModel
from rnnkit.targets import target_kind
from rnnkit.tasks import Batch, Task
from rnnkit.train.config import TrainConfig
from rnnkit.train.online import ELEMENTWISE_LAYERS, OnlineGradient
from rnnkit.train.optim import clip_gradients

#: The state Jacobian's diagonal blocks of each element-wise layer: 2 for the (re, im) pairs of complex modes.
BLOCK_SIZES = {name: 2 if name in ("lru", "s4d") else 1 for name in ELEMENTWISE_LAYERS}
#: Steps without a loss advanced together (their Jacobians in one call): memory this many times one step's.
ADVANCE_STEPS = 32


def check_online(model: torch.nn.Module, task: Task, config: TrainConfig, world_size: int = 1) -> None:
    """Raise InputError unless ``config.online`` can train ``model`` on ``task`` (module docstring)."""
    method = config.online
    if getattr(task, "seq2seq", False):
        raise InputError(f"online: expected a task whose loss is a sum over time steps, got the sequence-to-sequence "
                         f"task {task.name!r} (train it with backpropagation: leave online unset)")
    if not isinstance(model, SequenceModel):
        raise InputError(f"online: expected a SequenceModel, got {type(model).__name__}")
    cfg = model.config
    kind = target_kind(task.target)
    if not kind.per_step and cfg.pooling != "last":
        raise InputError(f"pooling: expected 'last' with online training (the loss of pooling {cfg.pooling!r} needs "
                         "every step's output before its gradient is known), got "
                         f"{cfg.pooling!r}")
    if not model.body.causal:
        raise InputError("online: expected a causal model (online learning steps through time), got a bidirectional one")
    if cfg.dropout:
        raise InputError(f"dropout: expected 0 with online training, got {cfg.dropout}")
    if world_size > 1:
        raise InputError(f"online: expected one process (online training is not data-parallel), got world size {world_size}")
    if method == "rtrl":
        names = [name for name, _ in expand_pattern(cfg.layer, cfg.num_layers, cfg.layer_options)]
        if len(names) != 1 or names[0] not in ELEMENTWISE_LAYERS:
            got = f"{names[0]!r}" if len(names) == 1 else f"{len(names)} layers ({', '.join(names)})"
            raise InputError(
                f"online: expected, for exact RTRL, a model of one element-wise recurrent layer (one of "
                f"{', '.join(ELEMENTWISE_LAYERS)}, with num_layers=1: their state Jacobian is diagonal), got {got}; "
                "online='uoro' trains any causal model"
            )


class OnlineTraining:
    """The online steps of a Trainer: :meth:`train_batch` runs one batch step by step and updates the
    weights every ``config.online_every`` steps (module docstring).

    Args:
        model: the SequenceModel (checked by :func:`check_online`).
        task: its task.
        config: the run's configuration (``online``, ``online_every``, ``grad_clip``).
        world_size: the processes training together (online training needs exactly one).
    """

    def __init__(self, model: SequenceModel, task: Task, config: TrainConfig, world_size: int = 1) -> None:
        check_online(model, task, config, world_size)
        self.model, self.task, self.config = model, task, config
        self.kind = target_kind(task.target)
        block = None
        if config.online == "rtrl":
            block = BLOCK_SIZES[expand_pattern(model.config.layer, 1, model.config.layer_options)[0][0]]
        # uoro draws its signs from torch's global generator, which checkpoints save and restore.
        self.gradient = OnlineGradient(model.body, config.online, block_size=block, encoder=model.embedding,
                                       verify_blocks=True)

    # ------------------------------------------------------------------ one batch
    def train_batch(self, batch: Batch, continue_stream: bool, optimizer: torch.optim.Optimizer,
                    on_non_finite: Callable[[float, float], None]) -> dict[str, float]:
        """Train on ``batch`` (on the model's device) step by step; ``continue_stream``: its sequences
        continue the previous batch's (a streaming task), else they start from the initial state.

        ``on_non_finite(loss, grad_norm)`` is called for an update whose loss or gradient norm is not
        finite (it raises, or returns to skip it: the rest of the batch is then dropped and the next
        batch starts new sequences).

        Returns:
            ``{"loss": mean loss over the batch's predictions, "grad_norm": the largest gradient norm
            of its updates (before clipping), "updates", "skipped": 0 or 1}``.
        """
        x, y, lengths = batch.x, batch.y, batch.lengths
        B, T = x.shape[0], x.shape[1]
        if not continue_stream or self.gradient.state is None:
            self.gradient.reset(B)
        last = _last_steps(lengths, B, T, y.device)  # (B,) where each sequence ends
        counts = self._step_counts(y, last, lengths, T)  # predictions at each step (T,)
        every = self.config.online_every
        window_ends = [min(T, start + every) - 1 for start in range(0, T, every)]
        window_count = [sum(counts[end - (end % every) : end + 1]) for end in window_ends]  # predictions per window
        counted = [window_count[t // every] for t in range(T)]  # each step's window's predictions
        updates = {end for end, n in zip(window_ends, window_count) if n}  # the steps after which the weights change
        loss_sum, count, largest, done, window_loss = 0.0, 0, 0.0, 0, 0.0
        optimizer.zero_grad(set_to_none=True)
        t = 0
        while t < T:
            if counts[t]:
                loss_fn = self._loss_at(y, last, lengths, t, counted[t])
                _, loss = self.gradient.step(_inputs(x, lengths, t, t + 1)[:, 0], loss_fn)
                window_loss += float(loss) * counted[t]
                stop = t + 1
            else:  # steps without a loss, up to the next update: their Jacobians in one batched call
                stop = t + 1
                while stop < T and not counts[stop] and stop - t < ADVANCE_STEPS and stop - 1 not in updates:
                    stop += 1
                self.gradient.advance(_inputs(x, lengths, t, stop))
            t = stop
            if stop - 1 not in updates:
                continue
            window = counted[stop - 1]
            grad_norm = clip_gradients(self.model, self.config.grad_clip)
            if not (math.isfinite(window_loss) and math.isfinite(grad_norm)):
                on_non_finite(window_loss / window, grad_norm)  # raises unless the update is to be skipped
                optimizer.zero_grad(set_to_none=True)
                self.gradient.state = None  # a non-finite state would poison the steps that follow
                return {"loss": window_loss / window, "grad_norm": grad_norm, "updates": done, "skipped": 1}
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum, count, largest, done = loss_sum + window_loss, count + window, max(largest, grad_norm), done + 1
            window_loss = 0.0
        if not self.task.streaming:
            self.gradient.state = None  # the next batch starts new sequences: nothing to carry or save
        return {"loss": loss_sum / max(count, 1), "grad_norm": largest, "updates": done, "skipped": 0}

    def _step_counts(self, y: torch.Tensor, last: torch.Tensor, lengths: torch.Tensor | None, T: int) -> list[int]:
        """Predictions the loss counts at each step ``(T,)``: per-step targets at their valid steps;
        a per-sequence target at its sequence's last step (``last`` ``(B,)``)."""
        if self.kind.per_step:
            return [self.kind.count(y[:, t : t + 1], _valid_at(lengths, t)) for t in range(T)]
        return (torch.bincount(last, minlength=T) * self.kind.count(y[:1], None)).tolist()

    def _loss_at(self, y: torch.Tensor, last: torch.Tensor, lengths: torch.Tensor | None, t: int, window: int
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The loss of step ``t``'s predictions over the window's count, from the body's output ``(B, D)``."""
        head, kind = self.model.head, self.kind
        if kind.per_step:
            valid = _valid_at(lengths, t)
            return lambda out: kind.loss(head(out)[:, None], y[:, t : t + 1], valid)[0] / window
        rows = (last == t).nonzero().squeeze(1)  # the sequences that end at t
        if rows.numel() == y.shape[0]:
            return lambda out: kind.loss(head(out), y, None)[0] / window
        return lambda out: kind.loss(head(out[rows]), y[rows], None)[0] / window

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any] | None:
        """What an exact resume needs: the carried state and sensitivities of a stream (None when the
        next batch starts new sequences), on the CPU."""
        carry = self.gradient.carry()
        return None if carry is None else {k: v.detach().cpu() for k, v in carry.items()}

    def load_checkpoint_state(self, saved: dict[str, Any] | None) -> None:
        """Restore what :meth:`checkpoint_state` returned."""
        if saved is None:
            self.gradient.state = None
        else:
            self.gradient.load_carry(saved)


def _valid_at(lengths: torch.Tensor | None, t: int) -> torch.Tensor | None:
    """``(B,)`` lengths of the one-step slice at ``t``: 1 where step ``t`` is valid, else 0."""
    return None if lengths is None else (lengths > t).long()


def _inputs(x: torch.Tensor, lengths: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    """Steps ``start`` to ``stop - 1`` of the inputs ``(B, T, ...)``, zero past each sequence's length (as
    the layers' ``forward`` zeroes padding), so that nothing written in the padding reaches a state or a
    sensitivity."""
    part = x[:, start:stop]
    if lengths is None:
        return part
    valid = lengths.to(x.device)[:, None] > torch.arange(start, stop, device=x.device)  # (B, C)
    valid = valid.reshape(*valid.shape, *([1] * (part.dim() - 2)))
    return torch.where(valid, part, torch.zeros((), dtype=part.dtype, device=part.device))


def _last_steps(lengths: torch.Tensor | None, batch: int, steps: int, device: torch.device) -> torch.Tensor:
    """``(B,)`` each sequence's last valid step."""
    if lengths is None:
        return torch.full((batch,), steps - 1, dtype=torch.long, device=device)
    return lengths.to(device).long() - 1


__all__ = ["BLOCK_SIZES", "OnlineTraining", "check_online"]
