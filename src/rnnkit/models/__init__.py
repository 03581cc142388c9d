"""Generic models built from any registered recurrence."""

from rnnkit.models.model import ModelConfig, ResidualBlock, ResidualStack, SequenceModel

__all__ = ["ModelConfig", "ResidualBlock", "ResidualStack", "SequenceModel"]
