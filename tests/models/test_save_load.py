"""Save/load: GPU-written checkpoints load on a CPU-only machine; bad files are clear errors and
never leave a partially loaded model."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rnnkit import InputError
from rnnkit.models import SequenceModel
from rnnkit.models.io import load_weights
from rnnkit.tasks import build_task
from rnnkit.train import CheckpointManager, TrainConfig, Trainer
from rnnkit.train.checkpoint import MARKER, file_sha256


@contextlib.contextmanager
def saved_as_cuda():
    """Make ``torch.save`` tag every CPU storage with location ``cuda:0``, exactly as a file written on
    a GPU machine; loading it without ``map_location`` then needs CUDA."""
    registry = torch.serialization._package_registry
    entry = (0, lambda storage: "cuda:0" if storage.device.type == "cpu" else None, lambda obj, location: None)
    registry.append(entry)
    registry.sort(key=lambda e: e[0])
    try:
        yield
    finally:
        registry.remove(entry)


def _trainer(out, steps):
    torch.manual_seed(0)
    task = build_task("adding", eval_examples=8)
    model = SequenceModel(d_input=2, d_model=8, head="regress", n_outputs=1, layer="lstm", dropout=0.1, num_layers=2)
    config = TrainConfig(steps=steps, batch_size=4, seq_len=6, progress=False, checkpoint_every=2)
    return Trainer(model, task, config, out_dir=out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks loading GPU-tagged files on a machine without CUDA")
def test_checkpoint_written_on_gpu_resumes_on_cpu(tmp_path):
    reference = _trainer(tmp_path / "ref", 6)
    reference.fit()
    # Train 4 of 6 steps, then rewrite the checkpoint's torch files as a GPU machine would have.
    partial = _trainer(tmp_path / "run", 6)
    stop = {"at": 4}

    def on_step(step, record):
        if step == stop["at"]:
            partial.request_stop()  # as SIGTERM would: checkpoint at this boundary and return

    assert partial.fit(on_step)["interrupted"] == "SIGTERM"
    latest = CheckpointManager(tmp_path / "run" / "checkpoints").latest()
    for name in ("optimizer.pt", "trainer_state.pt"):
        data = torch.load(latest / name, weights_only=True)
        with saved_as_cuda():
            torch.save(data, latest / name)
    # A GPU machine records the checksums of the files it wrote.
    recorded = json.loads((latest / MARKER).read_text())
    recorded["sha256"].update({name: file_sha256(latest / name) for name in ("optimizer.pt", "trainer_state.pt")})
    (latest / MARKER).write_text(json.dumps(recorded))
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(latest / "optimizer.pt", weights_only=True)  # the file really is device-tagged
    resumed = _trainer(tmp_path / "run", 6)
    assert resumed.resume() == latest and resumed.step == 4
    resumed.fit()
    for name, value in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    model = SequenceModel.from_pretrained(latest)  # the weights themselves are device-free safetensors
    assert next(model.parameters()).device.type == "cpu"


def _model():
    torch.manual_seed(0)
    return SequenceModel(vocab_size=7, d_model=6, layer="gru", num_layers=2)


def _assert_unchanged(model, before):
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda t: t.pop("head.bias"), r"missing \['head.bias'\]"),
        (lambda t: t.update(extra=torch.zeros(1)), r"unexpected \['extra'\]"),
        (lambda t: t.update({"head.bias": torch.zeros(8)}), "head.bias: expected shape"),
        (lambda t: t.update({"head.bias": torch.zeros(7, dtype=torch.int64)}), "head.bias: expected dtype"),
    ],
)
def test_mismatched_weights_are_rejected_before_anything_is_loaded(tmp_path, corrupt, match):
    source = _model()
    source.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    corrupt(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    target = SequenceModel(vocab_size=7, d_model=6, layer="gru", num_layers=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(InputError, match=match):
        load_weights(target, tmp_path)
    _assert_unchanged(target, before)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "missing"])
def test_corrupted_files_are_clear_errors(tmp_path, damage):
    _model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-10])
    elif damage == "garbage":
        weights.write_bytes(b"\xff" * 64)
    elif damage == "empty":
        weights.write_bytes(b"")
    else:
        weights.unlink()
    target = _model()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(InputError, match="model.safetensors"):
        load_weights(target, tmp_path)
    with pytest.raises(InputError, match="checkpoint"):
        SequenceModel.from_pretrained(tmp_path)
    _assert_unchanged(target, before)


def test_corrupted_or_foreign_config_is_a_clear_error(tmp_path):
    _model().save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    config.write_text("{not json")
    with pytest.raises(InputError, match="valid JSON"):
        SequenceModel.from_pretrained(tmp_path)
    config.write_text(json.dumps({"model": {"vocab_size": 7, "d_model": 6, "wings": 2}}))
    with pytest.raises(InputError, match="wings"):
        SequenceModel.from_pretrained(tmp_path)
    config.write_text(json.dumps({"weights": {}}))
    with pytest.raises(InputError, match="'model' entry"):
        SequenceModel.from_pretrained(tmp_path)
