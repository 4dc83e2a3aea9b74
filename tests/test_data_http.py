"""http(s):// against hostile servers on 127.0.0.1: redirects that would carry credentials away, servers that
stall, trickle or cut the body short. Every server here is real (the standard library's, TLS included)."""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kfp_components.data import DatasetConfig, DatasetError, prepare_dataset
from kfp_components.typed_config import ConfigError

from conftest import chat

BODY = "".join(json.dumps(chat(f"q{i}")) + "\n" for i in range(3)).encode()
BASIC = "Basic " + base64.b64encode(b"user:s3cret").decode()


@dataclass
class Server:
    url: str
    seen: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Authorization) of each request


@contextlib.contextmanager
def serve(
    answer: Callable[[BaseHTTPRequestHandler], None], tls: tuple[Path, Path] | None = None
) -> Iterator[Server]:
    """Run ``answer`` for every GET on 127.0.0.1 (over TLS with ``tls`` = (cert, key))."""
    state = Server(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.seen.append((self.path, self.headers.get("Authorization")))
            with contextlib.suppress(OSError):  # the client may hang up on a trickle
                answer(self)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def send(handler: BaseHTTPRequestHandler, body: bytes = BODY, status: int = 200) -> None:
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def redirect_to(location: str) -> Callable[[BaseHTTPRequestHandler], None]:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return answer


def with_credentials(url: str) -> str:
    return url.replace("://", "://user:s3cret@", 1)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert, key) files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


