"""An OpenAI-compatible chat server on 127.0.0.1, for tests, the demo and benchmarks: a stand-in for vLLM, KServe
or a hosted API behind :class:`kfp_components.feedback.endpoint.OpenAIChatClient`.

* ``GET /v1/models`` lists the served models (``{"object": "list", "data": [{"id": ..., "object": "model"}]}``).
* ``POST /v1/chat/completions`` answers a ``chat.completion``: ``n`` choices whose texts come from
  ``respond(messages, request_body)`` (called once per choice), ``finish_reason`` ``stop``, the top log-probs of
  the first token when ``logprobs`` is asked (``logprobs.content[0].top_logprobs``), and ``usage`` counted in
  words. A model that is not served gets a 404, as vLLM answers.
* ``api_key``: a request without ``Authorization: Bearer <api_key>`` gets a 401 with an OpenAI-style error body.
* ``latency_seconds``: each chat request waits that long before it is answered; requests are served on their own
  threads, so concurrent requests overlap.
* Faults, consumed in order by the next chat requests: :meth:`ScriptedChatServer.fail_next` (an error status,
  optionally with ``Retry-After``), :meth:`~ScriptedChatServer.hang_next` (answer only after a while, to
  trigger a client's timeout) and :meth:`~ScriptedChatServer.malformed_next` (a 200 with a broken body).

Every request is recorded (:class:`RecordedRequest`); ``max_in_flight`` is the most chat requests that were
being answered at once. Standard library only; it ships with the package.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from kfp_components.testing.servers import serving


@dataclass
class ScriptedReply:
    """One choice's answer: its text and, optionally, the top log-probs of its first token (token -> log-prob)."""

    text: str
    top_logprobs: dict[str, float] | None = None


@dataclass
class RecordedRequest:
    """A request the server received: header names in lower case; ``body`` is the JSON body (None for a GET)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class _Fault:
    kind: str  # "fail", "hang" or "malformed"
    status: int = 200
    body: str | None = None
    retry_after: float | None = None
    seconds: float = 0.0


Respond = Callable[[list[dict[str, Any]], dict[str, Any]], "str | ScriptedReply"]


class ScriptedChatServer:
    """An OpenAI-compatible chat server on 127.0.0.1 (see the module docstring). A context manager: the server
    runs from ``__enter__`` to ``__exit__``; ``base_url`` is ``http://127.0.0.1:PORT/v1``."""

    def __init__(
        self,
        respond: Respond,
        *,
        models: Sequence[str] = ("judge",),
        api_key: str | None = None,
        latency_seconds: float = 0.0,
    ):
        self.respond = respond
        self.models = tuple(models)
        self.api_key = api_key
        self.latency_seconds = latency_seconds
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.base_url = ""
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._served = 0
        self._stack: contextlib.ExitStack | None = None

    # fault injection

    def fail_next(
        self, status: int, count: int = 1, body: str | None = None, retry_after: float | None = None
    ) -> None:
        """Answer the next ``count`` chat requests with ``status`` (an OpenAI-style error body unless ``body``
        is given; a ``Retry-After`` header of ``retry_after`` seconds when given)."""
        self._add([_Fault("fail", status=status, body=body, retry_after=retry_after)] * count)

    def hang_next(self, seconds: float, count: int = 1) -> None:
        """Answer the next ``count`` chat requests only after ``seconds`` (then normally)."""
        self._add([_Fault("hang", seconds=seconds)] * count)

    def malformed_next(self, count: int = 1, body: str = "not json") -> None:
        """Answer the next ``count`` chat requests with a 200 whose body is ``body``."""
        self._add([_Fault("malformed", body=body)] * count)

    def _add(self, faults: list[_Fault]) -> None:
        with self._lock:
            self._faults.extend(faults)

    def _next_fault(self) -> _Fault | None:
        with self._lock:
            return self._faults.pop(0) if self._faults else None

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        """The recorded ``POST .../chat/completions`` requests, in the order they arrived."""
        with self._lock:
            return [r for r in self.requests if r.method == "POST" and r.path.endswith("/chat/completions")]

    # running

    def __enter__(self) -> ScriptedChatServer:
        server = _Server(("127.0.0.1", 0), _handler(self))
        stack = contextlib.ExitStack()
        host = stack.enter_context(serving(server))
        self._stack = stack
        self.base_url = f"http://{host}/v1"
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    # answers

    def _record(self, method: str, path: str, headers: dict[str, str], body: Any) -> None:
        with self._lock:
            self.requests.append(RecordedRequest(method, path, headers, body))

    def _completion(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages") or []
        n = int(body.get("n") or 1)
        want_logprobs = bool(body.get("logprobs"))
        top = int(body.get("top_logprobs") or 0)
        choices = []
        completion_words = 0
        for index in range(n):
            reply = self.respond(messages, body)
            if isinstance(reply, str):
                reply = ScriptedReply(reply)
            completion_words += len(reply.text.split())
            choice: dict[str, Any] = {
                "index": index,
                "message": {"role": "assistant", "content": reply.text},
                "finish_reason": "stop",
                "logprobs": _logprobs(reply, top) if want_logprobs else None,
            }
            choices.append(choice)
        prompt_words = sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))
        with self._lock:
            self._served += 1
            number = self._served
        return {
            "id": f"chatcmpl-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_words,
                "completion_tokens": completion_words,
                "total_tokens": prompt_words + completion_words,
            },
        }


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the listen backlog: many clients connecting at once are not made to wait


