"""Training: the Trainer, its configuration and the learning-rate schedule."""

from rnnkit.train.trainer import TrainConfig, Trainer, describe_metrics, lr_at, seed_everything

__all__ = ["TrainConfig", "Trainer", "describe_metrics", "lr_at", "seed_everything"]
