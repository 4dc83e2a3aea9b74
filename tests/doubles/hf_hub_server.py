"""A small local Hugging Face Hub for tests: serves dataset repositories from a folder.

It answers exactly the requests that the real ``huggingface_hub`` client (2.x) makes for
:func:`kfp_components.data.fetch_hf.fetch_hf`, so that code runs unchanged against it with
``HF_ENDPOINT=server.endpoint``:

``GET /api/datasets/{org}/{name}[/revision/{revision}]``
    Repository info: ``id``, ``sha`` (the commit the revision points to) and ``siblings`` (every file).
``HEAD`` and ``GET /datasets/{org}/{name}/resolve/{revision}/{path}``
    File metadata (``X-Repo-Commit``, ``ETag``, ``Content-Length``) and content. Files are served
    directly, never through a redirect, and never with the ``X-Xet-*`` headers that would make the
    client switch to Xet storage.
``GET /api/agent-harnesses``
    The client's best-effort agent registry (fetched from ``HF_ENDPOINT`` unless telemetry is
    disabled): answered with an empty registry.

Anything else is a 404. Errors carry the ``X-Error-Code`` header (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``) that the client turns into its typed exceptions.

Layout of ``root_dir``: ``root_dir/datasets/<org>/<name>/<revision>/<files...>``, made with
:func:`add_dataset_repo`. A revision name containing ``/`` (``refs/pr/1``) is stored URL-quoted as
one folder. The commit sha of a revision is derived from the repo id, the revision name and the
file contents (see :func:`commit_sha`), so it is stable across runs and changes when a file does;
a request may name a revision by branch/tag name or by that sha.

With ``token`` set, every request must carry ``Authorization: Bearer <token>``: a request without
it gets a 401 ``RepoNotFound`` (what the Hub answers for a private repo), one with another token a
401 ``Invalid credentials in Authorization header``. :attr:`LocalHubServer.requests` records the
method, path and whether an ``Authorization`` header was present for every request, never its value.

Example::

    add_dataset_repo(tmp_path, "org/chat", {"train.jsonl": '{"text": "hi"}\\n'})
    with LocalHubServer(tmp_path) as hub:
        os.environ["HF_ENDPOINT"] = hub.endpoint
        ...
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, quote, unquote, urlsplit

logger = logging.getLogger(__name__)

#: The timestamp reported as ``lastModified`` of every repo (the content defines the repo, not the clock).
_LAST_MODIFIED = "2024-01-01T00:00:00.000Z"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_INFO_PATH = re.compile(r"^/api/datasets/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<revision>[^/]+))?$")
_RESOLVE_PATH = re.compile(r"^/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
_AGENT_HARNESSES_PATH = "/api/agent-harnesses"
_CHUNK_SIZE = 1024 * 1024
_POLL_INTERVAL_S = 0.05  # how soon stop() takes effect


def add_dataset_repo(
    root: str | Path,
    repo_id: str,
    files: Mapping[str, bytes | str],
    revision: str = "main",
) -> Path:
    """Write ``files`` (repo path -> content; ``str`` is written as UTF-8) into one revision of a repo.

    Files already in that revision are kept unless overwritten. Returns the revision's folder.
    """
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"repo_id {repo_id!r}: expected 'org/name'")
    if revision in ("", ".", ".."):
        raise ValueError(f"revision {revision!r}: expected a branch or tag name")
    revision_dir = _revision_dir(Path(root), repo_id, revision)
    for repo_path, content in files.items():
        target = revision_dir / _safe_relative_path(repo_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    revision_dir.mkdir(parents=True, exist_ok=True)
    return revision_dir


def commit_sha(root: str | Path, repo_id: str, revision: str = "main") -> str:
    """The fake commit sha (40 hex digits) that the server reports for ``revision`` of ``repo_id``.

    Raises ``ValueError`` when that revision does not exist under ``root``.
    """
    return _RepoStore(Path(root)).commit_sha(repo_id, revision)


@dataclass(frozen=True)
class HubRequest:
    """One request the server received. The Authorization header's value is never recorded."""

    method: str
    path: str  # URL path, without the query string
    query: str
    has_auth_header: bool


