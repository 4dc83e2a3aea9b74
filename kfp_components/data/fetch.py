"""Bring the files behind a dataset URI to local disk.

Local and ``pvc://`` files are read where they are (a ``pvc://`` file, symbolic links resolved, must lie
inside its claim); ``s3://``, ``http(s)://`` and ``hf://`` files are downloaded into a scratch folder.
Credentials come only from the environment (``AWS_*``, ``HF_TOKEN``) or, for ``http(s)://``, the URL's user
info, and never appear in a log line or an error message. An ``http(s)://`` download sends them only to
the host they were given for: a redirect to another host drops them, and a redirect from https to plain
http while holding them is refused. It gives up after :class:`DownloadLimits`: an overall deadline, and a
stall timeout for a server that sends nothing or trickles.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from kfp_components.data.errors import DatasetError
from kfp_components.data.readers import DataFile, is_data_file
from kfp_components.data.uris import PVC_ROOT_ENV, DatasetURI, redact_uri

log = logging.getLogger(__name__)

#: S3 endpoint for MinIO, Ceph/ODF and other S3-compatible stores; AWS_ENDPOINT_URL is read as well.
S3_ENDPOINT_ENVS = ("AWS_S3_ENDPOINT", "AWS_ENDPOINT_URL")
HTTP_ATTEMPTS = 3
#: An http(s):// download that gets less than this within the stall timeout has stalled.
STALL_MIN_BYTES = 1024
_CHUNK = 1 << 20
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class DownloadLimits:
    """When an http(s):// download gives up (the dataset options of the same names).

    Attributes:
        timeout_seconds: The whole download, retries included, must finish within this (0: no limit).
        stall_seconds: An attempt that gets less than :data:`STALL_MIN_BYTES` in this long has stalled
            (no answer, or a server that trickles); it is retried like a dropped connection.
    """

    timeout_seconds: float = 3600.0
    stall_seconds: float = 60.0


def fetch(
    uri: DatasetURI, scratch: Path, *, split: str = "", limits: DownloadLimits | None = None
) -> list[DataFile]:
    """The data files behind ``uri``, in a stable order. Remote files are downloaded under ``scratch``.

    ``split`` picks one split: of an hf:// dataset (default ``train``), or of a folder (local, pvc:// or an
    s3:// prefix) by the Hub's file-name conventions; empty reads every file of a folder. A single file has
    no splits, so naming one for it is an error rather than ignored. ``limits`` bound http(s):// downloads.
    """
    if uri.scheme in ("local", "pvc"):
        files = _in_split(_local_files(uri), split, uri, single_file=uri.local_path().is_file())
    elif uri.scheme == "s3":
        files = _fetch_s3(uri, scratch, split)
    elif uri.scheme in ("http", "https"):
        _in_split([], split, uri, single_file=True)
        files = [_fetch_http(uri, scratch, limits or DownloadLimits())]
    elif uri.scheme == "hf":
        from kfp_components.data.fetch_hf import fetch_hf

        files = [
            DataFile(path, path.relative_to(scratch).as_posix())
            for path in fetch_hf(uri, split or "train", scratch)
        ]
    else:  # parse_dataset_uri rejects anything else
        raise DatasetError(f"unsupported scheme {uri.scheme!r}")
    if not files:
        raise DatasetError(f"{uri.redacted()}: no data files (.jsonl, .json or .parquet) found")
    return files


def _in_split(files: list[DataFile], split: str, uri: DatasetURI, *, single_file: bool) -> list[DataFile]:
    """The files of ``split`` among a folder's ``files`` (all of them when ``split`` is empty)."""
    if not split:
        return files
    source = f"dataset_name_or_path {uri.redacted()!r}"
    if single_file:
        raise DatasetError(
            f"{source} is a single file, which has no splits, but dataset_split is {split!r}; leave "
            "dataset_split empty, or point at a folder whose files name their split (train.jsonl, test.jsonl)"
        )
    from kfp_components.data.fetch_hf import select_data_files

    chosen = set(select_data_files([f.name for f in files], split, source=source))
    return [f for f in files if f.name in chosen]


