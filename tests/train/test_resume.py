"""Exact resume: SIGKILL at random instants and inside checkpoint writes, SIGTERM/SIGINT, resuming a
finished run, config mismatch, atomic and checksummed checkpoint dirs."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest
import torch

from rnnkit import InputError
from rnnkit.atomic import FAULT_ENV, FAULT_SCOPE_ENV
from rnnkit.cli import main
from rnnkit.train import CheckpointManager
from rnnkit.train.checkpoint import MARKER, TMP_PREFIX
from rnnkit.train.rundir import OWNER_MARKER, is_owned, make_owned_dir

from tests.train.resume_utils import (
    RUNS, assert_identical, fork_main, kill_after, run_state, spawn_main, train_argv, wait_pid, warm_up,
)


def _reference(tmp_path, name, steps, every):
    out = tmp_path / f"{name}-reference"
    warm_up()  # not part of the timed run
    start = time.monotonic()
    assert wait_pid(fork_main(train_argv(name, out, steps, every)), 120) == 0
    return out, time.monotonic() - start


def _killed_and_resumed(out, name, steps, every, kills, duration, rng, launch):
    """Launch with --resume until the run completes, SIGKILLing it ``kills`` times at random instants."""
    stats = {"kills": 0, "torn_writes": 0, "resumed_steps": []}
    for _ in range(kills):
        # Early enough that the run rarely completes first, late enough that it progresses between kills.
        killed = launch(train_argv(name, out, steps, every), rng.uniform(0.05, 0.5) * duration)
        if not killed:
            return stats  # the run finished before the kill came
        stats["kills"] += 1
        root = out / "checkpoints"
        if root.is_dir() and any(p.name.startswith(".tmp") for p in root.iterdir()):
            stats["torn_writes"] += 1  # killed while a checkpoint was being written
        latest = CheckpointManager(root).latest()
        stats["resumed_steps"].append(int(latest.name.split("-")[1]) if latest else 0)
    assert launch(train_argv(name, out, steps, every), None) is False
    return stats


def _fork_launch(argv, delay):
    pid = fork_main(argv)
    if delay is None:
        assert wait_pid(pid, 120) == 0
        return False
    return kill_after(pid, delay)


def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path):
    """3 runs x 3 SIGKILLs each at random instants; each resumed run equals its uninterrupted twin."""
    totals = {"runs": 0, "kills": 0, "torn_writes": 0, "identical": 0, "resumed_mid_run": 0}
    for index, name in enumerate(sorted(RUNS)):
        steps, every = 24, 3
        reference, duration = _reference(tmp_path, name, steps, every)
        out = tmp_path / f"{name}-killed"
        stats = _killed_and_resumed(out, name, steps, every, 3, duration, random.Random(index), _fork_launch)
        assert_identical(run_state(reference), run_state(out))
        totals["runs"] += 1
        totals["identical"] += 1
        totals["kills"] += stats["kills"]
        totals["torn_writes"] += stats["torn_writes"]
        totals["resumed_mid_run"] += sum(0 < s < steps for s in stats["resumed_steps"])
        print(f"{name}: reference {duration:.2f} s, {stats}")
    print(f"kill/resume: {totals}")
    assert totals["kills"] >= 3 and totals["resumed_mid_run"] >= 1, totals


@pytest.mark.slow
def test_sigkill_many_times_fresh_interpreters(tmp_path):
    """Larger variant: fresh `python -m rnnkit` processes, 3 runs x 6 kills, 60 steps."""
    def launch(argv, delay):
        proc = spawn_main(argv)
        if delay is None:
            assert proc.wait(300) == 0, proc.stdout.read()
            return False
        # Kill only once training is under way: after the first step line (start-up is seconds here).
        for line in proc.stdout:
            if line.startswith("step "):
                break
        time.sleep(delay)
        if proc.poll() is not None:
            assert proc.returncode == 0
            return False
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True

    for index, name in enumerate(sorted(RUNS)):
        steps, every = 60, 4
        reference, duration = _reference(tmp_path, name, steps, every)
        out = tmp_path / f"{name}-killed"
        stats = _killed_and_resumed(out, name, steps, every, 6, duration, random.Random(100 + index), launch)
        assert stats["kills"] >= 1
        assert_identical(run_state(reference), run_state(out))
        print(f"{name}: reference {duration:.2f} s, {stats}, bit-identical")


def _checkpoint_bytes(path) -> int:
    """Bytes the atomic writes of a checkpoint put into it (its files, not its markers)."""
    return sum(p.stat().st_size for p in path.iterdir() if p.name not in (MARKER, OWNER_MARKER))


def _killed_inside_checkpoint_writes(tmp_path, name, steps, every, kills, rng, launch):
    """Launch with --resume ``kills`` times, each launch SIGKILLed by the writer's fault hook inside a
    checkpoint write (by construction: the hook counts only bytes written into a checkpoint's
    temporary directory), alternately the launch's first and second one, so that the run progresses;
    then once without faults. The result equals an uninterrupted run. Returns the step each launch
    resumed from."""
    warm_up()
    reference = tmp_path / f"{name}-reference"
    assert wait_pid(fork_main([*train_argv(name, reference, steps, every), "--keep-last", "0"]), 120) == 0
    # Checkpoints grow with their history: a limit <= the smallest lands in a launch's first write,
    # one above the largest but <= twice the smallest in its second.
    sizes = [_checkpoint_bytes(path) for _, path in CheckpointManager(reference / "checkpoints").committed()]
    smallest, largest = min(sizes), max(sizes)
    assert largest < 2 * smallest, sizes
    out = tmp_path / f"{name}-faulted"
    resumed_from = []
    for kill in range(kills + 1):
        latest = CheckpointManager(out / "checkpoints").latest()
        resumed_from.append(int(latest.name.split("-")[1]) if latest else 0)
        if kill == kills:
            break
        limit = rng.randint(1, smallest) if kill % 2 == 0 else rng.randint(largest + 1, 2 * smallest)
        faults = {FAULT_ENV: str(limit), FAULT_SCOPE_ENV: TMP_PREFIX}
        assert launch(train_argv(name, out, steps, every), faults) == -signal.SIGKILL
        torn = [p for p in (out / "checkpoints").iterdir() if p.name.startswith(TMP_PREFIX)]
        assert torn and all(is_owned(p) and not (p / MARKER).exists() for p in torn), torn  # killed mid-write
    assert resumed_from[-1] > 0, resumed_from  # the last launch resumed mid-run
    assert launch(train_argv(name, out, steps, every), {}) == 0
    assert not any(p.name.startswith(TMP_PREFIX) for p in (out / "checkpoints").iterdir())  # cleaned at start
    assert_identical(run_state(reference), run_state(out))
    return resumed_from


def _fork_exit_code(argv, env):
    return wait_pid(fork_main(argv, env), 120)


def _spawn_exit_code(argv, env):
    proc = spawn_main(argv, env)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode in (0, -signal.SIGKILL), output
    return proc.returncode


def test_kills_inside_checkpoint_writes_fresh_interpreters_resume_bit_identical(tmp_path):
    """Two launches of `python -m rnnkit train --resume` killed inside a checkpoint write, then one that
    finishes: weights, optimizer, train.csv, eval.csv and TensorBoard scalars equal the uninterrupted run's."""
    _killed_inside_checkpoint_writes(tmp_path, "adding-gru2-dropout", 12, 2, 2, random.Random(7), _spawn_exit_code)


