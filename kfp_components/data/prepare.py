"""The dataset stage: fetch, detect the format, validate every row, cut a subset, split, write.

``prepare_dataset`` is what the ``dataset_download`` component, the CLIs and the demo call. It checks the
options before touching the network, reads every row of every file, and either writes both outputs
completely or writes nothing at all.

Memory does not grow with the data: valid rows go to a scratch file as they are checked, the subset and
the split are chosen by row number (a few bytes per row: the shuffled order, then one bit per row), and a
second pass over the scratch file writes the outputs. The length statistics count each distinct length
once, and an error keeps the first :data:`PROBLEMS_KEPT` problems and counts the rest.
"""

from __future__ import annotations

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
from kfp_components.data.errors import DatasetError
from kfp_components.data.fetch import DownloadLimits, fetch
from kfp_components.data.formats import FORMATS, MESSAGES, REQUIRED_KEYS, check_row, detect_row_format
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


def prepare_dataset(
    config: DatasetConfig,
    train_path: str | Path,
    eval_path: str | Path,
    *,
    scratch_dir: str | Path | None = None,
) -> PreparedDataset:
    """Fetch ``config.dataset_name_or_path``, validate every row and write the train and eval splits as JSONL.

    Raises :class:`~kfp_components.typed_config.ConfigError` for bad options (before any download),
    :class:`DatasetError` for a bad URI or unreachable data, and :class:`DatasetValidationError` when rows
    are invalid and ``dataset_on_invalid`` is ``fail``. On any error
    neither output file is created. ``scratch_dir`` (default: the system's temporary folder) holds the
    downloads and a copy of the valid rows while the stage runs.
    """
    config.validate()
    uri = parse_dataset_uri(config.dataset_name_or_path)
    train_path, eval_path = Path(train_path), Path(eval_path)
    started = time.monotonic()
    log.info("dataset: reading %s", uri.redacted())
    limits = DownloadLimits(config.dataset_download_timeout_seconds, config.dataset_stall_timeout_seconds)
    with tempfile.TemporaryDirectory(prefix="kfp-dataset-", dir=scratch_dir) as scratch:
        files = fetch(uri, Path(scratch), split=config.dataset_split, limits=limits)
        log.info("dataset: %d file(s): %s", len(files), ", ".join(f.name for f in files[:10]))
        with tempfile.TemporaryFile(dir=scratch) as valid_rows:  # no name: nothing a download can clash with
            scan = _scan(files, config.data_format, config.dataset_on_invalid, valid_rows)
            kept = _subset(scan.rows_valid, config)
            rows_kept = scan.rows_valid if kept is None else len(kept)
            held_out = eval_mask(rows_kept, config.train_split_ratio, config.seed)
            eval_rows = 0 if held_out is None else len(held_out)
            train_rows = rows_kept - eval_rows
            valid_rows.seek(0)
            sha256 = _write_outputs(valid_rows, kept, held_out, train_path, eval_path)
    metrics = {
        "num_files": len(files),
        "rows_read": scan.rows_read,
        "rows_valid": scan.rows_valid,
        "rows_dropped": scan.problem_count,
        "rows_after_subset": rows_kept,
        "train_rows": train_rows,
        "eval_rows": eval_rows,
        **_length_stats(scan.turns, "turns"),
        **_length_stats(scan.chars, "chars"),
        "seconds": round(time.monotonic() - started, 3),
    }
    log.info(
        "dataset: %s format, %d rows read, %d dropped, %d train, %d eval; train sha256 %s",
        scan.data_format,
        scan.rows_read,
        scan.problem_count,
        train_rows,
        eval_rows,
        sha256,
    )
    return PreparedDataset(
        train_path=train_path,
        eval_path=eval_path,
        data_format=scan.data_format,
        train_sha256=sha256,
        source=uri.redacted(),
        files=[f.name for f in files],
        metrics=metrics,
    )


@dataclass
class _Scan:
    data_format: str
    rows_valid: int = 0
    turns: Counter[int] = field(default_factory=Counter)  # length -> how many valid rows have it
    chars: Counter[int] = field(default_factory=Counter)
    problems: list[tuple[Location, str]] = field(default_factory=list)  # the first PROBLEMS_KEPT
    problem_count: int = 0
    rows_read: int = 0

    def problem(self, location: Location, message: str) -> None:
        self.problem_count += 1
        if len(self.problems) < PROBLEMS_KEPT:
            self.problems.append((location, message))


def _scan(files: list[DataFile], data_format: str, on_invalid: str, spool: IO[bytes]) -> _Scan:
    """Read and check every row of every file; write the valid ones to ``spool``, one JSON line each."""
    scan = _Scan(data_format="" if data_format == "auto" else data_format)
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
        row_format = detect_row_format(row)
        if (
            data_format != "auto"
            and row_format not in (None, data_format)
            and not scan.rows_valid
            and not scan.problem_count
        ):
            raise DatasetError(
                f"{location}: the rows are in {row_format!r} format, not {data_format!r} "
                f"(keys {', '.join(REQUIRED_KEYS[data_format])}); nothing was written"
            )
        if not scan.data_format:
            if row_format is None:
                scan.problem(location, _undetectable(row))
                continue
            scan.data_format, detected_at = row_format, location
        if data_format == "auto" and row_format not in (None, scan.data_format):
            scan.problem(
                location,
                f"row is in {row_format!r} format but the dataset is {scan.data_format!r} "
                f"(detected from {detected_at}); mixed formats are not allowed",
            )
            continue
        problems = check_row(row, scan.data_format)
        if problems:
            scan.problem(location, _join_problems(problems))
            continue
        line = _serialise(row)
        if isinstance(line, RowError):
            scan.problem(location, line.message)
            continue
        spool.write(line)
        scan.rows_valid += 1
        scan.turns[_turns(row, scan.data_format)] += 1
        scan.chars[_chars(row)] += 1
    if not scan.data_format:
        scan.data_format = "unknown"
    if scan.problem_count and on_invalid == "fail":
        raise DatasetValidationError(scan.problems, scan.rows_read, scan.data_format, scan.problem_count)
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


def _undetectable(row: Any) -> str:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    keys = ", ".join(shorten(str(key), 40) for key in sorted(row)[:8]) or "none"
    return (
        f"cannot tell the format from the keys ({keys}): expected 'messages', or 'prompt' + 'chosen' + "
        f"'rejected', or 'prompt' (formats: {', '.join(FORMATS)})"
    )


def _turns(row: dict[str, Any], data_format: str) -> int:
    if data_format == MESSAGES:
        return len(row[MESSAGES])
    prompt = row["prompt"]
    return (len(prompt) if isinstance(prompt, list) else 1) + 1


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(
            _chars(v)
            for k, v in value.items()
            if k in ("messages", "prompt", "chosen", "rejected", "answer", "content")
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
