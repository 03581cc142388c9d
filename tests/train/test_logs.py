"""Metrics logs: CSV rows per step, and TensorBoard event files read back by an independent decoder
(framing, CRC-32C, protobuf fields) and, where installed, TensorBoard's own reader."""

from __future__ import annotations

import csv
import struct

import pytest
import torch

from rnnkit.models import SequenceModel
from rnnkit.tasks import build_task
from rnnkit.train import TrainConfig, Trainer
from rnnkit.errors import InputError
from rnnkit.train import logs
from rnnkit.train.logs import MetricsLogger, TensorBoardWriter

needs_tensorboardx = pytest.mark.skipif(not logs.tensorboard_available(),
                                        reason="TensorBoard files need the optional tensorboardX package")


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: independent of any writer."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_crc32c_matches_published_vectors():
    # RFC 3720 (iSCSI) appendix B.4 and the common "123456789" check value of CRC-32C.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(bytes([0xFF] * 32)) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(b"") == 0


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _fields(data: bytes) -> list[tuple[int, object]]:
    """Decode one protobuf message into (field number, raw value) pairs."""
    out, pos = [], 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        out.append((field, value))
    return out


def read_events(path) -> list[dict]:
    """Every event of a file as {"step", "scalars", "file_version", "session_start"}, checking every CRC."""
    data, pos, events = path.read_bytes(), 0, []
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
        body = data[pos + 12:pos + 12 + length]
        assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked_crc32c(body)
        pos += 16 + length
        event = {"step": 0, "scalars": {}, "file_version": None, "session_start": False}
        for field, value in _fields(body):
            if field == 2:
                event["step"] = value
            elif field == 3:
                event["file_version"] = value.decode()
            elif field == 5:
                for _, raw_value in _fields(value):
                    parts = dict(_fields(raw_value))
                    event["scalars"][parts[1].decode()] = struct.unpack("<f", parts[2])[0]
            elif field == 7:  # session_log
                event["session_start"] = dict(_fields(value)).get(1) == 1
        events.append(event)
    return events


@needs_tensorboardx
def test_event_writer_round_trips_through_an_independent_decoder(tmp_path):
    writer = TensorBoardWriter(tmp_path, session_step=2)
    writer.add_scalars(3, {"train/loss": 1.5, "val/bpc": -2.25})
    writer.add_scalars(2**40, {"x": 0.1})
    writer.close()
    events = read_events(writer.path)
    assert events[0]["file_version"] == "brain.Event:2"
    assert events[1]["session_start"] and events[1]["step"] == 2
    scalars = [(e["step"], e["scalars"]) for e in events[2:]]
    assert scalars[:2] == [(3, {"train/loss": 1.5}), (3, {"val/bpc": -2.25})]
    assert scalars[2][0] == 2**40 and scalars[2][1]["x"] == pytest.approx(0.1, rel=1e-7)
    assert "tfevents" in writer.path.name


@needs_tensorboardx
def test_flush_puts_every_scalar_on_disk(tmp_path):
    writer = TensorBoardWriter(tmp_path, session_step=1)
    writer.add_scalars(1, {"train/loss": 2.0})
    writer.flush()  # what a checkpoint relies on before a kill
    assert [e["scalars"] for e in read_events(writer.path)][-1] == {"train/loss": 2.0}
    writer.close()


@needs_tensorboardx
def test_sessions_started_in_the_same_second_get_their_own_files_in_order(tmp_path):
    paths = [TensorBoardWriter(tmp_path, session_step=s) for s in (1, 5)]
    for writer in paths:
        writer.close()
    assert sorted(tmp_path.glob("events.out.tfevents.*")) == [w.path for w in paths]


def test_csv_only_without_tensorboard(tmp_path, monkeypatch):
    logger = MetricsLogger(tmp_path / "a", [], 0, tensorboard=False)
    logger.close()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["eval.csv", "train.csv"]
    monkeypatch.setattr(logs, "tensorboard_available", lambda: False)
    logger = MetricsLogger(tmp_path / "b", [], 0)  # "auto" without the package: CSV only
    logger.close()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["eval.csv", "train.csv"]
    with pytest.raises(InputError, match="tensorboardX"):
        MetricsLogger(tmp_path / "c", [], 0, tensorboard=True)


@needs_tensorboardx
def test_tensorboard_reads_our_event_files(tmp_path):
    accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="the optional tensorboard package is not installed; the format is checked by the decoder test",
    )
    writer = TensorBoardWriter(tmp_path, session_step=1)
    for step in range(1, 4):
        writer.add_scalars(step, {"train/loss": 1.0 / step})
    writer.close()
    acc = accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, 0.333333)]
    # A resumed run (from step 2) marks the restart; TensorBoard then drops the old step 3.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    writer = TensorBoardWriter(resumed, session_step=1)
    for step in range(1, 4):
        writer.add_scalars(step, {"train/loss": 1.0 / step})
    writer.close()
    writer = TensorBoardWriter(resumed, session_step=3)
    writer.add_scalars(3, {"train/loss": 7.0})
    writer.close()
    acc = accumulator.EventAccumulator(str(resumed))
    acc.Reload()
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 0.5), (3, 7.0)]


@needs_tensorboardx
def test_trainer_logs_every_step_to_csv_and_tensorboard(tmp_path):
    torch.manual_seed(0)
    task = build_task("parity", eval_examples=8)
    model = SequenceModel(d_input=task.d_input, d_model=6, head="classify", n_outputs=2, layer="gru") \
        if task.input_kind == "features" else SequenceModel(vocab_size=task.vocab_size, d_model=6, head="classify",
                                                            n_outputs=task.n_classes, layer="gru")
    config = TrainConfig(steps=5, batch_size=4, seq_len=8, progress=False, eval_every=2)
    trainer = Trainer(model, task, config, log_dir=tmp_path / "logs")
    trainer.fit()
    with open(tmp_path / "logs" / "train.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [float(r["loss"]) for r in rows] == [h["loss"] for h in trainer.history]  # exact: repr round-trips
    assert all(float(r["tokens_per_second"]) > 0 for r in rows)
    with open(tmp_path / "logs" / "eval.csv", newline="") as handle:
        evals = [(int(r["step"]), r["split"], r["metric"]) for r in csv.DictReader(handle)]
    assert evals == [(2, "val", "loss"), (2, "val", "accuracy"), (4, "val", "loss"), (4, "val", "accuracy"),
                     (5, "val", "loss"), (5, "val", "accuracy")]
    (events_file,) = (tmp_path / "logs").glob("events.out.tfevents.*")
    losses = [e["scalars"]["train/loss"] for e in read_events(events_file) if "train/loss" in e["scalars"]]
    assert losses == [struct.unpack("<f", struct.pack("<f", h["loss"]))[0] for h in trainer.history]


def test_progress_lines_show_loss_tokens_per_second_and_eta(tmp_path, capsys):
    from rnnkit.cli import main

    argv = ["train", "--task", "adding", "--model", "gru", "--d-model", "4", "--steps", "2", "--batch-size", "2",
            "--seq-len", "5", "--task-opt", "eval_examples=4", "--no-progress", "--log-every", "1",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("step 1/2")][0]
    assert "loss" in line and "seq/s" in line and "eta" in line  # one regression target per sequence
