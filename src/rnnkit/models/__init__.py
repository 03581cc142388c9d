"""Generic models built from any registered recurrence."""

from rnnkit.models.model import ModelConfig, ResidualBlock, ResidualStack, SequenceModel
from rnnkit.models.wiring import model_config_for, task_io

__all__ = ["ModelConfig", "ResidualBlock", "ResidualStack", "SequenceModel", "model_config_for", "task_io"]
