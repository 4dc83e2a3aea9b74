"""Options for registering a trained model in the Kubeflow Model Registry.

Read through :func:`kfp_components.typed_config.from_dict` like every other config, so a typo in a key or a
wrong type fails before any work starts. The access token is never an option: it comes from a secret
environment variable or from the pod's service-account token file, and it is never logged.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from kfp_components.typed_config import ConfigError

DEFAULT_TOKEN_ENV = "MODEL_REGISTRY_TOKEN"  # noqa: S105 (the name of a variable, not a secret)
DEFAULT_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"  # noqa: S105
STORAGE_SCHEMES = ("s3", "pvc", "oci")

OnExistingVersion = Literal["fail", "skip", "next"]


@dataclasses.dataclass
class RegistryConfig:
    """Where and how to register a model version.

    Attributes:
        address: Model Registry REST address, e.g. ``https://model-registry-rest.rhoai-model-registries.svc``
            (no scheme: ``https://`` when ``is_secure``, else ``http://``). Empty: registration is skipped
            and the log says so; provenance is still written beside the model.
        port: REST port; 0 infers it (443 when secure, 8080 otherwise). A port in ``address`` wins.
        is_secure: Use TLS. A secure connection needs a token.
        custom_ca: Path of a PEM bundle to verify the server with (e.g. the cluster's service CA); empty uses
            the system trust store.
        token_env: Environment variable holding the bearer token (set it from a Kubernetes secret).
        token_path: File read when ``token_env`` is unset or empty: the pod's service-account token.
        author: Author of the model version and owner of a newly created registered model.
        model_name: Registered model name. Required when ``address`` is set.
        version_name: Version name; empty derives one from the run id (or the UTC time).
        description: Version description.
        model_format: Model format name recorded on the model artifact (KServe uses it to pick a runtime).
        model_format_version: Model format version recorded on the model artifact.
        on_existing_version: What to do when the version already exists: ``fail`` (raise), ``skip`` (return
            the existing version untouched) or ``next`` (register ``<version>-2``, ``-3``, ... the next free
            name).
        storage_uri: Where the model files are stored for serving: ``s3://``, ``pvc://`` or ``oci://``. A path
            inside the container is refused: it disappears with the pod.
        max_attempts: Attempts per registry call when the server is unreachable or answers 5xx.
        backoff_seconds: Wait before the second attempt; doubles each attempt up to ``max_backoff_seconds``.
        max_backoff_seconds: Longest wait between attempts.
    """

    address: str = ""
    port: int = 0
    is_secure: bool = True
    custom_ca: str = ""
    token_env: str = DEFAULT_TOKEN_ENV
    token_path: str = DEFAULT_TOKEN_PATH
    author: str = "kfp-components"
    model_name: str = ""
    version_name: str = ""
    description: str = ""
    model_format: str = "safetensors"
    model_format_version: str = "1"
    on_existing_version: OnExistingVersion = "fail"
    storage_uri: str = ""
    max_attempts: int = 5
    backoff_seconds: float = 1.0
    max_backoff_seconds: float = 30.0

    @property
    def enabled(self) -> bool:
        """Whether a registry address is set (an empty address skips registration)."""
        return bool(self.address.strip())

    def validate(self) -> None:
        """Check the options that can be checked without a server; raises :class:`ConfigError`."""
        if self.on_existing_version not in ("fail", "skip", "next"):
            raise ConfigError(
                "on_existing_version", f"expected fail, skip or next, got {self.on_existing_version!r}"
            )
        if self.max_attempts < 1:
            raise ConfigError("max_attempts", f"must be at least 1, got {self.max_attempts}")
        if self.backoff_seconds < 0 or self.max_backoff_seconds < 0:
            raise ConfigError("backoff_seconds", "backoff times must not be negative")
        if not 0 <= self.port <= 65535:
            raise ConfigError("port", f"expected 0 (infer) or a TCP port, got {self.port}")
        if not self.enabled:
            return
        if not self.model_name.strip():
            raise ConfigError("model_name", "required when a registry address is set")
        if self.custom_ca and not Path(self.custom_ca).is_file():
            raise ConfigError("custom_ca", f"CA bundle {self.custom_ca!r} does not exist")
        check_storage_uri(self.storage_uri)

    def server_url(self) -> str:
        """The address with a scheme: ``https://`` when secure, ``http://`` otherwise, unless it has one."""
        address = self.address.strip().rstrip("/")
        if "://" in address:
            return address
        return f"{'https' if self.is_secure else 'http'}://{address}"

    def server_port(self) -> int:
        """The port to connect to: the one in ``address``, else ``port``, else 443/8080 by ``is_secure``."""
        parsed = urlparse(self.server_url())
        if parsed.port:
            return parsed.port
        if self.port:
            return self.port
        return 443 if self.is_secure else 8080

    def display_url(self) -> str:
        """``scheme://host:port`` for messages (the address never carries credentials)."""
        parsed = urlparse(self.server_url())
        return f"{parsed.scheme}://{parsed.hostname}:{self.server_port()}"

    def resolve_token(self) -> str | None:
        """The bearer token from ``token_env`` or ``token_path``; None when neither has one. Never logged."""
        if self.token_env and (value := os.environ.get(self.token_env, "").strip()):
            return value
        if self.token_path:
            try:
                value = Path(self.token_path).read_text(encoding="utf-8").strip()
            except OSError:
                return None
            return value or None
        return None


def check_storage_uri(uri: str) -> str:
    """Accept ``s3://``, ``pvc://`` and ``oci://`` URIs; refuse a container-local path with the reason."""
    uri = uri.strip()
    if not uri:
        raise ConfigError(
            "storage_uri",
            "required when a registry address is set: where the model is stored for serving "
            "(s3://bucket/prefix, pvc://claim/path or oci://registry/repo:tag)",
        )
    scheme = urlparse(uri).scheme.lower() if "://" in uri else ""
    if scheme in STORAGE_SCHEMES:
        if not uri.split("://", 1)[1].strip("/"):
            raise ConfigError("storage_uri", f"{uri!r} names no bucket, claim or repository")
        return uri
    if not scheme or scheme == "file":
        raise ConfigError(
            "storage_uri",
            f"{uri!r} is a path inside the container, which disappears with the pod and cannot be served; "
            "upload the model first and register s3://, pvc:// or oci:// storage",
        )
    raise ConfigError("storage_uri", f"unsupported scheme {scheme!r} in {uri!r}; use s3://, pvc:// or oci://")
