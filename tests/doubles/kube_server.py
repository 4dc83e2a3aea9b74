"""A small Kubernetes API server for tests: TrainJobs checked against a Kubeflow Trainer release's schema,
pods, pod logs, and a scripted controller.

It speaks the REST calls the TrainJob launcher makes, through the real ``kubernetes`` client:

* ``POST/GET/DELETE /apis/trainer.kubeflow.org/v1alpha1/namespaces/<ns>/trainjobs[/<name>]``;
* ``GET /apis/apiextensions.k8s.io/v1/customresourcedefinitions/trainjobs.trainer.kubeflow.org`` (or 403,
  as for a service account without that RBAC);
* ``GET /api/v1/namespaces/<ns>/pods?labelSelector=a=b,c=d``, ``GET .../pods/<name>`` and
  ``GET .../pods/<name>/log?container=node&follow=true`` (a chunked stream that ends with the container);
* ``GET /apis/jobset.x-k8s.io/v1alpha2/namespaces/<ns>/jobsets/<name>`` (the TrainJob's JobSet);
* discovery: ``/apis``, ``/apis/trainer.kubeflow.org/v1alpha1``.

With ``status_endpoint=True`` (Trainer v2.2+ only) it also plays the Trainer controller's status server
(the ``TrainJobStatus`` feature) on a second port, over TLS with a certificate of its own CA
(``status_ca_file``): ``POST /apis/trainer.kubeflow.org/v1alpha1/namespaces/<ns>/trainjobs/<name>/status``
with ``Authorization: Bearer <status_token>`` (403 otherwise, as the real one answers a token it cannot
verify). The body is checked against the release's request model (``UpdateTrainJobStatusRequest`` of
``kubeflow-trainer-api``: an unknown field is an error here, which the real server would drop silently) and
against ``status.trainerStatus`` of the CRD where the reference folder has it (bounds, the required time);
a bad body is answered 422, an unknown TrainJob 404. An accepted one becomes the TrainJob's
``status.trainerStatus`` and is recorded in ``status_updates``. :meth:`KubeApiServer.store_trainjob` puts
a TrainJob there without a controller playing it (for a trainer that reports on its own).

Like a real API server it wants ``Authorization: Bearer <token>`` (401 and a ``Status`` body otherwise),
decodes a created TrainJob against the release's schema (a :class:`doubles.trainjob_schema.TrainJobSchema`:
the CRD file where the reference folder has it, else the official ``kubeflow-trainer-api`` models; unknown
fields: an error with ``fieldValidation=Strict``, else dropped with a ``Warning`` header), validates it
(422 ``Invalid`` with one cause per field error), refuses the torchrun variables the way the Trainer webhook
does (403), and answers 409 ``AlreadyExists`` for a name that exists. It serves the schema's CRD document,
from which the launcher detects the release.

Then it plays the Trainer controller as a :class:`Scenario` says: ``complete`` (pods appear with the
JobSet labels, their logs stream, then condition ``Complete``), ``fail`` (condition ``Failed`` with a
reason and message), ``restart`` (the first pod fails and a newer one takes over), ``suspend_seconds``
(``spec.suspend`` and condition ``Suspended`` for a while, as under Kueue, then resumed),
``preempt_seconds`` (the first pods run, then the TrainJob is suspended and its pods deleted, as when Kueue
preempts it, then resumed with new pods), ``never`` (runs until deleted), ``trainer_statuses`` (while the
pods run, ``status.trainerStatus`` advances through them, as a trainer reporting its progress makes it). The JobSet and the pods carry what
the TrainJob adds to the runtime's template in either CRD shape (labels, annotations, the trainer's env and
command, volumes and mounts, image pull secrets, node selector, tolerations), merged the way the Trainer
controller merges it.

Deletes honour ``DeleteOptions`` the way the API server reads them: from the JSON body when there is one
(``propagationPolicy``, ``preconditions.uid``: 409 ``Conflict`` when the stored object has another uid), else
from the query.

Faults (:class:`Fault`, :meth:`KubeApiServer.inject`) make chosen requests slow, answer them with an error
status or close the connection without an answer, either before the request is carried out or after (a
create that is stored and then answered with a 500 or a reset connection).

Every request is recorded (method, path, query, parsed body, raw body, the fault it met) so tests can assert
what was sent and deleted, and that no secret value was.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import random
import re
import socket
import ssl
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from doubles import generated_models
from doubles.trainer_api import trainer_api_model, trainer_api_models
from doubles.trainjob_schema import (
    CRD_NAME,
    GROUP,
    VERSION,
    CrdSchema,
    TrainJobSchema,
    crd_schema_errors,
    crd_unknown_fields,
    metadata_errors,
    prune_unknown_fields,
)

TORCHRUN_RESERVED_ENV = (
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
)

_TRAINJOBS = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
_PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/]+))?(/log)?$")
_JOBSETS = re.compile(r"^/apis/jobset\.x-k8s\.io/v1alpha2/namespaces/([^/]+)/jobsets/([^/]+)$")
_CRD_PATH = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}"
_CEL_HAS = re.compile(r"^has\(self\.(\w+)\)$")
_STATUS = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs/([^/]+)/status$")
STATUS_REQUEST_MODEL = "TrainerV1alpha1UpdateTrainJobStatusRequest"


# ------------------------------------------------------------------------------------------- scenario


@dataclass
class Scenario:
    """What the fake Trainer controller does with a TrainJob after it is created.

    Attributes:
        outcome: complete (condition Complete), fail (condition Failed) or never (runs until deleted).
        log_lines: What each worker's container prints (``never`` keeps printing after them).
        line_interval: Seconds between two log lines.
        start_delay: Seconds before the pods are created.
        pending_seconds: Seconds a new pod stays Pending (its log answers 400 meanwhile).
        restart: The first pods print ``restart_lines`` and fail; newer pods then run the scenario.
        restart_lines: What the first pods print before failing.
        suspend_seconds: Suspended (as when Kueue holds the job) for this long before it starts, then resumed.
        preempt_seconds: The first pods print ``preempt_lines``, then the TrainJob is suspended for this long
            and its pods are deleted (as when Kueue preempts it), then resumed with new pods.
        preempt_lines: What the first pods print before the preemption.
        fail_reason: Reason of the Failed condition.
        fail_message: Message of the Failed condition.
        trainer_statuses: Once the pods run, ``status.trainerStatus`` becomes each of these in turn,
            ``status_interval`` seconds apart (``lastUpdatedTime`` is added), before the log lines.
        status_interval: Seconds between two of them.
    """

    outcome: Literal["complete", "fail", "never"] = "complete"
    log_lines: list[str] = field(
        default_factory=lambda: [
            "loading model",
            "step 1/2 loss=2.10",
            "step 2/2 loss=1.70",
            "saved final model",
        ]
    )
    line_interval: float = 0.01
    start_delay: float = 0.02
    pending_seconds: float = 0.02
    restart: bool = False
    restart_lines: list[str] = field(
        default_factory=lambda: ["attempt 1 starting", "RuntimeError: NCCL timeout"]
    )
    suspend_seconds: float = 0.0
    preempt_seconds: float = 0.0
    preempt_lines: list[str] = field(
        default_factory=lambda: ["attempt 1 starting", "step 1/4", "saved checkpoint-1"]
    )
    fail_reason: str = "FailedJobs"
    fail_message: str = "jobset failed: ReplicatedJob node failed (BackoffLimitExceeded)"
    trainer_statuses: list[dict[str, Any]] = field(default_factory=list)
    status_interval: float = 0.2


@dataclass
class Fault:
    """A fault the server injects into the requests it matches (method, and a part of the path).

    The request is held ``delay`` seconds, then answered with ``status`` (a ``Status`` body), or the
    connection is closed without an answer (``reset``), or, with neither, answered as usual (a slow server).
    ``after``: the request is carried out first (a create is stored, a delete done) and the fault replaces
    its answer; otherwise the request is not carried out when the fault answers it.

    Attributes:
        method: GET, POST or DELETE.
        path: Part of the path, e.g. ``/trainjobs`` (create), ``/trainjobs/<name>`` (read, delete) or
            ``/customresourcedefinitions/``.
        status: The status code to answer with; 0: the real answer (or none, with ``reset``).
        reset: Close the connection without an answer.
        delay: Seconds to hold the request (with ``after``: the answer) first.
        after: Carry the request out before the fault.
        times: How many matching requests it hits; 0: every one until :meth:`KubeApiServer.clear_faults`.
        hits: How many it has hit so far.
    """

    method: str
    path: str
    status: int = 0
    reset: bool = False
    delay: float = 0.0
    after: bool = False
    times: int = 1
    hits: int = 0

    def __post_init__(self) -> None:
        if self.status and self.reset:
            raise ValueError("a fault answers with a status or resets the connection, not both")

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and self.path in path and (self.times == 0 or self.hits < self.times)


@dataclass
class RecordedRequest:
    """One request the server received (the Authorization header is not kept).

    ``status`` is the code it was answered with (0: no answer, the connection was closed); ``fault`` the
    fault it met, if any.
    """

    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    raw_body: str
    status: int = 0
    fault: Fault | None = None
    fault_applied: bool = field(default=False, repr=False)


@dataclass
class _Pod:
    name: str
    namespace: str
    labels: dict[str, str]
    image: str
    created: datetime.datetime
    annotations: dict[str, str] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)
    phase: str = "Pending"
    lines: list[str] = field(default_factory=list)
    done: bool = False

    def to_json(self) -> dict[str, Any]:
        running = self.phase == "Running"
        if self.phase == "Pending":
            state: dict[str, Any] = {"waiting": {"reason": "ContainerCreating"}}
        elif running:
            state = {"running": {"startedAt": _timestamp(self.created)}}
        else:
            exit_code = 0 if self.phase == "Succeeded" else 1
            state = {
                "terminated": {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error"}
            }
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, self.name)),
                "labels": self.labels,
                "annotations": self.annotations,
                "creationTimestamp": _timestamp(self.created),
            },
            "spec": self.spec or {"containers": [{"name": "node", "image": self.image}]},
            "status": {
                "phase": self.phase,
                "containerStatuses": [
                    {
                        "name": "node",
                        "image": self.image,
                        "imageID": "",
                        "ready": running,
                        "restartCount": 0,
                        "started": running,
                        "state": state,
                    }
                ],
            },
        }


@dataclass
class _Job:
    obj: dict[str, Any]
    scenario: Scenario
    jobset: dict[str, Any] = field(default_factory=dict)
    stopped: threading.Event = field(default_factory=threading.Event)
    pods: list[_Pod] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- server


class KubeApiServer:
    """The server's state; start it with :func:`kube_api_server`.

    Attributes:
        url: ``http://127.0.0.1:<port>``.
        token: The bearer token it accepts.
        requests: Every request received, in order.
        created: Names of the TrainJobs created (one entry per successful POST).
        created_uids: Their uids.
        faults: The faults injected (see :meth:`inject`).
        status_url_base: ``https://127.0.0.1:<port>`` of the status endpoint ("" without one).
        status_token: The bearer token the status endpoint accepts.
        status_ca_file: The CA certificate that signed the status endpoint's certificate.
        status_requests: Every request the status endpoint received, in order.
        status_updates: ``(namespace, name, body)`` of every update it accepted, in order.
    """

    def __init__(
        self,
        schema: TrainJobSchema,
        *,
        token: str,
        scenarios: list[Scenario] | None = None,
        crd_readable: bool = True,
        foreground_delete_seconds: float = 0.05,
        faults: Sequence[Fault] = (),
        status_token: str = "status-token",
    ):
        self.schema = schema
        self.crd = schema.crd()
        self.token = token
        self.scenarios = scenarios or [Scenario()]
        self.crd_readable = crd_readable
        self.foreground_delete_seconds = foreground_delete_seconds
        self.url = ""
        self.requests: list[RecordedRequest] = []
        self.created: list[str] = []
        self.created_uids: list[str] = []
        self.faults: list[Fault] = list(faults)
        self.status_url_base = ""
        self.status_token = status_token
        self.status_ca_file: Path | None = None
        self.status_requests: list[RecordedRequest] = []
        self.status_updates: list[tuple[str, str, dict[str, Any]]] = []
        self._stopped = threading.Event()
        self._jobs: dict[tuple[str, str], _Job] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._clock = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        self._random = random.Random(0)

    # ---- what tests look at

    def trainjob(self, name: str, namespace: str = "default") -> dict[str, Any] | None:
        """The stored TrainJob (with its status), or None."""
        with self._cond:
            job = self._jobs.get((namespace, name))
            return json.loads(json.dumps(job.obj)) if job else None

    def requests_for(self, method: str, path_part: str = "") -> list[RecordedRequest]:
        """Recorded requests with this method whose path contains ``path_part``."""
        with self._cond:
            return [r for r in self.requests if r.method == method and path_part in r.path]

    def wait_until(self, predicate: Any, timeout: float = 10.0) -> bool:
        """Wait until ``predicate()`` is true (checked whenever the state changes); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def status_url(self, name: str, namespace: str = "default") -> str:
        """The status endpoint of one TrainJob, as the Trainer injects it (``KUBEFLOW_TRAINER_SERVER_URL``)."""
        if not self.status_url_base:
            raise RuntimeError("this server has no status endpoint: start it with status_endpoint=True")
        return f"{self.status_url_base}/apis/{GROUP}/{VERSION}/namespaces/{namespace}/trainjobs/{name}/status"

    def store_trainjob(self, name: str, namespace: str = "default") -> dict[str, Any]:
        """Store a running TrainJob that no controller plays (its trainer reports on its own)."""
        obj = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "TrainJob",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "resourceVersion": "1",
                "generation": 1,
                "creationTimestamp": _timestamp(self._tick()),
            },
            "spec": {"runtimeRef": {"name": "torch-distributed"}},
            "status": {},
        }
        with self._cond:
            self._jobs[(namespace, name)] = _Job(obj=obj, scenario=Scenario(outcome="never"))
            self._cond.notify_all()
        return obj

    def trainer_status_errors(self, body: Any) -> list[str]:
        """What the status endpoint refuses in an update's body: ``"<path>: <message>"`` lines."""
        model = trainer_api_model(self.schema.release.removeprefix("v"), STATUS_REQUEST_MODEL)
        found = [f"{_path_text(path)}: {message}" for path, message in generated_models.problems(model, body)]
        if isinstance(self.schema, CrdSchema) and isinstance(body, dict):
            status = body.get("trainerStatus")
            properties = (self.schema.schema.get("properties") or {}).get("status", {}).get("properties", {})
            if status is not None and "trainerStatus" in properties:
                crd = properties["trainerStatus"]
                found += [
                    f"{_under('trainerStatus', w)}: unknown field" for w in crd_unknown_fields(status, crd)
                ]
                found += [f"{_under('trainerStatus', w)}: {m}" for w, m in crd_schema_errors(status, crd)]
                for rule in crd.get("x-kubernetes-validations") or []:  # has(self.x): the field is required
                    required = _CEL_HAS.match(rule.get("rule", "").strip())
                    if required and isinstance(status, dict) and required.group(1) not in status:
                        found.append(f"trainerStatus: {rule.get('message') or rule['rule']}")
        return list(dict.fromkeys(found))  # the models and the CRD may both report an unknown field

    def handle_status(self, handler: _Handler, method: str) -> None:
        """The status endpoint: record the request, check the token and the body, store the status."""
        parts = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length).decode("utf-8") if length else ""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None  # not JSON: refused below, as the real server refuses what it cannot decode
        record = RecordedRequest(method, parts.path, parse_qs(parts.query), body, raw)
        with self._cond:
            self.status_requests.append(record)
            record.fault = next((f for f in self.faults if f.matches(method, parts.path)), None)
            if record.fault is not None:
                record.fault.hits += 1
            self._cond.notify_all()
        if record.fault is not None and not record.fault.after and self._fault(handler, record):
            return None
        match = _STATUS.match(parts.path)
        if match is None:
            return self._send(handler, record, 404, _status(404, "NotFound", "Not found"))
        if method != "POST":
            return self._send(handler, record, 405, _status(405, "MethodNotAllowed", "Method Not Allowed"))
        if handler.headers.get("Authorization", "") != f"Bearer {self.status_token}":
            return self._send(handler, record, 403, _status(403, "Forbidden", "Forbidden"))
        if not isinstance(body, dict):
            return self._send(handler, record, 422, _status(422, "Invalid", "Invalid payload"))
        errors = self.trainer_status_errors(body)
        if errors:
            return self._send(handler, record, 422, _status(422, "Invalid", "; ".join(errors)))
        namespace, name = match.group(1), match.group(2)
        with self._cond:
            job = self._jobs.get((namespace, name))
            if job is None:
                return self._send(handler, record, 404, _status(404, "NotFound", "Train job not found"))
            if body.get("trainerStatus") is not None:
                job.obj.setdefault("status", {})["trainerStatus"] = json.loads(
                    json.dumps(body["trainerStatus"])
                )
                self.status_updates.append((namespace, name, body))
            self._cond.notify_all()
        return self._send(handler, record, 200, body)

    def inject(self, *faults: Fault) -> None:
        """Add faults; a request meets the first one that matches it and has hits left."""
        with self._cond:
            self.faults.extend(faults)

    def clear_faults(self) -> None:
        with self._cond:
            self.faults.clear()

    # ---- the API

    def handle(self, handler: _Handler, method: str) -> None:
        """Record the request, check the token, and answer it."""
        parts = urlsplit(handler.path)
        query = parse_qs(parts.query)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length).decode("utf-8") if length else ""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        record = RecordedRequest(method, parts.path, query, body, raw)
        with self._cond:
            self.requests.append(record)
            self._cond.notify_all()
        if handler.headers.get("Authorization", "") != f"Bearer {self.token}":
            return self._send(handler, record, 401, _status(401, "Unauthorized", "Unauthorized"))
        path = parts.path.rstrip("/")
        with self._cond:
            record.fault = next((f for f in self.faults if f.matches(method, path)), None)
            if record.fault is not None:
                record.fault.hits += 1
        if record.fault is not None and not record.fault.after and self._fault(handler, record):
            return None
        if method == "GET" and path == "/apis":
            return self._send(handler, record, 200, _api_groups())
        if method == "GET" and path == f"/apis/{GROUP}/{VERSION}":
            return self._send(handler, record, 200, _api_resources())
        if method == "GET" and path == _CRD_PATH:
            return self._read_crd(handler, record)
        if match := _TRAINJOBS.match(path):
            return self._trainjobs(handler, record, method, match.group(1), match.group(2), body, query)
        if method == "GET" and (match := _JOBSETS.match(path)):
            with self._cond:
                job = self._jobs.get((match.group(1), match.group(2)))
                jobset = json.loads(json.dumps(job.jobset)) if job is not None and job.jobset else None
            if jobset is None:
                return self._send(handler, record, 404, _not_found("jobsets", match.group(2)))
            return self._send(handler, record, 200, jobset)
        if match := _PODS.match(path):
            return self._pods(
                handler, record, method, match.group(1), match.group(2), bool(match.group(3)), query
            )
        return self._send(handler, record, 404, _status(404, "NotFound", f"the server could not find {path}"))

    def _read_crd(self, handler: _Handler, record: RecordedRequest) -> None:
        if not self.crd_readable:
            message = (
                f'customresourcedefinitions.apiextensions.k8s.io "{CRD_NAME}" is forbidden: User '
                '"system:serviceaccount:kubeflow:pipeline-runner" cannot get resource '
                '"customresourcedefinitions" in API group "apiextensions.k8s.io" at the cluster scope'
            )
            return self._send(handler, record, 403, _status(403, "Forbidden", message))
        return self._send(handler, record, 200, self.crd)

    def _trainjobs(
        self,
        handler: _Handler,
        record: RecordedRequest,
        method: str,
        namespace: str,
        name: str | None,
        body: Any,
        query: dict[str, list[str]],
    ) -> None:
        if method == "POST" and name is None:
            return self._create(handler, record, namespace, body, query)
        if method == "DELETE" and name is not None:
            return self._delete(handler, record, namespace, name, query)
        if method != "GET":
            return self._send(
                handler, record, 405, _status(405, "MethodNotAllowed", f"{method} is not served")
            )
        with self._cond:
            if name is None:
                items = [job.obj for (ns, _), job in self._jobs.items() if ns == namespace]
                listing = {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "TrainJobList",
                    "metadata": {},
                    "items": items,
                }
                return self._send(handler, record, 200, listing)
            job = self._jobs.get((namespace, name))
            if job is not None:
                return self._send(handler, record, 200, job.obj)
        return self._send(handler, record, 404, _not_found("trainjobs", name))

    def _pods(
        self,
        handler: _Handler,
        record: RecordedRequest,
        method: str,
        namespace: str,
        name: str | None,
        is_log: bool,
        query: dict[str, list[str]],
    ) -> None:
        if method != "GET":
            return self._send(
                handler, record, 405, _status(405, "MethodNotAllowed", f"{method} is not served")
            )
        if name is None:
            selector = _parse_selector(query.get("labelSelector", [""])[0])
            with self._cond:
                pods = [
                    pod.to_json()
                    for job in self._jobs.values()
                    for pod in job.pods
                    if pod.namespace == namespace and all(pod.labels.get(k) == v for k, v in selector.items())
                ]
            return self._send(
                handler, record, 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods}
            )
        pod = self._pod(namespace, name)
        if pod is None:
            return self._send(handler, record, 404, _not_found("pods", name))
        if is_log:
            return self._stream_log(handler, record, pod, query)
        with self._cond:
            return self._send(handler, record, 200, pod.to_json())

    def _create(
        self, handler: _Handler, record: RecordedRequest, namespace: str, body: Any, query: dict
    ) -> None:
        if not isinstance(body, dict):
            return self._send(
                handler, record, 400, _status(400, "BadRequest", "the body is not a JSON object")
            )
        if body.get("apiVersion") != f"{GROUP}/{VERSION}" or body.get("kind") != "TrainJob":
            message = f"expected {GROUP}/{VERSION} TrainJob, got {body.get('apiVersion')} {body.get('kind')}"
            return self._send(handler, record, 400, _status(400, "BadRequest", message))
        metadata = body.setdefault("metadata", {})
        if metadata.get("namespace", namespace) != namespace:
            message = "the namespace of the provided object does not match the namespace sent on the request"
            return self._send(handler, record, 400, _status(400, "BadRequest", message))
        name = metadata.get("name", "")
        unknown = self.schema.unknown_fields(body)
        warnings = []
        if unknown:
            mode = query.get("fieldValidation", ["Warn"])[0]
            if mode == "Strict":
                message = "strict decoding error: " + ", ".join(f'unknown field "{u}"' for u in unknown)
                return self._send(handler, record, 400, _status(400, "BadRequest", message))
            body = prune_unknown_fields(body, unknown)
            metadata = body["metadata"]
            if mode != "Ignore":
                warnings = [f'unknown field "{u}"' for u in unknown]
        errors = self.schema.errors(body) + metadata_errors(metadata)
        if errors:
            causes = [{"reason": "FieldValueInvalid", "message": f"{p}: {m}", "field": p} for p, m in errors]
            message = (
                f'TrainJob.{GROUP} "{name}" is invalid: [' + ", ".join(f"{p}: {m}" for p, m in errors) + "]"
            )
            status = _status(422, "Invalid", message)
            status["details"] = {"name": name, "group": GROUP, "kind": "TrainJob", "causes": causes}
            return self._send(handler, record, 422, status)
        reserved = sorted(
            e.get("name")
            for e in body["spec"].get("trainer", {}).get("env", [])
            if e.get("name") in TORCHRUN_RESERVED_ENV
        )
        if reserved:
            message = (
                'admission webhook "validator.trainjob.trainer.kubeflow.org" denied the request: spec.trainer.env: '
                f"Invalid value: must not have reserved envs, invalid envs configured: [{' '.join(reserved)}]"
            )
            return self._send(handler, record, 403, _status(403, "Forbidden", message))
        with self._cond:
            if (namespace, name) in self._jobs:
                status = _status(409, "AlreadyExists", f'trainjobs.{GROUP} "{name}" already exists')
                status["details"] = {"name": name, "group": GROUP, "kind": "trainjobs"}
                return self._send(handler, record, 409, status)
            metadata.update(
                namespace=namespace,
                uid=str(uuid.uuid4()),
                resourceVersion="1",
                generation=1,
                creationTimestamp=_timestamp(self._tick()),
            )
            body["status"] = {}
            scenario = self.scenarios[min(len(self.created), len(self.scenarios) - 1)]
            job = _Job(obj=body, scenario=scenario, jobset=_jobset(body))
            self._jobs[(namespace, name)] = job
            self.created.append(name)
            self.created_uids.append(metadata["uid"])
            self._cond.notify_all()
        threading.Thread(target=self._play, args=(job,), name=f"controller-{name}", daemon=True).start()
        self._send(handler, record, 201, body, warnings=warnings)

    def _delete(
        self, handler: _Handler, record: RecordedRequest, namespace: str, name: str, query: dict
    ) -> None:
        # the API server reads DeleteOptions from the body when there is one, else from the query
        options = record.body if isinstance(record.body, dict) else {}
        if record.raw_body:
            policy = options.get("propagationPolicy") or ""
        else:
            policy = query.get("propagationPolicy", [""])[0]
        uid = (options.get("preconditions") or {}).get("uid")
        with self._cond:
            job = self._jobs.get((namespace, name))
            if job is None:
                return self._send(handler, record, 404, _not_found("trainjobs", name))
            if uid is not None and uid != job.obj["metadata"]["uid"]:
                message = (
                    f"Precondition failed: UID in precondition: {uid}, UID in object meta: "
                    f"{job.obj['metadata']['uid']}"
                )
                return self._send(handler, record, 409, _status(409, "Conflict", message))
            job.stopped.set()
            for pod in job.pods:
                pod.done = True
            if policy == "Foreground":
                job.obj["metadata"]["deletionTimestamp"] = _timestamp(self._tick())
                job.obj["metadata"]["finalizers"] = ["foregroundDeletion"]
                timer = threading.Timer(
                    self.foreground_delete_seconds, self._remove, args=(namespace, name, job)
                )
                timer.daemon = True
                timer.start()
            else:
                self._jobs.pop((namespace, name), None)
            self._cond.notify_all()
            self._send(handler, record, 200, job.obj)

    def _remove(self, namespace: str, name: str, job: _Job) -> None:
        with self._cond:
            if self._jobs.get((namespace, name)) is job:
                del self._jobs[(namespace, name)]
            self._cond.notify_all()

    def _stream_log(self, handler: _Handler, record: RecordedRequest, pod: _Pod, query: dict) -> None:
        container = query.get("container", ["node"])[0]
        if container != "node":
            message = f"container {container} is not valid for pod {pod.name}"
            return self._send(handler, record, 400, _status(400, "BadRequest", message))
        with self._cond:
            if pod.phase == "Pending":
                message = f'container "node" in pod "{pod.name}" is waiting to start: ContainerCreating'
                return self._send(handler, record, 400, _status(400, "BadRequest", message))
            follow = query.get("follow", ["false"])[0].lower() in ("true", "1", "t")  # Go's ParseBool
            if not follow:
                text = "".join(line + "\n" for line in pod.lines)
                return self._send(handler, record, 200, text)
        record.status = 200
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        sent = 0
        try:
            while True:
                with self._cond:
                    while sent >= len(pod.lines) and not pod.done and not self._stopping:
                        self._cond.wait(0.5)
                    new, sent = pod.lines[sent:], len(pod.lines)
                    finished = pod.done or self._stopping
                for line in new:
                    data = (line + "\n").encode()
                    handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    handler.wfile.flush()
                if finished and not new:
                    break
            handler.wfile.write(b"0\r\n\r\n")
            handler.wfile.flush()
        except OSError:  # the client went away
            handler.close_connection = True

    def _send(
        self,
        handler: _Handler,
        record: RecordedRequest,
        code: int,
        body: Any,
        *,
        warnings: Sequence[str] = (),
    ) -> None:
        if record.fault is not None and record.fault.after and self._fault(handler, record):
            return
        record.status = code
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        try:
            handler.send_response(code)
            handler.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for warning in warnings:
                handler.send_header("Warning", f'299 - "{warning}"')
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:  # the client gave up waiting (a slow answer)
            handler.close_connection = True

    def _fault(self, handler: _Handler, record: RecordedRequest) -> bool:
        """Apply the request's fault once: hold it, then answer with its status or close the connection.
        True when the fault answered (or dropped) the request; False when the real answer follows."""
        fault = record.fault
        if fault is None or record.fault_applied:
            return False
        record.fault_applied = True
        if fault.delay:
            self._stopped.wait(fault.delay)
        if fault.reset:
            with contextlib.suppress(OSError):  # RST instead of FIN: the client sees the connection reset
                handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.close_connection = True
            return True
        if fault.status:
            phrase = HTTPStatus(fault.status).phrase
            message = f"{phrase}: the server is currently unable to handle the request"
            self._send(handler, record, fault.status, _status(fault.status, phrase.replace(" ", ""), message))
            return True
        return False

    def _pod(self, namespace: str, name: str) -> _Pod | None:
        with self._cond:
            for job in self._jobs.values():
                for pod in job.pods:
                    if pod.namespace == namespace and pod.name == name:
                        return pod
        return None

    # ---- the fake controller

    def _play(self, job: _Job) -> None:
        scenario = job.scenario
        if scenario.suspend_seconds and not self._suspend_for(job, scenario.suspend_seconds):
            return
        if job.stopped.wait(scenario.start_delay):
            return
        if scenario.preempt_seconds:
            pods = self._start_pods(job)
            if pods is None or not self._print(job, pods, scenario.preempt_lines):
                return
            with self._cond:  # the JobSet is suspended: its Jobs' pods are deleted
                for pod in pods:
                    pod.done = True
                    job.pods.remove(pod)
            if not self._suspend_for(job, scenario.preempt_seconds):
                return
        if scenario.restart:
            pods = self._start_pods(job)
            if pods is None or not self._print(job, pods, scenario.restart_lines):
                return
            self._finish_pods(job, pods, "Failed")
        pods = self._start_pods(job)
        if (
            pods is None
            or not self._advance_trainer_status(job)
            or not self._print(job, pods, scenario.log_lines)
        ):
            return
        if scenario.outcome == "never":
            step = 0
            while self._print(job, pods, [f"still training (tick {step})"]):
                step += 1
            return
        if scenario.outcome == "complete":
            self._finish_pods(job, pods, "Succeeded")
            self._set_condition(job, "Complete", "True", "AllJobsCompleted", "jobset completed")
        else:
            self._finish_pods(job, pods, "Failed")
            self._set_condition(job, "Failed", "True", scenario.fail_reason, scenario.fail_message)

    def _advance_trainer_status(self, job: _Job) -> bool:
        """``status.trainerStatus`` through the scenario's ``trainer_statuses``, each checked as the status
        endpoint checks it; False when the TrainJob was deleted meanwhile."""
        for status in job.scenario.trainer_statuses:
            if job.stopped.wait(job.scenario.status_interval):
                return False
            status = {**status, "lastUpdatedTime": _timestamp(datetime.datetime.now(datetime.UTC))}
            errors = self.trainer_status_errors({"trainerStatus": status})
            if errors:
                raise ValueError(f"the scenario's trainerStatus {status} is invalid: {errors}")
            with self._cond:
                job.obj.setdefault("status", {})["trainerStatus"] = status
                self._cond.notify_all()
        return not job.stopped.is_set()

    def _suspend_for(self, job: _Job, seconds: float) -> bool:
        """``spec.suspend`` and condition Suspended for ``seconds`` (as Kueue and the Trainer controller set
        them), then resumed; False when the TrainJob was deleted meanwhile."""
        with self._cond:
            job.obj["spec"]["suspend"] = True
        self._set_condition(job, "Suspended", "True", "Suspended", "TrainJob is suspended")
        if job.stopped.wait(seconds):
            return False
        with self._cond:
            job.obj["spec"]["suspend"] = False
        self._set_condition(job, "Suspended", "False", "Resumed", "TrainJob is resumed")
        return True

    def _start_pods(self, job: _Job) -> list[_Pod] | None:
        spec = job.obj["spec"]
        name = job.obj["metadata"]["name"]
        trainer = spec.get("trainer", {})
        template = _pod_template(spec)
        extra_labels = template["metadata"].get("labels") or {}
        pods = []
        with self._cond:
            for index in range(int(trainer.get("numNodes", 1))):
                suffix = "".join(self._random.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
                labels = {
                    **extra_labels,
                    "jobset.sigs.k8s.io/jobset-name": name,
                    "jobset.sigs.k8s.io/replicatedjob-name": "node",
                    "jobset.sigs.k8s.io/job-index": "0",
                    "batch.kubernetes.io/job-completion-index": str(index),
                    "trainer.kubeflow.org/trainjob-ancestor-step": "trainer",
                }
                pod = _Pod(
                    name=f"{name}-node-0-{index}-{suffix}",
                    namespace=job.obj["metadata"]["namespace"],
                    labels=labels,
                    image=trainer.get("image", ""),
                    created=self._tick(),
                    annotations=dict(template["metadata"].get("annotations") or {}),
                    spec=template["spec"],
                )
                pods.append(pod)
                job.pods.append(pod)
            self._cond.notify_all()
        if job.stopped.wait(job.scenario.pending_seconds):
            return None
        with self._cond:
            for pod in pods:
                pod.phase = "Running"
            self._cond.notify_all()
        return pods

    def _print(self, job: _Job, pods: list[_Pod], lines: list[str]) -> bool:
        for line in lines:
            if job.stopped.wait(job.scenario.line_interval):
                return False
            with self._cond:
                for pod in pods:
                    pod.lines.append(line)
                self._cond.notify_all()
        return not job.stopped.is_set()

    def _finish_pods(self, job: _Job, pods: list[_Pod], phase: str) -> None:
        with self._cond:
            for pod in pods:
                pod.phase = phase
                pod.done = True
            self._cond.notify_all()

    def _set_condition(self, job: _Job, kind: str, status: str, reason: str, message: str) -> None:
        with self._cond:
            conditions = job.obj.setdefault("status", {}).setdefault("conditions", [])
            conditions[:] = [c for c in conditions if c["type"] != kind]
            conditions.append(
                {
                    "type": kind,
                    "status": status,
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": _timestamp(datetime.datetime.now(datetime.UTC)),
                }
            )
            self._cond.notify_all()

    def _tick(self) -> datetime.datetime:
        """A creation time one second after the previous one (Kubernetes timestamps have 1 s resolution)."""
        self._clock += datetime.timedelta(seconds=1)
        return self._clock

    def stop(self) -> None:
        self._stopped.set()
        with self._cond:
            self._stopping = True
            for job in self._jobs.values():
                job.stopped.set()
            self._cond.notify_all()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: KubeApiServer

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without this, Nagle's algorithm and delayed ACKs
        # add 40 ms to every response on a kept-alive connection
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self.state.handle(self, "GET")

    def do_POST(self) -> None:
        self.state.handle(self, "POST")

    def do_DELETE(self) -> None:
        self.state.handle(self, "DELETE")

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


class _StatusHandler(_Handler):
    def do_GET(self) -> None:
        self.state.handle_status(self, "GET")

    def do_POST(self) -> None:
        self.state.handle_status(self, "POST")

    def do_DELETE(self) -> None:
        self.state.handle_status(self, "DELETE")

    def do_PUT(self) -> None:
        self.state.handle_status(self, "PUT")

    def do_PATCH(self) -> None:
        self.state.handle_status(self, "PATCH")


@contextlib.contextmanager
def kube_api_server(
    schema: TrainJobSchema,
    *,
    token: str = "test-token",
    scenarios: list[Scenario] | None = None,
    crd_readable: bool = True,
    foreground_delete_seconds: float = 0.05,
    faults: Sequence[Fault] = (),
    status_endpoint: bool = False,
    status_token: str = "status-token",
) -> Iterator[KubeApiServer]:
    """Serve the Kubernetes API for TrainJobs of ``schema`` on a free port of 127.0.0.1.

    ``scenarios[i]`` scripts the i-th TrainJob created (the last one repeats); ``faults`` are injected from
    the first request on (see :class:`Fault`), on either port. ``status_endpoint``: also serve the Trainer's
    status endpoint over TLS (a release with ``UpdateTrainJobStatusRequest``, v2.2+), which accepts
    ``status_token``.
    """
    state = KubeApiServer(
        schema,
        token=token,
        scenarios=scenarios,
        crd_readable=crd_readable,
        foreground_delete_seconds=foreground_delete_seconds,
        faults=faults,
        status_token=status_token,
    )
    servers: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    def serve(server: ThreadingHTTPServer, name: str) -> None:
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), name=name, daemon=True)
        thread.start()
        servers.append((server, thread))

    with contextlib.ExitStack() as stack:
        if status_endpoint:
            release = schema.release.removeprefix("v")
            if not hasattr(trainer_api_models(release), STATUS_REQUEST_MODEL):
                raise ValueError(f"Kubeflow Trainer {schema.release} has no status endpoint (v2.2+ has)")
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="trainer-status-tls-")))
            cert_file, key_file = _self_signed_certificate(folder)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert_file, key_file)
            tls = ThreadingHTTPServer(
                ("127.0.0.1", 0), type("StatusHandler", (_StatusHandler,), {"state": state})
            )
            tls.socket = context.wrap_socket(tls.socket, server_side=True)
            serve(tls, "trainer-status-server")
            state.status_url_base = f"https://127.0.0.1:{tls.server_address[1]}"
            state.status_ca_file = cert_file
        api = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"state": state}))
        serve(api, "kube-api-server")
        state.url = f"http://127.0.0.1:{api.server_address[1]}"
        try:
            yield state
        finally:
            state.stop()
            for server, thread in servers:
                server.shutdown()
                server.server_close()
                thread.join(timeout=5)