@pytest.mark.slow
def test_kills_inside_checkpoint_writes_every_run(tmp_path):
    """Larger variant: every run of RUNS, 4 kills each inside checkpoint writes, 24 steps."""
    for index, name in enumerate(sorted(RUNS)):
        resumed_from = _killed_inside_checkpoint_writes(tmp_path, name, 24, 3, 4, random.Random(index), _fork_exit_code)
        assert resumed_from == [0, 0, 3, 3, 6], resumed_from  # each second kill lands after a commit


def test_resuming_a_finished_run_changes_no_log(tmp_path, capsys):
    """A finished run resumed (twice) evaluates again but logs no second final evaluation."""
    name, steps, every = "adding-gru2-dropout", 7, 3
    reference, _ = _reference(tmp_path, name, steps, every)
    before = run_state(reference)
    for _ in range(2):
        assert main(train_argv(name, reference, steps, every)) == 0
    assert "resumed from" in capsys.readouterr().out
    after = run_state(reference)
    assert {row[0] for row in after["eval_log"]} == {"5", "7"}  # during training, then the final one
    assert_identical(before, after)


def _resume_after_signal(tmp_path, sig, launch_real_interpreter):
    name, steps, every = "adding-gru2-dropout", 12, 0  # no periodic checkpoints: the signal makes the only one
    reference, _ = _reference(tmp_path, name, steps, 4)
    out = tmp_path / "signalled"
    argv = train_argv(name, out, steps, every)
    if launch_real_interpreter:
        proc = spawn_main(argv)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 3/"):
                proc.send_signal(sig)
                break
        lines += proc.stdout.readlines()
        assert proc.wait(60) == 0, "".join(lines)
        assert f"stopped by {signal.Signals(sig).name}" in "".join(lines)
    else:
        pid = fork_main(argv)
        log = out / "logs" / "train.csv"
        deadline = time.monotonic() + 60
        while not (log.is_file() and len(log.read_text().splitlines()) > 3) and time.monotonic() < deadline:
            time.sleep(0.002)  # until step 3 is logged: the handler is installed once training runs
        os.kill(pid, sig)
        assert wait_pid(pid, 60) == 0
    latest = CheckpointManager(out / "checkpoints").latest()
    assert latest is not None and not (out / "model.safetensors").exists()  # stopped, checkpointed, not finished
    stopped_at = int(latest.name.split("-")[1])
    assert 0 <= stopped_at < steps
    # Finish with periodic checkpoints on (a free field), then compare with the uninterrupted run.
    resumed = [a if a != "0" or b != "--checkpoint-every" else "4" for b, a in zip([""] + argv, argv)]
    assert wait_pid(fork_main(resumed), 60) == 0
    assert_identical(run_state(reference), run_state(out))
    return stopped_at


