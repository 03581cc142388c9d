"""Decoding speed of every registered layer inside the same language model, against its weight-read
floor and attention's KV cache, on the CPU.

    python benchmarks/decode_speed.py --plot decode.png      # batch 1, 16; contexts 512, 2048, 8192
    python benchmarks/decode_speed.py --quick --layers lstm mamba
    python benchmarks/decode_speed.py --widths 512 --out decode.json

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
  can be faster; ``bandwidth`` is a large tensor copy's (bytes read + bytes written per second)
  measured at the start of the same run; ``of floor`` is the decode rate as a share of it;
- ``state MiB``: the state a step reads and writes at this context over the batch (a recurrence's is
  the same at every context; a KV cache grows with it);
- ``prefill tok/s``: the prompt's forward;
- ``vs KV cache``: the decode rate against the SDPA transformer's at the same batch and context.

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


def decode_case(name: str, width: int, context: int, batch: int, new_tokens: int, threads: int) -> dict:
    """Prefill ``context`` tokens, then time ``new_tokens`` greedy steps, in this process."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    capacity = context + new_tokens + 1  # the prompt, the warm-up step and the timed ones
    model = build_model(name, width, capacity).eval()
    prompt = torch.randint(0, VOCAB, (batch, context), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        start = time.perf_counter()
        logits, state = model.prefill(prompt, capacity) if name in BASELINES else model(prompt)
        prefill = time.perf_counter() - start
        token = logits[:, -1].argmax(-1)
        logits, state = model.step(token, state)  # warm-up
        token = logits.argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            logits, state = model.step(token, state)
            token = logits.argmax(-1)
        seconds = time.perf_counter() - start
    return {"decode_tokens_per_s": batch * new_tokens / seconds, "prefill_tokens_per_s": batch * context / prefill,
            "weight_bytes": weight_bytes(model), "state_bytes": state_bytes(name, model, width, context, batch)}


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
    args = parser.parse_args()
    if args.case:
        print(json.dumps(decode_case(**json.loads(args.case))))
        return

    widths = args.widths or [256]
    contexts = args.contexts or ([256, 1024] if args.quick else [512, 2048, 8192])
    new_tokens = args.new_tokens or (8 if args.quick else 64)
    names = ([] if args.no_baselines else list(BASELINES)) + check_layers(args.layers)
    torch.set_num_threads(args.threads)
    print(describe())
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