def _local_files(uri: DatasetURI) -> list[DataFile]:
    path = uri.local_path()
    if uri.scheme == "pvc" and not uri.claim_root().is_dir():
        raise DatasetError(
            f"{uri.raw}: claim {uri.claim!r} is not mounted at {uri.claim_root()} "
            f"(mount it there or set {PVC_ROOT_ENV})"
        )
    if uri.scheme == "pvc" and not path.resolve().is_relative_to(uri.claim_root().resolve()):
        raise DatasetError(
            f"{uri.raw}: the path is a symbolic link that leads out of claim {uri.claim!r}; give a path "
            "inside the claim"
        )
    if path.is_file():
        files = [DataFile(path, path.name)]
    elif path.is_dir():
        files = _folder_files(path, uri)
    else:
        raise DatasetError(f"{uri.raw}: no such file or folder")
    return _inside_claim(uri, files) if uri.scheme == "pvc" else files


#: Files a folder may hold beside its data files: KFP's executor output, a dataset's metadata.
METADATA_FILES = frozenset({"executor_output.json", "dataset_info.json", "dataset_infos.json", "state.json"})


def _folder_files(path: Path, uri: DatasetURI) -> list[DataFile]:
    """The data files of the dataset in folder ``path``: a ``save_to_disk`` folder's Arrow files, or the
    shards below it, all of one kind (Parquet, JSON text or Arrow); metadata files and hidden files are not
    data."""
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        return _saved_dataset_files(path, path, uri)
    if (path / "dataset_dict.json").is_file():
        raise DatasetError(
            f"{uri.redacted()}: a save_to_disk DatasetDict (dataset_dict.json); point at the folder of one "
            f"split, such as {uri.redacted().rstrip('/')}/train"
        )
    found = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and is_data_file(p.name)
        and p.name not in METADATA_FILES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    kinds: dict[str, int] = {}
    for p in found:
        kind = _KINDS.get(p.suffix.lower(), p.suffix.lower())
        kinds[kind] = kinds.get(kind, 0) + 1
    if len(kinds) > 1:
        listed = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
        raise DatasetError(
            f"{uri.redacted()}: the folder holds data files of several kinds ({listed}); a dataset's shards "
            "are of one kind: point at the folder (or file) of one dataset"
        )
    return [DataFile(p, p.relative_to(path).as_posix()) for p in found]


_KINDS = {
    ".jsonl": "JSON text",
    ".ndjson": "JSON text",
    ".json": "JSON text",
    ".parquet": "Parquet",
    ".arrow": "Arrow",
}


def _saved_dataset_files(path: Path, root: Path, uri: DatasetURI) -> list[DataFile]:
    """The Arrow files a Hugging Face ``save_to_disk`` folder lists in its ``state.json``, in order."""
    import json

    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except (ValueError, KeyError, TypeError):
        raise DatasetError(
            f"{uri.redacted()}: state.json of the save_to_disk folder does not list its _data_files"
        ) from None
    files = []
    for name in names:
        file = path / name
        if "/" in name or "\\" in name or not file.is_file():
            raise DatasetError(f"{uri.redacted()}: {name}, listed in state.json, is not a file of the folder")
        files.append(DataFile(file, file.relative_to(root).as_posix()))
    return files


def _inside_claim(uri: DatasetURI, files: list[DataFile]) -> list[DataFile]:
    """``files`` by their real paths, once each is known to lie inside the claim, symbolic links resolved.

    A link that leads out of the claim would read whatever the pod can read (another volume, a secret
    mounted in the pod), so it is an error rather than followed or skipped.
    """
    root = uri.claim_root().resolve()
    inside = []
    for data_file in files:
        real = data_file.path.resolve()
        if not real.is_relative_to(root):
            raise DatasetError(
                f"{uri.raw}: {data_file.name} is a symbolic link that leads out of claim {uri.claim!r}; copy "
                "the file into the claim or remove the link"
            )
        inside.append(DataFile(real, data_file.name))  # read by the checked path, not through the link
    return inside


def s3_client():
    """A boto3 S3 client for the endpoint and credentials in the environment."""
    import boto3
    from botocore.config import Config

    endpoint = next((os.environ[name] for name in S3_ENDPOINT_ENVS if os.environ.get(name)), None)
    # A new session each call: the default session caches credentials from the first environment it saw.
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        config=Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=60),
    )


