"""Training speed and peak memory of every registered layer inside the same language model, on the CPU.

    python benchmarks/model_speed.py                         # widths 256, 512; T in 512, 2048; B=16
    python benchmarks/model_speed.py --quick                 # width 256, T=512 only, fewer steps
    python benchmarks/model_speed.py --layers lstm mamba --widths 256 --lengths 512 --out model.json

The model: ``rnnkit.models.SequenceModel`` with 4 pre-norm residual blocks (``x + mixer(norm(x))``,
``x + MLP(norm(x))``, MLP ratio 4), a byte vocabulary (256 ids) embedded and read out by a linear
head, every block's mixer the layer under test at its default options (``attention``'s cache sized
to the sequence, ``max_len = T``, so no step attends to empty slots). Next to them, built in this
script with the same embedding, blocks, MLPs, norms and head, only the mixer differing:

- ``torch.nn.LSTM stack``: ``torch.nn.LSTM(width, width)`` as each block's mixer, the baseline every
  row's ratio is taken against;
- ``SDPA transformer``: causal multi-head self-attention through
  ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``, head width 64, fused q/k/v
  projection, no position encoding (the causal mask orders the tokens).

One training step is forward, next-token cross-entropy, backward and ``torch.optim.AdamW``'s step;
tokens/s = B * T / its seconds, the best of ``--steps`` steps after one warm-up step.

Peak memory: each configuration runs in a fresh subprocess, and its peak is the growth of that
process's resident-set high-water mark (``VmHWM``) from just before the model is built to the end of
its steps: weights, gradients, AdamW's moments, the activations autograd keeps, the kernels'
reused buffers and the allocator's slack, all at once. A fresh process per configuration is what
makes this sound on the CPU: PyTorch's CPU allocator keeps no count of its own, the high-water mark
never goes down within a process, and a process that ran a larger model before would hide a smaller
one's peak (``/proc/self/clear_refs`` resets the mark to the current resident set, which already
holds torch, rnnkit and its compiled kernels).

A configuration that fails prints its error in the table; one that runs past ``--time-cap``
seconds is stopped and reported as such (a slow layer that finishes its warm-up within half the
cap is timed on as many steps as fit). The run ends with the share of CPU time other processes
took: the configurations run one after another, so load during the run shifts them unevenly.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from classic_speed import CpuShare  # noqa: E402  (sibling script)

from rnnkit.bench.machine import describe  # noqa: E402

MiB = 2**20
#: Byte-level vocabulary: the embedding and head stay small next to the blocks.
VOCAB = 256
NUM_BLOCKS = 4
LSTM_STACK = "torch.nn.LSTM stack"
TRANSFORMER = "SDPA transformer"
BASELINES = (LSTM_STACK, TRANSFORMER)
#: Registered layers that wrap another layer (they need ``layer=``) rather than being one.
WRAPPERS = ("bidirectional", "stacked")


# ------------------------------------------------------------------------------- models
class SDPAttention(nn.Module):
    """Causal multi-head self-attention by ``scaled_dot_product_attention``; ``(B, T, D) -> (B, T, D)``.

    :meth:`step` decodes one token against a preallocated key/value cache (``(B, H, S, D/H)`` each,
    filled up to ``position``), the usual KV cache of a transformer.
    """

    def __init__(self, width: int, head_dim: int = 64) -> None:
        super().__init__()
        self.heads = max(1, width // head_dim)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return q, k, v  # (B, H, T, D/H) each

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(x)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D/H)
        return self.out(y.transpose(1, 2).flatten(2))

    def prefill(self, x: torch.Tensor, capacity: int) -> tuple[torch.Tensor, dict]:
        """``forward`` that also returns the cache of ``x``'s keys and values, room for ``capacity`` steps."""
        q, k, v = self._split(x)
        B, H, T, K = k.shape
        cache = {"k": k.new_zeros(B, H, capacity, K), "v": v.new_zeros(B, H, capacity, K), "position": T}
        cache["k"][:, :, :T], cache["v"][:, :, :T] = k, v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).flatten(2)), cache

    def step(self, x_t: torch.Tensor, cache: dict) -> tuple[torch.Tensor, dict]:
        """One token ``x_t`` (B, D) against the cache, which it extends in place."""
        q, k, v = self._split(x_t[:, None])  # (B, H, 1, D/H)
        t = cache["position"]
        cache["k"][:, :, t : t + 1], cache["v"][:, :, t : t + 1] = k, v
        cache["position"] = t + 1
        y = F.scaled_dot_product_attention(q, cache["k"][:, :, : t + 1], cache["v"][:, :, : t + 1])
        return self.out(y.transpose(1, 2).flatten(2))[:, 0], cache


