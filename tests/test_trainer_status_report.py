"""Progress reported to the Kubeflow Trainer status endpoint, against the local API server's status endpoint.

The endpoint (``tests/doubles/kube_server.py``, ``status_endpoint=True``) serves TLS with a certificate of its
own CA, accepts only its bearer token, checks every body against the release's ``UpdateTrainJobStatusRequest``
model and the CRD's ``status.trainerStatus``, and writes an accepted one to the TrainJob, as the Trainer
controller does. The trainer finds it through the variables the Trainer runtime injects.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from pathlib import Path

import pytest
import yaml

from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.progress import Progress
from kfp_components.trainer.status_report import (
    ENV_SERVER_CA_CERT,
    ENV_SERVER_TOKEN,
    ENV_SERVER_URL,
    StatusReporter,
    metric_entries,
)
from kfp_components.trainer.train import train

from conftest import SAMPLES
from doubles.kube_server import Fault, kube_api_server
from doubles.trainjob_schema import CrdSchema, trainjob_schema

NAME, NAMESPACE = "sft-run", "ml"


def tiny_config(tmp_path: Path, **overrides) -> TrainingConfig:
    options = {
        "model_name_or_path": str(tiny_model_path("qwen2", 0)),
        "data_path": str(SAMPLES / "chat.jsonl"),
        "output_dir": str(tmp_path / "run"),
        "torch_dtype": "float32",
        "max_seq_len": 256,
        "effective_batch_size": 8,
        "max_tokens_per_gpu": 256,
        "learning_rate": 3e-3,
        "lr_scheduler": "constant",
        "max_steps": 4,
        "save_final_model": False,
        "seed": 0,
    }
    options.update(overrides)
    return TrainingConfig(**options)


@pytest.fixture
def endpoint(tmp_path):
    """The status endpoint with a running TrainJob, and the token file the runtime would mount."""
    with kube_api_server(trainjob_schema("v2.3.0"), status_endpoint=True) as server:
        server.store_trainjob(NAME, NAMESPACE)
        token = tmp_path / "token"
        token.write_text(server.status_token + "\n")
        yield server, token


def runtime_env(monkeypatch, server, token: Path, *, ca: bool = True) -> None:
    """The variables Kubeflow Trainer injects into the trainer container."""
    monkeypatch.setenv(ENV_SERVER_URL, server.status_url(NAME, NAMESPACE))
    monkeypatch.setenv(ENV_SERVER_TOKEN, str(token))
    if ca:
        monkeypatch.setenv(ENV_SERVER_CA_CERT, str(server.status_ca_file))
    else:
        monkeypatch.delenv(ENV_SERVER_CA_CERT, raising=False)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # only the runtime's CA may make it trusted


def statuses(server) -> list[dict]:
    return [body["trainerStatus"] for _, _, body in server.status_updates]


def metric(status: dict, name: str) -> str:
    return next(m["value"] for m in status["metrics"] if m["name"] == name)


def test_a_tiny_run_reports_progress_eta_and_metrics_up_to_100_percent(
    tmp_path, endpoint, monkeypatch, caplog
):
    server, token = endpoint
    runtime_env(monkeypatch, server, token)
    caplog.set_level(logging.INFO)
    summary = train(tiny_config(tmp_path))
    assert summary.steps == 4
    sent = statuses(server)
    # at most one update every 30 s: the first step's, then the last one whatever the interval
    assert [s["progressPercentage"] for s in sent] == [25, 100]
    first, last = sent
    assert isinstance(first["estimatedRemainingSeconds"], int) and first["estimatedRemainingSeconds"] >= 0
    assert last["estimatedRemainingSeconds"] == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metric(first, "loss") == format(records[0]["loss"], ".6g") and metric(first, "step") == "1"
    assert metric(last, "loss") == format(records[-1]["loss"], ".6g") and metric(last, "step") == "4"
    assert {"lr", "grad_norm", "tokens_per_second", "epoch"} <= {m["name"] for m in last["metrics"]}
    # every request carried the bearer token over TLS with the runtime's CA, and its body was valid
    assert [r.status for r in server.status_requests] == [200, 200]
    assert server.trainjob(NAME, NAMESPACE)["status"]["trainerStatus"] == last
    assert "reporting progress to the Kubeflow Trainer status endpoint" in caplog.text
    assert server.status_token not in caplog.text


def test_without_the_runtimes_ca_the_endpoint_is_not_trusted_and_training_goes_on(
    tmp_path, endpoint, monkeypatch, caplog
):
    server, token = endpoint
    runtime_env(monkeypatch, server, token, ca=False)
    summary = train(tiny_config(tmp_path))
    assert summary.steps == 4, "a status endpoint that cannot be reached does not stop training"
    assert server.status_updates == [] and server.status_requests == []  # the TLS handshake failed
    warnings = [r.getMessage() for r in caplog.records if "could not report progress" in r.getMessage()]
    assert len(warnings) == 1, "logged once, not at every attempt"
    assert "CERTIFICATE_VERIFY_FAILED" in warnings[0]


def test_a_token_the_endpoint_refuses_is_reported_without_the_token(tmp_path, endpoint, monkeypatch, caplog):
    server, _ = endpoint
    wrong = tmp_path / "wrong-token"
    wrong.write_text("eyJ-not-the-token")
    runtime_env(monkeypatch, server, wrong)
    summary = train(tiny_config(tmp_path))
    assert summary.steps == 4
    assert [r.status for r in server.status_requests] == [403, 403] and server.status_updates == []
    (warning,) = [r.getMessage() for r in caplog.records if "could not report progress" in r.getMessage()]
    assert "HTTP 403 Forbidden" in warning
    assert "eyJ-not-the-token" not in caplog.text


def test_an_endpoint_that_is_down_is_logged_once_and_retried_later(endpoint, caplog):
    server, token = endpoint
    caplog.set_level(logging.INFO)
    server.inject(Fault("POST", "/status", status=503, times=2), Fault("POST", "/status", reset=True))
    now = [0.0]
    reporter = StatusReporter(
        server.status_url(NAME, NAMESPACE),
        token,
        server.status_ca_file,
        total_steps=10,
        every_seconds=30,
        clock=lambda: now[0],
    )
    for step in range(1, 9):  # a step every 10 s: an attempt every 30 s, at steps 1, 4 and 7
        now[0] = 10.0 * step
        reporter.step(step, {"step": step, "loss": 2.0 / step})
        assert server.wait_until(lambda n=(step + 2) // 3: len(server.status_requests) >= n)
    reporter.finish(10)
    assert [r.status for r in server.status_requests] == [503, 503, 0, 200]  # 0: the connection was reset
    assert reporter.failed == 3 and reporter.sent == 1
    assert [s["progressPercentage"] for s in statuses(server)] == [100]
    failures = [r for r in caplog.records if "could not report progress" in r.getMessage()]
    assert len(failures) == 1 and "HTTP 503" in failures[0].getMessage()
    assert "progress reports reach the Kubeflow Trainer status endpoint again" in caplog.text


def test_a_hanging_endpoint_does_not_hold_up_the_steps(endpoint):
    server, token = endpoint
    server.inject(Fault("POST", "/status", delay=3.0))
    reporter = StatusReporter(
        server.status_url(NAME, NAMESPACE), token, server.status_ca_file, total_steps=4, every_seconds=0
    )
    reporter.step(1, {"loss": 1.0})
    assert server.wait_until(lambda: len(server.status_requests) == 1)  # the endpoint holds it
    done = threading.Event()

    def steps() -> None:
        for step in (2, 3):
            reporter.step(step, {"loss": 1.0})
        done.set()

    threading.Thread(target=steps, daemon=True).start()
    assert done.wait(1.0), "the steps went on while the update hung"
    reporter.finish(4, wait_seconds=10)
    # the hung one went through; of those handed over meanwhile only the newest was sent
    assert [s["progressPercentage"] for s in statuses(server)] == [25, 100]


def test_eta_counts_the_steps_of_this_attempt_and_percent_is_rounded_down(endpoint):
    server, token = endpoint
    now = [100.0]
    reporter = StatusReporter(
        server.status_url(NAME, NAMESPACE),
        token,
        server.status_ca_file,
        total_steps=30,
        initial_step=10,  # resumed at step 10
        clock=lambda: now[0],
    )
    now[0] = 106.0
    status = reporter.status(13, now[0])  # 3 steps in 6 s, 17 to go
    assert status["progressPercentage"] == 43 and status["estimatedRemainingSeconds"] == 34
    assert reporter.status(30, now[0])["progressPercentage"] == 100
    reporter.finish(30)


def test_metrics_are_the_numbers_of_the_step_as_text_within_the_crd_bounds():
    record = {
        "step": 7,
        "loss": 1.234567891,
        "lr": 2e-5,
        "grad_norm": None,  # an fp16 overflow
        "step_skipped": False,
        "reward": float("nan"),
        "x" * 65: 1.0,
        "note": "text",
    }
    assert metric_entries(record) == [
        {"name": "step", "value": "7"},
        {"name": "loss", "value": "1.23457"},
        {"name": "lr", "value": "2e-05"},
        {"name": "reward", "value": "nan"},
    ]
    assert len(metric_entries({f"m{i}": i for i in range(300)})) == 256


def test_the_endpoint_refuses_bodies_the_trainer_could_get_wrong(endpoint):
    """The check the tests rely on is not vacuous: the request model and the CRD's bounds both apply."""
    server, _ = endpoint
    assert server.trainer_status_errors({"trainerStatus": {"lastUpdatedTime": "2026-01-01T00:00:00Z"}}) == []
    bad = {
        "trainerStatus": {
            "progressPercentage": 101,
            "estimatedRemainingSeconds": 1.5,
            "metrics": [{"name": "loss", "value": 1.2}],
            "progress": 3,
        }
    }
    errors = "\n".join(server.trainer_status_errors(bad))
    expected = ["estimatedRemainingSeconds", "metrics[0].value", "trainerStatus.progress: unknown field"]
    if isinstance(server.schema, CrdSchema):  # the CRD's bounds and rules, where ../shared/reference has it
        expected += [
            "progressPercentage: 101 is greater than the maximum of 100",
            "lastUpdatedTime is required",
        ]
    for text in expected:
        assert text in errors


def test_no_endpoint_no_reports_and_only_the_main_process_reports(endpoint, monkeypatch):
    server, token = endpoint
    monkeypatch.delenv(ENV_SERVER_URL, raising=False)
    assert Progress(4, enabled=True).status is None
    runtime_env(monkeypatch, server, token)
    assert Progress(4, enabled=False).status is None, "ranks other than 0 never report"
    progress = Progress(4, enabled=True)
    assert progress.status is not None
    progress.close()


@pytest.mark.slow
def test_two_processes_send_the_reports_of_one(tmp_path, endpoint, monkeypatch):
    """Under torchrun only rank 0 reports: the same two updates as one process sends."""
    import subprocess

    server, token = endpoint
    runtime_env(monkeypatch, server, token)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(dict(tiny_config(tmp_path).__dict__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "kfp_components.trainer", "--config", str(run_yaml)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [s["progressPercentage"] for s in statuses(server)] == [25, 100]
