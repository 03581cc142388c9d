"""Training: the Trainer, its configuration, the learning-rate schedule, checkpoints and logs."""

from rnnkit.train.checkpoint import CheckpointManager, resolve_checkpoint
from rnnkit.train.trainer import TrainConfig, Trainer, describe_metrics, lr_at, seed_everything

__all__ = ["CheckpointManager", "TrainConfig", "Trainer", "describe_metrics", "lr_at", "resolve_checkpoint", "seed_everything"]