class LSTMMixer(nn.Module):
    """``torch.nn.LSTM(width, width)``, batch-first, as a mixer; ``(B, T, D) -> (B, T, D)``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(width, width, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]

    def prefill(self, x: torch.Tensor, capacity: int) -> tuple[torch.Tensor, tuple]:
        return self.lstm(x)

    def step(self, x_t: torch.Tensor, state: tuple) -> tuple[torch.Tensor, tuple]:
        y, state = self.lstm(x_t[:, None], state)
        return y[:, 0], state


class Block(nn.Module):
    """``x + mixer(LN(x))`` then ``x + MLP(LN(x))``, as ``rnnkit.models.model.ResidualBlock``."""

    def __init__(self, mixer: nn.Module, width: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = round(mlp_ratio * width)
        self.mixer_norm, self.mixer = nn.LayerNorm(width), mixer
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def finish(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = h + y
        return h + self.mlp(self.mlp_norm(h))


class ResidualLM(nn.Module):
    """The blocks of ``SequenceModel(block="residual")`` around a mixer built here:
    embedding -> L x :class:`Block` -> LN -> head; ids ``(B, T)`` -> logits ``(B, T, V)``."""

    def __init__(self, mixer: type, width: int, vocab: int = VOCAB, blocks: int = NUM_BLOCKS,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(mixer(width), width, mlp_ratio) for _ in range(blocks))
        self.final_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        h = self.embedding(ids)
        for block in self.blocks:
            h = block.finish(h, block.mixer(block.mixer_norm(h)))
        return self.head(self.final_norm(h)), None

    def prefill(self, ids: torch.Tensor, capacity: int) -> tuple[torch.Tensor, list]:
        """Logits of the prompt ``ids`` (B, T) and each mixer's state (caches with room for ``capacity`` steps)."""
        h, states = self.embedding(ids), []
        for block in self.blocks:
            y, state = block.mixer.prefill(block.mixer_norm(h), capacity)
            states.append(state)
            h = block.finish(h, y)
        return self.head(self.final_norm(h)), states

    def step(self, ids: torch.Tensor, states: list) -> tuple[torch.Tensor, list]:
        """One token per sequence, ``ids`` (B,) -> logits (B, V) and the mixers' next states."""
        h, new = self.embedding(ids), []
        for block, state in zip(self.blocks, states):
            y, state = block.mixer.step(block.mixer_norm(h), state)
            new.append(state)
            h = block.finish(h, y)
        return self.head(self.final_norm(h)), new


def layer_options(name: str, context: int) -> dict:
    """Options of layer ``name`` in these benchmarks: its defaults, except that ``attention``'s cache
    holds exactly ``context`` steps (the sequence or the decoding context)."""
    return {"max_len": context} if name == "attention" else {}


def build_model(name: str, width: int, context: int) -> nn.Module:
    """The 4-block residual LM with ``name``'s mixer: a registered layer or one of :data:`BASELINES`."""
    if name == LSTM_STACK:
        return ResidualLM(LSTMMixer, width)
    if name == TRANSFORMER:
        return ResidualLM(SDPAttention, width)
    from rnnkit.models import SequenceModel

    return SequenceModel(vocab_size=VOCAB, d_model=width, block="residual", layer=name, num_layers=NUM_BLOCKS,
                         layer_options=layer_options(name, context))


def auto_mode(model: nn.Module, batch: int, length: int, width: int) -> str:
    """The mode ``auto`` resolves to in the model's first mixer at this shape ("" for the baselines)."""
    blocks = getattr(getattr(model, "body", None), "blocks", None)
    if blocks is None:
        return ""
    mixer = blocks[0].mixer
    x = torch.empty(batch, length, width, device=next(model.parameters()).device)  # never written: no memory touched
    return mixer._resolve_mode("auto", x)


def registered_layers() -> list[str]:
    import rnnkit

    return [n for n in rnnkit.layers.names() if n not in WRAPPERS]


# ------------------------------------------------------------------------------- one configuration
def vm(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> int:
    """Reset the resident-set high-water mark to the current resident set; returns that (bytes)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return vm("VmRSS")


def load_kernels() -> None:
    """Load rnnkit's compiled library before the memory baseline, so that no row counts it."""
    from rnnkit.ops import _native

    _native.available()


def train_case(name: str, width: int, length: int, batch: int, steps: int, cap: float, threads: int) -> dict:
    """Time ``steps`` training steps of one model in this process; returns the measurements."""
    torch.set_num_threads(threads)
    load_kernels()
    base = reset_peak()
    torch.manual_seed(0)
    model = build_model(name, width, length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch, length + 1), generator=gen)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logits = model(inputs)[0]
        F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1)).backward()
        optimizer.step()
        return time.perf_counter() - start

    began = time.perf_counter()
    warm = step()
    times = []
    # Keep clear of the parent's hard limit: stop once another step would not fit in half the cap.
    while len(times) < steps and (time.perf_counter() - began) + (min(times) if times else warm) < cap / 2:
        times.append(step())
    return {
        "seconds": min(times) if times else warm,
        "timed_steps": len(times),
        "warmup_seconds": warm,
        "peak_bytes": vm("VmHWM") - base,
        "parameters": sum(p.numel() for p in model.parameters()),
        "mode": auto_mode(model, batch, length, width),
    }


