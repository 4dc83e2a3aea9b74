"""Tokenisation throughput: chat template, assistant-only labels and checks over a multi-turn chat dataset."""

from __future__ import annotations

import gc
import json
import os
import random
import resource
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from kfp_components.testing.tiny_model import build_corpus, tiny_model_path
from kfp_components.trainer.tokenize import tokenize_jsonl

NAME = "tokenization"
ROWS = 20_000
MAX_SEQ_LEN = 4096
WORKERS = (1, 2)


def _make_dataset(path: Path, rows: int) -> int:
    """Write long-tailed multi-turn chats made of the tiny tokenizer's own corpus lines; returns bytes.

    A system prompt in a quarter of the rows, 1 to 4 exchanges, answers of 1 to 40 lines (Pareto).
    """
    rng = random.Random(0)
    lines = build_corpus()
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            messages = [{"role": "system", "content": "You are a helpful assistant."}] if i % 4 == 0 else []
            for _ in range(rng.choice((1, 1, 2, 3, 4))):
                answer_lines = min(int(rng.paretovariate(1.5)), 40)
                messages.append({"role": "user", "content": rng.choice(lines)})
                messages.append(
                    {"role": "assistant", "content": "\n".join(rng.choices(lines, k=answer_lines))}
                )
            out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return path.stat().st_size


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished worker processes."""
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )


def run() -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path("qwen2"))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "chat.jsonl"
        size = _make_dataset(source, ROWS)
        for workers in WORKERS:
            gc.collect()
            cpu_before = _cpu_seconds()
            started = time.perf_counter()
            data = tokenize_jsonl(source, tokenizer, max_seq_len=MAX_SEQ_LEN, num_workers=workers)
            seconds = time.perf_counter() - started
            cpu_seconds = _cpu_seconds() - cpu_before
            stats = data.stats
            del data  # each run starts from the same process state
            runs.append(
                {
                    "num_workers": workers,
                    "seconds": round(seconds, 2),
                    "cpu_seconds": round(cpu_seconds, 2),
                    "samples_per_second": round(stats["samples_kept"] / seconds),
                    "tokens_per_second": round(stats["tokens"] / seconds),
                }
            )
    return {
        "rows": ROWS,
        "megabytes": round(size / 1e6, 1),
        "tokens": stats["tokens"],
        "label_tokens": stats["label_tokens"],
        "mean_len": stats["mean_len"],
        "max_len": stats["max_len"],
        "cpus": os.cpu_count(),
        "runs": runs,
    }


def render(result: dict) -> str:
    lines = [
        "## Tokenisation throughput",
        "",
        f"`tokenize_jsonl` on {result['rows']:,} synthetic multi-turn chat rows ({result['megabytes']} MB of "
        f"JSONL, 1 to 4 exchanges, mean {result['mean_len']:g} tokens, longest {result['max_len']:,}) with the "
        "tiny Qwen2 tokenizer: chat template, assistant-turn spans by prefix rendering, round-trip checks. "
        f"{result['tokens']:,} tokens, {result['label_tokens'] / result['tokens']:.0%} of them labelled; "
        f"{result['cpus']} CPUs. Timings include starting the worker processes; CPU seconds add up the "
        "main process and the workers (more CPU than wall-clock seconds means the workers ran in parallel).",
        "",
        "| workers | samples/s | tokens/s | seconds | CPU seconds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for run_ in result["runs"]:
        lines.append(
            f"| {run_['num_workers']} | {run_['samples_per_second']:,} | {run_['tokens_per_second']:,} | "
            f"{run_['seconds']} | {run_['cpu_seconds']} |"
        )
    return "\n".join(lines)
