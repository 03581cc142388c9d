"""Speed of the ``mamba`` layer's training step on the CPU, and of its fused selective scan.

    python benchmarks/mamba_speed.py             # B=16, T=512, d_model=256 (E=512, N=16), fp32
    python benchmarks/mamba_speed.py --quick     # fewer repetitions
    python benchmarks/mamba_speed.py --profile   # and torch.profiler's table of one fused step
    python benchmarks/mamba_speed.py --chunk     # and the PyTorch forms (mode="chunk"), slow

1. Training step (forward + backward w.r.t. the input and every parameter) of one ``mamba`` layer:

   - ``auto``: what the layer runs by default, the compiled selective scan (``mode="fused"``, the
     step-size softplus, skip and gate inside it) and the compiled short convolution;
   - the previous default: the scan in time blocks of 64 steps, each forming its ``(B, 64, E, N)``
     decays and inputs and scanned by the linear scan's compiled kernel, recomputed in the backward
     pass, behind ``torch.nn.functional.conv1d`` and PyTorch's softplus, skip and gate (the same
     parameters, so the same function);
   - with ``--chunk``, ``mode="chunk"``: the PyTorch forms only (what runs where the compiler is
     missing);
   - ``torch.nn.LSTM(256, 256)``, the baseline every row's ratio is taken against.

2. The fused scan's forward alone on the layer's shapes, in elements per second (one element is
   one ``(b, t, e, n)``: an exp and three multiply-adds), as the layer calls it (the step-size
   softplus, skip and gate inside, one more exp and a logarithm per ``(b, t, e)``) and bare (step
   sizes given, no skip or gate), against two ceilings measured in the same run with the same
   threads:

   - the kernel's own vector exp followed by one FMA, on values held in registers (no memory
     traffic), eight independent vectors per thread: the arithmetic floor of one element
     (``rnnkit_exp_fma_ceiling`` in ``src/rnnkit/ops/_cpu_scan.cpp``);
   - ``torch.exp`` then ``torch.addcmul`` on an L3-resident buffer (PyTorch's vectorised exp).

Candidates run once per repetition, interleaved, so that load from other processes hits all alike;
each figure is the best repetition. The run ends with the share of CPU time other processes took.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from classic_speed import CpuShare, best_of, train_step  # noqa: E402  (sibling script)

import rnnkit  # noqa: E402
from rnnkit.bench.machine import describe  # noqa: E402
from rnnkit.ops import _native  # noqa: E402
from rnnkit.ops.selective_scan import scan_blocks, selective_scan  # noqa: E402
from rnnkit.ops.short_conv import short_conv  # noqa: E402

B, T, D = 16, 512, 256
#: The time block (and checkpoint interval) of the layer's default configuration.
BLOCK = 64


class PreviousDefault(torch.nn.Module):
    """The ``mamba`` layer's parameters run the way its default mode ran before the fused kernels:
    conv1d, then PyTorch's SiLU and softplus, the scan in recomputed time blocks through the linear
    scan's compiled kernel, then the skip and gate in PyTorch."""

    def __init__(self, layer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        m = self.layer
        R, N = m.config.dt_rank, m.config.d_state
        u, z = m.in_proj(x).chunk(2, -1)
        state = m.init_state(x.shape[0])
        u, _ = short_conv(u, m.conv.weight, m.conv.bias, state.conv, activation="silu", mode="parallel")
        dt, Bm, Cm = m.x_proj(u).split([R, N, N], -1)
        delta = F.softplus(m.dt_proj(dt))
        y, _ = scan_blocks(delta, Bm, Cm, u, -torch.exp(m.A_log), state.h, None, "fused", BLOCK)
        return (m.out_proj((y + m.D * u) * F.silu(z)),)


class ModeCall(torch.nn.Module):
    """``layer(x, mode=mode)`` as a module (``train_step`` calls ``model(x)``)."""

    def __init__(self, layer, mode: str) -> None:
        super().__init__()
        self.layer, self.mode = layer, mode

    def forward(self, x):
        return self.layer(x, mode=self.mode)


def layer_rows(reps: int, chunk: bool) -> dict[str, float]:
    torch.manual_seed(0)
    layer = rnnkit.layers.build("mamba", d_model=D)
    x, dy = torch.randn(B, T, D), torch.randn(B, T, D)
    candidates = {"rnnkit mamba, auto (fused scan and conv)": train_step(ModeCall(layer, "auto"), x, dy)}
    if _native.available():
        candidates["rnnkit mamba, previous default"] = train_step(PreviousDefault(layer), x, dy)
    if chunk or not _native.available():
        candidates["rnnkit mamba, chunk (PyTorch forms)"] = train_step(ModeCall(layer, "chunk"), x, dy)
    candidates["torch.nn.LSTM(256, 256)"] = train_step(torch.nn.LSTM(D, D, batch_first=True), x, dy)
    return best_of(candidates, reps)


def scan_inputs(E: int, N: int) -> dict[str, torch.Tensor]:
    """The layer's scan inputs at initialisation scale: delta before its bias and softplus."""
    gen = torch.Generator().manual_seed(0)
    return {"delta": torch.randn(B, T, E, generator=gen) * 0.1, "Bm": torch.randn(B, T, N, generator=gen),
            "Cm": torch.randn(B, T, N, generator=gen), "u": torch.randn(B, T, E, generator=gen),
            "A": -torch.arange(1, N + 1.0).expand(E, N).contiguous(), "D": torch.ones(E),
            "z": torch.randn(B, T, E, generator=gen), "delta_bias": torch.full((E,), -4.0)}


def scan_rows(reps: int, threads: int) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds of the fused forward (as the layer calls it, and bare) and of each ceiling, and the
    elements each computes."""
    E, N = 2 * D, 16
    a = scan_inputs(E, N)
    step_sizes = F.softplus(a["delta"] + a["delta_bias"])

    def fused() -> None:
        with torch.no_grad():
            selective_scan(a["delta"], a["Bm"], a["Cm"], a["u"], a["A"], D=a["D"], z=a["z"],
                           delta_bias=a["delta_bias"], delta_softplus=True, mode="fused")

    def bare() -> None:
        with torch.no_grad():
            selective_scan(step_sizes, a["Bm"], a["Cm"], a["u"], a["A"], mode="fused")

    lib = _native.library()
    lanes = _native.lanes(torch.float32)
    passes = B * T * E * N // (8 * lanes * threads)  # the same element count as the scan

    def ceiling() -> None:
        lib.rnnkit_exp_fma_ceiling_f32(passes, threads)

    # 1 Mi floats per thread (4 MiB) stay in L3; repeated to the scan's element count. (Smaller
    # buffers would mean more calls, each a parallel region whose start-up would be timed too.)
    n = (1 << 20) * threads
    xs, ws, out = torch.rand(n) - 1, torch.randn(n), torch.empty(n)
    repeat = B * T * E * N // n

    def torch_ceiling() -> None:
        for _ in range(repeat):
            torch.exp(xs, out=out)
            torch.addcmul(ws, out, ws, out=out)

    times = best_of({"fused": fused, "bare": bare, "ceiling": ceiling, "torch": torch_ceiling}, reps)
    elements = {"fused": B * T * E * N, "bare": B * T * E * N, "ceiling": passes * 8 * lanes * threads,
                "torch": repeat * n}
    return times, elements


def profile_table() -> None:
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    layer = rnnkit.layers.build("mamba", d_model=D)
    step = train_step(ModeCall(layer, "auto"), torch.randn(B, T, D), torch.randn(B, T, D))
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per candidate (default 5, quick 2)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table of one fused step")
    parser.add_argument("--chunk", action="store_true", help="also time mode='chunk' (the PyTorch forms)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reps = args.reps or (2 if args.quick else 5)
    print(describe())
    print(f"fp32, B={B}, T={T}, d_model={D} (E={2 * D}, N=16), {args.threads} threads; compiled kernels: "
          f"{'available' if _native.available() else _native.unavailable_reason()}")
    print(f"figures: best of {reps} interleaved repetitions\n")
    share = CpuShare()
    share.start()

    times = layer_rows(reps, args.chunk)
    lstm = times["torch.nn.LSTM(256, 256)"]
    header = f"{'training step (forward + backward)':<44} {'ms':>8} {'tok/s':>9} {'vs LSTM':>8}"
    print(header)
    print("-" * len(header))
    for name, seconds in times.items():
        print(f"{name:<44} {1e3 * seconds:>8.1f} {B * T / seconds:>9,.0f} {lstm / seconds:>7.2f}x")
    fused = times["rnnkit mamba, auto (fused scan and conv)"]
    if "rnnkit mamba, previous default" in times:
        print(f"\nfused against the previous default: {times['rnnkit mamba, previous default'] / fused:.2f}x faster "
              f"(target: mamba >= 0.50x torch.nn.LSTM; measured {lstm / fused:.2f}x)")

    if _native.available():
        scan, elements = scan_rows(reps, args.threads)
        rate = {k: elements[k] / scan[k] / 1e9 for k in scan}
        print(f"\n{'fused selective scan, forward (B*T*E*N = ' + format(elements['fused'] / 1e6, '.1f') + ' M elements)':<62} "
              f"{'ms':>8} {'Gelem/s':>8} {'layer/it':>8} {'bare/it':>8}")
        labels = {"fused": "fused scan as the layer calls it (softplus, skip, gate)",
                  "bare": "fused scan, bare (step sizes given, no skip or gate)",
                  "ceiling": "ceiling: rnnkit's vector exp + 1 FMA, in registers",
                  "torch": "ceiling: torch.exp + torch.addcmul, L3-resident"}
        for key, label in labels.items():
            print(f"{label:<62} {1e3 * scan[key]:>8.1f} {rate[key]:>8.2f} {rate['fused'] / rate[key]:>7.2f}x "
                  f"{rate['bare'] / rate[key]:>7.2f}x")
        print(f"(target: the fused forward >= 0.50x the exp-and-FMA ceiling; measured, as the layer calls it "
              f"{rate['fused'] / rate['ceiling']:.2f}x and bare {rate['bare'] / rate['ceiling']:.2f}x of rnnkit's exp; "
              f"{rate['fused'] / rate['torch']:.2f}x of torch's)")
    other = share.stop()
    if other is not None:
        print(f"\nother processes used {100 * other:.0f}% of all CPU time during the run"
              + (" -- noisy, rerun on a quiet machine" if other > 0.1 else ""))
    if args.profile:
        print()
        profile_table()


if __name__ == "__main__":
    main()
