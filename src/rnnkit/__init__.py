"""rnnkit: recurrent sequence models under one contract.

Every recurrence runs in a parallel/fused form for training and a constant-memory ``step`` form for
inference, tested to agree with a step-by-step reference.
"""

__version__ = "0.1.0"

from rnnkit.errors import ConvergenceError, ExportError, InputError, NonFiniteError
from rnnkit import layers

__all__ = ["ConvergenceError", "ExportError", "InputError", "NonFiniteError", "layers", "__version__"]
