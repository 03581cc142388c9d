"""Speed of ``rnnkit.ops.linear_scan`` in every form, and of the diagonal-recurrence layers, in one run.

    python benchmarks/scan_speed.py            # T in (512, 2048, 8192), D in (256, 1024); ~5 minutes
    python benchmarks/scan_speed.py --quick    # T in (512, 2048), D = 256, layers at D = 256

1. The scan, B=16, fp32: forward + backward (``h.backward(g)``) of each form of ``linear_scan``
   against the plain eager PyTorch loop (``linear_scan_recurrent``, autograd through it), and the
   forward alone against memory-bound references measured in the same run on the same bytes: a
   tensor copy and ``torch.add``. A scan's forward moves the bytes of ``a`` and ``b`` (read) and
   ``h`` (written), like ``torch.add(a, b)``, so ``fwd GB/s = 3 * B*T*D * 4 / seconds`` for both.
   Both are timed twice: returning a freshly allocated tensor (what a call does; above ~32 MiB glibc
   maps new pages for it and the first write page-faults on each) and writing into a reused buffer
   (``torch.add(..., out=)``, and the fused kernel's ``out``), which is the copy's pure bandwidth.
2. The layers, B=16, fp32, T=512: training (forward + backward w.r.t. input and parameters) tokens/s of
   each registered diagonal-recurrence layer in every mode next to ``torch.nn.LSTM`` and
   ``torch.nn.GRU`` of the same width, and lucidrains' ``mingru-pytorch`` minGRU when installed
   (``pip install -c constraints.txt -e ".[peers]"``; it is pure PyTorch and CPU-only friendly).
3. S4's ``conv`` mode (the Cauchy/Woodbury kernel and FFT convolution) against its ``recurrent`` mode,
   B=8, H=64, N=64, fp32, T=4096: training (forward + backward) seconds of each; target ``conv`` >= 5x.
   ``--s4-length``, ``--s4-width`` and ``--s4-batch`` change the shape.

Every candidate runs once per repetition, interleaved, so load from other processes hits all alike;
the figure is the best repetition. The run ends with the share of CPU other processes took.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from classic_speed import CpuShare, best_of, train_step  # noqa: E402  (sibling script)

import rnnkit  # noqa: E402
from rnnkit.bench.machine import describe  # noqa: E402
from rnnkit.ops import _native, linear_scan, linear_scan_recurrent  # noqa: E402
from rnnkit.ops.scan import _fused_forward, resolve_mode  # noqa: E402

#: Layers of the diagonal (linear-scan) family, benchmarked when registered.
#: S4's recurrence is not diagonal (DPLR), but it is a time-invariant SSM like S4D, with a conv mode.
DIAGONAL_LAYERS = ("mingru", "minlstm", "lru", "s4d", "s4", "s5", "rglru", "hawk", "mamba", "cfc")


# ------------------------------------------------------------------------------- the scan
def scan_train(mode: str, a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> Callable[[], None]:
    """Forward + backward of one form; the gradients w.r.t. a and b are formed (as in a layer)."""
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()

    def run() -> None:
        a.grad = b.grad = None
        h = linear_scan_recurrent(a, b) if mode == "eager loop" else linear_scan(a, b, mode=mode)
        h.backward(g)

    return run


def scan_forward(mode: str, a: torch.Tensor, b: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            linear_scan_recurrent(a, b) if mode == "eager loop" else linear_scan(a, b, mode=mode)

    return run


def memory_references(a: torch.Tensor, b: torch.Tensor) -> dict[str, tuple[Callable[[], object], int]]:
    """name -> (function, bytes it moves); the scan rows compare against these."""
    n = a.numel() * a.element_size()
    # A copy of 1.5x a's elements reads and writes the same 3 * numel bytes as add and the scan.
    out, big, src = torch.empty_like(a), torch.empty(a.numel() * 3 // 2, dtype=a.dtype), torch.randn(a.numel() * 3 // 2)
    rows: dict[str, tuple[Callable[[], object], int]] = {
        "copy (same bytes), reused out": (lambda: big.copy_(src), 2 * big.numel() * a.element_size()),
        "torch.add, fresh out": (lambda: torch.add(a, b), 3 * n),
        "torch.add, reused out": (lambda: torch.add(a, b, out=out), 3 * n),
    }
    if _native.available():
        rows["fused scan kernel, reused out"] = (lambda: _fused_forward(a, b, None, out=out), 3 * n)
    return rows


def scan_table(shapes, B: int, reps: int, forms: list[str]) -> list[dict]:
    results = []
    header = (f"{'T':>5} {'D':>5}  {'form':<32} {'fwd+bwd ms':>10} {'vs loop':>8} {'fwd ms':>8} {'fwd GB/s':>9} "
              f"{'vs add':>7}")
    print(header)
    print("-" * len(header))
    for T, D in shapes:
        torch.manual_seed(0)
        a = torch.rand(B, T, D) * 0.5 + 0.5  # decays in [0.5, 1)
        b, g = torch.randn(B, T, D), torch.randn(B, T, D)
        nbytes = 3 * a.numel() * a.element_size()
        loop_reps = max(1, reps // 2)  # the loop is the slow, stable one
        train = best_of({"eager loop": scan_train("eager loop", a, b, g)}, loop_reps)
        train.update(best_of({f: scan_train(f, a, b, g) for f in forms}, reps))
        fwd = best_of({"eager loop": scan_forward("eager loop", a, b)}, loop_reps)
        fwd.update(best_of({f: scan_forward(f, a, b) for f in forms}, reps))
        refs = memory_references(a, b)
        ref_time = best_of({k: fn for k, (fn, _) in refs.items()}, reps)
        add_fresh = nbytes / ref_time["torch.add, fresh out"] / 1e9
        add_out = nbytes / ref_time["torch.add, reused out"] / 1e9
        for form in ["eager loop"] + forms:
            gbs = nbytes / fwd[form] / 1e9
            label = form if form != "auto" else f"auto (= {resolve_mode('auto', a.device, a.dtype)})"
            print(f"{T:>5} {D:>5}  {label:<32} {1e3 * train[form]:>10.1f} {train['eager loop'] / train[form]:>7.2f}x "
                  f"{1e3 * fwd[form]:>8.1f} {gbs:>9.2f} {gbs / add_fresh:>6.2f}x")
            results.append({"T": T, "D": D, "form": form, "speedup": train["eager loop"] / train[form],
                            "fwd_vs_add": gbs / add_fresh})
        for name, (_, moved) in refs.items():
            gbs = moved / ref_time[name] / 1e9
            ratio = gbs / (add_out if "reused" in name else add_fresh)
            print(f"{T:>5} {D:>5}  {name:<32} {'':>10} {'':>8} {1e3 * ref_time[name]:>8.1f} {gbs:>9.2f} {ratio:>6.2f}x")
        print()
        del a, b, g
    return results


# ------------------------------------------------------------------------------- layers
def layer_table(widths, B: int, T: int, reps: int, names: list[str]) -> None:
    header = f"{'D':>5}  {'layer':<28} {'mode':<10} {'train tok/s':>12} {'vs LSTM':>8} {'vs GRU':>7}"
    print(header)
    print("-" * len(header))
    for d in widths:
        torch.manual_seed(0)
        x = torch.randn(B, T, d)
        candidates: dict[str, Callable[[], None]] = {}
        rows = []
        for name in names:
            layer = rnnkit.layers.build(name, d_model=d)
            dy = torch.randn(B, T, layer.d_output)
            auto = layer._auto_mode(x)
            for mode in ("auto",) + tuple(layer.modes):
                key = f"{name}/{mode}"
                candidates[key] = train_step(_ModeCall(layer, mode), x, dy)
                rows.append((name, mode if mode != "auto" else f"auto={auto}", key))
        for name, cls in (("torch.nn.LSTM", torch.nn.LSTM), ("torch.nn.GRU", torch.nn.GRU)):
            candidates[name] = train_step(cls(d, d, batch_first=True), x, torch.randn(B, T, d))
            rows.append((name, "", name))
        peer = _peer_mingru(d)
        if peer is not None:
            candidates["peer"] = train_step(peer, x, torch.randn(B, T, d))
            rows.append(("mingru-pytorch minGRU (peer)", "log-space", "peer"))
        times = best_of(candidates, reps)
        for name, mode, key in rows:
            print(f"{d:>5}  {name:<28} {mode:<10} {B * T / times[key]:>12,.0f} "
                  f"{times['torch.nn.LSTM'] / times[key]:>7.2f}x {times['torch.nn.GRU'] / times[key]:>6.2f}x")
        print()


def _peer_mingru(d: int) -> torch.nn.Module | None:
    """lucidrains' ``mingru-pytorch`` minGRU (optional extra ``peers``), or None when not installed."""
    try:
        from minGRU_pytorch import minGRU
    except ImportError:
        return None

    class Peer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = minGRU(d)  # expansion 1: no output projection, same parameters as rnnkit's

        def forward(self, x):
            return (self.layer(x),)

    return Peer()


