"""The command line: list, train, eval, generate, and clear errors."""

import json
import re

import pytest
import torch

from rnnkit.cli import main


def test_list_shows_layers_with_modes_and_tasks(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "lstm" in out and "recurrent, newton, fused" in out and "shakespeare" in out


def test_train_eval_on_a_synthetic_task(tmp_path, capsys):
    out_dir = tmp_path / "run"
    argv = ["train", "--task", "parity", "--model", "gru", "--d-model", "8", "--steps", "3", "--batch-size", "4",
            "--seq-len", "10", "--no-progress", "--out", str(out_dir), "--task-opt", "eval_examples=16"]
    assert main(argv) == 0
    assert "val: loss" in capsys.readouterr().out
    info = json.loads((out_dir / "train.json").read_text())
    assert info["task"] == {"name": "parity", "options": {"eval_examples": 16, "variable_length": True}, "state": {}}
    assert main(["eval", "--checkpoint", str(out_dir), "--split", "test"]) == 0
    assert "test: loss" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(out_dir)]) == 2  # not a character model
    assert "character language model" in capsys.readouterr().err


def test_train_in_newton_mode(tmp_path, capsys):
    """``--mode newton`` trains a nonlinear cell with Newton's method over the sequence."""
    argv = ["train", "--task", "parity", "--model", "paragru", "--d-model", "8", "--steps", "2", "--batch-size", "4",
            "--seq-len", "10", "--no-progress", "--out", str(tmp_path / "run"), "--mode", "newton",
            "--task-opt", "eval_examples=8"]
    assert main(argv) == 0
    assert "val: loss" in capsys.readouterr().out


def test_train_and_generate_shakespeare(tmp_path, capsys):
    out_dir = tmp_path / "lm"
    argv = ["train", "--d-model", "16", "--steps", "2", "--batch-size", "4", "--seq-len", "16", "--no-progress",
            "--out", str(out_dir), "--sample-length", "20", "--layer-opt", "peephole=True"]
    assert main(argv) == 0
    assert "bpc" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(out_dir), "--prompt", "ROMEO:", "--length", "30"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text.rstrip("\n")) >= 30


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "--task", "nope"], "task"),
        (["train", "--task", "adding", "--model", "nope"], "layer"),
        (["train", "--task", "adding", "--layer-opt", "bogus"], "key=value"),
        (["eval", "--checkpoint", "/nonexistent"], "checkpoint"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, match, capsys):
    assert main(argv) == 2
    assert match in capsys.readouterr().err



@pytest.mark.parametrize(
    "extra, expected",
    [
        ([], {"hidden_size": 512}),  # the default model: wide state, narrow embedding
        (["--d-model", "16"], {}),  # choosing the width, model or block drops the default model's options
        (["--model", "gru"], {}),
        (["--block", "residual"], {}),
        (["--model", "gru", "--layer-opt", "hidden_size=24"], {"hidden_size": 24}),
        (["--layer-opt", "peephole=True"], {"hidden_size": 512, "peephole": True}),
    ],
)
def test_default_layer_options_belong_to_the_default_model(extra, expected):
    from rnnkit.cli import LANGUAGE_MODEL_DEFAULTS, _model_config, build_parser
    from rnnkit.tasks import build_task

    args = build_parser().parse_args(["train", *extra])
    config = _model_config(args, build_task("shakespeare"), LANGUAGE_MODEL_DEFAULTS)
    assert config.layer_options == expected


def test_eval_scores_the_whole_split_unless_told_and_says_how_much(tmp_path, capsys):
    out_dir = tmp_path / "run"
    argv = ["train", "--task", "parity", "--model", "gru", "--d-model", "8", "--steps", "2", "--batch-size", "4",
            "--seq-len", "10", "--no-progress", "--out", str(out_dir), "--task-opt", "eval_examples=16",
            "--eval-max-batches", "1", "--eval-batch-size", "4"]
    assert main(argv) == 0
    capsys.readouterr()
    # Training capped its evaluations at one batch; eval does not inherit that cap.
    assert main(["eval", "--checkpoint", str(out_dir), "--split", "val", "--batch-size", "4"]) == 0
    assert "(16 sequences: the whole split)" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(out_dir), "--split", "val", "--batch-size", "4", "--max-batches", "2"]) == 0
    assert "(8 sequences: the first 2 batch(es))" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(out_dir), "--max-batches", "0"]) == 2
    assert "--max-batches: expected an int >= 1, got 0" in capsys.readouterr().err


