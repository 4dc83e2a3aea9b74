"""The judge's endpoint client: requests per second against an OpenAI-compatible server as ``max_concurrency``
grows, and the share of a direct-RLAIF training step spent waiting for the judge.

:class:`~kfp_components.feedback.endpoint.OpenAIChatClient` (the official ``openai`` client, our retry loop and
thread pool) sends the same batch of short judging conversations to a
:class:`~kfp_components.testing.openai_server.ScriptedChatServer` that takes ``latency_seconds`` to answer each
request, once per ``max_concurrency``; concurrency 1 is the sequential baseline. The server runs in its own
process (a judge is a remote server), so the client's CPU seconds per request are this process's alone. Each
concurrency gets a fresh server and client and one warm-up request (``check()``) before the timed batch; the
server reports the most requests it had in flight at once.

The step part trains PPO (the rlaif stage's default) for a few steps on a tiny model with the ``judge`` reward
as the only reward, against the same kind of server and latency, once sequentially and once at the default
concurrency; the engine's per-step metrics give the time spent scoring (``reward_seconds``) and the step's
whole time.

python -m benchmarks.run judge   # results/judge.json and docs/performance.md
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.scripted_endpoint import goal_text, scripted_server, with_speed_ups
from kfp_components.feedback.endpoint import EndpointOptions, OpenAIChatClient

NAME = "judge"
ROOT = Path(__file__).resolve().parents[1]
REQUESTS = 256
LATENCY_SECONDS = 0.05
CONCURRENCY = (1, 4, 8, 16, 32)
#: The goal: at least this speed-up over sequential requests at :data:`GOAL_CONCURRENCY`.
GOAL_SPEED_UP = 8.0
GOAL_CONCURRENCY = 16
MAX_TOKENS = 8


def verdict(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
    """The scripted judge's answer: a score in the last message's words."""
    return f"Score: {len(str(messages[-1]['content']).split()) % 10}"


def length_score(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
    """The step part's pointwise judge: a score from 1 to 10 that grows with the response's length."""
    text = str(messages[-1]["content"])
    response = text.split("[Response]\n", 1)[-1].rsplit("\n\nScore:", 1)[0]
    return str(min(10, 1 + len(response) // 8))


def conversations(count: int) -> list[list[dict[str, Any]]]:
    """``count`` short judging conversations (a system prompt, a prompt and a response to score)."""
    return [
        [
            {"role": "system", "content": "Rate the response from 0 to 9. Answer 'Score: N'."},
            {"role": "user", "content": f"Prompt: what is {i} + {i}?\nResponse: it is {2 * i}."},
        ]
        for i in range(count)
    ]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(concurrency: int, requests: int, latency_seconds: float) -> dict[str, Any]:
    """One timed batch of ``requests`` conversations at ``concurrency``."""
    batch = conversations(requests)
    with scripted_server("benchmarks.judge:verdict", latency_seconds) as (base_url, counted):
        options = EndpointOptions(
            base_url=base_url, model="judge", max_concurrency=concurrency, timeout_seconds=30.0, retries=0
        )
        with OpenAIChatClient(options) as client:
            client.check()  # warm-up: imports, the first connection
            cpu_before = _cpu_seconds()
            started = time.perf_counter()
            replies = client.complete(batch, max_tokens=MAX_TOKENS)
            seconds = time.perf_counter() - started
            cpu_seconds = _cpu_seconds() - cpu_before
            stats = client.stats
    if any(text is None for reply in replies for text in reply.texts) or stats.failures:
        raise RuntimeError(
            f"concurrency {concurrency}: {stats.failures} failures, {stats.malformed} malformed"
        )
    return {
        "max_concurrency": concurrency,
        "seconds": round(seconds, 3),
        "requests_per_second": round(requests / seconds, 1),
        "mean_latency_ms": round(1000 * stats.latency_seconds / stats.answered, 1),
        "max_latency_ms": round(1000 * stats.max_latency_seconds, 1),
        "client_cpu_ms_per_request": round(1000 * cpu_seconds / requests, 2),
        "server_max_in_flight": counted["max_in_flight"],
        "server_requests": counted["requests"],
    }


#: The step part: PPO on the tiny model, this many steps of STEP_PROMPTS x STEP_GENERATIONS completions.
STEPS = 6
STEP_PROMPTS = 8
STEP_GENERATIONS = 4
STEP_MAX_NEW_TOKENS = 32
STEP_CONCURRENCY = (1, 8)


def measure_steps(
    concurrency: int, latency_seconds: float, steps: int = STEPS, workdir: Path | None = None
) -> dict[str, Any]:
    """PPO with the judge as the only reward, ``steps`` steps: medians over the steps after the first."""
    import json
    import statistics
    import tempfile

    import torch

    from kfp_components.testing.tiny_model import tiny_model_path
    from kfp_components.trainer.config import TrainingConfig
    from kfp_components.trainer.train import train

    torch.set_num_threads(1)
    with (
        tempfile.TemporaryDirectory(prefix="judge-step-", dir=workdir) as scratch,
        scripted_server("benchmarks.judge:length_score", latency_seconds) as (base_url, counted),
    ):
        judge = {"function": "judge", "base_url": base_url, "model": "judge", "max_concurrency": concurrency}
        config = TrainingConfig(
            model_name_or_path=str(tiny_model_path("qwen2", 0)),
            data_path=str(ROOT / "examples" / "arithmetic_prompts.jsonl"),
            output_dir=scratch,
            algorithm="ppo",
            reward_functions=[judge],
            num_generations=STEP_GENERATIONS,
            effective_batch_size=STEP_PROMPTS * STEP_GENERATIONS,
            max_new_tokens=STEP_MAX_NEW_TOKENS,
            max_seq_len=256,
            max_tokens_per_gpu=4096,
            learning_rate=1e-3,
            lr_scheduler="constant",
            max_steps=steps,
            torch_dtype="float32",
            save_final_model=False,
            checkpoint_every_steps=0,
            seed=0,
        )
        config.validate()
        train(config)
        rows = [json.loads(line) for line in (Path(scratch) / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "reward_seconds" in row][1:] or rows  # the first step warms up
    step = statistics.median(row["seconds"] for row in rows)
    waiting = statistics.median(row["reward_seconds"] for row in rows)
    last = rows[-1]
    return {
        "max_concurrency": concurrency,
        "completions_per_step": STEP_PROMPTS * STEP_GENERATIONS,
        "step_seconds": round(step, 3),
        "judge_seconds": round(waiting, 3),
        "judge_share": round(waiting / step, 3),
        "generation_seconds": round(statistics.median(row["generation_seconds"] for row in rows), 3),
        "training_seconds": round(statistics.median(row["training_seconds"] for row in rows), 3),
        "requests": int(last["reward/judge/requests"]),
        "cache_hits": int(last["reward/judge/cache_hits"]),
        "server_max_in_flight": counted["max_in_flight"],
    }


def run_steps(
    latency_seconds: float = LATENCY_SECONDS, concurrencies: Sequence[int] = STEP_CONCURRENCY
) -> dict[str, Any]:
    return {
        "latency_seconds": latency_seconds,
        "steps": STEPS,
        "max_new_tokens": STEP_MAX_NEW_TOKENS,
        "runs": [measure_steps(c, latency_seconds) for c in concurrencies],
    }


def run(
    requests: int = REQUESTS,
    latency_seconds: float = LATENCY_SECONDS,
    concurrencies: Sequence[int] = CONCURRENCY,
    step_concurrencies: Sequence[int] = STEP_CONCURRENCY,
) -> dict[str, Any]:
    if 1 not in concurrencies:
        raise ValueError("the concurrencies must include 1, the sequential baseline")
    runs = [measure(c, requests, latency_seconds) for c in concurrencies]
    goal = with_speed_ups(runs, GOAL_CONCURRENCY, GOAL_SPEED_UP)
    result: dict[str, Any] = {
        "throughput": {
            "requests": requests,
            "latency_seconds": latency_seconds,
            "max_tokens": MAX_TOKENS,
            "runs": runs,
            "goal": goal,
        }
    }
    if step_concurrencies:
        result["step"] = run_steps(latency_seconds, step_concurrencies)
    return result


def render(result: dict[str, Any]) -> str:
    parts = ["## Judge endpoint client", "", render_throughput(result["throughput"])]
    if "step" in result:
        parts += ["", "### Waiting for the judge in a direct-RLAIF step", "", render_steps(result["step"])]
    return "\n".join(parts)


def render_steps(result: dict[str, Any]) -> str:
    runs = result["runs"]
    lines = [
        f"PPO (the rlaif stage's default) on the tiny Qwen2-shaped model of the GRPO section with the `judge` "
        f"reward as its only reward, against `ScriptedChatServer` answering each request after "
        f"{result['latency_seconds'] * 1000:g} ms; {runs[0]['completions_per_step']} completions of at most "
        f"{result['max_new_tokens']} tokens per step, {result['steps']} steps, fp32 on the CPU with 1 torch "
        "thread. Medians over the steps after the first; *judge* is the step's `reward_seconds` (scoring, "
        "almost all of it waiting for the endpoint), *requests* the run's total (the judge's cache answers "
        "repeated completions).",
        "",
        "| max_concurrency | step (s) | judge (s) | judge share of the step | generation (s) | update (s) | "
        "requests | cache hits | in flight |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in runs:
        lines.append(
            f"| {entry['max_concurrency']} | {entry['step_seconds']} | {entry['judge_seconds']} | "
            f"{entry['judge_share'] * 100:.0f}% | {entry['generation_seconds']} | {entry['training_seconds']} | "
            f"{entry['requests']} | {entry['cache_hits']} | {entry['server_max_in_flight']} |"
        )
    return "\n".join(lines)


def render_throughput(result: dict[str, Any]) -> str:
    lines = [
        f"`OpenAIChatClient` (the official `openai` client; our retries and thread pool) sending "
        f"{result['requests']} short judging conversations (`max_tokens` {result['max_tokens']}) to "
        f"`ScriptedChatServer`, an OpenAI-compatible server in its own process that answers each request after "
        f"{result['latency_seconds'] * 1000:g} ms, at each `max_concurrency`; 1 is the sequential baseline. "
        "*Client CPU* is this process's CPU time per request (building the request, parsing the answer, the "
        "threads); *in flight* is the most requests the server was answering at once. "
        f"{goal_text(result)} {_ceiling_text(result['runs'])}",
        "",
        "| max_concurrency | requests/s | speed-up | seconds | mean latency (ms) | max latency (ms) | "
        "client CPU (ms/request) | in flight |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in result["runs"]:
        lines.append(
            f"| {entry['max_concurrency']} | {entry['requests_per_second']:,} | {entry['speed_up']:g}x | "
            f"{entry['seconds']} | {entry['mean_latency_ms']} | {entry['max_latency_ms']} | "
            f"{entry['client_cpu_ms_per_request']} | {entry['server_max_in_flight']} |"
        )
    return "\n".join(lines)


def _ceiling_text(runs: list[dict[str, Any]]) -> str:
    """What bounds the rate once concurrency hides the server's latency: the client's own CPU per request."""
    busiest = max(runs, key=lambda entry: entry["max_concurrency"])
    ceiling = 1000 / busiest["client_cpu_ms_per_request"]
    return (
        "One process's client work (under one interpreter lock) bounds the rate near 1000 / client CPU ms "
        f"per request: about {ceiling:,.0f} requests/s at concurrency {busiest['max_concurrency']}."
    )
