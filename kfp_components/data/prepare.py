"""The dataset stage: fetch, detect the format, validate every row, cut a subset, split, write.

``prepare_dataset`` is what the ``dataset_download`` component, the CLIs and the demo call. It checks the
options before touching the network, reads every row of every file, and either writes both outputs
completely or writes nothing at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfp_components.data.config import DatasetConfig
from kfp_components.data.errors import DatasetError
from kfp_components.data.fetch import fetch
from kfp_components.data.formats import FORMATS, MESSAGES, REQUIRED_KEYS, check_row, detect_row_format
from kfp_components.data.readers import DataFile, Location, RowError, read_rows
from kfp_components.data.uris import parse_dataset_uri

log = logging.getLogger(__name__)

#: How many problems an error message lists before it says "and N more".
PROBLEMS_SHOWN = 20
_PROGRESS_EVERY_S = 5.0


class DatasetValidationError(DatasetError):
    """Rows failed validation. ``problems`` holds every ``(location, message)`` found."""

    def __init__(self, problems: list[tuple[Location, str]], rows_read: int, data_format: str):
        self.problems = problems
        self.rows_read = rows_read
        shown = "\n".join(f"  {location}: {message}" for location, message in problems[:PROBLEMS_SHOWN])
        more = len(problems) - PROBLEMS_SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"{len(problems)} invalid row(s) of {rows_read} in {data_format!r} format; "
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
    neither output file is created.
    """
    config.validate()
    uri = parse_dataset_uri(config.dataset_name_or_path)
    train_path, eval_path = Path(train_path), Path(eval_path)
    started = time.monotonic()
    log.info("dataset: reading %s", uri.redacted())
    with tempfile.TemporaryDirectory(prefix="kfp-dataset-", dir=scratch_dir) as scratch:
        files = fetch(uri, Path(scratch), split=config.dataset_split)
        log.info("dataset: %d file(s): %s", len(files), ", ".join(f.name for f in files[:10]))
        scan = _scan(files, config.data_format, config.dataset_on_invalid)
    rows = _subset(scan.rows, config)
    train_rows, eval_rows = split_rows(rows, config.train_split_ratio, config.seed)
    _write_outputs({train_path: train_rows, eval_path: eval_rows})
    metrics = {
        "num_files": len(files),
        "rows_read": scan.rows_read,
        "rows_valid": len(scan.rows),
        "rows_dropped": len(scan.problems),
        "rows_after_subset": len(rows),
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        **_length_stats(scan.turns, "turns"),
        **_length_stats(scan.chars, "chars"),
        "seconds": round(time.monotonic() - started, 3),
    }
    sha256 = file_sha256(train_path)
    log.info(
        "dataset: %s format, %d rows read, %d dropped, %d train, %d eval; train sha256 %s",
        scan.data_format,
        scan.rows_read,
        len(scan.problems),
        len(train_rows),
        len(eval_rows),
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
    rows: list[str] = field(default_factory=list)  # valid rows, serialised, in source order
    turns: list[int] = field(default_factory=list)
    chars: list[int] = field(default_factory=list)
    problems: list[tuple[Location, str]] = field(default_factory=list)
    rows_read: int = 0


def _scan(files: list[DataFile], data_format: str, on_invalid: str) -> _Scan:
    """Read and check every row of every file; keep the valid ones."""
    scan = _Scan(data_format="" if data_format == "auto" else data_format)
    detected_at: Location | None = None
    last_report = time.monotonic()
    for location, row in _all_rows(files):
        scan.rows_read += 1
        if time.monotonic() - last_report > _PROGRESS_EVERY_S:
            last_report = time.monotonic()
            log.info("dataset: checked %d rows (%s)", scan.rows_read, location)
        if isinstance(row, RowError):
            scan.problems.append((location, row.message))
            continue
        row_format = detect_row_format(row)
        if (
            data_format != "auto"
            and row_format not in (None, data_format)
            and not scan.rows
            and not scan.problems
        ):
            raise DatasetError(
                f"{location}: the rows are in {row_format!r} format, not {data_format!r} "
                f"(keys {', '.join(REQUIRED_KEYS[data_format])}); nothing was written"
            )
        if not scan.data_format:
            if row_format is None:
                scan.problems.append((location, _undetectable(row)))
                continue
            scan.data_format, detected_at = row_format, location
        if data_format == "auto" and row_format not in (None, scan.data_format):
            scan.problems.append(
                (
                    location,
                    f"row is in {row_format!r} format but the dataset is {scan.data_format!r} "
                    f"(detected from {detected_at}); mixed formats are not allowed",
                )
            )
            continue
        problems = check_row(row, scan.data_format)
        if problems:
            scan.problems.append((location, "; ".join(problems)))
            continue
        scan.rows.append(json.dumps(row, ensure_ascii=False, default=str))
        scan.turns.append(_turns(row, scan.data_format))
        scan.chars.append(_chars(row))
    if not scan.data_format:
        scan.data_format = "unknown"
    if scan.problems and on_invalid == "fail":
        raise DatasetValidationError(scan.problems, scan.rows_read, scan.data_format)
    if scan.problems:
        log.warning(
            "dataset: dropped %d invalid row(s) of %d; first: %s: %s",
            len(scan.problems),
            scan.rows_read,
            *scan.problems[0],
        )
    if not scan.rows:
        raise DatasetError(f"no valid rows: {scan.rows_read} row(s) read, all invalid")
    return scan


def _all_rows(files: Iterable[DataFile]):
    for data_file in files:
        yield from read_rows(data_file)


def _undetectable(row: Any) -> str:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    keys = ", ".join(sorted(row)[:8]) or "none"
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


def _subset(rows: list[str], config: DatasetConfig) -> list[str]:
    size = config.dataset_subset_size
    if not size or size >= len(rows):
        if size > len(rows):
            log.warning(
                "dataset: dataset_subset_size %d is more than the %d valid rows; keeping all", size, len(rows)
            )
        return rows
    if config.dataset_subset_mode == "first":
        return rows[:size]
    picked = sorted(random.Random(config.seed).sample(range(len(rows)), size))
    return [rows[i] for i in picked]


def split_rows(rows: list[str], train_split_ratio: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded split into train and eval; each keeps the source order. Ratio 1.0 gives no eval rows.

    With a ratio below 1 and at least two rows, both splits get at least one row.
    """
    if train_split_ratio >= 1 or len(rows) < 2:
        return list(rows), []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_train = min(max(round(len(rows) * train_split_ratio), 1), len(rows) - 1)
    train = sorted(order[:n_train])
    held_out = sorted(order[n_train:])
    return [rows[i] for i in train], [rows[i] for i in held_out]


def _write_outputs(outputs: dict[Path, list[str]]) -> None:
    """Write every output to a temporary name first, then move them all into place."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, rows in outputs.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            staged.append((Path(tmp), path))
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                for row in rows:
                    out.write(row)
                    out.write("\n")
        for staging, path in staged:
            os.replace(staging, path)
    finally:
        for staging, _ in staged:
            staging.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _length_stats(values: list[int], name: str) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        f"{name}_min": ordered[0],
        f"{name}_mean": round(sum(ordered) / len(ordered), 2),
        f"{name}_p50": pct(0.5),
        f"{name}_p95": pct(0.95),
        f"{name}_max": ordered[-1],
    }
