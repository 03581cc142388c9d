"""Peak memory of a Mamba training step (forward + backward) against its activations, on the CPU.

    python benchmarks/mamba_memory.py             # B=4, D=256 (E=512, N=16), T in 1024, 2048, 8192
    python benchmarks/mamba_memory.py --quick     # B=2, D=64, T in 512, 2048

The target: peak memory at T=8192 <= 4x the layer's activations. Each case runs in a fresh
subprocess; its peak is the growth of the resident set's high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` after the layer and input are built) over one forward + backward.
Columns:

- ``peak``: that growth, MiB;
- ``acts``: the layer's activations, the distinct tensors autograd keeps for the backward pass
  (measured with ``saved_tensors_hooks``), MiB; ``peak/acts`` is the target's ratio;
- ``x``: one ``(B, T, D)`` fp32 tensor, MiB; ``peak/x`` puts the peak in units of the input;
- ``state``: one ``(B, T, E, N)`` fp32 tensor, the expanded state a whole-sequence scan forms, MiB.

Rows: rnnkit's ``mamba`` as it runs by default (``auto``: the fused selective scan, which saves its
state every ``steps_per_block`` = 64 steps and recomputes the steps in between in the backward
pass), the block form (``mode="chunk"``: time blocks of 64 steps, each forming its
``(B, 64, E, N)`` decays and recomputed in the backward pass) and, where it fits in memory, the
block form as one block without recomputation (what an unchunked implementation holds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from rnnkit.bench.machine import describe

MiB = 2**20


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_case(B: int, T: int, D: int, N: int, chunk: int | None, mode: str) -> dict:
    """One forward + backward in this process; returns the measurements (bytes)."""
    import importlib

    import rnnkit

    # the module (rnnkit.ops.selective_scan as an attribute is the function of that name)
    selective_scan_module = importlib.import_module("rnnkit.ops.selective_scan")

    torch.set_num_threads(2)
    torch.manual_seed(0)
    layer = rnnkit.layers.build("mamba", d_model=D, d_state=N, steps_per_block=chunk or T)
    if chunk is None:  # the unchunked reference: one block, nothing recomputed
        selective_scan_module.checkpoint = lambda fn, *args, **kwargs: fn(*args)
    # Warm up on a short sequence so one-off costs (loading the compiled scan, thread pools,
    # allocator arenas) are paid before the baseline is taken.
    warm, _ = layer(torch.randn(B, 2 * (chunk or 64), D, requires_grad=True), mode=mode)
    warm.sum().backward()
    layer.zero_grad(set_to_none=False)
    del warm
    x = torch.randn(B, T, D, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = _vm("VmRSS")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, state = layer(x, mode=mode)
    (y.square().mean() + state.h.sum()).backward()
    peak = _vm("VmHWM") - base
    E = layer.config.expand * D
    return {"peak": peak, "acts": sum(saved.values()), "x": B * T * D * 4, "state": B * T * E * N * 4}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(**json.loads(args.case))))
        return
    B, D, N, Ts = (2, 64, 16, (512, 2048)) if args.quick else (4, 256, 16, (1024, 2048, 8192))
    from rnnkit.ops import fused_available

    print(describe())
    print(f"fp32, B={B}, D={D}, E={2 * D}, N={N}; compiled scan {'available' if fused_available() else 'unavailable'}")
    print(f"{'T':>6} {'implementation':<36} {'peak MiB':>9} {'acts MiB':>9} {'peak/acts':>9} "
          f"{'x MiB':>7} {'peak/x':>7} {'state MiB':>9}")
    for T in Ts:
        rows = [("rnnkit mamba, auto" + (" (fused)" if fused_available() else " (chunk)"), 64, "auto"),
                ("rnnkit mamba, chunk (blocks of 64)", 64, "chunk")]
        if B * T * 2 * D * N * 4 * 8 < 4 * 2**30:  # the reference holds several (B, T, E, N) tensors
            rows.append(("one block, no recompute", None, "chunk"))
        for label, chunk, mode in rows:
            case = json.dumps({"B": B, "T": T, "D": D, "N": N, "chunk": chunk, "mode": mode})
            env = dict(os.environ, OMP_NUM_THREADS="2")
            out = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True, env=env)
            if out.returncode:
                print(f"{T:>6} {label:<36} failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(out.stdout)
            print(f"{T:>6} {label:<36} {r['peak'] / MiB:>9.0f} {r['acts'] / MiB:>9.0f} {r['peak'] / r['acts']:>9.2f} "
                  f"{r['x'] / MiB:>7.0f} {r['peak'] / r['x']:>7.1f} {r['state'] / MiB:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
