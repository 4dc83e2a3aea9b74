"""Register a model version in the Kubeflow Model Registry with the official ``model_registry`` client.

One call, :func:`register_model`, makes the three registry entities one at a time, each looked up before it
is created: the registered model, its version (provenance as custom properties) and the version's model
artifact (the storage URI; provenance again, since serving reads the artifact). That makes registration
idempotent:

* A create that failed in transit (a 5xx or a dropped connection, possibly after the server stored it) is
  followed by a look-up before it is retried, so a retry never makes a second copy or trips over the first.
* A version of the wanted name that came from the same run (the same run id, dataset SHA-256, storage URI,
  base model and algorithm in its properties, see :func:`run_identity`) is this run's own, perhaps left
  half-registered by an earlier attempt: it is completed (a missing model artifact created, missing
  properties added) whatever ``on_existing_version`` says.
* A version of another run (or of no known run) is handled by ``on_existing_version``: ``fail``, ``skip``
  (keep it; a version with no model artifact is an error, not a success) or ``next`` (the next free name).

A server that is down gets bounded retries with exponential backoff, then a clear error; a rejected token
a clear 401 error. The token is sent only over TLS, unless ``allow_insecure_token`` says otherwise (checked
before any request), and it is passed to the client and nowhere else: never logged, never stored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import re
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from kfp_components.registry.config import RegistryConfig
from kfp_components.registry.provenance import to_custom_properties, utc_now
from kfp_components.registry.storage import ModelStorage
from kfp_components.typed_config import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_NEXT_VERSIONS = 1000
#: The custom properties (as :func:`~kfp_components.registry.provenance.to_custom_properties` names them)
#: that say which run a version came from.
IDENTITY_PROPERTIES = (
    "pipeline_run_id",
    "dataset_sha256",
    "model_storage_uri",
    "base_model",
    "training_algorithm",
)

Properties = dict[str, str | int | float | bool]


class RegistryError(RuntimeError):
    """Registration failed; the message says why and what to check."""


class RegistryUnavailableError(RegistryError):
    """The registry could not be reached (or kept answering 5xx) after every attempt."""


class RegistryAuthError(RegistryError):
    """The registry refused the token (401) or the identity lacks access (403)."""


class VersionExistsError(RegistryError):
    """The version already exists, from another run, and ``on_existing_version`` is ``fail``."""


@dataclasses.dataclass(frozen=True)
class RegistrationResult:
    """What :func:`register_model` did.

    Attributes:
        status: ``registered`` (this call created the version), ``completed`` (the version of this same run
            existed half-registered and this call finished it), ``existing`` (the version existed complete:
            this run's own, or another run's kept by policy ``skip``) or ``skipped`` (no registry address).
        model_name, version_name: The names used (``version_name`` may differ from the requested one under
            policy ``next``).
        model_id, version_id, artifact_id: Registry ids; empty when skipped.
        created_model: Whether the registered model itself was created by this call.
        message: One line for the log.
    """

    status: Literal["registered", "completed", "existing", "skipped"]
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


def run_identity(properties: Mapping[str, Any]) -> dict[str, str] | None:
    """The properties of :data:`IDENTITY_PROPERTIES` as strings; None when neither a run id nor a dataset
    SHA-256 is recorded (nothing then tells two runs apart, so no version is taken for this run's own)."""
    identity = {name: str(properties.get(name, "")) for name in IDENTITY_PROPERTIES}
    if not (identity["pipeline_run_id"] or identity["dataset_sha256"]):
        return None
    return identity


def register_model(
    config: RegistryConfig,
    provenance: Mapping[str, Any],
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> RegistrationResult:
    """Register the model stored at ``config.storage_uri`` (as :meth:`RegistryConfig.storage` records it) as a version of ``config.model_name``, with provenance as properties.

    Returns a ``skipped`` result (and logs why) when ``config.address`` is empty. Raises
    :class:`RegistryUnavailableError`, :class:`RegistryAuthError`, :class:`VersionExistsError` or
    :class:`RegistryError`; the configuration (and whether a token may be sent) is checked first, before any
    request (:class:`~kfp_components.typed_config.ConfigError`).
    """
    config.validate()
    if not config.enabled:
        message = "Model Registry address is empty: registration skipped (provenance is still written)"
        log.info(message)
        return RegistrationResult(status="skipped", model_name=config.model_name, message=message)
    storage = config.storage()
    token = transport_token(config)
    if storage.uri != storage.source_uri:
        log.info("model storage %s is recorded as %s", storage.source_uri, storage.uri)
    properties = to_custom_properties(provenance)
    if not properties.get("model_storage_uri"):
        properties["model_storage_uri"] = storage.uri
    calls = _Calls(config, config.display_url(), sleep)
    registration = _Registration(calls, calls.connect(token), config, storage, properties)
    wanted = config.version_name.strip() or derive_version_name(provenance)
    return registration.run(wanted)


def transport_token(config: RegistryConfig) -> str | None:
    """The token to send, checked against the transport before any request.

    A token goes over TLS only: over plain ``http://`` it is a :class:`ConfigError` unless
    ``allow_insecure_token`` is set (``is_secure: false`` alone is no consent). A secure registry needs a
    token (:class:`RegistryAuthError`). Without a token nothing is sent: the client is never left to find
    one itself.
    """
    token = config.resolve_token()
    url = config.display_url()
    if token and urlsplit(config.server_url()).scheme == "http" and not config.allow_insecure_token:
        raise ConfigError(
            "allow_insecure_token",
            f"the Model Registry at {url} is plain http and a bearer token was found ({config.token_source()}); "
            "it would cross the network unencrypted. Use TLS (an https:// address with is_secure), or set "
            "allow_insecure_token to send it over http anyway, or remove the token",
        )
    if config.is_secure and not token:
        raise RegistryAuthError(
            f"no token for the secure Model Registry at {url}: set ${config.token_env} from a "
            f"secret or mount a service-account token at {config.token_path}"
        )
    return token


class _Conflict(Exception):
    """A create was answered 409: the entity exists (made by an earlier attempt or by someone else)."""


@dataclasses.dataclass
class _Registration:
    """One registration: the steps of :func:`register_model` against a connected registry."""

    calls: _Calls
    registry: _Registry
    config: RegistryConfig
    storage: ModelStorage
    properties: Properties
    created_model: bool = False

    def run(self, wanted: str) -> RegistrationResult:
        model = self.ensure_model()
        identity = run_identity(self.properties)
        version_name = wanted
        for attempt in range(MAX_NEXT_VERSIONS):
            version = self.calls.run(
                "look up the version", functools.partial(self.registry.find_version, model.id, version_name)
            )
            created = made = False
            if version is None:
                try:
                    version, made = self.create_version(model, version_name)
                except _Conflict:
                    continue  # it appeared between the look-up and the create: look again
                created = True  # by this call, unless the version found after a lost answer is another run's
            artifact = None
            if not made:
                artifact = self.calls.run("look up the model artifact", self.find_artifact(version))
            theirs = dict(version.custom_properties or {})
            # Equal properties identify this call's own create whose answer was lost; across calls, only
            # the run identity does (properties carry a registration time to the second, so two runs with no
            # identity registered within one second would otherwise look alike).
            if made or (created and theirs == self.properties) or self.same_run(identity, theirs, artifact):
                return self.complete(model, version, artifact, created)
            if self.config.on_existing_version == "fail":
                raise VersionExistsError(
                    f"version {version_name!r} of model {model.name!r} already exists in the Model Registry at "
                    f"{self.calls.url} (id {version.id}) from another run ({_describe_run(theirs)}); set "
                    "on_existing_version to 'skip' to keep it or 'next' to register the next free version name, "
                    "or choose another version_name"
                )
            if self.config.on_existing_version == "skip":
                if artifact is None:
                    raise RegistryError(
                        f"version {version_name!r} of model {model.name!r} (id {version.id}) exists but has no "
                        f"model artifact: another run ({_describe_run(theirs)}) left it half-registered, and it "
                        "is not this run's to complete. Rerun that run to complete it, archive it, or choose "
                        "another version_name or on_existing_version 'next'"
                    )
                return self.result(
                    "existing", model, version, artifact, "kept it unchanged (on_existing_version=skip)"
                )
            version_name = f"{wanted}-{attempt + 2}"
        raise RegistryError(
            f"no free version name for {self.config.model_name!r} after {MAX_NEXT_VERSIONS} tries from {wanted!r}"
        )

    def same_run(self, identity: dict[str, str] | None, theirs: Mapping[str, Any], artifact: Any) -> bool:
        """Whether an existing version (and its artifact, if any) came from the run being registered."""
        if identity is None or run_identity(theirs) != identity:
            return False
        return artifact is None or artifact.uri == self.storage.uri

    def ensure_model(self) -> Any:
        name = self.config.model_name
        found = self.calls.run("look up the registered model", lambda: self.registry.find_model(name))
        if found is not None:
            return found
        try:
            model = self.calls.run(
                "create the registered model",
                lambda: self.registry.create_model(name, self.config.author),
                recover=lambda: self.registry.find_model(name),
            )
        except _Conflict:
            model = self.calls.run("look up the registered model", lambda: self.registry.find_model(name))
            if model is None:
                raise RegistryError(
                    f"the Model Registry at {self.calls.url} answered that model {name!r} exists, yet has none"
                ) from None
            return model
        self.created_model = True
        return model

    def create_version(self, model: Any, name: str) -> tuple[Any, bool]:
        """The new version, and whether this call's create returned it (False: an earlier attempt had
        stored it, or someone else did; the caller checks whose it is)."""
        made: list[bool] = []

        def create() -> Any:
            version = self.registry.create_version(
                model.id, name, self.config.author, self.config.description or None, self.properties
            )
            made.append(True)
            return version

        version = self.calls.run(
            "create the version", create, recover=lambda: self.registry.find_version(model.id, name)
        )
        return version, bool(made)

    def create_artifact(self, version: Any) -> Any:
        def create() -> Any:
            return self.registry.create_artifact(version.id, self.new_artifact())

        try:
            return self.calls.run("create the model artifact", create, recover=self.find_artifact(version))
        except _Conflict:
            found = self.calls.run("look up the model artifact", self.find_artifact(version))
            if found is None:
                raise RegistryError(
                    f"the Model Registry at {self.calls.url} answered that the model artifact of version "
                    f"{version.name!r} exists, yet lists none"
                ) from None
            return found

    def find_artifact(self, version: Any) -> Callable[[], Any]:
        """A look-up of ``version``'s model artifact, for :meth:`_Calls.run`."""
        return functools.partial(self.registry.find_artifact, version.id, self.storage.uri)

    def new_artifact(self) -> Any:
        from model_registry.types import ModelArtifact

        return ModelArtifact(
            name=self.config.model_name,
            uri=self.storage.uri,
            model_format_name=self.config.model_format,
            model_format_version=self.config.model_format_version,
            storage_key=self.config.storage_key or None,
            storage_path=self.storage.path or None,
            custom_properties=self.properties,
        )

    def complete(self, model: Any, version: Any, artifact: Any, created: bool) -> RegistrationResult:
        """Finish a version of this run (``created`` by this call, or by an earlier attempt): create its
        artifact if missing, add the properties it lacks."""
        done = []
        if artifact is None:
            artifact = self.create_artifact(version)
            done.append("created the missing model artifact")
        elif missing := _missing(self.properties, artifact.custom_properties):
            artifact.custom_properties = {**missing, **(artifact.custom_properties or {})}
            artifact = self.calls.run(
                "add provenance to the artifact", lambda: self.registry.update(artifact)
            )
            done.append(f"added {len(missing)} missing artifact properties")
        if missing := _missing(self.properties, version.custom_properties):
            version.custom_properties = {**missing, **(version.custom_properties or {})}
            version = self.calls.run("add provenance to the version", lambda: self.registry.update(version))
            done.append(f"added {len(missing)} missing version properties")
        if created:
            return self.result("registered", model, version, artifact, "new version")
        if done:
            return self.result("completed", model, version, artifact, "of this run, " + "; ".join(done))
        return self.result("existing", model, version, artifact, "of this run, already complete")

    def result(self, status: Any, model: Any, version: Any, artifact: Any, what: str) -> RegistrationResult:
        message = (
            f"{status} {model.name!r} version {version.name!r} (model id {model.id}, version id {version.id}, "
            f"artifact id {artifact.id if artifact else '-'}) at {self.calls.url}: {what}"
            f"{'; created the registered model' if self.created_model else ''}"
        )
        log.info(message)
        return RegistrationResult(
            status=status,
            model_name=str(model.name),
            version_name=str(version.name),
            model_id=str(model.id),
            version_id=str(version.id),
            artifact_id=str(artifact.id) if artifact else "",
            created_model=self.created_model,
            message=message,
        )


def _missing(wanted: Mapping[str, Any], present: Mapping[str, Any] | None) -> dict[str, Any]:
    present = present or {}
    return {key: value for key, value in wanted.items() if key not in present}


def _describe_run(properties: Mapping[str, Any]) -> str:
    run_id = properties.get("pipeline_run_id")
    return f"run id {run_id!r}" if run_id else "no run id recorded"


class _Registry:
    """The registry calls registration needs, made with the client's ``ModelRegistryAPIClient`` (one request
    each, no look-ups hidden inside) and run to completion synchronously."""

    def __init__(self, api: Any):
        self.api = api

    def check(self) -> None:
        """List one registered model: proves the address, TLS and token before anything is written."""
        from model_registry.types import ListOptions

        _run_sync(self.api.get_registered_models(ListOptions(limit=1)))

    def find_model(self, name: str) -> Any:
        return _run_sync(self.api.get_registered_model_by_params(name=name))

    def create_model(self, name: str, owner: str) -> Any:
        from model_registry.types import RegisteredModel

        return _run_sync(self.api.upsert_registered_model(RegisteredModel(name=name, owner=owner)))

    def find_version(self, model_id: str, name: str) -> Any:
        return _run_sync(self.api.get_model_version_by_params(registered_model_id=model_id, name=name))

    def create_version(
        self, model_id: str, name: str, author: str, description: str | None, properties: Properties
    ) -> Any:
        from model_registry.types import ModelVersion

        version = ModelVersion(
            name=name, author=author, description=description, custom_properties=properties
        )
        return _run_sync(self.api.upsert_model_version(version, model_id))

    def find_artifact(self, version_id: str, uri: str) -> Any:
        """The version's model artifact (the one at ``uri`` when there are several), or None."""
        artifacts = _run_sync(self.api.get_model_artifacts(model_version_id=version_id))
        return next((a for a in artifacts if a.uri == uri), artifacts[0] if artifacts else None)

    def create_artifact(self, version_id: str, artifact: Any) -> Any:
        return _run_sync(self.api.upsert_model_version_artifact(artifact, version_id))

    def update(self, entity: Any) -> Any:
        from model_registry.types import ModelArtifact, ModelVersion

        if isinstance(entity, ModelVersion):
            return _run_sync(self.api.upsert_model_version(entity, None))
        if isinstance(entity, ModelArtifact):
            return _run_sync(self.api.upsert_model_artifact(entity))
        raise TypeError(f"cannot update a {type(entity).__name__}")


def _run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a client coroutine to completion, also from a thread that already runs an event loop (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


class _Calls:
    """Runs client calls with bounded retries on transient failures and clear errors on the others."""

    def __init__(self, config: RegistryConfig, url: str, sleep: Callable[[float], None]):
        self.config = config
        self.url = url
        self.sleep = sleep

    def connect(self, token: str | None) -> _Registry:
        """A :class:`_Registry` whose connection (and token) has been checked with one read."""
        from model_registry.core import ModelRegistryAPIClient

        log.info("connecting to the Model Registry at %s (token %s)", self.url, "set" if token else "not set")
        server, port = self.config.server_url(), self.config.server_port()
        if self.config.is_secure:
            api = ModelRegistryAPIClient.secure_connection(
                server, port, user_token=token or "", custom_ca=self.config.custom_ca or None
            )
        else:
            api = ModelRegistryAPIClient.insecure_connection(server, port, token or None)
        registry = _Registry(api)
        self.run("connect", registry.check)
        return registry

    def run(self, what: str, call: Callable[[], T], recover: Callable[[], T | None] | None = None) -> T:
        """``call()``, retried on transient failures. Before each retry ``recover()`` (when given) looks for
        what an earlier attempt may have stored before its answer was lost, and returns it when found. A 409
        Conflict raises :class:`_Conflict`."""
        from mr_openapi import exceptions as api_errors

        delay = self.config.backoff_seconds
        attempts = self.config.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                if attempt > 1 and recover is not None and (found := recover()) is not None:
                    log.info("Model Registry '%s': the earlier attempt had been stored; using it", what)
                    return found
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
            except api_errors.ConflictException:
                raise _Conflict(what) from None
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
