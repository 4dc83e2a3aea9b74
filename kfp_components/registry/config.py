"""Options for registering a trained model in the Kubeflow Model Registry.

Read through :func:`kfp_components.typed_config.from_dict` like every other config, so a typo in a key or a
wrong type fails before any work starts. The access token is never an option: it comes from a secret
environment variable or from the pod's service-account token file, and it is never logged. It is sent over
TLS only, unless ``allow_insecure_token`` says otherwise.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from kfp_components.registry.storage import ModelStorage, check_endpoint, model_storage
from kfp_components.typed_config import ConfigError, Options

DEFAULT_TOKEN_ENV = "MODEL_REGISTRY_TOKEN"
DEFAULT_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"

OnExistingVersion = Literal["fail", "skip", "next"]


@dataclasses.dataclass
class RegistryConfig(Options):
    """Where and how to register a model version.

    Attributes:
        address: Model Registry REST address, e.g. ``https://model-registry-rest.rhoai-model-registries.svc``
            (no scheme: ``https://`` when ``is_secure``, else ``http://``). Empty: registration is skipped
            and the log says so; provenance is still written beside the model.
        port: REST port; 0 infers it (443 when secure, 8080 otherwise). A port in ``address`` wins.
        is_secure: Use TLS. A secure connection needs a token.
        allow_insecure_token: Send the bearer token over plain ``http://`` too. Off: registering over http
            with a token (``token_env`` or the service-account token) is an error before any request;
            ``is_secure: false`` alone is no consent. Over http without a token, nothing is sent.
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
        on_existing_version: What to do when the version already exists from another run: ``fail`` (raise),
            ``skip`` (return the existing version untouched; one without a model artifact is an error) or
            ``next`` (register ``<version>-2``, ``-3``, ... the next free name). A version of the same run
            (see :func:`~kfp_components.registry.client.run_identity`) is completed instead, whatever the
            policy.
        storage_uri: Where the model files are stored for serving: ``s3://``, ``minio://`` (a default Kubeflow
            install's artifact store), ``gs://``, ``pvc://`` or ``oci://``. S3 and MinIO URIs are recorded as
            ``s3://bucket/path?endpoint=...`` (see :mod:`kfp_components.registry.storage`). A path inside the
            container is refused: it disappears with the pod.
        storage_endpoint: S3 endpoint of the store holding an ``s3://`` or ``minio://`` model, recorded with its
            URI for serving. Empty: ``$AWS_S3_ENDPOINT`` (or ``$AWS_ENDPOINT_URL``) when set, else for
            ``minio://`` the MinIO of a default Kubeflow install, ``http://minio-service.kubeflow:9000``, else
            none (AWS S3).
        storage_key: Name of the storage secret (data connection) serving reads the model with, recorded as the
            artifact's ``storageKey``; empty records none. A name only: credentials never go to the registry.
        max_attempts: Attempts per registry call when the server is unreachable or answers 5xx.
        backoff_seconds: Wait before the second attempt; doubles each attempt up to ``max_backoff_seconds``.
        max_backoff_seconds: Longest wait between attempts.
    """

    address: str = ""
    port: int = 0
    is_secure: bool = True
    allow_insecure_token: bool = False
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
    storage_endpoint: str = ""
    storage_key: str = ""
    max_attempts: int = 5
    backoff_seconds: float = 1.0
    max_backoff_seconds: float = 30.0

    @property
    def enabled(self) -> bool:
        """Whether a registry address is set (an empty address skips registration)."""
        return bool(self.address.strip())

    def validate(self) -> None:
        """Check the options that can be checked without a server; raises :class:`ConfigError`."""
        if self.max_attempts < 1:
            raise ConfigError("max_attempts", f"must be at least 1, got {self.max_attempts}")
        if self.backoff_seconds < 0 or self.max_backoff_seconds < 0:
            raise ConfigError("backoff_seconds", "backoff times must not be negative")
        if not 0 <= self.port <= 65535:
            raise ConfigError("port", f"expected 0 (infer) or a TCP port, got {self.port}")
        if self.storage_endpoint:
            check_endpoint(self.storage_endpoint)
        if "/" in self.storage_key or "@" in self.storage_key or ":" in self.storage_key:
            raise ConfigError(
                "storage_key", "expected the name of a secret (data connection), not a path or URL"
            )
        if not self.enabled:
            return
        if not self.model_name.strip():
            raise ConfigError("model_name", "required when a registry address is set")
        if "@" in urlparse(self.server_url()).netloc:
            raise ConfigError(
                "address", "the address carries credentials; give the token as a secret, never in the URL"
            )
        if self.custom_ca and not Path(self.custom_ca).is_file():
            raise ConfigError("custom_ca", f"CA bundle {self.custom_ca!r} does not exist")
        self.storage()

    def storage(self) -> ModelStorage:
        """Where the model is stored, as the registry records it (:func:`~kfp_components.registry.storage.model_storage`)."""
        return model_storage(self.storage_uri, self.storage_endpoint)

    def recorded_storage_uri(self) -> str:
        """The storage URI for the provenance record: as the registry records it, or as given when
        registration is off and the URI cannot be served (a local path under ``kfp.local``)."""
        try:
            return self.storage().uri
        except ConfigError:
            if self.enabled:
                raise
            return self.storage_uri

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

    def token_source(self) -> str:
        """Where :meth:`resolve_token` finds the token, for messages (never the token itself)."""
        if self.token_env and os.environ.get(self.token_env, "").strip():
            return f"${self.token_env}"
        return f"the service-account token at {self.token_path}"
