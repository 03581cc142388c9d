"""Data parallelism: 2 CPU ranks (gloo, 127.0.0.1) average to the single-process gradient; the CLI's
torchrun path trains with rank 0 writing checkpoints and logs."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from rnnkit.models import SequenceModel
from rnnkit.tasks import IGNORE_INDEX, Batch, build_task
from rnnkit.train import CheckpointManager, TrainConfig, Trainer

from tests.train.resume_utils import SRC, wait_pid, warm_up


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RaggedTargets:
    """The copy task with a random, batch-dependent set of targets ignored, so ranks hold different
    numbers of predictions (the case where averaging per-rank means would be wrong)."""

    def __init__(self) -> None:
        self.base = build_task("copy", delay=3, n_symbols=4, eval_examples=8)

    def __getattr__(self, name):
        return getattr(self.base, name)

    def train_batches(self, batch_size, seq_len=None, seed=0, start=0):
        inner = self.base.train_batches(batch_size, seq_len, seed=seed, start=start)

        def batches():
            for index, batch in enumerate(inner, start):
                gen = torch.Generator().manual_seed(index)
                drop = torch.rand(batch.y.shape, generator=gen) < torch.linspace(0.0, 0.9, batch.y.shape[0])[:, None]
                yield Batch(batch.x, batch.y.masked_fill(drop, IGNORE_INDEX), batch.lengths, batch.reset)

        return batches()


def _grads_of_one_step(out_file=None):
    """Build the model and trainer, run one step, return (grads before the update, loss)."""
    torch.manual_seed(0)
    task = RaggedTargets()
    model = SequenceModel(vocab_size=task.vocab_size, d_model=6, layer="gru", num_layers=2).double()
    trainer = Trainer(model, task, TrainConfig(steps=1, batch_size=4, progress=False, grad_clip=0.0))
    grads = {}
    step = trainer.optimizer.step

    def capture(*args, **kwargs):
        grads.update({name: p.grad.clone() for name, p in model.named_parameters()})
        return step(*args, **kwargs)

    trainer.optimizer.step = capture
    record = trainer._train_step(next(task.train_batches(4, seed=0)))
    if out_file is not None:
        torch.save({"grads": grads, "loss": record["loss"], "world": trainer.world_size}, out_file)
    return grads, record["loss"]


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        _grads_of_one_step(os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _fork_ranks(target, *args) -> None:
    warm_up()
    pids = []
    for rank in range(2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                code = target(rank, *args) or 0
            finally:
                os._exit(code)
        pids.append(pid)
    codes = [wait_pid(pid, 120) for pid in pids]
    assert codes == [0, 0], codes


def test_two_ranks_average_to_the_single_process_gradient(tmp_path):
    _fork_ranks(_rank_main, _free_port(), str(tmp_path))
    single, single_loss = _grads_of_one_step()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    for name, expected in single.items():
        for r in ranks:  # DDP leaves the averaged gradient on every rank
            torch.testing.assert_close(r["grads"][name], expected, atol=1e-13, rtol=1e-11, msg=name)
    assert ranks[0]["loss"] == pytest.approx(single_loss, rel=1e-12) == ranks[1]["loss"]


def _cli_rank(rank: int, port: int, argv: list[str]) -> int:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from rnnkit.cli import main

    return main(argv)


def _cli_argv(out, steps=6):
    # fp32: two ranks and one process sum the gradient in different orders, which bf16 would magnify.
    return ["train", "--task", "parity", "--model", "lstm", "--d-model", "8", "--steps", str(steps), "--batch-size",
            "4", "--seq-len", "10", "--task-opt", "eval_examples=8", "--no-progress", "--threads", "1",
            "--precision", "fp32",
            "--checkpoint-every", "2", "--out", str(out), "--log-dir", str(out / "logs"), "--resume"]


def _losses(out):
    with open(out / "logs" / "train.csv", newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def test_cli_on_two_ranks_matches_one_process_and_resumes(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    _fork_ranks(_cli_rank, _free_port(), _cli_argv(ddp, steps=4))
    assert [s for s, _ in CheckpointManager(ddp / "checkpoints").committed()] == [2, 4]
    assert not list((ddp / "checkpoints").glob(".tmp*"))
    # Resume the 2-rank run to 6 steps? The step count is part of the schedule, so compare a full
    # 6-step single-process run with a 2-rank run killed nowhere but resumed from its step-4 checkpoint
    # of an identical 6-step configuration.
    shutil.rmtree(ddp)
    _fork_ranks(_cli_rank, _free_port(), _cli_argv(ddp))
    from rnnkit.cli import main

    assert main(_cli_argv(single)) == 0
    assert _losses(ddp) == pytest.approx(_losses(single), rel=1e-5)
    shutil.rmtree(ddp / "checkpoints" / "step-00000006")
    os.remove(ddp / "model.safetensors")
    _fork_ranks(_cli_rank, _free_port(), _cli_argv(ddp))  # resumes at step 4 on both ranks
    assert _losses(ddp) == pytest.approx(_losses(single), rel=1e-5)
    assert (ddp / "model.safetensors").is_file()


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "rnnkit", *_cli_argv(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("rnnkit train:") == 1  # only rank 0 talks
    assert [s for s, _ in CheckpointManager(out / "checkpoints").committed()] == [2, 4, 6]  # rank 0 wrote each once


def test_two_ranks_carry_their_own_tbptt_streams(tmp_path):
    """Streaming LM under DDP: each rank carries the state of its own rows across windows."""
    argv = lambda out: ["train", "--task", "shakespeare", "--model", "lstm", "--d-model", "8", "--steps", "4",  # noqa: E731
                        "--batch-size", "4", "--seq-len", "8", "--sample-length", "0", "--eval-max-batches", "1",
                        "--eval-batch-size", "2", "--no-progress", "--threads", "1", "--out", str(out),
                        "--log-dir", str(out / "logs")]
    from rnnkit.cli import main

    _fork_ranks(_cli_rank, _free_port(), argv(tmp_path / "ddp"))
    assert main(argv(tmp_path / "single")) == 0
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "single"), rel=1e-5)


def test_two_ranks_train_an_encoder_decoder_as_one_process(tmp_path):
    """A sequence-to-sequence task under DDP: each rank trains on its rows of every batch (cut to their
    own longest source and target), and the losses are the single process's."""
    argv = lambda out: ["train", "--task", "reverse", "--task-opt", "max_len=6", "--task-opt", "eval_examples=8",  # noqa: E731
                        "--model", "gru", "--attention", "bahdanau", "--bidirectional-encoder", "--d-model", "8",
                        "--label-smoothing", "0.1", "--steps", "4", "--batch-size", "8", "--no-progress",
                        "--threads", "1", "--out", str(out), "--log-dir", str(out / "logs")]
    from rnnkit.cli import main

    _fork_ranks(_cli_rank, _free_port(), argv(tmp_path / "ddp"))
    assert main(argv(tmp_path / "single")) == 0
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "single"), rel=1e-5)
