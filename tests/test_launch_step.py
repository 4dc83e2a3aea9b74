"""A pipeline's training step with either backend: the model ends up in the step's Model artifact."""

from __future__ import annotations

import json

import pytest
import yaml

from kfp_components.launch.manifest import TrainJobConfig
from kfp_components.launch.step import run_training_step, summary_metrics
from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer.config import TrainingConfig

from conftest import SAMPLES
from doubles.kube_server import Scenario, kube_api_server
from doubles.trainjob_schema import trainjob_schema


def config(output_dir) -> TrainingConfig:
    return TrainingConfig(
        model_name_or_path=str(tiny_model_path("qwen2", 0)),
        data_path=str(SAMPLES / "chat.jsonl"),
        output_dir=str(output_dir),
        algorithm="osft",
        torch_dtype="float32",
        max_seq_len=256,
        effective_batch_size=8,
        max_tokens_per_gpu=512,
        max_steps=2,
    )


def test_local_backend_puts_the_model_in_the_artifact_folder(tmp_path):
    result = run_training_step(config(tmp_path / "work"), tmp_path / "artifact" / "model", backend="local")
    assert (tmp_path / "artifact" / "model" / "model.safetensors").exists()
    metrics = summary_metrics(result.summary)
    assert metrics["steps"] == 2.0 and metrics["final_loss"] > 0


def test_trainjob_backend_runs_the_config_from_the_workspace(tmp_path, monkeypatch):
    workspace = tmp_path / "workspace"
    output_dir = workspace / "runs" / "r1" / "train"
    with kube_api_server(
        trainjob_schema("v2.3.0"), scenarios=[Scenario(outcome="complete", log_lines=["step 1/1"])]
    ) as server:
        monkeypatch.setenv("KUBERNETES_SERVER_URL", server.url)
        monkeypatch.setenv("KUBERNETES_AUTH_TOKEN", server.token)
        # The trainer pods write to the shared workspace; this test stands in for them.
        (output_dir / "final").mkdir(parents=True)
        (output_dir / "final" / "config.json").write_text("{}")
        summary = {
            "steps": 3,
            "final_loss": 1.5,
            "mean_loss": 2.0,
            "tokens_per_second": 10.0,
            "duration_seconds": 4.0,
            "samples_seen": 24,
            "tokens_seen": 900,
            "metrics": {},
        }
        (output_dir / "summary.json").write_text(json.dumps(summary))
        trainjob = TrainJobConfig(
            trainer_image="quay.io/example/trainer:1",
            run_id="r1",
            stage="train",
            namespace="ml",
            workspace_pvc="workspace",
            workspace_path=str(workspace),
            trainer_api_version="v2.3",
            poll_interval_seconds=0.05,
        )
        result = run_training_step(
            config(output_dir), tmp_path / "model", backend="trainjob", trainjob=trainjob, timeout_seconds=60
        )
        (created,) = [r.body for r in server.requests_for("POST", "/trainjobs") if r.status == 201]
    assert (tmp_path / "model" / "config.json").exists() and result.summary["steps"] == 3
    assert result.trainjob_name == created["metadata"]["name"]
    args = created["spec"]["trainer"]["args"]
    assert args[:2] == ["--config", str(output_dir / "run.yaml")]
    assert yaml.safe_load((output_dir / "run.yaml").read_text())["algorithm"] == "osft"


def test_unknown_backend_is_refused(tmp_path):
    with pytest.raises(ValueError, match="backend: 'slurm' is not one of local, trainjob"):
        run_training_step(config(tmp_path), tmp_path / "m", backend="slurm")
