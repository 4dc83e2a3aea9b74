"""A private HTTP file server on 127.0.0.1: it serves a folder only to a request with the right Basic auth
and a valid signed query, like a password-protected web server behind a pre-signed link.

A request without the ``Authorization`` header gets 401, one with wrong credentials or a missing or wrong
``X-Amz-Signature``/``sig`` pair gets 403, so a test knows the credentials of a URI really travelled.
"""

from __future__ import annotations

import base64
import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from kfp_components.testing.servers import serving


@dataclass(frozen=True)
class Credentials:
    """What the server accepts: Basic auth ``user:password`` and the query values ``X-Amz-Signature`` and
    ``sig`` (a pre-signed link)."""

    user: str = "alice-7c1f"
    password: str = "pw-Secret-4b9e-2d77"
    signature: str = "f3a9c2d1e0b8a7968574635241302918f3a9c2d1"
    sig: str = "sv2024sigQ7zX"

    def secrets(self) -> list[str]:
        """Every string that must never be written down, with the Basic header's base64 form."""
        basic = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        return [self.user, self.password, self.signature, self.sig, basic]


@dataclass
class PrivateFileServer:
    """Where the server listens; ``granted`` and ``refused`` count the requests it served and turned down."""

    host: str
    credentials: Credentials
    granted: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def url(self, path: str, *, credentials: Credentials | None = None, **query: str) -> str:
        """``http://user:password@host/path?X-Amz-Signature=...&sig=...`` (plus ``query``)."""
        creds = credentials or self.credentials
        pairs = {"X-Amz-Signature": creds.signature, "sig": creds.sig, **query}
        text = "&".join(f"{k}={v}" for k, v in pairs.items())
        return f"http://{creds.user}:{creds.password}@{self.host}/{path.lstrip('/')}?{text}"


@contextlib.contextmanager
def private_file_server(
    root: str | Path, credentials: Credentials | None = None, *, port: int = 0
) -> Iterator[PrivateFileServer]:
    """Serve ``root`` on ``port`` (0: a free one) to requests that carry ``credentials`` (see the module
    docstring)."""
    state = PrivateFileServer(host="", credentials=credentials or Credentials())
    creds = state.credentials
    expected = "Basic " + base64.b64encode(f"{creds.user}:{creds.password}".encode()).decode()

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            if self.headers.get("Authorization") is None:
                state.refused.append(parts.path)
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="data"')
                self.end_headers()
                return
            signed = query.get("X-Amz-Signature") == [creds.signature] and query.get("sig") == [creds.sig]
            if self.headers["Authorization"] != expected or not signed:
                state.refused.append(parts.path)
                self.send_error(403, "forbidden")
                return
            state.granted.append(parts.path)
            self.path = parts.path
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Handler, directory=str(root)))
    with serving(server) as host:
        state.host = host
        yield state
