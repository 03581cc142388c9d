"""Training-step speed (forward + backward) of each layer eager and under ``torch.compile``, side by side.

Why: every layer compiles (``tests/layers/test_compile.py``), but whether compiling pays depends on
the layer and mode: graph breaks (docs/layers.md, "Graph breaks") cut a layer into pieces that each
cross back to Python, and the fused kernels are already one call. This prints, per layer, the time
of one compile, of an eager and a compiled training step, and their ratio.

    python benchmarks/compile_speed.py                       # every layer, auto mode, inductor
    python benchmarks/compile_speed.py --layers lstm,mamba --mode recurrent --backend aot_eager
    python benchmarks/compile_speed.py --quick               # smoke test: tiny shapes, 2 layers
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch._dynamo

import rnnkit
from rnnkit.bench.machine import describe
from rnnkit.layers import flatten_state


def layer_for(name: str, d_model: int) -> rnnkit.layers.Recurrence:
    """The layer at its defaults; the wrappers wrap an LSTM."""
    options = {"layer": "lstm"} if name in ("stacked", "bidirectional") else {}
    torch.manual_seed(0)
    return rnnkit.layers.build(name, d_model=d_model, **options)


def training_step(call: Callable, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """One forward + backward through ``call`` (the layer or its compiled form)."""

    def step() -> None:
        x.grad = None
        y, state = call(x, mode=mode)
        (y.square().mean() + sum(leaf.square().mean() for leaf in flatten_state(state))).backward()

    return step


def best_of(steps: dict[str, Callable[[], None]], repeats: int, inner: int) -> dict[str, float]:
    """Seconds per call of each step, best of ``repeats`` blocks of ``inner`` calls, interleaved so
    that load from other processes hits the candidates alike."""
    best = {name: float("inf") for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(inner):
                step()
            best[name] = min(best[name], (time.perf_counter() - start) / inner)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", help="comma-separated layer names (default: every registered layer)")
    parser.add_argument("--mode", default="auto", help="layer mode (default auto; a layer without it is skipped)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, two layers, one repeat")
    args = parser.parse_args()
    names = args.layers.split(",") if args.layers else rnnkit.layers.names()
    if args.quick:
        names = names if args.layers else ["gru", "mingru"]
        args.batch, args.seq_len, args.d_model, args.repeats = 2, 16, 16, 1
    torch.set_num_threads(args.threads)
    print(describe())
    print(f"B={args.batch}, T={args.seq_len}, D={args.d_model}, fp32, mode {args.mode}, backend {args.backend}; "
          f"forward + backward, best of {args.repeats}")
    print(f"{'layer':<16} {'mode':<10} {'compile s':>9} {'eager ms':>9} {'compiled ms':>11} {'eager/compiled':>14}")
    for name in names:
        layer = layer_for(name, args.d_model)
        if args.mode != "auto" and args.mode not in layer.modes:
            print(f"{name:<16} {args.mode:<10} (no such mode)", flush=True)
            continue
        x = torch.randn(args.batch, args.seq_len, args.d_model, requires_grad=True)
        torch._dynamo.reset()
        compiled = torch.compile(layer, backend=args.backend)
        eager_step, compiled_step = training_step(layer, x, args.mode), training_step(compiled, x, args.mode)
        start = time.perf_counter()
        compiled_step()  # the compile itself, forward and backward graphs
        compile_seconds = time.perf_counter() - start
        eager_step()  # warm-up: allocator, oneDNN primitives
        compiled_step()
        inner = 1 if args.quick else 3
        seconds = best_of({"eager": eager_step, "compiled": compiled_step}, args.repeats, inner)
        print(f"{name:<16} {args.mode:<10} {compile_seconds:>9.1f} {seconds['eager'] * 1e3:>9.1f} "
              f"{seconds['compiled'] * 1e3:>11.1f} {seconds['eager'] / seconds['compiled']:>13.2f}x", flush=True)


if __name__ == "__main__":
    main()