def run_isolated(script: str, case: dict, cap: float, threads: int) -> dict:
    """Run ``script --case JSON`` in a fresh process; its result, or ``{"error": ...}`` on a failure or
    when it runs past ``cap`` seconds."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    try:
        out = subprocess.run([sys.executable, script, "--case", json.dumps(case)], capture_output=True, text=True,
                             env=env, timeout=cap)
    except subprocess.TimeoutExpired:
        return {"error": f"over the time cap ({cap:.0f} s)"}
    if out.returncode:
        lines = (out.stderr.strip() or f"exit status {out.returncode}").splitlines()
        return {"error": "failed: " + lines[-1][:160]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def report_load(share: CpuShare) -> None:
    other = share.stop()
    if other is not None:
        print(f"\nother processes used {100 * other:.0f}% of all CPU time during the run"
              + (" -- noisy, rerun on a quiet machine" if other > 0.1 else ""))


def write_json(path: str | None, settings: dict, rows: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({"machine": describe(), "settings": settings, "rows": rows}, f, indent=1)
        print(f"results written to {path}")


def check_layers(requested: list[str] | None) -> list[str]:
    """The layers to run: all registered ones (wrappers excluded) or ``requested``, checked."""
    known = registered_layers()
    if not requested:
        return known
    unknown = [n for n in requested if n not in known]
    if unknown:
        raise SystemExit(f"--layers: expected names from {known}, got {unknown}")
    return requested


def add_common_arguments(parser: argparse.ArgumentParser, quick: str) -> None:
    """The options both model benchmarks take (``quick``: what ``--quick`` runs)."""
    parser.add_argument("--layers", nargs="+", help="registered layers to run (default: all but the wrappers)")
    parser.add_argument("--time-cap", type=float, default=600.0, help="seconds per configuration before it is stopped")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every configuration")
    parser.add_argument("--no-baselines", action="store_true", help="skip the LSTM stack and the transformer")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", help="write the results to this JSON file")
    parser.add_argument("--case", help=argparse.SUPPRESS)


# ------------------------------------------------------------------------------- report
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, "width 256, T=512 only, one timed step")
    parser.add_argument("--widths", nargs="+", type=int, default=None, help="model widths (default 256 512)")
    parser.add_argument("--lengths", nargs="+", type=int, default=None, help="sequence lengths T (default 512 2048)")
    parser.add_argument("--batch", type=int, default=16, help="B")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after the warm-up (default 3, quick 1)")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(train_case(**json.loads(args.case))))
        return

    widths = args.widths or ([256] if args.quick else [256, 512])
    lengths = args.lengths or ([512] if args.quick else [512, 2048])
    steps = args.steps or (1 if args.quick else 3)
    names = ([] if args.no_baselines else list(BASELINES)) + check_layers(args.layers)
    torch.set_num_threads(args.threads)
    print(describe())
    print(f"model: {NUM_BLOCKS} residual blocks (mixer + MLP x4), vocabulary {VOCAB}, fp32, B={args.batch}, "
          f"{args.threads} threads; training step = forward + cross-entropy + backward + AdamW")
    print(f"figures: best of {steps} step(s) after a warm-up; peak = resident-set high-water mark growth of a "
          f"fresh process per row; time cap {args.time_cap:.0f} s per row\n")
    share = CpuShare(children=True)
    share.start()
    rows = []
    header = (f"{'width':>5} {'T':>5}  {'model (mixer)':<22} {'auto mode':<10} {'params M':>8} {'train tok/s':>11} "
              f"{'vs LSTM':>8} {'peak MiB':>9}")
    for width in widths:
        for length in lengths:
            print(header)
            print("-" * len(header))
            lstm_seconds = None
            for name in names:
                case = {"name": name, "width": width, "length": length, "batch": args.batch, "steps": steps,
                        "cap": args.time_cap, "threads": args.threads}
                result = run_isolated(__file__, case, args.time_cap, args.threads)
                rows.append({"model": name, "width": width, "length": length, "batch": args.batch, **result})
                label = name if name in BASELINES else f"rnnkit {name}"
                if "error" in result:
                    print(f"{width:>5} {length:>5}  {label:<22} {result['error']}", flush=True)
                    continue
                seconds = result["seconds"]
                if name == LSTM_STACK:
                    lstm_seconds = seconds
                ratio = f"{lstm_seconds / seconds:>7.2f}x" if lstm_seconds else f"{'-':>8}"
                rows[-1]["tokens_per_s"] = args.batch * length / seconds
                rows[-1]["vs_lstm"] = lstm_seconds / seconds if lstm_seconds else None
                print(f"{width:>5} {length:>5}  {label:<22} {result['mode']:<10} {result['parameters'] / 1e6:>8.2f} "
                      f"{args.batch * length / seconds:>11,.0f} {ratio} {result['peak_bytes'] / MiB:>9.0f}", flush=True)
            print()
    report_load(share)
    write_json(args.out, {"widths": widths, "lengths": lengths, "batch": args.batch, "steps": steps,
                          "threads": args.threads, "vocab": VOCAB, "blocks": NUM_BLOCKS}, rows)


if __name__ == "__main__":
    main()
