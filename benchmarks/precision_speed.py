"""Training-step speed of the Shakespeare character LSTM in fp32 and under bf16 autocast, side by side.

Why: the default ``rnnkit train`` uses ``--precision auto``, i.e. bf16 autocast where
``rnnkit.train.fast_bf16()`` says the CPU has AMX or AVX512-BF16. This prints the ratio that choice
rests on, for the default model and for a plain LSTM 256/512, measured in one run.

    python benchmarks/precision_speed.py            # 2 threads, batch 32 x 128, 8 timed steps each
"""

from __future__ import annotations

import argparse
import time

import torch

from rnnkit.bench.machine import describe
from rnnkit.models import SequenceModel
from rnnkit.train import fast_bf16

VOCAB = 84  # the Shakespeare corpus' characters


def train_step_tokens_per_second(model: SequenceModel, bf16: bool, batch: int, seq_len: int, steps: int) -> float:
    """fwd + bwd + AdamW step, as the Trainer runs it; best of two timed blocks."""
    ids = torch.randint(0, VOCAB, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, _ = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    step()  # warm-up: oneDNN primitive creation, allocator
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, time.perf_counter() - start)
    return batch * seq_len * steps / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch, seq_len = 32, 128
    print(describe())
    print(f"batch {batch} x {seq_len}, "
          f"train step (fwd+bwd+AdamW); fast_bf16() = {fast_bf16('cpu')}")
    print(f"{'model':<40} {'fp32 tok/s':>11} {'bf16 tok/s':>11} {'bf16/fp32':>9}")
    configs = [
        ("LSTM 512 on embedding 128 (the default)", 128, {"hidden_size": 512}),
        ("LSTM 256 (embedding 256)", 256, {}),
        ("LSTM 512 (embedding 512)", 512, {}),
    ]
    for name, d_model, options in configs:
        torch.manual_seed(0)
        model = SequenceModel(vocab_size=VOCAB, d_model=d_model, layer="lstm", layer_options=options)
        fp32 = train_step_tokens_per_second(model, False, batch, seq_len, args.steps)
        bf16 = train_step_tokens_per_second(model, True, batch, seq_len, args.steps)
        print(f"{name:<40} {fp32:>11,.0f} {bf16:>11,.0f} {bf16 / fp32:>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
