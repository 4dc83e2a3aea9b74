"""Dataset URIs: parse, describe without secrets, and reject bad ones before any download.

Accepted forms::

    hf://org/name[:config][@revision]     a Hugging Face Hub dataset repository
    s3://bucket/key-or-prefix             one object, or every data file under a prefix
    http://host/path, https://host/path   one file
    pvc://claim/path                      a PersistentVolumeClaim mounted in the pod
    file:///abs/path, /abs/path, rel/path a local file or folder
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from kfp_components.data.errors import DatasetError
from kfp_components.redaction import redact_uris

#: Where ``pvc://claim/path`` is looked for: ``$KFP_COMPONENTS_PVC_ROOT/<claim>/<path>``.
PVC_ROOT_ENV = "KFP_COMPONENTS_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/pvc"

_HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
#: What an HTTP request line cannot carry: white space and control characters.
_UNSAFE_URL_CHARACTER = re.compile(r"[\x00-\x20\x7f]")


@dataclass(frozen=True)
class DatasetURI:
    """A parsed dataset location. ``scheme`` is one of hf, s3, http, https, pvc, local."""

    scheme: str
    raw: str
    repo_id: str = ""  # hf
    config: str = ""  # hf
    revision: str = ""  # hf
    bucket: str = ""  # s3
    key: str = ""  # s3 key or prefix
    url: str = ""  # http(s)
    claim: str = ""  # pvc
    path: str = ""  # pvc path inside the claim, or the local path

    def claim_root(self) -> Path:
        """Where the claim of a ``pvc`` URI is mounted: ``$KFP_COMPONENTS_PVC_ROOT/<claim>``."""
        return Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT)) / self.claim

    def local_path(self) -> Path:
        """The filesystem path of a ``pvc`` or ``local`` URI."""
        if self.scheme == "pvc":
            return self.claim_root() / self.path
        if self.scheme == "local":
            return Path(self.path)
        raise ValueError(f"{self.scheme}:// URIs have no local path")

    def redacted(self) -> str:
        """The URI as it may appear in logs, metrics and provenance: no credentials, no signed query."""
        return redact_uri(self.raw)


def redact_uri(uri: str) -> str:
    """``uri`` fit for a log line: user info and secret-looking query values replaced (see
    :func:`kfp_components.redaction.redact_uris`); everything else, ``hf://name@revision`` included, as given."""
    return redact_uris(uri)


def parse_pvc_uri(
    uri: str, option: str = "dataset_name_or_path", error: Callable[[str], Exception] = DatasetError
) -> tuple[str, str]:
    """``pvc://claim/path`` as ``(claim, path)``; an ``error`` naming ``option`` for an invalid claim name or a
    path that climbs out of the claim (``..``)."""
    claim, _, path = uri.split("://", 1)[1].partition("/")
    if not _DNS1123.match(claim) or len(claim) > 253:
        raise error(
            f"{option} {uri!r}: {claim!r} is not a valid PersistentVolumeClaim name (lower-case letters, digits "
            "and '-')"
        )
    if ".." in Path(path).parts:
        raise error(f"{option} {uri!r}: '..' is not allowed in a pvc:// path")
    return claim, path.strip("/")


def parse_dataset_uri(uri: str) -> DatasetURI:
    """Parse ``uri`` or raise :class:`DatasetError` saying what is wrong with it."""
    if not isinstance(uri, str) or not uri.strip():
        raise DatasetError(
            "dataset_name_or_path is empty: give hf://, s3://, https://, pvc:// or a local path"
        )
    uri = uri.strip()
    if "://" not in uri:
        return DatasetURI(scheme="local", raw=uri, path=uri)
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    if scheme == "hf":
        return _parse_hf(uri, rest)
    if scheme == "s3":
        bucket, _, key = rest.partition("/")
        if not _S3_BUCKET.match(bucket):
            raise DatasetError(
                f"dataset_name_or_path {redact_uri(uri)!r}: {bucket!r} is not a valid S3 bucket name"
            )
        return DatasetURI(scheme="s3", raw=uri, bucket=bucket, key=key.strip("/"))
    if scheme in ("http", "https"):
        try:
            parts = urlsplit(uri)
            parts.port  # noqa: B018  # raises for a port that is not a number
        except ValueError as exc:
            raise DatasetError(f"dataset_name_or_path {redact_uri(uri)!r}: not a valid URL ({exc})") from None
        if not parts.hostname:
            raise DatasetError(f"dataset_name_or_path {redact_uri(uri)!r}: no host name")
        unsafe = _UNSAFE_URL_CHARACTER.search(uri)
        if unsafe:
            what = "a space" if unsafe.group() == " " else f"the control character {unsafe.group()!r}"
            raise DatasetError(
                f"dataset_name_or_path {redact_uri(uri)!r}: the URL holds {what} (character "
                f"{unsafe.start() + 1}); percent-encode it (a space is %20)"
            )
        return DatasetURI(scheme=scheme, raw=uri, url=uri)
    if scheme == "pvc":
        claim, path = parse_pvc_uri(uri)
        return DatasetURI(scheme="pvc", raw=uri, claim=claim, path=path)
    if scheme == "file":
        path = urlsplit(uri).path
        if not path:
            raise DatasetError(f"dataset_name_or_path {uri!r}: no path")
        return DatasetURI(scheme="local", raw=uri, path=path)
    raise DatasetError(
        f"dataset_name_or_path {redact_uri(uri)!r}: unsupported scheme {scheme + '://'!r}; "
        "use hf://, s3://, http(s)://, pvc://, file:// or a plain path"
    )


def _parse_hf(uri: str, rest: str) -> DatasetURI:
    repo_and_config, _, revision = rest.partition("@")
    repo_id, _, config = repo_and_config.partition(":")
    repo_id = repo_id.strip("/")
    if not _HF_REPO.match(repo_id):
        raise DatasetError(
            f"dataset_name_or_path {uri!r}: {repo_id!r} is not a Hugging Face dataset id (expected 'org/name' or 'name')"
        )
    if "@" in rest and not revision:
        raise DatasetError(f"dataset_name_or_path {uri!r}: empty revision after '@'")
    if ":" in repo_and_config and not config:
        raise DatasetError(f"dataset_name_or_path {uri!r}: empty config name after ':'")
    return DatasetURI(scheme="hf", raw=uri, repo_id=repo_id, config=config, revision=revision)
