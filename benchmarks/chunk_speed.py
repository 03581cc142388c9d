"""Training speed of the matrix-state kernels: chunk vs recurrent vs parallel, against peers, one run.

    python benchmarks/chunk_speed.py           # T in 512, 2048, 8192
    python benchmarks/chunk_speed.py --quick   # T = 512 only, fewer repeats

For each layer's kernel (the op with that layer's kind of decay: none for ``linear_attention``,
fixed per head for ``retnet``, data-dependent scalar for ``mamba2``, per key dimension for ``gla``,
the stabilised exponential gating of ``mlstm``), at B=16, H=4, K=V=64, fp32, 2 threads, it measures
forward + backward tokens/s of the ``chunk``, ``recurrent`` and ``parallel`` forms, the memory saved
for backward (autograd's saved tensors: what training holds between the passes; linear in T for
``chunk``), the matmul GFLOP/s achieved (FLOPs counted by ``torch.utils.flop_counter``) next to a
plain ``(2048 x 2048) @ (2048 x 2048)`` matmul measured in the same run, and, when installed (the
``peers`` extra), the peers: flash-linear-attention's pure-PyTorch chunked simple-GLA reference
(``naive_chunk_simple_gla``, loaded from its file since the package imports Triton) and
mlstm_kernels' native chunkwise mLSTM.

Forms that would take too long (or, for ``parallel``, too much memory) print ``skipped (...)``.
Where the recurrent loop is skipped (T above ``--max-recurrent-steps``), the loop runs in the same
run at T = ``--max-recurrent-steps`` instead (its tokens/s does not depend on T: one step costs the
same at any length), and ``vs recurrent`` divides by that rate, marked ``*``.
Candidates of one shape run interleaved, one repetition each in turn, and the figure is the best
(minimum-time) repetition, so that load from other processes hits them alike. The chunk kernels'
buffer pool (``RNNKIT_SCAN_POOL_MB`` + ``RNNKIT_CHUNK_POOL_MB``, 5 GB by default) is raised to ``--pool-mb`` (12 GB) for
the run: at T=8192 the six kernels' buffers together exceed 4 GB, so in turn they evicted each
other and every repetition ran on fresh, page-faulting memory, as no training run does (one
model's kernels reuse the same buffers step after step; ``docs/benchmarks.md``). The last lines
state each layer's chunk form against its targets (>= 10x the loop at T=2048, >= 30% of
the same-run matmul GFLOP/s at T=8192). The matmul reference is measured the same way: one window
of back-to-back products lasting about a second (one kernel step at T=8192) before every round and
one after the last, the best counting.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from rnnkit.ops._workspace import POOL, pool_bytes
from rnnkit.ops.gated_linear_attention import (
    gated_linear_attention_chunk,
    gated_linear_attention_parallel,
    gated_linear_attention_recurrent,
)

from rnnkit.ops.delta_rule import delta_rule_chunk, delta_rule_parallel, delta_rule_recurrent

try:
    from rnnkit.ops.mlstm import mlstm_chunk, mlstm_parallel, mlstm_recurrent
except ImportError:  # pragma: no cover - before the mLSTM op exists
    mlstm_chunk = mlstm_parallel = mlstm_recurrent = None

B, H, K, V = 16, 4, 64, 64
#: The chunk kernels' buffer pool cap for the run (MB): room for every candidate's buffers at T=8192.
POOL_MB = 12288


# ------------------------------------------------------------------------------- inputs per kernel
def gla_inputs(T: int, decay: str, gen: torch.Generator) -> list[torch.Tensor]:
    q, k = (torch.randn(B, H, T, K, generator=gen) * K**-0.5 for _ in range(2))
    v = torch.randn(B, H, T, V, generator=gen)
    if decay == "none":
        g = torch.zeros(B, H, T)
    elif decay == "fixed":
        g = torch.log1p(-torch.exp2(-5.0 - torch.arange(H, dtype=torch.float32)))[None, :, None].expand(B, H, T).contiguous()
    elif decay == "scalar":
        g = F.logsigmoid(torch.randn(B, H, T, generator=gen) + 3)
    else:  # per key dimension, GLA's gate scale
        g = F.logsigmoid(torch.randn(B, H, T, K, generator=gen)) / 16
    # linear_attention's and retnet's decays are not learned: no gradient flows to them.
    g.constant = decay in ("none", "fixed")
    return [q, k, v, g]


def mlstm_inputs(T: int, gen: torch.Generator) -> list[torch.Tensor]:
    q, k, v = (torch.randn(B, H, T, d, generator=gen) for d in (K, K, V))
    i = torch.randn(B, H, T, generator=gen)
    f = torch.randn(B, H, T, generator=gen) + 3.0
    return [q, k, v, i, f]


def fla_naive(op: str = "simple_gla", name: str = "naive_chunk_simple_gla"):
    """A function of fla's ``ops/<op>/naive.py`` loaded from its file (the fla package imports Triton)."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "ops", op, "naive.py")
    if not os.path.exists(path):
        return None
    module_spec = importlib.util.spec_from_file_location(f"_fla_{op}_naive", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, name)