class LocalHubServer:
    """A Hub-compatible HTTP server on ``127.0.0.1`` serving the dataset repos under ``root_dir``.

    Use as a context manager; :attr:`endpoint` is the value for ``HF_ENDPOINT``.
    """

    def __init__(self, root_dir: str | Path, token: str | None = None, host: str = "127.0.0.1") -> None:
        self.root_dir = Path(root_dir)
        self._store = _RepoStore(self.root_dir)
        self._token = token
        self._host = host
        self._requests: list[HubRequest] = []
        self._lock = threading.Lock()
        self._httpd: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        state = self.endpoint if self._httpd is not None else "stopped"
        return f"LocalHubServer(root_dir={str(self.root_dir)!r}, auth={self._token is not None}, {state})"

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>`` of the running server."""
        if self._httpd is None:
            raise RuntimeError("LocalHubServer is not running: use it as a context manager or call start()")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[HubRequest]:
        """The requests received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def commit_sha(self, repo_id: str, revision: str = "main") -> str:
        """The commit sha this server reports for ``revision`` of ``repo_id`` (``ValueError`` if none)."""
        return self._store.commit_sha(repo_id, revision)

    def start(self) -> Self:
        """Bind a free port and serve in a background thread."""
        if self._httpd is not None:
            raise RuntimeError("LocalHubServer is already running")
        self._httpd = _HubHTTPServer((self._host, 0), _HubRequestHandler, hub=self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL_S},
            name=f"local-hub-{self._httpd.server_port}",
            daemon=True,
        )
        self._thread.start()
        logger.debug("local Hub serving %s at %s", self.root_dir, self.endpoint)
        return self

    def stop(self) -> None:
        """Stop serving and release the port. Idempotent."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- used by the request handler -------------------------------------------------------------

    def _record(self, request: HubRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _check_auth(self, authorization: str | None) -> str | None:
        """``None`` when the request may proceed, else the 401 error message."""
        if self._token is None:
            return None
        if authorization is None:
            return "Invalid username or password."
        if hmac.compare_digest(authorization.encode(), f"Bearer {self._token}".encode()):
            return None
        return "Invalid credentials in Authorization header"


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], hub: LocalHubServer):
        self.hub = hub
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-response is not worth a traceback on stderr.
        logger.debug("local Hub: error while serving %s", client_address, exc_info=True)


class _HubError(Exception):
    """An error response: HTTP status, ``X-Error-Code`` (may be empty) and message."""

    def __init__(self, status: HTTPStatus, code: str, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.commit = commit


class _HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    timeout = 60  # seconds a silent client may hold a thread

    server: _HubHTTPServer

    def do_GET(self) -> None:
        self._handle(head=False)

    def do_HEAD(self) -> None:
        self._handle(head=True)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("local Hub: %s %s", self.address_string(), format % args)

    def _handle(self, head: bool) -> None:
        hub = self.server.hub
        parts = urlsplit(self.path)
        hub._record(
            HubRequest(
                method=self.command,
                path=parts.path,
                query=parts.query,
                has_auth_header=self.headers.get("Authorization") is not None,
            )
        )
        try:
            auth_error = hub._check_auth(self.headers.get("Authorization"))
            if auth_error is not None:
                code = "RepoNotFound" if auth_error.startswith("Invalid username") else ""
                raise _HubError(HTTPStatus.UNAUTHORIZED, code, auth_error)
            if parts.path == _AGENT_HARNESSES_PATH:
                self._send_json({"standardEnvVars": [], "harnesses": {}}, head=head)
            elif match := _INFO_PATH.match(parts.path):
                revision = unquote(match["revision"]) if match["revision"] else "main"
                files_metadata = parse_qs(parts.query).get("blobs", ["false"])[-1].lower() == "true"
                self._send_json(hub._store.info(match["repo"], revision, files_metadata), head=head)
            elif match := _RESOLVE_PATH.match(parts.path):
                self._send_file(match["repo"], unquote(match["revision"]), unquote(match["path"]), head=head)
            else:
                raise _HubError(HTTPStatus.NOT_FOUND, "", f"Not found: {parts.path}")
        except _HubError as error:
            self._send_error(error, head=head)

    def _start_response(self, status: HTTPStatus) -> None:
        # One request per connection: a kept-alive connection would outlive stop() in the client's pool
        # and could be reused by a later server that happens to get the same port.
        self.send_response(status)
        self.send_header("Connection", "close")

    def _send_json(self, payload: object, head: bool, status: HTTPStatus = HTTPStatus.OK) -> None:
        body = json.dumps(payload).encode()
        self._start_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_error(self, error: _HubError, head: bool) -> None:
        body = json.dumps({"error": error.message}).encode()
        self._start_response(error.status)
        if error.code:
            self.send_header("X-Error-Code", error.code)
        self.send_header("X-Error-Message", error.message)
        if error.commit:
            self.send_header("X-Repo-Commit", error.commit)
        if error.status == HTTPStatus.UNAUTHORIZED:
            self.send_header("WWW-Authenticate", 'Bearer realm="local-hub"')
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_file(self, repo_id: str, revision: str, repo_path: str, head: bool) -> None:
        store = self.server.hub._store
        revision_dir, commit = store.resolve(repo_id, revision)
        path = store.file(revision_dir, repo_path)
        if path is None:
            raise _HubError(
                HTTPStatus.NOT_FOUND, "EntryNotFound", f"{repo_path} does not exist on {revision!r}", commit
            )
        size = path.stat().st_size
        self._start_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.send_header("ETag", f'"{store.digest(path)}"')
        self.send_header("X-Repo-Commit", commit)
        self.send_header("Accept-Ranges", "none")
        self.end_headers()
        if not head:
            with path.open("rb") as source:
                shutil.copyfileobj(source, self.wfile, _CHUNK_SIZE)


class _RepoStore:
    """Reads repos from ``root/datasets/<org>/<name>/<quoted revision>/``; caches file digests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._digests: dict[tuple[Path, int, int], str] = {}
        self._lock = threading.Lock()

    def info(self, repo_id: str, revision: str, files_metadata: bool) -> dict[str, object]:
        revision_dir, commit = self.resolve(repo_id, revision)
        siblings: list[dict[str, object]] = []
        for path in self._files(revision_dir):
            sibling: dict[str, object] = {"rfilename": path.relative_to(revision_dir).as_posix()}
            if files_metadata:
                sibling["size"] = path.stat().st_size
                sibling["blobId"] = self.digest(path)[:40]
            siblings.append(sibling)
        org = repo_id.split("/", 1)[0]
        return {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": org,
            "sha": commit,
            "lastModified": _LAST_MODIFIED,
            "private": False,
            "gated": False,
            "disabled": False,
            "tags": [],
            "siblings": siblings,
        }

    def resolve(self, repo_id: str, revision: str) -> tuple[Path, str]:
        """The folder and commit sha of a revision given by name or by sha, or a 404 ``_HubError``."""
        if not _REPO_ID.match(repo_id) or not (self.root / "datasets" / repo_id).is_dir():
            raise _HubError(HTTPStatus.NOT_FOUND, "RepoNotFound", f"Repository {repo_id} not found")
        if revision not in ("", ".", ".."):
            named = _revision_dir(self.root, repo_id, revision)
            if named.is_dir():
                return named, self._commit_sha(named, repo_id, revision)
            for candidate in sorted(p for p in named.parent.iterdir() if p.is_dir()):
                if self._commit_sha(candidate, repo_id, unquote(candidate.name)) == revision:
                    return candidate, revision
        raise _HubError(HTTPStatus.NOT_FOUND, "RevisionNotFound", f"Invalid rev id: {revision}")

    def file(self, revision_dir: Path, repo_path: str) -> Path | None:
        """The file at ``repo_path`` in a revision, or ``None`` (also for paths escaping the revision)."""
        try:
            relative = _safe_relative_path(repo_path)
        except ValueError:
            return None
        path = revision_dir / relative
        return path if path.is_file() and not path.is_symlink() else None

    def commit_sha(self, repo_id: str, revision: str) -> str:
        """The commit sha of a revision given by name; ``ValueError`` when the repo has no such revision."""
        try:
            revision_dir, commit = self.resolve(repo_id, revision)
        except _HubError as error:
            raise ValueError(error.message) from None
        if unquote(revision_dir.name) != revision:
            raise ValueError(f"{revision!r} is a commit sha, not a revision name, of {repo_id}")
        return commit

    def _commit_sha(self, revision_dir: Path, repo_id: str, revision: str) -> str:
        """sha1 over the repo id, the revision name, and every file's path and sha256."""
        commit = hashlib.sha1(f"{repo_id}\n{revision}\n".encode())
        for path in self._files(revision_dir):
            commit.update(f"{path.relative_to(revision_dir).as_posix()}\n{self.digest(path)}\n".encode())
        return commit.hexdigest()

    def digest(self, path: Path) -> str:
        """sha256 of a file, cached while its size and mtime are unchanged."""
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._digests.get(key)
        if cached is None:
            sha = hashlib.sha256()
            with path.open("rb") as source:
                for chunk in iter(lambda: source.read(_CHUNK_SIZE), b""):
                    sha.update(chunk)
            cached = sha.hexdigest()
            with self._lock:
                self._digests[key] = cached
        return cached

    @staticmethod
    def _files(revision_dir: Path) -> list[Path]:
        return sorted(p for p in revision_dir.rglob("*") if p.is_file() and not p.is_symlink())


def _revision_dir(root: Path, repo_id: str, revision: str) -> Path:
    """Where a revision's files lie: its name URL-quoted, so that ``refs/pr/1`` is one folder."""
    return root / "datasets" / repo_id / quote(revision, safe="")


def _safe_relative_path(repo_path: str) -> Path:
    """``repo_path`` as a relative path that stays inside its repo, or ``ValueError``."""
    pure = PurePosixPath(repo_path)
    if not repo_path or pure.is_absolute() or any(part in ("", ".", "..") for part in repo_path.split("/")):
        raise ValueError(f"{repo_path!r} is not a relative path inside the repo")
    return Path(*pure.parts)
