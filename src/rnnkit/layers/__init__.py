"""Recurrent layers under one contract, and their registry.

Example:
    >>> import rnnkit
    >>> layer = rnnkit.layers.build("lstm", d_model=64)
    >>> y, state = layer(torch.randn(8, 100, 64))
    >>> rnnkit.layers.names()
"""

from rnnkit.layers.base import MODE_NAMES, Recurrence, flatten_state, map_state
from rnnkit.layers.registry import LayerSpec, build, names, register, spec

# Importing a layer module registers it: adding a recurrence is its file plus one line here.
from rnnkit.layers import bidirectional, elman, gru, lstm, stacked  # noqa: E402,F401
from rnnkit.layers import cfc, lru, mamba, rglru, s4, s4d, s5  # noqa: E402,F401
from rnnkit.layers import mingru, minlstm, pararnn  # noqa: E402,F401
from rnnkit.layers import attention, based, gla, linear_attention, mamba2, mlstm, retnet  # noqa: E402,F401
from rnnkit.layers import deltanet, gated_deltanet  # noqa: E402,F401
from rnnkit.layers import gateloop, hgrn2, rwkv6, rwkv7  # noqa: E402,F401
from rnnkit.layers import lact, titans, titans_hybrid, ttt  # noqa: E402,F401
from rnnkit.layers import aaren, slstm  # noqa: E402,F401

__all__ = ["MODE_NAMES", "LayerSpec", "Recurrence", "build", "flatten_state", "map_state", "names", "register", "spec"]
