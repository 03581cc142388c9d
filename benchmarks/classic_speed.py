"""Speed of rnnkit's classic cells against torch.nn, on this machine, in one table.

    python benchmarks/classic_speed.py            # B=16, T=512, D in (256, 1024); a few minutes
    python benchmarks/classic_speed.py --quick    # smaller, for a smoke test

For each shape it measures training (forward + backward, tokens/s) and inference (forward under
``torch.inference_mode``, tokens/s) of:

- rnnkit ``lstm`` with PyTorch's kernel (``kernel="torch"``) and with rnnkit's own one (with
  peepholes, which torch.nn has no kernel for, and ``kernel="rnnkit"`` without them);
- rnnkit ``gru`` as ``kernel="auto"`` picks it on this device, and with PyTorch's kernel;
- rnnkit ``elman`` (tanh) as ``kernel="auto"`` picks it, and with PyTorch's kernel;
- ``torch.nn.LSTM``, ``torch.nn.GRU``, ``torch.nn.RNN`` (the baselines: each row's ratio is against
  the torch.nn layer of its family), and a plain Python loop over ``torch.nn.LSTMCell``.

Then decoding: ms per token of ``layer.step`` at B=1 against ``torch.nn.LSTM`` called on one step and
``torch.nn.LSTMCell``/``GRUCell``.

Every candidate runs once per repetition, interleaved, so that load from other processes hits all of
them alike; the figure is the best (minimum-time) repetition. The run ends with the share of CPU time
other processes took while it ran (Linux only): when that is high, rerun.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from typing import Callable

import torch

from rnnkit.bench.machine import describe
from rnnkit.layers.elman import Elman
from rnnkit.layers.gru import GRU
from rnnkit.layers.lstm import LSTM


# ------------------------------------------------------------------------------- measurement
class CpuShare:
    """Share of all CPUs' time that other processes used between ``start`` and ``stop``
    (``children``: the time of this process's finished child processes counts as its own)."""

    def __init__(self, children: bool = False) -> None:
        self.children = children

    def start(self) -> None:
        self.begin = self._read()

    def stop(self) -> float | None:
        end = self._read()
        if self.begin is None or end is None:
            return None
        (busy0, total0, own0), (busy1, total1, own1) = self.begin, end
        return max(0, (busy1 - busy0) - (own1 - own0)) / max(total1 - total0, 1)

    def _read(self):
        try:
            with open("/proc/stat") as f:
                v = [int(n) for n in f.readline().split()[1:9]]
            with open("/proc/self/stat") as f:
                own = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        # busy, total, ours (ticks): utime, stime, and the children's cutime, cstime if counted
        return sum(v) - v[3] - v[4], sum(v), sum(int(n) for n in own[11 : 15 if self.children else 13])


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (after a collection, so that none lands inside it)."""
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(candidates: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Minimum time per candidate over ``reps`` interleaved repetitions (after one warm-up)."""
    for fn in candidates.values():
        fn()
    times = {name: [] for name in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            times[name].append(timed(fn))
    return {name: min(t) for name, t in times.items()}


# ------------------------------------------------------------------------------- candidates
class CellLoop(torch.nn.Module):
    """The naive baseline: torch.nn.LSTMCell stepped by a Python loop, batch-first."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.cell = torch.nn.LSTMCell(d, d)

    def forward(self, x: torch.Tensor):
        h = c = x.new_zeros(x.shape[0], self.cell.hidden_size)
        ys = []
        for x_t in x.unbind(1):
            h, c = self.cell(x_t, (h, c))
            ys.append(h)
        return torch.stack(ys, 1), (h, c)


def sequence_models(d: int) -> dict[str, tuple[str, torch.nn.Module]]:
    """name -> (family, module); the family's baseline is the row named ``torch.nn.<family>``."""
    return {
        "rnnkit lstm, kernel=torch": ("LSTM", LSTM(d_model=d, kernel="torch")),
        "rnnkit lstm, peephole (own kernel)": ("LSTM", LSTM(d_model=d, peephole=True)),
        "rnnkit lstm, kernel=rnnkit": ("LSTM", LSTM(d_model=d, kernel="rnnkit")),
        "torch.nn.LSTM": ("LSTM", torch.nn.LSTM(d, d, batch_first=True)),
        "nn.LSTMCell Python loop": ("LSTM", CellLoop(d)),
        "rnnkit gru, kernel=auto": ("GRU", GRU(d_model=d)),
        "rnnkit gru, kernel=torch": ("GRU", GRU(d_model=d, kernel="torch")),
        "torch.nn.GRU": ("GRU", torch.nn.GRU(d, d, batch_first=True)),
        "rnnkit elman (tanh), kernel=auto": ("RNN", Elman(d_model=d)),
        "rnnkit elman (tanh), kernel=torch": ("RNN", Elman(d_model=d, kernel="torch")),
        "torch.nn.RNN": ("RNN", torch.nn.RNN(d, d, batch_first=True)),
    }


def train_step(model: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        for p in model.parameters():
            p.grad = None
        xx = x.detach().requires_grad_()  # the input's gradient counts too, as inside a stack
        y = model(xx)[0]
        y.backward(dy)

    return run


def infer_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model(x)

    return run


def decode_candidates(d: int, tokens: int) -> dict[str, Callable[[], None]]:
    """Each runs ``tokens`` steps at B=1, feeding every step's state into the next."""
    lstm, gru = LSTM(d_model=d), GRU(d_model=d)
    nn_lstm, lstm_cell, gru_cell = torch.nn.LSTM(d, d, batch_first=True), torch.nn.LSTMCell(d, d), torch.nn.GRUCell(d, d)
    xs = torch.randn(tokens, 1, d)

    def loop(step, state):
        def run() -> None:
            with torch.inference_mode():
                s = state
                for x_t in xs:
                    s = step(x_t, s)

        return run

    zeros = torch.zeros(1, d)
    return {
        "rnnkit lstm .step": loop(lambda x, s: lstm.step(x, s)[1], lstm.init_state(1)),
        "rnnkit lstm ._step (no input checks)": loop(lambda x, s: lstm._step(x, s)[1], lstm.init_state(1)),
        "rnnkit gru .step": loop(lambda x, s: gru.step(x, s)[1], gru.init_state(1)),
        "torch.nn.LSTM, one step per call": loop(lambda x, s: nn_lstm(x[:, None], s)[1], (zeros[None], zeros[None])),
        "torch.nn.LSTMCell": loop(lambda x, s: lstm_cell(x, s), (zeros, zeros)),
        "torch.nn.GRUCell": loop(lambda x, s: gru_cell(x, s), zeros),
    }


# ------------------------------------------------------------------------------- report
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T=64, D=256 only, 2 repetitions")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per candidate (default 5, quick 2)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, T = 16, (64 if args.quick else 512)
    widths = (256,) if args.quick else (256, 1024)
    reps = args.reps or (2 if args.quick else 5)
    decode_d, decode_tokens = (256, 20) if args.quick else (1024, 100)
    dtype = torch.float32
    print(describe())
    print(f"dtype {dtype}, "
          f"device cpu ({os.cpu_count()} logical CPUs)")
    print(f"sequences: B={B}, T={T}, D=H in {widths}; decoding: B=1, D=H={decode_d}")
    print(f"figures: best of {reps} interleaved repetitions; tok/s = B*T / seconds\n")

    share = CpuShare()
    share.start()
    header = f"{'D':>5}  {'layer':<36} {'train tok/s':>12} {'vs torch.nn':>11} {'infer tok/s':>12} {'vs torch.nn':>11}"
    print(header)
    print("-" * len(header))
    for d in widths:
        models = sequence_models(d)
        x, dy = torch.randn(B, T, d), torch.randn(B, T, d)
        train = best_of({n: train_step(m, x, dy) for n, (_, m) in models.items()}, reps)
        infer = best_of({n: infer_step(m, x) for n, (_, m) in models.items()}, reps)
        for name, (family, _) in models.items():
            base = f"torch.nn.{family}"
            print(f"{d:>5}  {name:<36} {B * T / train[name]:>12,.0f} {train[base] / train[name]:>10.2f}x "
                  f"{B * T / infer[name]:>12,.0f} {infer[base] / infer[name]:>10.2f}x")
        print()

    step = best_of(decode_candidates(decode_d, decode_tokens), reps)
    header = f"{'decoding, B=1, D=' + str(decode_d):<40} {'ms/token':>9}"
    print(header)
    print("-" * len(header))
    for name, seconds in step.items():
        print(f"{name:<40} {1e3 * seconds / decode_tokens:>9.3f}")
    other = share.stop()
    if other is not None:
        print(f"\nother processes used {100 * other:.0f}% of all CPU time during the run"
              + (" -- noisy, rerun on a quiet machine" if other > 0.1 else ""))


if __name__ == "__main__":
    main()
