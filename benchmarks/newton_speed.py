"""Newton's method over the sequence (``mode="newton"``) against the sequential forms, in one table.

    python benchmarks/newton_speed.py                    # T up to 4096, hidden 16..128; minutes
    python benchmarks/newton_speed.py --quick            # tiny, a smoke test
    python benchmarks/newton_speed.py --T 256 4096 65536 --hidden 64 --layers paragru
    python benchmarks/newton_speed.py --iterations-only    # iterations to converge, T up to 65536

For each layer, hidden size ``H`` and length ``T`` it times training (forward + backward) of
``mode="newton"`` against the layer's sequential forms (``recurrent``, and ``fused`` where the layer
has it: rnnkit's compiled loop for the classic cells), each row's ratio against the fastest
sequential one, and reports the Newton iterations and the final residual, for freshly initialised
weights and for weights scaled up by ``--trained-scale`` (a stand-in for trained weights, whose
recurrences are less contractive). The first line describes the machine.

``--iterations-only`` skips the timed sequential baselines: for each ``T`` (outermost, so a run
stopped early has every layer at the shorter lengths), layer, dtype (``--dtypes``) and weights
(fresh, scaled, and with ``--trained NAME=DIR`` the layer of a model trained by ``rnnkit train``) it
runs one forward solve and prints the Newton updates, the rejected steps of the adaptive trust region,
the damped updates, whether the solve stopped at fp32's round-off floor, the final residual and the
wall time. The dense cells (``elman``, ``gru``, ``lstm``) run only up to ``--dense-max-T``: each of
their iterations holds ``T S^2`` Jacobian entries and does ``O(T S^3)`` work.

Every candidate runs once per repetition, interleaved, so that load from other processes hits all of
them alike; the figure is the best (minimum-time) repetition.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from classic_speed import best_of  # this directory is on the path when a script runs from it

import rnnkit
from rnnkit.models import SequenceModel
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


DENSE = ("elman", "gru", "lstm")


def print_header(setup: str, header: str) -> None:
    """The machine, the run's setup and the table's header."""
    print(describe())
    print(setup)
    print(header)
    print("-" * len(header))


def trained_layer(spec: str) -> tuple[str, torch.nn.Module]:
    """``NAME=DIR``: the first layer of type ``NAME`` in the model ``rnnkit train`` saved to ``DIR``."""
    name, _, directory = spec.partition("=")
    kind = type(rnnkit.layers.build(name, d_model=2))
    model = SequenceModel.from_pretrained(directory)
    return name, next(m for m in model.modules() if type(m) is kind)


def iterations(args) -> None:
    """The ``--iterations-only`` table (module docstring)."""
    trained = dict(trained_layer(spec) for spec in args.trained)
    print_header(f"B={args.batch}, hidden {args.hidden}, one forward solve per row (default tolerance and damping); "
                 f"'scaled' = recurrent weights x {args.trained_scale}; 'trained' = the {sorted(trained)} layer of --trained, "
                 "inputs N(0, 1); seconds are wall time on this machine",
                 f"{'T':>6} {'layer':<9} {'dtype':<8} {'weights':<7} {'iters':>5} {'rejected':>8} {'damped':>6} "
                 f"{'stalled':>7} {'residual':>9} {'seconds':>8}")
    for T in args.T:
        for name in args.layers:
            if name in DENSE and T > args.dense_max_T:
                print(f"{T:>6} {name:<9} skipped: dense Jacobian, T S^2 entries and O(T S^3) work per iteration "
                      f"(--dense-max-T {args.dense_max_T})", flush=True)
                continue
            for dtype_name in args.dtypes:
                dtype = getattr(torch, dtype_name)
                choices = [("init", 1.0), ("scaled", args.trained_scale)] + [("trained", 1.0)] * (name in trained)
                for weights, scale in [c for c in choices if c[0] in args.weights]:
                    H = args.hidden[0]
                    torch.manual_seed(0)
                    layer = trained[name] if weights == "trained" else rnnkit.layers.build(name, d_model=H, hidden_size=H)
                    layer = scaled(layer.to(dtype), scale)
                    x = torch.randn(args.batch, T, layer.d_input, dtype=dtype)
                    start = time.perf_counter()
                    prefix = f"{T:>6} {name:<9} {dtype_name:<8} {weights:<7}"
                    try:
                        with torch.no_grad():
                            layer(x, mode="newton")
                    except rnnkit.ConvergenceError as error:
                        print(f"{prefix} did not converge: {error}", flush=True)
                        continue
                    info = layer.newton_info
                    print(f"{prefix} {info.iterations:>5} {info.rejected:>8} {info.damped:>6} {str(info.stalled):>7} "
                          f"{info.residuals[-1]:>9.1e} {time.perf_counter() - start:>8.1f}", flush=True)


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
    parser.add_argument("--iterations-only", action="store_true",
                        help="iterations to converge per layer, T, dtype and weights; no timed baselines")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float64"], default=["float32", "float64"],
                        help="with --iterations-only")
    parser.add_argument("--dense-max-T", type=int, default=1024, help="with --iterations-only: longest T for "
                        "elman, gru and lstm")
    parser.add_argument("--trained", nargs="*", default=[], metavar="NAME=DIR",
                        help="with --iterations-only: also the layer NAME of the model `rnnkit train` saved to DIR")
    parser.add_argument("--weights", nargs="+", choices=["init", "scaled", "trained"],
                        default=["init", "scaled", "trained"], help="with --iterations-only: which weights")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.iterations_only:
        if args.quick:
            args.T, args.hidden, args.batch = [32], [4], 1
        elif args.T == parser.get_default("T") and args.hidden == parser.get_default("hidden"):
            args.T, args.hidden, args.batch = [256, 1024, 4096, 16384, 65536], [64], 1
        if args.layers == parser.get_default("layers"):
            args.layers = ["paragru", "paralstm", "elman", "gru", "lstm"]
        iterations(args)
        return
    if args.quick:
        args.T, args.hidden, args.reps, args.batch = [32], [4], 1, 2
    dtype = getattr(torch, args.dtype)
    print_header(f"B={args.batch}, {args.dtype}, training step (forward + backward), best of {args.reps}; "
                 "ratio = fastest sequential form / newton (> 1: newton is faster)",
                 f"{'layer':<10} {'weights':<8} {'H':>5} {'T':>7} {'sequential ms':>14} {'newton ms':>10} {'ratio':>7} "
                 f"{'iters':>6} {'residual':>9}")
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
