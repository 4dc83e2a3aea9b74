"""Progress of a run reported to the Kubeflow Trainer status endpoint, shown as ``status.trainerStatus``.

Kubeflow Trainer v2.2+ with the ``TrainJobStatus`` feature gate injects three variables into every trainer
container of a TrainJob:

* ``KUBEFLOW_TRAINER_SERVER_URL``: ``https://<controller>:8082/apis/trainer.kubeflow.org/v1alpha1/namespaces/
  <ns>/trainjobs/<name>/status``;
* ``KUBEFLOW_TRAINER_SERVER_TOKEN``: the file of a projected service-account token (it rotates; it is read
  again for every request);
* ``KUBEFLOW_TRAINER_SERVER_CA_CERT``: the file of the CA that signed the endpoint's certificate.

An update is ``POST <url>`` with ``Authorization: Bearer <token>`` and the JSON body of the
``UpdateTrainJobStatusRequest`` model (``kubeflow-trainer-api``)::

    {"trainerStatus": {"progressPercentage": 40, "estimatedRemainingSeconds": 95,
                       "metrics": [{"name": "loss", "value": "1.234"}, ...],
                       "lastUpdatedTime": "2026-01-01T12:00:00Z"}}

The controller writes it to the TrainJob's ``status.trainerStatus`` (the CRD bounds: percentage 0-100, ETA
at least 0, at most 256 metrics, names and values 1-64 characters, the time required).

:class:`StatusReporter` sends from a thread of its own, so a slow or unreachable endpoint never holds up a
training step: the loop hands it the newest status, at most one every ``every_seconds`` (what is handed in
between is dropped; the endpoint rate-limits). A failed update is logged once (until one succeeds again)
and the next is tried ``every_seconds`` later; nothing here raises into training. :meth:`finish` sends the
last status (100 %) whatever the interval, and waits a bounded time for it to go out. Only the main process
reports (the caller decides: :class:`kfp_components.trainer.progress.Progress` on rank 0).

Without ``KUBEFLOW_TRAINER_SERVER_URL`` (another runtime, an older Trainer, a local run) nothing is sent.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("kfp_components.trainer")

ENV_SERVER_URL = "KUBEFLOW_TRAINER_SERVER_URL"
ENV_SERVER_TOKEN = "KUBEFLOW_TRAINER_SERVER_TOKEN"
ENV_SERVER_CA_CERT = "KUBEFLOW_TRAINER_SERVER_CA_CERT"

#: At most one update this often (seconds); the last one (:meth:`StatusReporter.finish`) goes regardless.
REPORT_EVERY_SECONDS = 30.0
#: How long one update may take (connect and answer).
REQUEST_TIMEOUT_SECONDS = 10.0
#: How long :meth:`StatusReporter.finish` waits for the last update to go out.
FINISH_WAIT_SECONDS = 15.0
#: The CRD's bounds of ``status.trainerStatus``.
MAX_METRICS = 256
MAX_METRIC_TEXT = 64
MAX_INT32 = 2**31 - 1


class StatusReporter:
    """Sends a run's progress (percentage, ETA, the latest step's metrics) to the status endpoint.

    Args:
        url: The endpoint (``KUBEFLOW_TRAINER_SERVER_URL``).
        token_file: The bearer token's file, read for every update.
        ca_file: The CA certificate the endpoint's certificate is checked against; None: the system's CAs.
        total_steps: The run's planned optimizer steps.
        initial_step: The step it starts at (a resumed run); the ETA counts the steps of this attempt only.
        every_seconds: At most one update this often.
        clock: Monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        url: str,
        token_file: str | Path,
        ca_file: str | Path | None = None,
        *,
        total_steps: int,
        initial_step: int = 0,
        every_seconds: float = REPORT_EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not url.startswith(("https://", "http://")):
            raise ValueError(f"{ENV_SERVER_URL} is not an http(s) URL: {url!r}")
        self.url = url
        self.token_file = Path(token_file)
        self.ca_file = Path(ca_file) if ca_file else None
        self.total_steps = max(0, total_steps)
        self.initial_step = initial_step
        self.every_seconds = every_seconds
        self.clock = clock
        self.started = clock()
        self.sent = 0  # updates the endpoint accepted
        self.failed = 0  # updates that did not reach it
        self._last_handed: float | None = None
        self._metrics: list[dict[str, str]] = []
        self._pending: dict[str, Any] | None = None
        self._closing = False
        self._failing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="trainer-status-report", daemon=True)
        self._thread.start()

    @classmethod
    def from_environment(
        cls, *, total_steps: int, initial_step: int = 0, environ: Mapping[str, str] | None = None
    ) -> StatusReporter | None:
        """A reporter for the endpoint the Trainer runtime injected, or None when there is none."""
        env = os.environ if environ is None else environ
        url = env.get(ENV_SERVER_URL, "").strip()
        if not url:
            return None
        token_file = env.get(ENV_SERVER_TOKEN, "").strip()
        if not token_file:
            log.warning(
                "%s is set but %s is not: progress is not reported to the Kubeflow Trainer status endpoint",
                ENV_SERVER_URL,
                ENV_SERVER_TOKEN,
            )
            return None
        try:
            reporter = cls(
                url,
                token_file,
                env.get(ENV_SERVER_CA_CERT, "").strip() or None,
                total_steps=total_steps,
                initial_step=initial_step,
            )
        except ValueError as exc:
            log.warning("%s: progress is not reported to the Kubeflow Trainer status endpoint", exc)
            return None
        log.info(
            "reporting progress to the Kubeflow Trainer status endpoint %s (at most every %g s)",
            url,
            reporter.every_seconds,
        )
        return reporter

    # ---- what the training loop calls

    def step(self, step: int, record: Mapping[str, Any]) -> None:
        """Step ``step`` is done with the metrics in ``record``: hand its status over when one is due."""
        self._metrics = metric_entries(record)
        now = self.clock()
        if self._last_handed is not None and now - self._last_handed < self.every_seconds:
            return
        self._hand_over(self.status(step, now), now)

    def finish(self, step: int, *, wait_seconds: float = FINISH_WAIT_SECONDS) -> None:
        """The run's steps are done: send the last status now, wait up to ``wait_seconds`` for it to go out,
        and stop the sending thread."""
        now = self.clock()
        self._hand_over(self.status(step, now), now)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(wait_seconds)

    def status(self, step: int, now: float) -> dict[str, Any]:
        """The ``trainerStatus`` after step ``step`` (percentage rounded down: 100 only when done)."""
        total = self.total_steps
        done = min(step, total) if total else 0
        status: dict[str, Any] = {
            "progressPercentage": 100 if total == 0 or done >= total else (100 * done) // total,
            "lastUpdatedTime": _now_rfc3339(),
        }
        steps_run = step - self.initial_step
        if done >= total:
            status["estimatedRemainingSeconds"] = 0
        elif steps_run > 0:
            seconds = (now - self.started) / steps_run * (total - done)
            status["estimatedRemainingSeconds"] = min(MAX_INT32, max(0, math.ceil(seconds)))
        if self._metrics:
            status["metrics"] = list(self._metrics)
        return status

    # ---- sending

    def _hand_over(self, status: dict[str, Any], now: float) -> None:
        with self._cond:
            self._pending = status  # a newer status replaces one not sent yet
            self._last_handed = now
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closing:
                    self._cond.wait()
                status, self._pending = self._pending, None
                if status is None:
                    return
            self._send(status)

    def _send(self, status: dict[str, Any]) -> None:
        try:
            self._post({"trainerStatus": status})
        except Exception as exc:  # nothing here may stop training
            self.failed += 1
            if not self._failing:
                self._failing = True
                log.warning(
                    "could not report progress to the Kubeflow Trainer status endpoint %s: %s; training goes "
                    "on, the next report is tried in %g s (failures are not logged again until one succeeds)",
                    self.url,
                    _describe(exc),
                    self.every_seconds,
                )
            return
        self.sent += 1
        if self._failing:
            self._failing = False
            log.info("progress reports reach the Kubeflow Trainer status endpoint again")

    def _post(self, body: dict[str, Any]) -> None:
        token = self.token_file.read_text(encoding="utf-8").strip()
        request = urllib.request.Request(
            self.url,
            data=json.dumps(body).encode("utf-8"),
            method="POST",
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        context = None
        if self.url.startswith("https://"):
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SECONDS, context=context) as answer:
            answer.read()


def metric_entries(record: Mapping[str, Any]) -> list[dict[str, str]]:
    """The numbers of a step's record as ``trainerStatus.metrics`` entries (values as text, 6 significant
    digits; flags, lists and missing values left out; within the CRD's bounds)."""
    entries = []
    for name, value in record.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        text = str(value) if isinstance(value, int) else format(value, ".6g")
        if 0 < len(name) <= MAX_METRIC_TEXT:
            entries.append({"name": name, "value": text[:MAX_METRIC_TEXT]})
    return entries[:MAX_METRICS]


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe(exc: BaseException) -> str:
    """What went wrong, without the request (the token is in its headers)."""
    if isinstance(exc, urllib.error.HTTPError):
        detail = ""
        with contextlib.suppress(Exception):  # a Status body says why (403 Forbidden, 422 and the field)
            detail = str(json.loads(exc.read() or b"{}").get("message", ""))
        return f"HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else "")
    if isinstance(exc, urllib.error.URLError):
        return f"{type(exc.reason).__name__}: {exc.reason}"
    if isinstance(exc, OSError) and exc.filename:
        return f"{type(exc).__name__}: {exc.strerror}: {exc.filename}"
    return f"{type(exc).__name__}: {exc}"
