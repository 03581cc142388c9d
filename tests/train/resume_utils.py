"""Helpers of the kill-and-resume tests: run `rnnkit train` in a child process, kill it, compare runs."""

from __future__ import annotations

import csv
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from rnnkit.train import CheckpointManager

SRC = str(Path(__file__).resolve().parents[2] / "src")

#: Tiny runs covering what exact resume must restore: dropout (torch RNG), TBPTT state carried
#: across windows (shakespeare), ragged batches (parity), residual blocks, an encoder-decoder (reverse), a
#: hybrid stack (a layer pattern mixing a recurrence with windowed attention, whose state is a tuple of different kinds).
RUNS = {
    "adding-gru2-dropout": ["--task", "adding", "--model", "gru", "--layers", "2", "--dropout", "0.2",
                            "--d-model", "8", "--batch-size", "4", "--seq-len", "12", "--task-opt", "eval_examples=8"],
    "shakespeare-lstm-tbptt": ["--task", "shakespeare", "--model", "lstm", "--d-model", "8", "--batch-size", "2",
                               "--seq-len", "8", "--sample-length", "0", "--eval-max-batches", "1",
                               "--eval-batch-size", "2"],
    "parity-residual-elman": ["--task", "parity", "--model", "elman", "--block", "residual", "--d-model", "6",
                              "--batch-size", "4", "--seq-len", "9", "--task-opt", "eval_examples=8", "--dropout", "0.1"],
    # An encoder-decoder: scheduled sampling draws tokens and dropout masks at every step, evaluations decode.
    "reverse-seq2seq-sampling": ["--task", "reverse", "--model", "gru", "--d-model", "8", "--batch-size", "4",
                                 "--dropout", "0.1", "--attention", "bahdanau", "--bidirectional-encoder",
                                 "--label-smoothing", "0.1", "--scheduled-sampling", "linear", "--sampling-slope",
                                 "0.02", "--task-opt", "eval_examples=8", "--task-opt", "max_len=5"],
    "parity-hybrid": ["--task", "parity", "--model", "gru,attention:window=4:num_heads=2", "--block", "residual",
                      "--layers", "2", "--d-model", "6", "--batch-size", "4", "--seq-len", "9",
                      "--task-opt", "eval_examples=8"],
}


def train_argv(name: str, out: Path, steps: int, checkpoint_every: int) -> list[str]:
    """A resumable run: evaluations during training (every 5 steps) and at the end, logs to ``out/logs``."""
    return ["train", *RUNS[name], "--steps", str(steps), "--warmup", "3", "--lr", "0.01", "--no-progress",
            "--log-every", "1", "--threads", "1", "--checkpoint-every", str(checkpoint_every), "--keep-last", "2",
            "--eval-every", "5", "--resume", "--out", str(out), "--log-dir", str(out / "logs")]


_WARM = []


def warm_up() -> None:
    """Train once in this process (lazy imports, first-op initialisation, the corpus), so that forked
    children start training at once instead of spending seconds on one-time set-up."""
    if _WARM:
        return
    import contextlib
    import io
    import tempfile

    from rnnkit.cli import main

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        for name in RUNS:
            assert main(train_argv(name, Path(tmp) / name, 2, 1)) == 0
    _WARM.append(True)


def fork_main(argv: list[str], env: dict[str, str] | None = None, stderr: Path | None = None) -> int:
    """Run ``rnnkit.cli.main(argv)`` in a forked child (no interpreter start-up), with ``env`` added to
    its environment and its stderr written to ``stderr`` (default: discarded); returns its pid."""
    warm_up()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 70
        try:
            os.environ.update(env or {})
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT, 0o644) if stderr else devnull, 2)
            from rnnkit.cli import main

            code = main(argv)
        finally:
            os._exit(code if isinstance(code, int) else 1)
    return pid


def spawn_main(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Run ``python -m rnnkit argv`` as a fresh interpreter (``env`` added to its environment)."""
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "rnnkit", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_pid(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not finish in {timeout} s")


def kill_after(pid: int, delay: float) -> bool:
    """SIGKILL ``pid`` after ``delay`` seconds unless it exits first; True if it was killed."""
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            assert code == 0, f"child exited with {code}"
            return False
        time.sleep(0.001)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == -signal.SIGKILL


def run_state(out: Path) -> dict:
    """What must be bit-identical between runs: weights, optimizer state, per-step log, evaluation log
    and the scalars TensorBoard shows (all but timings)."""
    latest = CheckpointManager(out / "checkpoints").latest()
    assert latest is not None, f"no committed checkpoint in {out}"
    trainer_state = torch.load(latest / "trainer_state.pt", weights_only=True)
    with open(out / "logs" / "train.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(out / "logs" / "eval.csv", newline="") as handle:
        evals = [(r["step"], r["split"], r["metric"], r["value"]) for r in csv.DictReader(handle)]
    return {
        "weights": load_file(str(out / "model.safetensors")),
        "checkpoint_weights": load_file(str(latest / "model.safetensors")),
        "optimizer": torch.load(latest / "optimizer.pt", weights_only=True),
        "history": trainer_state["history"][:, :5],  # step, loss, lr, grad_norm, skipped (not timings)
        "log": [(r["step"], r["loss"], r["lr"], r["grad_norm"], r["skipped"]) for r in rows],
        "eval_log": evals,
        "tensorboard": tensorboard_scalars(out / "logs"),
        "step": trainer_state["step"],
    }


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``tag -> [(step, value)]`` as TensorBoard shows a log directory: its event files in order of
    creation, a session start at step ``s`` dropping what was logged before at steps >= ``s``; a
    record cut short by a kill ends its file. Timing tags (tokens/s) are left out."""
    from tests.train.test_logs import _fields

    series: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):  # names start with the creation time
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            if pos + 16 + length > len(data):
                break
            body, pos = data[pos + 12:pos + 12 + length], pos + 16 + length
            step, scalars, restart = 0, {}, False
            for field, value in _fields(body):
                if field == 2:
                    step = value
                elif field == 5:
                    for _, raw in _fields(value):
                        parts = dict(_fields(raw))
                        scalars[parts[1].decode()] = struct.unpack("<f", parts[2])[0]
                elif field == 7:
                    restart = dict(_fields(value)).get(1) == 1
            if restart:
                series = {tag: [(s, v) for s, v in points if s < step] for tag, points in series.items()}
            for tag, value in scalars.items():
                if "tokens_per_second" not in tag:
                    series.setdefault(tag, []).append((step, value))
    return series


def assert_identical(a, b, path: str = "") -> None:
    """Nested dicts/lists/tensors equal bit for bit (``torch.equal`` on every tensor)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