def mlstm_kernels_chunkwise():
    try:
        from mlstm_kernels.torch.chunkwise.native import mlstm_chunkwise__native_autograd
    except ImportError:
        return None
    return mlstm_chunkwise__native_autograd


# ------------------------------------------------------------------------------- candidates
def candidates(T: int) -> list[tuple[str, str, Callable, list[torch.Tensor]]]:
    """(layer, form, fn(*inputs) -> loss, inputs); inputs are leaves that take gradients."""
    gen = torch.Generator().manual_seed(0)
    out = []
    forms = {"chunk": gated_linear_attention_chunk, "recurrent": gated_linear_attention_recurrent,
             "parallel": gated_linear_attention_parallel}
    fla = fla_naive()
    for layer, decay in (("linear_attention", "none"), ("retnet", "fixed"), ("mamba2", "scalar"), ("gla", "per_dim")):
        inputs = gla_inputs(T, decay, gen)
        for form, fn in forms.items():
            out.append((layer, form, lambda q, k, v, g, fn=fn: _loss(*fn(q, k, v, g)), inputs))
        if fla is not None and decay != "per_dim":
            # fla's layout is (B, T, H, K) and it scales q by K^-1/2 itself; same work.
            bt = [t.transpose(1, 2).contiguous() for t in inputs]
            bt[3].constant = inputs[3].constant
            out.append((layer, "fla chunk (ref)",
                        lambda q, k, v, g: _loss(*fla(q, k, v, g, output_final_state=True, scale=1.0)), bt))
    if mlstm_chunk is not None:
        inputs = mlstm_inputs(T, gen)
        for form, fn in (("chunk", mlstm_chunk), ("recurrent", mlstm_recurrent), ("parallel", mlstm_parallel)):
            # rnnkit's op takes log f; the peer takes the pre-activation and applies logsigmoid itself.
            out.append(("mlstm", form, lambda q, k, v, i, f, fn=fn: _loss(*fn(q, k, v, i, F.logsigmoid(f))), inputs))
        peer = mlstm_kernels_chunkwise()
        if peer is not None:
            out.append(("mlstm", "mlstm_kernels chunk (ref)",
                        lambda q, k, v, i, f: _loss(*peer(q, k, v, i, f, return_last_states=True, chunk_size=64)),
                        inputs))
    # DeltaNet: unit keys, beta in (0, 1); fla's chunkwise delta-rule reference (chunk 32, no state in).
    q, v = torch.randn(B, H, T, K, generator=gen) * K**-0.5, torch.randn(B, H, T, V, generator=gen)
    delta = [q, F.normalize(torch.randn(B, H, T, K, generator=gen), dim=-1), v, torch.rand(B, H, T, generator=gen)]
    for form, fn in (("chunk", delta_rule_chunk), ("recurrent", delta_rule_recurrent), ("parallel", delta_rule_parallel)):
        out.append(("deltanet", form, lambda q, k, v, b, fn=fn: _loss(*fn(q, k, v, b)), delta))
    fla_delta = fla_naive("delta_rule", "delta_rule_chunkwise")
    if fla_delta is not None:
        out.append(("deltanet", "fla chunk (ref)", lambda q, k, v, b: _loss(*fla_delta(q, k, v, b, chunk_size=32)), delta))
    return out


def _loss(y, state) -> torch.Tensor:
    states = state if isinstance(state, (tuple, list)) else (state,)
    return y.sum() + sum(s.sum() for s in states if s is not None)


def too_big(layer: str, form: str, T: int, max_gb: float, max_steps: int, peer_max_T: int) -> str | None:
    if form.endswith("(ref)") and T > peer_max_T:
        # the peers' pure-PyTorch references slow down with T (fla's simple-GLA reference: 64k tok/s
        # at T=512, 14k at 2048): at 8192 each would take minutes
        return f"skipped (T > {peer_max_T}: too slow; --peer-max-T)"
    if form == "parallel":
        gb = 6 * B * H * T * T * 4 / 1e9  # a handful of (B, H, T, T) fp32 tensors live at once
        if gb > max_gb:
            return f"skipped (~{gb:.0f} GB > {max_gb:g} GB)"
    if form == "recurrent" and T > max_steps:
        return f"skipped (T > {max_steps} steps: too slow)"
    return None


