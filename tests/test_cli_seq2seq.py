"""The command line on sequence-to-sequence tasks: train (encoder, decoder, attention, sizes), eval
with PER/WER, translate (beam search, n-best lists with scores, inputs from flags, a file or stdin),
the G2P recipe, bench tasks, and one-line errors."""

from __future__ import annotations

import io
import json
import sys

import pytest

from rnnkit.cli import G2P_DEFAULTS, SEQ2SEQ_DEFAULTS, _seq2seq_config, build_parser, defaults_for, main
from rnnkit.models import PointerConfig, Seq2SeqConfig, load_pretrained
from rnnkit.tasks import build_task

from tests.train.seq2seq_utils import g2p_options, write_dictionary

TINY = ["--d-model", "8", "--steps", "3", "--batch-size", "4", "--no-progress", "--warmup", "1"]


@pytest.fixture(scope="module")
def g2p_run(tmp_path_factory):
    """A G2P model (GRU encoder both ways, LSTM decoder, Bahdanau attention) trained for 3 steps on a
    small dictionary."""
    root = tmp_path_factory.mktemp("g2p")
    dictionary = write_dictionary(root / "small.dict")
    out = root / "run"
    argv = ["train", "--task", "g2p", *g2p_options(dictionary), "--encoder", "gru", "--decoder", "lstm",
            "--attention", "bahdanau", "--bidirectional-encoder", "--encoder-layers", "2", "--label-smoothing", "0.1",
            "--eval-beam", "2", *TINY, "--out", str(out)]
    assert main(argv) == 0
    return out


def test_train_g2p_writes_a_seq2seq_model_with_the_chosen_parts(g2p_run, capsys):
    model = load_pretrained(g2p_run)
    c = model.config
    assert isinstance(c, Seq2SeqConfig)
    assert (c.encoder_layer, c.decoder_layer, c.attention, c.bidirectional, c.encoder_layers, c.decoder_layers) == \
        ("gru", "lstm", "additive", True, 2, 1)
    info = json.loads((g2p_run / "train.json").read_text())
    assert info["train"]["label_smoothing"] == 0.1 and info["train"]["eval_beam"] == 2
    assert set(info["metrics"]["val"]) == {"loss", "per", "wer"}


