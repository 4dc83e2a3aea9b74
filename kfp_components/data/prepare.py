"""The dataset stage: fetch, detect the format, convert and validate every row, mix, cut a subset, split,
write.

``prepare_dataset`` is what the ``dataset_download`` component, the CLIs and the demo call. It checks the
options before touching the network, reads every row of every file, and either writes both outputs
completely or writes nothing at all.

Memory does not grow with the data: valid rows go to a scratch file as they are checked, the subset and
the split are chosen by row number (a few bytes per row: the shuffled order, then one bit per row), and a
second pass over the scratch file writes the outputs. The length statistics count each distinct length
once, and an error keeps the first :data:`PROBLEMS_KEPT` problems and counts the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kfp_components.data.config import DatasetConfig
from kfp_components.data.convert import (
    WRITTEN_AS,
    convert_row,
    detect_source_format,
    rename_columns,
    required_keys,
)
from kfp_components.data.errors import DatasetError
from kfp_components.data.fetch import DownloadLimits, fetch
from kfp_components.data.formats import MESSAGES, TEXT
from kfp_components.data.mixture import parse_sources, rows_to_take
from kfp_components.data.readers import MAX_DEPTH, DataFile, Location, RowError, read_rows, shorten
from kfp_components.data.uris import parse_dataset_uri

log = logging.getLogger(__name__)

#: How many problems an error message lists before it says "and N more".
PROBLEMS_SHOWN = 20
#: How many problems an error keeps (``DatasetValidationError.problems``); the rest are only counted.
PROBLEMS_KEPT = 1000
#: How many of one row's problems its message lists.
ROW_PROBLEMS_SHOWN = 5
_PROGRESS_EVERY_S = 5.0


class DatasetValidationError(DatasetError):
    """Rows failed validation. ``problems`` holds the first :data:`PROBLEMS_KEPT` ``(location, message)``
    found, ``problem_count`` how many there were."""

    def __init__(
        self,
        problems: list[tuple[Location, str]],
        rows_read: int,
        data_format: str,
        problem_count: int | None = None,
    ):
        self.problems = problems
        self.problem_count = len(problems) if problem_count is None else problem_count
        self.rows_read = rows_read
        shown = "\n".join(f"  {location}: {message}" for location, message in problems[:PROBLEMS_SHOWN])
        more = self.problem_count - min(len(problems), PROBLEMS_SHOWN)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"{self.problem_count} invalid row(s) of {rows_read} in {data_format!r} format; "
            f"nothing was written (set dataset_on_invalid: drop to skip invalid rows):\n{shown}{tail}"
        )


@dataclass
class PreparedDataset:
    """What the stage wrote and what it found."""

    train_path: Path
    eval_path: Path
    data_format: str
    train_sha256: str
    source: str
    files: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    #: The format of the rows given (comma-separated, one per source, for a mixture).
    source_format: str = ""
    #: Every source: uri, sha256 (of its files), source_format, rows_valid, rows_used.
    sources: list[dict[str, Any]] = field(default_factory=list)


def prepare_dataset(
    config: DatasetConfig,
    train_path: str | Path,
    eval_path: str | Path,
    *,
    scratch_dir: str | Path | None = None,
) -> PreparedDataset:
    """Fetch ``config.dataset_name_or_path``, validate every row and write the train and eval splits as JSONL.

    Rows in any source format (:mod:`kfp_components.data.convert`) are converted to the written format.
    Raises :class:`~kfp_components.typed_config.ConfigError` for bad options (before any download),
    :class:`DatasetError` for a bad URI or unreachable data, and :class:`DatasetValidationError` when rows
    are invalid and ``dataset_on_invalid`` is ``fail``. On any error
    neither output file is created. ``scratch_dir`` (default: the system's temporary folder) holds the
    downloads and a copy of the valid rows while the stage runs.
    """
    config.validate()
    sources = parse_sources(config.dataset_name_or_path)
    uris = [parse_dataset_uri(source.uri) for source in sources]
    field_map = config.field_map()
    train_path, eval_path = Path(train_path), Path(eval_path)
    started = time.monotonic()
    limits = DownloadLimits(config.dataset_download_timeout_seconds, config.dataset_stall_timeout_seconds)
    mixed = len(sources) > 1
    scans: list[_Scan] = []
    all_files: list[str] = []
    written_format: str = "" if config.data_format == "auto" else config.data_format
    with (
        tempfile.TemporaryDirectory(prefix="kfp-dataset-", dir=scratch_dir) as scratch,
        contextlib.ExitStack() as stack,
    ):
        spools: list[IO[bytes]] = []
        for number, uri in enumerate(uris):
            log.info("dataset: reading %s", uri.redacted())
            downloads = Path(scratch) / str(number)
            downloads.mkdir()
            files = fetch(uri, downloads, split=config.dataset_split, limits=limits)
            log.info("dataset: %d file(s): %s", len(files), ", ".join(f.name for f in files[:10]))
            # no name: nothing a download can clash with
            spool = stack.enter_context(tempfile.TemporaryFile(dir=scratch))
            spools.append(spool)
            scan = _scan(files, config, written_format, field_map, spool)
            scan.source, scan.sha256 = uri.redacted(), _files_sha256(files)
            written_format = written_format or scan.data_format
            scans.append(scan)
            all_files += [f.name if not mixed else f"{uri.redacted()}: {f.name}" for f in files]
        if mixed:
            taken = rows_to_take(sources, [scan.rows_valid for scan in scans])
            valid_rows: IO[bytes] = stack.enter_context(tempfile.TemporaryFile(dir=scratch))
            rows_valid = _mix(
                spools[: len(scans)], [scan.rows_valid for scan in scans], taken, config.seed, valid_rows
            )
        else:
            taken, rows_valid = [scans[0].rows_valid], scans[0].rows_valid
            valid_rows = spools[0]
        kept = _subset(rows_valid, config)
        rows_kept = rows_valid if kept is None else len(kept)
        held_out = eval_mask(rows_kept, config.train_split_ratio, config.seed)
        eval_rows = 0 if held_out is None else len(held_out)
        train_rows = rows_kept - eval_rows
        valid_rows.seek(0)
        sha256 = _write_outputs(valid_rows, kept, held_out, train_path, eval_path)
    rows_in: Counter[str] = Counter()
    for scan in scans:
        rows_in[scan.source_format] += scan.rows_valid
    metrics: dict[str, float] = {
        "num_files": len(all_files),
        "rows_read": sum(scan.rows_read for scan in scans),
        "rows_valid": sum(scan.rows_valid for scan in scans),
        "rows_dropped": sum(scan.problem_count for scan in scans),
        **({"rows_mixed": rows_valid} if mixed else {}),
        "rows_after_subset": rows_kept,
        "train_rows": train_rows,
        "eval_rows": eval_rows,
        **{f"rows_in_{name}": count for name, count in sorted(rows_in.items())},
    }
    if mixed:
        for number, (scan, rows) in enumerate(zip(scans, taken, strict=True)):
            metrics[f"source_{number}_rows_valid"] = scan.rows_valid
            metrics[f"source_{number}_rows_used"] = rows
    turns: Counter[int] = sum((scan.turns for scan in scans), Counter())
    chars: Counter[int] = sum((scan.chars for scan in scans), Counter())
    metrics.update({**_length_stats(turns, "turns"), **_length_stats(chars, "chars")})
    metrics["seconds"] = round(time.monotonic() - started, 3)
    source_formats = sorted(rows_in)
    log.info(
        "dataset: %s rows written as %s: %d rows read, %d dropped, %d train, %d eval; train sha256 %s",
        " + ".join(source_formats),
        written_format,
        metrics["rows_read"],
        metrics["rows_dropped"],
        train_rows,
        eval_rows,
        sha256,
    )
    return PreparedDataset(
        train_path=train_path,
        eval_path=eval_path,
        data_format=written_format,
        train_sha256=sha256,
        source=", ".join(scan.source for scan in scans),
        files=all_files,
        metrics=metrics,
        source_format=",".join(scan.source_format for scan in scans),
        sources=[
            {
                "uri": scan.source,
                "sha256": scan.sha256,
                "source_format": scan.source_format,
                "rows_valid": scan.rows_valid,
                "rows_used": rows,
            }
            for scan, rows in zip(scans, taken, strict=True)
        ],
    )


def _files_sha256(files: list[DataFile]) -> str:
    """The SHA-256 of a source: of its data files' bytes, one after the other in the order read."""
    digest = hashlib.sha256()
    for data_file in files:
        with data_file.path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _mix(spools: list[IO[bytes]], valid: list[int], taken: list[int], seed: int, out: IO[bytes]) -> int:
    """Write a seeded sample of ``taken[i]`` of each source's ``valid[i]`` rows to ``out``, shuffled
    together; the number of rows written. Each source's spool is read once, in order."""
    rng = random.Random(seed)
    wanted: list[Iterable[int]] = []
    for count, take in zip(valid, taken, strict=True):
        wanted.append(range(count) if take >= count else sorted(rng.sample(range(count), take)))
    order = array("H", (number for number, take in enumerate(taken) for _ in range(take)))
    rng.shuffle(order)
    readers = []
    for spool, chosen in zip(spools, wanted, strict=True):
        spool.seek(0)
        readers.append(_kept_lines(spool, chosen))
    for number in order:
        out.write(next(readers[number]))
    return len(order)


@dataclass
class _Scan:
    data_format: str
    source_format: str = ""
    rows_valid: int = 0
    turns: Counter[int] = field(default_factory=Counter)  # length -> how many valid rows have it
    chars: Counter[int] = field(default_factory=Counter)
    problems: list[tuple[Location, str]] = field(default_factory=list)  # the first PROBLEMS_KEPT
    problem_count: int = 0
    rows_read: int = 0
    source: str = ""
    sha256: str = ""

    def problem(self, location: Location, message: str) -> None:
        self.problem_count += 1
        if len(self.problems) < PROBLEMS_KEPT:
            self.problems.append((location, message))


def _scan(
    files: list[DataFile], config: DatasetConfig, written: str, field_map: dict[str, str], spool: IO[bytes]
) -> _Scan:
    """Read, convert and check every row of every file; write the valid ones to ``spool``, one JSON line
    each, in the written format. ``written``: the format the rows must be written as ('' for any)."""
    forced = config.dataset_source_format != "auto"
    scan = _Scan(data_format=written, source_format=config.dataset_source_format if forced else "")
    detected_at: Location | None = None
    last_report = time.monotonic()
    for location, row in _all_rows(files):
        scan.rows_read += 1
        if time.monotonic() - last_report > _PROGRESS_EVERY_S:
            last_report = time.monotonic()
            log.info("dataset: checked %d rows (%s)", scan.rows_read, location)
        if isinstance(row, RowError):
            scan.problem(location, row.message)
            continue
        if field_map:
            row, problem = rename_columns(row, field_map)
            if problem:
                scan.problem(location, problem)
                continue
        if not forced:
            found = detect_source_format(row)
            if not scan.source_format:
                if found is None:
                    scan.problem(location, _undetectable(row, written))
                    continue
                if written and WRITTEN_AS[found] != written:
                    if not scan.rows_valid and not scan.problem_count:
                        raise DatasetError(_wrong_format(location, found, written))
                    scan.problem(location, _wrong_format(location, found, written, whole=False))
                    continue
                scan.source_format, detected_at = found, location
                scan.data_format = WRITTEN_AS[found]
                log.info(
                    "dataset: %s rows (detected from %s), written as %s", found, location, scan.data_format
                )
            elif found not in (None, scan.source_format):
                scan.problem(
                    location,
                    f"row is in {found!r} format but the dataset is {scan.source_format!r} "
                    f"(detected from {detected_at}); mixed formats are not allowed",
                )
                continue
        elif not scan.data_format:
            scan.data_format = WRITTEN_AS[scan.source_format]
        converted, problems = convert_row(row, scan.source_format)
        if problems:
            scan.problem(location, _join_problems(problems))
            continue
        line = _serialise(converted)
        if isinstance(line, RowError):
            scan.problem(location, line.message)
            continue
        spool.write(line)
        scan.rows_valid += 1
        scan.turns[_turns(converted, scan.data_format)] += 1
        scan.chars[_chars(converted)] += 1
    if not scan.data_format:
        scan.data_format = "unknown"
    if scan.problem_count and config.dataset_on_invalid == "fail":
        raise DatasetValidationError(
            scan.problems, scan.rows_read, scan.source_format or scan.data_format, scan.problem_count
        )
    if scan.problem_count:
        log.warning(
            "dataset: dropped %d invalid row(s) of %d; first: %s: %s",
            scan.problem_count,
            scan.rows_read,
            *scan.problems[0],
        )
    if not scan.rows_valid:
        raise DatasetError(f"no valid rows: {scan.rows_read} row(s) read, all invalid")
    return scan


def _wrong_format(location: Location, found: str, written: str, *, whole: bool = True) -> str:
    wanted = [name for name, target in WRITTEN_AS.items() if target == written]
    text = (
        f"{location}: the rows are in {found!r} format (written as {WRITTEN_AS[found]!r}), not a format "
        f"written as {written!r} ({', '.join(wanted)})"
    )
    return text + "; nothing was written" if whole else text


def _all_rows(files: Iterable[DataFile]) -> Iterator[tuple[Location, Any]]:
    for data_file in files:
        yield from read_rows(data_file)


def _join_problems(problems: list[str]) -> str:
    more = len(problems) - ROW_PROBLEMS_SHOWN
    return "; ".join(problems[:ROW_PROBLEMS_SHOWN]) + (f"; and {more} more problem(s)" if more > 0 else "")


def _serialise(row: Any) -> bytes | RowError:
    """The row as one line of UTF-8 JSON, or why it cannot be one (NaN or a lone surrogate in it)."""
    try:
        return json.dumps(row, ensure_ascii=False, default=str, allow_nan=False).encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        where = _find(row, lambda v: isinstance(v, str) and not _encodes(v))
        return RowError(
            f"{where}: holds a lone UTF-16 surrogate (such as '\\ud800' written alone), which is not text"
        )
    except ValueError:
        where = _find(row, lambda v: isinstance(v, float) and not math.isfinite(v))
        return RowError(f"{where}: NaN or Infinity, which JSON cannot hold")
    except RecursionError:  # a Parquet row: JSON text is checked for depth as it is read
        return RowError(f"lists and objects nested more than {MAX_DEPTH} levels deep")


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _find(row: Any, wanted: Any) -> str:
    """The key path (``messages[1].content``) of the first value in ``row`` for which ``wanted`` is true."""
    stack: list[tuple[Any, str]] = [(row, "")]
    while stack:
        value, path = stack.pop()
        if wanted(value):
            return shorten(path or "the row", 120)
        if isinstance(value, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k)) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(value))))
    return "the row"


