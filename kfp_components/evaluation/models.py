"""Where the evaluated models come from, as a cluster has them.

A model option (``model_path``, ``base_model_name_or_path``) may be:

* a Hugging Face id (``Qwen/Qwen2.5-0.5B``), read from the Hub or its cache (``HF_HOME``);
* a folder: a plain path (``/workspace/models/base``, e.g. on a mounted volume) or ``file:///path``;
* ``pvc://claim/path``: a PersistentVolumeClaim mounted in the pod, resolved like the dataset stage's
  pvc:// URIs (``$KFP_COMPONENTS_PVC_ROOT/<claim>/<path>``, default root ``/mnt/pvc``), except the workspace
  claim (``workspace_pvc``), which is read where it is mounted (``workspace_path``);
* ``s3://bucket/prefix``: a checkpoint folder in S3, MinIO or ODF, downloaded under ``TMPDIR`` with the
  dataset stage's S3 client (endpoint and credentials from ``AWS_*`` variables), for clusters with no Hub.

:func:`locate_model` checks a reference cheaply, before any task data or model loads: a folder must hold a
checkpoint (``config.json``) this process can read, a claim must be mounted, an S3 prefix must list a
``config.json``, a Hub id must give its ``config.json``. :meth:`ModelSource.materialise` then hands lm-eval a
folder or a Hub id, downloading an S3 checkpoint first. Every error names the option and what to do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import urlsplit

from kfp_components.data.fetch import s3_errors
from kfp_components.data.uris import DEFAULT_PVC_ROOT, PVC_ROOT_ENV, parse_pvc_uri
from kfp_components.evaluation.errors import ModelNotFoundError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
FORMS = "a Hugging Face id (org/name), a mounted folder, pvc://claim/path or s3://bucket/prefix"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A located model.

    Attributes:
        option: The option that named it (``base_model_name_or_path``), for messages.
        given: The reference as given.
        kind: ``hub`` (a Hugging Face id), ``folder`` (a local or mounted folder) or ``s3``.
        location: The Hub id, the folder's path, or ``bucket/prefix``.
    """

    option: str
    given: str
    kind: Literal["hub", "folder", "s3"]
    location: str

    def materialise(self, scratch: Path) -> str:
        """What lm-eval loads: the Hub id, the folder, or (s3) the folder it was downloaded to under ``scratch``."""
        if self.kind != "s3":
            return self.location
        bucket, _, prefix = self.location.partition("/")
        target = scratch / self.option
        _download_s3_folder(self, bucket, prefix, target)
        return str(target)


def locate_model(
    value: str, option: str, *, workspace_pvc: str = "", workspace_path: str = ""
) -> ModelSource:
    """Check the model reference ``value`` of ``option`` and say where it is; :class:`ModelNotFoundError` if it
    is missing or unreadable. Nothing is downloaded but a Hub model's ``config.json``."""
    value = value.strip()
    if not value:
        raise ModelNotFoundError(f"{option} is empty: give {FORMS}")
    if "://" in value:
        scheme, rest = value.split("://", 1)
        scheme = scheme.lower()
        if scheme == "pvc":
            return _folder(option, value, _claim_path(option, value, workspace_pvc, workspace_path))
        if scheme == "file":
            return _folder(option, value, Path(urlsplit(value).path))
        if scheme == "s3":
            return _locate_s3(option, value, rest)
        raise ModelNotFoundError(f"{option} {value!r}: unsupported scheme {scheme + '://'!r}; give {FORMS}")
    path = Path(value).expanduser()
    if path.exists() or value.startswith(("/", ".", "~")) or not _HUB_ID.match(value):
        return _folder(option, value, path)
    return _locate_hub(option, value)


# ----------------------------------------------------------------------------------------------- folders
def _claim_path(option: str, value: str, workspace_pvc: str, workspace_path: str) -> Path:
    claim, inner = parse_pvc_uri(value, option, ModelNotFoundError)
    if workspace_pvc and claim == workspace_pvc:
        root, how = Path(workspace_path), f"the workspace volume's mount, workspace_path={workspace_path!r}"
    else:
        root = Path(os.environ.get(PVC_ROOT_ENV) or DEFAULT_PVC_ROOT) / claim
        how = f"mount it there or set {PVC_ROOT_ENV}"
    if not root.is_dir():
        raise ModelNotFoundError(f"{option} {value!r}: claim {claim!r} is not mounted at {root} ({how})")
    return root / inner


