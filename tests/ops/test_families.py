"""Every op family through the shared harness (tests/ops/harness.py): each form == the recurrent
definition in fp64 and fp32, with and without lengths and initial state, gradients included; NaN
padding ignored; unknown modes rejected."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rnnkit import ops
from rnnkit.ops.classic_rnn import LSTMState
from rnnkit.ops.classic_rnn import gru_cell
from rnnkit.ops.mlstm import MLSTMState
from rnnkit.ops.sliding_window_attention import sliding_window_attention_recurrent
from rnnkit.ops.slstm import SLSTMState
from tests.ops import harness
from tests.ops.harness import Family

B, H, K, V = 2, 2, 3, 4
D, E, N = 3, 4, 3
f64 = torch.float64


def _randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, dtype=f64, generator=gen) * scale


def scan_inputs(B, T, gen):
    a = torch.rand(B, T, 3, dtype=f64, generator=gen) * 0.5 + 0.5
    return {"a": a, "b": _randn(gen, B, T, 3), "h0": _randn(gen, B, 3)}


def gla_inputs(per_dim, signed=False):
    def make(B, T, gen):
        q, k = _randn(gen, B, H, T, K), _randn(gen, B, H, T, K)
        v = _randn(gen, B, H, T, V)
        g = F.logsigmoid(_randn(gen, B, H, T, *((K,) if per_dim else ()), scale=2.0))
        args = {"q": q, "k": k, "v": v, "log_decay": g, "state": _randn(gen, B, H, K, V)}
        if signed:  # decays sign * exp(g) in (-1, 1)
            args["decay_sign"] = torch.where(_randn(gen, *g.shape) < 0, -1.0, 1.0).to(f64)
        return args

    return make


def delta_inputs(gated):
    def make(B, T, gen):
        q = _randn(gen, B, H, T, K)
        k = F.normalize(_randn(gen, B, H, T, K), dim=-1)
        v = _randn(gen, B, H, T, V)
        beta = torch.rand(B, H, T, dtype=f64, generator=gen)
        g = -torch.rand(B, H, T, dtype=f64, generator=gen) if gated else None
        return {"q": q, "k": k, "v": v, "beta": beta, "log_decay": g, "state": _randn(gen, B, H, K, V)}

    return make


def dplr_inputs(decay_scale):
    """RWKV-7's transition: a unit removal key kappa, a rate eta in (0, 1): a = -eta kappa, b = kappa;
    log decays in (-decay_scale - 0.1, -0.1), past SCORE_FACTOR_BOUND within a chunk when strong."""
    def make(B, T, gen):
        kappa = F.normalize(_randn(gen, B, H, T, K), dim=-1)
        eta = torch.rand(B, H, T, K, dtype=f64, generator=gen)
        g = -torch.rand(B, H, T, K, dtype=f64, generator=gen) * decay_scale - 0.1
        return {"q": _randn(gen, B, H, T, K), "k": _randn(gen, B, H, T, K, scale=0.5), "v": _randn(gen, B, H, T, V),
                "a": -eta * kappa, "b": kappa, "log_decay": g, "state": _randn(gen, B, H, K, V)}

    return make


def mlstm_inputs(forget_bias):
    def make(B, T, gen):
        q, k = _randn(gen, B, H, T, K), _randn(gen, B, H, T, K)
        v = _randn(gen, B, H, T, V)
        log_i = _randn(gen, B, H, T)
        log_f = F.logsigmoid(_randn(gen, B, H, T) + forget_bias)
        state = MLSTMState(_randn(gen, B, H, K, V), _randn(gen, B, H, K), _randn(gen, B, H))
        return {"q": q, "k": k, "v": v, "log_i": log_i, "log_f": log_f, "state": state}

    return make


def selective_inputs(B, T, gen):
    delta = F.softplus(_randn(gen, B, T, E)) * 0.5
    return {"delta": delta, "B": _randn(gen, B, T, N), "C": _randn(gen, B, T, N), "u": _randn(gen, B, T, E),
            "A": -torch.exp(_randn(gen, E, N, scale=0.5)), "h0": _randn(gen, B, E, N)}


def gated_selective_inputs(B, T, gen):
    """Mamba's block: N = 16 (the kernel's unrolled state), E = 20 (whole vectors of channels and a
    partial one), the step size softplus(delta + delta_bias), the skip D and the gate z."""
    N16, E20 = 16, 20
    return {"delta": _randn(gen, B, T, E20, scale=2.0), "B": _randn(gen, B, T, N16), "C": _randn(gen, B, T, N16),
            "u": _randn(gen, B, T, E20), "A": -torch.exp(_randn(gen, E20, N16, scale=0.5)),
            "h0": _randn(gen, B, E20, N16), "D": _randn(gen, E20), "z": _randn(gen, B, T, E20),
            "delta_bias": _randn(gen, E20) - 1.0, "delta_softplus": True}


def neg_selective_inputs(B, T, gen):
    """Transitions 2 exp(delta A) - 1 of either sign."""
    return selective_inputs(B, T, gen) | {"allow_neg_eigval": True}


def conv_inputs(activation, bias=True):
    def make(B, T, gen):
        C = 19  # a whole vector of channels and a partial one
        return {"x": _randn(gen, B, T, C), "weight": _randn(gen, C, 4, scale=0.5),
                "bias": _randn(gen, C) if bias else None, "state": _randn(gen, B, C, 3), "activation": activation}

    return make


def classic_inputs(gates, lstm=False, proj=0):
    def make(B, T, gen):
        R = proj or H
        args = {"x": _randn(gen, B, T, D)}
        args["state"] = LSTMState(_randn(gen, B, R), _randn(gen, B, H)) if lstm else _randn(gen, B, H)
        args |= {"weight_ih": _randn(gen, gates * H, D, scale=0.5), "weight_hh": _randn(gen, gates * H, R, scale=0.5),
                 "bias_ih": _randn(gen, gates * H, scale=0.5), "bias_hh": _randn(gen, gates * H, scale=0.5)}
        if lstm:
            args["peephole"] = _randn(gen, 3, H, scale=0.5)
            args["weight_hr"] = _randn(gen, proj, H, scale=0.5) if proj else None
        return args

    return make


def slstm_inputs(exp_forget):
    def make(B, T, gen):
        # A reachable state: normaliser >= 1 (0 only before the first step), any stabiliser.
        state = SLSTMState(_randn(gen, B, H * K), _randn(gen, B, H * K),
                           1 + torch.rand(B, H * K, dtype=f64, generator=gen) * 3, _randn(gen, B, H * K))
        return {"pre_x": _randn(gen, B, T, 4, H, K), "state": state, "recurrent": _randn(gen, 4, H, K, K, scale=0.5),
                "exp_forget": exp_forget}

    return make


def window_inputs(B, T, gen):
    q, k, v = (_randn(gen, B, H, T, K) for _ in range(3))
    prefix = [_randn(gen, B, H, 3, K) for _ in range(3)]
    _, state = sliding_window_attention_recurrent(*prefix, 6)  # 3 of the window's 5 slots filled
    return {"q": q, "k": k, "v": v, "window": 6, "state": state}


def matrix_scan_inputs(B, T, gen):
    return {"A": _randn(gen, B, T, 2, 3, 3, scale=0.4), "b": _randn(gen, B, T, 2, 3), "h0": _randn(gen, B, 2, 3)}


def _gru_flat(h, x_t, *params):
    return gru_cell(x_t, h, *params)


def _diagonal_cell(h, x_t, weight, diag, bias):
    return torch.tanh(F.linear(x_t, weight, bias) + diag * h)


def _pair_cell(s, x_t, weight, diag):
    """An LSTM-like cell on (h, c) pairs: the Jacobian has 2 x 2 blocks."""
    pairs = s.unflatten(-1, (-1, 2))
    h, c = pairs[..., 0], pairs[..., 1]
    f, g = F.linear(x_t, weight).chunk(2, -1)
    c = torch.sigmoid(f + diag[0] * h) * c + torch.tanh(g + diag[1] * h)
    return torch.stack([torch.tanh(c), c], -1).flatten(-2)


def newton_inputs(kind):
    """A dense GRU cell (state 3), a diagonal cell (state 4) and a 2 x 2 block cell (state 4)."""

    def make(B, T, gen):
        x = _randn(gen, B, T, D)
        if kind == "dense":
            S = 3
            params = (_randn(gen, 3 * S, D, scale=0.5), _randn(gen, 3 * S, S, scale=0.5), _randn(gen, 3 * S, scale=0.5),
                      _randn(gen, 3 * S, scale=0.5))
            cell, block = _gru_flat, None
        elif kind == "diagonal":
            S = 4
            params = (_randn(gen, S, D, scale=0.5), _randn(gen, S), _randn(gen, S, scale=0.5))
            cell, block = _diagonal_cell, 1
        else:
            S = 4
            params = (_randn(gen, S, D, scale=0.5), _randn(gen, 2, S // 2))
            cell, block = _pair_cell, 2
        return {"cell": cell, "x": x, "h0": _randn(gen, B, S, scale=0.5), "params": params, "block_size": block,
                "state_size": S}

    return make


HEADS = {"q": 2, "k": 2, "v": 2}
FUSED = ("fused",) if ops.fused_available() else ()
SCAN_FORMS = ("parallel", "chunk") + FUSED + ("auto",)
FAMILIES = [
    Family("linear_scan", ops.linear_scan, SCAN_FORMS, scan_inputs, {"a": 1, "b": 1}, 1, "h0",
           options={"chunk": {"chunk_size": 8}}),
    Family("gla-scalar", ops.gated_linear_attention, ("parallel", "chunk"), gla_inputs(False),
           HEADS | {"log_decay": 2}, 2, "state", options={"chunk": {"chunk_size": 16}}),
    Family("gla-per-dim", ops.gated_linear_attention, ("parallel", "chunk"), gla_inputs(True),
           HEADS | {"log_decay": 2}, 2, "state", options={"chunk": {"chunk_size": 16}}),
    Family("gla-scalar-signed", ops.gated_linear_attention, ("parallel", "chunk"), gla_inputs(False, True),
           HEADS | {"log_decay": 2, "decay_sign": 2}, 2, "state", keywords=("decay_sign",),
           options={"chunk": {"chunk_size": 16}}),
    Family("gla-per-dim-signed", ops.gated_linear_attention, ("parallel", "chunk"), gla_inputs(True, True),
           HEADS | {"log_decay": 2, "decay_sign": 2}, 2, "state", keywords=("decay_sign",),
           options={"chunk": {"chunk_size": 16}}),
    Family("delta_rule", ops.delta_rule, ("parallel", "chunk"), delta_inputs(False), HEADS | {"beta": 2}, 2,
           "state", options={"chunk": {"chunk_size": 8}}),
    Family("gated_delta_rule", ops.delta_rule, ("parallel", "chunk"), delta_inputs(True),
           HEADS | {"beta": 2, "log_decay": 2}, 2, "state", options={"chunk": {"chunk_size": 8}}),
    Family("dplr_delta_rule", ops.dplr_delta_rule, ("parallel", "chunk"), dplr_inputs(0.5),
           HEADS | {"a": 2, "b": 2, "log_decay": 2}, 2, "state", options={"chunk": {"chunk_size": 8}}),
    Family("dplr_delta_rule-strong", ops.dplr_delta_rule, ("parallel", "chunk"), dplr_inputs(6.0),
           HEADS | {"a": 2, "b": 2, "log_decay": 2}, 2, "state", options={"chunk": {"chunk_size": 8}}),
    Family("mlstm-mild", ops.mlstm, ("parallel", "chunk"), mlstm_inputs(4.0), HEADS | {"log_i": 2, "log_f": 2}, 2,
           "state", options={"chunk": {"chunk_size": 16}}),
    Family("mlstm-strong", ops.mlstm, ("parallel", "chunk"), mlstm_inputs(0.0), HEADS | {"log_i": 2, "log_f": 2},
           2, "state", options={"chunk": {"chunk_size": 16}}),
    Family("selective_scan", ops.selective_scan, SCAN_FORMS, selective_inputs,
           {"delta": 1, "B": 1, "C": 1, "u": 1}, 1, "h0",
           options={"parallel": {"steps_per_block": 8}, "fused": {"steps_per_block": 8}}),
    Family("selective_scan-gated", ops.selective_scan, SCAN_FORMS, gated_selective_inputs,
           {"delta": 1, "B": 1, "C": 1, "u": 1, "z": 1}, 1, "h0", keywords=("D", "z", "delta_bias", "delta_softplus"),
           options={"chunk": {"steps_per_block": 16}, "fused": {"steps_per_block": 16}}),
    Family("selective_scan-neg-eigval", ops.selective_scan, ("parallel", "chunk", "auto"), neg_selective_inputs,
           {"delta": 1, "B": 1, "C": 1, "u": 1}, 1, "h0", keywords=("allow_neg_eigval",),
           options={"chunk": {"steps_per_block": 16}}),
    Family("short_conv-silu", ops.short_conv, ("parallel",) + FUSED + ("auto",), conv_inputs("silu"), {"x": 1}, 1,
           "state", keywords=("activation",), defined_past_length=False),
    Family("short_conv-identity-nobias", ops.short_conv, ("parallel",) + FUSED, conv_inputs("identity", bias=False),
           {"x": 1}, 1, "state", keywords=("activation",), defined_past_length=False),
    Family("elman", ops.elman, ("fused",), classic_inputs(1), {"x": 1}, 1, "state"),
    Family("gru", ops.gru, ("fused",), classic_inputs(3), {"x": 1}, 1, "state"),
    Family("lstm-peephole", ops.lstm, ("fused",), classic_inputs(4, lstm=True), {"x": 1}, 1, "state",
           keywords=("peephole", "weight_hr")),
    Family("lstm-peephole-proj", ops.lstm, ("fused",), classic_inputs(4, lstm=True, proj=2), {"x": 1}, 1, "state",
           keywords=("peephole", "weight_hr")),
    Family("matrix_scan", ops.matrix_scan, ("parallel", "chunk", "auto"), matrix_scan_inputs, {"A": 1, "b": 1}, 1,
           "h0", options={"chunk": {"chunk_size": 8}}),
    Family("newton-dense", ops.newton_recurrence, ("newton", "quasi"), newton_inputs("dense"), {"x": 1}, 1, "h0",
           keywords=("block_size", "state_size")),
    Family("newton-diagonal", ops.newton_recurrence, ("newton",), newton_inputs("diagonal"), {"x": 1}, 1, "h0",
           keywords=("block_size", "state_size")),
    Family("newton-blocks", ops.newton_recurrence, ("newton", "quasi"), newton_inputs("blocks"), {"x": 1}, 1, "h0",
           keywords=("block_size", "state_size")),
    Family("slstm", ops.slstm, ("fused",), slstm_inputs(False), {"pre_x": 1}, 1, "state", keywords=("exp_forget",)),
    Family("slstm-exp", ops.slstm, ("fused",), slstm_inputs(True), {"pre_x": 1}, 1, "state",
           keywords=("exp_forget",)),
    Family("sliding_window", ops.sliding_window_attention, ("parallel", "chunk"), window_inputs, HEADS, 2, "state",
           options={"chunk": {"chunk_size": 8}}, defined_past_length=False),
]
CASES = {  # T, lengths, initial state given
    "T37-state": (37, None, True),
    "T37-lengths-state": (37, [37, 20], True),
    "T37-lengths-zero-state": (37, [13, 37], False),
    "T1": (1, [1, 1], True),
}
FORMS = [pytest.param(f, m, id=f"{f.name}-{m}") for f in FAMILIES for m in f.modes]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(("family", "mode"), FORMS)
def test_form_matches_reference(family, mode, dtype, case):
    T, lengths, with_state = CASES[case]
    harness.check_form(family, mode, dtype, T, lengths, with_state)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_recurrent_fp32_matches_fp64(family, dtype):
    """The reference itself in fp32 against fp64 (and fp64 against itself: the harness is exact)."""
    harness.check_form(family, "recurrent", dtype, 37, [37, 20], True)


@pytest.mark.parametrize(("family", "mode"), [pytest.param(f, m, id=f"{f.name}-{m}") for f in FAMILIES
                                              for m in ("recurrent", *f.modes)])
def test_padding_is_ignored(family, mode):
    harness.check_padding_ignored(family, mode)


@pytest.mark.parametrize("with_lengths", [False, True], ids=["", "lengths"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(("family", "mode"), [pytest.param(f, m, id=f"{f.name}-{m}") for f in FAMILIES
                                              for m in ("recurrent", *f.modes)])
def test_empty_batch(family, mode, dtype, with_lengths):
    """Batch 0 returns empty outputs and states in every mode (the compiled kernels split work by
    the batch size, so each entry must route it around them)."""
    harness.check_empty_batch(family, mode, dtype, with_lengths)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_unknown_mode_is_rejected(family):
    harness.check_bad_mode(family)


def _broken_chunk(*args, **kwargs):
    y, S = ops.gated_linear_attention(*args, **kwargs)
    return (y + 1e-4 * y.detach().roll(1, 2) if kwargs["mode"] == "chunk" else y), S


def _broken_grad(*args, **kwargs):
    y, S = ops.gated_linear_attention(*args, **kwargs)
    return y + (y - y.detach()) * 1e-3 if kwargs["mode"] == "chunk" else y, S


@pytest.mark.parametrize(("entry", "dtype", "match"), [
    (_broken_chunk, torch.float64, "output 0"),
    (_broken_chunk, torch.float32, "output 0"),
    (_broken_grad, torch.float64, "d/d q"),
])
def test_harness_catches_a_wrong_form(entry, dtype, match):
    """A form off by a little in its output, or in its gradient only, fails the harness."""
    family = Family("broken", entry, ("chunk",), gla_inputs(False), HEADS | {"log_decay": 2}, 2, "state")
    with pytest.raises(AssertionError, match=match):
        harness.check_form(family, "chunk", dtype, 37, [37, 20], True)
