"""What the endpoint benchmarks (judge, synthesis) share: a ScriptedChatServer in its own process, and the
speed-up over sequential requests with its goal.

The server runs in a child process (a judge or a teacher is a remote server), so the benchmark process's CPU
seconds are the client's alone; it answers with a function of a benchmark module after ``latency_seconds``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Runs the server: prints its base URL, then, when its standard input says ``stop``, the most requests it had
#: in flight and the chat requests it answered.
_SERVER = """
import importlib, sys
from kfp_components.testing.openai_server import ScriptedChatServer

respond = getattr(importlib.import_module(sys.argv[2]), sys.argv[3])
models = tuple(sys.argv[4].split(","))
with ScriptedChatServer(respond, models=models, latency_seconds=float(sys.argv[1])) as server:
    print(server.base_url, flush=True)
    sys.stdin.readline()
    print(server.max_in_flight, len(server.chat_requests), flush=True)
"""


@contextmanager
def scripted_server(
    respond: str, latency_seconds: float, models: Sequence[str] = ("judge",)
) -> Iterator[tuple[str, dict[str, int]]]:
    """A server answering with ``respond`` (``module:function``) in a child process; yields its base URL and,
    once stopped, what it counted (``max_in_flight``, ``requests``)."""
    module, _, function = respond.partition(":")
    process = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(latency_seconds), module, function, ",".join(models)],
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


def with_speed_ups(runs: list[dict[str, Any]], concurrency: int, speed_up: float) -> dict[str, Any]:
    """Adds each run's ``speed_up`` over the sequential one (``max_concurrency`` 1, which must be there) and
    returns the goal: at least ``speed_up`` at ``concurrency`` (``met`` None when not measured)."""
    sequential = next(r for r in runs if r["max_concurrency"] == 1)
    for entry in runs:
        entry["speed_up"] = round(sequential["seconds"] / entry["seconds"], 2)
    at_goal = next((r for r in runs if r["max_concurrency"] == concurrency), None)
    return {
        "max_concurrency": concurrency,
        "speed_up": speed_up,
        "met": None if at_goal is None else at_goal["speed_up"] >= speed_up,
    }


def goal_text(result: dict[str, Any], what: str = "rate") -> str:
    """``Goal: at least 8x the sequential rate at concurrency 16: met (8.76x).``"""
    goal = result["goal"]
    at_goal = next((r for r in result["runs"] if r["max_concurrency"] == goal["max_concurrency"]), None)
    verdict = (
        "not measured"
        if at_goal is None
        else f"{'met' if goal['met'] else 'not met'} ({at_goal['speed_up']:g}x)"
    )
    return f"Goal: at least {goal['speed_up']:g}x the sequential {what} at concurrency {goal['max_concurrency']}: {verdict}."