def s4_conv_table(B: int, T: int, H: int, reps: int) -> None:
    """S4 training (forward + backward) in ``conv`` and ``recurrent`` mode at one shape."""
    torch.manual_seed(0)
    layer = rnnkit.layers.build("s4", d_model=H, d_state=64)
    x, dy = torch.randn(B, T, H), torch.randn(B, T, H)
    modes = ("conv", "recurrent")
    times = best_of({m: train_step(_ModeCall(layer, m), x, dy) for m in modes}, reps)
    header = f"{'B':>3} {'T':>6} {'H':>4}  {'s4 mode':<10} {'fwd+bwd s':>10} {'vs recurrent':>13}"
    print(header)
    print("-" * len(header))
    for m in modes:
        print(f"{B:>3} {T:>6} {H:>4}  {m:<10} {times[m]:>10.3f} {times['recurrent'] / times[m]:>12.2f}x")
    print(f"target: conv >= 5x recurrent; measured {times['recurrent'] / times['conv']:.2f}x\n")


class _ModeCall(torch.nn.Module):
    """``layer(x, mode=mode)`` as a module (``train_step`` calls ``model(x)``)."""

    def __init__(self, layer: torch.nn.Module, mode: str) -> None:
        super().__init__()
        self.layer, self.mode = layer, mode

    def forward(self, x):
        return self.layer(x, mode=self.mode)


