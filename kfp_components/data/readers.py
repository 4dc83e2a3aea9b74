"""Read JSONL, JSON-array, Parquet and Arrow files row by row, each row with the place it came from.

Readers never stop at the first bad row: a line that is not JSON is yielded as a :class:`RowError` so the
caller can report every problem (or drop the row) in one pass.

Memory stays bounded whatever the file holds: JSON text is read a line (JSONL) or an array element at a
time, and a row longer than :data:`MAX_ROW_BYTES` is an error rather than a reason to read on. Hostile
content gets a message with ``file:line``, never a traceback: rows nested deeper than :data:`MAX_DEPTH`,
``NaN``/``Infinity`` (not JSON), integers longer than Python reads, compressed files and UTF-16/UTF-32 text.
A message quotes at most a short snippet of a row (:func:`excerpt`), never the row itself.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kfp_components.data.errors import DatasetError

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".arrow")
#: The longest row (a JSONL line or a JSON array element) read; a longer one is an error of that row.
MAX_ROW_BYTES = 16 << 20
#: How deeply objects and lists may nest in a row; chat rows need 4 levels.
MAX_DEPTH = 100
#: How many characters of a row an error message quotes at most.
EXCERPT_CHARS = 80
_BOM = b"\xef\xbb\xbf"
_READ_CHUNK = 1 << 20
#: How close to the end of the text read so far a JSON error may come from the text being cut there.
_CUT_MARGIN = 16
_NON_SPACE = re.compile(r"[^ \t\r\n]")
#: What follows an array element: ',' or ']' between optional white space.
_SEPARATOR = re.compile(r"[ \t\r\n]*([,\]])[ \t\r\n]*")
#: Magic numbers of compressed or archived files: what they are and what to do.
_COMPRESSED = (
    (b"\x1f\x8b", "gzip-compressed", "decompress it (gunzip)"),
    (b"(\xb5/\xfd", "zstd-compressed", "decompress it (zstd -d)"),
    (b"BZh", "bzip2-compressed", "decompress it (bunzip2)"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it (unxz)"),
    (b"PK\x03\x04", "a zip archive", "extract its files"),
)
#: Byte-order marks of encodings other than UTF-8; the UTF-32 ones first, as they start like UTF-16's.
_OTHER_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32 (little-endian)"),
    (codecs.BOM_UTF32_BE, "UTF-32 (big-endian)"),
    (codecs.BOM_UTF16_LE, "UTF-16 (little-endian)"),
    (codecs.BOM_UTF16_BE, "UTF-16 (big-endian)"),
)
#: Encodings whose text of ASCII characters holds NUL bytes; UTF-32 first (its text also decodes as UTF-16).
_NUL_ENCODINGS = (
    ("utf-32-le", "UTF-32 (little-endian)"),
    ("utf-32-be", "UTF-32 (big-endian)"),
    ("utf-16-le", "UTF-16 (little-endian)"),
    ("utf-16-be", "UTF-16 (big-endian)"),
)


@dataclass(frozen=True)
class DataFile:
    """A local data file and the name to show for it in messages (its name at the source)."""

    path: Path
    name: str


@dataclass(frozen=True)
class Location:
    """Where a row is: ``file:line`` for JSON text, ``file:row N`` for Parquet and Arrow."""

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

    Raises :class:`DatasetError` for a file that cannot be read at all (empty, compressed, not UTF-8 text,
    truncated JSON array, corrupt Parquet).
    """
    if data_file.name.lower().endswith(".arrow"):
        yield from _read_arrow(data_file)
        return
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
    for magic, what, remedy in _COMPRESSED:
        if head.startswith(magic):
            raise DatasetError(
                f"{data_file.name}: the file is {what}; {remedy} and give the .jsonl, .json or .parquet "
                "file it holds"
            )
    if data_file.name.lower().endswith(".parquet"):
        raise DatasetError(f"{data_file.name}: not a Parquet file (no PAR1 header)")
    if b"\x00" in head[:4]:  # JSON text never holds a NUL byte; UTF-16 and UTF-32 text has one early
        encoding = _other_encoding(head)
        if not encoding:
            raise DatasetError(f"{data_file.name}: the file holds binary data (NUL bytes), not JSON text")
        raise DatasetError(
            f"{data_file.name}: the file is {encoding} text; JSON files must be UTF-8: convert it "
            f"(iconv -f {encoding.split(' ')[0]} -t UTF-8)"
        )
    for bom, encoding in _OTHER_BOMS:
        if head.startswith(bom):
            raise DatasetError(
                f"{data_file.name}: the file is {encoding} text; JSON files must be UTF-8: convert it "
                f"(iconv -f {encoding.split(' ')[0]} -t UTF-8)"
            )
    first = head.removeprefix(_BOM).lstrip()[:1]
    return "array" if first == b"[" else "jsonl"


