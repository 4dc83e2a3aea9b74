"""An MLflow tracking server on 127.0.0.1: the REST API (``/api/2.0/mlflow/...``) the ``mlflow`` client
speaks for experiments, runs, params and metrics, kept in memory.

Served: ``experiments/get-by-name``, ``experiments/get``, ``experiments/create``, ``runs/create``,
``runs/get``, ``runs/update``, ``runs/log-batch``, ``runs/search`` (the ``attributes.run_name = '...'``
filter, and ``attributes.status != '...'``), ``metrics/get-history``. Errors come back as MLflow's JSON
errors (``error_code``, ``message``). ``fail_log_batch`` answers that many ``log-batch`` requests with metrics with 503
first (a server that stops answering for a while); ``latency_seconds`` makes every request wait that long (a
slow server). Every request is recorded as ``(method, path)``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from kfp_components.testing.servers import serving


@dataclass
class MlflowServer:
    url: str
    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run_named(self, name: str) -> dict[str, Any]:
        (run,) = [r for r in self.runs.values() if r["info"]["run_name"] == name]
        return run

    def history(self, run: dict[str, Any], key: str) -> list[tuple[int, float]]:
        return [(m["step"], m["value"]) for m in run["metrics"] if m["key"] == key]


class _Error(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


@contextlib.contextmanager
def mlflow_server(*, fail_log_batch: int = 0, latency_seconds: float = 0.0) -> Iterator[MlflowServer]:
    state = MlflowServer(url="")
    state.experiments["0"] = {"experiment_id": "0", "name": "Default", "lifecycle_stage": "active"}
    ids = itertools.count(1)
    failures = [fail_log_batch]

    def run_view(run: dict[str, Any]) -> dict[str, Any]:
        latest: dict[str, dict[str, Any]] = {}
        for metric in run["metrics"]:
            latest[metric["key"]] = metric
        return {
            "info": run["info"],
            "data": {
                "params": [{"key": k, "value": v} for k, v in run["params"].items()],
                "tags": [{"key": k, "value": v} for k, v in run["tags"].items()],
                "metrics": list(latest.values()),
            },
        }

    def find_run(run_id: str) -> dict[str, Any]:
        if run_id not in state.runs:
            raise _Error(404, "RESOURCE_DOES_NOT_EXIST", f"Run {run_id!r} not found")
        return state.runs[run_id]

    def handle(method: str, path: str, query: dict[str, list[str]], body: dict[str, Any]) -> dict[str, Any]:
        if path == "experiments/get-by-name":
            name = query.get("experiment_name", [""])[0]
            found = [e for e in state.experiments.values() if e["name"] == name]
            if not found:
                raise _Error(404, "RESOURCE_DOES_NOT_EXIST", f"Could not find experiment with name {name!r}")
            return {"experiment": found[0]}
        if path == "experiments/get":
            experiment_id = query.get("experiment_id", [""])[0]
            if experiment_id not in state.experiments:
                raise _Error(404, "RESOURCE_DOES_NOT_EXIST", f"No experiment {experiment_id!r}")
            return {"experiment": state.experiments[experiment_id]}
        if path == "experiments/create":
            experiment_id = str(next(ids))
            state.experiments[experiment_id] = {
                "experiment_id": experiment_id,
                "name": body["name"],
                "lifecycle_stage": "active",
            }
            return {"experiment_id": experiment_id}
        if path == "runs/create":
            if body.get("experiment_id", "0") not in state.experiments:
                raise _Error(404, "RESOURCE_DOES_NOT_EXIST", "no such experiment")
            run_id = f"run{next(ids)}"
            tags = {t["key"]: t["value"] for t in body.get("tags", [])}
            state.runs[run_id] = {
                "info": {
                    "run_id": run_id,
                    "run_uuid": run_id,
                    "run_name": body.get("run_name") or tags.get("mlflow.runName", ""),
                    "experiment_id": body.get("experiment_id", "0"),
                    "status": "RUNNING",
                    "start_time": body.get("start_time", int(time.time() * 1000)),
                    "artifact_uri": f"/artifacts/{run_id}",
                    "lifecycle_stage": "active",
                },
                "params": {},
                "tags": tags,
                "metrics": [],
            }
            return {"run": run_view(state.runs[run_id])}
        if path == "runs/get":
            return {"run": run_view(find_run(query.get("run_id", [""])[0]))}
        if path == "runs/update":
            run = find_run(body.get("run_id") or body.get("run_uuid", ""))
            if body.get("status"):
                run["info"]["status"] = body["status"]
            if body.get("end_time"):
                run["info"]["end_time"] = body["end_time"]
            return {"run_info": run["info"]}
        if path == "runs/log-batch":
            if failures[0] > 0 and body.get("metrics"):
                failures[0] -= 1
                raise _Error(503, "TEMPORARILY_UNAVAILABLE", "try again later")
            run = find_run(body["run_id"])
            for param in body.get("params", []):
                if param["key"] in run["params"] and run["params"][param["key"]] != param["value"]:
                    raise _Error(400, "INVALID_PARAMETER_VALUE", f"param {param['key']} changed")
                run["params"][param["key"]] = param["value"]
            run["metrics"] += [
                {**m, "step": int(m.get("step", 0)), "value": float(m["value"])}
                for m in body.get("metrics", [])
            ]
            run["tags"].update({t["key"]: t["value"] for t in body.get("tags", [])})
            return {}
        if path == "runs/search":
            found = [r for r in state.runs.values() if r["info"]["experiment_id"] in body["experiment_ids"]]
            for clause in filter(None, re.split(r"\s+and\s+", body.get("filter", ""), flags=re.IGNORECASE)):
                match = re.fullmatch(r"attributes\.(\w+)\s*(=|!=)\s*'(.*)'", clause.strip())
                if not match:
                    raise _Error(400, "INVALID_PARAMETER_VALUE", f"filter not understood: {clause!r}")
                key, op, value = match.groups()
                found = [r for r in found if (str(r["info"].get(key)) == value) == (op == "=")]
            found.sort(key=lambda r: -r["info"]["start_time"])
            return {"runs": [run_view(r) for r in found[: int(body.get("max_results", 1000))]]}
        if path == "metrics/get-history":
            run = find_run(query.get("run_id", [""])[0])
            key = query.get("metric_key", [""])[0]
            return {"metrics": [m for m in run["metrics"] if m["key"] == key]}
        raise _Error(404, "ENDPOINT_NOT_FOUND", f"{method} {path} is not served here")

    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str) -> None:
            url = urlparse(self.path)
            path = url.path.removeprefix("/api/2.0/mlflow/")
            length = int(self.headers.get("Content-Length", 0) or 0)
            body = json.loads(self.rfile.read(length) or b"{}") if length else {}
            time.sleep(latency_seconds)  # a slow server: every request waits (requests overlap)
            with state.lock:
                state.requests.append((method, path))
                try:
                    status, answer = 200, handle(method, path, parse_qs(url.query), body)
                except _Error as exc:
                    status, answer = exc.status, {"error_code": exc.code, "message": str(exc)}
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def log_message(self, *args: Any) -> None:
            pass

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as address:
        state.url = f"http://{address}"
        yield state
