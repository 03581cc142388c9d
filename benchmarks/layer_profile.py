"""Where a layer's training step spends its time: ``torch.profiler``'s self CPU time by op.

    python benchmarks/layer_profile.py                        # mamba2 deltanet hawk s4d; D=256, B=16, T=512
    python benchmarks/layer_profile.py --layers hawk --top 25
    python benchmarks/layer_profile.py --quick                # T=64, for a smoke test

For each layer (default options, ``mode="auto"``): forward and backward of one layer on a
``(B, T, D)`` input that needs its gradient, against a random output gradient, as inside a model.
After two warm-up steps, ``--steps`` steps run under the profiler; the table lists the ops with the
largest self CPU time (time inside the op itself, not in the ops it calls) as a share of the
profile's total, with their calls per step. The shares say where the time goes on any machine;
the absolute milliseconds depend on it and on its load.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import rnnkit
from rnnkit.bench.machine import describe


def profile_layer(name: str, d_model: int, batch: int, length: int, steps: int) -> tuple[float, list[tuple[str, float, float]]]:
    """Milliseconds of self CPU time per step, and (op, share of it, calls per step) per op, largest first."""
    torch.manual_seed(0)
    layer = rnnkit.layers.build(name, d_model=d_model)
    x, dy = torch.randn(batch, length, d_model), torch.randn(batch, length, layer.d_output)

    def step() -> None:
        for p in layer.parameters():
            p.grad = None
        y, _ = layer(x.detach().requires_grad_())
        y.backward(dy)

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(((e.key, e.self_cpu_time_total / total, e.count / steps) for e in events), key=lambda r: -r[1])
    return total / 1e3 / steps, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", default=["mamba2", "deltanet", "hawk", "s4d"])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=None, help="T (default 512, quick 64)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--top", type=int, default=15, help="ops listed per layer")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="T=64, one profiled step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    length = args.length or (64 if args.quick else 512)
    steps = 1 if args.quick else args.steps
    print(describe())
    print(f"fp32, d_model={args.d_model}, B={args.batch}, T={length}, forward + backward, mode auto, "
          f"{steps} profiled step(s)\n")
    for name in args.layers:
        ms, rows = profile_layer(name, args.d_model, args.batch, length, steps)
        print(f"{name}: {ms:.1f} ms of self CPU time per step (all threads' ops, as the profiler counts them)")
        print(f"  {'op':<48} {'share':>6} {'calls/step':>10}")
        for key, share, calls in rows[: args.top]:
            print(f"  {key[:48]:<48} {100 * share:>5.1f}% {calls:>10.0f}")
        print()


if __name__ == "__main__":
    main()
