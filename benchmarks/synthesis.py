"""Reasoning-data synthesis: problems per second against a teacher endpoint as ``max_concurrency`` grows, and a
local tiny teacher's generation rate against plain ``model.generate``.

The endpoint part runs :func:`~kfp_components.feedback.synthesis.synthesize` end to end (reading the problems,
the teacher's requests with ``num_samples`` choices each, rejection sampling, the chunked and fsynced writes)
against a :class:`~kfp_components.testing.openai_server.ScriptedChatServer` in its own process that answers each
request after ``latency_seconds`` with a short worked solution. Concurrency 1 is the sequential baseline; each
concurrency gets a fresh server and output folder, and one untimed problem first (imports, the first
connection).

The local part samples the same prompts with the same number of new tokens per sample (``max_tokens``; EOS does
not end a row on either side, so both generate exactly as many tokens) from the tiny Qwen2-shaped test model:
once through the teacher (the RL engine's rollout code, :class:`~kfp_components.trainer.rollout.HFRollouts`),
once through ``model.generate`` (sampling, ``num_return_sequences``), in the same batches, fp32 on the CPU with
1 torch thread, after one warm-up batch each.

python -m benchmarks.run synthesis   # results/synthesis.json and docs/performance.md
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.scripted_endpoint import goal_text, scripted_server, with_speed_ups

NAME = "synthesis"
ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = 128
NUM_SAMPLES = 4
LATENCY_SECONDS = 0.05
CONCURRENCY = (1, 4, 16, 32)
CHUNK_SIZE = 32
GOAL_SPEED_UP = 8.0
GOAL_CONCURRENCY = 16
LOCAL_PROBLEMS = 16
LOCAL_MAX_TOKENS = 32
LOCAL_BATCH_SIZE = 8
_PROBLEM = re.compile(r"what is (\d+) \+ (\d+)\?")


def problem_rows(count: int) -> list[dict[str, Any]]:
    return [
        {"prompt": f"Problem {i}: what is {i} + {3 * i + 2}?", "answer": str(4 * i + 2)} for i in range(count)
    ]


def solution(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
    """The scripted teacher: a short worked solution with the right answer."""
    match = _PROBLEM.search(str(messages[-1]["content"]))
    a, b = (int(group) for group in match.groups()) if match else (0, 0)
    return f"We start from {a}.\nAdding {b} to {a} gives {a + b}.\n#### {a + b}"


def measure(concurrency: int, problems: int, latency_seconds: float) -> dict[str, Any]:
    """One synthesis of ``problems`` problems at ``concurrency``."""
    from kfp_components.feedback.synthesis import RejectionOptions, synthesize
    from kfp_components.feedback.teacher import TeacherOptions

    with (
        tempfile.TemporaryDirectory(prefix="synthesis-bench-") as scratch,
        scripted_server("benchmarks.synthesis:solution", latency_seconds, models=("teacher",)) as (
            url,
            counted,
        ),
    ):
        data = Path(scratch) / "problems.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in problem_rows(problems)))
        options = TeacherOptions(
            base_url=url,
            model="teacher",
            num_samples=NUM_SAMPLES,
            max_tokens=64,
            max_concurrency=concurrency,
            timeout_seconds=30.0,
            retries=0,
        )
        warm_up = Path(scratch) / "warm-up.jsonl"  # imports, the first connection: one problem, not timed
        warm_up.write_text(json.dumps(problem_rows(1)[0]) + "\n")
        synthesize(warm_up, Path(scratch) / "warm-up-out.jsonl", options, RejectionOptions(), progress=False)
        started = time.perf_counter()
        summary = synthesize(
            data,
            Path(scratch) / "out.jsonl",
            options,
            RejectionOptions(),
            chunk_size=CHUNK_SIZE,
            progress=False,
        )
        seconds = time.perf_counter() - started
    if summary.traces_kept != problems:  # the samples of a problem are the same text: duplicates
        raise RuntimeError(
            f"concurrency {concurrency}: {summary.traces_kept} traces kept for {problems} problems"
        )
    return {
        "max_concurrency": concurrency,
        "seconds": round(seconds, 3),
        "problems_per_second": round(problems / seconds, 1),
        "traces_per_second": round(summary.traces_generated / seconds, 1),
        "server_max_in_flight": counted["max_in_flight"],
        "server_requests": counted["requests"] - 1,  # the warm-up's
    }


def measure_local(problems: int = LOCAL_PROBLEMS, max_tokens: int = LOCAL_MAX_TOKENS) -> dict[str, Any]:
    """Tokens per second of the local teacher (the rollout code) and of ``model.generate`` on the same prompts."""
    import torch

    from kfp_components.feedback.teacher import Teacher, TeacherOptions, conversation
    from kfp_components.testing.tiny_model import tiny_model_path

    torch.set_num_threads(1)
    path = str(tiny_model_path("qwen2", 0))
    options = TeacherOptions(
        backend="local",
        model=path,
        num_samples=NUM_SAMPLES,
        max_tokens=max_tokens,
        temperature=1.0,
        batch_size=LOCAL_BATCH_SIZE,
        device="cpu",
    )
    rows = problem_rows(problems)
    teacher = Teacher(options)
    tokenizer, rollouts = teacher._load()
    rollouts.eos_ids = frozenset()  # every row generates max_tokens tokens, as generate() with min_new_tokens
    model = rollouts.model

    teacher.solve(rows[:LOCAL_BATCH_SIZE], seed=1)  # warm-up
    started = time.perf_counter()
    teacher.solve(rows, seed=0)
    teacher_seconds = time.perf_counter() - started
    teacher_tokens = problems * NUM_SAMPLES * max_tokens

    texts = tokenizer.apply_chat_template(
        [conversation(options, row) for row in rows], tokenize=False, add_generation_prompt=True
    )
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(batch: Sequence[str], seed: int) -> int:
        encoded = tokenizer(list(batch), return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = model.generate(
                **encoded,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                num_return_sequences=NUM_SAMPLES,
                pad_token_id=pad,
            )
        return int(out.shape[0] * (out.shape[1] - encoded["input_ids"].shape[1]))

    generate(texts[:LOCAL_BATCH_SIZE], 1)  # warm-up
    started = time.perf_counter()
    generated = sum(
        generate(texts[start : start + LOCAL_BATCH_SIZE], start)
        for start in range(0, len(texts), LOCAL_BATCH_SIZE)
    )
    generate_seconds = time.perf_counter() - started
    teacher.close()
    return {
        "problems": problems,
        "num_samples": NUM_SAMPLES,
        "max_tokens": max_tokens,
        "batch_size": LOCAL_BATCH_SIZE,
        "teacher_seconds": round(teacher_seconds, 3),
        "teacher_tokens_per_second": round(teacher_tokens / teacher_seconds, 1),
        "generate_seconds": round(generate_seconds, 3),
        "generate_tokens_per_second": round(generated / generate_seconds, 1),
        "ratio": round((teacher_tokens / teacher_seconds) / (generated / generate_seconds), 2),
    }


def run(
    problems: int = PROBLEMS,
    latency_seconds: float = LATENCY_SECONDS,
    concurrencies: Sequence[int] = CONCURRENCY,
    local: bool = True,
    local_problems: int = LOCAL_PROBLEMS,
    local_max_tokens: int = LOCAL_MAX_TOKENS,
) -> dict[str, Any]:
    if 1 not in concurrencies:
        raise ValueError("the concurrencies must include 1, the sequential baseline")
    runs = [measure(c, problems, latency_seconds) for c in concurrencies]
    goal = with_speed_ups(runs, GOAL_CONCURRENCY, GOAL_SPEED_UP)
    result: dict[str, Any] = {
        "endpoint": {
            "problems": problems,
            "num_samples": NUM_SAMPLES,
            "chunk_size": CHUNK_SIZE,
            "latency_seconds": latency_seconds,
            "runs": runs,
            "goal": goal,
        }
    }
    if local:
        result["local"] = measure_local(local_problems, local_max_tokens)
    return result


def render(result: dict[str, Any]) -> str:
    parts = ["## Reasoning data synthesis", "", render_endpoint(result["endpoint"])]
    if "local" in result:
        parts += ["", "### A local teacher", "", render_local(result["local"])]
    return "\n".join(parts)


def render_endpoint(result: dict[str, Any]) -> str:
    lines = [
        f"`synthesize` end to end (reading the problems, one request of {result['num_samples']} samples per "
        f"problem, rejection sampling, chunks of {result['chunk_size']} problems appended and fsynced) for "
        f"{result['problems']} problems against `ScriptedChatServer` in its own process, answering each request "
        f"after {result['latency_seconds'] * 1000:g} ms, at each `max_concurrency`; 1 is the sequential baseline. "
        "*In flight* is the most requests the server was answering at once (a chunk's problems are the most "
        f"that can be). {goal_text(result)}",
        "",
        "| max_concurrency | problems/s | traces/s | speed-up | seconds | in flight |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for entry in result["runs"]:
        lines.append(
            f"| {entry['max_concurrency']} | {entry['problems_per_second']:,} | {entry['traces_per_second']:,} | "
            f"{entry['speed_up']:g}x | {entry['seconds']} | {entry['server_max_in_flight']} |"
        )
    return "\n".join(lines)


def render_local(result: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"The tiny Qwen2-shaped test model as a local teacher: {result['problems']} problems, "
            f"{result['num_samples']} samples of exactly {result['max_tokens']} new tokens each, "
            f"{result['batch_size']} problems per call, fp32 on the CPU with 1 torch thread. *Teacher* samples "
            "through the RL engine's rollout code (one seed per problem, KV cache, finished rows leave the batch); "
            "*generate* is `model.generate` with `num_return_sequences` on the same prompts.",
            "",
            "| path | tokens/s | seconds |",
            "| --- | --- | --- |",
            f"| teacher (rollout code) | {result['teacher_tokens_per_second']:,} | {result['teacher_seconds']} |",
            f"| `model.generate` | {result['generate_tokens_per_second']:,} | {result['generate_seconds']} |",
            "",
            f"The teacher generates at {result['ratio']:g}x the rate of `model.generate`.",
        ]
    )
