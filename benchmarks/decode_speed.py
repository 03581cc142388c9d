"""Decoding speed of every registered layer inside the same language model, against its weight-read
floor and attention's KV cache, on the CPU.

    python benchmarks/decode_speed.py --plot decode.png      # batch 1, 16; contexts 512, 2048, 8192
    python benchmarks/decode_speed.py --quick --layers lstm mamba
    python benchmarks/decode_speed.py --widths 512 --out decode.json
    python benchmarks/decode_speed.py --profile --quick --layers lstm mamba   # where a step's time goes

The model is ``benchmarks/model_speed.py``'s: 4 residual blocks, a byte vocabulary, every mixer the
layer under test at its default options (``attention``'s cache sized to hold the context and the new
tokens), next to the same blocks with ``torch.nn.LSTM`` mixers and with an SDPA transformer whose
mixers keep a preallocated key/value cache (the usual transformer decoder). Generation as
``SequenceModel.generate`` runs it: the prompt (``context`` random tokens) is read by one forward in
the layer's ``auto`` mode (its parallel, chunk, fused or conv form), then every new token is one
``step`` on the state (greedy, so sampling costs nothing). Figures, per layer, batch and context:

- ``decode tok/s``: new tokens per second over the whole batch (B * tokens / seconds), timed after
  one warm-up step;
- ``floor tok/s``: the weight-read floor, ``B / (weight bytes / bandwidth)``: every step reads every
  weight once (the embedding table excepted: a step reads one row of it), so no step at this batch
  can be faster while the weights stream from memory; ``bandwidth`` is a large tensor copy's (bytes
  read + bytes written per second) measured at the start of the same run; ``of floor`` is the decode
  rate as a share of it (above 1 where the weights stay in the last-level cache between steps);
- ``state MiB``: the state a step reads and writes at this context over the batch (a recurrence's is
  the same at every context; a KV cache grows with it);
- ``prefill tok/s``: the prompt's forward;
- ``vs KV cache``: the decode rate against the SDPA transformer's at the same batch and context.

``--profile`` prints, instead of the timings, where a step's time goes at batch 1 and the first
context: operator calls and Python function calls per token and the matrix products' share of the
operators' CPU time (the rest is per-operator overhead and elementwise work).

Each configuration runs in a fresh subprocess; one that fails or runs past ``--time-cap`` seconds is
reported as such. ``--plot FILE`` draws decode tokens/s against the context, one panel per batch
size, with matplotlib (the ``bench`` extra) when it is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_speed import (  # noqa: E402  (sibling script)
    BASELINES, LSTM_STACK, NUM_BLOCKS, TRANSFORMER, VOCAB, CpuShare, add_common_arguments, build_model, check_layers,
    report_load, run_isolated, write_json,
)

from rnnkit.bench.machine import describe  # noqa: E402

MiB = 2**20


def copy_bandwidth(megabytes: int, reps: int = 5) -> float:
    """Bytes per second of ``dst.copy_(src)`` over two ``megabytes`` MiB buffers (read + written),
    best of ``reps``: the rate at which a step can stream weights that do not fit in cache."""
    n = megabytes * MiB // 4
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * n * 4 / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights a decoding step reads: all but the embedding table."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if not name.startswith("embedding"))


def state_bytes(name: str, model: torch.nn.Module, width: int, context: int, batch: int) -> int:
    """Bytes of the model's state after ``context`` tokens, over the batch (fp32)."""
    if name == LSTM_STACK:
        floats = NUM_BLOCKS * 2 * width
    elif name == TRANSFORMER:
        floats = NUM_BLOCKS * 2 * context * width
    else:
        floats = model.body.state_size_at(context)
    return 4 * floats * batch


