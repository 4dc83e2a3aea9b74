"""Bring the files behind a dataset URI to local disk.

Local and ``pvc://`` files are read where they are; ``s3://``, ``http(s)://`` and ``hf://`` files are
downloaded into a scratch folder. Credentials come only from the environment (``AWS_*``, ``HF_TOKEN``),
as the official clients read them, and never appear in a log line or an error message.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit, urlunsplit

from kfp_components.data.errors import DatasetError
from kfp_components.data.readers import DataFile, is_data_file
from kfp_components.data.uris import PVC_ROOT_ENV, DatasetURI

log = logging.getLogger(__name__)

#: S3 endpoint for MinIO, Ceph/ODF and other S3-compatible stores; AWS_ENDPOINT_URL is read as well.
S3_ENDPOINT_ENVS = ("AWS_S3_ENDPOINT", "AWS_ENDPOINT_URL")
HTTP_TIMEOUT_S = 60
HTTP_ATTEMPTS = 3
_CHUNK = 1 << 20


def fetch(uri: DatasetURI, scratch: Path, *, split: str = "") -> list[DataFile]:
    """The data files behind ``uri``, in a stable order. Remote files are downloaded under ``scratch``.

    ``split`` picks one split: of an hf:// dataset (default ``train``), or of a folder (local, pvc:// or an
    s3:// prefix) by the Hub's file-name conventions; empty reads every file of a folder. A single file has
    no splits, so naming one for it is an error rather than ignored.
    """
    if uri.scheme in ("local", "pvc"):
        files = _in_split(_local_files(uri), split, uri, single_file=uri.local_path().is_file())
    elif uri.scheme == "s3":
        files = _fetch_s3(uri, scratch, split)
    elif uri.scheme in ("http", "https"):
        _in_split([], split, uri, single_file=True)
        files = [_fetch_http(uri, scratch)]
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
    if path.is_file():
        return [DataFile(path, path.name)]
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and is_data_file(p.name))
        return [DataFile(p, p.relative_to(path).as_posix()) for p in found]
    raise DatasetError(f"{uri.raw}: no such file or folder")


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
        keys += [item["Key"] for item in page.get("Contents", []) if is_data_file(item["Key"])]
    if not keys:
        raise DatasetError(f"{uri.raw}: no object with that key and no data files under that prefix")
    return sorted(keys)


def _fetch_http(uri: DatasetURI, scratch: Path) -> DataFile:
    name = PurePosixPath(urlsplit(uri.url).path).name or "data"
    target = scratch / name
    for attempt in range(1, HTTP_ATTEMPTS + 1):
        try:
            _download(uri, target)
            return DataFile(target, name)
        except urllib.error.HTTPError as exc:
            if exc.code < 500 or attempt == HTTP_ATTEMPTS:
                raise DatasetError(f"{uri.redacted()}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            if attempt == HTTP_ATTEMPTS:
                reason = getattr(exc, "reason", exc)
                raise DatasetError(
                    f"{uri.redacted()}: could not download after {HTTP_ATTEMPTS} attempts: {reason}"
                ) from None
        delay = 2 ** (attempt - 1)
        log.warning(
            "download of %s failed (attempt %d of %d); retrying in %ds",
            uri.redacted(),
            attempt,
            HTTP_ATTEMPTS,
            delay,
        )
        time.sleep(delay)
    raise AssertionError("unreachable")


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


def _download(uri: DatasetURI, target: Path) -> None:
    request = _http_request(uri.url)
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response, target.open("wb") as out:
        total = int(response.headers.get("Content-Length") or 0)
        done, last_report = 0, time.monotonic()
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            done += len(chunk)
            if time.monotonic() - last_report > 5:
                last_report = time.monotonic()
                log.info("downloading %s: %s", uri.redacted(), _progress(done, total))
    log.info("downloaded %s (%d bytes)", uri.redacted(), target.stat().st_size)


def _progress(done: int, total: int) -> str:
    if total:
        return f"{done / 1e6:.1f} of {total / 1e6:.1f} MB ({100 * done / total:.0f}%)"
    return f"{done / 1e6:.1f} MB"
