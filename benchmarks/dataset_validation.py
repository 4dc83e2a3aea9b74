"""Dataset stage throughput: read, validate every row, split and write a long-tailed chat dataset."""

from __future__ import annotations

import json
import random
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from kfp_components.data import DatasetConfig, prepare_dataset

NAME = "dataset_validation"
ROWS = 200_000


def conversations(rows: int) -> Iterator[list[dict[str, str]]]:
    """``rows`` seeded chat conversations of 1-3 turns with long-tailed (Pareto) lengths."""
    rng = random.Random(0)
    for i in range(rows):
        turns = rng.choice((1, 1, 1, 2, 3))
        messages = [{"role": "system", "content": "You are helpful."}] if i % 4 == 0 else []
        for t in range(turns):
            words = int(rng.paretovariate(1.5) * 8)
            messages.append({"role": "user", "content": f"question {i}.{t} " + "word " * words})
            messages.append({"role": "assistant", "content": "answer " * (words * 2 + 1)})
        yield messages


def _make_dataset(path: Path, rows: int) -> int:
    with path.open("w", encoding="utf-8") as out:
        for messages in conversations(rows):
            out.write(json.dumps({"messages": messages}) + "\n")
    return path.stat().st_size


def run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "data.jsonl"
        size = _make_dataset(source, ROWS)
        started = time.perf_counter()
        prepare_dataset(DatasetConfig(str(source), train_split_ratio=0.95), Path(tmp) / "t", Path(tmp) / "e")
        seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "rows": ROWS,
        "megabytes": round(size / 1e6, 1),
        "seconds": round(seconds, 2),
        "rows_per_second": round(ROWS / seconds),
        "megabytes_per_second": round(size / 1e6 / seconds, 1),
        "peak_rss_mib": round(peak_mib),
    }


def render(result: dict) -> str:
    return "\n".join(
        [
            "## Dataset stage throughput",
            "",
            f"`prepare_dataset` on {result['rows']:,} chat rows ({result['megabytes']} MB of JSONL, long-tailed "
            "lengths, 1 to 3 exchanges): read, validate every row, split 95/5, write both files.",
            "",
            "| rows/s | MB/s | seconds | peak RSS (process) |",
            "| --- | --- | --- | --- |",
            f"| {result['rows_per_second']:,} | {result['megabytes_per_second']} | {result['seconds']} | "
            f"{result['peak_rss_mib']} MiB |",
        ]
    )
