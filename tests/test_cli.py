"""The command line: list, train, eval, generate, and clear errors."""

import json

import pytest

from rnnkit.cli import main


def test_list_shows_layers_with_modes_and_tasks(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "lstm" in out and "recurrent, fused" in out and "shakespeare" in out


def test_train_eval_on_a_synthetic_task(tmp_path, capsys):
    out_dir = tmp_path / "run"
    argv = ["train", "--task", "parity", "--model", "gru", "--d-model", "8", "--steps", "3", "--batch-size", "4",
            "--seq-len", "10", "--no-progress", "--out", str(out_dir), "--task-opt", "eval_examples=16"]
    assert main(argv) == 0
    assert "val: loss" in capsys.readouterr().out
    info = json.loads((out_dir / "train.json").read_text())
    assert info["task"] == {"name": "parity", "options": {"eval_examples": 16, "variable_length": True}}
    assert main(["eval", "--checkpoint", str(out_dir), "--split", "test"]) == 0
    assert "test: loss" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(out_dir)]) == 2  # not a character model
    assert "character language model" in capsys.readouterr().err


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
    from rnnkit.cli import SHAKESPEARE_DEFAULTS, _model_config, build_parser
    from rnnkit.tasks import build_task

    args = build_parser().parse_args(["train", *extra])
    config = _model_config(args, build_task("shakespeare"), SHAKESPEARE_DEFAULTS)
    assert config.layer_options == expected
