"""A small in-memory Kubeflow Model Registry REST server for tests, checking every request like the real one.

It serves the registered-model, model-version and model-artifact endpoints the ``model_registry`` client
calls, on 127.0.0.1 and a free port. Routes, path and query parameters and request bodies all come from a
description of the API (a :class:`RegistryApi`); every request is checked against it, so a malformed request
is answered ``400`` with the reason instead of being accepted:

* :class:`OpenApiSpec`: the OpenAPI spec file from the reference folder (see :mod:`doubles.reference`).
  Bodies are validated against the operation's request schema (``$ref``s resolved in the spec, OpenAPI
  discriminators honoured, via ``openapi-schema-validator``), parameters against their schemas.
* :class:`ClientModelsApi`: the ``model-registry`` client's own generated code (``mr_openapi``), for when the
  spec file is absent. Routes and parameters are read from its API class (each operation's request
  serializer is run once with placeholder values), bodies are walked along its pydantic models by
  :mod:`doubles.generated_models`.

Both refuse unknown body fields, as the real server's JSON decoder does (``DisallowUnknownFields``), and
unknown query parameters. :func:`registry_api` picks the spec where present, else the client's models.
With ``token`` set, a request without ``Authorization: Bearer <token>`` gets ``401``.

Faults are injected per operation with :meth:`RegistryServer.inject` (a :class:`Fault`): a ``5xx`` or a
connection reset, before the request is applied to the store or after it (the write is kept, the answer is
lost: what a proxy timeout or a crash between commit and reply does to a client).

The spec documents ``/api/model_registry/v1alpha3``; the Python client (0.3.x) calls
``/api/model_registry/v1``. Both prefixes are served from the same route table. Path parameter names differ
between the two (``registeredmodelId``, ``registered_model_id``); the server keys them without case and
underscores (``registeredmodelid``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import re
import socket
import struct
import threading
import time
import typing
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import parse_qs, urlparse

import yaml

from doubles import generated_models, reference

SPEC_PREFIX = "/api/model_registry/v1alpha3"
CLIENT_PREFIX = "/api/model_registry/v1"
SERVED_PREFIXES = ("v1alpha3", "v1")
KINDS = ("registered_model", "model_version", "model_artifact")


@dataclasses.dataclass
class RecordedRequest:
    """One request as the server saw it (the Authorization header is reduced to whether one was sent and
    whether it matched). ``injected`` names the fault that answered it, if one did (``status`` 0: reset)."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    operation: str
    status: int
    authorized: bool
    authorization_sent: bool = False
    injected: str = ""


@dataclasses.dataclass
class Fault:
    """A failure injected into the next ``times`` requests of ``operation`` (an operationId).

    Attributes:
        operation: The operationId, e.g. ``createModelVersion``.
        after_store: Apply the request to the store first (the write happens, the answer is lost), or not.
        kind: ``status`` (answer ``status``) or ``reset`` (drop the connection with a TCP reset, no answer).
        status: The status of a ``status`` fault.
        times: How many requests fail; each failure uses one.
    """

    operation: str
    after_store: bool = True
    kind: Literal["status", "reset"] = "status"
    status: int = 500
    times: int = 1

    def describe(self) -> str:
        what = "reset" if self.kind == "reset" else str(self.status)
        return f"{what} {'after' if self.after_store else 'before'} store"


@dataclasses.dataclass
class _Route:
    method: str
    pattern: re.Pattern[str]
    operation: str
    body: Any  # what the API checks the body against: a schema $ref or a model class; None: no body
    parameters: list[dict[str, Any]]  # name, in (path/query), required, schema (whatever the API checks with)


class RegistryApi(Protocol):
    """A description of the Model Registry REST API the server checks requests against."""

    source: str
    routes: list[_Route]

    def parameter_errors(
        self, route: _Route, path_params: dict[str, str], query: dict[str, str]
    ) -> list[str]:
        """Errors in path and query parameters (unknown query parameters included)."""
        ...

    def body_errors(self, route: _Route, body: Any) -> list[str]:
        """Errors in a request body: ``"<path>: <message>"`` lines, unknown fields included."""
        ...


def match(api: RegistryApi, method: str, path: str) -> tuple[_Route, dict[str, str]] | None:
    """The route for ``method`` and ``path`` and its path parameters (keys normalised), or None."""
    for route in api.routes:
        if route.method == method and (m := route.pattern.match(path)):
            return route, {_param_key(k): v for k, v in m.groupdict().items()}
    return None


