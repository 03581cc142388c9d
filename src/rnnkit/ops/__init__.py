"""Pure tensor functions: sequence kernels and scans (no nn.Module).

One entry per op family, each taking ``mode=`` and raising :class:`~rnnkit.errors.InputError`
(listing the choices) for an unknown one. In every family ``"recurrent"`` is the definition: a
plain loop over time that autograd differentiates step by step; the other modes compute the same
result (up to rounding) faster, and the tests hold them to it.

- :func:`linear_scan` ``(a, b, h0)``: ``h_t = a_t h_{t-1} + b_t`` elementwise; ``a``, ``b``
  ``(B, T, *S)`` -> ``h`` ``(B, T, *S)``. Modes :data:`LINEAR_SCAN_MODES`: ``recurrent``,
  ``parallel``, ``chunk``, ``fused`` (compiled CPU kernel), ``auto``.
- :func:`gated_linear_attention` ``(q, k, v, log_decay, state, lengths)``: ``S_t = exp(g_t) S_{t-1}
  + k_t v_t^T``, ``y_t = S_t^T q_t``; q, k ``(B, H, T, K)``, v ``(B, H, T, V)``, log_decay
  ``(B, H, T)`` or ``(B, H, T, K)`` -> y ``(B, H, T, V)``, state ``(B, H, K, V)``. Modes
  :data:`GLA_MODES`: ``recurrent``, ``parallel``, ``chunk``.
- :func:`delta_rule` ``(q, k, v, beta, log_decay, state, lengths)``: DeltaNet / Gated DeltaNet,
  shapes as GLA with beta ``(B, H, T)``. Modes :data:`DELTA_RULE_MODES`: ``recurrent``,
  ``parallel``, ``chunk``. :func:`dplr_delta_rule` ``(q, k, v, a, b, log_decay, state, lengths)``:
  the diagonal-plus-low-rank transition of RWKV-7, ``S_t = (diag(exp(g_t)) + a_t b_t^T) S_{t-1} +
  k_t v_t^T``, all but v ``(B, H, T, K)``. Modes :data:`DPLR_DELTA_RULE_MODES`: the same three.
- :func:`mlstm` ``(q, k, v, log_i, log_f, state, lengths)``: xLSTM's mLSTM cell, gates
  ``(B, H, T)``, state :class:`~rnnkit.ops.mlstm.MLSTMState`. Modes :data:`MLSTM_MODES`:
  ``recurrent``, ``parallel``, ``chunk``.
- :func:`selective_scan` ``(delta, B, C, u, A, h0)``: Mamba's selective SSM; delta, u
  ``(B, T, E)``, B, C ``(B, T, N)``, A ``(E, N)``, optional skip D ``(E,)`` and gate z ``(B, T, E)``
  -> y ``(B, T, E)``, state ``(B, E, N)``. Modes :data:`SELECTIVE_SCAN_MODES`: ``recurrent``,
  ``parallel``, ``chunk`` (blocks through the linear scan), ``fused`` (compiled CPU kernel), ``auto``.
- :func:`short_conv` ``(x, weight, bias, state)``: the short causal depthwise convolution in front of
  many recurrences, x ``(B, T, D)``, weight ``(D, W)`` -> y ``(B, T, D)``, input history
  ``(B, D, W-1)``. Modes :data:`SHORT_CONV_MODES`: ``recurrent``, ``parallel`` (``conv1d``),
  ``fused`` (compiled CPU kernel), ``auto``.
- :func:`elman`, :func:`lstm`, :func:`gru` ``(x, state, weights...)``: the classic cells over a
  sequence, x ``(B, T, D)`` -> y ``(B, T, H)`` (``(B, T, R)`` for a projected LSTM). Modes
  :data:`CLASSIC_MODES`: ``recurrent``, ``fused`` (whole-sequence kernels, hand-written backward).
- :func:`matrix_scan` ``(A, b, h0)``: ``h_t = A_t h_{t-1} + b_t`` with ``K x K`` blocks; ``A``
  ``(B, T, *S, K, K)``, ``b`` ``(B, T, *S, K)`` -> ``h`` ``(B, T, *S, K)``. Modes
  :data:`MATRIX_SCAN_MODES`: ``recurrent``, ``parallel``, ``chunk``, ``auto``.
- :func:`newton_recurrence` ``(cell, x, h0, params)``: a nonlinear recurrence ``h_t = cell(h_{t-1},
  x_t, *params)`` solved for all steps by Newton iterations over parallel scans (DEER, quasi-DEER,
  ELK), gradients by the implicit function theorem; x ``(B, T, *X)``, h0 ``(B, S)`` -> h
  ``(B, T, S)``. Modes :data:`NEWTON_MODES`: ``recurrent``, ``newton``, ``quasi``.
- :func:`slstm` ``(pre_x, state, recurrent)``: xLSTM's sLSTM cell, pre_x ``(B, T, 4, H, K)`` gate
  pre-activations, recurrent ``(4, H, K, K)`` blocks, state :class:`~rnnkit.ops.slstm.SLSTMState`
  -> h ``(B, T, H K)``. Modes :data:`SLSTM_MODES`: ``recurrent``, ``fused`` (hand-written backward).
- :func:`sliding_window_attention` ``(q, k, v, window, state, lengths)``: causal softmax attention
  over the last ``window`` steps. Modes :data:`SLIDING_WINDOW_MODES`: ``recurrent``, ``parallel``,
  ``chunk``.

The entries share their names with the modules that define them: import a module's other names by
its full path (``from rnnkit.ops.mlstm import MLSTMState``).
"""

from rnnkit.ops.classic_rnn import CLASSIC_MODES, elman, gru, lstm
from rnnkit.ops.delta_rule import DELTA_RULE_MODES, DPLR_DELTA_RULE_MODES, delta_rule, dplr_delta_rule
from rnnkit.ops.gated_linear_attention import GLA_MODES, gated_linear_attention
from rnnkit.ops.matrix_scan import MATRIX_SCAN_MODES, matrix_scan
from rnnkit.ops.mlstm import MLSTM_MODES, mlstm
from rnnkit.ops.newton import NEWTON_MODES, NewtonInfo, newton_recurrence
from rnnkit.ops.scan import (
    LINEAR_SCAN_MODES,
    fused_available,
    linear_scan,
    linear_scan_log,
    linear_scan_recurrent,
)
from rnnkit.ops.selective_scan import SELECTIVE_SCAN_MODES, selective_scan
from rnnkit.ops.short_conv import SHORT_CONV_MODES, short_conv
from rnnkit.ops.sliding_window_attention import SLIDING_WINDOW_MODES, sliding_window_attention
from rnnkit.ops.slstm import SLSTM_MODES, slstm

__all__ = [
    "CLASSIC_MODES",
    "DELTA_RULE_MODES",
    "DPLR_DELTA_RULE_MODES",
    "GLA_MODES",
    "LINEAR_SCAN_MODES",
    "MATRIX_SCAN_MODES",
    "MLSTM_MODES",
    "NEWTON_MODES",
    "NewtonInfo",
    "SELECTIVE_SCAN_MODES",
    "SHORT_CONV_MODES",
    "SLIDING_WINDOW_MODES",
    "SLSTM_MODES",
    "delta_rule",
    "dplr_delta_rule",
    "elman",
    "fused_available",
    "gated_linear_attention",
    "gru",
    "linear_scan",
    "linear_scan_log",
    "linear_scan_recurrent",
    "lstm",
    "matrix_scan",
    "mlstm",
    "newton_recurrence",
    "selective_scan",
    "short_conv",
    "sliding_window_attention",
    "slstm",
]
