"""``rnnkit`` command line: train, eval, generate, translate, predict, list, export.

Examples::

    rnnkit train                                   # the default Shakespeare character model
    rnnkit train --task adding --model gru --steps 2000
    rnnkit train --out runs/lm --checkpoint-every 200 --log-dir runs/lm/logs --resume   # survives kills
    torchrun --nproc_per_node=2 -m rnnkit train --task parity --batch-size 64          # data parallel
    rnnkit generate --checkpoint runs/shakespeare-lstm --prompt "ROMEO:"
    rnnkit eval --checkpoint runs/shakespeare-lstm --split test
    rnnkit train --task sequences --task-opt path=data.csv --task-opt label=y --out runs/mine
    rnnkit train --task g2p --out runs/g2p                          # the G2P recipe: attention LSTM
    rnnkit train --task reverse --model gru --attention bahdanau --bidirectional-encoder --steps 500
    rnnkit eval --checkpoint runs/g2p --split test                  # PER and WER of greedy decoding
    rnnkit translate --checkpoint runs/g2p --input hello --beam 5 --nbest 3
    rnnkit predict --checkpoint runs/mine --input new.csv --out predictions.csv
    rnnkit list
    rnnkit export --checkpoint runs/shakespeare-lstm --out exported --format both
    rnnkit bench tasks --models lstm,gru --tasks mqar,parity --budget small --seeds 3 --out RESULTS.jsonl
    rnnkit report RESULTS.jsonl --out report
"""

from __future__ import annotations

import argparse
import ast
import errno
import itertools
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from rnnkit.errors import InputError, NonFiniteError, check_positive_int, check_seed

#: The default language model of ``rnnkit train`` (Shakespeare and every other language-model task),
#: chosen for a few minutes of CPU training. The run is compute-bound, so the budget goes where it buys
#: the most: a wide recurrent state (hidden 512) fed by a narrow embedding (128: a character vocabulary
#: needs no more, and a narrow input keeps the input projection cheap), with bf16 autocast where the
#: device runs it fast (:func:`rnnkit.train.fast_bf16`; ``benchmarks/precision_speed.py`` measures the
#: gain). ``layer_options`` apply only while model, block and width are all left at these defaults.
#: Without ``--steps`` or ``--max-minutes`` the run takes at most ``steps`` steps or ``budget_minutes``
#: of training, whichever is less, so it ends in about five minutes with or without fast bf16.
LANGUAGE_MODEL_DEFAULTS: dict[str, Any] = {
    "model": "lstm", "block": "stacked", "d_model": 128, "layers": 1, "steps": 1800,
    "batch_size": 32, "seq_len": 128, "lr": 4e-3, "warmup": 50, "eval_every": 0,
    "layer_options": {"hidden_size": 512}, "precision": "auto", "budget_minutes": 4.5, "dropout": 0.0,
}
#: Defaults for every other task.
GENERIC_DEFAULTS: dict[str, Any] = {
    "model": "lstm", "block": "stacked", "d_model": 128, "layers": 1, "steps": 1000,
    "batch_size": 32, "seq_len": None, "lr": 3e-3, "warmup": 100, "eval_every": 0,
    "layer_options": {}, "precision": "auto", "budget_minutes": None, "dropout": 0.0,
}
#: Defaults of the encoder-decoder models of sequence-to-sequence tasks: an LSTM encoder and decoder
#: (``model``, ``layers`` each) with Luong's general attention; the keys after the generic ones are
#: the options of ``Seq2SeqConfig``/``PointerConfig`` and the sequence-to-sequence ``TrainConfig`` fields.
SEQ2SEQ_DEFAULTS: dict[str, Any] = {
    **GENERIC_DEFAULTS, "precision": "fp32", "attention": "general", "bidirectional_encoder": False,
    "input_feeding": False, "bridge": "auto", "num_heads": 1, "pointer_encoder": "rnn", "process_steps": 3,
    "mask_chosen": True, "label_smoothing": 0.0, "scheduled_sampling": "none", "eval_beam": 1,
}
#: The G2P recipe (CMUdict), meant to reach WER <= 35% and PER <= 9% on the test split within 30
#: CPU-minutes on 2 cores: a bidirectional LSTM encoder and an LSTM decoder with additive (Bahdanau)
#: attention, label smoothing 0.1, batches of 64 words; training stops at ``steps`` or after
#: ``budget_minutes``, whichever comes first (the final val evaluation, greedy decoding of every val
#: word, comes on top). No input feeding: without it the decoder runs once over the whole target in its
#: fused mode, where input feeding would run it one step at a time.
G2P_DEFAULTS: dict[str, Any] = {
    **SEQ2SEQ_DEFAULTS, "d_model": 256, "steps": 30000, "batch_size": 64, "lr": 3e-3, "warmup": 200,
    "budget_minutes": 25.0, "attention": "additive", "bidirectional_encoder": True, "label_smoothing": 0.1,
}


def defaults_for(task) -> dict[str, Any]:
    """The recipe ``rnnkit train`` starts from: the tuned character-LM recipe for every language-model task
    (tokens in, the next token predicted at every step, streamed in windows), the G2P recipe for ``g2p``,
    the encoder-decoder defaults for other sequence-to-sequence tasks, the generic one otherwise."""
    if getattr(task, "seq2seq", False):
        return G2P_DEFAULTS if task.name == "g2p" else SEQ2SEQ_DEFAULTS
    language_model = task.input_kind == "tokens" and task.target == "per_step" and task.streaming
    return LANGUAGE_MODEL_DEFAULTS if language_model else GENERIC_DEFAULTS


