"""Run the training engine on a cluster as a Kubeflow Trainer TrainJob: submit, wait, stream logs, clean up.

Lifecycle of :meth:`TrainJobLauncher.run`
-----------------------------------------
1. **Name.** ``config.name``, or :func:`~kfp_components.launch.manifest.trainjob_name` of the pipeline run
   id and the stage: the same step of the same run always gets the same name.
2. **Shape.** ``trainer_api_version: auto`` reads the served CRD ``trainjobs.trainer.kubeflow.org`` and
   picks ``podTemplateOverrides`` (Trainer v2.0-2.1) or ``runtimePatches`` (v2.2+) from its schema (see
   :mod:`~kfp_components.launch.manifest`); when RBAC forbids reading it (403), the launcher says so and
   assumes v2.3. A read without an answer, or answered 429 or 5xx, is tried again; when it keeps failing,
   or fails otherwise, that is an error before anything is submitted (never a guess). An explicit version
   skips the read.
3. **Submit** with ``fieldValidation=Strict``, so a field the served CRD does not know is an error rather
   than silently dropped. A 409 (the TrainJob exists: the step is being rerun) **adopts** it when it is
   ours (managed-by label and the same spec hash): a running or suspended one is waited for, a completed one
   is a success without resubmitting, a failed one is deleted and submitted again
   (``on_existing_failed: resubmit``, what a retry wants) or reported (``fail``). A create without an
   answer, or answered 429 or 5xx, may have been stored: it is tried again with backoff, and a stored one
   then answers 409 and is adopted, never created twice.
4. **Wait**, polling the TrainJob every ``poll_interval_seconds``: condition ``Complete`` is success;
   ``Failed`` is a failure with its reason and message. A status read that fails transiently (no answer,
   429, 5xx: the API server restarting, a network outage) says nothing about the TrainJob: the reads back
   off (doubling from ``poll_interval_seconds`` up to ``MAX_READ_BACKOFF_SECONDS``) and go on; only the
   deadline, ``Failed`` or an error that trying again cannot fix (401, 403, the TrainJob deleted by
   someone else) ends the wait. A suspended TrainJob (``spec.suspend`` or condition
   ``Suspended``) is logged and waited out, not a failure: before it first runs, Kueue has not admitted it
   yet; after, it was preempted (Kueue suspends it, its pods stop; when it is readmitted new pods run the
   same command, and a trainer whose config says ``resume: true`` continues from its newest checkpoint on
   the workspace volume). A pod restart (the JobSet or Job replaces a failed pod, or the container restarts)
   likewise runs the same command again. Meanwhile a thread copies the log of worker ``log_node``
   (container ``node`` of the newest pod with the labels ``jobset.sigs.k8s.io/jobset-name=<name>``,
   ``jobset.sigs.k8s.io/replicatedjob-name=node`` and ``batch.kubernetes.io/job-completion-index``) into this
   step's log, following the new pod after a restart or a preemption, and keeps the last ``tail_lines``
   lines. The result says how long the TrainJob was suspended and how often it was preempted.
   Where the trainer reports its progress (Kubeflow Trainer v2.2+ with the ``TrainJobStatus`` feature, see
   :mod:`kfp_components.trainer.status_report`), each new ``status.trainerStatus`` the polls see is logged
   as one line: percentage, estimated time left, the metrics. Without it nothing changes: the pod's log is
   the progress.
5. **Clean up.** On failure, on ``timeout_seconds`` (counted from the start of :meth:`TrainJobLauncher.run`;
   time spent suspended, queued or preempted counts), on SIGTERM (a cancelled step; the handler is
   installed only while submitting and waiting, from the main thread) and on any other error after a create
   was sent, the TrainJob is deleted with ``propagationPolicy=Foreground`` so its pods go and no GPU stays
   held, and the error quotes the reason and the last log lines. The DELETE carries the TrainJob's uid as a
   precondition (only the TrainJob that was created or checked is deleted); when the create's answer was
   lost, the TrainJob of the name is read first and deleted only when it is ours. A DELETE without an
   answer, or answered 429 or 5xx, is tried again with backoff until it is accepted or ``CLEANUP_SECONDS``
   (``CANCELLED_CLEANUP_SECONDS`` after SIGTERM, within Kubernetes' default grace period) pass, then the
   launcher waits, within the same time, to see the TrainJob gone; giving up before the DELETE was
   accepted is logged as an error with the ``kubectl`` command that deletes it. A SIGTERM
   that comes while a create is in flight is held until its answer is in, which says what there is to
   delete. A completed TrainJob is kept unless ``delete_on_success``.

Every request has a timeout: ``REQUEST_TIMEOUT_SECONDS``, or what is left until the deadline when that is
less, so a hung connection cannot hold the launcher past ``timeout_seconds`` (the log stream, read in its
own thread, is reopened after ``LOG_READ_TIMEOUT_SECONDS`` of silence).

Secrets reach the TrainJob only as ``secretKeyRef`` env entries; the config refuses a literal value for an
env name that looks secret before any request is made.

``python -m kfp_components.launch.trainjob --config launch.yaml`` runs the same from a shell (exit code 0
done, 1 failed or timed out, 2 bad config, 143 cancelled).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kfp_components.launch.kube import (
    KubeCredentialsError,
    api_client_from_environment,
    default_namespace,
    describe_api_error,
)
from kfp_components.launch.manifest import (
    CRD_NAME,
    DEFAULT_TRAINER_VERSION,
    GROUP,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    PLURAL,
    SPEC_HASH_ANNOTATION,
    TRAINER_CONTAINER,
    TRAINER_JOB,
    VERSION,
    SecretEnv,
    Shape,
    Toleration,
    TrainJobConfig,
    build_trainjob,
    shape_for_version,
    shape_from_crd,
    trainjob_name,
)
from kfp_components.typed_config import ConfigError

__all__ = [
    "SecretEnv",
    "Toleration",
    "TrainJobCancelled",
    "TrainJobConfig",
    "TrainJobError",
    "TrainJobFailed",
    "TrainJobLauncher",
    "TrainJobResult",
    "TrainJobTimeout",
    "launch_trainjob",
]

log = logging.getLogger("kfp_components.launch.trainjob")  # also when run as __main__

JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
DELETE_PROPAGATION = "Foreground"

#: After Complete or Failed, how long the log thread may take to read the last lines of the pod.
LOG_DRAIN_SECONDS = 10.0
#: A log stream silent for this long is reopened (it starts from the first line again; those already
#: copied are skipped).
LOG_READ_TIMEOUT_SECONDS = 300.0
#: Create attempts when the name keeps being taken (deleted, failed and resubmitted, ...).
MAX_SUBMIT_ATTEMPTS = 5
#: Longest wait for one API request's answer (and for each read of it); a request made closer to the
#: deadline than that gets what is left, at least MIN_REQUEST_TIMEOUT_SECONDS.
REQUEST_TIMEOUT_SECONDS = 10.0
CONNECT_TIMEOUT_SECONDS = 5.0
MIN_REQUEST_TIMEOUT_SECONDS = 1.0
#: Tries of a create, a CRD read or a read while submitting that fails transiently (no answer, 429, 5xx),
#: RETRY_BACKOFF_SECONDS apart, doubling up to MAX_RETRY_BACKOFF_SECONDS (also the backoff of deletes).
MAX_REQUEST_ATTEMPTS = 5
RETRY_BACKOFF_SECONDS = 0.5
MAX_RETRY_BACKOFF_SECONDS = 8.0
#: While waiting, failed status reads back off from poll_interval_seconds, doubling up to this; they go on
#: until the deadline (an API outage is not a verdict on the TrainJob).
MAX_READ_BACKOFF_SECONDS = 60.0
#: How long clean-up retries the delete and waits for the TrainJob to be gone.
CLEANUP_SECONDS = 120.0
#: The same after SIGTERM: within Kubernetes' default grace period of 30 s before SIGKILL.
CANCELLED_CLEANUP_SECONDS = 25.0
_TERMINAL_PHASES = ("Succeeded", "Failed")
_EPOCH = datetime.datetime.fromtimestamp(0, datetime.UTC)
_T = TypeVar("_T")


class TrainJobError(RuntimeError):
    """The TrainJob could not be submitted, or did not complete. ``log_tail`` holds its last log lines."""

    def __init__(self, message: str, *, name: str = "", reason: str = "", log_tail: list[str] | None = None):
        self.name = name
        self.reason = reason
        self.log_tail = list(log_tail or [])
        super().__init__(message)


class TrainJobFailed(TrainJobError):
    """The TrainJob's ``Failed`` condition became true; ``reason`` is the condition's reason."""


class TrainJobTimeout(TrainJobError):
    """The TrainJob did not finish within ``timeout_seconds``."""


class TrainJobCancelled(TrainJobError):
    """The step was cancelled (SIGTERM) while submitting or waiting; the TrainJob was deleted."""


@dataclass
class TrainJobResult:
    """A completed TrainJob.

    Attributes:
        name: TrainJob name.
        namespace: Its namespace.
        adopted: True when it was found already there (made by an earlier attempt of this step, or by a
            create of this one whose answer was lost) and was not submitted again.
        reason: Reason of its Complete condition (e.g. AllJobsCompleted).
        message: Message of its Complete condition.
        log_tail: The last log lines copied from the trainer (empty when it had completed before).
        elapsed_seconds: Time spent waiting.
        suspended_seconds: Of that, time the TrainJob was suspended (waiting for admission or preempted).
        preemptions: How often it was suspended after it had started to run.
    """

    name: str
    namespace: str
    adopted: bool
    reason: str
    message: str
    log_tail: list[str] = field(default_factory=list)
    elapsed_seconds: float = 0.0
    suspended_seconds: float = 0.0
    preemptions: int = 0


def launch_trainjob(config: TrainJobConfig, *, api_client: client.ApiClient | None = None) -> TrainJobResult:
    """Submit (or adopt) the TrainJob for ``config`` and wait for it; see :class:`TrainJobLauncher`."""
    return TrainJobLauncher(config, api_client=api_client).run()


class TrainJobLauncher:
    """Submits one TrainJob and sees it through (see the module docstring for the lifecycle).

    Args:
        config: What to run and how to wait; validated here, before any request.
        api_client: Kubernetes client; default: from the environment (see :mod:`kfp_components.launch.kube`).
    """

    def __init__(self, config: TrainJobConfig, *, api_client: client.ApiClient | None = None):
        config.validate()
        self.config = config
        self.name = config.name or trainjob_name(config.run_id, config.stage)
        self.api_client = api_client if api_client is not None else api_client_from_environment()
        self.namespace = config.namespace or default_namespace()
        self.adopted = False
        self.tail: collections.deque[str] = collections.deque(maxlen=config.tail_lines)
        self._objects = client.CustomObjectsApi(self.api_client)
        self._core = client.CoreV1Api(self.api_client)
        self._extensions = client.ApiextensionsV1Api(self.api_client)
        self._shape: Shape | None = None
        self._manifest: dict[str, Any] | None = None
        # what clean-up deletes: the TrainJob of uid ``_uid`` (created, or checked to be ours and adopted);
        # with ``_maybe_ours``, the one of this name if it is ours (a create's answer is not known yet)
        self._ours = False
        self._uid: str | None = None
        self._maybe_ours = False
        self._unanswered_creates = 0
        self._deadline: float | None = None  # monotonic time the current phase must end by
        self._read_failures = 0
        self._read_error = ""
        self._outage_since = 0.0
        self._sigterm_handled = False
        self._defer_cancel = False
        self._pending_cancel: TrainJobCancelled | None = None
        self._cleaning_up = False
        self._suspensions = _SuspensionClock()
        self._trainer_status: dict[str, Any] | None = None  # the last status.trainerStatus logged

    @property
    def ref(self) -> str:
        """``TrainJob <namespace>/<name>``, as messages name it."""
        return f"TrainJob {self.namespace}/{self.name}"

    # ------------------------------------------------------------------------------------------ submit

    def run(self) -> TrainJobResult:
        """Submit or adopt the TrainJob, then wait for it (not at all when it had completed already).

        ``timeout_seconds`` counts from here. Whatever ends the submission early (an error, SIGTERM, a create
        whose answer was lost) leaves no TrainJob of ours behind: it is deleted, or looked up by name and
        deleted when it is ours.
        """
        self._deadline = self._deadline_from_now()
        with _sigterm_raises(self):
            try:
                trainjob = self._submit()
            except BaseException as exc:
                self._clean_up(exc)
                raise
            if not _condition_true(trainjob, "Complete"):
                return self._wait()
        return self._result(_condition(trainjob, "Complete"))

    def shape(self) -> Shape:
        """The CRD shape to send: from ``trainer_api_version``, or detected from the served CRD."""
        if self._shape is None:
            self._shape = self._detect_shape()
        return self._shape

    def manifest(self) -> dict[str, Any]:
        """The TrainJob this launcher submits."""
        return build_trainjob(self.config, name=self.name, namespace=self.namespace, shape=self.shape())

    def submit(self) -> dict[str, Any]:
        """Create the TrainJob, or adopt the one an earlier attempt of this step created; return it.

        An existing TrainJob of this name is adopted only when it is ours (see :meth:`_not_ours`); one
        being deleted is waited for and replaced; a failed one is resubmitted or reported as
        ``on_existing_failed`` says. A create that fails without an answer that says it was refused (no
        answer, 429, 5xx) is tried again with backoff; a create that was stored before its answer was lost
        is then found by name (409) and adopted, never created twice.
        """
        self._deadline = self._deadline_from_now()
        return self._submit()

    def _submit(self) -> dict[str, Any]:
        manifest = self._manifest = self.manifest()
        for _ in range(MAX_SUBMIT_ATTEMPTS):
            created = self._create(manifest)
            if created is not None:
                log.info("submitted %s (runtime %s)", self.ref, self.config.runtime_name)
                return created
            existing = self._retrying(f"read {self.ref}", self._get)
            if existing is None:  # deleted since the 409: create it again
                continue
            if existing.get("metadata", {}).get("deletionTimestamp"):
                log.info("%s is being deleted; waiting to submit it again", self.ref)
                self._wait_gone()
                continue
            problem = self._not_ours(existing)
            if problem:
                self._maybe_ours = False
                raise TrainJobError(problem, name=self.name)
            if _condition_true(existing, "Failed"):
                condition = _condition(existing, "Failed")
                failure = f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(": ")
                if self.config.on_existing_failed == "fail":
                    self._maybe_ours = False  # left for inspection
                    raise TrainJobFailed(
                        f"{self.ref} from an earlier attempt failed ({failure}); it is left for inspection "
                        "(on_existing_failed: fail)",
                        name=self.name,
                        reason=condition.get("reason", ""),
                    )
                log.warning(
                    "%s from an earlier attempt failed (%s): deleting it and submitting again",
                    self.ref,
                    failure,
                )
                self._hold(existing)
                try:
                    self.delete(wait=True)
                finally:  # deleted, or the error says what is left
                    self._ours, self._uid = False, None
                continue
            self._hold(existing)
            self.adopted = True
            state = "completed" if _condition_true(existing, "Complete") else "still running"
            origin = "from an earlier attempt of this step"
            if self._unanswered_creates:
                origin = "(a create whose answer was lost stored it, or an earlier attempt of this step did)"
            log.info("%s exists %s and is %s: adopting it", self.ref, origin, state)
            return existing
        raise TrainJobError(f"{self.ref} kept reappearing while it was being submitted", name=self.name)

    def _create(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        """POST the TrainJob, trying again after a failure that may have stored it; None when it exists (409)."""

        def attempt() -> dict[str, Any]:
            self._maybe_ours = True  # from the moment the request may leave until an answer says otherwise
            try:
                with self._cancel_deferred():  # a SIGTERM waits for the answer: it says what to delete
                    created = self._objects.create_namespaced_custom_object(
                        GROUP,
                        VERSION,
                        self.namespace,
                        PLURAL,
                        manifest,
                        field_validation="Strict",
                        _request_timeout=self._timeout(),
                    )
                    self._hold(created)
            except Exception as exc:
                if _is_transient(exc):
                    self._unanswered_creates += 1
                raise
            return created

        try:
            return self._retrying(
                f"create {self.ref}", attempt, note="it may have been stored: the next try finds it by name"
            )
        except ApiException as exc:
            if exc.status == 409:
                return None
            if not self._unanswered_creates:  # refused, and no earlier try may have stored it
                self._maybe_ours = False
            hint = ""
            if exc.status == 400 and "unknown field" in str(exc.body):
                hint = (
                    f"\n(the cluster's TrainJob CRD does not have these fields: the shape sent was {self.shape()}; "
                    "set trainer_api_version to the installed Kubeflow Trainer version, e.g. v2.1 or v2.3)"
                )
            raise TrainJobError(
                f"could not create {self.ref}: {describe_api_error(exc)}{hint}", name=self.name
            ) from None

    def _hold(self, trainjob: dict[str, Any]) -> None:
        """From now on ``trainjob`` (created, or checked to be ours) is what clean-up deletes."""
        self._ours = True
        self._uid = (trainjob.get("metadata") or {}).get("uid")
        self._maybe_ours = False

    def _not_ours(self, existing: dict[str, Any]) -> str:
        """Why a TrainJob of our name is not ours to adopt or delete, or ``''`` when it is: one without the
        managed-by label is not ours, one with another spec hash was made with other options (the same name
        then means a collision, not a rerun)."""
        metadata = existing.get("metadata", {})
        if (metadata.get("labels") or {}).get(MANAGED_BY_LABEL) != MANAGED_BY:
            return (
                f"{self.ref} exists and was not created by this launcher (no {MANAGED_BY_LABEL}={MANAGED_BY} "
                "label); choose another name or delete it"
            )
        manifest = self._manifest if self._manifest is not None else self.manifest()
        ours = manifest["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
        theirs = (metadata.get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
        if theirs != ours:
            return (
                f"{self.ref} exists with a different spec (spec hash {theirs}, this step's is {ours}): "
                "the same run and stage were launched with other options; delete it or use another name"
            )
        return ""

    def _detect_shape(self) -> Shape:
        option = self.config.trainer_api_version
        if option != "auto":
            return shape_for_version(option)
        set_version = (
            "; no TrainJob was submitted. Set trainer_api_version to the installed Kubeflow Trainer version "
            "(e.g. v2.1 or v2.3) to skip this read"
        )

        def read() -> Any:
            return self._extensions.read_custom_resource_definition(
                CRD_NAME, _preload_content=False, _request_timeout=self._timeout()
            )

        try:
            response = self._retrying(f"read the CRD {CRD_NAME}", read, hint=set_version)
            crd = json.loads(response.data)
        except ApiException as exc:
            if exc.status == 401:
                raise TrainJobError(f"could not read the TrainJob CRD: {describe_api_error(exc)}") from None
            if exc.status == 404:
                raise TrainJobError(
                    f"the CRD {CRD_NAME} is not installed: is Kubeflow Trainer v2 installed on this cluster?"
                ) from None
            if exc.status != 403:
                raise TrainJobError(
                    f"could not read the CRD {CRD_NAME} to detect the Kubeflow Trainer version: "
                    f"{describe_api_error(exc)}{set_version}"
                ) from None
            fallback = shape_for_version(DEFAULT_TRAINER_VERSION)
            log.warning(
                "cannot read the CRD %s to detect the Kubeflow Trainer version (%s %s; the step's service "
                "account needs 'get' on customresourcedefinitions for trainer_api_version: auto); assuming "
                "%s (%s). Set trainer_api_version to the installed version to choose.",
                CRD_NAME,
                exc.status,
                exc.reason,
                DEFAULT_TRAINER_VERSION,
                fallback,
            )
            return fallback
        except ValueError as exc:  # not JSON: a proxy's error page, say
            raise TrainJobError(f"the CRD {CRD_NAME} as served is not JSON ({exc}){set_version}") from None
        shape = shape_from_crd(crd)
        if shape is None:
            raise TrainJobError(
                f"the served {CRD_NAME} has neither spec.runtimePatches nor spec.podTemplateOverrides: an "
                "unsupported Kubeflow Trainer version; set trainer_api_version"
            )
        log.info("the cluster's TrainJob CRD uses %s", shape)
        return shape

    # -------------------------------------------------------------------------------------------- wait

    def wait(self) -> TrainJobResult:
        """Wait for the submitted TrainJob, copying its log; delete it on failure, timeout or SIGTERM."""
        self._deadline = self._deadline_from_now()
        return self._wait()

    def _wait(self) -> TrainJobResult:
        config = self.config
        started = time.monotonic()
        follower = _PodLogFollower(self, self._core) if config.stream_logs else None
        with _sigterm_raises(self):
            try:
                if follower is not None:
                    follower.start()
                complete = self._poll_until_finished(follower)
            except BaseException as exc:
                if follower is not None:
                    follower.stop()
                self._clean_up(exc)
                raise
        if config.delete_on_success:
            self.delete()
        clock = self._suspensions
        return self._result(
            complete,
            log_tail=list(self.tail),
            elapsed_seconds=time.monotonic() - started,
            suspended_seconds=clock.total(),
            preemptions=clock.preemptions,
        )

    def _result(self, complete: dict[str, Any], **extra: Any) -> TrainJobResult:
        """The result of this TrainJob from its ``Complete`` condition."""
        return TrainJobResult(
            name=self.name,
            namespace=self.namespace,
            adopted=self.adopted,
            reason=complete.get("reason", ""),
            message=complete.get("message", ""),
            **extra,
        )

    def _poll_until_finished(self, follower: _PodLogFollower | None) -> dict[str, Any]:
        """Poll the TrainJob's conditions; return its Complete condition or raise.

        A read that fails transiently (the API server restarting, a network outage) is not a verdict on the
        TrainJob: the reads back off and go on until the deadline; only ``Complete``, ``Failed``, the
        deadline or an error that trying again cannot fix ends the wait.
        """
        clock = self._suspensions
        poll = self.config.poll_interval_seconds
        while True:
            trainjob = self._read_status()
            delay = poll
            if trainjob is not None:
                self._note_trainer_status(trainjob)
            if trainjob is None:
                delay = _backoff(self._read_failures, poll, max(poll, MAX_READ_BACKOFF_SECONDS))
                log.warning(
                    "could not read %s (%s; %d failed reads in %.0f s): it is left running and the launcher "
                    "keeps waiting; next read in %.1f s",
                    self.ref,
                    self._read_error,
                    self._read_failures,
                    time.monotonic() - self._outage_since,
                    delay,
                )
            elif _condition_true(trainjob, "Complete"):
                if follower is not None:
                    follower.finish(LOG_DRAIN_SECONDS)
                clock.update(False)
                log.info("%s completed%s", self.ref, clock.summary())
                return _condition(trainjob, "Complete")
            elif _condition_true(trainjob, "Failed"):
                if follower is not None:
                    follower.finish(LOG_DRAIN_SECONDS)  # the traceback is in the last lines
                condition = _condition(trainjob, "Failed")
                reason = condition.get("reason", "Failed")
                raise TrainJobFailed(
                    f"{self.ref} failed: {reason}: {condition.get('message', '')}{self._tail_text()}",
                    name=self.name,
                    reason=reason,
                    log_tail=list(self.tail),
                )
            else:
                self._note_suspension(trainjob)
            now = time.monotonic()
            if self._deadline is not None and now >= self._deadline:
                if follower is not None:
                    follower.stop()
                outage = ""
                if self._read_failures:
                    outage = (
                        f" (could not read it for the last {now - self._outage_since:.0f} s, "
                        f"{self._read_failures} reads: {self._read_error})"
                    )
                raise TrainJobTimeout(
                    f"{self.ref} did not finish within {self.config.timeout_seconds:g} s"
                    f"{clock.summary(now=True)}{outage}{self._tail_text()}",
                    name=self.name,
                    reason="Timeout",
                    log_tail=list(self.tail),
                )
            time.sleep(delay if self._deadline is None else min(delay, self._deadline - now))

    def _note_suspension(self, trainjob: dict[str, Any]) -> None:
        """Log when the TrainJob is suspended (not admitted yet, or preempted) or resumed, and time it."""
        clock = self._suspensions
        change = clock.update(_is_suspended(trainjob))
        if change == "held":
            log.info(
                "%s is suspended (%s): waiting for it to be admitted (e.g. by Kueue), not a failure",
                self.ref,
                _suspension_reason(trainjob),
            )
        elif change == "preempted":
            log.warning(
                "%s was suspended while running (%s), e.g. preempted by Kueue: its pods stop, and when it is "
                "admitted again new pods run the same command (the trainer continues from its newest "
                "checkpoint when its config says resume: true); waiting, not a failure",
                self.ref,
                _suspension_reason(trainjob),
            )
        elif change == "resumed":
            log.info("%s resumed after %.0f s suspended", self.ref, clock.last_seconds)

    def _note_trainer_status(self, trainjob: dict[str, Any]) -> None:
        """Log ``status.trainerStatus`` when it changed since the last poll (absent: nothing to show)."""
        status = (trainjob.get("status") or {}).get("trainerStatus")
        if not isinstance(status, dict) or status == self._trainer_status:
            return
        self._trainer_status = status
        log.info("%s: %s", self.ref, describe_trainer_status(status))

    def _read_status(self) -> dict[str, Any] | None:
        """The TrainJob, or None when reading it failed transiently (counted in ``_read_failures``)."""
        try:
            trainjob = self._get()
        except TrainJobError:
            raise
        except Exception as exc:
            if not _is_transient(exc):
                raise TrainJobError(f"could not read {self.ref}: {_describe(exc)}", name=self.name) from None
            if not self._read_failures:
                self._outage_since = time.monotonic()
            self._read_failures += 1
            self._read_error = _describe(exc)
            return None
        if self._read_failures:
            log.info(
                "%s read again after %d failed reads (%.0f s)",
                self.ref,
                self._read_failures,
                time.monotonic() - self._outage_since,
            )
            self._read_failures = 0
        if trainjob is None:
            raise TrainJobError(f"{self.ref} was deleted by someone else while running", name=self.name)
        return trainjob

    def _clean_up(self, exc: BaseException) -> None:
        """Delete our TrainJob after a failure, a timeout, a cancellation or a create whose answer was lost;
        never raise from here, but say what is left behind."""
        if not (self._ours or self._maybe_ours):
            return
        why = type(exc).__name__
        seconds = CANCELLED_CLEANUP_SECONDS if isinstance(exc, TrainJobCancelled) else CLEANUP_SECONDS
        self._cleaning_up = True
        try:
            outcome = self._delete(time.monotonic() + seconds, wait=True)
        except Exception as error:  # the original error matters more; say what is left behind
            log.error("%s (after %s)", error, why)
            return
        finally:
            self._cleaning_up = False
        if outcome == "gone":
            log.info("deleted %s after %s", self.ref, why)
        elif outcome == "deleting":
            log.warning(
                "%s is being deleted after %s: the deletion was accepted but not seen done (Foreground "
                "deletion removes it once its pods have stopped)",
                self.ref,
                why,
            )
        elif outcome == "none":
            log.info("no %s was stored before %s: nothing to delete", self.ref, why)

    def _tail_text(self) -> str:
        if not self.tail:
            return ""
        lines = list(self.tail)
        return f"\nlast {len(lines)} log lines of worker {self.config.log_node}:\n" + "\n".join(lines)

    # ------------------------------------------------------------------------------------------ delete

    def delete(self, *, wait: bool = False) -> None:
        """Delete the TrainJob and, through Foreground propagation, its JobSet and pods (gone already is fine).

        Failures that may pass (no answer, 429, 5xx) are retried with backoff for up to ``CLEANUP_SECONDS``;
        then, or on another error, :class:`TrainJobError` says so. With ``wait``, also wait that long for
        the TrainJob to be gone.
        """
        outcome = self._delete(time.monotonic() + CLEANUP_SECONDS, wait=wait)
        if wait and outcome == "deleting":
            raise TrainJobError(f"{self.ref} is still being deleted; try again later", name=self.name)

    def _delete(self, deadline: float, *, wait: bool) -> str:
        """Delete our TrainJob, retrying transient failures with backoff until ``deadline``.

        The DELETE carries the TrainJob's uid as a precondition, so only the TrainJob that was created or
        checked is deleted, never one made since under the same name. Without a uid (a create whose answer
        was lost), the TrainJob of this name is read first and deleted only when it is ours.

        Returns ``gone``; ``deleting`` (accepted, but not seen gone by ``deadline`` or when a read fails,
        or not waited for);
        ``none`` (there is no TrainJob of this name) or ``not ours``. Raises :class:`TrainJobError` when
        the DELETE was not accepted by ``deadline``, or on an error that trying again cannot fix.
        """
        outer, self._deadline = self._deadline, deadline  # requests end by the clean-up's deadline
        started = time.monotonic()
        try:
            accepted = False
            failures = 0
            error = ""
            while True:
                delay = min(self.config.poll_interval_seconds, 2.0)
                try:
                    if not accepted:
                        state = self._request_delete()
                        if state == "accepted" and not wait:
                            return "deleting"
                        if state not in ("accepted", "replaced"):
                            return state
                        accepted = state == "accepted"
                        delay = delay if accepted else 0.0
                    if accepted:
                        current = self._get()
                        if current is None or (current.get("metadata") or {}).get("uid") != self._uid:
                            return "gone"
                except TrainJobCancelled:
                    raise
                except Exception as exc:
                    if isinstance(exc, TrainJobError) or not _is_transient(exc):
                        why = str(exc) if isinstance(exc, TrainJobError) else _describe(exc)
                        raise TrainJobError(
                            f"could not delete {self.ref}: {why}; it may still be running: delete it by hand "
                            f"({self._delete_command()})",
                            name=self.name,
                        ) from None
                    error = _describe(exc)
                    if accepted:  # nothing is left behind: seeing it gone is a courtesy, not worth a wait
                        log.warning("could not see %s gone (%s)", self.ref, error)
                        return "deleting"
                    failures += 1
                    delay = _backoff(failures, RETRY_BACKOFF_SECONDS, MAX_RETRY_BACKOFF_SECONDS)
                    log.warning("deleting %s failed (%s); trying again in %.1f s", self.ref, error, delay)
                now = time.monotonic()
                if now >= deadline:
                    if accepted:
                        return "deleting"
                    raise TrainJobError(
                        f"gave up deleting {self.ref} after {failures} failed tries in {now - started:.0f} s "
                        f"(the last: {error}); it may still be running: delete it by hand "
                        f"({self._delete_command()})",
                        name=self.name,
                    )
                time.sleep(min(delay, deadline - now))
        finally:
            self._deadline = outer

    def _request_delete(self) -> str:
        """One DELETE of our TrainJob (see :meth:`_delete`): ``accepted``, ``none`` (not there), ``not ours``,
        or ``replaced`` (the uid precondition failed: look again)."""
        if self._uid is None:
            current = self._get()
            if current is None:
                return "none"
            problem = self._not_ours(current)
            if problem:
                log.warning("%s; it is left alone", problem)
                return "not ours"
            self._uid = (current.get("metadata") or {}).get("uid")
        # with a body, the API server reads every delete option from it (and none from the query)
        options = client.V1DeleteOptions(
            propagation_policy=DELETE_PROPAGATION, preconditions=client.V1Preconditions(uid=self._uid)
        )
        try:
            self._objects.delete_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                self.name,
                body=options,
                propagation_policy=DELETE_PROPAGATION,
                _request_timeout=self._timeout(),
            )
        except ApiException as exc:
            if exc.status == 404:
                return "gone"
            if exc.status == 409:  # another TrainJob of this name: check it before deleting it
                log.info("%s was replaced by another of the same name; checking that one", self.ref)
                self._uid = None
                return "replaced"
            if exc.status in (401, 403):
                raise TrainJobError(describe_api_error(exc), name=self.name) from None
            raise
        return "accepted"

    def _delete_command(self) -> str:
        return f"kubectl delete trainjobs.{GROUP} -n {self.namespace} {self.name}"

    def _wait_gone(self) -> None:
        deadline = time.monotonic() + max(60.0, 3 * self.config.poll_interval_seconds)
        while self._retrying(f"read {self.ref}", self._get) is not None:
            if time.monotonic() > deadline:
                raise TrainJobError(f"{self.ref} is still being deleted; try again later", name=self.name)
            time.sleep(min(self.config.poll_interval_seconds, 2.0))

    def _get(self) -> dict[str, Any] | None:
        try:
            return self._objects.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, self.name, _request_timeout=self._timeout()
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            if exc.status in (401, 403):
                raise TrainJobError(f"could not read {self.ref}: {describe_api_error(exc)}") from None
            raise

    # -------------------------------------------------------------------------------- requests, signals

    def _deadline_from_now(self) -> float | None:
        timeout = self.config.timeout_seconds
        return time.monotonic() + timeout if timeout else None

    def _timeout(self) -> tuple[float, float]:
        """``(connect, read)`` timeouts of one request: REQUEST_TIMEOUT_SECONDS, or what is left until the
        deadline when that is less (at least MIN_REQUEST_TIMEOUT_SECONDS)."""
        limit = REQUEST_TIMEOUT_SECONDS
        if self._deadline is not None:
            limit = min(limit, max(self._deadline - time.monotonic(), MIN_REQUEST_TIMEOUT_SECONDS))
        return (min(CONNECT_TIMEOUT_SECONDS, limit), limit)

    def _retrying(self, what: str, call: Callable[[], _T], *, note: str = "", hint: str = "") -> _T:
        """``call()``, tried again with a doubling backoff after a transient failure (no answer, 429, 5xx):
        at most MAX_REQUEST_ATTEMPTS tries, none past the deadline. Other errors are raised as they are;
        when the tries run out, a :class:`TrainJobError` says ``could not <what>``, why, and ``hint``."""
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return call()
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                error = _describe(exc)
            delay = _backoff(attempt, RETRY_BACKOFF_SECONDS, MAX_RETRY_BACKOFF_SECONDS)
            past_deadline = self._deadline is not None and time.monotonic() + delay >= self._deadline
            if attempt >= MAX_REQUEST_ATTEMPTS or past_deadline:
                why = " (timeout_seconds reached)" if past_deadline and attempt < MAX_REQUEST_ATTEMPTS else ""
                raise TrainJobError(
                    f"could not {what}: {attempt} attempts in {time.monotonic() - started:.0f} s failed{why}, "
                    f"the last with {error}{hint}",
                    name=self.name,
                )
            log.warning(
                "could not %s (%s)%s; trying again in %.1f s (attempt %d of %d)",
                what,
                error,
                f"; {note}" if note else "",
                delay,
                attempt + 1,
                MAX_REQUEST_ATTEMPTS,
            )
            time.sleep(delay)

    @contextlib.contextmanager
    def _cancel_deferred(self) -> Iterator[None]:
        """A SIGTERM that comes in here is held until the block ends, then raised: the answer of the request
        in flight (a create) says what clean-up has to delete."""
        self._defer_cancel = True
        try:
            yield
        finally:
            self._defer_cancel = False
            pending, self._pending_cancel = self._pending_cancel, None
            if pending is not None:
                raise pending

    def _on_sigterm(self, signum: int) -> None:
        """SIGTERM: raise :class:`TrainJobCancelled` (at once, or when the request in flight is answered)."""
        if self._cleaning_up:
            log.warning("%s during clean-up: finishing the clean-up", signal.Signals(signum).name)
            return
        cancel = TrainJobCancelled(
            f"{self.ref} cancelled ({signal.Signals(signum).name}); deleting it{self._tail_text()}",
            name=self.name,
            reason="Cancelled",
            log_tail=list(self.tail),
        )
        if self._defer_cancel:
            log.warning(
                "%s while creating %s: waiting for the create's answer, which says what to delete",
                signal.Signals(signum).name,
                self.ref,
            )
            self._pending_cancel = cancel
            return
        raise cancel


def describe_trainer_status(status: dict[str, Any]) -> str:
    """A TrainJob's ``status.trainerStatus`` as one log line: ``progress 40 %, about 1 min 35 s left;
    loss 1.23, lr 2e-05 (reported 2026-01-01T12:00:00Z)``."""
    parts = []
    percent = status.get("progressPercentage")
    if percent is not None:
        parts.append(f"progress {percent} %")
    seconds = status.get("estimatedRemainingSeconds")
    if seconds is not None:
        parts.append(f"about {_duration(seconds)} left" if seconds else "no time left")
    text = ", ".join(parts) or "trainer status"
    metrics = [m for m in status.get("metrics") or [] if isinstance(m, dict)]
    if metrics:
        text += "; " + ", ".join(f"{m.get('name')} {m.get('value')}" for m in metrics)
    if status.get("lastUpdatedTime"):
        text += f" (reported {status['lastUpdatedTime']})"
    return text


def _duration(seconds: float) -> str:
    """``45 s``, ``3 min 20 s``, ``2 h 05 min``."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def _is_transient(exc: BaseException) -> bool:
    """A failure that may pass: no answer (connection refused, reset or timed out), 429 or a 5xx."""
    if isinstance(exc, ApiException):
        return exc.status == 429 or (exc.status or 0) >= 500
    return isinstance(exc, (urllib3.exceptions.HTTPError, OSError))