def _folder(option: str, value: str, path: Path) -> ModelSource:
    where = f"{option} {value!r}" + (f" ({path})" if str(path) != value else "")
    if not path.exists():
        raise ModelNotFoundError(f"{where}: no such folder; give {FORMS}")
    if not path.is_dir():
        raise ModelNotFoundError(f"{where} is a file; give the checkpoint's folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ModelNotFoundError(
            f"{where}: this process (uid {os.getuid()}) cannot read the folder: {_PERMISSIONS}"
        )
    config = path / CONFIG_FILE
    if not config.is_file():
        raise ModelNotFoundError(f"{where} is not a Hugging Face checkpoint folder: it has no {CONFIG_FILE}")
    if not os.access(config, os.R_OK):
        raise ModelNotFoundError(
            f"{where}: this process (uid {os.getuid()}) cannot read {config}: {_PERMISSIONS}"
        )
    return ModelSource(option=option, given=value, kind="folder", location=str(path))


_PERMISSIONS = "make the files readable by the pod's user or group (e.g. fsGroup, chmod -R g+rX)"


# ----------------------------------------------------------------------------------------------- hub
def _locate_hub(option: str, value: str) -> ModelSource:
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(repo_id=value, filename=CONFIG_FILE)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ModelNotFoundError(
            f"{option} {value!r} is not a folder here, and the Hugging Face Hub did not provide its "
            f"{CONFIG_FILE} ({type(exc).__name__}{': ' + reason if reason else ''}). Check the id (and HF_TOKEN "
            "for a gated model); where the Hub cannot be reached, give pvc://claim/path, s3://bucket/prefix or a "
            "mounted folder"
        ) from None
    return ModelSource(option=option, given=value, kind="hub", location=value)


# ----------------------------------------------------------------------------------------------- s3
def _locate_s3(option: str, value: str, rest: str) -> ModelSource:
    parts = urlsplit(value)
    if "@" in parts.netloc or parts.query:
        raise ModelNotFoundError(
            f"{option}: give s3://bucket/prefix with no credentials or query; the endpoint and credentials come "
            "from AWS_S3_ENDPOINT, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (a Kubernetes secret)"
        )
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not _S3_BUCKET.match(bucket):
        raise ModelNotFoundError(f"{option} {value!r}: {bucket!r} is not a valid S3 bucket name")
    source = ModelSource(option=option, given=value, kind="s3", location=f"{bucket}/{prefix}")
    config_key = f"{prefix}/{CONFIG_FILE}" if prefix else CONFIG_FILE
    with _s3_errors(source):
        if _s3_has(bucket, config_key):
            return source
        keys = _s3_keys(bucket, prefix, limit=1000)
    found = (
        "nothing"
        if not keys
        else f"{len(keys)}{'+' if len(keys) >= 1000 else ''} object(s) but no {CONFIG_FILE}"
    )
    raise ModelNotFoundError(
        f"{option} {value!r}: found {found} under that prefix; give the folder of a Hugging Face checkpoint"
    )


def _s3_has(bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    from kfp_components.data.fetch import s3_client

    try:
        s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def _s3_keys(bucket: str, prefix: str, limit: int | None = None) -> list[str]:
    from kfp_components.data.fetch import s3_client

    client = s3_client()
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""
    ):
        keys += [item["Key"] for item in page.get("Contents", []) if not item["Key"].endswith("/")]
        if limit is not None and len(keys) >= limit:
            break
    return keys


def _download_s3_folder(source: ModelSource, bucket: str, prefix: str, target: Path) -> None:
    from kfp_components.data.fetch import s3_client

    with _s3_errors(source):
        client = s3_client()
        total = 0
        for key in _s3_keys(bucket, prefix):
            relative = PurePosixPath(key).relative_to(prefix) if prefix else PurePosixPath(key)
            if ".." in relative.parts:
                raise ModelNotFoundError(
                    f"{source.option} {source.given!r}: object key {key!r} leaves the folder"
                )
            path = target / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(path))
            total += path.stat().st_size
    log.info("%s: downloaded %s to %s (%.1f MB)", source.option, source.given, target, total / 1e6)


def _s3_errors(source: ModelSource) -> contextlib.AbstractContextManager[None]:
    """S3 failures as :class:`ModelNotFoundError` naming the option, never a credential."""
    return s3_errors(f"{source.option} {source.given!r}", ModelNotFoundError)
