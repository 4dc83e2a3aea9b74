"""Experiment tracking: every record of ``metrics.jsonl`` also goes to TensorBoard and/or MLflow
(``report_to``), from the main process only.

* ``tensorboard``: event files in ``<output_dir>/tensorboard`` (:mod:`.tensorboard_events`), one scalar per
  numeric field of a record (``loss``, ``lr``, ``reward``, ``eval_loss``, ...) at the record's step. A resumed
  run rewrites the folder from the records its checkpoint kept, so the curves are one clean series, like
  ``metrics.jsonl``.
* ``mlflow``: a run named ``run_name`` (else the output folder's name) in the experiment of
  ``MLFLOW_EXPERIMENT_NAME`` (else the server's default) on ``MLFLOW_TRACKING_URI``: the training options
  (without credentials) as params, every record's numbers as metrics at its step, and the run's end status
  (FINISHED, FAILED or KILLED). A resumed run continues the unfinished MLflow run of the same name. A
  tracking server that stops answering mid-run does not stop the training: the records are kept and sent
  with the next ones, with a warning, and the ones still unsent at the end are counted in the log.

  Everything MLflow is sent from a thread of its own (:class:`MlflowTracker`), as the Kubeflow status
  reporter does: the training loop only puts a record in a bounded queue (:data:`MLFLOW_QUEUE_RECORDS`; a
  record that finds it full is dropped and counted), so a slow or unreachable tracking server never delays a
  step. ``close`` hands over the run's end status and waits at most :data:`MLFLOW_FLUSH_SECONDS` for what is
  queued to go out; nothing the thread meets is raised into the training.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kfp_components.trainer.config import TrainingConfig

log = logging.getLogger("kfp_components.trainer")

TENSORBOARD_DIR = "tensorboard"
#: The record fields that are not curves: the x axis.
NOT_SCALARS = ("step",)


def scalars_of(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record by name (booleans and ``None`` are not curves)."""
    return {
        key: float(value)
        for key, value in record.items()
        if key not in NOT_SCALARS
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def tracking_problems(config: TrainingConfig) -> list[tuple[str, str]]:
    """What this process lacks for ``report_to``: MLflow needs its client and ``MLFLOW_TRACKING_URI``."""
    if "mlflow" not in config.report_to:
        return []
    problems = []
    if importlib.util.find_spec("mlflow") is None:
        problems.append(("report_to", "mlflow needs the mlflow client (pip install mlflow-skinny)"))
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        problems.append(
            (
                "report_to",
                "mlflow needs MLFLOW_TRACKING_URI (the tracking server's URL) in the environment; set it "
                "or remove mlflow from report_to",
            )
        )
    return problems


class TensorBoardTracker:
    def __init__(self, folder: Path):
        self.folder = folder
        self.writer: Any = None

    def start(self, kept: list[dict[str, Any]], resumed: bool) -> None:
        from kfp_components.trainer.tensorboard_events import EventFileWriter

        if self.folder.exists():  # a fresh run starts empty; a resumed one from what its checkpoint kept
            shutil.rmtree(self.folder)
        self.writer = EventFileWriter(self.folder)
        for record in kept:
            self.write(record)

    def write(self, record: Mapping[str, Any]) -> None:
        self.writer.add_scalars(int(record.get("step", 0)), scalars_of(record))

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


#: The MLflow client's HTTP settings unless the environment sets them: a tracking server that is down costs a
#: step seconds, not the client's default of 7 retries of up to 120 s each.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


#: Records the MLflow thread may have waiting; one more is dropped (and counted) rather than wait for room.
MLFLOW_QUEUE_RECORDS = 10_000
#: How long ``close`` waits for the queued records and the end status to go out.
MLFLOW_FLUSH_SECONDS = 60.0


class MlflowTracker:
    """The MLflow run, fed from the training loop without waiting on the server (see the module docstring):
    ``start``, ``write`` and ``close`` hand their work to a sending thread running :class:`MlflowSession`."""

    def __init__(
        self,
        config: TrainingConfig,
        run_name: str,
        *,
        max_records: int = MLFLOW_QUEUE_RECORDS,
        flush_seconds: float = MLFLOW_FLUSH_SECONDS,
    ):
        self.session = MlflowSession(config, run_name)
        self.flush_seconds = flush_seconds
        self.dropped = 0
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=max_records)
        self._thread = threading.Thread(target=self._run, name="mlflow-tracking", daemon=True)
        self._thread.start()

    def start(self, kept: list[dict[str, Any]], resumed: bool) -> None:
        self._put(("start", (list(kept), resumed)))

    def write(self, record: Mapping[str, Any]) -> None:
        self._put(("write", dict(record)))

    def close(self, status: str) -> None:
        deadline = time.monotonic() + self.flush_seconds
        with contextlib.suppress(queue.Full):  # the end status waits for room in a full queue, a bounded time
            self._queue.put(("close", status), timeout=self.flush_seconds)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning(
                "mlflow: the tracking server did not take the run's last records within %g s; %d records "
                "were still queued",
                self.flush_seconds,
                self._queue.qsize(),
            )
        if self.dropped:
            log.warning(
                "mlflow: %d records of run %s were dropped: the queue to the tracking server was full",
                self.dropped,
                self.session.run_name,
            )

    def _put(self, item: tuple[str, Any]) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            if not self.dropped:
                log.warning("mlflow: the tracking server falls behind; dropping records until it catches up")
            self.dropped += 1

    def _run(self) -> None:
        while True:
            kind, payload = self._queue.get()
            try:
                if kind == "start":
                    self.session.start(*payload)
                elif kind == "write":
                    self.session.write(payload)
                else:
                    self.session.close(payload)
                    return
            except Exception as exc:  # never into the training: the session keeps what it could not send
                log.warning("mlflow: %s failed (%s)", kind, exc)