def test_sigterm_checkpoints_at_the_next_step_and_exits_0(tmp_path):
    assert _resume_after_signal(tmp_path, signal.SIGTERM, launch_real_interpreter=True) >= 3


def test_sigint_checkpoints_at_the_next_step_and_exits_0(tmp_path):
    _resume_after_signal(tmp_path, signal.SIGINT, launch_real_interpreter=False)


def test_resume_with_a_different_config_lists_the_differences(tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv("adding-gru2-dropout", out, 4, 2)
    assert main(argv) == 0
    capsys.readouterr()
    changed = [*argv, "--lr", "0.5", "--d-model", "16", "--task-opt", "eval_examples=9"]
    assert main(changed) == 2
    err = capsys.readouterr().err
    for field in ("train.lr: checkpoint 0.01, now 0.5", "model.d_model: checkpoint 8, now 16", "task.options"):
        assert field in err, err
    assert "train.steps" not in err and "train.progress" not in err
    # Fields that don't change the trajectory may differ.
    assert main([*argv, "--keep-last", "5", "--log-every", "7"]) == 0


def test_resume_without_out_is_an_error(capsys):
    assert main(["train", "--task", "adding", "--resume"]) == 2
    assert "--out" in capsys.readouterr().err


# ---------------------------------------------------------------------- the checkpoint directory itself
def test_checkpoint_commit_rotation_and_stray_cleanup(tmp_path):
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root, keep_last=2)
    for step in (1, 2, 3):
        manager.save(step, lambda tmp, s=step: (tmp / "data").write_text(str(s)))
    assert [s for s, _ in manager.committed()] == [2, 3]
    # A writer killed mid-write leaves its temp dir, or a checkpoint whose deletion was cut short (its
    # manifest removed first): neither counts, and both carry rnnkit's marker, so clean() removes them.
    (make_owned_dir(root / ".tmp-step-00000004-999") / "data").write_text("torn")
    make_owned_dir(root / "step-00000001")
    # Entries without the marker are not rnnkit's, whatever their names: never counted, never removed.
    (root / ".tmp-step-00000007-1").mkdir()
    (root / ".tmp-step-00000007-1" / "data").write_text("foreign")
    (root / "step-00000005").mkdir()
    (root / ".model.safetensors.abc.tmp").write_text("x")
    (root / ".tmpabc").write_text("y")
    assert manager.latest().name == "step-00000003"
    removed = {p.name for p in manager.clean()}
    assert removed == {".tmp-step-00000004-999", "step-00000001"}
    assert sorted(p.name for p in root.iterdir()) == [
        ".model.safetensors.abc.tmp", ".tmp-step-00000007-1", ".tmpabc", "step-00000002", "step-00000003",
        "step-00000005"]
    assert [p.name for p in manager.foreign()] == ["step-00000005"]
    with pytest.raises(InputError, match="not written by rnnkit"):
        manager.save(5, lambda tmp: (tmp / "data").write_text("5"))
    assert (root / "step-00000005").is_dir() and not (root / "step-00000005" / MARKER).exists()


