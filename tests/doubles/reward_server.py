"""A reward endpoint on 127.0.0.1 for the ``http`` reward's tests: it answers
``POST {"prompts": [...], "completions": [...], <columns>}`` with ``{"rewards": [...]}``.

The score of a completion is its length by default (``score``). ``script`` scripts the answers to the first
requests, one item per request, then normal answers follow: ``500`` (an error answer with that status),
``"sleep:<seconds>"`` (answer normally, but late), ``"short"`` (one reward too few), ``"garbage"`` (not
JSON). ``token`` makes the server refuse (401) requests without ``Authorization: Bearer <token>``. The server
records every request body and header and the most requests it had in flight at once.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kfp_components.testing.servers import serving


@dataclass
class RewardServer:
    url: str
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    max_in_flight: int = 0
    in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextlib.contextmanager
def reward_server(
    *,
    script: list[int | str] | None = None,
    score: Callable[[str], float | None] = lambda completion: float(len(completion)),
    token: str = "",
    delay: float = 0.0,
) -> Iterator[RewardServer]:
    """Serve the reward endpoint at ``<url>/score`` (see the module docstring); ``delay`` slows every answer."""
    state = RewardServer(url="")
    pending = list(script or [])

    class Handler(BaseHTTPRequestHandler):
        counted = False

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length))
            with state.lock:
                state.bodies.append(body)
                state.headers.append(dict(self.headers))
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
                action = pending.pop(0) if pending else None
            self.counted = True
            try:
                self._answer(body, action)
            finally:
                self._leave()

        def _leave(self) -> None:
            """The request stops counting as in flight once its answer is decided, before it is written:
            a client reading the answer may send its next request before this thread runs again."""
            if self.counted:
                self.counted = False
                with state.lock:
                    state.in_flight -= 1

        def _answer(self, body: dict[str, Any], action: int | str | None) -> None:
            if token and self.headers.get("Authorization") != f"Bearer {token}":
                self._send(401, {"error": "unauthorized"})
                return
            if self.path != "/score":
                self._send(404, {"error": f"no such endpoint {self.path}"})
                return
            if isinstance(action, int):  # the body quotes the token back, as careless servers do
                echoed = self.headers.get("Authorization", "").removeprefix("Bearer ")
                self._send(action, {"error": f"scripted failure {action}", "seen": echoed})
                return
            time.sleep(delay)
            rewards = [score(c) for c in body["completions"]]
            if isinstance(action, str) and action.startswith("sleep:"):
                time.sleep(float(action.split(":", 1)[1]))
            elif action == "short":
                rewards = rewards[:-1]
            elif action == "garbage":
                self._send_raw(200, b"<html>not json</html>")
                return
            self._send(200, {"rewards": rewards})

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            self._send_raw(status, json.dumps(payload).encode())

        def _send_raw(self, status: int, data: bytes) -> None:
            self._leave()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout test)

        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 64  # the default backlog of 5 drops connections of a burst (a 1 s SYN retry)

    with serving(Server(("127.0.0.1", 0), Handler)) as host:
        state.url = f"http://{host}/score"
        yield state
