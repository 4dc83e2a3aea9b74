"""A pipeline's training step with either backend: the model ends up in the step's Model artifact."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import yaml

from kfp_components.images import TRAINER_IMAGE
from kfp_components.launch.manifest import TrainJobConfig
from kfp_components.launch.step import (
    run_train_model_step,
    run_training_step,
    step_training_config,
    summary_metrics,
)
from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer.config import TrainingConfig
from kfp_components.typed_config import ConfigError

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
    with pytest.raises(ConfigError, match="backend: expected one of local, trainjob, got 'slurm'"):
        run_training_step(config(tmp_path), tmp_path / "m", backend="slurm")


OPTIONS = {
    "model_name_or_path": str(tiny_model_path("qwen2", 0)),
    "algorithm": "sft",
    "torch_dtype": "float32",
    "max_seq_len": 256,
    "effective_batch_size": 8,
    "max_tokens_per_gpu": 512,
    "max_steps": 2,
    "use_liger": False,
    "learning_rate": 1e-4,
}


def step(tmp_path, backend="local", options=None, training_options=None, trainjob_options=None, **kw):
    return run_train_model_step(
        train_data=SAMPLES / "chat.jsonl",
        eval_data=kw.pop("eval_data", None),
        model_dir=tmp_path / "artifacts" / "model",
        backend=backend,
        options={**OPTIONS, **(options or {})},
        training_options=training_options or {},
        trainjob_options={"workspace_path": str(tmp_path / "workspace"), **(trainjob_options or {})},
        stage="train-sft",
        run_id="r1",
        **kw,
    )


def test_local_step_uses_the_eval_split_and_leaves_no_scratch_copy(tmp_path):
    eval_rows = tmp_path / "eval.jsonl"
    eval_rows.write_text("".join((SAMPLES / "chat.jsonl").read_text().splitlines(keepends=True)[:4]))
    result = step(tmp_path, eval_data=eval_rows)
    assert (tmp_path / "artifacts" / "model" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["model"], "no training copy left"
    assert summary_metrics(result.summary)["eval_loss"] > 0
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")  # train_split_ratio 1.0: no eval split
    assert "eval_loss" not in summary_metrics(step(tmp_path, eval_data=empty).summary)


def test_every_bad_argument_is_reported_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError) as info:
        step(
            tmp_path,
            backend="trainjob",
            options={"lr_scheduler": "cosin", "lora_dropout": 1.5, "torch_dtype": "fp16"},
            training_options={"adam_beta2": 0.999, "learning_rate": 1e-3, "output_dir": "/x", "bogus": 1},
            trainjob_options={"queue_name": "Not_A_Label", "shm_size": "lots"},
        )
    paths = [path for path, _ in info.value.problems]
    assert paths == [
        "training_options.learning_rate",
        "training_options.output_dir",
        "training_options.bogus",
        "torch_dtype",
        "lr_scheduler",
        "shm_size",
        "queue_name",
    ]
    with pytest.raises(ConfigError) as info:
        step(
            tmp_path,
            backend="trainjob",
            options={"lr_scheduler": "cosin", "torch_dtype": "fp16"},
            training_options={"adam_beta2": "high"},
        )
    assert [path for path, _ in info.value.problems] == ["torch_dtype", "adam_beta2", "lr_scheduler"]
    with pytest.raises(ConfigError) as info:
        step(tmp_path, backend="trainjob", trainjob_options={"queue_name": "Not_A_Label", "shm_size": "lots"})
    assert {path for path, _ in info.value.problems} == {"queue_name", "shm_size"}
    with pytest.raises(ConfigError, match=r"lora_target_modules\[0\]: 'qkv' matches no module"):
        step(tmp_path, options={"lora_r": 4, "lora_target_modules": ["qkv"]})
    assert not (tmp_path / "workspace").exists() and not (tmp_path / "artifacts").exists()


def test_training_options_reach_the_trainer_and_resume_is_on_by_default():
    config = step_training_config(
        {"learning_rate": 1e-4},
        {"adam_beta2": 0.999, "lr_scheduler_type": "linear"},
        model_name_or_path="m",
        data_path="d",
        output_dir="o",
    )
    assert (config.adam_beta2, config.lr_scheduler, config.learning_rate, config.resume) == (
        0.999,
        "linear",
        1e-4,
        True,
    )
    assert (
        step_training_config(
            {}, {"resume": False}, model_name_or_path="m", data_path="d", output_dir="o"
        ).resume
        is False
    )
    with pytest.raises(
        ConfigError, match=r"training_options.lr_scheduler_type: has its own argument, lr_scheduler"
    ):
        step_training_config({"lr_scheduler": "cosine"}, {"lr_scheduler_type": "linear"}, data_path="d")


def test_trainjob_step_defaults_to_the_trainer_image_and_stages_the_data(tmp_path, monkeypatch):
    work = tmp_path / "workspace" / "runs" / "r1" / "train-sft"
    with kube_api_server(trainjob_schema("v2.3.0"), scenarios=[Scenario(outcome="complete")]) as server:
        monkeypatch.setenv("KUBERNETES_SERVER_URL", server.url)
        monkeypatch.setenv("KUBERNETES_AUTH_TOKEN", server.token)
        (work / "final").mkdir(parents=True)  # what the trainer pods write on the shared workspace
        (work / "final" / "config.json").write_text("{}")
        summary = {"steps": 1, "final_loss": 1.0, "mean_loss": 1.0, "tokens_per_second": 1.0}
        summary |= {"duration_seconds": 1.0, "samples_seen": 8, "tokens_seen": 99, "metrics": {}}
        (work / "summary.json").write_text(json.dumps(summary))
        step(
            tmp_path,
            backend="trainjob",
            trainjob_options={
                "trainer_image": "",
                "namespace": "ml",
                "workspace_pvc": "ws",
                "trainer_api_version": "v2.3",
                "poll_interval_seconds": 0.05,
            },
        )
        (created,) = [r.body for r in server.requests_for("POST", "/trainjobs") if r.status == 201]
    assert created["spec"]["trainer"]["image"] == TRAINER_IMAGE, (
        "an empty image is the package's trainer image"
    )
    assert (work / "data" / "train.jsonl").read_bytes() == (SAMPLES / "chat.jsonl").read_bytes()
    run = yaml.safe_load((work / "run.yaml").read_text())
    assert run["data_path"] == str(work / "data" / "train.jsonl") and run["resume"] is True
    assert (tmp_path / "artifacts" / "model" / "config.json").is_file()


def test_a_model_on_the_workspace_is_given_to_the_workers_as_its_mounted_path(tmp_path):
    from kfp_components.launch.step import workers_model_reference

    assert (
        workers_model_reference("pvc://ws/models/base", "ws", "/workspace", "trainjob")
        == "/workspace/models/base"
    )
    assert workers_model_reference("Qwen/Qwen2.5-0.5B", "ws", "/workspace", "trainjob") == "Qwen/Qwen2.5-0.5B"
    for reference in ("pvc://other/models/base", "s3://bucket/models/base"):
        with pytest.raises(ConfigError, match=r"model_name_or_path: .*put the model on the workspace volume"):
            workers_model_reference(reference, "ws", "/workspace", "trainjob")
    model = tmp_path / "workspace" / "models" / "tiny"
    shutil.copytree(tiny_model_path("qwen2", 0), model)
    step(
        tmp_path,
        options={"model_name_or_path": "pvc://ws/models/tiny"},
        trainjob_options={"workspace_pvc": "ws"},
    )
    assert (tmp_path / "artifacts" / "model" / "model.safetensors").is_file()


def test_a_judges_token_secret_reaches_the_workers_as_its_variable(tmp_path, monkeypatch):
    """A reward endpoint's or a judge's ``token_secret`` becomes a secretKeyRef of the TrainJob's workers,
    under the variable its ``token_env`` names; no value is written anywhere."""
    workspace = tmp_path / "workspace"
    output_dir = workspace / "runs" / "r1" / "rl"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "2 + 2?", "answer": "4"}) + "\n")
    judge = {
        "function": "judge",
        "base_url": "http://judge.models.svc:8000/v1",
        "model": "judge",
        "token_env": "JUDGE_API_KEY",
        "token_secret": "judge-credentials/api-key",
    }
    endpoint = {
        "function": "http",
        "url": "http://scorer:8080/score",
        "token_env": "SCORER_TOKEN",
        "token_secret": "scorer",
    }
    online = TrainingConfig(
        model_name_or_path=str(tiny_model_path("qwen2", 0)),
        data_path=str(prompts),
        output_dir=str(output_dir),
        algorithm="grpo",
        reward_functions=[judge, endpoint],
        num_generations=2,
        effective_batch_size=2,
        max_seq_len=256,
        max_new_tokens=8,
        max_tokens_per_gpu=512,
        max_steps=1,
    )
    with kube_api_server(trainjob_schema("v2.3.0"), scenarios=[Scenario(outcome="complete")]) as server:
        monkeypatch.setenv("KUBERNETES_SERVER_URL", server.url)
        monkeypatch.setenv("KUBERNETES_AUTH_TOKEN", server.token)
        (output_dir / "final").mkdir(parents=True)  # what the trainer pods write on the shared workspace
        (output_dir / "final" / "config.json").write_text("{}")
        summary = {"steps": 1, "final_loss": 0.0, "mean_loss": 0.0, "tokens_per_second": 1.0, "metrics": {}}
        (output_dir / "summary.json").write_text(json.dumps(summary))
        trainjob = TrainJobConfig(
            trainer_image="quay.io/example/trainer:1",
            run_id="r1",
            stage="rl",
            namespace="ml",
            workspace_pvc="workspace",
            workspace_path=str(workspace),
            trainer_api_version="v2.3",
            poll_interval_seconds=0.05,
        )
        run_training_step(
            online, tmp_path / "model", backend="trainjob", trainjob=trainjob, timeout_seconds=60
        )
        (created,) = [r.body for r in server.requests_for("POST", "/trainjobs") if r.status == 201]
    env = {item["name"]: item for item in created["spec"]["trainer"]["env"]}
    assert env["JUDGE_API_KEY"] == {
        "name": "JUDGE_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "judge-credentials", "key": "api-key"}},
    }
    assert env["SCORER_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "scorer",
        "key": "SCORER_TOKEN",
    }


@pytest.mark.parametrize(
    ("token_env", "token_secret", "message"),
    [
        ("", "judge-credentials", "needs token_env"),
        ("JUDGE_API_KEY", "Judge_Credentials", "Kubernetes name"),
    ],
)
def test_bad_token_secrets_are_config_errors(token_env, token_secret, message):
    from kfp_components.rewards import parse_references

    judge = {
        "function": "judge",
        "base_url": "http://judge:8000/v1",
        "model": "judge",
        "token_env": token_env,
    }
    with pytest.raises(ConfigError, match=rf"reward_functions\[0\]\.token_secret: .*{message}"):
        parse_references([{**judge, "token_secret": token_secret}], None)


def test_the_launching_step_leaves_a_secret_key_to_the_workers(tmp_path, monkeypatch):
    """A judge whose key comes from a Secret on the workers: the launching step (without the key) does not
    try to build it; a local run, which trains here, still needs the variable."""
    from kfp_components.launch.step import _preflight_problems, keys_only_on_workers

    monkeypatch.delenv("JUDGE_API_KEY", raising=False)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "2 + 2?", "answer": "4"}) + "\n")
    judge = {
        "function": "judge",
        "base_url": "http://127.0.0.1:9/v1",
        "model": "judge",
        "token_env": "JUDGE_API_KEY",
        "token_secret": "judge-credentials",
    }
    online = replace(
        config(tmp_path / "out"),
        algorithm="grpo",
        data_path=str(prompts),
        reward_functions=[judge],
        num_generations=2,
        effective_batch_size=2,
        max_new_tokens=8,
    )
    assert keys_only_on_workers(online) == ["JUDGE_API_KEY"]
    assert not [
        p for p in _preflight_problems(online, prompts, None, "trainjob") if p[0] == "reward_functions"
    ]
    local = _preflight_problems(online, prompts, None, "local")
    assert any(key == "reward_functions" and "JUDGE_API_KEY" in message for key, message in local), local
    monkeypatch.setenv("JUDGE_API_KEY", "sk-set-here")
    assert keys_only_on_workers(online) == []