def test_a_failing_write_never_deletes_the_previous_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(1, lambda tmp: (tmp / "data").write_text("1"))

    def crash(tmp):
        (tmp / "data").write_text("2")
        raise OSError("disk full")

    with pytest.raises(OSError):
        manager.save(2, crash)
    assert [s for s, _ in manager.committed()] == [1]
    assert (tmp_path / "step-00000001" / "data").read_text() == "1"
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_resume_rejects_a_torn_or_foreign_checkpoint(tmp_path):
    from rnnkit.models import SequenceModel
    from rnnkit.tasks import build_task
    from rnnkit.train import TrainConfig, Trainer

    task = build_task("adding", eval_examples=8)

    def trainer(out, d_model=8):
        torch.manual_seed(0)
        model = SequenceModel(d_input=2, d_model=d_model, head="regress", n_outputs=1, layer="gru")
        config = TrainConfig(steps=2, batch_size=4, seq_len=6, progress=False, checkpoint_every=1)
        return Trainer(model, task, config, out_dir=out)

    first = trainer(tmp_path / "a")
    first.fit()
    latest = CheckpointManager(tmp_path / "a" / "checkpoints").latest()
    other = trainer(tmp_path / "b", d_model=12)
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(InputError, match="model.d_model"):
        other.resume(latest)
    (latest / "trainer_state.pt").write_bytes(b"not a checkpoint")
    same = trainer(tmp_path / "c")
    with pytest.raises(InputError, match="readable checkpoint"):
        same.resume(latest)
    for name, value in other.model.state_dict().items():
        assert torch.equal(value, before[name])
    with pytest.raises(InputError, match="committed checkpoint"):
        same.resume(tmp_path / "nowhere")
    assert json.loads((latest / "train.json").read_text())["rnnkit_version"]


def test_a_signal_during_set_up_is_honoured_after_the_first_step(tmp_path, monkeypatch):
    import rnnkit.cli as cli

    prepare = cli._prepare_training

    def prepare_then_signal(args):
        result = prepare(args)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives before training starts
        return result

    monkeypatch.setattr(cli, "_prepare_training", prepare_then_signal)
    handler_before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    assert main(train_argv("adding-gru2-dropout", out, 6, 0)) == 0
    assert [s for s, _ in CheckpointManager(out / "checkpoints").committed()] == [1]
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the CLI restores what it replaced