def _describe(exc: BaseException) -> str:
    """An API error as :func:`describe_api_error` says it; a connection error by its cause."""
    if isinstance(exc, ApiException):
        return describe_api_error(exc)
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    return f"{type(exc).__name__}: {exc}"


def _backoff(attempt: int, first: float, cap: float) -> float:
    """Seconds to wait after the ``attempt``-th failure in a row: ``first``, doubling, at most ``cap``."""
    return min(first * 2 ** min(attempt - 1, 30), cap)


def _is_suspended(trainjob: dict[str, Any]) -> bool:
    """Suspended by ``spec.suspend`` (what Kueue sets) or by the controller's ``Suspended`` condition."""
    return (trainjob.get("spec") or {}).get("suspend") is True or _condition_true(trainjob, "Suspended")


def _suspension_reason(trainjob: dict[str, Any]) -> str:
    condition = _condition(trainjob, "Suspended")
    if condition.get("status") == "True":
        return f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(": ")
    return "spec.suspend: true"


class _SuspensionClock:
    """How long and how often a TrainJob was suspended, from the states the launcher polls.

    A suspension before the TrainJob was first seen running is a wait for admission ("held"); one after is
    a preemption ("preempted").
    """

    def __init__(self) -> None:
        self.ran = False
        self.preemptions = 0
        self.last_seconds = 0.0
        self._since: float | None = None
        self._total = 0.0

    def update(self, suspended: bool) -> str:
        """Record the state now; return the change: held, preempted, resumed, or ``''``."""
        now = time.monotonic()
        change = ""
        if suspended and self._since is None:
            self._since = now
            change = "preempted" if self.ran else "held"
            if self.ran:
                self.preemptions += 1
        elif not suspended and self._since is not None:
            self.last_seconds = now - self._since
            self._total += self.last_seconds
            self._since = None
            change = "resumed"
        self.ran = self.ran or not suspended
        return change

    def total(self) -> float:
        """Seconds suspended so far, the current suspension included."""
        return self._total + (time.monotonic() - self._since if self._since is not None else 0.0)

    def summary(self, *, now: bool = False) -> str:
        """`` (suspended 12 s, preempted 1 time)`` for messages (``now``: `` (12 s of it suspended, ...,
        suspended now)``); empty when it never was suspended."""
        total = self.total()
        if not total and self._since is None:
            return ""
        parts = [f"{total:.0f} s of it suspended" if now else f"suspended {total:.0f} s"]
        if self.preemptions:
            parts.append(f"preempted {self.preemptions} time{'s' if self.preemptions != 1 else ''}")
        if now and self._since is not None:
            parts.append("suspended now")
        return f" ({', '.join(parts)})"