def prefilled(name: str, width: int, context: int, batch: int, new_tokens: int):
    """The model, its prefill's seconds, and a function running ``n`` greedy steps on from the prompt
    (the state carried between calls); after one warm-up step."""
    torch.manual_seed(0)
    capacity = context + new_tokens + 1  # the prompt, the warm-up step and the timed ones
    model = build_model(name, width, capacity).eval()
    prompt = torch.randint(0, VOCAB, (batch, context), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    logits, state = model.prefill(prompt, capacity) if name in BASELINES else model(prompt)
    prefill = time.perf_counter() - start
    carried = {"token": logits[:, -1].argmax(-1), "state": state}

    def steps(n: int) -> None:
        token, state = carried["token"], carried["state"]
        for _ in range(n):
            logits, state = model.step(token, state)
            token = logits.argmax(-1)
        carried.update(token=token, state=state)

    steps(1)  # warm-up
    return model, prefill, steps


def decode_case(name: str, width: int, context: int, batch: int, new_tokens: int, threads: int) -> dict:
    """Prefill ``context`` tokens, then time ``new_tokens`` greedy steps, in this process."""
    torch.set_num_threads(threads)
    with torch.inference_mode():
        model, prefill, steps = prefilled(name, width, context, batch, new_tokens)
        start = time.perf_counter()
        steps(new_tokens)
        seconds = time.perf_counter() - start
    return {"decode_tokens_per_s": batch * new_tokens / seconds, "prefill_tokens_per_s": batch * context / prefill,
            "weight_bytes": weight_bytes(model), "state_bytes": state_bytes(name, model, width, context, batch)}


#: Operators of the matrix products that read the weights (``F.linear`` dispatches to one of them).
MATMULS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::mv")


def profile_case(name: str, width: int, context: int, batch: int, new_tokens: int, threads: int) -> dict:
    """Where a decoding step's time goes, in this process: operator calls per token (torch.profiler;
    nested ones included, e.g. ``linear`` and the ``addmm`` it calls), Python function calls per token
    (cProfile), and the matrix products' share of the operators' own CPU time."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    with torch.inference_mode():
        _, _, steps = prefilled(name, width, context, batch, 2 * new_tokens)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps(new_tokens)
        profiler = cProfile.Profile()
        profiler.runcall(steps, new_tokens)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    own = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    return {"ops_per_token": sum(e.count for e in events) / new_tokens,
            "python_calls_per_token": pstats.Stats(profiler).total_calls / new_tokens,
            "matmul_share": matmul / own if own else 0.0}


def print_profiles(names: list[str], width: int, context: int, new_tokens: int, args) -> None:
    """``--profile``: one line per model at batch 1."""
    print(f"where a step's time goes: width {width}, B=1, context {context}, {new_tokens} profiled steps, "
          f"{args.threads} threads")
    header = f"{'model (mixer)':<22} {'ops/token':>9} {'Python calls/token':>18} {'matmul share':>12}"
    print(header)
    print("-" * len(header))
    for name in names:
        label = name if name in BASELINES else f"rnnkit {name}"
        case = {"name": name, "width": width, "context": context, "batch": 1, "new_tokens": new_tokens,
                "threads": args.threads, "profile": True}
        result = run_isolated(__file__, case, args.time_cap, args.threads)
        if "error" in result:
            print(f"{label:<22} {result['error']}", flush=True)
            continue
        print(f"{label:<22} {result['ops_per_token']:>9.0f} {result['python_calls_per_token']:>18.0f} "
              f"{result['matmul_share']:>11.0%}", flush=True)


def plot(path: str, rows: list[dict], widths: list[int], batches: list[int]) -> None:
    """Decode tokens/s against the context, log-log, one panel per width and batch size; nothing
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no plot written to {path}: matplotlib is not installed (pip install 'rnnkit[bench]')")
        return
    styles = {LSTM_STACK: "k:", TRANSFORMER: "k--"}
    fig, axes = plt.subplots(len(widths), len(batches), figsize=(4 + 6 * len(batches), 5 * len(widths)),
                             squeeze=False)
    for panels, width in zip(axes, widths):
        for ax, batch in zip(panels, batches):
            ok = [r for r in rows if r["batch"] == batch and r["width"] == width and "error" not in r]
            for index, model in enumerate(dict.fromkeys(r["model"] for r in ok)):
                points = sorted((r["context"], r["decode_tokens_per_s"]) for r in ok if r["model"] == model)
                # The colour cycle has 10 colours: the next ten layers are dash-dotted.
                ax.plot(*zip(*points), styles.get(model, "-" if index < 12 else "-."), marker="o", label=model)
            ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="decode tokens/s",
                   title=f"width {width}, batch {batch}")
            ax.grid(True, which="both", alpha=0.3)
        panels[-1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1, 0.5))
    fig.suptitle(textwrap.fill(describe(), 110), fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "contexts 256 and 1024, 8 new tokens, a smaller copy")
    parser.add_argument("--widths", nargs="+", type=int, default=None, help="model widths (default 256)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16], help="batch sizes (default 1 16)")
    parser.add_argument("--contexts", nargs="+", type=int, default=None, help="prompt lengths (default 512 2048 8192)")
    parser.add_argument("--new-tokens", type=int, default=None, help="timed decoding steps (default 64, quick 8)")
    parser.add_argument("--plot", help="write a plot of tokens/s against the context to this file (PNG, PDF, SVG)")
    parser.add_argument("--profile", action="store_true",
                        help="print operator and Python calls per token at batch 1 instead of the timings")
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        print(json.dumps(profile_case(**case) if case.pop("profile", False) else decode_case(**case)))
        return

    widths = args.widths or [256]
    contexts = args.contexts or ([256, 1024] if args.quick else [512, 2048, 8192])
    new_tokens = args.new_tokens or (8 if args.quick else 64)
    names = ([] if args.no_baselines else list(BASELINES)) + check_layers(args.layers)
    torch.set_num_threads(args.threads)
    print(describe())
    if args.profile:
        for width in widths:
            print_profiles(names, width, contexts[0], new_tokens, args)
        return
    bandwidth = copy_bandwidth(64 if args.quick else 512)
    print(f"model: {NUM_BLOCKS} residual blocks (mixer + MLP x4), vocabulary {VOCAB}, fp32, {args.threads} threads; "
          f"prefill by one forward (auto mode), then {new_tokens} greedy steps timed after one warm-up step")
    print(f"memory bandwidth (tensor copy, read + write): {bandwidth / 1e9:.1f} GB/s; "
          f"floor = B * bandwidth / weight bytes\n")
    share = CpuShare(children=True)
    share.start()
    rows = []
    header = (f"{'width':>5} {'B':>3} {'context':>7}  {'model (mixer)':<22} {'decode tok/s':>12} {'vs KV cache':>11} "
              f"{'floor tok/s':>11} {'of floor':>8} {'state MiB':>9} {'prefill tok/s':>13}")
    for width in widths:
        for batch in args.batches:
            print(header)
            print("-" * len(header))
            cache_rates: dict[int, float] = {}  # the SDPA transformer's, per context
            for name in names:
                label = name if name in BASELINES else f"rnnkit {name}"
                for context in contexts:
                    case = {"name": name, "width": width, "context": context, "batch": batch,
                            "new_tokens": new_tokens, "threads": args.threads}
                    result = run_isolated(__file__, case, args.time_cap, args.threads)
                    row = {"model": name, "width": width, "batch": batch, "context": context, **result}
                    rows.append(row)
                    if "error" in result:
                        print(f"{width:>5} {batch:>3} {context:>7}  {label:<22} {result['error']}", flush=True)
                        continue
                    row["floor_tokens_per_s"] = floor = batch * bandwidth / result["weight_bytes"]
                    rate = result["decode_tokens_per_s"]
                    if name == TRANSFORMER:
                        cache_rates[context] = rate
                    row["vs_kv_cache"] = rate / cache_rates[context] if context in cache_rates else None
                    versus = f"{row['vs_kv_cache']:>10.2f}x" if row["vs_kv_cache"] else f"{'-':>11}"
                    print(f"{width:>5} {batch:>3} {context:>7}  {label:<22} {rate:>12,.0f} {versus} {floor:>11,.0f} "
                          f"{rate / floor:>7.2f}x {result['state_bytes'] / MiB:>9.1f} "
                          f"{result['prefill_tokens_per_s']:>13,.0f}", flush=True)
            print()
    report_load(share)
    write_json(args.out, {"widths": widths, "batches": args.batches, "contexts": contexts, "new_tokens": new_tokens,
                          "threads": args.threads, "vocab": VOCAB, "blocks": NUM_BLOCKS,
                          "bandwidth_bytes_per_s": bandwidth}, rows)
    if args.plot:
        plot(args.plot, rows, widths, args.batches)


if __name__ == "__main__":
    main()
