"""Hypothesis-driven bad-input fuzzing of the public API.

Every registered layer (the registry is iterated, so a new layer is fuzzed without new test code)
gets >= 1,000 malformed calls: ``forward``/``step``/``init_state`` with wrong ranks, feature sizes,
dtypes, devices, non-tensors, empty time axes, bad ``lengths``, mismatched states, unknown modes and
NaN under ``check_finite``; and constructors with bad widths. Each must raise ``rnnkit.InputError``
(no other type) whose message says what was expected and what was got, and must leave the
parameters and the passed-in state untouched. Models, TrainConfig and the CLI get the same
treatment. ``test_validation_survives_python_O`` reruns a subset under ``python -O``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnnkit
from rnnkit import InputError
from rnnkit.layers import flatten_state, map_state

CALLS_PER_LAYER = 1000
D_MODEL = 5
FUZZ = settings(max_examples=CALLS_PER_LAYER, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


def build_layer(name: str) -> rnnkit.layers.Recurrence:
    """The layer under its first test configuration, tiny, fp32, eval mode."""
    config = next(iter(rnnkit.layers.spec(name).test_configs.values()))
    torch.manual_seed(0)
    return rnnkit.layers.build(name, d_model=D_MODEL, **config).eval()


# ----------------------------------------------------------------------------- malformed calls
BAD_DTYPES = [torch.int64, torch.int32, torch.bool, torch.float64, torch.float16, torch.bfloat16, torch.complex64]
NOT_TENSORS = [None, 3, 2.5, "x", [[1.0, 2.0]], (1, 2), {"x": 1}]


def _x(batch, time, feat, dtype=torch.float32, device="cpu"):
    return torch.randn(batch, time, feat, device=device).to(dtype) if dtype != torch.bool else \
        torch.zeros(batch, time, feat, dtype=torch.bool, device=device)


def _corrupt_state(draw, state):
    """A copy of ``state`` that is wrong in one drawn way."""
    leaves = flatten_state(state)
    kind = draw(st.sampled_from(["batch", "width", "dtype", "rank", "structure", "not_tensor", "device", "short"]))
    i = draw(st.integers(0, len(leaves) - 1))
    leaf = leaves[i]
    if kind == "batch":
        bad = torch.zeros(leaf.shape[0] + draw(st.integers(1, 3)), *leaf.shape[1:])
    elif kind == "width":
        bad = torch.zeros(*leaf.shape[:-1], leaf.shape[-1] + draw(st.sampled_from([-1, 1, 2])))
    elif kind == "dtype":
        bad = leaf.to(draw(st.sampled_from([torch.float64, torch.float16, torch.int64])))
    elif kind == "rank":
        bad = leaf.unsqueeze(0) if draw(st.booleans()) else leaf.reshape(-1)
    elif kind == "device":
        bad = torch.empty(leaf.shape, device="meta")
    elif kind == "not_tensor":
        bad = draw(st.sampled_from([0.0, [0.0], "h", ()]))
    else:
        bad = None
    if kind == "structure":
        return leaf if not isinstance(state, torch.Tensor) else (state, state)
    if kind == "short":
        return tuple(state)[:-1] if isinstance(state, tuple) and len(state) > 1 else [state]
    counter = iter(range(len(leaves)))
    return map_state(lambda t: bad if next(counter) == i else t, state)


@st.composite
def malformed_calls(draw, layer):
    """``(description, callable)``: a call that must raise InputError."""
    d_in = layer.d_input
    batch = draw(st.integers(1, 3))
    time = draw(st.integers(1, 4))
    kind = draw(st.sampled_from([
        "x_rank", "x_features", "x_dtype", "x_type", "x_empty", "x_device", "lengths", "state", "mode",
        "step_rank", "step_features", "step_dtype", "step_state", "init_state", "check_finite", "build",
    ]))
    state = layer.init_state(batch)
    if kind == "x_rank":
        rank = draw(st.sampled_from([0, 1, 2, 4, 5]))
        x = torch.randn(tuple([batch, time, d_in, 2, 2][:rank] if rank != 2 else [batch, d_in]))
        return kind, lambda: layer(x), None
    if kind == "x_features":
        feat = draw(st.integers(0, d_in + 4).filter(lambda f: f != d_in))
        return kind, lambda: layer(_x(batch, time, feat)), None
    if kind == "x_dtype":
        dtype = draw(st.sampled_from(BAD_DTYPES))
        return kind, lambda: layer(_x(batch, time, d_in, dtype)), None
    if kind == "x_type":
        value = draw(st.sampled_from(NOT_TENSORS + [np.zeros((batch, time, d_in), np.float32)]))
        return kind, lambda: layer(value), None
    if kind == "x_empty":
        return kind, lambda: layer(_x(batch, 0, d_in)), None
    if kind == "x_device":
        return kind, lambda: layer(_x(batch, time, d_in, device="meta")), None
    if kind == "lengths":
        how = draw(st.sampled_from(["float", "bool", "2d", "batch", "zero", "negative", "long", "list", "text"]))
        x = _x(batch, time, d_in)
        lengths = {
            "float": torch.full((batch,), float(time)),
            "bool": torch.ones(batch, dtype=torch.bool),
            "2d": torch.full((batch, 1), time),
            "batch": torch.full((batch + draw(st.integers(1, 2)),), time),
            "zero": torch.tensor([0] + [time] * (batch - 1)),
            "negative": torch.full((batch,), -draw(st.integers(1, 5))),
            "long": torch.full((batch,), time + draw(st.integers(1, 5))),
            "list": [float(time)] * batch,
            "text": "all",
        }[how]
        return f"lengths-{how}", lambda: layer(x, lengths=lengths), None
    if kind == "state":
        bad = _corrupt_state(draw, state)
        return kind, lambda: layer(_x(batch, time, d_in), bad), bad
    if kind == "mode":
        mode = draw(st.one_of(st.text(max_size=8).filter(lambda m: m not in layer.modes and m != "auto"),
                              st.sampled_from([None, 1, ("recurrent",)])))
        return kind, lambda: layer(_x(batch, time, d_in), mode=mode), None
    if not layer.causal and kind.startswith("step"):
        return "step_noncausal", lambda: layer.step(torch.randn(batch, d_in)), None
    if kind == "step_rank":
        shape = draw(st.sampled_from([(d_in,), (batch, 1, d_in), ()]))
        return kind, lambda: layer.step(torch.randn(shape)), None
    if kind == "step_features":
        feat = draw(st.integers(0, d_in + 4).filter(lambda f: f != d_in))
        return kind, lambda: layer.step(torch.randn(batch, feat)), None
    if kind == "step_dtype":
        dtype = draw(st.sampled_from(BAD_DTYPES))
        return kind, lambda: layer.step(torch.zeros(batch, d_in).to(dtype)), None
    if kind == "step_state":
        bad = _corrupt_state(draw, state)
        return kind, lambda: layer.step(torch.randn(batch, d_in), bad), bad
    if kind == "init_state":
        size = draw(st.sampled_from([-1, -7, 1.5, True, "2", None, [2]]))
        return kind, lambda: layer.init_state(size), None
    if kind == "check_finite":
        x = _x(batch, time, d_in)
        x[draw(st.integers(0, batch - 1)), draw(st.integers(0, time - 1)), 0] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf]))
        return kind, lambda: layer(x, check_finite=True), None
    name = type(layer).name
    config = next(iter(rnnkit.layers.spec(name).test_configs.values()))
    width = draw(st.sampled_from([0, -3, 2.5, "8", None, True]))
    return kind, lambda: rnnkit.layers.build(name, **dict(config, d_model=width)), None


def _snapshot(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.device.type != "meta" else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_snapshot(o) for o in obj) if not hasattr(obj, "_fields") else type(obj)(*map(_snapshot, obj))
    return obj


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        if a.device.type == "meta":
            return a is b
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b or a == b


def assert_input_error(kind, call, passed_state, params):
    before = {k: v.clone() for k, v in params.items()}
    state_before = _snapshot(passed_state)
    try:
        call()
    except InputError as error:
        message = str(error)
        assert "expected" in message and ("got" in message or "received" in message), f"{kind}: {message}"
    else:
        raise AssertionError(f"{kind}: the malformed call was accepted")
    for name, value in params.items():
        assert torch.equal(value, before[name]), f"{kind}: parameter {name} changed"
    assert _same(passed_state, state_before), f"{kind}: the passed-in state changed"


@pytest.mark.parametrize("name", rnnkit.layers.names())
def test_malformed_layer_calls_raise_input_error(name):
    layer = build_layer(name)
    params = dict(layer.state_dict())
    seen: dict[str, int] = {}

    @FUZZ
    @given(case=malformed_calls(layer))
    def check(case):
        kind, call, passed_state = case
        assert_input_error(kind, call, passed_state, params)
        seen[kind] = seen.get(kind, 0) + 1

    check()
    total = sum(seen.values())
    print(f"{name}: {total} malformed calls, {len(seen)} kinds")
    assert total >= CALLS_PER_LAYER and len(seen) >= 12, seen


# ----------------------------------------------------------------------------- models
def _model():
    from rnnkit.models import SequenceModel

    torch.manual_seed(0)
    return SequenceModel(vocab_size=7, d_model=4, layer="gru", num_layers=2).eval()


@st.composite
def malformed_model_calls(draw, model):
    batch, time = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    ids = torch.randint(0, 7, (batch, time))
    kind = draw(st.sampled_from(["float_ids", "range", "rank", "empty", "lengths", "state", "step", "not_tensor",
                                 "generate"]))
    if kind == "float_ids":
        return kind, lambda: model(ids.float()), None
    if kind == "range":
        bad = ids.clone()
        bad[draw(st.integers(0, batch - 1)), 0] = draw(st.sampled_from([-1, 7, 100]))
        return kind, lambda: model(bad), None
    if kind == "rank":
        return kind, lambda: model(ids.reshape(-1) if draw(st.booleans()) else ids[..., None]), None
    if kind == "empty":
        return kind, lambda: model(ids[:, :0]), None
    if kind == "lengths":
        lengths = draw(st.sampled_from([[0] * batch, [time + 1] * batch, [1] * (batch + 1), "x"]))
        return kind, lambda: model(ids, lengths=lengths), None
    if kind == "state":
        bad = _corrupt_state(draw, model.init_state(batch))
        return kind, lambda: model(ids, bad), bad
    if kind == "step":
        return kind, lambda: model.step(ids), None
    if kind == "not_tensor":
        value = draw(st.sampled_from(NOT_TENSORS))
        return kind, lambda: model(value), None
    arg = draw(st.sampled_from([dict(max_new_tokens=-1), dict(temperature=0), dict(top_k=0), dict(top_p=2.0)]))
    return kind, lambda: model.generate(ids, **{"max_new_tokens": 2, **arg}), None


def test_malformed_model_calls_raise_input_error():
    model = _model()
    params = dict(model.state_dict())
    count = [0]

    @settings(FUZZ, max_examples=300)
    @given(case=malformed_model_calls(model))
    def check(case):
        assert_input_error(*case, params)
        count[0] += 1

    check()
    assert count[0] >= 300


# ----------------------------------------------------------------------------- configs and CLI
BAD_TRAIN_FIELDS = {
    "steps": [0, -1, 1.5, "10", None, True],
    "batch_size": [0, -2, 2.0, None],
    "seq_len": [0, -1, 3.5, "8"],
    "lr": [0.0, -1e-3, math.nan, math.inf, "0.1", None],
    "min_lr_ratio": [-0.1, math.nan],
    "warmup_steps": [-1, 0.5],
    "weight_decay": [-1.0, math.inf],
    "betas": [(0.9,), (1.0, 0.99), (0.9, -0.1), "0.9", None],
    "grad_clip": [-1.0, math.nan],
    "eval_every": [-1, 2.5],
    "eval_batch_size": [0, None],
    "eval_max_batches": [0, -3],
    "seed": [-1, 1.5, "0"],
    "progress": ["yes", 1, None],
    "log_every": [0, None],
    "checkpoint_every": [-1, 0.5],
    "keep_last": [-1, "3"],
    "nan_policy": ["ignore", None, 1],
    "max_skips": [-1, 2.5],
    "mode": [3, None],
    "device": [3, "cpux", "not a device"],
}


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_bad_train_config_fields_raise_input_error(data):
    from rnnkit.train import TrainConfig

    field = data.draw(st.sampled_from(sorted(BAD_TRAIN_FIELDS)))
    value = data.draw(st.sampled_from(BAD_TRAIN_FIELDS[field]))
    with pytest.raises(InputError, match=field) as info:
        TrainConfig(**{field: value})
    assert "expected" in str(info.value) and "got" in str(info.value)


BAD_CLI = [
    ("--steps", ["0", "-5"]), ("--batch-size", ["0"]), ("--lr", ["-1", "nan", "inf"]), ("--warmup", ["-1"]),
    ("--seq-len", ["0"]), ("--checkpoint-every", ["-2"]), ("--keep-last", ["-1"]), ("--max-skips", ["-1"]),
    ("--log-every", ["0"]), ("--grad-clip", ["-0.5"]), ("--dropout", ["1.0", "-0.1"]), ("--d-model", ["-4"]),
    ("--eval-batch-size", ["0"]), ("--model", ["nope"]), ("--task", ["nope"]), ("--layer-opt", ["bogus", "wings=2"]),
    ("--device", ["cpux"]), ("--eval-max-batches", ["0"]),
]


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_bad_cli_train_options_exit_2_with_a_message(data):
    import contextlib
    import io

    from rnnkit.cli import main

    option, values = data.draw(st.sampled_from(BAD_CLI))
    value = data.draw(st.sampled_from(values))
    argv = ["train", "--task", "adding", "--d-model", "4", "--steps", "1", "--no-progress",
            "--out", os.devnull + "-unused", option, value]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    assert code == 2, (option, value)
    assert "expected" in err.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- python -O
O_SCRIPT = r"""
import sys, torch, rnnkit
from rnnkit import InputError
from rnnkit.train import TrainConfig
if sys.flags.optimize < 1:
    sys.exit("not running under -O")