def _undetectable(row: Any, written: str = "") -> str:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    keys = ", ".join(shorten(str(key), 40) for key in sorted(row)[:8]) or "none"
    names = [name for name, target in WRITTEN_AS.items() if not written or target == written]
    expected = "; ".join(f"{name} ({', '.join(required_keys(name))})" for name in names)
    return (
        f"cannot tell the format from the keys ({keys}): expected {expected}; rename columns with "
        "dataset_field_map"
    )


def _turns(row: dict[str, Any], data_format: str) -> int:
    if data_format == MESSAGES:
        return len(row[MESSAGES])
    if data_format == TEXT:
        return 1
    prompt = row["prompt"]
    return (len(prompt) if isinstance(prompt, list) else 1) + 1


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(
            _chars(v)
            for k, v in value.items()
            if k in ("messages", "prompt", "chosen", "rejected", "answer", "content", "text")
        )
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    return 0


def _subset(rows: int, config: DatasetConfig) -> Sequence[int] | None:
    """The row numbers (among ``rows`` valid rows, ascending) the subset keeps; ``None`` keeps all."""
    size = config.dataset_subset_size
    if not size or size >= rows:
        if size > rows:
            log.warning(
                "dataset: dataset_subset_size %d is more than the %d valid rows; keeping all", size, rows
            )
        return None
    if config.dataset_subset_mode == "first":
        return range(size)
    return array("Q", sorted(random.Random(config.seed).sample(range(rows), size)))


