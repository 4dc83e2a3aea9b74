"""Where a registered model's files live, in the form the Model Registry and a serving runtime read.

A default Kubeflow install stores a pipeline's Model artifact in its bundled MinIO and names it
``minio://mlpipeline/v2/artifacts/...``; other installs use ``s3://`` or ``gs://``. :func:`model_storage`
turns such a URI into what the registry records on the model artifact:

* ``s3://bucket/path`` and ``minio://bucket/path`` become ``s3://bucket/path?endpoint=<endpoint>``, plus
  ``&defaultRegion=<region>`` when ``AWS_DEFAULT_REGION`` (or ``AWS_REGION``) is set: the form the
  ``model_registry`` client's ``utils.s3_uri_from`` builds. Serving reads bucket and path from it (KServe's
  storage initializer ignores the query and takes the endpoint from its storage secret); the registry UI
  reads the endpoint. The endpoint is ``storage_endpoint`` when given, else ``$AWS_S3_ENDPOINT`` (or
  ``$AWS_ENDPOINT_URL``), else, for ``minio://`` only, the MinIO service of a default Kubeflow install
  (:data:`DEFAULT_MINIO_ENDPOINT`). An ``s3://`` URI with no endpoint anywhere is AWS S3 and stays
  ``s3://bucket/path``.
* ``gs://``, ``pvc://`` and ``oci://`` URIs are recorded as given.
* The path inside the bucket or claim is the artifact's ``storagePath``.

Refused, with the reason: a path inside the container (``/tmp/model``, ``file://``, a bare path), which
disappears with the pod, and any URI or endpoint that carries credentials (``user:password@``), which
must never reach the registry.
"""

from __future__ import annotations

import dataclasses
import os
from urllib.parse import parse_qsl, urlsplit

from kfp_components.data.fetch import S3_ENDPOINT_ENVS
from kfp_components.typed_config import ConfigError

#: The MinIO of a default Kubeflow install (service ``minio-service`` in namespace ``kubeflow``, port 9000).
DEFAULT_MINIO_ENDPOINT = "http://minio-service.kubeflow:9000"
REGION_ENVS = ("AWS_DEFAULT_REGION", "AWS_REGION")
SCHEMES = ("s3", "minio", "gs", "pvc", "oci")
#: Query keys of the registry client's S3 URIs (``utils.s3_uri_from``).
_S3_QUERY_KEYS = ("endpoint", "defaultRegion")
_FORMS = "s3://bucket/prefix, minio://bucket/prefix, gs://bucket/prefix, pvc://claim/path or oci://registry/repo:tag"


@dataclasses.dataclass(frozen=True)
class ModelStorage:
    """A model's storage as the registry records it.

    Attributes:
        uri: The model artifact's URI (``s3://bucket/path?endpoint=...`` for S3-compatible stores).
        path: The path inside the bucket or claim (the artifact's ``storagePath``); empty for ``oci://``.
        endpoint: The S3 endpoint; empty for AWS S3, ``gs://``, ``pvc://`` and ``oci://``.
        source_uri: The URI as given (``minio://...``, ``s3://...``).
    """

    uri: str
    path: str
    endpoint: str
    source_uri: str


def model_storage(uri: str, endpoint: str = "", key: str = "storage_uri") -> ModelStorage:
    """The storage behind ``uri`` as the registry records it; :class:`ConfigError` (under ``key``) if it
    cannot be served. ``endpoint`` is the ``storage_endpoint`` option (empty: the environment, then the
    default for ``minio://``)."""
    uri = uri.strip()
    if not uri:
        raise ConfigError(
            key, f"required when a registry address is set: where the model is stored ({_FORMS})"
        )
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    parts = urlsplit(uri)
    if scheme and "@" in parts.netloc:
        raise ConfigError(
            key, f"the {scheme}:// URI carries credentials; give them as a secret, never in the URI"
        )
    if not scheme or scheme == "file":
        raise ConfigError(
            key,
            f"{uri!r} is a path inside the container, which disappears with the pod and cannot be served; "
            f"register where the model is stored: {_FORMS}",
        )
    if scheme not in SCHEMES:
        raise ConfigError(key, f"unsupported scheme {scheme + '://'!r} in {uri!r}; use {_FORMS}")
    location = parts.netloc
    path = parts.path.strip("/")
    if not location:
        raise ConfigError(key, f"{uri!r} names no bucket, claim or registry")
    if scheme == "oci":
        return ModelStorage(uri=uri, path="", endpoint="", source_uri=uri)
    if scheme in ("gs", "pvc"):
        if parts.query:
            raise ConfigError(key, f"{uri!r}: a {scheme}:// URI takes no query")
        return ModelStorage(uri=uri, path=path, endpoint="", source_uri=uri)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - set(_S3_QUERY_KEYS))
    if unknown:
        raise ConfigError(
            key,
            f"unknown query key(s) {', '.join(unknown)} in the {scheme}:// URI; allowed: endpoint, defaultRegion",
        )
    if not path:
        raise ConfigError(key, f"{uri!r} names a bucket but no path of the model inside it")
    if (
        query.get("endpoint")
        and endpoint.strip()
        and query["endpoint"].rstrip("/") != endpoint.strip().rstrip("/")
    ):
        raise ConfigError(
            key,
            f"the URI names endpoint {query['endpoint']!r} and storage_endpoint is {endpoint!r}; set only one",
        )
    resolved, source = _endpoint(scheme, query.get("endpoint", ""), endpoint.strip(), key)
    where = f"s3://{location}/{path}"
    if not resolved:
        return ModelStorage(uri=where, path=path, endpoint="", source_uri=uri)
    check_endpoint(resolved, source)
    resolved = resolved.rstrip("/")
    region = query.get("defaultRegion") or _first_env(REGION_ENVS)
    recorded = f"{where}?endpoint={resolved}" + (f"&defaultRegion={region}" if region else "")
    return ModelStorage(uri=recorded, path=path, endpoint=resolved, source_uri=uri)


def check_endpoint(endpoint: str, key: str = "storage_endpoint") -> str:
    """An S3 endpoint must be ``http(s)://host[:port]`` and must not carry credentials."""
    parts = urlsplit(endpoint.strip())
    if "@" in parts.netloc:
        raise ConfigError(key, "the S3 endpoint carries credentials; give them as a secret, never in the URL")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"expected an S3 endpoint such as {DEFAULT_MINIO_ENDPOINT}, got {endpoint!r}")
    if parts.query or parts.fragment or parts.path.strip("/"):
        raise ConfigError(key, f"an S3 endpoint is scheme://host[:port], got {endpoint!r}")
    return endpoint


def _endpoint(scheme: str, in_uri: str, option: str, key: str) -> tuple[str, str]:
    """The S3 endpoint and where it came from (for messages): the URI, the option, the environment, or (for
    ``minio://``) the default install's MinIO; ``""`` for AWS S3."""
    if in_uri:
        return in_uri, key
    if option:
        return option, "storage_endpoint"
    for name in S3_ENDPOINT_ENVS:
        if value := os.environ.get(name, "").strip():
            return value, f"${name}"
    return (DEFAULT_MINIO_ENDPOINT, "storage_endpoint") if scheme == "minio" else ("", "")


def _first_env(names: tuple[str, ...]) -> str:
    return next((os.environ[name].strip() for name in names if os.environ.get(name, "").strip()), "")