failures = 0
def expect(what, call):
    global failures
    try:
        call()
    except InputError:
        return
    except Exception as error:
        print(f"{what}: {type(error).__name__}: {error}")
    else:
        print(f"{what}: accepted")
    failures += 1
for name in rnnkit.layers.names():
    config = next(iter(rnnkit.layers.spec(name).test_configs.values()))
    layer = rnnkit.layers.build(name, d_model=5, **config)
    expect(f"{name} rank", lambda: layer(torch.randn(2, 5)))
    expect(f"{name} features", lambda: layer(torch.randn(2, 3, 4)))
    expect(f"{name} dtype", lambda: layer(torch.randn(2, 3, 5, dtype=torch.float64)))
    expect(f"{name} lengths", lambda: layer(torch.randn(2, 3, 5), lengths=[0, 3]))
    expect(f"{name} state", lambda: layer(torch.randn(2, 3, 5), layer.init_state(3)))
    expect(f"{name} mode", lambda: layer(torch.randn(2, 3, 5), mode="warp"))
    expect(f"{name} init_state", lambda: layer.init_state(-1))
    expect(f"{name} d_model", lambda: rnnkit.layers.build(name, **dict(config, d_model=0)))
for field, value in [("steps", 0), ("lr", float("nan")), ("nan_policy", "x"), ("betas", (2, 0))]:
    expect(f"TrainConfig.{field}", lambda: TrainConfig(**{field: value}))
print(f"checked under -O: {failures} failures")
sys.exit(1 if failures else 0)
"""


def test_validation_survives_python_O():
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-O", "-c", O_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 failures" in proc.stdout