def test_eval_reports_per_and_wer(g2p_run, capsys):
    assert main(["eval", "--checkpoint", str(g2p_run), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("test: loss ") and ", per " in out and ", wer " in out and "the whole split" in out
    assert main(["eval", "--checkpoint", str(g2p_run), "--beam", "3", "--max-batches", "1"]) == 0
    assert ", wer " in capsys.readouterr().out


def _lines(capsys):
    return [line.split("\t") for line in capsys.readouterr().out.splitlines()]


def test_translate_prints_n_best_lists_with_scores(g2p_run, tmp_path, capsys, monkeypatch):
    assert main(["translate", "--checkpoint", str(g2p_run), "--input", "bad", "--input", "hello", "--beam", "3",
                 "--nbest", "2"]) == 0
    lines = _lines(capsys)
    assert [line[0] for line in lines] == ["bad", "bad", "hello", "hello"]
    for word in ("bad", "hello"):
        scores = [float(line[2]) for line in lines if line[0] == word]
        assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)
    phonemes = set(G2P_PHONEMES)
    assert all(set(line[1].split()) <= phonemes for line in lines)
    (tmp_path / "words.txt").write_text("cab\n\nhello\n")
    assert main(["translate", "--checkpoint", str(g2p_run), "--input-file", str(tmp_path / "words.txt"),
                 "--beam", "1"]) == 0
    assert [line[0] for line in _lines(capsys)] == ["cab", "hello"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("dab\nheel\n"))
    assert main(["translate", "--checkpoint", str(g2p_run), "--batch-size", "1"]) == 0
    assert [line[0] for line in _lines(capsys)] == ["dab", "heel"]


G2P_PHONEMES = ("AE", "B", "K", "D", "EH", "HH", "L", "OW", "AH")


@pytest.mark.parametrize("argv, needle", [
    (["--nbest", "3", "--beam", "2"], "--nbest: expected at most --beam = 2, got 3"),
    (["--beam", "0"], "--beam: expected an int >= 1, got 0"),
    (["--input", "x1"], "text: expected symbols from"),
    (["--input-file", "/nonexistent/words.txt"], "--input-file: expected a file of sources"),
])
def test_translate_errors_are_one_line(g2p_run, capsys, argv, needle):
    assert main(["translate", "--checkpoint", str(g2p_run), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnkit translate: error: ") and err.count("\n") == 1 and needle in err, err


def test_pointer_and_reverse_tasks_train_from_the_command_line(tmp_path, capsys):
    hull = tmp_path / "hull"
    assert main(["train", "--task", "convex_hull", "--task-opt", "max_n=6", "--task-opt", "eval_examples=8",
                 "--pointer-encoder", "set", "--process-steps", "2", "--model", "gru", *TINY, "--out", str(hull)]) == 0
    assert "area_coverage" in capsys.readouterr().out
    config = load_pretrained(hull).config
    assert isinstance(config, PointerConfig) and config.encoder == "set" and config.process_steps == 2
    assert config.mask_chosen  # the default
    assert main(["translate", "--checkpoint", str(hull), "--input", "0,0 1,0 1,1 0,1 0.5,0.5", "--beam", "2"]) == 0
    assert capsys.readouterr().out.startswith("0,0 1,0 1,1 0,1 0.5,0.5\t")
    reverse = tmp_path / "reverse"
    assert main(["train", "--task", "reverse", "--task-opt", "max_len=4", "--task-opt", "eval_examples=8",
                 "--model", "mingru", "--attention", "multihead", "--num-heads", "2", "--input-feeding",
                 "--scheduled-sampling", "inverse_sigmoid", "--sampling-k", "5", *TINY, "--out", str(reverse)]) == 0
    config = load_pretrained(reverse).config
    assert (config.encoder_layer, config.attention, config.num_heads, config.input_feeding) == \
        ("mingru", "multihead", 2, True)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(reverse), "--seq-len", "8"]) == 0  # twice the longest training source
    assert capsys.readouterr().out.startswith("test: loss ")
    assert main(["export", "--checkpoint", str(reverse), "--out", str(tmp_path / "exported")]) == 2
    assert "expected a SequenceModel to export" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--task", "adding", "--attention", "dot"], "--attention: expected a sequence-to-sequence task"),
    (["--task", "adding", "--label-smoothing", "0.1"], "--label-smoothing: expected a sequence-to-sequence task"),
    (["--task", "reverse", "--pointer-encoder", "set"], "--pointer-encoder: expected a pointer task"),
    (["--task", "reverse", "--no-mask-chosen"], "--mask-chosen: expected a pointer task"),
    (["--task", "sort", "--attention", "dot"], "--attention: expected a token task"),
    (["--task", "reverse", "--decoder", "nope"], "decoder_layer"),
    (["--task", "reverse", "--attention", "dot", "--bidirectional-encoder"], "'dot' expected the decoder output width"),
    (["--task", "reverse", "--label-smoothing", "1.5"], "label_smoothing: expected a number in [0, 1)"),
])
def test_bad_seq2seq_training_arguments_are_one_line_errors(tmp_path, capsys, argv, needle):
    assert main(["train", *argv, *TINY, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnkit train: error: ") and err.count("\n") == 1 and needle in err, err


def test_translate_needs_a_seq2seq_checkpoint(tmp_path, capsys):
    out = tmp_path / "adding"
    assert main(["train", "--task", "adding", "--task-opt", "eval_examples=4", "--seq-len", "6", *TINY,
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["translate", "--checkpoint", str(out), "--input", "x"]) == 2
    assert "expected a model of a sequence-to-sequence task" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(out), "--beam", "2"]) == 2
    assert "--beam: expected a model of a sequence-to-sequence task" in capsys.readouterr().err


def test_the_g2p_recipe_is_the_default_of_g2p(tmp_path):
    task = build_task("g2p", path=str(write_dictionary(tmp_path / "small.dict")), val_fraction=0.2, test_fraction=0.2)
    assert defaults_for(task) is G2P_DEFAULTS and defaults_for(build_task("reverse")) is SEQ2SEQ_DEFAULTS
    config = _seq2seq_config(build_parser().parse_args(["train", "--task", "g2p"]), task, G2P_DEFAULTS)
    assert (config.encoder_layer, config.decoder_layer, config.bidirectional, config.attention, config.d_model) == \
        ("lstm", "lstm", True, "additive", G2P_DEFAULTS["d_model"])
    chosen = _seq2seq_config(build_parser().parse_args(["train", "--no-bidirectional-encoder", "--attention", "luong",
                                                        "--model", "gru", "--decoder-opt", "hidden_size=8"]),
                             task, G2P_DEFAULTS)
    assert (chosen.bidirectional, chosen.attention, chosen.encoder_layer, chosen.decoder_options) == \
        (False, "general", "gru", {"hidden_size": 8})


def test_bench_tasks_runs_seq2seq_cells(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    assert main(["bench", "tasks", "--models", "gru", "--tasks", "reverse:max_len=4,sort:min_n=2:max_n=4", "--steps", "2",
                 "--max-seconds", "5", "--eval-seconds", "2", "--no-progress", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["task"], r["status"], r["metric"]) for r in rows] == [("reverse", "ok", "accuracy"),
                                                                     ("sort", "ok", "accuracy")]
    assert all(set(r["test"]) == {"4", "8"} for r in rows)
