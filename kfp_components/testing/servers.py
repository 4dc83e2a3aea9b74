"""Real protocol servers on 127.0.0.1 for tests and the demo: S3 (moto) and a static HTTP file server.

Both pick a free port and stop when their ``with`` block ends.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


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
        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            state.requests.append(("GET", self.path, dict(self.headers)))
            if failures["left"] > 0:
                failures["left"] -= 1
                self.send_error(503, "try again")
                return
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass(frozen=True)
class S3Server:
    """Where a local S3 server listens, and credentials it accepts (moto accepts any)."""

    endpoint: str
    access_key: str = "test-access-key"
    secret_key: str = "test-secret-key-do-not-log"
    region: str = "us-east-1"

    def environ(self) -> dict[str, str]:
        """The environment a pod gets from its S3 secret, pointing at this server."""
        return {
            "AWS_S3_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on a free port of 127.0.0.1 (moto is a test dependency, not a runtime one)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(endpoint=f"http://{host}:{port}")
    finally:
        server.stop()
