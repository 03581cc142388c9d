"""Training: the Trainer, its configuration, the learning-rate schedule, checkpoints and logs."""

from rnnkit.train.checkpoint import CheckpointManager, resolve_checkpoint
from rnnkit.train.config import RESUME_FREE_FIELDS, TrainConfig
from rnnkit.train.metrics import describe_metrics, loss_and_counts, summarise
from rnnkit.train.optim import lr_at
from rnnkit.train.precision import fast_bf16, resolve_precision
from rnnkit.train.rng import rng_states, seed_everything, set_rng_states
from rnnkit.train.state import HISTORY_KEYS
from rnnkit.train.trainer import Trainer

__all__ = [
    "HISTORY_KEYS", "RESUME_FREE_FIELDS", "CheckpointManager", "TrainConfig", "Trainer", "describe_metrics",
    "fast_bf16", "loss_and_counts", "lr_at", "resolve_checkpoint", "resolve_precision", "rng_states",
    "seed_everything", "set_rng_states", "summarise",
]