# ------------------------------------------------------------------------------- measurement
def _leaves(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Fresh leaves; those marked ``constant`` (fixed decays: no gradient in the layer) take none."""
    return [t.detach().requires_grad_(not getattr(t, "constant", False)) for t in inputs]


def fwd_bwd(fn: Callable, inputs: list[torch.Tensor]) -> float:
    leaves = _leaves(inputs)
    start = time.perf_counter()
    fn(*leaves).backward()
    return time.perf_counter() - start


def saved_bytes(fn: Callable, inputs: list[torch.Tensor]) -> int:
    """Bytes autograd saves for backward (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except RuntimeError:
            pass
        return t

    leaves = _leaves(inputs)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(*leaves)
    del loss
    return sum(seen.values())


def _inplace_mm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    """``out += a @ b`` (``baddbmm_``, ``addmm_``): 2 m n k per matrix, as torch counts the
    out-of-place forms."""
    return 2 * math.prod(a_shape) * b_shape[-1]


def _triangular_solve_flops(a_shape, b_shape, *args, left=True, unitriangular=False, **kwargs) -> int:
    """``solve_triangular`` with an (n, n) matrix: n (n - 1) FLOPs per right-hand-side column with a
    unit diagonal (n^2 without), the count of LAPACK's substitution (the delta-rule kernel's inverse)."""
    n = a_shape[-1]
    columns = math.prod(b_shape) // n  # over the batch; with left=False the rows are the columns
    return columns * n * (n - 1 if unitriangular else n)


# torch's counter has formulas for baddbmm / addmm but not for their in-place forms, which the
# chunk kernels use to accumulate into reused buffers: without these, those matmuls count zero.
# Nor for triangular solves.
INPLACE_MM = {torch.ops.aten.baddbmm_: _inplace_mm_flops, torch.ops.aten.addmm_: _inplace_mm_flops,
              torch.ops.aten.linalg_solve_triangular: _triangular_solve_flops}


def flops(fn: Callable, inputs: list[torch.Tensor]) -> int:
    leaves = _leaves(inputs)
    with FlopCounterMode(display=False, custom_mapping=INPLACE_MM) as counter:
        fn(*leaves).backward()
    return counter.get_total_flops()


def matmul_gflops(seconds: float = 1.0) -> float:
    """GFLOP/s of back-to-back ``(2048 x 2048) @ (2048 x 2048)`` matmuls over a window of about
    ``seconds``, as long as one fwd+bwd of a chunk kernel at T=8192: a rate over the same span of
    time as the kernels', not the peak of one 80 ms product."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    out = a @ b
    count, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b, out=out)
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count * 2 * 2048**3 / elapsed / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="T=512 only, 2 repeats")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths T")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per candidate (best counts)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-gb", type=float, default=8.0, help="skip parallel forms estimated above this")
    parser.add_argument("--peer-max-T", type=int, default=2048, help="skip the peers above this T")
    parser.add_argument("--max-recurrent-steps", type=int, default=512,
                        help="skip recurrent forms above this T (the loop's tokens/s does not depend on T)")
    parser.add_argument("--layers", nargs="+", default=None, help="only these layers")
    parser.add_argument("--no-loops", action="store_true", help="skip the recurrent and parallel forms")
    parser.add_argument("--pool-mb", type=float, default=None,
                        help=f"cap of the kernels' buffer pool (default {POOL_MB} unless "
                             "RNNKIT_SCAN_POOL_MB or RNNKIT_CHUNK_POOL_MB is set)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.pool_mb is not None or not any(name in os.environ for name in ("RNNKIT_SCAN_POOL_MB", "RNNKIT_CHUNK_POOL_MB")):
        POOL.max_bytes = int((POOL_MB if args.pool_mb is None else args.pool_mb) * 2**20)
    else:
        POOL.max_bytes = pool_bytes()
    lengths = args.lengths or ([512] if args.quick else [512, 2048, 8192])
    repeats = args.repeats or (2 if args.quick else 3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, B={B}, H={H}, K=V={K}, "
          f"best of {repeats}; fwd+bwd; chunk-kernel buffer pool up to {POOL.max_bytes >> 20} MB")
    for T in lengths:
        rows = [c for c in candidates(T) if args.layers is None or c[0] in args.layers]
        if args.no_loops:
            rows = [c for c in rows if c[1] not in ("recurrent", "parallel")]
        best: dict[tuple[str, str], float] = {}
        skipped: dict[tuple[str, str], str] = {}
        for layer, form, fn, inputs in rows:
            why = too_big(layer, form, T, args.max_gb, args.max_recurrent_steps, args.peer_max_T)
            if why:
                skipped[(layer, form)] = why
        live = [(r[0], r[1], r[2], r[3], T) for r in rows if (r[0], r[1]) not in skipped]
        # the loop's rate at a length where it runs, for the forms at this T (marked *)
        T_loop = args.max_recurrent_steps
        live += [(layer, "recurrent@", fn, inputs, T_loop) for layer, form, fn, inputs in candidates(T_loop)
                 if form == "recurrent" and (layer, form) in skipped]
        # The matmul reference is measured before every round, and its best counts, as the kernels'
        # best does: on a machine with other load the best of five single products read anywhere from 140
        # to 220 GFLOP/s within an hour, so one measurement at the start made "% of matmul" noise.
        matmul_rounds = []
        for rep in range(repeats):
            matmul_rounds.append(matmul_gflops())
            for layer, form, fn, inputs, _ in live:
                if form.startswith("recurrent") and rep > 0 and best.get((layer, form), 0) > 20:
                    continue  # one repetition of a slow loop is enough
                dt = fwd_bwd(fn, inputs)
                best[(layer, form)] = min(best.get((layer, form), math.inf), dt)
        matmul_rounds.append(matmul_gflops())
        mm = max(matmul_rounds)
        print(f"\nT={T}: plain matmul 2048^3: {mm:.1f} GFLOP/s (best of {len(matmul_rounds)} one-second windows "
              f"between the rounds; they ranged {min(matmul_rounds):.0f}-{mm:.0f})")
        print(f"{'layer':18s} {'form':28s} {'tok/s':>10s} {'vs recurrent':>12s} {'saved MB':>9s} "
              f"{'GFLOP/s':>8s} {'% matmul':>8s}")
        # per-token time of the loop: measured at this T, or at T_loop (*)
        loop_s_per_tok = {layer: best[(layer, form)] / (B * t) for layer, form, _, _, t in live
                          if form.startswith("recurrent")}
        summary = []
        for layer, form, fn, inputs in rows:
            key = (layer, form)
            if key in skipped:
                extra = ""
                if form == "recurrent" and (layer, "recurrent@") in best:
                    extra = f"; loop at T={T_loop} in this run: {B * T_loop / best[(layer, 'recurrent@')]:.0f} tok/s (*)"
                print(f"{layer:18s} {form:28s} {skipped[key]}{extra}")
                continue
            dt = best[key]
            tok = B * T / dt
            rec = loop_s_per_tok.get(layer)
            star = "*" if (layer, "recurrent@") in best else "x"
            vs_loop = rec * B * T / dt if rec else None
            ratio = f"{vs_loop:11.1f}{star}" if rec else f"{'-':>12s}"
            if form == "recurrent":  # elementwise loop: no matmul FLOPs; one more pass would cost minutes
                print(f"{layer:18s} {form:28s} {tok:10.0f} {ratio} {'-':>9s} {'-':>8s} {'-':>8s}")
                continue
            mb = saved_bytes(fn, inputs) / 2**20
            gf = flops(fn, inputs) / dt / 1e9
            print(f"{layer:18s} {form:28s} {tok:10.0f} {ratio} {mb:9.0f} {gf:8.1f} {100 * gf / mm:7.0f}%")
            if form == "chunk":
                summary.append((layer, tok, vs_loop, star, 100 * gf / mm))
        for layer in dict.fromkeys(r[0] for r in rows):
            chunk = best.get((layer, "chunk"))
            for form in ("parallel", "fla chunk (ref)", "mlstm_kernels chunk (ref)"):
                if chunk and (layer, form) in best:
                    print(f"  {layer}: chunk / {form} = {best[(layer, form)] / chunk:.2f}x")
        print(f"targets at T={T} (chunk >= 10x the loop at T=2048; >= 30% of matmul GFLOP/s at T=8192):")
        for layer, tok, vs_loop, star, pct in summary:
            loop = "loop not run" if vs_loop is None else (
                f"{vs_loop:.1f}x the loop" + (f" (loop's rate at T={T_loop})" if star == "*" else ""))
            print(f"  {layer:18s} chunk {tok:8.0f} tok/s = {loop}; {pct:.0f}% of matmul")


if __name__ == "__main__":
    main()