def _trainer_patches(spec: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """``(JobSet metadata, Job metadata, pod template)`` patches of the ``node`` job, in order, from
    podTemplateOverrides and spec.labels/annotations (v2.0-2.1) or runtimePatches (v2.2+)."""
    patches = []
    legacy = {k: spec[k] for k in ("labels", "annotations") if spec.get(k)}
    if legacy:  # v2.1: spec.labels and spec.annotations go to the JobSet and its Jobs
        patches.append((legacy, legacy, {}))
    for override in spec.get("podTemplateOverrides") or []:
        if any(t.get("name") == "node" for t in override.get("targetJobs", [])):
            patches.append(({}, {}, {k: override[k] for k in ("metadata", "spec") if k in override}))
    for patch in spec.get("runtimePatches") or []:
        template = (patch.get("trainingRuntimeSpec") or {}).get("template") or {}
        for job in (template.get("spec") or {}).get("replicatedJobs") or []:
            if job.get("name") == "node":
                job_template = job.get("template") or {}
                pod = (job_template.get("spec") or {}).get("template") or {}
                patches.append((template.get("metadata") or {}, job_template.get("metadata") or {}, pod))
    return patches


def _pod_template(spec: dict[str, Any]) -> dict[str, Any]:
    """The pod template of the ``node`` job: the runtime's container ``node`` filled in from
    ``spec.trainer``, with the TrainJob's overrides or patches merged in (later ones win)."""
    trainer = spec.get("trainer") or {}
    container = {"name": "node", "image": trainer.get("image", "")}
    container.update({k: trainer[k] for k in ("command", "args", "env") if k in trainer})
    if "resourcesPerNode" in trainer:
        container["resources"] = trainer["resourcesPerNode"]
    template: dict[str, Any] = {"metadata": {}, "spec": {"containers": [container]}}
    for _, _, pod in _trainer_patches(spec):
        template = _merge(template, pod)
    return template


def _jobset(trainjob: dict[str, Any]) -> dict[str, Any]:
    """The JobSet the Trainer controller makes of a TrainJob: its metadata, and the ``node`` job's."""
    spec = trainjob.get("spec") or {}
    jobset_meta: dict[str, Any] = {}
    job_meta: dict[str, Any] = {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}}
    for jobset_patch, job_patch, _ in _trainer_patches(spec):
        jobset_meta = _merge(jobset_meta, jobset_patch)
        job_meta = _merge(job_meta, job_patch)
    metadata = trainjob["metadata"]
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {
            **jobset_meta,
            "name": metadata["name"],
            "namespace": metadata["namespace"],
            "ownerReferences": [
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "TrainJob",
                    "name": metadata["name"],
                    "uid": metadata["uid"],
                }
            ],
        },
        "spec": {
            "replicatedJobs": [
                {
                    "name": "node",
                    "template": {"metadata": job_meta, "spec": {"template": _pod_template(spec)}},
                }
            ],
        },
    }


