"""Batched beam search against the same beams decoded one word at a time, on the g2p test split.

    python benchmarks/beam_speed.py                          # the G2P recipe's model, untrained; the whole test split
    python benchmarks/beam_speed.py --checkpoint runs/g2p    # a model trained by `rnnkit train --task g2p`
    python benchmarks/beam_speed.py --quick                  # 64 words, d_model 32: a check that it runs

Both sides call ``rnnkit.models.decoding.beam_search`` with the same beam width (5), length penalty
and ``max_len`` (the task's ``decode_options``: a limit per word, set by its own length):

- batched: ``--batch-size`` words per call, so every ``decode_step`` advances ``batch * beam``
  hypotheses at once;
- one at a time: one word per call, ``beam`` hypotheses per ``decode_step``.

The words are the test split's in its bucketed order (batches of similar lengths, as evaluation
reads them). An untrained model rarely ends a hypothesis, so its beams run to ``max_len``: the most
work per word. The run prints the machine first, then words per second of each side and their
ratio, and how many words' best hypotheses differ between the two, with the largest gap between
their best scores: batched beams equal beams run one source at a time up to rounding, as
``tests/models/test_decoding.py`` checks; in fp32 a near-tie between hypotheses can come out in
either order, and the two best scores then agree to rounding.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rnnkit.bench.machine import describe
from rnnkit.cli import G2P_DEFAULTS
from rnnkit.models import Seq2Seq, beam_search, load_pretrained, seq2seq_config_for
from rnnkit.tasks import build_task, restore_task


def load(checkpoint: str | None, d_model: int):
    """The model and task of a trained run, or an untrained model of the G2P recipe's shape."""
    if checkpoint is not None:
        info = json.loads((Path(checkpoint) / "train.json").read_text())
        return load_pretrained(checkpoint).eval(), restore_task(info["task"])
    task = build_task("g2p")
    torch.manual_seed(0)
    config = seq2seq_config_for(task, d_model=d_model, attention=G2P_DEFAULTS["attention"],
                                bidirectional=G2P_DEFAULTS["bidirectional_encoder"])
    return Seq2Seq(config).eval(), task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a run directory of `rnnkit train --task g2p` (default: untrained)")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.0, help="length penalty exponent")
    parser.add_argument("--batch-size", type=int, default=128, help="words per batched call")
    parser.add_argument("--words", type=int, help="decode only the first N test words (default: all)")
    parser.add_argument("--d-model", type=int, default=G2P_DEFAULTS["d_model"], help="untrained model's width")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="64 words (and an untrained model of d_model 32)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.words = args.words or 64
        args.d_model = 32
    print(describe())
    model, task = load(args.checkpoint, args.d_model)
    batches = list(task.eval_batches("test", args.batch_size))
    if args.words is not None:
        kept, left = [], args.words
        for batch in batches:
            if left <= 0:
                break
            kept.append(batch.take(0, min(left, len(batch))))
            left -= len(kept[-1])
        batches = kept
    words = sum(len(b) for b in batches)
    params = sum(p.numel() for p in model.parameters())
    print(f"g2p test split: {words} words, beam {args.beam}, batches of {args.batch_size}; model "
          f"{'from ' + args.checkpoint if args.checkpoint else 'untrained'} ({params:,} parameters)", flush=True)

    def decode(src, lengths):
        return beam_search(model, src, lengths, beam_size=args.beam, alpha=args.alpha, **task.decode_options(lengths))

    with torch.inference_mode():
        started = time.perf_counter()
        batched = [decode(b.src, b.src_lengths) for b in batches]
        batched_seconds = time.perf_counter() - started
        started = time.perf_counter()
        single = [[decode(b.src[i:i + 1, : int(b.src_lengths[i])], b.src_lengths[i:i + 1]) for i in range(len(b))]
                  for b in batches]
        single_seconds = time.perf_counter() - started
    differ, score_gap = 0, 0.0
    for whole, parts in zip(batched, single):
        for i, one in enumerate(parts):
            n = int(one.lengths[0, 0])
            if int(whole.lengths[i, 0]) != n or not torch.equal(whole.tokens[i, 0, :n], one.tokens[0, 0, :n]):
                differ += 1
                score_gap = max(score_gap, abs(float(whole.scores[i, 0]) - float(one.scores[0, 0])))
    print(f"batched:      {words / batched_seconds:10.1f} words/s ({batched_seconds:.2f} s)")
    print(f"one at a time:{words / single_seconds:10.1f} words/s ({single_seconds:.2f} s)")
    print(f"ratio: batched is {single_seconds / batched_seconds:.1f}x faster; best hypotheses differing: {differ}")
    if differ:
        # Batched and single calls round differently (other matrix shapes); a near-uniform untrained
        # model has near-tied hypotheses, so the order of a tie can flip. The best scores then agree.
        print(f"largest gap between the two sides' best scores where the hypotheses differ: {score_gap:.2e}")


if __name__ == "__main__":
    main()
