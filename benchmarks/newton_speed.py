"""Newton's method over the sequence (``mode="newton"``) against the sequential forms, in one table.

    python benchmarks/newton_speed.py                    # T up to 4096, hidden 16..128; minutes
    python benchmarks/newton_speed.py --quick            # tiny, a smoke test
    python benchmarks/newton_speed.py --T 256 4096 65536 --hidden 64 --layers paragru

For each layer, hidden size ``H`` and length ``T`` it times training (forward + backward) of
``mode="newton"`` against the layer's sequential forms (``recurrent``, and ``fused`` where the layer
has it: rnnkit's compiled loop for the classic cells), each row's ratio against the fastest
sequential one, and reports the Newton iterations and the final residual, for freshly initialised
weights and for weights scaled up by ``--trained-scale`` (a stand-in for trained weights, whose
recurrences are less contractive). The first line describes the machine.

Every candidate runs once per repetition, interleaved, so that load from other processes hits all of
them alike; the figure is the best (minimum-time) repetition.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
from classic_speed import best_of  # this directory is on the path when a script runs from it

import rnnkit
from rnnkit.bench.machine import describe


def train_step(layer, x: torch.Tensor, mode: str) -> Callable[[], None]:
    def run() -> None:
        layer.zero_grad(set_to_none=True)
        y, _ = layer(x, mode=mode)
        y.square().mean().backward()

    return run


def scaled(layer, scale: float):
    """The layer with its recurrent weights multiplied by ``scale`` (less contractive dynamics)."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "weight_hh" in name:
                p.mul_(scale)
    return layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", default=["paragru", "paralstm", "gru", "elman"])
    parser.add_argument("--T", nargs="+", type=int, default=[256, 1024, 4096])
    parser.add_argument("--hidden", nargs="+", type=int, default=[16, 64, 128])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--trained-scale", type=float, default=2.0)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--quick", action="store_true", help="T=32, hidden 4, one repetition")
    args = parser.parse_args()
    if args.quick:
        args.T, args.hidden, args.reps, args.batch = [32], [4], 1, 2
    dtype = getattr(torch, args.dtype)
    print(describe())
    print(f"B={args.batch}, {args.dtype}, training step (forward + backward), best of {args.reps}; "
          "ratio = fastest sequential form / newton (> 1: newton is faster)")
    header = f"{'layer':<10} {'weights':<8} {'H':>5} {'T':>7} {'sequential ms':>14} {'newton ms':>10} {'ratio':>7} " \
             f"{'iters':>6} {'residual':>9}"
    print(header)
    print("-" * len(header))
    for name in args.layers:
        for H in args.hidden:
            for T in args.T:
                for weights, scale in (("init", 1.0), ("scaled", args.trained_scale)):
                    torch.manual_seed(0)
                    layer = scaled(rnnkit.layers.build(name, d_model=H, hidden_size=H).to(dtype), scale)
                    x = torch.randn(args.batch, T, H, dtype=dtype)
                    sequential = [m for m in layer.modes if m != "newton"]
                    try:
                        times = best_of({m: train_step(layer, x, m) for m in sequential + ["newton"]}, args.reps)
                    except rnnkit.ConvergenceError as error:
                        print(f"{name:<10} {weights:<8} {H:>5} {T:>7}  newton did not converge: {error}")
                        continue
                    best = min(times[m] for m in sequential)
                    info = layer.newton_info
                    print(f"{name:<10} {weights:<8} {H:>5} {T:>7} {best * 1e3:>14.1f} {times['newton'] * 1e3:>10.1f} "
                          f"{best / times['newton']:>7.2f} {info.iterations:>6} {info.residuals[-1]:>9.1e}")


if __name__ == "__main__":
    main()
