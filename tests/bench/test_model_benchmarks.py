"""The model benchmarks' own pieces: the baselines they build decode as they train, a
configuration that fails or overruns its time cap becomes a row, not a crash, and the LSTM-variant
grid (``benchmarks/lstm_variants.py``) covers Greff et al.'s variants and resumes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_close

ROOT = Path(__file__).resolve().parents[2]


def load(script: str):
    """Import ``benchmarks/<script>.py`` as a module."""
    if script in sys.modules:
        return sys.modules[script]
    spec = importlib.util.spec_from_file_location(script, ROOT / "benchmarks" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[script] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["torch.nn.LSTM stack", "SDPA transformer"])
def test_baselines_prefill_then_step_equals_the_whole_sequence(name):
    model_speed = load("model_speed")
    torch.manual_seed(0)
    model = model_speed.build_model(name, 32, 12).eval()
    ids = torch.randint(0, model_speed.VOCAB, (3, 12))
    with torch.no_grad():
        expected = model(ids)[0]  # (3, 12, V)
        logits, state = model.prefill(ids[:, :7], 12)
        assert_close(logits, expected[:, :7], what=f"{name} prefill")
        for t in range(7, 12):
            step_logits, state = model.step(ids[:, t], state)
            assert_close(step_logits, expected[:, t], what=f"{name} step {t}")


def test_every_registered_layer_but_the_wrappers_is_benchmarked():
    import rnnkit

    model_speed = load("model_speed")
    assert set(model_speed.registered_layers()) == set(rnnkit.layers.names()) - {"bidirectional", "stacked"}
    with pytest.raises(SystemExit, match="expected names"):
        model_speed.check_layers(["lstm", "no_such_layer"])


def test_training_case_measures_speed_memory_and_mode():
    model_speed = load("model_speed")
    result = model_speed.train_case("mamba", width=16, length=8, batch=2, steps=2, cap=60.0,
                                    threads=torch.get_num_threads())
    assert result["timed_steps"] == 2 and result["seconds"] > 0 and result["peak_bytes"] > 0
    assert result["mode"] in ("fused", "chunk") and result["parameters"] > 0


def test_decode_case_reports_rates_weights_and_a_growing_cache():
    decode_speed = load("decode_speed")
    small = decode_speed.decode_case("attention", width=16, context=8, batch=2, new_tokens=2,
                                     threads=torch.get_num_threads())
    large = decode_speed.decode_case("attention", width=16, context=32, batch=2, new_tokens=2,
                                     threads=torch.get_num_threads())
    assert small["decode_tokens_per_s"] > 0 and small["prefill_tokens_per_s"] > 0
    assert small["weight_bytes"] == large["weight_bytes"] > 0
    assert large["state_bytes"] > small["state_bytes"] > 0


def test_failures_and_overruns_become_rows():
    model_speed = load("model_speed")
    script = str(ROOT / "benchmarks" / "model_speed.py")
    case = {"name": "no_such_layer", "width": 16, "length": 8, "batch": 2, "steps": 1, "cap": 60.0, "threads": 1}
    assert model_speed.run_isolated(script, case, 120.0, 1)["error"].startswith("failed: ")
    assert model_speed.run_isolated(script, case, 0.01, 1) == {"error": "over the time cap (0 s)"}


def test_lstm_variants_are_greffs_and_the_grid_runs_and_resumes(tmp_path, capsys):
    import rnnkit
    from rnnkit.layers.lstm import VARIANT_OPTIONS

    lstm_variants = load("lstm_variants")
    configs = {name: rnnkit.layers.build("lstm", d_model=4, **options).config
               for name, options in lstm_variants.VARIANTS.items()}
    # V has peepholes and NP drops them; every other entry changes exactly one of the layer's variant options
    assert configs["V"].peephole and not configs["NP"].peephole
    assert not configs["V"].is_variant and not configs["NP"].is_variant
    changed = [next(iter(c.variant_options)) for n, c in configs.items() if n not in ("V", "NP")]
    assert sorted(changed) == sorted(VARIANT_OPTIONS)
    assert all(len(c.variant_options) == 1 and c.peephole for n, c in configs.items() if n not in ("V", "NP"))
    if importlib.util.find_spec("aeon") is None:
        pytest.skip("aeon wheel missing: pip install -c constraints.txt --no-deps aeon==1.6.0")
    out = tmp_path / "variants.jsonl"
    argv = ["--quick", "--tasks", "gunpoint", "--variants", "V,NFG", "--out", str(out)]
    assert lstm_variants.main(argv) == 0
    text = capsys.readouterr().out
    assert "2 cells ran, 0 already done, 0 failed" in text
    assert "| V | 1 |" in text and "| NFG | 1 |" in text and "| NIG |" not in text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [lstm_variants.variant_of(r["model"]) for r in rows] == ["V", "NFG"]
    assert all(r["budget"] == "greff-gunpoint-quick" and r["steps"] == 5 and r["block"] == "stacked" for r in rows)
    assert lstm_variants.main(argv) == 0  # a rerun finds every cell done
    assert "0 cells ran, 2 already done" in capsys.readouterr().out