def eval_mask(rows: int, train_split_ratio: float, seed: int) -> RowSet | None:
    """Which of ``rows`` rows go to eval, by row number; ``None`` when none do (ratio 1.0, or one row).

    The split shuffles the row numbers with ``random.Random(seed)`` and holds out all but the first
    ``round(rows * train_split_ratio)`` of them (at least one row each side). The shuffled order takes
    4 bytes a row while it is drawn (8 beyond 4 billion rows), the result one bit a row.
    """
    if train_split_ratio >= 1 or rows < 2:
        return None
    order = array("I" if rows < 1 << 32 else "Q", range(rows))
    random.Random(seed).shuffle(order)  # the same swaps, and so the same order, as on a list
    n_train = min(max(round(rows * train_split_ratio), 1), rows - 1)
    held_out = RowSet(rows)
    for index in order[n_train:]:
        held_out.add(index)
    return held_out


class RowSet:
    """A set of row numbers below ``size``, one bit each."""

    def __init__(self, size: int):
        self._bits = bytearray((size + 7) // 8)
        self._count = 0

    def add(self, index: int) -> None:
        if not self[index]:
            self._bits[index >> 3] |= 1 << (index & 7)
            self._count += 1

    def __getitem__(self, index: int) -> bool:
        return bool(self._bits[index >> 3] >> (index & 7) & 1)

    def __len__(self) -> int:
        return self._count


def split_rows(rows: list[str], train_split_ratio: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded split into train and eval; each keeps the source order. Ratio 1.0 gives no eval rows.

    With a ratio below 1 and at least two rows, both splits get at least one row. The same split as the
    stage makes by :func:`eval_mask`.
    """
    held_out = eval_mask(len(rows), train_split_ratio, seed)
    if held_out is None:
        return list(rows), []
    train = [row for i, row in enumerate(rows) if not held_out[i]]
    return train, [row for i, row in enumerate(rows) if held_out[i]]


def _write_outputs(
    valid_rows: IO[bytes],
    kept: Sequence[int] | None,
    held_out: RowSet | None,
    train_path: Path,
    eval_path: Path,
) -> str:
    """Copy the kept lines of ``valid_rows`` to the train or eval output, each to a temporary name first,
    then move both into place. Returns the SHA-256 of the train output."""
    digest = hashlib.sha256()
    staged: list[tuple[Path, Path]] = []
    try:
        with _staged(train_path, staged) as train, _staged(eval_path, staged) as held:
            for position, line in enumerate(_kept_lines(valid_rows, kept)):
                if held_out is not None and held_out[position]:
                    held.write(line)
                else:
                    train.write(line)
                    digest.update(line)
        for staging, path in staged:
            os.replace(staging, path)
    finally:
        for staging, _ in staged:
            staging.unlink(missing_ok=True)
    return digest.hexdigest()


def _staged(path: Path, staged: list[tuple[Path, Path]]) -> IO[bytes]:
    """A new temporary file next to ``path``, recorded in ``staged``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    staged.append((Path(tmp), path))
    return os.fdopen(handle, "wb")


def _kept_lines(lines: Iterable[bytes], kept: Iterable[int] | None) -> Iterator[bytes]:
    """The lines whose numbers (from 0) are in ``kept``, ascending; every line when ``kept`` is None."""
    if kept is None:
        yield from lines
        return
    wanted = iter(kept)
    next_wanted = next(wanted, None)
    for number, line in enumerate(lines):
        if next_wanted is None:
            return
        if number == next_wanted:
            yield line
            next_wanted = next(wanted, None)


def _length_stats(counts: Counter[int], name: str) -> dict[str, float]:
    """min, mean, p50, p95 and max of the lengths counted in ``counts`` (length -> how many rows)."""
    if not counts:
        return {}
    ordered = sorted(counts.items())
    total = sum(counts.values())

    def pct(q: float) -> int:
        index = min(total - 1, int(q * total))  # of the value in the sorted list of every row's length
        seen = 0
        for value, count in ordered:
            seen += count
            if seen > index:
                return value
        raise AssertionError("unreachable")

    return {
        f"{name}_min": ordered[0][0],
        f"{name}_mean": round(sum(value * count for value, count in ordered) / total, 2),
        f"{name}_p50": pct(0.5),
        f"{name}_p95": pct(0.95),
        f"{name}_max": ordered[-1][0],
    }