def _other_encoding(head: bytes) -> str:
    """The encoding of a file that starts with a NUL byte: UTF-32 or UTF-16 when its first characters read
    as JSON in one of them; else ''."""
    for codec, name in _NUL_ENCODINGS:
        unit = 4 if "32" in codec else 2
        sample = head[: min(256, len(head)) // unit * unit]
        try:
            text = sample.decode(codec)
        except UnicodeDecodeError:
            continue
        if text.removeprefix("\ufeff").lstrip()[:1] in ("{", "["):
            return name
    return ""


class _NotJSON(ValueError):
    """A value Python's parser accepts but JSON does not (NaN, Infinity)."""


def _reject_constant(name: str) -> Any:
    raise _NotJSON(f"{name} is not a JSON value (use null or a number)")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _read_jsonl(data_file: DataFile) -> Iterator[tuple[Location, Any]]:
    with data_file.path.open("rb") as handle:
        number = 0
        while raw := handle.readline(MAX_ROW_BYTES + 1):
            number += 1
            if number == 1:
                raw = raw.removeprefix(_BOM)
            location = Location(data_file.name, line=number)
            if len(raw) > MAX_ROW_BYTES and not raw.endswith(b"\n"):
                length = len(raw) + _skip_line(handle)
                yield location, RowError(f"the line is {_size(length)}, longer than {_size(MAX_ROW_BYTES)}")
                continue
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield location, RowError(f"not valid UTF-8 (byte {exc.start + 1} of the line)")
                continue
            yield location, _parse_line(text)


def _skip_line(handle: IO[bytes]) -> int:
    """Read past the rest of the current line without holding it; the number of bytes skipped."""
    skipped = 0
    while chunk := handle.readline(_READ_CHUNK):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped


def _parse_line(text: str) -> Any:
    """The JSON value of one line, or a :class:`RowError` saying why it is none."""
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        return RowError(f"not valid JSON: {exc.msg} (column {exc.colno}){excerpt(text)}")
    except _NotJSON as exc:
        return RowError(f"not valid JSON: {exc}")
    except RecursionError:
        return RowError(_too_deep())
    except ValueError as exc:  # Python's limit on the digits of an integer
        return RowError(_bad_number(exc))
    if _may_be_too_deep(text, 0, len(text)) and nesting_depth(value) > MAX_DEPTH:
        return RowError(_too_deep())
    return value


def _read_json_array(data_file: DataFile) -> Iterator[tuple[Location, Any]]:
    name = data_file.name
    with data_file.path.open("rb") as handle:
        text = _TextReader(handle, name)
        if not text.skip_space() or text.char() != "[":  # what the sniffer saw first
            raise DatasetError(f"{name}:{text.line}: expected a JSON array ('[')")
        text.advance(text.pos + 1)
        while True:
            if not text.skip_space():
                raise DatasetError(f"{name}:{text.line}: the JSON array is not closed with ']'")
            if text.char() == "]":
                break
            location = Location(name, line=text.line)
            start, value, end = text.decode_value()
            if _may_be_too_deep(text.text, start, end) and nesting_depth(value) > MAX_DEPTH:
                value = RowError(_too_deep())
            yield location, value
            separator = _SEPARATOR.match(text.text, end)
            if separator and separator.end() < len(text.text):  # the common case, in one step
                text.advance(separator.end() if separator.group(1) == "," else separator.start(1))
                continue
            text.advance(end)
            if not text.skip_space():
                continue  # not closed: said at the top of the loop
            if text.char() == ",":
                text.advance(text.pos + 1)
            elif text.char() != "]":
                raise DatasetError(f"{name}:{text.line}: expected ',' or ']' between array elements")
        text.advance(text.pos + 1)
        if text.skip_space():
            raise DatasetError(f"{name}:{text.line}: unexpected data after the closing ']'")


class _TextReader:
    """The UTF-8 text of a file, decoded a chunk at a time; holds only what has not been consumed yet.

    ``text[pos]`` is the next character, on line ``line``.
    """

    def __init__(self, handle: IO[bytes], name: str):
        self.handle = handle
        self.name = name
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = ""
        self.pos = 0
        self.line = 1
        self.eof = False
        self._column_base = 0  # the column of text[0] minus 1, when no newline precedes pos in text
        while not self.text and not self.eof:  # a chunk may end inside the first character
            self._fill(_READ_CHUNK)
        if self.text.startswith("\ufeff"):
            self.pos, self._column_base = 1, -1

    def char(self) -> str:
        return self.text[self.pos]

    def advance(self, to: int) -> None:
        self.line += self.text.count("\n", self.pos, to)
        self.pos = to

    def skip_space(self) -> bool:
        """Move to the next character that is not white space; False at the end of the file."""
        while True:
            found = _NON_SPACE.search(self.text, self.pos)
            if found:
                self.advance(found.start())
                return True
            self.advance(len(self.text))
            if self.eof:
                return False
            self._fill(_READ_CHUNK)

    def decode_value(self) -> tuple[int, Any, int]:
        """Parse the JSON value at ``pos``: ``(start, value, end)``, reading on while it may be cut short."""
        while True:
            start = self.pos
            try:
                value, end = _DECODER.raw_decode(self.text, start)
            except json.JSONDecodeError as exc:
                if self.eof or not self._may_be_cut(exc):
                    line = self.line + self.text.count("\n", start, exc.pos)
                    raise DatasetError(
                        f"{self.name}:{line}: not valid JSON: {exc.msg} (column {self._column(exc.pos)})"
                    ) from None
                self._read_more()
                continue
            except _NotJSON as exc:
                raise DatasetError(f"{self.name}:{self.line}: not valid JSON: {exc}") from None
            except RecursionError:
                raise DatasetError(f"{self.name}:{self.line}: {_too_deep()}") from None
            except ValueError as exc:
                raise DatasetError(f"{self.name}:{self.line}: {_bad_number(exc)}") from None
            if self.eof or self._delimited(end):
                return start, value, end
            self._read_more()  # a number may go on past the text read so far

    def _may_be_cut(self, exc: json.JSONDecodeError) -> bool:
        return exc.msg.startswith("Unterminated string") or exc.pos >= len(self.text) - _CUT_MARGIN

    def _delimited(self, end: int) -> bool:
        """Whether the value that ends at ``end`` surely ends there: a ',' or ']' follows, or anything else
        well before the end of the text read so far."""
        found = _NON_SPACE.search(self.text, end)
        return found is not None and (found.group() in ",]" or found.start() < len(self.text) - _CUT_MARGIN)

    def _read_more(self) -> None:
        held = len(self.text) - self.pos
        if held > MAX_ROW_BYTES:
            raise DatasetError(
                f"{self.name}:{self.line}: an array element is longer than {_size(MAX_ROW_BYTES)} "
                "(or a string is not closed)"
            )
        self._fill(max(_READ_CHUNK, held))  # doubling: a long element is parsed a few times, not once a chunk

    def _fill(self, size: int) -> None:
        """Drop the consumed text and append ``size`` more bytes of the file, decoded."""
        data = self.handle.read(size)
        self.eof = not data
        try:
            decoded = self.decoder.decode(data, final=self.eof)
        except UnicodeDecodeError as exc:
            raw = exc.object if isinstance(exc.object, bytes) else b""
            line = self.line + self.text.count("\n", self.pos) + raw[: exc.start].count(b"\n")
            raise DatasetError(f"{self.name}:{line}: not valid UTF-8") from None
        newline = self.text.rfind("\n", 0, self.pos)
        self._column_base = self.pos - newline - 1 if newline >= 0 else self._column_base + self.pos
        self.text = self.text[self.pos :] + decoded
        self.pos = 0

    def _column(self, position: int) -> int:
        newline = self.text.rfind("\n", 0, position)
        return position - newline if newline >= 0 else self._column_base + position + 1


def _read_parquet(data_file: DataFile) -> Iterator[tuple[Location, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(data_file.path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DatasetError(
            f"{data_file.name}: not a readable Parquet file ({shorten(str(exc), EXCERPT_CHARS)})"
        ) from None
    number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield Location(data_file.name, row=number), row


def _read_arrow(data_file: DataFile) -> Iterator[tuple[Location, Any]]:
    """The rows of an Arrow file: the IPC stream a ``save_to_disk`` folder holds, or the IPC file format."""
    import pyarrow as pa

    try:
        source = pa.memory_map(str(data_file.path))
        try:
            reader: Any = pa.ipc.open_stream(source)
            batches = iter(reader)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DatasetError(
            f"{data_file.name}: not a readable Arrow file ({shorten(str(exc), EXCERPT_CHARS)})"
        ) from None
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            number += 1
            yield Location(data_file.name, row=number), row


def nesting_depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (0 for a scalar); iterative, so any depth is safe."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def _may_be_too_deep(text: str, start: int, end: int) -> bool:
    """A cheap test that rules out deep nesting for almost every row: too few brackets to nest that deep."""
    return text.count("[", start, end) + text.count("{", start, end) > MAX_DEPTH


def _too_deep() -> str:
    return f"lists and objects nested more than {MAX_DEPTH} levels deep"


def _bad_number(exc: ValueError) -> str:
    digits = re.search(r"\((\d+) digits\)", str(exc))
    limit = f"{digits.group(1)} digits" if digits else "the limit"
    return f"a number has more than {limit}, more than Python reads as an integer"


def _size(length: int) -> str:
    return f"{length / (1 << 20):.1f} MiB" if length >= 1 << 20 else f"{length} bytes"


def shorten(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters, marking the cut with '...'."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def excerpt(text: str) -> str:
    """``: 'the start of text'... (N characters)``: at most :data:`EXCERPT_CHARS` characters of a row."""
    text = text.strip()
    shown = text[: EXCERPT_CHARS - 2]
    while len(repr(shown)) > EXCERPT_CHARS:  # escapes make a repr longer than its text
        shown = shown[: len(shown) * 3 // 4]
    if shown == text:
        return f": {shown!r}"
    return f": {shown!r}... ({len(text)} characters)"
