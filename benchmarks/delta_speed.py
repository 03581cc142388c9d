"""Training speed of rnnkit's delta-rule kernels against their own loop and the flash-linear-attention reference.

    python benchmarks/delta_speed.py            # B=16, H=4, K=V=64, T in (512, 2048, 8192); ~4 min
    python benchmarks/delta_speed.py --quick    # T=512 only
    python benchmarks/delta_speed.py --lengths 8192 --against b4e615c   # this kernel vs an older one
    python benchmarks/delta_speed.py --lengths 2048 --only dplr --against HEAD~1   # the RWKV-7 kernel alone
    python benchmarks/delta_speed.py --lengths 64 --batch 1 --heads 1 --dim 8 --reps 1   # a smoke run

Rows, each forward + backward of the op alone (``rnnkit.ops.delta_rule``), fp32, 2 threads:

- ``chunk``: :func:`delta_rule_chunk` (WY/UT inside chunks of 32), plain and gated (Gated DeltaNet);
- ``recurrent``: the loop over time (T <= 2048);
- ``dplr chunk`` / ``dplr recurrent``: the diagonal-plus-low-rank delta rule of RWKV-7
  (:func:`rnnkit.ops.dplr_delta_rule`: decay per key dimension, removal key ``kappa`` and rate
  ``eta``) at the same sizes, its chunkwise form (chunks of 32, hand-written backward) and its loop
  (T <= 2048), next to the gated rows (Gated DeltaNet's op);
- ``parallel``: one ``(T, T)`` WY/UT block; ``O(T^2)`` memory, so at T = 2048 it runs at B = 2 (the
  row says so) and not at all beyond;
- ``fla``: ``delta_rule_chunkwise`` of ``flash-linear-attention`` 0.6.0 (pure PyTorch, chunk 32,
  ``fla/ops/delta_rule/naive.py``), when the optional ``fla-core`` package is installed; loaded from
  its file because ``import fla.ops`` needs triton. It takes no initial state and returns no state
  gradient, so it does a little less work than the rnnkit rows.

With ``--against REV`` the chunk rows (the dplr one included, where that revision has it) also run
with ``delta_rule.py`` as it was at git revision ``REV`` (read with ``git show``, imported against
the current package), on the same inputs, and the last lines give each chunk row's speed over its
older self: how a change to the kernel is measured.

Ratios are against ``fla`` (and ``recurrent``) measured in the same run; candidates are interleaved
and the best repetition counts, so load from other processes hits all of them alike. On a busy
machine ``--threads 1 --clock cpu`` times by the process's CPU time instead of the wall clock.
GFLOP/s counts the chunk algorithm's matmul work (forward, times 3 for forward + backward) and is
printed next to a plain ``(2048 x 2048) @ (2048 x 2048)`` matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import subprocess
import time
import types
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from rnnkit.bench.machine import describe
from rnnkit.ops.delta_rule import (
    CHUNK_SIZE,
    delta_rule_chunk,
    delta_rule_parallel,
    delta_rule_recurrent,
    dplr_delta_rule_chunk,
    dplr_delta_rule_recurrent,
)


def load_fla_reference() -> Callable | None:
    """``fla.ops.delta_rule.naive.delta_rule_chunkwise`` without importing ``fla.ops`` (triton)."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "ops" / "delta_rule" / "naive.py"
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location("fla_delta_rule_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.delta_rule_chunkwise


def kernel_at(rev: str) -> types.ModuleType:
    """``src/rnnkit/ops/delta_rule.py`` as it was at git revision ``rev``, as a module."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{rev}:src/rnnkit/ops/delta_rule.py"], cwd=root,
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType(f"delta_rule_at_{rev}")
    exec(compile(source, f"{rev}:src/rnnkit/ops/delta_rule.py", "exec"), module.__dict__)
    return module


#: The clock ``timed`` reads: wall time, or with ``--clock cpu`` this process's CPU time (with one
#: thread, what other processes on a shared machine take does not count against a candidate).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def timed(fn: Callable[[], object]) -> float:
    t0 = _clock()
    fn()
    return _clock() - t0


def best_of(candidates: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    for fn in candidates.values():  # warm up
        fn()
    best = {name: float("inf") for name in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            best[name] = min(best[name], timed(fn))
    return best


def inputs(B: int, T: int, H: int, K: int, V: int, gated: bool):
    shape = (B, H, T)  # head-first, as both rnnkit's op and fla's reference take it
    q = torch.randn(*shape, K, requires_grad=True)
    k = F.normalize(torch.randn(*shape, K), dim=-1).requires_grad_()
    v = torch.randn(*shape, V, requires_grad=True)
    beta = torch.rand(*shape).requires_grad_()
    log_decay = (-torch.rand(*shape) * 0.1).requires_grad_() if gated else None
    return q, k, v, beta, log_decay


def dplr_inputs(B: int, T: int, H: int, K: int, V: int):
    """RWKV-7's transition at its initial decay range: ``a = -eta kappa``, ``b = kappa``."""
    shape = (B, H, T)
    kappa = F.normalize(torch.randn(*shape, K), dim=-1)
    eta = torch.rand(*shape, K)
    log_decay = -torch.rand(*shape, K) * 0.6
    leaves = [torch.randn(*shape, K), torch.randn(*shape, K) * 0.5, torch.randn(*shape, V), -eta * kappa, kappa,
              log_decay]
    return tuple(t.requires_grad_() for t in leaves)


def train_step(fn: Callable, args: tuple, with_state: bool) -> Callable[[], None]:
    B, H, K, V = args[0].shape[0], args[0].shape[1], args[0].shape[3], args[2].shape[3]
    state = torch.zeros(B, H, K, V, requires_grad=True) if with_state else None

    def run() -> None:
        y, S = fn(*args, state) if with_state else fn(*args)
        (y.sum() + S.sum()).backward()

    return run


def chunk_flops(T: int, K: int, V: int, C: int) -> float:
    """Forward matmul FLOPs of the chunk algorithm per (batch, head)."""
    per_chunk = 2 * C * C * K * 2 + C * C * (K + V) + 2 * C * C * (K + V) + 3 * 2 * C * K * V
    return per_chunk * T / C


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    return 2 * n**3 / min(timed(lambda: a @ b) for _ in range(reps)) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T=512 only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths T")
    parser.add_argument("--batch", type=int, default=16, help="B")
    parser.add_argument("--heads", type=int, default=4, help="H")
    parser.add_argument("--dim", type=int, default=64, help="K = V per head")
    parser.add_argument("--dplr-chunks", type=int, nargs="+", default=(), metavar="C",
                        help="also time the dplr chunk form with these chunk sizes")
    parser.add_argument("--only", metavar="TEXT", default=None,
                        help="time only the rows whose name contains TEXT (e.g. dplr)")
    parser.add_argument("--against", metavar="REV", default=None,
                        help="also time the chunk kernel of this git revision, side by side")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="time by the wall clock or by this process's CPU time (meaningful with --threads 1)")
    args = parser.parse_args()
    global _clock
    _clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, H, K, V, C = args.batch, args.heads, args.dim, args.dim, CHUNK_SIZE
    fla = load_fla_reference()
    older = kernel_at(args.against) if args.against else None
    print(describe())
    print(f"fp32, fwd+bwd, B={B} H={H} K={K} V={V}, "
          f"chunk {C}, {args.clock} clock; fla reference: {'flash-linear-attention naive.py' if fla else 'not installed'}")
    mm = matmul_gflops()
    print(f"plain matmul 2048^3: {mm:.1f} GFLOP/s")
    header = f"{'T':>5} {'row':<22} {'tok/s':>10} {'vs fla':>7} {'vs recurrent':>12} {'GFLOP/s':>8} {'% matmul':>8}"
    for T in args.lengths or ((512,) if args.quick else (512, 2048, 8192)):
        print(header)
        candidates: dict[str, Callable[[], None]] = {}
        tokens: dict[str, int] = {}
        for gated in (False, True):
            tag = "gated " if gated else ""
            a = inputs(B, T, H, K, V, gated)
            candidates[f"{tag}chunk"] = train_step(delta_rule_chunk, a, with_state=True)
            tokens[f"{tag}chunk"] = B * T
            if older is not None:
                candidates[f"{tag}chunk @{args.against}"] = train_step(older.delta_rule_chunk, a, with_state=True)
                tokens[f"{tag}chunk @{args.against}"] = B * T
            if T <= 2048:
                candidates[f"{tag}recurrent"] = train_step(delta_rule_recurrent, a, with_state=True)
                tokens[f"{tag}recurrent"] = B * T
                Bp = B if T <= 512 else 2
                p = inputs(Bp, T, H, K, V, gated)
                name = f"{tag}parallel" + (f" (B={Bp})" if Bp != B else "")
                candidates[name] = train_step(delta_rule_parallel, p, with_state=True)
                tokens[name] = Bp * T
        d = dplr_inputs(B, T, H, K, V)
        candidates["dplr chunk"] = train_step(dplr_delta_rule_chunk, d, with_state=True)
        tokens["dplr chunk"] = B * T
        for size in args.dplr_chunks:
            name = f"dplr chunk (C={size})"
            candidates[name] = train_step(functools.partial(dplr_delta_rule_chunk, chunk_size=size), d, with_state=True)
            tokens[name] = B * T
        if older is not None and hasattr(older, "dplr_delta_rule_chunk"):
            candidates[f"dplr chunk @{args.against}"] = train_step(older.dplr_delta_rule_chunk, d, with_state=True)
            tokens[f"dplr chunk @{args.against}"] = B * T
        if T <= 2048:
            candidates["dplr recurrent"] = train_step(dplr_delta_rule_recurrent, d, with_state=True)
            tokens["dplr recurrent"] = B * T
        if fla is not None:
            q, k, v, beta, _ = inputs(B, T, H, K, V, False)
            candidates["fla chunk (reference)"] = train_step(lambda *x: fla(*x, chunk_size=32), (q, k, v, beta), False)
            tokens["fla chunk (reference)"] = B * T
        if args.only:
            candidates = {name: fn for name, fn in candidates.items() if args.only in name}
        reps = args.reps if T <= 2048 else 2
        best = best_of(candidates, reps)
        rate = {name: tokens[name] / best[name] for name in candidates}
        for name in candidates:
            vs_fla = rate[name] / rate["fla chunk (reference)"] if "fla chunk (reference)" in rate else float("nan")
            base = next((f"{tag} recurrent" for tag in ("gated", "dplr") if name.startswith(tag)), "recurrent")
            vs_rec = rate[name] / rate[base] if base in rate else float("nan")
            counted = "chunk" in name and not name.startswith("dplr")  # chunk_flops counts the delta rule's algorithm
            gflops = 3 * chunk_flops(T, K, V, C) * H * tokens[name] / T / best[name] / 1e9 if counted else None
            flops_cols = f"{gflops:8.1f} {100 * gflops / mm:7.0f}%" if gflops else f"{'':8} {'':8}"
            print(f"{T:>5} {name:<22} {rate[name]:>10,.0f} {vs_fla:>6.2f}x {vs_rec:>11.1f}x {flops_cols}", flush=True)
        if older is not None:
            for tag in ("", "gated ", "dplr "):
                if f"{tag}chunk @{args.against}" not in rate or f"{tag}chunk" not in rate:
                    continue
                print(f"{T:>5} {tag}chunk / {tag}chunk @{args.against}: "
                      f"{rate[f'{tag}chunk'] / rate[f'{tag}chunk @{args.against}']:.2f}x")


if __name__ == "__main__":
    main()
