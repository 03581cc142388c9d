"""``rnnkit`` command line: train, eval, generate, predict, list, export.

Examples::

    rnnkit train                                   # the default Shakespeare character model
    rnnkit train --task adding --model gru --steps 2000
    rnnkit train --out runs/lm --checkpoint-every 200 --log-dir runs/lm/logs --resume   # survives kills
    torchrun --nproc_per_node=2 -m rnnkit train --task parity --batch-size 64          # data parallel
    rnnkit generate --checkpoint runs/shakespeare-lstm --prompt "ROMEO:"
    rnnkit eval --checkpoint runs/shakespeare-lstm --split test
    rnnkit train --task sequences --task-opt path=data.csv --task-opt label=y --out runs/mine
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
    "layer_options": {"hidden_size": 512}, "precision": "auto", "budget_minutes": 4.5,
}
#: Defaults for every other task.
GENERIC_DEFAULTS: dict[str, Any] = {
    "model": "lstm", "block": "stacked", "d_model": 128, "layers": 1, "steps": 1000,
    "batch_size": 32, "seq_len": None, "lr": 3e-3, "warmup": 100, "eval_every": 0,
    "layer_options": {}, "precision": "auto", "budget_minutes": None,
}


def defaults_for(task) -> dict[str, Any]:
    """The recipe ``rnnkit train`` starts from: the tuned character-LM recipe for every language-model task
    (tokens in, the next token predicted at every step, streamed in windows), the generic one otherwise."""
    language_model = task.input_kind == "tokens" and task.target == "per_step" and task.streaming
    return LANGUAGE_MODEL_DEFAULTS if language_model else GENERIC_DEFAULTS


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
    train.add_argument("--bidirectional", action="store_true", help="bidirectional layers (not for language models)")
    train.add_argument("--dropout", type=float, default=0.0)
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

    pr = sub.add_parser("predict", help="predictions of a model trained on a table for a new file")
    pr.add_argument("--checkpoint", required=True, help="directory written by `rnnkit train --task sequences`")
    pr.add_argument("--input", required=True, help="a .csv, .parquet or .npz file laid out like the training file "
                                                   "(labels may be missing)")
    pr.add_argument("--out", required=True, help="the predictions, as CSV")
    pr.add_argument("--batch-size", type=int, default=64)
    pr.add_argument("--device", default="cpu")

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


def _layer_options(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    """``--layer-opt`` values over the defaults' layer options; those defaults belong to the default
    model, so they are dropped as soon as the model, block or width is chosen on the command line."""
    chosen = args.model is not None or args.block is not None or args.d_model is not None
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
        dropout=args.dropout,
        pooling=args.pooling,
        tie_embeddings=args.tie_embeddings,
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
    if task.input_kind == "tokens" and task.target == "per_step" and hasattr(task, "vocab") and args.sample_length > 0:
        print("sample:")
        _print_sample(model, task, "\n", args.sample_length, 0.8, None, args.seed)
    return 0


def _prepare_training(args: argparse.Namespace):
    """Task, model, config and Trainer of ``rnnkit train`` (resumed with ``--resume``), and a ``say``
    that prints on rank 0 only."""
    from rnnkit.models import SequenceModel
    from rnnkit.tasks import build_task
    from rnnkit.train import TrainConfig, Trainer, distributed, resolve_precision, seed_everything

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
    _set_threads(args.threads)
    device = distributed.init_from_env(args.device)  # joins torchrun's process group, if any
    lead = distributed.rank_and_world()[0] == 0
    task = build_task(args.task, **dict(_parse_option(o) for o in args.task_opt))
    defaults = defaults_for(task)
    seed_everything(args.seed)  # parameters are initialised from the run's seed
    model_config = _model_config(args, task, defaults)
    try:
        model = SequenceModel(model_config)
    except (MemoryError, RuntimeError) as error:
        if not isinstance(error, MemoryError) and "alloc" not in str(error).lower():
            raise
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(
            f"--d-model/--layers: expected a model that fits in memory, got d_model={model_config.d_model}, "
            f"layers={model_config.num_layers} (allocation failed: {first_line})"
        ) from None
    pick = lambda name, key: getattr(args, name) if getattr(args, name) is not None else defaults[key]  # noqa: E731
    config = TrainConfig(
        steps=args.steps if args.steps is not None else (BUDGET_STEP_CAP if args.max_minutes else defaults["steps"]),
        budget_minutes=args.max_minutes if args.max_minutes or args.steps else defaults["budget_minutes"], patience=args.patience, keep_best=args.keep_best, batch_size=pick("batch_size", "batch_size"),
        seq_len=pick("seq_len", "seq_len"), lr=pick("lr", "lr"), warmup_steps=pick("warmup", "warmup"),
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, eval_every=pick("eval_every", "eval_every"),
        eval_batch_size=args.eval_batch_size, eval_max_batches=args.eval_max_batches, seed=args.seed,
        mode=args.mode, device=device, precision=resolve_precision(pick("precision", "precision"), device),
        progress=not args.no_progress, log_every=args.log_every,
        checkpoint_every=args.checkpoint_every, keep_last=args.keep_last, nan_policy=args.nan_policy,
        max_skips=args.max_skips,
    )
    from rnnkit.layers.pattern import format_pattern

    label = format_pattern(model_config.layer)
    out = Path(args.out or f"runs/{args.task}-{_file_word(label)}-{time.strftime('%Y%m%d-%H%M%S')}")
    lock = _claim_run_directory(args, out) if lead else None
    params = sum(p.numel() for p in model.parameters())
    say = print if lead else (lambda *a, **k: None)
    say(f"rnnkit train: task {task.name}, model {model_config.block}/{label} "
        f"d_model={model_config.d_model} layers={model_config.num_layers} ({params:,} parameters), "
        f"{_length_of_run(config)} of batch {config.batch_size} x {config.seq_len or task.default_seq_len or 'variable length'}, "
        f"lr {config.lr}, {config.precision}, {torch.get_num_threads()} threads", flush=True)
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
    from rnnkit.models import SequenceModel
    from rnnkit.tasks import restore_task, task_options

    path = Path(directory) / "train.json"
    if not path.is_file():
        raise InputError(f"--checkpoint: expected a directory written by `rnnkit train` with {path.name}, got {directory}")
    info = json.loads(path.read_text())
    model = SequenceModel.from_pretrained(directory)
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
    if not hasattr(task, "vocab"):
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
    trainer = Trainer(model, task, TrainConfig(**train))
    metrics, seen = trainer.evaluate_bounded(args.split, max_batches=args.max_batches)
    part = "the whole split" if args.max_batches is None else f"the first {args.max_batches} batch(es)"
    print(f"{args.split}: {describe_metrics(metrics)} ({seen:,} sequences: {part})")
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
    from rnnkit.models.export import export_model

    model, task, info = _load_checkpoint(args.checkpoint)
    steppable = model.config.head == "lm" and model.body.causal
    what = args.what or ("both" if steppable else "forward")
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
                "bench": cmd_bench, "report": cmd_report, "export": cmd_export}
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
