"""``rnnkit`` command line: train, eval, generate, list.

Examples::

    rnnkit train                                   # the default Shakespeare character model (~5 min on 2 cores)
    rnnkit train --task adding --model gru --steps 2000
    rnnkit generate --checkpoint runs/shakespeare-lstm --prompt "ROMEO:"
    rnnkit eval --checkpoint runs/shakespeare-lstm --split test
    rnnkit list
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from rnnkit.errors import InputError

#: The default character model for ``rnnkit train`` on Shakespeare: the best of the configurations
#: measured for a ~5-minute budget on 2 CPU cores (README "What the default run reaches"). At this
#: budget the run is compute-bound: width 256 sees ~3x the characters of width 512 in the same time.
SHAKESPEARE_DEFAULTS: dict[str, Any] = {
    "model": "lstm", "block": "stacked", "d_model": 256, "layers": 1, "steps": 2000,
    "batch_size": 32, "seq_len": 128, "lr": 6e-3, "warmup": 50, "eval_every": 0,
}
#: Defaults for every other task.
GENERIC_DEFAULTS: dict[str, Any] = {
    "model": "lstm", "block": "stacked", "d_model": 128, "layers": 1, "steps": 1000,
    "batch_size": 32, "seq_len": None, "lr": 3e-3, "warmup": 100, "eval_every": 0,
}


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
    train.add_argument("--model", help="registered layer used in every block (default lstm)")
    train.add_argument("--block", choices=["stacked", "residual"], help="block type")
    train.add_argument("--d-model", type=int, help="model width")
    train.add_argument("--layers", type=int, help="number of layers / blocks")
    train.add_argument("--layer-opt", action="append", default=[], metavar="KEY=VALUE", help="layer option, repeatable")
    train.add_argument("--bidirectional", action="store_true", help="bidirectional layers (not for language models)")
    train.add_argument("--dropout", type=float, default=0.0)
    train.add_argument("--tie-embeddings", action="store_true")
    train.add_argument("--pooling", choices=["last", "mean"], default="last", help="sequence heads: pooling")
    train.add_argument("--steps", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--seq-len", type=int, help="training window / sequence length (default: the task's)")
    train.add_argument("--lr", type=float)
    train.add_argument("--warmup", type=int)
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--grad-clip", type=float, default=1.0)
    train.add_argument("--eval-every", type=int)
    train.add_argument("--eval-batch-size", type=int, default=64)
    train.add_argument("--mode", default="auto", help="layer mode for training (default auto)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cpu")
    train.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    train.add_argument("--out", help="checkpoint directory (default runs/<task>-<model>-<time>)")
    train.add_argument("--sample-length", type=int, default=300, help="characters sampled after training (text tasks)")
    train.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")

    gen = sub.add_parser("generate", help="sample text from a trained character model")
    gen.add_argument("--checkpoint", required=True, help="directory written by `rnnkit train`")
    gen.add_argument("--prompt", default="\n")
    gen.add_argument("--length", type=int, default=500, help="characters to generate")
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--seed", type=int, default=0)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on a split")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--split", default="test", choices=["val", "test"])
    ev.add_argument("--batch-size", type=int, default=64)

    sub.add_parser("list", help="registered layers (with modes) and tasks")
    return parser


def _model_config(args: argparse.Namespace, task, defaults: dict[str, Any]):
    from rnnkit.models import ModelConfig

    head = {"per_step": "lm", "classify": "classify", "regress": "regress"}[task.target]
    tokens = task.input_kind == "tokens"
    return ModelConfig(
        vocab_size=task.vocab_size if tokens else None,
        d_input=None if tokens else task.d_input,
        d_model=args.d_model or defaults["d_model"],
        block=args.block or defaults["block"],
        layer=args.model or defaults["model"],
        num_layers=args.layers or defaults["layers"],
        layer_options=dict(_parse_option(o) for o in args.layer_opt),
        bidirectional=args.bidirectional,
        dropout=args.dropout,
        head=head,
        n_outputs=task.d_output if head == "regress" else task.n_classes,
        pooling=args.pooling,
        tie_embeddings=args.tie_embeddings,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from rnnkit.models import SequenceModel
    from rnnkit.tasks import build_task
    from rnnkit.train import TrainConfig, Trainer, describe_metrics, seed_everything

    if args.threads:
        torch.set_num_threads(args.threads)
    task = build_task(args.task, **dict(_parse_option(o) for o in args.task_opt))
    defaults = SHAKESPEARE_DEFAULTS if args.task == "shakespeare" else GENERIC_DEFAULTS
    seed_everything(args.seed)  # parameters are initialised from the run's seed
    model_config = _model_config(args, task, defaults)
    model = SequenceModel(model_config)
    pick = lambda name, key: getattr(args, name) if getattr(args, name) is not None else defaults[key]  # noqa: E731
    config = TrainConfig(
        steps=pick("steps", "steps"), batch_size=pick("batch_size", "batch_size"),
        seq_len=pick("seq_len", "seq_len"), lr=pick("lr", "lr"), warmup_steps=pick("warmup", "warmup"),
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, eval_every=pick("eval_every", "eval_every"),
        eval_batch_size=args.eval_batch_size, seed=args.seed, mode=args.mode, device=args.device,
        progress=not args.no_progress,
    )
    out = Path(args.out or f"runs/{args.task}-{model_config.layer}-{time.strftime('%Y%m%d-%H%M%S')}")
    params = sum(p.numel() for p in model.parameters())
    print(f"rnnkit train: task {task.name}, model {model_config.block}/{model_config.layer} "
          f"d_model={model_config.d_model} layers={model_config.num_layers} ({params:,} parameters), "
          f"{config.steps} steps of batch {config.batch_size} x {config.seq_len or task.default_seq_len}, "
          f"lr {config.lr}, {torch.get_num_threads()} threads", flush=True)
    trainer = Trainer(model, task, config, out_dir=out, run_info={"argv": sys.argv[1:]})
    result = trainer.fit()
    print(f"done in {result['seconds']:.0f} s ({result['tokens_per_second']:,.0f} tokens/s); "
          f"val: {describe_metrics(result['val'])}")
    print(f"checkpoint: {out}")
    if task.input_kind == "tokens" and task.target == "per_step" and hasattr(task, "vocab") and args.sample_length > 0:
        print("sample:")
        print(_sample(model, task, "\n", args.sample_length, 0.8, None, args.seed))
    return 0


def _sample(model, task, prompt: str, length: int, temperature: float, top_k: int | None, seed: int) -> str:
    model.eval()
    ids = task.encode(prompt)[None, :]  # (1, T0)
    pieces = [prompt]
    for token in model.stream(ids, length, temperature=temperature, top_k=top_k, seed=seed):
        pieces.append(task.decode(token))
    return "".join(pieces)


def _load_checkpoint(directory: str):
    from rnnkit.models import SequenceModel
    from rnnkit.tasks import build_task

    path = Path(directory) / "train.json"
    if not path.is_file():
        raise InputError(f"--checkpoint: expected a directory written by `rnnkit train` with {path.name}, got {directory}")
    info = json.loads(path.read_text())
    model = SequenceModel.from_pretrained(directory)
    task = build_task(info["task"]["name"], **info["task"].get("options", {}))
    return model, task, info


def cmd_generate(args: argparse.Namespace) -> int:
    model, task, _ = _load_checkpoint(args.checkpoint)
    if not hasattr(task, "vocab"):
        raise InputError(f"--checkpoint: expected a character language model, got one trained on {task.name!r}")
    print(_sample(model, task, args.prompt, args.length, args.temperature, args.top_k, args.seed))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rnnkit.train import TrainConfig, Trainer, describe_metrics

    model, task, info = _load_checkpoint(args.checkpoint)
    train = dict(info["train"], eval_batch_size=args.batch_size, progress=False)
    trainer = Trainer(model, task, TrainConfig(**train))
    print(f"{args.split}: {describe_metrics(trainer.evaluate(args.split, max_batches=None))}")
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "list": cmd_list}
    try:
        return commands[args.command](args)
    except InputError as error:
        print(f"rnnkit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
