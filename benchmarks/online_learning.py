"""Backpropagation through time against truncated BPTT and online learning (RTRL): what each learns,
and the memory each needs as the sequence grows.

    python benchmarks/online_learning.py adding --out docs/findings/f7-online.jsonl       # BPTT, TBPTT, RTRL on adding
    python benchmarks/online_learning.py copy --out docs/findings/f7-online.jsonl         # BPTT and RTRL on copy
    python benchmarks/online_learning.py memory --out docs/findings/f7-online-memory.jsonl  # peak memory at two T
    python benchmarks/online_learning.py adding --steps 20 --out /tmp/quick.jsonl  # a quick look

Every run is one torch thread, fp32, seeded, and appends one JSON line to ``--out`` (a rerun skips
the runs already there, so an interrupted experiment continues where it stopped). The model is the
same for every method of an experiment (one recurrent layer, built from the same seed), as are the
batches (a pure function of the seed and the step), the optimizer (AdamW, warmup then cosine,
gradient clipping 1.0) and the number of steps and examples. Methods:

- ``bptt``: the Trainer as it trains by default (backpropagation through the whole sequence);
- ``tbptt:L``: the sequence cut into windows of ``L`` steps, the state carried across them and
  detached at their boundaries, each window's loss backpropagated within it, one update per batch;
- ``rtrl:K``: ``TrainConfig(online="rtrl", online_every=K)``: exact RTRL, the weights updated every
  ``K`` time steps (``K >= T``: once per batch, on BPTT's gradient).

Test metric: the task's whole test split at the training length. ``memory`` runs each method for
one step at each ``T`` in a fresh subprocess and records the growth of the resident set's high-water
mark over that step (``VmHWM``, reset through ``/proc/self/clear_refs`` after a warm-up step at
``T = 2``, so that thread pools and allocator arenas are in place but no working set that grows
with ``T`` is), and the step's CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from rnnkit.bench.machine import describe
from rnnkit.layers.base import map_state
from rnnkit.models import SequenceModel, model_config_for
from rnnkit.tasks import Batch, build_task
from rnnkit.train import TrainConfig, Trainer
from rnnkit.train.metrics import loss_and_counts, prediction_count
from rnnkit.train.optim import clip_gradients, lr_at, set_lr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_speed import reset_peak, vm  # noqa: E402  (the sibling benchmark's /proc readers)

MiB = 2**20

#: The experiments: task, model, optimisation, and the methods compared.
EXPERIMENTS = {
    "adding": {
        "task": "adding", "task_options": {}, "seq_len": 200,
        "model": {"layer": "mingru", "block": "residual", "d_model": 16, "layer_options": {}},
        "train": {"steps": 400, "batch_size": 32, "lr": 1e-2, "warmup_steps": 20},
        "methods": ["bptt", "tbptt:20", "tbptt:100", "rtrl:1"],
        "seeds": [0, 1],
    },
    "copy": {
        "task": "copy", "task_options": {"n_symbols": 10, "delay": 20}, "seq_len": None,
        "model": {"layer": "lru", "block": "residual", "d_model": 16, "layer_options": {"d_state": 16}},
        "train": {"steps": 300, "batch_size": 32, "lr": 1e-2, "warmup_steps": 20},
        "methods": ["bptt", "rtrl:41", "rtrl:1"],
        "seeds": [0, 1],
    },
}
#: The memory experiment: the adding model at two lengths, one step per (method, T).
MEMORY = {"experiment": "adding", "lengths": [200, 2000], "methods": ["bptt", "tbptt:20", "rtrl:1"]}
EVAL_EXAMPLES = 1000


class TruncatedTrainer(Trainer):
    """The Trainer with truncated BPTT inside each batch: windows of ``window`` steps, the state
    detached between them, one update per batch on the gradient the windows accumulate."""

    def __init__(self, *args, window: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.window = window

    def _train_step(self, batch: Batch) -> dict[str, float]:
        cfg = self.config
        local = batch.to(cfg.device)
        if local.lengths is not None:
            raise ValueError("truncated BPTT here takes fixed-length sequences")
        lr = lr_at(self.step, cfg)
        set_lr(self.optimizer, lr)
        self.optimizer.zero_grad(set_to_none=True)
        per_step = self.model.config.head in ("lm", "regress_per_step", "multilabel")
        count = max(prediction_count(local, self.task.target), 1)
        T, state, loss_sum = local.x.shape[1], None, 0.0
        for start in range(0, T, self.window):
            end = min(T, start + self.window)
            output, state = self.model(local.x[:, start:end], state, None, cfg.mode)
            if per_step or end == T:  # a per-sequence target is read at the last step only
                y = local.y[:, start:end] if per_step else local.y
                loss, _ = loss_and_counts(output, Batch(local.x[:, start:end], y, None), self.task.target,
                                          reduction="sum")
                (loss / count).backward()
                loss_sum += float(loss.detach())
            state = map_state(torch.Tensor.detach, state)
        grad_norm = clip_gradients(self.model, cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        return {"step": self.step, "loss": loss_sum / count, "lr": lr, "grad_norm": grad_norm, "skipped": 0}


def build(name: str, method: str, seed: int, steps: int | None = None, seq_len: int | None = None,
          log_every: int = 10**9) -> Trainer:
    """The Trainer of one run of experiment ``name`` with ``method`` (module docstring)."""
    spec = EXPERIMENTS[name]
    task = build_task(spec["task"], eval_examples=EVAL_EXAMPLES, **spec["task_options"])
    torch.manual_seed(seed)
    model = SequenceModel(model_config_for(task, num_layers=1, **spec["model"]))
    kind, _, arg = method.partition(":")
    online = {"online": "rtrl", "online_every": int(arg)} if kind == "rtrl" else {}
    config = TrainConfig(seq_len=seq_len or spec["seq_len"], seed=seed, progress=False, log_every=log_every,
                         eval_batch_size=250, **{**spec["train"], **({"steps": steps} if steps else {})}, **online)
    if kind == "tbptt":
        return TruncatedTrainer(model, task, config, window=int(arg))
    return Trainer(model, task, config)


def run(name: str, method: str, seed: int, steps: int | None, log_every: int = 10**9) -> dict:
    trainer = build(name, method, seed, steps, log_every=log_every)
    start = time.process_time()
    result = trainer.fit()
    seconds = time.process_time() - start  # CPU seconds, which the load of other processes does not change
    test = trainer.evaluate("test")
    spec = EXPERIMENTS[name]
    T = trainer.config.seq_len or trainer.task.default_seq_len
    every = max(1, len(trainer.history) // 50)
    return {
        "experiment": name, "task": spec["task"], "task_options": spec["task_options"], "T": T, "method": method,
        "seed": seed, **spec["model"], "params": sum(p.numel() for p in trainer.model.parameters()),
        "steps": trainer.step, "batch_size": trainer.config.batch_size, "lr": trainer.config.lr,
        "train_cpu_seconds": seconds, "val": result["val"], "test": test, "test_examples": EVAL_EXAMPLES,
        "loss_curve": [[r["step"], r["loss"]] for r in trainer.history[::every]] + [[trainer.step, result["train_loss"]]],
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }


def memory_case(method: str, T: int) -> dict:
    """One training step at length ``T`` in this process: the growth of peak RSS over it (bytes)."""
    trainer = build(MEMORY["experiment"], method, 0, seq_len=T)
    trainer.model.train()
    warm = next(trainer.task.train_batches(trainer.config.batch_size, 2, seed=1))  # no chunk of loss-free steps
    trainer._train_step(warm)
    batch = next(trainer.task.train_batches(trainer.config.batch_size, T, seed=0))
    base = reset_peak()  # VmHWM from here on
    start = time.process_time()
    trainer._train_step(batch)
    seconds = time.process_time() - start
    return {"peak_bytes": vm("VmHWM") - base, "step_cpu_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=[*EXPERIMENTS, "memory"])
    parser.add_argument("--out", required=True, help="JSON lines file the runs are appended to")
    parser.add_argument("--steps", type=int, help="override the experiment's steps (a quick look)")
    parser.add_argument("--methods", help="comma-separated subset of the experiment's methods")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the experiment's)")
    parser.add_argument("--log-every", type=int, default=10**9, help="a line with the training loss every N steps")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.case:
        print(json.dumps(memory_case(**json.loads(args.case))))
        return
    print(describe())
    out = Path(args.out)
    done = set()
    if out.is_file():
        done = {(r["experiment"], r["method"], r.get("seed"), r["T"], r.get("steps")) for r in map(json.loads, out.open())}
    if args.experiment == "memory":
        spec = EXPERIMENTS[MEMORY["experiment"]]
        for T in MEMORY["lengths"]:
            for method in (args.methods.split(",") if args.methods else MEMORY["methods"]):
                key = ("memory", method, None, T, 1)
                if key in done:
                    continue
                env = dict(os.environ, OMP_NUM_THREADS="1")
                case = json.dumps({"method": method, "T": T})
                proc = subprocess.run([sys.executable, __file__, "memory", "--out", "-", "--case", case],
                                      capture_output=True, text=True, env=env)
                if proc.returncode:
                    raise SystemExit(proc.stderr)
                row = {"experiment": "memory", "task": spec["task"], "T": T, "method": method, "steps": 1,
                       **spec["model"], "batch_size": spec["train"]["batch_size"], **json.loads(proc.stdout)}
                print(f"memory T={T:>5} {method:<10} peak {row['peak_bytes'] / MiB:8.1f} MiB, "
                      f"step {row['step_cpu_seconds']:.2f} s", flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
        return
    spec = EXPERIMENTS[args.experiment]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else spec["seeds"]
    for seed in seeds:
        for method in (args.methods.split(",") if args.methods else spec["methods"]):
            steps = args.steps or spec["train"]["steps"]
            T = spec["seq_len"] or build_task(spec["task"], **spec["task_options"]).default_seq_len
            if (args.experiment, method, seed, T, steps) in done:
                continue
            row = run(args.experiment, method, seed, args.steps, args.log_every)
            metric = "mse" if "mse" in row["test"] else "accuracy"
            print(f"{args.experiment} T={row['T']} {method:<10} seed {seed}: test {metric} {row['test'][metric]:.4f}, "
                  f"{row['steps']} steps in {row['train_cpu_seconds']:.0f} CPU s", flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