# ------------------------------------------------------------------------------- report
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T in (512, 2048), D=256; layers at D=256")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per candidate (default 3, quick 2)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: scan, layers, s4")
    parser.add_argument("--lengths", default=None, help="scan T values, comma-separated (default 512,2048,8192)")
    parser.add_argument("--widths", default=None, help="D values, comma-separated (default 256,1024)")
    parser.add_argument("--forms", default=None, help="linear_scan forms to time, comma-separated (default all)")
    parser.add_argument("--s4-length", type=int, default=4096, help="T of the S4 conv-vs-recurrent part")
    parser.add_argument("--s4-width", type=int, default=64, help="H of the S4 part (N = 64)")
    parser.add_argument("--s4-batch", type=int, default=8, help="B of the S4 part")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    B, dtype = 16, torch.float32
    lengths = [int(v) for v in args.lengths.split(",")] if args.lengths else ([512, 2048] if args.quick else [512, 2048, 8192])
    widths = [int(v) for v in args.widths.split(",")] if args.widths else ([256] if args.quick else [256, 1024])
    scan_shapes = [(T, D) for D in widths for T in lengths]
    reps = args.reps or (2 if args.quick else 3)
    forms = ["parallel", "chunk"] + (["fused"] if _native.available() else []) + ["auto"]
    if args.forms:
        forms = [f for f in args.forms.split(",") if f in forms]
    names = [n for n in DIAGONAL_LAYERS if n in rnnkit.layers.names()]
    skip = set(filter(None, args.skip.split(",")))
    print(describe())
    print(f"dtype {dtype}, "
          f"device cpu ({os.cpu_count()} logical CPUs); fused kernel: "
          f"{'available' if _native.available() else _native.unavailable_reason()}")
    print(f"scan: B={B}, (T, D) in {scan_shapes}; layers: B={B}, T=512, D in {widths}, {names}")
    print(f"figures: best of {reps} interleaved repetitions (the eager loop: {max(1, reps // 2)})\n")

    share = CpuShare()
    share.start()
    if "scan" not in skip:
        results = scan_table(scan_shapes, B, reps, forms)
        best = {}
        for r in results:
            if r["form"] != "eager loop":
                key = (r["T"], r["D"])
                if key not in best or r["speedup"] > best[key]["speedup"]:
                    best[key] = r
        print("fastest form per shape (targets: >= 5x the eager loop fwd+bwd, forward >= 0.70x torch.add's GB/s):")
        for (T, D), r in best.items():
            print(f"  T={T:<5} D={D:<5} {r['form']:<9} {r['speedup']:6.2f}x loop, forward {r['fwd_vs_add']:.2f}x add")
        print()
    if "layers" not in skip:
        layer_table(widths, B, 512, reps, names)
    if "s4" not in skip and "s4" in rnnkit.layers.names():
        s4_conv_table(args.s4_batch, args.s4_length, args.s4_width, reps)
    other = share.stop()
    if other is not None:
        print(f"other processes used {100 * other:.0f}% of all CPU time during the run"
              + (" -- noisy, rerun on a quiet machine" if other > 0.1 else ""))


if __name__ == "__main__":
    main()