@pytest.fixture
def trusted(certificate, monkeypatch) -> tuple[Path, Path]:
    """The certificate, trusted by this process's TLS clients as a private CA would be (SSL_CERT_FILE)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    return certificate


def _prepare(tmp_path: Path, url: str, **options) -> dict:
    result = prepare_dataset(
        DatasetConfig(url, train_split_ratio=1.0, **options), tmp_path / "t.jsonl", tmp_path / "e.jsonl"
    )
    return result.metrics


# -- redirects --------------------------------------------------------------------------------------


@pytest.mark.parametrize("other_host", ["localhost", "127.0.0.1"])
def test_credentials_are_not_forwarded_to_another_host_on_a_redirect(tmp_path, other_host):
    with serve(send) as target:
        port = target.url.rsplit(":", 1)[1]
        with serve(redirect_to(f"http://{other_host}:{port}/data.jsonl")) as first:
            metrics = _prepare(tmp_path, with_credentials(first.url) + "/data.jsonl")
    assert metrics["train_rows"] == 3
    assert first.seen == [("/data.jsonl", BASIC)], "the host the credentials were given for gets them"
    assert target.seen == [("/data.jsonl", None)], "another host (or port) never does"


def test_credentials_stay_with_a_redirect_on_the_same_server(tmp_path):
    def answer(handler: BaseHTTPRequestHandler) -> None:
        if handler.path == "/old.jsonl":
            redirect_to("/data.jsonl")(handler)
        elif handler.headers.get("Authorization") == BASIC:
            send(handler)
        else:
            send(handler, b"login first", 401)

    with serve(answer) as server:
        metrics = _prepare(tmp_path, with_credentials(server.url) + "/old.jsonl")
    assert metrics["train_rows"] == 3 and server.seen == [("/old.jsonl", BASIC), ("/data.jsonl", BASIC)]


def test_a_redirect_from_https_to_http_is_refused_while_holding_credentials(tmp_path, trusted):
    with serve(send) as plain, serve(redirect_to(plain.url + "/data.jsonl?sig=abc"), tls=trusted) as secure:
        with pytest.raises(DatasetError) as raised:
            _prepare(tmp_path, with_credentials(secure.url) + "/data.jsonl")
        message = str(raised.value)
        assert "redirected from https to plain http" in message and "refusing to send" in message
        assert "s3cret" not in message and "abc" not in message
        assert plain.seen == [], "nothing, credentials least of all, went over plain http"
        assert not (tmp_path / "t.jsonl").exists()
        # without credentials there is nothing to protect: the redirect is followed
        assert _prepare(tmp_path, secure.url + "/data.jsonl")["train_rows"] == 3
        assert plain.seen == [("/data.jsonl?sig=abc", None)]


def test_https_downloads_with_credentials(tmp_path, trusted):
    with serve(send, tls=trusted) as secure:
        assert _prepare(tmp_path, with_credentials(secure.url) + "/data.jsonl")["train_rows"] == 3
    assert secure.seen == [("/data.jsonl", BASIC)]


# -- servers that stall, trickle or stop short -------------------------------------------------------


@pytest.fixture
def no_backoff(monkeypatch):
    monkeypatch.setattr("kfp_components.data.fetch.time.sleep", lambda seconds: None)


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    """Set when the test ends, so that slow servers stop sending."""
    event = threading.Event()
    yield event
    event.set()


def test_a_server_that_trickles_is_given_up_by_the_stall_timeout(tmp_path, no_backoff, stop):
    def trickle(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "100000")
        handler.end_headers()
        while not stop.wait(0.1):  # a byte every 0.1 s: never silent, never done
            handler.wfile.write(b" ")
            handler.wfile.flush()

    with serve(trickle) as server:
        started = time.monotonic()
        with pytest.raises(DatasetError) as raised:
            _prepare(tmp_path, server.url + "/data.jsonl?token=abc", dataset_stall_timeout_seconds=0.5)
        elapsed = time.monotonic() - started
    message = str(raised.value)
    assert "the download stalled 3 times" in message and "dataset_stall_timeout_seconds" in message
    assert "token=***" in message and "abc" not in message
    assert 1.5 <= elapsed < 10 and len(server.seen) == 3
    assert not (tmp_path / "t.jsonl").exists()


def test_a_server_that_never_answers_is_given_up_by_the_stall_timeout(tmp_path, no_backoff, stop):
    with (
        serve(lambda handler: stop.wait(30)) as server,
        pytest.raises(DatasetError, match=r"stalled 3 times: no answer within 0.3 s"),
    ):
        _prepare(tmp_path, server.url + "/data.jsonl", dataset_stall_timeout_seconds=0.3)


def test_a_download_that_keeps_going_is_given_up_at_the_deadline(tmp_path, stop):
    def steady(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(10**9))
        handler.end_headers()
        while not stop.wait(0.05):  # 2 KiB every 0.05 s: never stalls
            handler.wfile.write(b" " * 2048)
            handler.wfile.flush()

    with serve(steady) as server:
        started = time.monotonic()
        with pytest.raises(DatasetError) as raised:
            _prepare(
                tmp_path,
                server.url + "/data.jsonl",
                dataset_download_timeout_seconds=1,
                dataset_stall_timeout_seconds=5,
            )
        elapsed = time.monotonic() - started
    assert "did not finish within dataset_download_timeout_seconds (1 s)" in str(raised.value)
    assert 1 <= elapsed < 4 and len(server.seen) == 1, "past the deadline there is no retry"


def test_a_body_shorter_than_its_content_length_is_not_taken_for_the_file(tmp_path, no_backoff):
    def short(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(BODY) * 2))
        handler.end_headers()
        handler.wfile.write(BODY)  # whole rows, then the connection closes

    with (
        serve(short) as server,
        pytest.raises(
            DatasetError, match=rf"the connection closed after {len(BODY)} of {2 * len(BODY)} bytes"
        ),
    ):
        _prepare(tmp_path, server.url + "/data.jsonl")
    assert len(server.seen) == 3


def test_a_url_with_a_space_is_refused_before_any_request_without_its_signature(tmp_path):
    url = "https://127.0.0.1:9/my data.jsonl?X-Amz-Signature=SECRETSIG&X-Amz-Credential=CRED"
    with pytest.raises(ConfigError) as raised:
        _prepare(tmp_path, url)
    message = str(raised.value)
    assert "dataset_name_or_path" in message and "holds a space" in message and "%20" in message
    assert "SECRETSIG" not in message and "CRED" not in message


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"dataset_download_timeout_seconds": -1},
            "dataset_download_timeout_seconds: -1 is negative (0: no limit)",
        ),
        ({"dataset_stall_timeout_seconds": 0}, "dataset_stall_timeout_seconds: 0 is not more than 0"),
        (
            {"dataset_stall_timeout_seconds": "1m"},
            "dataset_stall_timeout_seconds: expected a number of seconds",
        ),
        ({"dataset_download_timeout_seconds": float("inf")}, "expected a number of seconds, got inf"),
    ],
)
def test_bad_download_limits_are_refused_before_any_request(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _prepare(tmp_path, "http://127.0.0.1:9/never-fetched.jsonl", **options)