def _logprobs(reply: ScriptedReply, top: int) -> dict[str, Any]:
    words = reply.text.split()
    chosen = words[0] if words else reply.text
    given = reply.top_logprobs if reply.top_logprobs is not None else {chosen: 0.0}
    ranked = sorted(given.items(), key=lambda item: item[1], reverse=True)[: max(top, 1)]
    return {
        "content": [
            {
                "token": chosen,
                "logprob": given.get(chosen, ranked[0][1] if ranked else 0.0),
                "bytes": list(chosen.encode()),
                "top_logprobs": [
                    {"token": token, "logprob": logprob, "bytes": list(token.encode())}
                    for token, logprob in ranked
                ],
            }
        ]
    }


def _error(message: str, kind: str, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _handler(state: ScriptedChatServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real server: the client reuses its connections
        disable_nagle_algorithm = True  # headers and body leave at once, not after the client's delayed ACK
        timeout = 120  # an idle kept-alive connection ends its thread eventually

        def do_GET(self) -> None:
            self._record(None)
            if not self._authorised():
                return
            if self.path.rstrip("/").endswith("/models"):
                data = [
                    {"id": m, "object": "model", "created": 0, "owned_by": "scripted"} for m in state.models
                ]
                self._json(200, {"object": "list", "data": data})
            else:
                self._json(404, _error(f"no route {self.path}", "NotFoundError", 404))

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            self._record(body)
            if not self._authorised():
                return
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._json(404, _error(f"no route {self.path}", "NotFoundError", 404))
                return
            if not isinstance(body, dict):
                self._json(400, _error("the body is not a JSON object", "BadRequestError", 400))
                return
            with state._lock:
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                self._chat(body)
            finally:
                with state._lock:
                    state.in_flight -= 1

        def _chat(self, body: dict[str, Any]) -> None:
            if state.latency_seconds > 0:
                time.sleep(state.latency_seconds)
            fault = state._next_fault()
            if fault is not None and fault.kind == "fail":
                headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
                if fault.body is not None:
                    self._send(fault.status, fault.body.encode(), _content_type(fault.body), headers)
                else:
                    kind = "rate_limit_exceeded" if fault.status == 429 else "server_error"
                    self._json(fault.status, _error(f"scripted failure {fault.status}", kind), headers)
                return
            if fault is not None and fault.kind == "malformed":
                self._send(200, (fault.body or "").encode(), "application/json")
                return
            if fault is not None and fault.kind == "hang":
                time.sleep(fault.seconds)
            if body.get("model") not in state.models:
                message = f"The model `{body.get('model')}` does not exist."
                self._json(404, _error(message, "NotFoundError", 404))
                return
            try:
                completion = state._completion(body)
            except Exception as exc:  # a broken respond() shows as a server error, as a real server's would
                self._json(500, _error(f"respond failed: {exc!r}", "server_error"))
                return
            self._json(200, completion)

        def _record(self, body: Any) -> None:
            headers = {name.lower(): value for name, value in self.headers.items()}
            state._record(self.command, self.path, headers, body)

        def _authorised(self) -> bool:
            if state.api_key is None or self.headers.get("Authorization") == f"Bearer {state.api_key}":
                return True
            message = "Incorrect API key provided."
            self._json(401, _error(message, "invalid_request_error", "invalid_api_key"))
            return False

        def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json", headers)

        def _send(
            self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None
        ) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout)
                self.close_connection = True

        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            pass

    return Handler


def _content_type(body: str) -> str:
    try:
        json.loads(body)
    except ValueError:
        return "text/plain"
    return "application/json"


__all__ = ["RecordedRequest", "ScriptedChatServer", "ScriptedReply"]
