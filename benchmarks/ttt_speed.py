"""Training speed of the test-time-training layers: ``chunk`` against ``recurrent``, next to GLA and DeltaNet.

    python benchmarks/ttt_speed.py                   # B=4, T=2048, D=256 (4 heads of 64), mini-batch 16
    python benchmarks/ttt_speed.py --quick           # T=512, fewer repetitions
    python benchmarks/ttt_speed.py --batch 1 --length 64 --width 16 --heads 2 --reps 1   # a smoke run

Rows, each forward + backward of the whole layer (``rnnkit.layers.build(name, d_model=D,
num_heads=H)``, every other option at its default), fp32, ``--threads`` threads, from the layer's
initial state: ``ttt_linear``, ``ttt_mlp`` and ``titans`` in ``chunk`` (the mini-batch dual form) and
``recurrent`` (the token loop), and ``gla`` and ``deltanet`` in ``chunk`` at the same width. Both
modes of a test-time-training layer compute the same function (the mini-batch size is part of the
recurrence), so ``chunk / recurrent`` is a speed-up of one computation. Candidates run interleaved,
one repetition each in turn, and the best (minimum-time) repetition counts, so that load from other
processes hits them alike. The last lines state each layer's ``chunk`` against ``recurrent``
(target: >= 10x at T = 2048).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

import rnnkit
from rnnkit.bench.machine import describe

TTT_LAYERS = ("ttt_linear", "ttt_mlp", "titans")
PEERS = ("gla", "deltanet")


def train_step(layer: rnnkit.layers.Recurrence, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """One forward + backward of ``layer`` over ``x`` in ``mode``."""

    def run() -> None:
        layer.zero_grad(set_to_none=True)
        y, _ = layer(x, mode=mode)
        y.square().mean().backward()

    return run


def best_of(candidates: dict[str, Callable[[], None]], reps: int) -> dict[str, float]:
    for fn in candidates.values():  # warm up
        fn()
    best = {name: float("inf") for name in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T=512 and 2 repetitions")
    parser.add_argument("--batch", type=int, default=4, help="B")
    parser.add_argument("--length", type=int, default=2048, help="T")
    parser.add_argument("--width", type=int, default=256, help="d_model D")
    parser.add_argument("--heads", type=int, default=4, help="H")
    parser.add_argument("--mini-batch", type=int, default=16, help="mini_batch_size of the TTT layers")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    T = 512 if args.quick else args.length
    reps = 2 if args.quick else args.reps
    torch.set_num_threads(args.threads)
    print(describe())
    print(f"fp32, fwd+bwd of the layer, B={args.batch} T={T} D={args.width} H={args.heads}, "
          f"mini_batch_size={args.mini_batch}, {args.threads} threads, best of {reps}")
    torch.manual_seed(0)
    x = torch.randn(args.batch, T, args.width, requires_grad=True)
    candidates: dict[str, Callable[[], None]] = {}
    for name in TTT_LAYERS:
        layer = rnnkit.layers.build(name, d_model=args.width, num_heads=args.heads, mini_batch_size=args.mini_batch)
        for mode in ("chunk", "recurrent"):
            candidates[f"{name} {mode}"] = train_step(layer, x, mode)
    for name in PEERS:
        layer = rnnkit.layers.build(name, d_model=args.width, num_heads=args.heads)
        candidates[f"{name} chunk"] = train_step(layer, x, "chunk")
    best = best_of(candidates, reps)
    rate = {name: args.batch * T / seconds for name, seconds in best.items()}
    print(f"{'row':<22} {'tokens/s':>12}")
    for name in candidates:
        print(f"{name:<22} {rate[name]:>12,.0f}")
    for name in TTT_LAYERS:
        ratio = rate[f"{name} chunk"] / rate[f"{name} recurrent"]
        print(f"{name}: chunk is {ratio:.1f}x recurrent (target >= 10x at T = 2048): {'met' if ratio >= 10 else 'not met'}")


if __name__ == "__main__":
    main()