def _quick_train(out, *extra):
    """A two-step run on a small task (``--task adding`` with 4 evaluation examples, unless ``extra`` names one)."""
    task = [] if "--task" in extra else ["--task", "adding", "--task-opt", "eval_examples=4"]
    return ["train", *task, "--model", "gru", "--d-model", "4", "--steps", "2", "--batch-size", "2", "--seq-len", "6",
            "--no-progress", "--out", str(out), *extra]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--d-model", "0"], "--d-model: expected an int >= 1, got 0"),  # not silently the default width
        (["--layers", "0"], "--layers: expected an int >= 1, got 0"),
        (["--threads", "-1"], "--threads: expected an int >= 1, got -1"),
        (["--seed", str(2**70)], "--seed: expected an int in [0, 2**64 - 1], got 1180591620717411303424"),
        (["--d-model", str(10**7)], "--d-model/--layers: expected a model that fits in memory, got d_model=10000000"),
        (["--task", "copy", "--bidirectional"], "bidirectional: expected False for task 'copy'"),
        (["--task", "shakespeare", "--seq-len", "10000000"], "expected seq_len at most"),
    ],
    ids=["d-model-0", "layers-0", "threads", "seed", "absurd-size", "bidirectional-lm", "seq-len"],
)
def test_bad_training_arguments_are_one_line_errors(tmp_path, capsys, extra, needle):
    assert main(_quick_train(tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnkit train: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert not re.search(r"(?<![\w*])-\d", err.replace("--threads: expected an int >= 1, got -1", "")), err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_on_a_cpu_only_machine_is_a_one_line_error(tmp_path, capsys):
    assert main(_quick_train(tmp_path / "run", "--device", "cuda")) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnkit train: error: --device: expected a device this machine has, got 'cuda'"), err
    assert err.count("\n") == 1


def test_a_non_finite_loss_is_a_one_line_error_naming_the_step_and_the_remedy(tmp_path, capsys, monkeypatch):
    import rnnkit.tasks
    from tests.train.test_nan_policy import Poisoned

    build = rnnkit.tasks.build_task
    monkeypatch.setattr(rnnkit.tasks, "build_task", lambda *a, **k: Poisoned(build(*a, **k), {1}))
    assert main(_quick_train(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnkit train: error: step 1: non-finite loss (nan)") and err.count("\n") == 1, err
    assert "--lr" in err and "--nan-policy skip" in err and "Traceback" not in err


def test_a_second_ctrl_c_during_set_up_stops_at_once(tmp_path, capsys, monkeypatch):
    import os
    import signal

    import rnnkit.tasks

    build = rnnkit.tasks.build_task

    def build_while_interrupted_twice(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # held back: honoured after the first step
        os.kill(os.getpid(), signal.SIGINT)  # the second one stops now
        return build(*args, **kwargs)

    monkeypatch.setattr(rnnkit.tasks, "build_task", build_while_interrupted_twice)
    assert main(_quick_train(tmp_path / "run")) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # stopped before it touched the run directory


def test_generate_prints_each_character_as_it_is_sampled(tmp_path, capsys, monkeypatch):
    import io
    import sys

    from rnnkit.models import SequenceModel

    out_dir = tmp_path / "lm"
    assert main(["train", "--d-model", "8", "--steps", "1", "--batch-size", "2", "--seq-len", "8", "--no-progress",
                 "--out", str(out_dir), "--sample-length", "0"]) == 0
    screen = io.StringIO()
    seen_before_each_token = []
    stream = SequenceModel.stream

    def watched(self, *args, **kwargs):
        for token in stream(self, *args, **kwargs):
            seen_before_each_token.append(screen.getvalue())
            yield token

    monkeypatch.setattr(SequenceModel, "stream", watched)
    monkeypatch.setattr(sys, "stdout", screen)
    assert main(["generate", "--checkpoint", str(out_dir), "--prompt", "AB", "--length", "5"]) == 0
    # Token k is sampled after the prompt and tokens 1 .. k-2 are on the screen (the first token is
    # drawn before anything prints, so that bad arguments fail before any output).
    assert [len(text) for text in seen_before_each_token] == [0, 3, 4, 5, 6]
    assert screen.getvalue().startswith("AB") and len(screen.getvalue()) == 2 + 5 + 1
    assert main(["generate", "--checkpoint", str(out_dir), "--seed", str(2**64)]) == 2