def _merge(base: Any, patch: Any) -> Any:
    """``patch`` merged into ``base``: mappings key by key, lists of named items by name, the rest replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    named = (
        all(isinstance(item, dict) and "name" in item for item in [*base, *patch])
        if (isinstance(base, list) and isinstance(patch, list))
        else False
    )
    if named:
        merged_list = list(base)
        for item in patch:
            index = next((i for i, old in enumerate(merged_list) if old["name"] == item["name"]), None)
            if index is None:
                merged_list.append(item)
            else:
                merged_list[index] = _merge(merged_list[index], item)
        return merged_list
    return patch


def _self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed CA certificate for 127.0.0.1 and localhost, and its key: (cert, key) files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubeflow-trainer-controller-manager")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "ca.crt", folder / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


def _path_text(path: tuple[str | int, ...]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<root>"


def _under(parent: str, where: str) -> str:
    """``where`` (a path inside ``parent``, ``<root>`` for itself) as a path from the body."""
    return (
        parent if where == "<root>" else f"{parent}.{where}" if not where.startswith("[") else parent + where
    )


def _parse_selector(text: str) -> dict[str, str]:
    selector = {}
    for term in filter(None, text.split(",")):
        key, _, value = term.partition("=")
        selector[key.strip()] = value.lstrip("=").strip()
    return selector


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _not_found(resource: str, name: str) -> dict[str, Any]:
    group = f".{GROUP}" if resource == "trainjobs" else ""
    status = _status(404, "NotFound", f'{resource}{group} "{name}" not found')
    status["details"] = {"name": name, "kind": resource}
    return status


def _timestamp(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _api_groups() -> dict[str, Any]:
    def group(name: str, version: str) -> dict[str, Any]:
        gv = {"groupVersion": f"{name}/{version}", "version": version}
        return {"name": name, "versions": [gv], "preferredVersion": gv}

    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [group("apiextensions.k8s.io", "v1"), group(GROUP, VERSION)],
    }


def _api_resources() -> dict[str, Any]:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{GROUP}/{VERSION}",
        "resources": [
            {
                "name": "trainjobs",
                "singularName": "trainjob",
                "namespaced": True,
                "kind": "TrainJob",
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            },
            {
                "name": "trainjobs/status",
                "singularName": "",
                "namespaced": True,
                "kind": "TrainJob",
                "verbs": ["get", "patch", "update"],
            },
        ],
    }