def _condition(trainjob: dict[str, Any], kind: str) -> dict[str, Any]:
    for condition in (trainjob.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return condition
    return {}


def _condition_true(trainjob: dict[str, Any], kind: str) -> bool:
    return _condition(trainjob, kind).get("status") == "True"


@contextlib.contextmanager
def _sigterm_raises(launcher: TrainJobLauncher) -> Iterator[None]:
    """While submitting and waiting, SIGTERM raises :class:`TrainJobCancelled` (once), so the TrainJob gets
    deleted; while a create is in flight, when its answer is in (see :meth:`TrainJobLauncher._on_sigterm`).
    Re-entrant; signal handlers can only be set from the main thread, elsewhere it does nothing.
    """
    if threading.current_thread() is not threading.main_thread() or launcher._sigterm_handled:
        yield
        return
    fired = False

    def handler(signum: int, frame: object) -> None:
        nonlocal fired
        if fired:  # a second SIGTERM during clean-up: let the clean-up finish
            return
        fired = not launcher._cleaning_up
        launcher._on_sigterm(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    launcher._sigterm_handled = True
    try:
        yield
    finally:
        launcher._sigterm_handled = False
        signal.signal(signal.SIGTERM, previous)


class _PodLogFollower(threading.Thread):
    """Copies the log of one worker's newest pod into our log and the launcher's tail, in a thread.

    Each (pod, container restart count) is read once from its first line: when a stream ends early (a
    dropped connection, a silent read timeout) it is reopened and the lines already seen are skipped; when
    its pod has finished, the follower waits for a newer pod (a restart) or for :meth:`finish`.
    """

    def __init__(self, launcher: TrainJobLauncher, core: client.CoreV1Api):
        super().__init__(name=f"logs-{launcher.name}", daemon=True)
        self.launcher = launcher
        self.core = core
        self.selector = ",".join(
            (
                f"{JOBSET_NAME_LABEL}={launcher.name}",
                f"{REPLICATED_JOB_LABEL}={TRAINER_JOB}",
                f"{COMPLETION_INDEX_LABEL}={launcher.config.log_node}",
            )
        )
        self.poll = min(launcher.config.poll_interval_seconds, 5.0)
        self.prefix = f"{TRAINER_JOB}-{launcher.config.log_node}"
        self._stop_now = threading.Event()
        self._finishing = threading.Event()
        self._seen: dict[tuple[str, int], int] = {}
        self._done: set[tuple[str, int]] = set()
        self._response: Any = None
        self._current: tuple[str, int] | tuple[()] = ()

    def finish(self, timeout: float) -> None:
        """Read what is left of the current pod's log (up to ``timeout`` seconds), then stop."""
        self._finishing.set()
        self.join(timeout)
        self.stop()

    def stop(self) -> None:
        """Stop now, closing an open stream."""
        self._stop_now.set()
        response = self._response
        if response is not None:
            with contextlib.suppress(Exception):
                getattr(response, "shutdown", response.close)()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(2.0)

    def run(self) -> None:
        while not self._stop_now.is_set():
            try:
                pod = self._newest_pod()
            except Exception as exc:  # keep following: logs are a courtesy, the status decides
                log.debug("listing the trainer pods failed: %s", exc)
                pod = None
            key = _pod_key(pod) if pod is not None else None
            if key is None or key in self._done:
                if self._finishing.is_set():
                    return
                self._stop_now.wait(self.poll)
                continue
            ended = self._stream(pod.metadata.name, key)
            if ended and pod.status is not None and pod.status.phase in _TERMINAL_PHASES:
                self._done.add(key)
            elif ended:
                with contextlib.suppress(Exception):  # the container may have stopped since the list
                    fresh = self.core.read_namespaced_pod(
                        pod.metadata.name,
                        self.launcher.namespace,
                        _request_timeout=(CONNECT_TIMEOUT_SECONDS, REQUEST_TIMEOUT_SECONDS),
                    )
                    if fresh.status is not None and fresh.status.phase in _TERMINAL_PHASES:
                        self._done.add(key)
            if not ended or key not in self._done:
                self._stop_now.wait(self.poll)

    def _newest_pod(self) -> Any:
        pods = self.core.list_namespaced_pod(
            self.launcher.namespace,
            label_selector=self.selector,
            _request_timeout=(CONNECT_TIMEOUT_SECONDS, REQUEST_TIMEOUT_SECONDS),
        ).items
        if not pods:
            return None

        def order(pod: Any) -> tuple:
            running = pod.status is None or pod.status.phase not in _TERMINAL_PHASES
            return (pod.metadata.creation_timestamp or _EPOCH, running, pod.metadata.name)

        return max(pods, key=order)

    def _stream(self, pod_name: str, key: tuple[str, int]) -> bool:
        """Copy new lines of the pod's log; True when the stream ended, False when it could not open."""
        if key != self._current:
            if not self._current:
                log.info("following the log of pod %s", pod_name)
            elif pod_name != self._current[0]:
                log.info(
                    "worker %d has a new pod, %s (restarted, or started again after a preemption): following "
                    "its log",
                    self.launcher.config.log_node,
                    pod_name,
                )
            else:
                log.info("container %s of pod %s restarted (%d): following its log", TRAINER_CONTAINER, *key)
            self._current = key
        try:
            self._response = self.core.read_namespaced_pod_log(
                pod_name,
                self.launcher.namespace,
                container=TRAINER_CONTAINER,
                follow=True,
                _preload_content=False,
                _request_timeout=(CONNECT_TIMEOUT_SECONDS, LOG_READ_TIMEOUT_SECONDS),
            )
        except Exception as exc:  # 400 while the container is starting, or the pod is gone
            log.debug("log of %s not available yet: %s", pod_name, exc)
            return False
        if self._stop_now.is_set():  # stop() came while the stream was opening
            self._response.release_conn()
            self._response = None
            return True
        skip = self._seen.get(key, 0)
        count = 0
        pending = b""
        try:
            for chunk in self._response.stream(64 * 1024, decode_content=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    count += 1
                    if count > skip:
                        self._emit(raw)
            if pending:
                count += 1
                if count > skip:
                    self._emit(pending)
        except Exception as exc:  # a read timeout or a dropped connection: reopen and skip what was seen
            log.debug("log stream of %s interrupted: %s", pod_name, exc)
        finally:
            self._seen[key] = max(skip, count)
            with contextlib.suppress(Exception):
                self._response.release_conn()
            self._response = None
        return True

    def _emit(self, raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        self.launcher.tail.append(line)
        log.info("[%s] %s", self.prefix, line)


def _pod_key(pod: Any) -> tuple[str, int]:
    """A pod's log identity: its name and how often its trainer container restarted (a restarted
    container's log starts again from its first line)."""
    statuses = pod.status.container_statuses if pod.status is not None else None
    restarts = next((s.restart_count or 0 for s in statuses or [] if s.name == TRAINER_CONTAINER), 0)
    return pod.metadata.name, restarts


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m kfp_components.launch.trainjob --config launch.yaml [--timeout_seconds 3600 ...]``."""
    from kfp_components.cli_args import add_config_arguments, config_from_args
    from kfp_components.logs import configure_logging

    parser = argparse.ArgumentParser(
        prog="python -m kfp_components.launch.trainjob",
        description="Run the training engine as a Kubeflow Trainer TrainJob and wait for it.",
    )
    parser.add_argument("--config", help="YAML file of TrainJobConfig options; flags override it")
    parser.add_argument("--log_level", default="INFO")
    add_config_arguments(parser, TrainJobConfig)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        config = config_from_args(TrainJobConfig, args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = launch_trainjob(config)
    except TrainJobCancelled as exc:
        log.error("%s", exc)
        return 128 + signal.SIGTERM
    except (TrainJobError, KubeCredentialsError) as exc:
        log.error("%s", exc)
        return 1
    log.info(
        "%s/%s done in %.0f s%s",
        result.namespace,
        result.name,
        result.elapsed_seconds,
        " (adopted)" if result.adopted else "",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