def _fetch_s3(uri: DatasetURI, scratch: Path, split: str = "") -> list[DataFile]:
    client = s3_client()
    with s3_errors(uri.raw):
        keys = _s3_keys(client, uri)
        names = {
            key: PurePosixPath(key).relative_to(uri.key).as_posix()
            if key != uri.key
            else PurePosixPath(key).name
            for key in keys
        }
        # choose the split's objects by name before downloading any
        listed = [DataFile(scratch / name, name) for name in names.values()]
        wanted = {f.name for f in _in_split(listed, split, uri, single_file=keys == [uri.key])}
        files = []
        for key, name in names.items():
            if name not in wanted:
                continue
            target = scratch / name
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(uri.bucket, key, str(target))
            log.info("downloaded s3://%s/%s (%d bytes)", uri.bucket, key, target.stat().st_size)
            files.append(DataFile(target, name))
        return files


@contextlib.contextmanager
def s3_errors(where: str, error: type[Exception] = DatasetError) -> Iterator[None]:
    """S3 failures as ``error`` exceptions whose message starts with ``where``; never a credential."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except NoCredentialsError:
        raise error(
            f"{where}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (from a Kubernetes "
            "secret in a pipeline) and AWS_S3_ENDPOINT for MinIO or ODF"
        ) from None
    except ClientError as exc:
        code = exc.response.get("Error", {})
        raise error(
            f"{where}: S3 said {code.get('Code', '?')}: {code.get('Message', '')}".rstrip(": ")
        ) from None
    except BotoCoreError as exc:
        raise error(f"{where}: S3 request failed: {exc}") from None


def _s3_keys(client, uri: DatasetURI) -> list[str]:
    from botocore.exceptions import ClientError

    if uri.key:
        try:
            client.head_object(Bucket=uri.bucket, Key=uri.key)
            return [uri.key]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise
    prefix = f"{uri.key}/" if uri.key else ""
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=prefix):
        keys += [
            item["Key"]
            for item in page.get("Contents", [])
            if is_data_file(item["Key"]) and PurePosixPath(item["Key"]).name not in METADATA_FILES
        ]
    if not keys:
        raise DatasetError(f"{uri.raw}: no object with that key and no data files under that prefix")
    return sorted(keys)


def _fetch_http(uri: DatasetURI, scratch: Path, limits: DownloadLimits) -> DataFile:
    name = PurePosixPath(urlsplit(uri.url).path).name or "data"
    target = scratch / name
    deadline = time.monotonic() + limits.timeout_seconds if limits.timeout_seconds else None
    for attempt in range(1, HTTP_ATTEMPTS + 1):
        try:
            _download(uri, target, limits, deadline)
            return DataFile(target, name)
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == HTTP_ATTEMPTS:
                raise DatasetError(f"{uri.redacted()}: HTTP {exc.code} {exc.reason}") from None
            reason = f"HTTP {exc.code}"
        except _Stalled as exc:
            if attempt == HTTP_ATTEMPTS:
                raise DatasetError(
                    f"{uri.redacted()}: the download stalled {HTTP_ATTEMPTS} times: {exc} "
                    f"(raise dataset_stall_timeout_seconds, now {limits.stall_seconds:g}, for a slow server)"
                ) from None
            reason = str(exc)
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            reason = str(getattr(exc, "reason", exc)) or type(exc).__name__
            if attempt == HTTP_ATTEMPTS:
                raise DatasetError(
                    f"{uri.redacted()}: could not download after {HTTP_ATTEMPTS} attempts: {reason}"
                ) from None
        except DatasetError:
            raise
        except ValueError as exc:  # http.client.InvalidURL, e.g. a redirect to a URL it cannot send
            raise DatasetError(f"{uri.redacted()}: cannot request the URL: {type(exc).__name__}") from None
        delay = 2 ** (attempt - 1)
        if deadline is not None and time.monotonic() + delay >= deadline:
            _past_deadline(uri, limits)
        log.warning(
            "download of %s failed (attempt %d of %d: %s); retrying in %ds",
            uri.redacted(),
            attempt,
            HTTP_ATTEMPTS,
            reason,
            delay,
        )
        time.sleep(delay)
    raise AssertionError("unreachable")


class _Stalled(Exception):
    """An attempt got less than STALL_MIN_BYTES within the stall timeout."""


def _past_deadline(uri: DatasetURI, limits: DownloadLimits, got: str = "") -> None:
    raise DatasetError(
        f"{uri.redacted()}: the download did not finish within dataset_download_timeout_seconds "
        f"({limits.timeout_seconds:g} s){got}; raise it for a large file or a slow link (0: no limit)"
    )


def _http_request(url: str) -> urllib.request.Request:
    """A GET request; user info in the URL (``https://user:pass@host/...``) becomes a Basic auth header."""
    parts = urlsplit(url)
    headers = {"User-Agent": "kfp-components"}
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
        host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        url = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return urllib.request.Request(url, headers=headers)


class _GuardedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects without handing credentials to anyone but the host they were given for."""

    def __init__(self, uri: DatasetURI):
        self.uri = uri

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is None:
            return None
        old, target = urlsplit(req.full_url), urlsplit(new.full_url)
        if target.scheme not in ("http", "https"):
            raise DatasetError(
                f"{self.uri.redacted()}: the server redirected to a {target.scheme}:// URL; only http(s):// "
                "is followed"
            )
        if not new.has_header("Authorization"):
            return new
        if old.scheme == "https" and target.scheme == "http":
            raise DatasetError(
                f"{self.uri.redacted()}: the server redirected from https to plain http "
                f"({redact_uri(new.full_url)}); refusing to send the URL's credentials unencrypted"
            )
        if not _same_server(old, target):
            new.remove_header("Authorization")
            log.info(
                "%s redirected to another host (%s): the URL's credentials are not sent there",
                self.uri.redacted(),
                target.hostname,
            )
        return new


def _same_server(old: SplitResult, new: SplitResult) -> bool:
    """Whether a redirect stays on the server credentials were given for (an upgrade to https included)."""
    if (old.hostname or "").lower() != (new.hostname or "").lower():
        return False
    old_port = old.port or _DEFAULT_PORTS[old.scheme]
    new_port = new.port or _DEFAULT_PORTS[new.scheme]
    upgrade = (old.scheme, old_port, new.scheme, new_port) == ("http", 80, "https", 443)
    return (old.scheme, old_port) == (new.scheme, new_port) or upgrade


def _download(uri: DatasetURI, target: Path, limits: DownloadLimits, deadline: float | None) -> None:
    """One attempt: fetch ``uri`` into ``target``, within ``deadline`` and without stalling."""
    opener = urllib.request.build_opener(_GuardedRedirects(uri))
    timeout = limits.stall_seconds  # connecting and each read: nothing at all in this long is a stall
    if deadline is not None:
        timeout = max(0.1, min(timeout, deadline - time.monotonic()))
    request = _http_request(uri.url)
    try:
        response = opener.open(request, timeout=timeout)
    except TimeoutError:
        if deadline is not None and time.monotonic() >= deadline:
            _past_deadline(uri, limits)
        raise _Stalled(f"no answer within {limits.stall_seconds:g} s") from None
    with response, target.open("wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        done, last_report = 0, time.monotonic()
        window_start, window_bytes = time.monotonic(), 0
        while True:
            try:
                chunk = response.read1(_CHUNK)  # what has arrived, so a trickle cannot hold a read open
            except TimeoutError:
                chunk = None
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                _past_deadline(uri, limits, f": {_progress(done, total)} arrived")
            if chunk is None:
                raise _Stalled(
                    f"nothing arrived in {limits.stall_seconds:g} s ({_progress(done, total)} so far)"
                )
            if not chunk:
                break
            out.write(chunk)
            done += len(chunk)
            window_bytes += len(chunk)
            if window_bytes >= STALL_MIN_BYTES:
                window_start, window_bytes = now, 0
            elif now - window_start >= limits.stall_seconds:
                raise _Stalled(
                    f"{window_bytes} byte(s) arrived in {now - window_start:.0f} s "
                    f"({_progress(done, total)} so far)"
                )
            if now - last_report > 5:
                last_report = now
                log.info("downloading %s: %s", uri.redacted(), _progress(done, total))
    if total and done != total:
        raise ConnectionError(f"the connection closed after {done} of {total} bytes")
    log.info("downloaded %s (%d bytes)", uri.redacted(), target.stat().st_size)


def _progress(done: int, total: int) -> str:
    if total:
        return f"{_amount(done)} of {_amount(total)} ({100 * done / total:.0f}%)"
    return _amount(done)


def _amount(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1_000_000 else f"{size} bytes"