class MlflowSession:
    """The MLflow client calls of one run, made from :class:`MlflowTracker`'s thread. A run that could not
    be created yet (the server down at the start) is created with the next record; the records meanwhile are
    kept."""

    def __init__(self, config: TrainingConfig, run_name: str):
        for name, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        from mlflow.tracking import MlflowClient

        self.config = config
        self.run_name = run_name
        self.client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
        self.run_id = ""
        self.unsent: list[Any] = []
        self.failing = False
        self._pending_start: tuple[list[dict[str, Any]], bool] | None = None

    def _experiment_id(self) -> str:
        if os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "")
        if not name:
            return "0"  # the server's Default experiment
        experiment = self.client.get_experiment_by_name(name)
        return experiment.experiment_id if experiment else self.client.create_experiment(name)

    def start(self, kept: list[dict[str, Any]], resumed: bool) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for record in kept:  # sent once the run exists
            step = int(record.get("step", 0))
            self.unsent += [Metric(key, value, now, step) for key, value in scalars_of(record).items()]
        self._pending_start = ([], resumed)
        self._send()

    def _create(self) -> bool:
        """Create (or find) the run if that is still to do; whether the run exists."""
        if self._pending_start is None:
            return bool(self.run_id)
        try:
            self._open_run(self._pending_start[1])
        except Exception as exc:
            if not self.failing:
                log.warning("mlflow: could not start the run (%s); trying again with the next step", exc)
            self.failing = True
            return False
        self._pending_start = None
        return True

    def _open_run(self, resumed: bool) -> None:
        from kfp_components.redaction import redact_record
        from kfp_components.typed_config import to_dict

        experiment_id = self._experiment_id()
        if resumed:
            quoted = self.run_name.replace("\\", "\\\\").replace("'", "\\'")
            earlier = self.client.search_runs(
                [experiment_id],
                filter_string=f"attributes.run_name = '{quoted}' and attributes.status != 'FINISHED'",
                max_results=1,
                order_by=["attributes.start_time DESC"],
            )
            if earlier:
                self.run_id = earlier[0].info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                log.info("mlflow: continuing run %s (%s)", self.run_name, self.run_id)
                return
        run = self.client.create_run(
            experiment_id,
            run_name=self.run_name,
            tags={"algorithm": self.config.algorithm, "model": self.config.model_name_or_path},
        )
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        params = [
            Param(key, str(value)[:6000])
            for key, value in sorted(redact_record(to_dict(self.config)).items())
        ]
        try:
            for start in range(0, len(params), 100):  # the server takes at most 100 params per request
                self.client.log_batch(self.run_id, params=params[start : start + 100])
        except Exception as exc:  # the run exists: its metrics still go to it
            log.warning("mlflow: could not log the run's params (%s)", exc)
        log.info("mlflow: run %s (%s) in experiment %s", self.run_name, self.run_id, experiment_id)

    def write(self, record: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(record.get("step", 0))
        self.unsent += [Metric(key, value, now, step) for key, value in scalars_of(record).items()]
        self._send()

    def _send(self) -> None:
        if not self._create():
            return
        try:
            while self.unsent:
                batch = self.unsent[:1000]  # the server takes at most 1000 metrics per request
                self.client.log_batch(self.run_id, metrics=batch)
                del self.unsent[: len(batch)]
        except Exception as exc:  # the training goes on; the records are sent with the next ones
            if not self.failing:
                log.warning(
                    "mlflow: could not log metrics (%s); keeping them to send with the next step", exc
                )
            self.failing = True
            return
        if self.failing:
            log.info("mlflow: logging metrics again")
        self.failing = False

    def close(self, status: str) -> None:
        self._send()
        if not self.run_id:
            if self.unsent:
                log.warning("mlflow: run %s was never created; its metrics were not sent", self.run_name)
            return
        if self.unsent:
            log.warning("mlflow: %d metric values of run %s were not sent", len(self.unsent), self.run_name)
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as exc:
            log.warning("mlflow: could not mark run %s %s (%s)", self.run_name, status, exc)


class Trackers:
    """The trackers of ``report_to`` (none when ``enabled`` is false: not the main process)."""

    def __init__(self, config: TrainingConfig, *, enabled: bool):
        self.trackers: list[Any] = []
        if not enabled:
            return
        output_dir = Path(config.output_dir)
        if "tensorboard" in config.report_to:
            self.trackers.append(TensorBoardTracker(output_dir / TENSORBOARD_DIR))
        if "mlflow" in config.report_to:
            self.trackers.append(MlflowTracker(config, config.run_name or output_dir.resolve().name))

    def start(self, kept: Iterable[dict[str, Any]], resumed: bool) -> None:
        records = list(kept)
        for tracker in self.trackers:
            tracker.start(records, resumed)

    def write(self, record: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.write(record)

    def close(self, status: str) -> None:
        for tracker in self.trackers:
            tracker.close(status)
        self.trackers = []
