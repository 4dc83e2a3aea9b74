"""The TrainJob launcher under faults: lost answers, 5xx, resets, hung reads, API outages and SIGTERM.

The local API server (``tests/doubles/kube_server.py``) injects each fault into chosen requests (see its
:class:`~doubles.kube_server.Fault`), before or after carrying the request out; a signal is a real SIGTERM
sent to a real launcher process. After every fault the launcher must either see its TrainJob through or
leave none behind, and never create it twice.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import yaml
from kubernetes import client
from test_launch_trainjob import REPO, RUN_ID, VERSIONS, cluster, deletes, launch_config

from kfp_components.launch import trainjob
from kfp_components.launch.kube import ENV_AUTH_TOKEN, ENV_SERVER_URL
from kfp_components.launch.manifest import RUNTIME_PATCHES, build_trainjob, trainjob_name
from kfp_components.launch.trainjob import (
    TrainJobError,
    TrainJobFailed,
    TrainJobLauncher,
    TrainJobTimeout,
)

from doubles.kube_server import Fault, Scenario

NAME = trainjob_name(RUN_ID, "sft")
TRAINJOB = f"/trainjobs/{NAME}"
CRD = "/customresourcedefinitions/"


@pytest.fixture
def quick_retries(monkeypatch):
    """Short backoffs and clean-up deadline, so that a test of many retries takes a second, not a minute."""
    monkeypatch.setattr(trainjob, "RETRY_BACKOFF_SECONDS", 0.02, raising=False)
    monkeypatch.setattr(trainjob, "MAX_RETRY_BACKOFF_SECONDS", 0.1, raising=False)
    monkeypatch.setattr(trainjob, "MAX_READ_BACKOFF_SECONDS", 0.1, raising=False)
    monkeypatch.setattr(trainjob, "CLEANUP_SECONDS", 1.5, raising=False)


def statuses(server, method: str, path: str = "/trainjobs") -> list[int]:
    """Answer codes of the requests with this method whose path ends with ``path`` (0: no answer)."""
    return [r.status for r in server.requests_for(method) if r.path.endswith(path)]


def gone(server) -> bool:
    return server.wait_until(lambda: server.trainjob(NAME, "ml") is None, 5)


# ---------------------------------------------------------------------------------------------- create


@pytest.mark.parametrize(
    "fault",
    [
        Fault("POST", "/trainjobs", status=500, after=True),
        Fault("POST", "/trainjobs", status=503, after=True, delay=0.2),
        Fault("POST", "/trainjobs", reset=True, after=True),
    ],
    ids=["500-after-storing", "slow-503-after-storing", "reset-after-storing"],
)
@pytest.mark.parametrize("version", VERSIONS)
def test_a_create_that_was_stored_but_answered_with_an_error_is_adopted_not_created_twice(
    version, fault, quick_retries, caplog
):
    fault = replace(fault)  # its own hit count
    caplog.set_level(logging.INFO)
    with cluster(version, faults=[fault]) as (server, api):
        result = TrainJobLauncher(launch_config(), api_client=api).run()
        assert result.reason == "AllJobsCompleted" and result.adopted
        assert server.created == [NAME], "one TrainJob"
        assert statuses(server, "POST") == [fault.status, 409]
        assert deletes(server) == []
    assert "may have been stored" in caplog.text


def test_a_5xx_before_the_create_is_retried(quick_retries):
    with cluster(faults=[Fault("POST", "/trainjobs", status=503, times=2)]) as (server, api):
        result = TrainJobLauncher(launch_config(), api_client=api).run()
        assert result.reason == "AllJobsCompleted" and not result.adopted
        assert statuses(server, "POST") == [503, 503, 201] and server.created == [NAME]


def test_a_create_that_keeps_failing_leaves_no_trainjob_behind(quick_retries):
    """Every attempt is stored (the first) or refused (409), and answered with a 500: the launcher gives up
    and deletes the TrainJob it finds by name, checked to be its own."""
    with cluster(
        scenarios=[Scenario(outcome="never")],
        faults=[Fault("POST", "/trainjobs", status=500, after=True, times=0)],
    ) as (server, api):
        with pytest.raises(TrainJobError, match=r"could not create .* attempts.*500") as error:
            TrainJobLauncher(launch_config(), api_client=api).run()
        assert not isinstance(error.value, TrainJobTimeout)
        assert len(statuses(server, "POST")) == trainjob.MAX_REQUEST_ATTEMPTS
        assert server.created == [NAME]
        assert gone(server), "the stored TrainJob was left running"
        (delete,) = deletes(server)
        assert delete.body["propagationPolicy"] == "Foreground"
        assert delete.body["preconditions"] == {"uid": server.created_uids[0]}, "the one checked to be ours"


def test_a_create_refused_outright_looks_for_nothing_and_deletes_nothing():
    with cluster("v2.1.0") as (server, api):
        with pytest.raises(TrainJobError, match="unknown field"):
            TrainJobLauncher(launch_config(trainer_api_version="v2.3"), api_client=api).run()
        assert statuses(server, "POST") == [400]
        assert server.requests_for("GET", "/trainjobs") == [] and deletes(server) == []


def test_a_trainjob_of_someone_else_is_never_deleted_after_a_lost_create(quick_retries):
    """The name is taken by a TrainJob the launcher did not make; the create's answer is lost: it is not
    adopted, and the clean-up leaves it alone."""
    with cluster() as (server, api):
        theirs = build_trainjob(launch_config(), name=NAME, namespace="ml", shape=RUNTIME_PATCHES)
        del theirs["metadata"]["labels"]["app.kubernetes.io/managed-by"]
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            "trainer.kubeflow.org", "v1alpha1", "ml", "trainjobs", theirs
        )
        lost = Fault("POST", "/trainjobs", reset=True, after=True)
        server.inject(lost)
        with pytest.raises(TrainJobError, match="was not created by this launcher"):
            TrainJobLauncher(launch_config(), api_client=api).run()
        assert lost.hits == 1 and statuses(server, "POST")[1:] == [0, 409]
        assert deletes(server) == [] and server.trainjob(NAME, "ml") is not None


# -------------------------------------------------------------------------------------- the CRD shape


def test_a_5xx_reading_the_crd_is_retried_not_taken_for_forbidden(quick_retries):
    """Trainer v2.1 serves podTemplateOverrides: a 5xx must not make the launcher assume v2.3."""
    with cluster("v2.1.0", faults=[Fault("GET", CRD, status=503, times=2)]) as (server, api):
        launcher = TrainJobLauncher(launch_config(), api_client=api)
        assert launcher.run().reason == "AllJobsCompleted"
        assert launcher.shape() == "podTemplateOverrides"
        assert statuses(server, "GET", "trainjobs.trainer.kubeflow.org") == [503, 503, 200]


@pytest.mark.parametrize(
    "fault",
    [Fault("GET", CRD, status=500, times=0), Fault("GET", CRD, reset=True, times=0)],
    ids=["500", "reset"],
)
def test_a_crd_that_stays_unreadable_is_a_clear_error_before_any_create(fault, quick_retries):
    fault = replace(fault)  # its own hit count
    with cluster("v2.3.0", faults=[fault]) as (server, api):
        with pytest.raises(TrainJobError, match=r"could not read the CRD .*trainer_api_version"):
            TrainJobLauncher(launch_config(), api_client=api).run()
        assert len(server.requests_for("GET", CRD)) == trainjob.MAX_REQUEST_ATTEMPTS
        assert server.requests_for("POST") == []


# ------------------------------------------------------------------------------------------- waiting


def test_an_api_outage_while_waiting_does_not_delete_a_healthy_trainjob(quick_retries, caplog):
    """Eight status reads in a row fail (503s, then resets): the launcher backs off and keeps waiting."""
    caplog.set_level(logging.INFO)
    outage = [Fault("GET", TRAINJOB, status=503, times=6), Fault("GET", TRAINJOB, reset=True, times=2)]
    scenario = Scenario(log_lines=[f"step {i}" for i in range(10)], line_interval=0.1)
    with cluster(scenarios=[scenario], faults=outage) as (server, api):
        result = TrainJobLauncher(launch_config(timeout_seconds=30), api_client=api).run()
        assert result.reason == "AllJobsCompleted" and result.log_tail[-1] == "step 9"
        assert [f.hits for f in outage] == [6, 2], "the outage happened"
        assert deletes(server) == []
    assert "keeps waiting" in caplog.text


def test_an_outage_that_outlasts_the_timeout_ends_at_the_deadline_and_deletes(quick_retries):
    with cluster(
        scenarios=[Scenario(outcome="never")], faults=[Fault("GET", TRAINJOB, status=503, times=0)]
    ) as (server, api):
        started = time.monotonic()
        with pytest.raises(TrainJobTimeout, match=r"did not finish within 1.5 s.*503") as error:
            TrainJobLauncher(launch_config(timeout_seconds=1.5), api_client=api).run()
        assert "could not read" in str(error.value)
        assert time.monotonic() - started < 1.5 + trainjob.CLEANUP_SECONDS + 2
        assert len(deletes(server)) == 1 and gone(server)


def test_a_hung_read_does_not_outlast_the_timeout(quick_retries):
    """Every status read hangs 15 s; timeout_seconds is 2: the launcher gives up at about 2 s, not 15."""
    with cluster(
        scenarios=[Scenario(outcome="never")], faults=[Fault("GET", TRAINJOB, delay=15, times=0)]
    ) as (server, api):
        started = time.monotonic()
        with pytest.raises(TrainJobTimeout, match="did not finish within 2 s"):
            TrainJobLauncher(launch_config(timeout_seconds=2), api_client=api).run()
        elapsed = time.monotonic() - started
        assert elapsed < 2 + trainjob.CLEANUP_SECONDS + 2, f"took {elapsed:.1f} s"
        assert len(deletes(server)) == 1 and gone(server)


# ----------------------------------------------------------------------------------------- deleting


def test_a_failed_delete_is_retried_until_the_trainjob_is_gone(quick_retries):
    scenario = Scenario(outcome="fail")
    with cluster(scenarios=[scenario], faults=[Fault("DELETE", TRAINJOB, status=503, times=2)]) as (
        server,
        api,
    ):
        with pytest.raises(TrainJobFailed):
            TrainJobLauncher(launch_config(), api_client=api).run()
        assert statuses(server, "DELETE", NAME) == [503, 503, 200]
        assert gone(server)


def test_clean_up_says_so_when_it_gives_up(quick_retries, caplog):
    scenario = Scenario(outcome="fail")
    with cluster(scenarios=[scenario], faults=[Fault("DELETE", TRAINJOB, status=503, times=0)]) as (
        server,
        api,
    ):
        with pytest.raises(TrainJobFailed, match="FailedJobs"):
            TrainJobLauncher(launch_config(), api_client=api).run()
        assert len(deletes(server)) >= 3, "retried"
        assert server.trainjob(NAME, "ml") is not None
    assert f"gave up deleting TrainJob ml/{NAME}" in caplog.text
    assert "delete it by hand" in caplog.text and "503" in caplog.text


def test_the_server_reads_delete_options_like_the_api_server():
    """The body's DeleteOptions win over the query; a uid precondition that does not match is a 409."""
    with cluster(scenarios=[Scenario(outcome="never")]) as (server, api):
        objects = client.CustomObjectsApi(api)
        objects.create_namespaced_custom_object(
            "trainer.kubeflow.org",
            "v1alpha1",
            "ml",
            "trainjobs",
            build_trainjob(launch_config(), name=NAME, namespace="ml", shape=RUNTIME_PATCHES),
        )
        uid = server.trainjob(NAME, "ml")["metadata"]["uid"]
        wrong = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid="not-" + uid))
        with pytest.raises(client.ApiException) as conflict:
            objects.delete_namespaced_custom_object(
                "trainer.kubeflow.org", "v1alpha1", "ml", "trainjobs", NAME, body=wrong
            )
        assert conflict.value.status == 409 and "Precondition failed" in conflict.value.body
        right = client.V1DeleteOptions(
            propagation_policy="Foreground", preconditions=client.V1Preconditions(uid=uid)
        )
        objects.delete_namespaced_custom_object(
            "trainer.kubeflow.org",
            "v1alpha1",
            "ml",
            "trainjobs",
            NAME,
            body=right,
            propagation_policy="Orphan",
        )
        assert server.trainjob(NAME, "ml")["metadata"]["finalizers"] == ["foregroundDeletion"], "the body won"
        assert gone(server)


