"""A static HTTP file server on 127.0.0.1, for the demo and tests: it serves a folder as ``http://`` URIs.

It uses the standard library only and ships with the package; the servers that only tests use (S3, the
Kubernetes API, Model Registry, the Hugging Face Hub) live in ``tests/doubles/``.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import HTTPServer, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@contextlib.contextmanager
def serving(server: HTTPServer) -> Iterator[str]:
    """Run ``server`` on a background thread; yields its ``host:port``; shuts it down and closes it after."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        address = server.server_address[0]
        host = address.decode() if isinstance(address, bytes) else address
        yield f"{host}:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass
class HttpFileServer:
    """A static file server; ``requests`` records ``(method, path, headers)`` of every request."""

    url: str
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)


@contextlib.contextmanager
def http_file_server(root: str | Path, *, fail_first: int = 0) -> Iterator[HttpFileServer]:
    """Serve ``root`` over HTTP. ``fail_first`` answers the first N requests with 503, to test retries."""
    state = HttpFileServer(url="")
    failures = {"left": fail_first}

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(("GET", self.path, dict(self.headers)))
            if failures["left"] > 0:
                failures["left"] -= 1
                self.send_error(503, "try again")
                return
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    with serving(server) as host:
        state.url = f"http://{host}"
        yield state