#: ``--attention`` names: the config's kinds and the papers' names for them.
ATTENTION_ALIASES = {"bahdanau": "additive", "luong": "general"}
#: ``rnnkit train`` flags of sequence-to-sequence tasks only (argparse destinations; None when not given).
SEQ2SEQ_FLAGS = (
    "encoder", "decoder", "encoder_layers", "decoder_layers", "encoder_opt", "decoder_opt", "attention", "num_heads",
    "bidirectional_encoder", "input_feeding", "bridge", "pointer_encoder", "process_steps", "mask_chosen",
    "label_smoothing", "scheduled_sampling", "sampling_k", "sampling_slope", "sampling_min", "eval_beam",
)


def _parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` with a Python literal value (``hidden_size=256``, ``peephole=True``)."""
    if "=" not in text:
        raise InputError(f"--layer-opt/--task-opt: expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word is a string
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnkit", description="Recurrent sequence models under one contract.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model on a task (default: Shakespeare character LM)")
    train.add_argument("--task", default="shakespeare", help="task name (see `rnnkit list`)")
    train.add_argument("--task-opt", action="append", default=[], metavar="KEY=VALUE", help="task option, repeatable")
    train.add_argument("--model", help="registered layer used in every block (default lstm), or a layer pattern "
                                       "cycled to --layers, e.g. 'rglru,rglru,attention:window=1024' or 'mamba*7,attention'")
    train.add_argument("--block", choices=["stacked", "residual"], help="block type")
    train.add_argument("--d-model", type=int, help="model width")
    train.add_argument("--layers", type=int, help="number of layers / blocks")
    train.add_argument("--layer-opt", action="append", default=[], metavar="KEY=VALUE", help="layer option, repeatable")
    train.add_argument("--mlp", choices=["gelu", "rwkv_channel_mix", "rwkv7_channel_mix"],
                       help="residual blocks' MLP: gelu (default) or an RWKV channel mix (token shift, squared ReLU)")
    train.add_argument("--bidirectional", action="store_true", help="bidirectional layers (not for language models)")
    train.add_argument("--dropout", type=float, help="dropout between layers and before the output (default 0)")
    train.add_argument("--tie-embeddings", action="store_true")
    train.add_argument("--pooling", choices=["last", "mean"], default="last", help="sequence heads: pooling")
    train.add_argument("--steps", type=int, help="optimizer steps (with --max-minutes: the most it may run)")
    train.add_argument("--max-minutes", type=float, metavar="M",
                       help="time budget: the step count is fixed from the measured speed after a few steps "
                            "(recorded, so --resume is exact); evaluations and saving come on top")
    train.add_argument("--patience", type=int, default=0,
                       help="early stopping: stop after this many evaluations without a lower val loss (needs --eval-every)")
    train.add_argument("--keep-best", action="store_true",
                       help="keep the model of the lowest val loss in OUT/best (needs --eval-every)")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--seq-len", type=int, help="training window / sequence length (default: the task's)")
    train.add_argument("--lr", type=float)
    train.add_argument("--warmup", type=int)
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--grad-clip", type=float, default=1.0)
    train.add_argument("--eval-every", type=int)
    train.add_argument("--eval-batch-size", type=int, default=64)
    train.add_argument("--eval-max-batches", type=int, help="cap on val batches per evaluation (default: all)")
    train.add_argument("--mode", default="auto", help="layer mode for training (default auto)")
    train.add_argument("--online", choices=["rtrl", "uoro"],
                       help="learn by gradients carried forward in time instead of backpropagation: rtrl (exact; "
                            "one element-wise layer: mingru, minlstm, lru, rglru, s4d, paragru) or uoro (any causal "
                            "model); memory independent of the sequence length")
    train.add_argument("--online-every", type=int, default=1, metavar="K",
                       help="--online: update the weights every K time steps (default 1)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cpu")
    train.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                       help="bf16 autocasts the forward pass (fp32 weights and optimizer); auto picks bf16 where "
                            "the device runs it fast (CPU with AMX/AVX512-BF16, CUDA). Default: auto on "
                            "shakespeare, fp32 elsewhere")
    train.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    train.add_argument("--out", help="checkpoint directory (default runs/<task>-<model>-<time>)")
    train.add_argument("--sample-length", type=int, default=300, help="characters sampled after training (text tasks)")
    train.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    train.add_argument("--log-every", type=int, default=50, help="steps between log lines with --no-progress")
    train.add_argument("--log-dir", help="write metrics to CSV and TensorBoard event files here")
    train.add_argument("--checkpoint-every", type=int, default=0,
                       help="write a resumable checkpoint to <out>/checkpoints every N steps (SIGTERM/SIGINT always do)")
    train.add_argument("--keep-last", type=int, default=3, help="resumable checkpoints kept (0: all)")
    train.add_argument("--resume", action="store_true",
                       help="continue exactly from the latest checkpoint in --out (start fresh if there is none)")
    train.add_argument("--overwrite", action="store_true",
                       help="start a fresh run in a non-empty --out: the earlier run's checkpoints and model are "
                            "deleted (files rnnkit did not write are never touched)")
    train.add_argument("--nan-policy", choices=["raise", "skip"], default="raise",
                       help="non-finite loss or gradient norm: raise (default) or skip the step")
    train.add_argument("--max-skips", type=int, default=10, help="--nan-policy skip: consecutive skips tolerated")
    _add_seq2seq_arguments(train)

    gen = sub.add_parser("generate", help="sample text from a trained language model (character, byte or BPE)")
    gen.add_argument("--checkpoint", required=True, help="directory written by `rnnkit train`")
    gen.add_argument("--prompt", default="\n")
    gen.add_argument("--length", type=int, default=500, help="tokens to generate (characters for a character model)")
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float, help="nucleus sampling threshold in (0, 1]")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")

    ev = sub.add_parser("eval", help="evaluate a checkpoint on a split")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--split", default="test", choices=["val", "test"])
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--max-batches", type=int, help="score only the first N batches (default: the whole split)")
    ev.add_argument("--device", help="default: the training device if this machine has it, else cpu")
    ev.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ev.add_argument("--task-opt", action="append", default=[], metavar="KEY=VALUE",
                    help="change a saved task option, repeatable (e.g. path=NEW_DATA); the saved vocabulary is kept")
    ev.add_argument("--input", help="evaluate on every sequence of this labelled file instead of a split "
                                    "(tasks trained on files: sequences)")
    ev.add_argument("--seq-len", type=int, help="evaluate at this length (generated tasks: every example of this "
                                                "size, for length generalisation; default: the training run's)")
    ev.add_argument("--beam", type=int, help="sequence-to-sequence tasks: score beam search of this width "
                                             "(default: the training run's --eval-beam, greedy decoding)")

    pr = sub.add_parser("predict", help="predictions of a model trained on a table for a new file")
    pr.add_argument("--checkpoint", required=True, help="directory written by `rnnkit train --task sequences`")
    pr.add_argument("--input", required=True, help="a .csv, .parquet or .npz file laid out like the training file "
                                                   "(labels may be missing)")
    pr.add_argument("--out", required=True, help="the predictions, as CSV")
    pr.add_argument("--batch-size", type=int, default=64)
    pr.add_argument("--device", default="cpu")

    tr = sub.add_parser("translate", help="decode sources with a model trained on a sequence-to-sequence task "
                                          "(g2p: words to phonemes), with beam search and n-best lists")
    tr.add_argument("--checkpoint", required=True, help="directory written by `rnnkit train --task g2p` (or any "
                                                        "sequence-to-sequence task)")
    tr.add_argument("--input", action="append", default=[], metavar="TEXT",
                    help="a source (a word for g2p), repeatable; without --input or --input-file, lines of stdin")
    tr.add_argument("--input-file", help="a file of sources, one per line")
    tr.add_argument("--beam", type=int, default=5, help="beam width (1: greedy decoding)")
    tr.add_argument("--nbest", type=int, default=1, help="hypotheses printed per source, best first (at most --beam)")
    tr.add_argument("--alpha", type=float, default=0.0, help="length penalty exponent (GNMT); 0 ranks by log-prob")
    tr.add_argument("--batch-size", type=int, default=64, help="sources decoded together")
    tr.add_argument("--device", default="cpu")
    tr.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")

    sub.add_parser("list", help="registered layers (with modes) and tasks")

    exp = sub.add_parser("export", help="write a checkpoint's model as torch.export (.pt2) and/or ONNX programs")
    exp.add_argument("--checkpoint", required=True, help="directory written by `rnnkit train`")
    exp.add_argument("--out", required=True, help="directory for the programs and manifest.json")
    exp.add_argument("--format", choices=["pt2", "onnx", "both"], default="pt2")
    exp.add_argument("--what", choices=["forward", "step", "both"],
                     help="forward: whole sequences of --seq-len steps; step: one step with the state in and out "
                          "(default: both for a causal next-token model, else forward)")
    exp.add_argument("--seq-len", type=int, help="T of the exported forward (default: the training sequence length)")

    from rnnkit.bench.commands import add_parsers as add_bench_parsers

    add_bench_parsers(sub)  # bench tasks, report
    return parser


def _add_seq2seq_arguments(train: argparse.ArgumentParser) -> None:
    """The ``rnnkit train`` flags of sequence-to-sequence tasks (encoder-decoder models)."""
    group = train.add_argument_group("sequence-to-sequence tasks (g2p, reverse, addition, sort, convex_hull)")
    group.add_argument("--encoder", metavar="LAYER", help="the encoder's layer (default: --model)")
    group.add_argument("--decoder", metavar="LAYER", help="the decoder's causal layer (default: --model)")
    group.add_argument("--encoder-layers", type=int, help="encoder blocks (default: --layers)")
    group.add_argument("--decoder-layers", type=int, help="decoder layers (default: --layers)")
    group.add_argument("--encoder-opt", action="append", metavar="KEY=VALUE",
                       help="encoder layer option, repeatable (--layer-opt sets both sides)")
    group.add_argument("--decoder-opt", action="append", metavar="KEY=VALUE", help="decoder layer option, repeatable")
    kinds = ["none", "additive", "bahdanau", "dot", "general", "luong", "multihead"]
    group.add_argument("--attention", choices=kinds,
                       help="none (Sutskever), additive = bahdanau, dot, general = luong, multihead "
                            "(default: the recipe's)")
    group.add_argument("--num-heads", type=int, help="heads of --attention multihead")
    group.add_argument("--bidirectional-encoder", action=argparse.BooleanOptionalAction,
                       help="read the source both ways")
    group.add_argument("--input-feeding", action=argparse.BooleanOptionalAction,
                       help="feed the attentional vector into the next decoder step (Luong)")
    group.add_argument("--bridge", choices=["auto", "copy", "project", "zeros"], help="the decoder's initial state")
    group.add_argument("--pointer-encoder", choices=["rnn", "set"], help="pointer tasks: a recurrent encoder or "
                                                                         "Read-Process-Write (set)")
    group.add_argument("--process-steps", type=int, help="--pointer-encoder set: process steps")
    group.add_argument("--mask-chosen", action=argparse.BooleanOptionalAction,
                       help="pointer tasks: forbid choosing an element twice (default); --no-mask-chosen leaves every "
                            "element choosable at every step, as Vinyals et al. 2015 did")
    group.add_argument("--label-smoothing", type=float, help="label smoothing of the training loss (default 0)")
    group.add_argument("--scheduled-sampling", choices=["none", "linear", "exponential", "inverse_sigmoid"],
                       help="schedule of the teacher-forcing probability (Bengio et al. 2015; default none)")
    group.add_argument("--sampling-k", type=float, help="the schedule's k")
    group.add_argument("--sampling-slope", type=float, help="the linear schedule's slope")
    group.add_argument("--sampling-min", type=float, help="the lowest teacher-forcing probability")
    group.add_argument("--eval-beam", type=int, help="evaluations decode with this beam width (default 1: greedy)")


def _check_seq2seq_flags(args: argparse.Namespace, task) -> None:
    """Raise InputError for a sequence-to-sequence flag given with another kind of task (or an
    attention flag with a pointer task, whose attention is its output)."""
    given = [name for name in SEQ2SEQ_FLAGS if getattr(args, name, None) is not None]
    if not getattr(task, "seq2seq", False) and given:
        flag = "--" + given[0].replace("_", "-")
        raise InputError(f"{flag}: expected a sequence-to-sequence task (g2p, reverse, addition, sort, convex_hull), "
                         f"got task {task.name!r}")
    pointer_only = ("pointer_encoder", "process_steps", "mask_chosen")
    token_only = ("attention", "num_heads", "input_feeding", "scheduled_sampling", "sampling_k", "sampling_slope",
                  "sampling_min")
    wrong = [n for n in given if n in (token_only if getattr(task, "pointer", False) else pointer_only)]
    if wrong:
        kind = "a token" if getattr(task, "pointer", False) else "a pointer"
        raise InputError(f"--{wrong[0].replace('_', '-')}: expected {kind} task, got task {task.name!r}")


def _seq2seq_config(args: argparse.Namespace, task, defaults: dict[str, Any]):
    """The Seq2SeqConfig (PointerConfig for a pointer task) of ``rnnkit train``'s flags over the recipe."""
    from rnnkit.models import seq2seq_config_for

    if getattr(args, "mlp", None) is not None:
        raise InputError(f"--mlp: expected a task without an encoder-decoder model, got task {task.name!r}")
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else defaults[name]  # noqa: E731
    layer = args.model or defaults["model"]
    layers = args.layers if args.layers is not None else defaults["layers"]
    shared = _layer_options(args, defaults)
    fields: dict[str, Any] = dict(
        d_model=args.d_model if args.d_model is not None else defaults["d_model"],
        encoder_layer=args.encoder or layer, encoder_block=args.block or defaults["block"],
        encoder_layers=args.encoder_layers if args.encoder_layers is not None else layers,
        encoder_options={**shared, **dict(_parse_option(o) for o in args.encoder_opt or ())},
        bidirectional=args.bidirectional or pick("bidirectional_encoder"),
        decoder_layer=args.decoder or layer,
        decoder_layers=args.decoder_layers if args.decoder_layers is not None else layers,
        decoder_options={**shared, **dict(_parse_option(o) for o in args.decoder_opt or ())},
        bridge=pick("bridge"), dropout=pick("dropout"),
    )
    if task.pointer:
        fields.update(encoder=pick("pointer_encoder"), process_steps=pick("process_steps"),
                      process_layer=fields["decoder_layer"], process_options=fields["decoder_options"],
                      mask_chosen=pick("mask_chosen"))
    else:
        attention = pick("attention")
        fields.update(attention=ATTENTION_ALIASES.get(attention, attention), num_heads=pick("num_heads"),
                      input_feeding=pick("input_feeding"), tie_embeddings=args.tie_embeddings)
    return seq2seq_config_for(task, **fields)


def _seq2seq_train_fields(args: argparse.Namespace, task, defaults: dict[str, Any]) -> dict[str, Any]:
    """The sequence-to-sequence fields of ``TrainConfig`` from the flags over the recipe (none for other tasks)."""
    if not getattr(task, "seq2seq", False):
        return {}
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else defaults[name]  # noqa: E731
    fields = {name: pick(name) for name in ("label_smoothing", "scheduled_sampling", "eval_beam")}
    for name in ("sampling_k", "sampling_slope", "sampling_min"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    return fields


def _layer_options(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    """``--layer-opt`` values over the defaults' layer options; those defaults belong to the default
    model, so they are dropped as soon as the model, block or width is chosen on the command line."""
    chosen = args.model is not None or args.block is not None or args.d_model is not None \
        or getattr(args, "encoder", None) is not None or getattr(args, "decoder", None) is not None
    options = {} if chosen else dict(defaults["layer_options"])
    options.update(_parse_option(o) for o in args.layer_opt)
    return options


def _model_config(args: argparse.Namespace, task, defaults: dict[str, Any]):
    from rnnkit.models import model_config_for

    return model_config_for(
        task,
        d_model=args.d_model if args.d_model is not None else defaults["d_model"],
        block=args.block or defaults["block"],
        layer=args.model or defaults["model"],
        num_layers=args.layers if args.layers is not None else defaults["layers"],
        layer_options=_layer_options(args, defaults),
        bidirectional=args.bidirectional,
        dropout=args.dropout if args.dropout is not None else defaults["dropout"],
        pooling=args.pooling,
        tie_embeddings=args.tie_embeddings,
        **({"mlp": args.mlp} if args.mlp is not None else {}),
    )


def cmd_train(args: argparse.Namespace) -> int:
    from rnnkit.train.signals import route_stop_signals

    # A SIGTERM/SIGINT during set-up is held back and honoured after the first step, like one in
    # training (a second Ctrl-C stops at once, as it does in training); one after training (while
    # the summary and sample print) finds the run already saved.
    pending: list[int] = []

    def hold(signum: int) -> None:
        if pending and signum == signal.SIGINT:
            raise KeyboardInterrupt
        pending.append(signum)

    with route_stop_signals(hold):
        trainer, say, lock = _prepare_training(args)
        try:
            if pending:
                trainer.request_stop(pending[0])
            result = trainer.fit()
            return _report_training(args, trainer, result, say)
        finally:
            if lock is not None:
                lock.release()


def _report_training(args: argparse.Namespace, trainer, result: dict[str, Any], say) -> int:
    from rnnkit.train import describe_metrics, distributed

    distributed.shutdown()
    out, model, task = trainer.out_dir, trainer.model, trainer.task
    if result["interrupted"]:
        say(f"stopped by {result['interrupted']} at step {result['steps']}; checkpoint in {out / 'checkpoints'} "
            "(continue with --resume)", flush=True)
        return 0
    if trainer.rank != 0:
        return 0
    from rnnkit.train.progress import throughput_unit

    if result["stopped_early"]:
        print(f"stopped early at step {result['steps']}: no lower val loss in {trainer.config.patience} evaluations")
    if result["best"] is not None and trainer.config.keep_best:
        print(f"best: val loss {result['best']['loss']:.4f} at step {result['best']['step']}, in {trainer.best_dir}")
    print(f"done in {result['seconds']:.0f} s ({result['tokens_per_second']:,.0f} {throughput_unit(task)}); "
          f"val: {describe_metrics(result['val'])}")
    print(f"checkpoint: {out}")
    language_model = task.input_kind == "tokens" and task.target == "per_step" and not getattr(task, "seq2seq", False)
    if language_model and hasattr(task, "vocab") and args.sample_length > 0:
        print("sample:")
        _print_sample(model, task, "\n", args.sample_length, 0.8, None, args.seed)
    return 0


def _prepare_training(args: argparse.Namespace):
    """Task, model, config and Trainer of ``rnnkit train`` (resumed with ``--resume``), and a ``say``
    that prints on rank 0 only."""
    from rnnkit.tasks import build_task
    from rnnkit.train import TrainConfig, Trainer, distributed, seed_everything

    from rnnkit.train.config import check_device

    for flag, value in (("--d-model", args.d_model), ("--layers", args.layers), ("--threads", args.threads)):
        if value is not None:
            check_positive_int(flag, value)
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise InputError(f"--max-minutes: expected a number of minutes > 0, got {args.max_minutes}")
    check_seed("--seed", args.seed)
    check_device("--device", args.device)
    if args.resume and args.overwrite:
        raise InputError("--overwrite: expected either --resume or --overwrite, got both")
    if args.resume and not args.out:
        raise InputError("--resume: expected --out DIR naming the run to continue, got no --out")
    if args.online is None and args.online_every != 1:
        raise InputError(f"--online-every: expected --online rtrl or uoro with it, got --online-every {args.online_every} alone")
    _set_threads(args.threads)
    device = distributed.init_from_env(args.device)  # joins torchrun's process group, if any
    lead = distributed.rank_and_world()[0] == 0
    task = build_task(args.task, **dict(_parse_option(o) for o in args.task_opt))
    defaults = defaults_for(task)
    _check_seq2seq_flags(args, task)
    seed_everything(args.seed)  # parameters are initialised from the run's seed
    if getattr(task, "seq2seq", False):
        model_config = _seq2seq_config(args, task, defaults)
    else:
        model_config = _model_config(args, task, defaults)
    try:
        model = _model_class(model_config)(model_config)
    except (MemoryError, RuntimeError) as error:
        if not isinstance(error, MemoryError) and "alloc" not in str(error).lower():
            raise
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(
            f"--d-model/--layers: expected a model that fits in memory, got d_model={model_config.d_model}, "
            f"layers={getattr(model_config, 'num_layers', None) or model_config.decoder_layers} "
            f"(allocation failed: {first_line})"
        ) from None
    pick = lambda name, key: getattr(args, name) if getattr(args, name) is not None else defaults[key]  # noqa: E731
    config = TrainConfig(
        steps=args.steps if args.steps is not None else (BUDGET_STEP_CAP if args.max_minutes else defaults["steps"]),
        budget_minutes=args.max_minutes if args.max_minutes or args.steps else defaults["budget_minutes"], patience=args.patience, keep_best=args.keep_best, batch_size=pick("batch_size", "batch_size"),
        seq_len=pick("seq_len", "seq_len"), lr=pick("lr", "lr"), warmup_steps=pick("warmup", "warmup"),
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, eval_every=pick("eval_every", "eval_every"),
        eval_batch_size=args.eval_batch_size, eval_max_batches=args.eval_max_batches, seed=args.seed,
        mode=args.mode, device=device, precision=_precision(args, defaults, device),
        online=args.online, online_every=args.online_every,
        progress=not args.no_progress, log_every=args.log_every,
        checkpoint_every=args.checkpoint_every, keep_last=args.keep_last, nan_policy=args.nan_policy,
        max_skips=args.max_skips, **_seq2seq_train_fields(args, task, defaults),
    )
    from rnnkit.layers.pattern import format_pattern

    layer = format_pattern(getattr(model_config, "layer", None) or model_config.encoder_layer)
    out = Path(args.out or f"runs/{args.task}-{_file_word(layer)}-{time.strftime('%Y%m%d-%H%M%S')}")
    lock = _claim_run_directory(args, out) if lead else None
    params = sum(p.numel() for p in model.parameters())
    say = print if lead else (lambda *a, **k: None)
    say(f"rnnkit train: task {task.name}, model {_describe_model(model_config)} ({params:,} parameters), "
        f"{_length_of_run(config)} of batch {config.batch_size} x {config.seq_len or task.default_seq_len or 'variable length'}, "
        f"lr {config.lr}, {config.precision}, {torch.get_num_threads()} threads{_online_words(config)}", flush=True)
    try:
        trainer = Trainer(model, task, config, out_dir=out, run_info={"argv": sys.argv[1:]}, log_dir=args.log_dir)
        if args.resume:
            restored = trainer.resume()
            say(f"resumed from {restored} at step {trainer.step}" if restored else "no checkpoint to resume: starting fresh",
                flush=True)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return trainer, say, lock


def _online_words(config) -> str:
    """``, online rtrl (update every 1 step)`` for an online run, else nothing."""
    if config.online is None:
        return ""
    return f", online {config.online} (update every {config.online_every} step{'s' if config.online_every > 1 else ''})"


def _precision(args: argparse.Namespace, defaults: dict[str, Any], device: str) -> str:
    """The run's precision: ``--precision``, else the recipe's; ``auto`` is fp32 for online training (its
    Jacobians run in the parameters' dtype)."""
    from rnnkit.train import resolve_precision

    chosen = args.precision if args.precision is not None else defaults["precision"]
    if args.online and chosen == "auto":
        return "fp32"
    return resolve_precision(chosen, device)


def _model_class(config):
    """The model class of a config: SequenceModel, Seq2Seq or PointerNetwork."""
    from rnnkit.models import ModelConfig, PointerConfig, PointerNetwork, Seq2Seq, SequenceModel

    return SequenceModel if isinstance(config, ModelConfig) else PointerNetwork if isinstance(config, PointerConfig) \
        else Seq2Seq


def _describe_model(config) -> str:
    """``stacked/lstm d_model=128 layers=1``, or the encoder, decoder and attention of an encoder-decoder."""
    if hasattr(config, "layer"):
        from rnnkit.layers.pattern import format_pattern

        return f"{config.block}/{format_pattern(config.layer)} d_model={config.d_model} layers={config.num_layers}"
    both = "bidirectional " if config.bidirectional else ""
    encoder = "set encoder" if getattr(config, "encoder", "rnn") == "set" else \
        f"{both}{config.encoder_block}/{config.encoder_layer} x{config.encoder_layers}"
    attention = f", attention {config.attention}" if hasattr(config, "attention") else ", pointer"
    return f"encoder {encoder}, decoder {config.decoder_layer} x{config.decoder_layers}{attention}, " \
           f"d_model={config.d_model}"


def _file_word(text: str) -> str:
    """``text`` as one word of a file name: a layer pattern's separators and options become ``_``."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)


#: ``--steps`` when only ``--max-minutes`` bounds the run: the budget fixes the count after a few steps.
BUDGET_STEP_CAP = 10**9


def _length_of_run(config) -> str:
    if config.budget_minutes is None:
        return f"{config.steps} steps"
    cap = "" if config.steps == BUDGET_STEP_CAP else f", at most {config.steps} steps"
    return f"{config.budget_minutes:g} minutes of steps{cap}"


def _claim_run_directory(args: argparse.Namespace, out: Path):
    """Check before training that the run can write where it is told to, that a fresh run does not
    land among another run's files (unless ``--overwrite``) nor replace a file rnnkit did not write,
    and lock ``out`` for this process. Returns the :class:`~rnnkit.train.rundir.RunLock`."""
    from rnnkit.train import CheckpointManager
    from rnnkit.train.rundir import (
        BEST_DIR, RunLock, check_fresh, check_writable_dir, claim_outputs, discard_final_files, remove_if_empty,
    )

    check_writable_dir(out, "--out")
    if not args.resume and not args.overwrite:
        check_fresh(out)
    if args.log_dir:
        check_writable_dir(args.log_dir, "--log-dir")
        if not args.resume and not args.overwrite:
            check_fresh(Path(args.log_dir), "--log-dir")  # a fresh run would rewrite the logs there
    lock = RunLock(out)
    try:
        manager = CheckpointManager(out / "checkpoints")
        if manager.root.exists() and not manager.root.is_dir():
            raise InputError(f"--out: expected {manager.root} to be a directory for checkpoints, got a file")
        foreign = manager.foreign()
        if foreign:
            raise InputError(
                f"--out: expected only rnnkit's checkpoints under the names step-<n> in {manager.root}, got "
                f"{', '.join(p.name for p in foreign)} not written by rnnkit; move them away or choose another --out"
            )
        claim_outputs(out)
        if args.overwrite:
            for _, path in manager.committed():
                manager.discard(path)
            discard_final_files(out)
            discard_final_files(out / BEST_DIR)
            remove_if_empty(out / BEST_DIR)
    except BaseException:
        lock.release()
        raise
    return lock


def _print_sample(model, task, prompt: str, length: int, temperature: float, top_k: int | None, seed: int,
                  top_p: float | None = None) -> None:
    """Print ``prompt`` and ``length`` sampled characters, each as soon as it is sampled."""
    model.eval()
    ids = task.encode(prompt)[None, :]  # (1, T0)
    tokens = model.stream(ids, length, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    first = next(tokens, None)  # the arguments are checked before anything is printed
    sys.stdout.write(prompt)
    sys.stdout.flush()
    decoder = task.stream_decoder()  # a token may end inside a character (byte-level vocabularies)
    for token in itertools.chain([] if first is None else [first], tokens):
        sys.stdout.write(decoder.decode(token))
        sys.stdout.flush()
    sys.stdout.write(decoder.decode([], final=True) + "\n")
    sys.stdout.flush()


def _load_checkpoint(directory: str, task_opts: Sequence[str] = ()):
    """Model, restored task and ``train.json`` of a saved run; ``task_opts`` (``key=value``) override
    the saved task options, never its saved state (vocabulary, tokenizer)."""
    from rnnkit.models import load_pretrained
    from rnnkit.tasks import restore_task, task_options

    path = Path(directory) / "train.json"
    if not path.is_file():
        raise InputError(f"--checkpoint: expected a directory written by `rnnkit train` with {path.name}, got {directory}")
    info = json.loads(path.read_text())
    model = load_pretrained(directory)
    description = info["task"]
    if task_opts:
        overrides = dict(_parse_option(o) for o in task_opts)
        unknown = sorted(set(overrides) - set(task_options(description["name"])))
        if unknown:
            raise InputError(f"--task-opt: expected options from {task_options(description['name'])}, got unknown {unknown}")
        description = dict(description, options={**description.get("options", {}), **overrides})
    task = restore_task(description)
    return model, task, info


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        check_positive_int("--threads", threads)
        torch.set_num_threads(threads)


def cmd_generate(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    model, task, _ = _load_checkpoint(args.checkpoint)
    if not hasattr(task, "vocab") or getattr(task, "seq2seq", False):
        raise InputError(f"--checkpoint: expected a character language model, got one trained on {task.name!r}")
    check_seed("--seed", args.seed)
    _print_sample(model, task, args.prompt, args.length, args.temperature, args.top_k, args.seed, args.top_p)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rnnkit.train import TrainConfig, Trainer, describe_metrics

    from rnnkit.train.config import check_device, device_available

    check_positive_int("--batch-size", args.batch_size)
    _set_threads(args.threads)
    if args.max_batches is not None:
        check_positive_int("--max-batches", args.max_batches)
    model, task, info = _load_checkpoint(args.checkpoint, args.task_opt)
    if args.input is not None:
        if not hasattr(task, "with_input"):
            raise InputError(f"--input: expected a model trained on a file (task sequences), got task {task.name!r}")
        task = task.with_input(args.input)
    saved = info["train"].get("device", "cpu")
    device = args.device or (saved if device_available(saved) else "cpu")
    check_device("--device", device)
    # The whole split unless --max-batches: the training run's --eval-max-batches capped its own
    # evaluations for speed and is not a property of the model.
    train = dict(info["train"], eval_batch_size=args.batch_size, eval_max_batches=None, progress=False, device=device)
    if args.beam is not None:
        if not getattr(task, "seq2seq", False):
            raise InputError(f"--beam: expected a model of a sequence-to-sequence task, got task {task.name!r}")
        check_positive_int("--beam", args.beam)
        train["eval_beam"] = args.beam
    trainer = Trainer(model, task, TrainConfig(**train))
    if args.seq_len is not None:
        check_positive_int("--seq-len", args.seq_len)
    metrics, seen = trainer.evaluate_bounded(args.split, seq_len=args.seq_len, max_batches=args.max_batches)
    part = "the whole split" if args.max_batches is None else f"the first {args.max_batches} batch(es)"
    print(f"{args.split}: {describe_metrics(metrics)} ({seen:,} sequences: {part})")
    return 0


def _translate_sources(args: argparse.Namespace):
    """The sources of ``rnnkit translate``: ``--input`` values, then the lines of ``--input-file``; stdin's
    lines when neither is given. Blank lines are skipped."""
    if args.input_file is not None:
        path = Path(args.input_file)
        if not path.is_file():
            raise InputError(f"--input-file: expected a file of sources, one per line, got {args.input_file!r} "
                             "(no such file)")
        lines = path.read_text(encoding="utf-8").splitlines()
    else:
        lines = [] if args.input else sys.stdin.read().splitlines()
    return [text.strip() for text in [*args.input, *lines] if text.strip()]


def cmd_translate(args: argparse.Namespace) -> int:
    from rnnkit.models.decoding import beam_search
    from rnnkit.train.config import check_device

    for flag, value in (("--beam", args.beam), ("--nbest", args.nbest), ("--batch-size", args.batch_size)):
        check_positive_int(flag, value)
    if args.nbest > args.beam:
        raise InputError(f"--nbest: expected at most --beam = {args.beam}, got {args.nbest}")
    check_device("--device", args.device)
    _set_threads(args.threads)
    model, task, _ = _load_checkpoint(args.checkpoint)
    if not getattr(task, "seq2seq", False):
        raise InputError(f"--checkpoint: expected a model of a sequence-to-sequence task (g2p, reverse, ...), "
                         f"got one trained on {task.name!r}")
    model = model.to(args.device).eval()
    sources = _translate_sources(args)
    if not sources:
        raise InputError("--input: expected at least one source (--input, --input-file or lines on stdin), got none")
    for lo in range(0, len(sources), args.batch_size):
        chunk = sources[lo:lo + args.batch_size]
        src, lengths = task.source_batch(chunk)
        beams = beam_search(model, src.to(args.device), lengths.to(args.device), beam_size=args.beam,
                            n_best=args.nbest, alpha=args.alpha, **task.decode_options(lengths))
        for i, text in enumerate(chunk):
            for k in range(args.nbest):
                if not torch.isfinite(beams.scores[i, k]):
                    break  # fewer distinct hypotheses than asked for
                output = task.decode_target(beams.tokens[i, k, : int(beams.lengths[i, k])].tolist())
                print(f"{text}\t{output}\t{float(beams.scores[i, k]):.4f}", flush=True)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from rnnkit.atomic import write_text_atomic
    from rnnkit.train.config import check_device

    check_positive_int("--batch-size", args.batch_size)
    check_device("--device", args.device)
    model, task, _ = _load_checkpoint(args.checkpoint)
    if not hasattr(task, "predict"):
        raise InputError(f"--checkpoint: expected a model trained on a file (task sequences), got task {task.name!r}")
    table = task.predict(model.to(args.device), args.input, batch_size=args.batch_size, device=args.device)
    write_text_atomic(args.out, table.to_csv(index=False))
    print(f"{len(table):,} prediction row(s) for {table['id'].nunique():,} sequence(s) written to {args.out}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from rnnkit import layers
    from rnnkit.tasks import task_class, task_names

    print("layers:")
    modes = {name: ", ".join(layers.spec(name).modes) for name in layers.names()}
    width = max(map(len, modes.values()), default=0)
    for name in layers.names():
        print(f"  {name:<14} modes: {modes[name]:<{width}} {layers.spec(name).description}")
    print("tasks:")
    for name in task_names():
        print(f"  {name:<14} {task_class(name).description}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from rnnkit.models.export import export_model, step_exportable

    model, task, info = _load_checkpoint(args.checkpoint)
    if getattr(task, "seq2seq", False):
        raise InputError(f"--checkpoint: expected a SequenceModel to export, got an encoder-decoder model of task "
                         f"{task.name!r}")
    what = args.what or ("both" if step_exportable(model) else "forward")
    seq_len = args.seq_len or info["train"].get("seq_len") or task.default_seq_len
    manifest = export_model(model, args.out, format=args.format, what=what, seq_len=seq_len)
    for name, artefact in manifest["artefacts"].items():
        mode = f" (mode {artefact['mode']}, T = {artefact['seq_len']})" if artefact["what"] == "forward" else ""
        print(f"{Path(args.out) / name}{mode}")
    print(f"{Path(args.out) / 'manifest.json'}: inputs, outputs and the state's layout")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # `--task my_module:MyTask` names a module in the user's working directory, as `python -m` would find it;
    # appended, so it never shadows an installed module.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    from rnnkit.bench.commands import cmd_bench, cmd_report

    commands = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "predict": cmd_predict, "list": cmd_list,
                "bench": cmd_bench, "report": cmd_report, "export": cmd_export, "translate": cmd_translate}
    try:
        return commands[args.command](args)
    except (InputError, NonFiniteError) as error:
        print(f"rnnkit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = error.filename or "a file of the run"
        print(f"rnnkit {args.command}: error: {where}: expected room to write it, got a full disk "
              f"({error.strerror or error})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