def _param_key(name: str) -> str:
    return name.replace("_", "").lower()


def _route_pattern(template: str) -> re.Pattern[str]:
    """A pattern for a path template below the API prefix, served under every prefix."""
    tail = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template)
    return re.compile(rf"^/api/model_registry/(?:{'|'.join(SERVED_PREFIXES)}){tail}$")


def _unknown_query_parameters(route: _Route, query: dict[str, str]) -> list[str]:
    known = {p["name"] for p in route.parameters if p["in"] == "query"}
    return [
        f"query parameter {name!r} is not defined for {route.operation}"
        for name in sorted(set(query) - known)
    ]


class OpenApiSpec:
    """The parts of the Model Registry OpenAPI document the server needs: routes and validators."""

    def __init__(self, path: str | Path):
        from openapi_schema_validator import OAS30Validator

        self.path = Path(path)
        self.source = str(self.path)
        self.document: dict[str, Any] = yaml.safe_load(self.path.read_text(encoding="utf-8"))
        self.version = str(self.document.get("info", {}).get("version", ""))
        self._validator_cls = OAS30Validator
        self._validators: dict[str, Any] = {}
        self.routes: list[_Route] = []
        for template, item in self.document["paths"].items():
            if not template.startswith(SPEC_PREFIX):
                continue
            pattern = _route_pattern(template[len(SPEC_PREFIX) :])
            shared = item.get("parameters", [])
            for method in ("get", "post", "patch", "put", "delete"):
                if method not in item:
                    continue
                op = item[method]
                schema = (
                    op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
                )
                params = [self._deref(p) for p in [*shared, *op.get("parameters", [])]]
                self.routes.append(
                    _Route(method.upper(), pattern, op["operationId"], schema and schema.get("$ref"), params)
                )

    def _deref(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            target: Any = self.document
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            node = target
        return node

    def errors(self, ref: str | dict[str, Any], instance: Any) -> list[str]:
        """Validation errors of ``instance`` against a schema ``$ref`` (or inline schema) in the spec."""
        key = ref if isinstance(ref, str) else json.dumps(ref, sort_keys=True)
        if key not in self._validators:
            schema = {"$ref": ref} if isinstance(ref, str) else dict(ref)
            root = {**schema, "components": self.document["components"]}
            self._validators[key] = self._validator_cls(root)
        found = sorted(self._validators[key].iter_errors(instance), key=lambda e: list(e.absolute_path))
        return [f"{'/'.join(map(str, e.absolute_path)) or '<body>'}: {e.message}" for e in found]

    def body_errors(self, route: _Route, body: Any) -> list[str]:
        unknown = self.unknown_properties({"$ref": route.body}, body)
        return [f"{'/'.join(map(str, where))}: unknown field" for where in unknown] + self.errors(
            route.body, body
        )

    def unknown_properties(self, schema: dict[str, Any], value: Any, path: tuple = ()) -> list[tuple]:
        """Paths of object keys no schema declares (``allOf`` merged, discriminators followed); an object
        schema that lists properties is closed unless it has ``additionalProperties``."""
        schema = self._deref(schema)
        if isinstance(value, list) and isinstance(schema.get("items"), dict):
            return [
                p
                for i, item in enumerate(value)
                for p in self.unknown_properties(schema["items"], item, (*path, i))
            ]
        if not isinstance(value, dict):
            return []
        discriminator = schema.get("discriminator")
        if discriminator and "oneOf" in schema:
            target = discriminator.get("mapping", {}).get(value.get(discriminator["propertyName"]))
            return self.unknown_properties({"$ref": target}, value, path) if target else []
        properties, additional = self._object_shape(schema)
        if not properties and additional is None:
            return []  # a free-form object
        found: list[tuple] = []
        for key, entry in value.items():
            if key in properties:
                found += self.unknown_properties(properties[key], entry, (*path, key))
            elif isinstance(additional, dict):
                found += self.unknown_properties(additional, entry, (*path, key))
            elif additional is not True:
                found.append((*path, key))
        return found

    def _object_shape(self, schema: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        properties = dict(schema.get("properties") or {})
        additional = schema.get("additionalProperties")
        for part in schema.get("allOf") or []:
            more, extra = self._object_shape(self._deref(part))
            properties.update(more)
            additional = extra if extra is not None else additional
        return properties, additional

    def parameter_errors(
        self, route: _Route, path_params: dict[str, str], query: dict[str, str]
    ) -> list[str]:
        problems = _unknown_query_parameters(route, query)
        for param in route.parameters:
            location = param.get("in")
            source = path_params if location == "path" else query if location == "query" else None
            key = _param_key(param["name"]) if location == "path" else param["name"]
            if source is None or key not in source:
                if param.get("required") and source is not None:
                    problems.append(f"{location} parameter {param['name']!r} is required")
                continue
            schema = self._deref(param.get("schema", {}))
            problems += [f"{param['name']}: {e.split(': ', 1)[1]}" for e in self.errors(schema, source[key])]
        return problems


class ClientModelsApi:
    """The Model Registry REST API as the ``model-registry`` client's generated code (``mr_openapi``) has it."""

    def __init__(self) -> None:
        import mr_openapi
        from mr_openapi.api.model_registry_service_api import ModelRegistryServiceApi

        self.source = f"model-registry's mr_openapi models ({Path(mr_openapi.__file__).parent})"
        self.routes = [
            _client_route(ModelRegistryServiceApi, name)
            for name in _client_operations(ModelRegistryServiceApi)
        ]

    def body_errors(self, route: _Route, body: Any) -> list[str]:
        found = generated_models.problems(route.body, body)
        return [f"{'/'.join(map(str, where)) or '<body>'}: {message}" for where, message in found]

    def parameter_errors(
        self, route: _Route, path_params: dict[str, str], query: dict[str, str]
    ) -> list[str]:
        from pydantic import TypeAdapter, ValidationError

        problems = _unknown_query_parameters(route, query)
        for param in route.parameters:
            source = path_params if param["in"] == "path" else query
            key = _param_key(param["name"]) if param["in"] == "path" else param["name"]
            if key not in source:
                if param["required"]:
                    problems.append(f"{param['in']} parameter {param['name']!r} is required")
                continue
            try:
                TypeAdapter(param["schema"]).validate_python(source[key])
            except ValidationError as error:
                problems += [f"{param['name']}: {detail['msg']}" for detail in error.errors()]
        return problems


class _Placeholder(str):
    """A parameter value that remembers its parameter's name, also through ``.value`` (enum parameters)."""

    @property
    def value(self) -> str:
        return self


class _RecordingApiClient:
    """Stands in for ``mr_openapi.ApiClient``: returns what a request serializer asks it to send."""

    def select_header_accept(self, accepts: list[str]) -> str | None:
        return accepts[0] if accepts else None

    def select_header_content_type(self, content_types: list[str]) -> str | None:
        return content_types[0] if content_types else None

    def param_serialize(self, **request: Any) -> dict[str, Any]:
        return request


def _client_operations(api_class: type) -> list[str]:
    return sorted(
        name
        for name, function in inspect.getmembers(api_class, inspect.iscoroutinefunction)
        if not name.startswith("_") and not name.endswith(("_with_http_info", "_without_preload_content"))
    )


def _client_route(api_class: type, name: str) -> _Route:
    """The route of one client operation: its request serializer run with placeholders for every parameter."""
    serializer = getattr(api_class(_RecordingApiClient()), f"_{name}_serialize")
    names = [n for n in inspect.signature(serializer).parameters if not n.startswith("_")]
    request = serializer(
        **{n: _Placeholder(n) for n in names},
        _request_auth=None,
        _content_type=None,
        _headers=None,
        _host_index=0,
    )
    hints = typing.get_type_hints(getattr(api_class, name), include_extras=True)
    signature = inspect.signature(getattr(api_class, name))
    parameters = [
        {"name": key, "in": "path", "required": True, "schema": hints[value]}
        for key, value in request["path_params"].items()
    ]
    parameters += [
        {
            "name": key,
            "in": "query",
            "required": signature.parameters[value].default is inspect.Parameter.empty,
            "schema": hints[value],
        }
        for key, value in request["query_params"]
    ]
    body = request["body"]
    template = request["resource_path"].removeprefix(CLIENT_PREFIX)
    operation = re.sub(r"_(\w)", lambda m: m.group(1).upper(), name)
    return _Route(
        request["method"],
        _route_pattern(template),
        operation,
        _model_of(hints[body]) if body else None,
        parameters,
    )


def _model_of(annotation: Any) -> Any:
    while typing.get_origin(annotation) is not None:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def registry_api() -> RegistryApi:
    """The spec from the reference folder where present, else the client's models."""
    spec = reference.registry_spec_file()
    return OpenApiSpec(spec) if spec else ClientModelsApi()


class RegistryServer:
    """The running server: ``url``, ``port``, the in-memory ``store`` and the ``requests`` it saw."""

    def __init__(self, api: RegistryApi, token: str | None = None):
        self.api = api
        self.token = token
        self.requests: list[RecordedRequest] = []
        self.faults: list[Fault] = []
        self.store: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in KINDS}
        self._next_id = 1
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.port: int = self._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="registry-server",
            daemon=True,
        )

    def start(self) -> RegistryServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def operations(self) -> list[str]:
        """The operationIds called so far, in order."""
        return [r.operation for r in self.requests]

    def inject(
        self,
        operation: str,
        *,
        after_store: bool = True,
        kind: Literal["status", "reset"] = "status",
        status: int = 500,
        times: int = 1,
    ) -> Fault:
        """Make the next ``times`` requests of ``operation`` fail (see :class:`Fault`)."""
        known = {route.operation for route in self.api.routes}
        if operation not in known:
            raise ValueError(f"no operation {operation!r} in {self.api.source}")
        fault = Fault(operation, after_store, kind, status, times)
        with self._lock:
            self.faults.append(fault)
        return fault

    def _take_fault(self, operation: str) -> Fault | None:
        """The first pending fault of ``operation``, used once. Called under the store lock."""
        for fault in self.faults:
            if fault.operation == operation and fault.times > 0:
                fault.times -= 1
                return fault
        return None

    # --- store ---------------------------------------------------------------------------------------

    def _new(self, kind: str, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
        now = str(int(time.time() * 1000))
        entity = {**body, **extra, "id": str(self._next_id), "createTimeSinceEpoch": now}
        entity["lastUpdateTimeSinceEpoch"] = now
        entity.setdefault("customProperties", {})
        if kind == "model_artifact":
            entity["artifactType"] = "model-artifact"
            entity.setdefault("state", "UNKNOWN")
        else:
            entity.setdefault("state", "LIVE")
        self._next_id += 1
        self.store[kind][entity["id"]] = entity
        return entity

    def _find(self, kind: str, name: str | None, external_id: str | None, parent: str | None) -> Any:
        for entity in self.store[kind].values():
            if name is not None and entity.get("name") != name:
                continue
            if external_id is not None and entity.get("externalId") != external_id:
                continue
            if parent is not None and entity.get("_parent") != parent:
                continue
            return entity
        return None

    @staticmethod
    def _public(entity: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in entity.items() if not k.startswith("_")}

    def _page(self, items: list[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
        size = int(query.get("pageSize", "100"))
        start = int(query.get("nextPageToken") or 0)
        page = items[start : start + size]
        token = str(start + size) if start + size < len(items) else ""
        return {
            "items": [self._public(e) for e in page],
            "nextPageToken": token,
            "pageSize": size,
            "size": len(page),
        }

    def _dispatch(self, op: str, params: dict[str, str], query: dict[str, str], body: Any) -> tuple[int, Any]:
        """(status, response body) for one validated request. Runs under the store lock."""
        name, external_id, parent = query.get("name"), query.get("externalId"), query.get("parentResourceId")
        kind_of = {"RegisteredModel": "registered_model", "ModelVersion": "model_version"}
        kind_of["ModelArtifact"] = "model_artifact"
        if op in ("findRegisteredModel", "findModelVersion", "findModelArtifact"):
            kind = kind_of[op[4:]]
            if name is None and external_id is None:
                return 400, _error("400", "name or externalId is required")
            found = self._find(kind, name, external_id, parent)
            return (200, self._public(found)) if found else (404, _error("404", f"no {kind} matches"))
        if op in ("getRegisteredModels", "getModelVersions", "getModelArtifacts"):
            kind = kind_of[op[3:-1]]
            return 200, self._page(list(self.store[kind].values()), query)
        if op in ("getRegisteredModel", "getModelVersion", "getModelArtifact"):
            kind = kind_of[op[3:]]
            found = self.store[kind].get(next(iter(params.values())))
            return (200, self._public(found)) if found else (404, _error("404", f"{kind} not found"))
        if op in ("updateRegisteredModel", "updateModelVersion", "updateModelArtifact"):
            kind = kind_of[op[6:]]
            found = self.store[kind].get(next(iter(params.values())))
            if not found:
                return 404, _error("404", f"{kind} not found")
            found.update({k: v for k, v in body.items() if k not in ("name", "id")})
            found["lastUpdateTimeSinceEpoch"] = str(int(time.time() * 1000))
            return 200, self._public(found)
        if op == "createRegisteredModel":
            if self._find("registered_model", body["name"], None, None):
                return 409, _error("409", f"registered model {body['name']!r} already exists")
            return 201, self._public(self._new("registered_model", body))
        if op in ("createModelVersion", "createRegisteredModelVersion"):
            model_id = params.get("registeredmodelid") or body.get("registeredModelId")
            if model_id not in self.store["registered_model"]:
                return 404, _error("404", f"registered model {model_id} not found")
            if self._find("model_version", body["name"], None, model_id):
                return 409, _error("409", f"version {body['name']!r} already exists for model {model_id}")
            return 201, self._public(
                self._new("model_version", body, registeredModelId=model_id, _parent=model_id)
            )
        if op == "getRegisteredModelVersions":
            model_id = params["registeredmodelid"]
            items = [v for v in self.store["model_version"].values() if v["_parent"] == model_id]
            return 200, self._page(items, query)
        if op == "createModelArtifact":
            return 201, self._public(self._new("model_artifact", body))
        if op == "getModelVersionArtifacts":
            version_id = params["modelversionid"]
            items = [a for a in self.store["model_artifact"].values() if a.get("_parent") == version_id]
            return 200, self._page(items, query)
        if op == "upsertModelVersionArtifact":
            version_id = params["modelversionid"]
            if version_id not in self.store["model_version"]:
                return 404, _error("404", f"model version {version_id} not found")
            if body.get("artifactType") != "model-artifact":
                return 400, _error(
                    "400", f"this test server stores model artifacts only, got {body.get('artifactType')!r}"
                )
            if body.get("id") and body["id"] in self.store["model_artifact"]:
                found = self.store["model_artifact"][body["id"]]
                found.update(body, _parent=version_id)
                return 200, self._public(found)
            return 201, self._public(self._new("model_artifact", body, _parent=version_id))
        return 501, _error("501", f"{op} is not implemented by the test server")

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                parsed = urlparse(self.path)
                query = {k: v[-1] for k, v in parse_qs(parsed.query, keep_blank_values=True).items()}
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                sent = self.headers.get("Authorization")
                authorized = server.token is None or sent == f"Bearer {server.token}"
                body: Any = None
                status, payload, operation = 500, _error("500", "unhandled"), ""
                fault: Fault | None = None
                try:
                    if not authorized:
                        status, payload = 401, _error("401", "missing or invalid bearer token")
                    elif not (matched := match(server.api, self.command, parsed.path)):
                        status, payload = 404, _error("404", f"no route for {self.command} {parsed.path}")
                    else:
                        route, params = matched
                        operation = route.operation
                        problems = server.api.parameter_errors(route, params, query)
                        if raw:
                            try:
                                body = json.loads(raw)
                            except ValueError as exc:
                                problems.append(f"request body is not JSON: {exc}")
                        if route.body:
                            if body is None and not problems:
                                problems.append("request body is required")
                            elif body is not None:
                                problems += server.api.body_errors(route, body)
                        if problems:
                            where = getattr(route.body, "__name__", route.body) or "parameters"
                            status, payload = (
                                400,
                                _error("400", f"{operation} ({where}): " + "; ".join(problems)),
                            )
                        else:
                            with server._lock:
                                fault = server._take_fault(operation)
                                if fault is None or fault.after_store:
                                    status, payload = server._dispatch(operation, params, query, body)
                            if fault is not None:
                                status = 0 if fault.kind == "reset" else fault.status
                                payload = _error(str(status), f"injected fault: {fault.describe()}")
                finally:
                    server.requests.append(
                        RecordedRequest(
                            self.command,
                            parsed.path,
                            query,
                            body,
                            operation,
                            status,
                            authorized,
                            authorization_sent=sent is not None,
                            injected=fault.describe() if fault else "",
                        )
                    )
                if fault is not None and fault.kind == "reset":
                    # no answer: closed with linger 0, the socket sends a RST instead of a FIN
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

            def log_message(self, format: str, *args: object) -> None:  # keep test output clean
                pass

        return Handler


def _error(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


@contextlib.contextmanager
def registry_server(api: RegistryApi | None = None, *, token: str | None = None) -> Iterator[RegistryServer]:
    """Run a :class:`RegistryServer` checking requests against ``api`` (default: :func:`registry_api`) for the
    duration of the ``with`` block."""
    server = RegistryServer(api or registry_api(), token=token).start()
    try:
        yield server
    finally:
        server.stop()
