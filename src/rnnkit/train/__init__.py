"""Training: the Trainer, its configuration, the learning-rate schedule, checkpoints and logs."""

from rnnkit.train.checkpoint import CheckpointManager, resolve_checkpoint
from rnnkit.train.trainer import (
    TrainConfig, Trainer, describe_metrics, fast_bf16, lr_at, resolve_precision, seed_everything,
)

__all__ = [
    "CheckpointManager", "TrainConfig", "Trainer", "describe_metrics", "fast_bf16", "lr_at",
    "resolve_checkpoint", "resolve_precision", "seed_everything",
]
