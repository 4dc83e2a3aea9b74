"""The launcher shows ``status.trainerStatus`` while it waits, against the local API server.

The server (``tests/doubles/kube_server.py``) plays a TrainJob whose ``status.trainerStatus`` advances, and
serves the Trainer's status endpoint, so the whole path (the trainer's reporter, the endpoint, the TrainJob,
the launcher's poll) is exercised too.
"""

from __future__ import annotations

import logging
import threading

from kfp_components.launch.kube import token_api_client
from kfp_components.launch.trainjob import TrainJobConfig, TrainJobLauncher, describe_trainer_status
from kfp_components.trainer.status_report import StatusReporter

from doubles.kube_server import Scenario, kube_api_server
from doubles.trainjob_schema import trainjob_schema

RUN_ID = "0f9c0d7e-1234-4a5b-8c9d-0123456789ab"
NAME = f"sft-{RUN_ID}"


def launch_config(**overrides) -> TrainJobConfig:
    options = dict(
        trainer_image="quay.io/kfp-components/trainer:0.1.0",
        config_path="/workspace/sft/run.yaml",
        run_id=RUN_ID,
        stage="sft",
        namespace="ml",
        gpus_per_node=1,
        workspace_pvc="workspace-pvc",
        poll_interval_seconds=0.02,
        timeout_seconds=20,
    )
    options.update(overrides)
    return TrainJobConfig(**options)


def status_lines(caplog) -> list[str]:
    prefix = f"TrainJob ml/{NAME}: "
    return [
        r.getMessage().removeprefix(prefix)
        for r in caplog.records
        if r.name == "kfp_components.launch.trainjob" and r.getMessage().startswith(prefix)
    ]


def test_the_step_log_shows_trainer_status_as_it_advances(caplog):
    caplog.set_level(logging.INFO)
    advancing = [
        {
            "progressPercentage": 10,
            "estimatedRemainingSeconds": 5400,
            "metrics": [{"name": "loss", "value": "2.1"}],
        },
        {
            "progressPercentage": 50,
            "estimatedRemainingSeconds": 200,
            "metrics": [{"name": "loss", "value": "1.7"}],
        },
        {
            "progressPercentage": 100,
            "estimatedRemainingSeconds": 0,
            "metrics": [{"name": "loss", "value": "1.5"}],
        },
    ]
    with kube_api_server(
        trainjob_schema("v2.3.0"), scenarios=[Scenario(trainer_statuses=advancing)]
    ) as server:
        result = TrainJobLauncher(
            launch_config(), api_client=token_api_client(server.url, server.token)
        ).run()
    assert result.reason == "AllJobsCompleted"
    lines = status_lines(caplog)
    assert [line.split(" (reported ")[0] for line in lines] == [
        "progress 10 %, about 1 h 30 min left; loss 2.1",
        "progress 50 %, about 3 min 20 s left; loss 1.7",
        "progress 100 %, no time left; loss 1.5",
    ], "each new status once, in order"
    assert all(" (reported 20" in line for line in lines)
    assert "[node-0] step 2/2 loss=1.70" in caplog.text, "the pod's log is still followed"


def test_without_trainer_status_the_pod_log_is_the_progress(caplog):
    caplog.set_level(logging.INFO)
    for release in ("v2.1.0", "v2.3.0"):
        with kube_api_server(trainjob_schema(release)) as server:
            TrainJobLauncher(launch_config(), api_client=token_api_client(server.url, server.token)).run()
    assert not [line for line in status_lines(caplog) if line.startswith("progress")]
    assert caplog.text.count("[node-0] step 2/2 loss=1.70") == 2


def test_what_the_trainer_reports_reaches_the_step_log(tmp_path, caplog):
    """The trainer's reporter posts to the status endpoint, the endpoint updates the TrainJob, the launcher's
    polls show it."""
    caplog.set_level(logging.INFO)
    token = tmp_path / "token"
    scenario = Scenario(log_lines=[f"step {i}/40" for i in range(1, 41)], line_interval=0.05)
    with kube_api_server(trainjob_schema("v2.3.0"), scenarios=[scenario], status_endpoint=True) as server:
        token.write_text(server.status_token)

        def trainer() -> None:
            assert server.wait_until(lambda: server.created, timeout=10)
            reporter = StatusReporter(
                server.status_url(NAME, "ml"), token, server.status_ca_file, total_steps=4, every_seconds=0
            )
            for step in range(1, 4):
                reporter.step(step, {"step": step, "loss": 2.0 - step / 4})
                assert server.wait_until(lambda s=step: len(server.status_updates) >= s)
                server.wait_until(lambda: False, timeout=0.2)  # a few polls see it
            reporter.finish(4)

        thread = threading.Thread(target=trainer, daemon=True)
        thread.start()
        TrainJobLauncher(launch_config(), api_client=token_api_client(server.url, server.token)).run()
        thread.join(10)
    shown = [
        line.split(" (reported ")[0].split(", about")[0].split(", no time")[0]
        for line in status_lines(caplog)
    ]
    shown = [line for line in shown if line.startswith("progress")]
    assert shown == ["progress 25 %", "progress 50 %", "progress 75 %", "progress 100 %"]
    assert "; step 3, loss 1.25 (reported " in status_lines(caplog)[-1], "the last step's metrics"


def test_a_trainer_status_as_one_line():
    status = {
        "progressPercentage": 40,
        "estimatedRemainingSeconds": 95,
        "metrics": [{"name": "loss", "value": "1.23"}, {"name": "lr", "value": "2e-05"}],
        "lastUpdatedTime": "2026-01-01T12:00:00Z",
    }
    assert describe_trainer_status(status) == (
        "progress 40 %, about 1 min 35 s left; loss 1.23, lr 2e-05 (reported 2026-01-01T12:00:00Z)"
    )
    assert describe_trainer_status({"lastUpdatedTime": "2026-01-01T12:00:00Z", "metrics": []}) == (
        "trainer status (reported 2026-01-01T12:00:00Z)"
    )