# ------------------------------------------------------------------------------------------ SIGTERM


def start_launcher(server, tmp_path) -> subprocess.Popen:
    """``python -m kfp_components.launch.trainjob`` against ``server``, in its own process."""
    config_file = tmp_path / "launch.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {
                "trainer_image": "trainer:1",
                "config_path": "/workspace/run.yaml",
                "run_id": RUN_ID,
                "stage": "sft",
                "namespace": "ml",
                "poll_interval_seconds": 0.05,
            }
        )
    )
    env = {**os.environ, ENV_SERVER_URL: server.url, ENV_AUTH_TOKEN: server.token}
    return subprocess.Popen(
        [sys.executable, "-m", "kfp_components.launch.trainjob", "--config", str(config_file)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize(
    "fault",
    [
        Fault("POST", "/trainjobs", delay=1.5),
        Fault("POST", "/trainjobs", delay=1.5, after=True),
        Fault("POST", "/trainjobs", reset=True, delay=1.5, after=True),
        Fault("POST", "/trainjobs", status=504, delay=1.5, after=True),
    ],
    ids=["stored-late", "stored-answered-late", "stored-then-reset", "stored-then-504"],
)
def test_sigterm_while_the_create_is_in_flight_leaves_no_trainjob(fault, tmp_path):
    fault = replace(fault)  # its own hit count
    with cluster(scenarios=[Scenario(outcome="never")], faults=[fault]) as (server, _):
        process = start_launcher(server, tmp_path)
        try:
            assert server.wait_until(lambda: server.requests_for("POST", "/trainjobs"), 30), "no create"
            time.sleep(0.3)  # the create is in flight: held by the server
            assert fault.hits == 1 and not server.requests_for("POST", "/trainjobs")[0].status
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
        assert process.returncode == 128 + signal.SIGTERM, output
        assert "cancelled (SIGTERM)" in output
        assert server.wait_until(lambda: server.created == [NAME], 5), "the server stores it in any case"
        assert gone(server), f"the TrainJob was left running:\n{output}"
        (delete,) = deletes(server)
        assert delete.body == {
            "propagationPolicy": "Foreground",
            "preconditions": {"uid": server.created_uids[0]},
        }
        assert server.token not in output


def test_sigterm_during_clean_up_lets_the_clean_up_finish(tmp_path):
    """The TrainJob failed and its first DELETEs fail; a SIGTERM then must not cut the retries short."""
    faults = [Fault("DELETE", TRAINJOB, status=503, times=2)]
    with cluster(scenarios=[Scenario(outcome="fail")], faults=faults) as (server, _):
        process = start_launcher(server, tmp_path)
        try:
            assert server.wait_until(lambda: deletes(server), 30), "no clean-up"
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
        assert statuses(server, "DELETE", NAME) == [503, 503, 200], output
        assert gone(server), output
        assert process.returncode == 1, output
        assert "SIGTERM during clean-up: finishing the clean-up" in output
