"""TensorBoard event files of scalars, written and read without TensorFlow or the tensorboard package.

An event file (``events.out.tfevents.<time>.<host>``) is a sequence of TFRecords: the payload's length
(uint64, little-endian), the masked CRC-32C of those 8 bytes, the payload, the masked CRC-32C of the payload.
Each payload is a ``tensorflow.Event`` protobuf message; the first one carries ``file_version`` and every
later one a ``step``, a ``wall_time`` and a ``Summary`` of ``simple_value`` scalars, encoded here by hand:

* Event: ``wall_time`` = 1 (double), ``step`` = 2 (int64), ``file_version`` = 3 (string), ``summary`` = 5;
* Summary: ``value`` = 1 (repeated Summary.Value);
* Summary.Value: ``tag`` = 1 (string), ``simple_value`` = 2 (float).

TensorBoard reads every file of a folder whose name contains ``tfevents``; the KFP UI's TensorBoard viewer
opens such a folder.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

FILE_VERSION = "brain.Event:2"


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord uses it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The TFRecord mask of a CRC: rotated right by 15 bits plus a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, payload, masked CRC of the payload."""
    length = struct.pack("<Q", len(payload))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + payload
        + struct.pack("<I", masked_crc32c(payload))
    )


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative numbers
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def scalar_event(step: int, wall_time: float, scalars: Mapping[str, float]) -> bytes:
    """An Event with a Summary of one ``simple_value`` per tag."""
    values = b"".join(
        _length_delimited(
            1, _length_delimited(1, tag.encode("utf-8")) + _field(2, 5) + struct.pack("<f", float(value))
        )
        for tag, value in scalars.items()
    )
    return (
        _field(1, 1)
        + struct.pack("<d", wall_time)
        + _field(2, 0)
        + _varint(step)
        + _length_delimited(5, values)
    )


def file_version_event(wall_time: float) -> bytes:
    """The first Event of a file: its format version."""
    return _field(1, 1) + struct.pack("<d", wall_time) + _length_delimited(3, FILE_VERSION.encode())


class EventFileWriter:
    """Appends scalar events to a new event file in ``folder``; each write is flushed (a viewer sees the run
    as it goes, and a killed process loses nothing written)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = self.folder / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        self._file = self.path.open("ab")
        self._write(file_version_event(now))

    def _write(self, payload: bytes) -> None:
        self._file.write(tfrecord(payload))
        self._file.flush()

    def add_scalars(self, step: int, scalars: Mapping[str, float], wall_time: float | None = None) -> None:
        if scalars:
            self._write(scalar_event(step, time.time() if wall_time is None else wall_time, scalars))

    def close(self) -> None:
        self._file.close()


# ------------------------------------------------------------------------------------------------ reading


def read_records(path: str | Path) -> Iterator[bytes]:
    """The payloads of a TFRecord file; a bad CRC or a cut record is a ValueError naming the offset."""
    return read_records_from_bytes(Path(path).read_bytes(), str(path))


def read_records_from_bytes(data: bytes, path: str = "<bytes>") -> Iterator[bytes]:
    """The payloads of TFRecords in ``data`` (see :func:`read_records`)."""
    offset = 0
    while offset < len(data):
        if offset + 12 > len(data):
            raise ValueError(f"{path}: record at byte {offset} is cut short")
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        if header_crc != masked_crc32c(header):
            raise ValueError(f"{path}: bad length checksum at byte {offset}")
        start, end = offset + 12, offset + 12 + length
        if end + 4 > len(data):
            raise ValueError(f"{path}: record at byte {offset} is cut short")
        payload = data[start:end]
        (payload_crc,) = struct.unpack("<I", data[end : end + 4])
        if payload_crc != masked_crc32c(payload):
            raise ValueError(f"{path}: bad payload checksum at byte {offset}")
        yield payload
        offset = end + 4


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _read_varint(data, pos)
            yield number, wire_type, value
        elif wire_type == 1:
            yield number, wire_type, data[pos : pos + 8]
            pos += 8
        elif wire_type == 5:
            yield number, wire_type, data[pos : pos + 4]
            pos += 4
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            yield number, wire_type, data[pos : pos + length]
            pos += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")


def read_scalars(folder: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every ``simple_value`` scalar of the event files in ``folder``: tag -> [(step, value)] in file order."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(folder).glob("*tfevents*")):
        for payload in read_records(path):
            step = 0
            values: list[bytes] = []
            for number, _, value in _fields(payload):
                if number == 2 and isinstance(value, int):
                    step = value - (1 << 64) if value >= 1 << 63 else value
                elif number == 5 and isinstance(value, bytes):
                    values += [v for n, _, v in _fields(value) if n == 1 and isinstance(v, bytes)]
            for value_bytes in values:
                tag, number_value = "", None
                for n, _, v in _fields(value_bytes):
                    if n == 1 and isinstance(v, bytes):
                        tag = v.decode("utf-8")
                    elif n == 2 and isinstance(v, bytes):
                        (number_value,) = struct.unpack("<f", v)
                if number_value is not None:
                    scalars.setdefault(tag, []).append((step, number_value))
    return scalars
