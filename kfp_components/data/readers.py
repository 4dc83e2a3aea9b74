"""Read JSONL, JSON-array and Parquet files row by row, each row with the place it came from.

Readers never stop at the first bad row: a line that is not JSON is yielded as a :class:`RowError` so the
caller can report every problem (or drop the row) in one pass.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_components.data.errors import DatasetError

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")
_BOM = b"\xef\xbb\xbf"
_EXCERPT = 60


@dataclass(frozen=True)
class DataFile:
    """A local data file and the name to show for it in messages (its name at the source)."""

    path: Path
    name: str


@dataclass(frozen=True)
class Location:
    """Where a row is: ``file:line`` for JSON text, ``file:row N`` for Parquet."""

    file: str
    line: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}:{self.line}"
        if self.row is not None:
            return f"{self.file}: row {self.row}"
        return self.file


@dataclass(frozen=True)
class RowError:
    """A row that could not even be parsed."""

    message: str


def is_data_file(name: str) -> bool:
    return name.lower().endswith(DATA_SUFFIXES) and not Path(name).name.startswith(".")


def read_rows(data_file: DataFile) -> Iterator[tuple[Location, Any]]:
    """Yield ``(location, row)`` for every row of the file; ``row`` is a :class:`RowError` when unparseable.

    Raises :class:`DatasetError` for a file that cannot be read at all (empty, truncated JSON array,
    corrupt Parquet).
    """
    kind = _sniff(data_file)
    if kind == "parquet":
        yield from _read_parquet(data_file)
    elif kind == "array":
        yield from _read_json_array(data_file)
    else:
        yield from _read_jsonl(data_file)


def _sniff(data_file: DataFile) -> str:
    with data_file.path.open("rb") as handle:
        head = handle.read(4096)
    if not head.strip() or head.strip() == _BOM:
        raise DatasetError(f"{data_file.name}: the file is empty (no rows)")
    if head.startswith(b"PAR1"):
        return "parquet"
    if data_file.name.lower().endswith(".parquet"):
        raise DatasetError(f"{data_file.name}: not a Parquet file (no PAR1 header)")
    first = head.removeprefix(_BOM).lstrip()[:1]
    return "array" if first == b"[" else "jsonl"


def _read_jsonl(data_file: DataFile) -> Iterator[tuple[Location, Any]]:
    with data_file.path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1:
                raw = raw.removeprefix(_BOM)
            location = Location(data_file.name, line=number)
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield location, RowError(f"not valid UTF-8 (byte {exc.start + 1} of the line)")
                continue
            try:
                yield location, json.loads(text)
            except json.JSONDecodeError as exc:
                yield location, RowError(f"not valid JSON: {exc.msg} (column {exc.colno}){_excerpt(text)}")


def _read_json_array(data_file: DataFile) -> Iterator[tuple[Location, Any]]:
    try:
        text = data_file.path.read_bytes().removeprefix(_BOM).decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data_file.path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DatasetError(f"{data_file.name}:{line}: not valid UTF-8") from None
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    line = text.count("\n", 0, position) + 1
    while True:
        position, line = _skip_space(text, position, line)
        if position >= len(text):
            raise DatasetError(f"{data_file.name}:{line}: the JSON array is not closed with ']'")
        if text[position] == "]":
            break
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"{data_file.name}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})"
            ) from None
        yield Location(data_file.name, line=line), value
        line += text.count("\n", position, end)
        position, line = _skip_space(text, end, line)
        if position < len(text) and text[position] == ",":
            position += 1
        elif position < len(text) and text[position] != "]":
            raise DatasetError(f"{data_file.name}:{line}: expected ',' or ']' between array elements")
    if text[position + 1 :].strip():
        raise DatasetError(f"{data_file.name}:{line}: unexpected data after the closing ']'")


def _skip_space(text: str, position: int, line: int) -> tuple[int, int]:
    while position < len(text) and text[position] in " \t\r\n":
        if text[position] == "\n":
            line += 1
        position += 1
    return position, line


def _read_parquet(data_file: DataFile) -> Iterator[tuple[Location, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(data_file.path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DatasetError(f"{data_file.name}: not a readable Parquet file ({exc})") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield Location(data_file.name, row=number), row


def _excerpt(text: str) -> str:
    text = text.strip()
    if len(text) <= _EXCERPT:
        return f": {text!r}"
    return f": {text[:_EXCERPT]!r}... ({len(text)} characters)"
