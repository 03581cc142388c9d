"""Speed of the ``slstm`` layer's training step on the CPU: its ``fused`` form (the loop with a
hand-written backward, what ``auto`` runs) against ``recurrent`` (the same loop differentiated by
autograd), with ``torch.nn.LSTM`` of the same width as the baseline every ratio is taken against.

    python benchmarks/slstm_speed.py             # B=16, T=512, d_model=256, H=4, fp32
    python benchmarks/slstm_speed.py --quick     # smaller and fewer repetitions, a smoke test

A training step is forward + backward w.r.t. the input and every parameter. Candidates run once per
repetition, interleaved, so that load from other processes hits all alike; each figure is the best
repetition. The run ends with the share of CPU time other processes took (Linux only).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from classic_speed import CpuShare, best_of, train_step  # noqa: E402  (sibling script)
from mamba_speed import ModeCall  # noqa: E402  (sibling script)

import rnnkit  # noqa: E402
from rnnkit.bench.machine import describe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    B, T, D = (4, 64, 64) if args.quick else (16, 512, 256)
    reps = 2 if args.quick else 5
    print(describe())
    torch.manual_seed(0)
    layer = rnnkit.layers.build("slstm", d_model=D, num_heads=4)
    x, dy = torch.randn(B, T, D), torch.randn(B, T, D)
    candidates = {
        "slstm fused (auto)": train_step(ModeCall(layer, "fused"), x, dy),
        "slstm recurrent": train_step(ModeCall(layer, "recurrent"), x, dy),
        "torch.nn.LSTM": train_step(torch.nn.LSTM(D, D, batch_first=True), x, dy),
    }
    share = CpuShare()
    share.start()
    times = best_of(candidates, reps)
    other = share.stop()
    base = times["torch.nn.LSTM"]
    print(f"training step, B={B} T={T} d_model={D} H=4, {torch.get_num_threads()} threads")
    for name, seconds in times.items():
        print(f"  {name:<20} {B * T / seconds:>12,.0f} tokens/s   {base / seconds:5.2f}x torch.nn.LSTM")
    if other is not None:
        print(f"other processes used {other:.0%} of the CPUs meanwhile")


if __name__ == "__main__":
    main()
