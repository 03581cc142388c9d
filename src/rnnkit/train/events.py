"""A minimal TensorBoard event-file writer for scalars (no TensorFlow, no ``tensorboard`` package).

Why our own: ``torch.utils.tensorboard`` needs the ``tensorboard`` package, which pulls in grpcio,
protobuf, werkzeug, markdown, absl-py and a compiled data server (tens of MB) only to append a few
scalars to a file. Scalars need three small, stable formats, written here in ~100 lines and tested
against their published test vectors and, where ``tensorboard`` is installed, its own reader:

- TFRecord framing: ``uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)``
  (little-endian), CRC-32C (Castagnoli) masked as ``((crc >> 15) | (crc << 17)) + 0xa282ead8``;
- ``tensorflow.Event`` protobuf: ``wall_time`` (1, double), ``step`` (2, int64), ``file_version``
  (3, string), ``summary`` (5), ``session_log`` (7, with ``status`` = 1 for START);
- ``Summary.Value``: ``tag`` (1, string), ``simple_value`` (2, float).

A ``SessionLog.START`` event at step ``s`` tells TensorBoard to discard older events with step >= s,
which is how a resumed run hides the steps it redoes.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # reflected Castagnoli polynomial
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``, as used by TFRecord files."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC (masking keeps CRCs of data that itself holds CRCs well distributed)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # int64 on the wire: negatives as two's complement
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint((field << 3) | wire_type)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 scalars: dict[str, float] | None = None, session_start: bool = False) -> bytes:
    """Serialise one ``tensorflow.Event`` protobuf."""
    out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _key(2, 5) + struct.pack("<f", float(value)))
            for tag, value in scalars.items()
        )
        out += _bytes_field(5, values)
    if session_start:
        out += _bytes_field(7, _key(1, 0) + _varint(1))  # session_log = SessionLog{status: START}
    return out


def frame_record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, its masked CRC."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


class EventWriter:
    """Appends scalar summaries to a new ``events.out.tfevents.*`` file in ``log_dir``.

    Example:
        >>> writer = EventWriter("runs/x/logs")
        >>> writer.add_scalars(10, {"train/loss": 1.25, "train/lr": 3e-3})
        >>> writer.close()          # then: tensorboard --logdir runs/x/logs
    """

    def __init__(self, log_dir: str | os.PathLike) -> None:
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}"
        self.path = log_dir / name
        self._file = open(self.path, "ab")
        self._write(encode_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, event: bytes) -> None:
        self._file.write(frame_record(event))

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """Record ``{tag: value}`` at ``step``."""
        self._write(encode_event(time.time(), step, scalars=scalars))

    def session_start(self, step: int) -> None:
        """Mark a restart: TensorBoard drops previously written events with step >= ``step``."""
        self._write(encode_event(time.time(), step, session_start=True))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
