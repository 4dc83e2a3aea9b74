"""The judge's endpoint client: requests per second against an OpenAI-compatible server as ``max_concurrency``
grows.

:class:`~kfp_components.feedback.endpoint.OpenAIChatClient` (the official ``openai`` client, our retry loop and
thread pool) sends the same batch of short judging conversations to a
:class:`~kfp_components.testing.openai_server.ScriptedChatServer` that takes ``latency_seconds`` to answer each
request, once per ``max_concurrency``; concurrency 1 is the sequential baseline. The server runs in its own
process (a judge is a remote server), so the client's CPU seconds per request are this process's alone. Each
concurrency gets a fresh server and client and one warm-up request (``check()``) before the timed batch; the
server reports the most requests it had in flight at once.

python -m benchmarks.run judge   # results/judge.json and docs/performance.md
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
#: Runs the server in a child process: prints its base URL, prints its most requests in flight and exits
#: when its standard input says ``stop``.
_SERVER = """
import sys
from benchmarks.judge import verdict
from kfp_components.testing.openai_server import ScriptedChatServer

with ScriptedChatServer(verdict, latency_seconds=float(sys.argv[1])) as server:
    print(server.base_url, flush=True)
    sys.stdin.readline()
    print(server.max_in_flight, len(server.chat_requests), flush=True)
"""


def verdict(messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
    """The scripted judge's answer: a score in the last message's words."""
    return f"Score: {len(str(messages[-1]['content']).split()) % 10}"


def conversations(count: int) -> list[list[dict[str, Any]]]:
    """``count`` short judging conversations (a system prompt, a prompt and a response to score)."""
    return [
        [
            {"role": "system", "content": "Rate the response from 0 to 9. Answer 'Score: N'."},
            {"role": "user", "content": f"Prompt: what is {i} + {i}?\nResponse: it is {2 * i}."},
        ]
        for i in range(count)
    ]


@contextmanager
def _server(latency_seconds: float) -> Iterator[tuple[str, dict[str, int]]]:
    """A ScriptedChatServer in a child process; yields its base URL and, after, what it counted."""
    process = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(latency_seconds)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert process.stdin is not None and process.stdout is not None
    counted: dict[str, int] = {}
    try:
        base_url = process.stdout.readline().strip()
        if not base_url.startswith("http://"):
            raise RuntimeError(f"the scripted server did not start (exit code {process.poll()})")
        yield base_url, counted
        process.stdin.write("stop\n")
        process.stdin.flush()
        max_in_flight, requests = process.stdout.readline().split()
        counted.update(max_in_flight=int(max_in_flight), requests=int(requests))
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(concurrency: int, requests: int, latency_seconds: float) -> dict[str, Any]:
    """One timed batch of ``requests`` conversations at ``concurrency``."""
    batch = conversations(requests)
    with _server(latency_seconds) as (base_url, counted):
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


def run(
    requests: int = REQUESTS,
    latency_seconds: float = LATENCY_SECONDS,
    concurrencies: Sequence[int] = CONCURRENCY,
) -> dict[str, Any]:
    if 1 not in concurrencies:
        raise ValueError("the concurrencies must include 1, the sequential baseline")
    runs = [measure(c, requests, latency_seconds) for c in concurrencies]
    sequential = next(r for r in runs if r["max_concurrency"] == 1)
    for entry in runs:
        entry["speed_up"] = round(sequential["seconds"] / entry["seconds"], 2)
    at_goal = next((r for r in runs if r["max_concurrency"] == GOAL_CONCURRENCY), None)
    return {
        "throughput": {
            "requests": requests,
            "latency_seconds": latency_seconds,
            "max_tokens": MAX_TOKENS,
            "runs": runs,
            "goal": {
                "max_concurrency": GOAL_CONCURRENCY,
                "speed_up": GOAL_SPEED_UP,
                "met": None if at_goal is None else at_goal["speed_up"] >= GOAL_SPEED_UP,
            },
        }
    }


def render(result: dict[str, Any]) -> str:
    return "\n".join(["## Judge endpoint client", "", render_throughput(result["throughput"])])


def render_throughput(result: dict[str, Any]) -> str:
    goal = result["goal"]
    at_goal = next((r for r in result["runs"] if r["max_concurrency"] == goal["max_concurrency"]), None)
    if at_goal is None:
        verdict_text = "not measured"
    else:
        verdict_text = f"{'met' if goal['met'] else 'not met'} ({at_goal['speed_up']:g}x)"
    lines = [
        f"`OpenAIChatClient` (the official `openai` client; our retries and thread pool) sending "
        f"{result['requests']} short judging conversations (`max_tokens` {result['max_tokens']}) to "
        f"`ScriptedChatServer`, an OpenAI-compatible server in its own process that answers each request after "
        f"{result['latency_seconds'] * 1000:g} ms, at each `max_concurrency`; 1 is the sequential baseline. "
        "*Client CPU* is this process's CPU time per request (building the request, parsing the answer, the "
        "threads); *in flight* is the most requests the server was answering at once. "
        f"Goal: at least {goal['speed_up']:g}x the sequential rate at concurrency {goal['max_concurrency']}: "
        f"{verdict_text}. {_ceiling_text(result['runs'])}",
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
