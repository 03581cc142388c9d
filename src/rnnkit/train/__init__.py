"""Training: the Trainer, its configuration and the learning-rate schedule."""

from rnnkit.train.trainer import (
    TrainConfig, Trainer, describe_metrics, fast_bf16, lr_at, resolve_precision, seed_everything,
)

__all__ = ["TrainConfig", "Trainer", "describe_metrics", "fast_bf16", "lr_at", "resolve_precision", "seed_everything"]
