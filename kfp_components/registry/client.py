"""Register a model version in the Kubeflow Model Registry with the official ``model_registry`` client.

One call, :func:`register_model`, covers the cases a pipeline meets: a new model, a new version of an
existing model, a version that already exists (``fail``, ``skip`` or ``next`` by ``on_existing_version``),
a server that is down (bounded retries with exponential backoff, then a clear error) and a rejected token
(a clear 401 error). Provenance is stored as custom properties on both the version and its model artifact.
The token is passed to the client and nowhere else: it is never logged and never stored.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar

from kfp_components.registry.config import RegistryConfig
from kfp_components.registry.provenance import to_custom_properties, utc_now
from kfp_components.registry.storage import ModelStorage

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_NEXT_VERSIONS = 1000


class RegistryError(RuntimeError):
    """Registration failed; the message says why and what to check."""


class RegistryUnavailableError(RegistryError):
    """The registry could not be reached (or kept answering 5xx) after every attempt."""


class RegistryAuthError(RegistryError):
    """The registry refused the token (401) or the identity lacks access (403)."""


class VersionExistsError(RegistryError):
    """The version already exists and ``on_existing_version`` is ``fail``."""


@dataclasses.dataclass(frozen=True)
class RegistrationResult:
    """What :func:`register_model` did.

    Attributes:
        status: ``registered`` (a new version), ``existing`` (the version existed, policy ``skip``) or
            ``skipped`` (no registry address).
        model_name, version_name: The names used (``version_name`` may differ from the requested one under
            policy ``next``).
        model_id, version_id, artifact_id: Registry ids; empty when skipped.
        created_model: Whether the registered model itself was created by this call.
        message: One line for the log.
    """

    status: Literal["registered", "existing", "skipped"]
    model_name: str = ""
    version_name: str = ""
    model_id: str = ""
    version_id: str = ""
    artifact_id: str = ""
    created_model: bool = False
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        """Plain-data form, for provenance.json and component outputs."""
        return dataclasses.asdict(self)


def derive_version_name(provenance: Mapping[str, Any]) -> str:
    """A version name from the run: ``run-<run id>`` when there is one, else the UTC time ``YYYYMMDD-HHMMSS``."""
    run_id = str(provenance.get("pipeline", {}).get("run_id", "")).strip()
    if run_id:
        return "run-" + re.sub(r"[^A-Za-z0-9._-]+", "-", run_id)[:48].strip("-")
    return re.sub(r"[-:]", "", utc_now()).replace("T", "-").rstrip("Z")


def register_model(
    config: RegistryConfig,
    provenance: Mapping[str, Any],
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> RegistrationResult:
    """Register the model stored at ``config.storage_uri`` (as :meth:`RegistryConfig.storage` records it) as a version of ``config.model_name``, with provenance as properties.

    Returns a ``skipped`` result (and logs why) when ``config.address`` is empty. Raises
    :class:`RegistryUnavailableError`, :class:`RegistryAuthError`, :class:`VersionExistsError` or
    :class:`RegistryError`; the configuration is checked first (:class:`~kfp_components.typed_config.ConfigError`).
    """
    config.validate()
    if not config.enabled:
        message = "Model Registry address is empty: registration skipped (provenance is still written)"
        log.info(message)
        return RegistrationResult(status="skipped", model_name=config.model_name, message=message)
    storage = config.storage()
    if storage.uri != storage.source_uri:
        log.info("model storage %s is recorded as %s", storage.source_uri, storage.uri)
    url = config.display_url()
    calls = _Calls(config, url, sleep)
    registry = calls.connect()
    model_name = config.model_name
    wanted = config.version_name.strip() or derive_version_name(provenance)
    properties = to_custom_properties(provenance)

    existing_model = calls.run(
        "look up the registered model", lambda: registry.get_registered_model(model_name)
    )
    version_name = wanted
    for attempt in range(MAX_NEXT_VERSIONS):
        existing = None
        if existing_model is not None:
            existing = calls.run(
                "look up the version", functools.partial(registry.get_model_version, model_name, version_name)
            )
        if existing is not None:
            if config.on_existing_version == "fail":
                raise VersionExistsError(
                    f"version {version_name!r} of model {model_name!r} already exists in the Model Registry at "
                    f"{url} (id {existing.id}); set on_existing_version to 'skip' to keep it or 'next' to "
                    "register the next free version name, or choose another version_name"
                )
            if config.on_existing_version == "skip":
                message = (
                    f"version {version_name!r} of model {model_name!r} already exists (id {existing.id}); "
                    "kept it unchanged (on_existing_version=skip)"
                )
                log.info(message)
                artifact = calls.run(
                    "look up the model artifact",
                    functools.partial(registry.get_model_artifact, model_name, version_name),
                )
                return RegistrationResult(
                    status="existing",
                    model_name=model_name,
                    version_name=version_name,
                    model_id=str(existing_model.id),
                    version_id=str(existing.id),
                    artifact_id=str(artifact.id) if artifact is not None else "",
                    message=message,
                )
            version_name = f"{wanted}-{attempt + 2}"
            continue
        try:
            return _create(
                calls, registry, config, storage, model_name, version_name, properties, existing_model is None
            )
        except _VersionRace:
            # Someone registered the same name between our look-up and the create.
            if config.on_existing_version != "next":
                existing_model = calls.run(
                    "look up the registered model", lambda: registry.get_registered_model(model_name)
                )
                continue
            existing_model = existing_model or calls.run(
                "look up the registered model", lambda: registry.get_registered_model(model_name)
            )
            version_name = f"{wanted}-{attempt + 2}"
    raise RegistryError(
        f"no free version name for {model_name!r} after {MAX_NEXT_VERSIONS} tries from {wanted!r}"
    )


class _VersionRace(Exception):
    """The version appeared between the look-up and the create."""


def _create(
    calls: _Calls,
    registry: Any,
    config: RegistryConfig,
    storage: ModelStorage,
    model_name: str,
    version_name: str,
    properties: dict[str, str | int | float | bool],
    creating_model: bool,
) -> RegistrationResult:
    from model_registry.exceptions import StoreError

    def create() -> Any:
        return registry.register_model(
            model_name,
            storage.uri,
            storage_key=config.storage_key or None,
            storage_path=storage.path or None,
            model_format_name=config.model_format,
            model_format_version=config.model_format_version,
            version=version_name,
            author=config.author,
            owner=config.author,
            version_description=config.description or None,
            metadata=properties,
        )

    try:
        model = calls.run("register the version", create)
    except StoreError as exc:
        if "already exists" in str(exc):
            raise _VersionRace from exc
        raise RegistryError(f"registering {model_name!r} version {version_name!r} failed: {exc}") from exc
    version = calls.run("read back the version", lambda: registry.get_model_version(model_name, version_name))
    artifact = calls.run(
        "read back the artifact", lambda: registry.get_model_artifact(model_name, version_name)
    )
    if artifact is not None and properties:
        # The client puts metadata on the version only; the serving side reads the artifact, so add it there.
        artifact.custom_properties = {**(artifact.custom_properties or {}), **properties}
        artifact = calls.run("add provenance to the artifact", lambda: registry.update(artifact))
    message = (
        f"registered {model_name!r} version {version_name!r} (model id {model.id}, version id "
        f"{version.id if version else '?'}) at {calls.url}{' as a new model' if creating_model else ''}"
    )
    log.info(message)
    return RegistrationResult(
        status="registered",
        model_name=model_name,
        version_name=version_name,
        model_id=str(model.id),
        version_id=str(version.id) if version else "",
        artifact_id=str(artifact.id) if artifact else "",
        created_model=creating_model,
        message=message,
    )


class _Calls:
    """Runs client calls with bounded retries on transient failures and clear errors on the others."""

    def __init__(self, config: RegistryConfig, url: str, sleep: Callable[[float], None]):
        self.config = config
        self.url = url
        self.sleep = sleep

    def connect(self) -> Any:
        """A connected ``ModelRegistry`` (the constructor already lists models, so it checks the token)."""
        import warnings

        from model_registry import ModelRegistry

        token = self.config.resolve_token()
        if self.config.is_secure and not token:
            raise RegistryAuthError(
                f"no token for the secure Model Registry at {self.url}: set ${self.config.token_env} from a "
                f"secret or mount a service-account token at {self.config.token_path}"
            )
        log.info("connecting to the Model Registry at %s (token %s)", self.url, "set" if token else "not set")

        def make() -> Any:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "User access token is missing" for insecure test servers
                return ModelRegistry(
                    self.config.server_url(),
                    self.config.server_port(),
                    author=self.config.author,
                    is_secure=self.config.is_secure,
                    user_token=token or "",
                    custom_ca=self.config.custom_ca or None,
                    log_level=logging.WARNING,
                )

        return self.run("connect", make)

    def run(self, what: str, call: Callable[[], T]) -> T:
        from mr_openapi import exceptions as api_errors

        delay = self.config.backoff_seconds
        attempts = self.config.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                return call()
            except api_errors.UnauthorizedException:
                raise RegistryAuthError(
                    f"the Model Registry at {self.url} answered 401 Unauthorized to '{what}': the token was "
                    f"rejected; check the secret behind ${self.config.token_env} (or the service-account "
                    "token) and that it is not expired"
                ) from None
            except api_errors.ForbiddenException:
                raise RegistryAuthError(
                    f"the Model Registry at {self.url} answered 403 Forbidden to '{what}': the identity has "
                    "no access to this registry; grant the pipeline's service account access to it"
                ) from None
            except api_errors.ApiException as exc:
                if exc.status is not None and exc.status < 500:
                    raise RegistryError(
                        f"the Model Registry at {self.url} answered {exc.status} {exc.reason} to '{what}': "
                        f"{_body(exc)}"
                    ) from None
                error = f"{exc.status} {exc.reason}"
            except (TimeoutError, OSError) as exc:  # aiohttp's connection errors are OSErrors
                error = f"{type(exc).__name__}: {exc}"
            except Exception as exc:
                if not _is_connection_error(exc):
                    raise
                error = f"{type(exc).__name__}: {exc}"
            if attempt == attempts:
                raise RegistryUnavailableError(
                    f"the Model Registry at {self.url} is unreachable: '{what}' failed {attempts} time(s), last "
                    f"with {error}; check the address, port, TLS setting and that the registry is running"
                )
            log.warning(
                "Model Registry '%s' failed (%s); attempt %d/%d, retrying in %.1fs",
                what,
                error,
                attempt,
                attempts,
                delay,
            )
            self.sleep(delay)
            delay = min(delay * 2 or self.config.backoff_seconds, self.config.max_backoff_seconds)
        raise AssertionError("unreachable")


def _is_connection_error(exc: BaseException) -> bool:
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - the client depends on aiohttp
        return False
    return isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ServerTimeoutError)


def _body(exc: Any) -> str:
    body = getattr(exc, "body", None) or getattr(exc, "data", None) or ""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    return str(body)[:500] or "(no body)"
