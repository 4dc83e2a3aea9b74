"""The TrainJob launcher against the schemas of Kubeflow Trainer v2.1.0 and v2.3.0 and a local API server.

Every manifest the launcher builds is checked the way a strict API server would check it (unknown fields,
types, patterns, the name rules); the server in ``tests/doubles/kube_server.py`` checks every TrainJob it is
sent the same way and plays the controller. The schema of a release is its CRD from the reference folder
(``shared/reference`` beside the project, never copied into it; see ``doubles.reference``) where present,
else the release's official ``kubeflow-trainer-api`` models (see ``doubles.trainjob_schema``); the tests run
either way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kfp_components.launch.kube import (
    ENV_AUTH_TOKEN,
    ENV_SERVER_URL,
    KubeCredentialsError,
    api_client_from_environment,
    token_api_client,
)
from kfp_components.launch.manifest import (
    POD_TEMPLATE_OVERRIDES,
    RUNTIME_PATCHES,
    SPEC_HASH_ANNOTATION,
    build_trainjob,
    label_value,
    max_trainjob_name_length,
    shape_for_version,
    shape_from_crd,
    trainjob_name,
)
from kfp_components.launch.trainjob import (
    SecretEnv,
    Toleration,
    TrainJobConfig,
    TrainJobError,
    TrainJobFailed,
    TrainJobLauncher,
    TrainJobTimeout,
)
from kfp_components.typed_config import ConfigError, from_dict

from doubles import reference
from doubles.kube_server import Scenario, kube_api_server
from doubles.trainjob_schema import (
    RELEASES,
    ApiModelSchema,
    CrdSchema,
    TrainJobSchema,
    api_server_errors,
    trainjob_schema,
)

VERSIONS = RELEASES
REPO = Path(__file__).resolve().parents[1]
RUN_ID = "0f9c0d7e-1234-4a5b-8c9d-0123456789ab"


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


def full_config(**overrides) -> TrainJobConfig:
    """Every option that changes the manifest."""
    options = dict(
        trainer_flags={"learning_rate": 2e-5, "lora_target_modules": ["q_proj", "v_proj"], "unmask": True},
        num_nodes=2,
        gpus_per_node=8,
        cpu="16",
        memory="128Gi",
        node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        tolerations=[
            Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"),
            Toleration(key="spot", value="true", effect="NoExecute", toleration_seconds=300),
        ],
        env={"NCCL_DEBUG": "INFO", "TOKENIZERS_PARALLELISM": "false"},
        secret_env=[
            SecretEnv("HF_TOKEN", "hf-token", "token"),
            SecretEnv("AWS_SECRET_ACCESS_KEY", "s3", "key"),
        ],
        labels={"team": "llm"},
        annotations={"example.com/owner": "fine-tuning"},
        queue_name="gpu-queue",
        image_pull_secrets=["registry-pull"],
        shm_size="32Gi",
    )
    options.update(overrides)
    return launch_config(**options)


@contextlib.contextmanager
def cluster(version: str | TrainJobSchema = "v2.3.0", **server_options):
    """A local API server serving ``version``'s TrainJob schema, and a client with its token."""
    schema = trainjob_schema(version) if isinstance(version, str) else version
    with kube_api_server(schema, **server_options) as server:
        yield server, token_api_client(server.url, server.token)


def created_bodies(server) -> list[dict]:
    return [r.body for r in server.requests_for("POST", "/trainjobs") if r.status == 201]


def deletes(server) -> list:
    return server.requests_for("DELETE", "/trainjobs/")


# ----------------------------------------------------------------------------------------------- names


def test_names_are_deterministic_dns_labels_with_a_hash_when_cut():
    assert trainjob_name(RUN_ID, "sft") == f"sft-{RUN_ID}"  # 40 characters: kept whole
    long = trainjob_name(RUN_ID, "osft")
    assert long == trainjob_name(RUN_ID, "osft") and len(long) == 40
    assert long.startswith("osft-0f9c0d7e-1234-4a5b-8c9d-") and long[-9] == "-"
    assert trainjob_name("run-a" * 10, "dpo") != trainjob_name("run-a" * 10 + "x", "dpo"), (
        "cut names stay distinct"
    )
    assert trainjob_name("My_Run.7", "DPO Stage") == "dpo-stage-my-run-7"
    assert trainjob_name("abc", "1st") == "tj-1st-abc", "an RFC 1035 label starts with a letter"
    for name in (long, trainjob_name("x" * 200, "stage_" * 20), trainjob_name("--", "--")):
        assert len(name) <= 40 and name[0].isalpha() and name[-1] != "-"
        assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
    assert max_trainjob_name_length(1) == 48 and max_trainjob_name_length(101) == 46
    value = label_value("pipeline/" + "x" * 100)
    assert len(value) == 63 and value == label_value("pipeline/" + "x" * 100) and value[0].isalnum()


def test_an_explicit_name_must_fit_the_pod_names():
    with pytest.raises(ConfigError, match=r"name.*at most 48"):
        launch_config(name="a" * 49).validate()
    with pytest.raises(ConfigError, match=r"name.*start with a letter"):
        launch_config(name="1-train").validate()
    with pytest.raises(ConfigError, match="run_id and stage"):
        launch_config(run_id="").validate()


# ------------------------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_shape_passes_the_crd_schema(version):
    schema = trainjob_schema(version)
    shape = shape_from_crd(schema.crd())
    assert shape == shape_for_version(version)
    configs = [
        full_config(),
        launch_config(),
        launch_config(gpus_per_node=0, workspace_pvc="", cpu="2", memory="8Gi"),  # CPU-only, no volume
        launch_config(
            runtime_kind="TrainingRuntime", runtime_name="my-torch", trainer_flags={"max_steps": 5}
        ),
        launch_config(
            config_path="", trainer_flags={"model_name_or_path": "m", "data_path": "d", "output_dir": "o"}
        ),
        full_config(name="explicit-name", run_id="", stage="", torchrun_args=["--max-restarts=2"]),
    ]
    for config in configs:
        config.validate()
        name = config.name or trainjob_name(config.run_id, config.stage)
        manifest = build_trainjob(config, name=name, namespace="ml", shape=shape)
        assert api_server_errors(manifest, schema) == [], config


def test_v2_3_has_no_spec_labels_and_patches_the_pods_instead():
    manifest = build_trainjob(full_config(), name="sft-x", namespace="ml", shape=RUNTIME_PATCHES)
    spec = manifest["spec"]
    assert not {"labels", "annotations", "podTemplateOverrides"} & set(spec)
    assert spec["activeDeadlineSeconds"] == 20, "the controller enforces timeout_seconds too"
    assert manifest["metadata"]["labels"]["team"] == "llm", "labels go on the TrainJob itself"
    assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    (patch,) = spec["runtimePatches"]
    template = patch["trainingRuntimeSpec"]["template"]
    assert template["metadata"]["labels"]["team"] == "llm", "JobSet labels"
    assert "kueue.x-k8s.io/queue-name" not in str(spec), "the queue labels the TrainJob only"
    (job,) = template["spec"]["replicatedJobs"]
    assert job["name"] == "node" and job["template"]["metadata"]["labels"]["team"] == "llm", "Job labels"
    pod = job["template"]["spec"]["template"]
    assert pod["metadata"]["labels"]["team"] == "llm"
    assert pod["metadata"]["annotations"] == {"example.com/owner": "fine-tuning"}
    assert pod["spec"]["volumes"] == [
        {"name": "workspace", "persistentVolumeClaim": {"claimName": "workspace-pvc"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}},
    ]
    assert pod["spec"]["containers"] == [
        {
            "name": "node",
            "volumeMounts": [
                {"name": "workspace", "mountPath": "/workspace"},
                {"name": "dshm", "mountPath": "/dev/shm"},
            ],
        }
    ]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "registry-pull"}]
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["spec"]["tolerations"][1] == {
        "operator": "Equal",
        "key": "spot",
        "value": "true",
        "effect": "NoExecute",
        "tolerationSeconds": 300,
    }


def test_v2_1_uses_spec_labels_and_pod_template_overrides():
    manifest = build_trainjob(full_config(), name="sft-x", namespace="ml", shape=POD_TEMPLATE_OVERRIDES)
    spec = manifest["spec"]
    assert "runtimePatches" not in spec and spec["labels"]["team"] == "llm"
    assert "activeDeadlineSeconds" not in spec, "new in v2.2"
    assert spec["annotations"] == {"example.com/owner": "fine-tuning"}
    (override,) = spec["podTemplateOverrides"]
    assert override["targetJobs"] == [{"name": "node"}]
    assert override["metadata"]["labels"]["team"] == "llm"
    assert manifest["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert "kueue.x-k8s.io/queue-name" not in str(spec), "the queue labels the TrainJob only"
    assert override["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] == "/workspace"
    assert override["spec"]["imagePullSecrets"] == [{"name": "registry-pull"}]


def test_trainer_runs_torchrun_with_the_module_and_resources_per_node():
    trainer = build_trainjob(full_config(), name="sft-x", namespace="ml", shape=RUNTIME_PATCHES)["spec"][
        "trainer"
    ]
    assert trainer["command"] == ["torchrun", "-m", "kfp_components.trainer"], "topology comes from PET_* env"
    assert trainer["args"] == [
        "--config",
        "/workspace/sft/run.yaml",
        "--learning_rate",
        "2e-05",
        "--lora_target_modules",
        "q_proj",
        "v_proj",
        "--unmask",
        "true",
    ]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"] == {
        "requests": {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": "8"},
        "limits": {"memory": "128Gi", "nvidia.com/gpu": "8"},
    }
    assert {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}},
    } in trainer["env"]
    assert not any(e["name"].startswith("PET_") for e in trainer["env"])


def test_the_schema_check_is_not_vacuous():
    """The wrong shape, unknown fields and wrong types are refused, by the CRD files and by the models."""
    v21, v23 = trainjob_schema("v2.1.0"), trainjob_schema("v2.3.0")
    assert_refuses_bad_manifests(v21, v23)
    if isinstance(v23, CrdSchema):  # the CRD's own rules, which the models do not carry
        manifest = build_trainjob(full_config(), name="1-sft", namespace="ml", shape=RUNTIME_PATCHES)
        assert any("RFC 1035" in e for e in api_server_errors(manifest, v23))


@pytest.mark.parametrize("version", VERSIONS)
def test_the_models_accept_every_manifest_the_crd_does(version):
    """Where the CRDs are present, the models (used where they are absent) agree on every manifest."""
    models = ApiModelSchema(version)
    assert shape_from_crd(models.crd()) == shape_for_version(version)
    for config in (full_config(), launch_config(), launch_config(gpus_per_node=0, workspace_pvc="")):
        manifest = build_trainjob(config, name="sft-x", namespace="ml", shape=shape_for_version(version))
        assert api_server_errors(manifest, models) == [], config


def test_the_models_refuse_unknown_fields_and_wrong_types():
    """The models are strict however the reference folder is set up: dropped keys are unknown fields."""
    assert_refuses_bad_manifests(ApiModelSchema("v2.1.0"), ApiModelSchema("v2.3.0"))
    manifest = build_trainjob(full_config(), name="sft-x", namespace="ml", shape=RUNTIME_PATCHES)
    manifest["spec"]["trainer"]["env"][0]["valueFrom"] = {"secretKeyRef": {"name": "s", "key": "k", "x": 1}}
    manifest["spec"]["trainer"]["resourcesPerNode"]["requests"]["cpu"] = ["16"]
    manifest["spec"]["trainer"]["numNodes"] = True
    manifest["spec"]["runtimeRef"] = {"apiGroup": "trainer.kubeflow.org"}
    errors = api_server_errors(manifest, ApiModelSchema("v2.3.0"))
    assert (
        'spec.trainer.env[0].valueFrom.secretKeyRef.x: unknown field "spec.trainer.env[0].valueFrom.secretKeyRef.x"'
        in errors
    )
    assert any(e.startswith("spec.trainer.resourcesPerNode.requests.cpu: ") for e in errors), errors
    assert "spec.trainer.numNodes: Input should be a valid integer" in errors
    assert "spec.runtimeRef.name: Field required" in errors


def assert_refuses_bad_manifests(v21: TrainJobSchema, v23: TrainJobSchema) -> None:
    old_shape = build_trainjob(full_config(), name="sft-x", namespace="ml", shape=POD_TEMPLATE_OVERRIDES)
    assert {
        'spec.labels: unknown field "spec.labels"',
        'spec.podTemplateOverrides: unknown field "spec.podTemplateOverrides"',
    } <= set(api_server_errors(old_shape, v23))
    new_shape = build_trainjob(full_config(), name="sft-x", namespace="ml", shape=RUNTIME_PATCHES)
    assert any("runtimePatches" in e for e in api_server_errors(new_shape, v21))
    new_shape["spec"]["trainer"]["numProcPerNode"] = "auto"
    assert any("numProcPerNode" in e and "integer" in e for e in api_server_errors(new_shape, v23))
    old_shape["spec"]["trainer"]["numProcPerNode"] = "auto"
    assert api_server_errors(old_shape, v21) == [], "v2.1 took auto/cpu/gpu too"
    new_shape["spec"]["trainer"]["numProcPerNode"] = 8
    new_shape["spec"]["trainer"]["colour"] = "blue"
    assert 'spec.trainer.colour: unknown field "spec.trainer.colour"' in api_server_errors(new_shape, v23)
    new_shape["metadata"]["name"] = "Not_A_Name"
    assert any(e.startswith("metadata.name: Invalid value") for e in api_server_errors(new_shape, v23))


@pytest.mark.parametrize("version", VERSIONS)
def test_the_torch_runtime_has_the_node_job_and_container(version):
    """The launcher targets replicated job ``node`` and container ``node`` of ``torch-distributed``.

    Where the reference folder has the release's runtime, these facts are read from it; the runtime (either
    that one or the one the launcher assumes) must also be a valid ClusterTrainingRuntime of the release.
    """
    path = reference.torch_runtime_file(version)
    runtime = yaml.safe_load(path.read_text()) if path else assumed_torch_runtime()
    assert api_server_errors(runtime, ApiModelSchema(version, "TrainerV1alpha1ClusterTrainingRuntime")) == []
    assert runtime["kind"] == "ClusterTrainingRuntime" and runtime["metadata"]["name"] == "torch-distributed"
    assert "torch" in runtime["spec"]["mlPolicy"]
    (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == "node"
    (container,) = job["template"]["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "node" and "command" not in container, "the runtime gives no command"


def assumed_torch_runtime() -> dict:
    """The parts of ``torch-distributed`` the launcher relies on."""
    container = {"name": "node", "image": "pytorch/pytorch"}
    pod = {"spec": {"containers": [container]}}
    job = {"name": "node", "template": {"spec": {"template": pod}}}
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "ClusterTrainingRuntime",
        "metadata": {"name": "torch-distributed"},
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {}},
            "template": {"spec": {"replicatedJobs": [job]}},
        },
    }


# --------------------------------------------------------------------------------------- env and secrets


def test_pet_env_is_refused_before_any_request():
    with pytest.raises(ConfigError, match=r"env\.PET_NNODES: .*belong to the training runtime"):
        launch_config(env={"PET_NNODES": "2"}).validate()
    with pytest.raises(ConfigError, match="PET_"):
        launch_config(secret_env=[SecretEnv("PET_MASTER_ADDR", "s", "k")]).validate()
    with pytest.raises(ConfigError, match=r"torchrun_args.*--nproc_per_node"):
        launch_config(torchrun_args=["--nproc_per_node=4"]).validate()


def test_a_literal_secret_is_refused_and_never_quoted():
    with pytest.raises(ConfigError, match=r"env\.HF_TOKEN: looks like a secret") as error:
        TrainJobLauncher(launch_config(env={"HF_TOKEN": "hf_literal_value"}), api_client=client.ApiClient())
    assert "hf_literal_value" not in str(error.value)
    for name in ("AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "WANDB_API_KEY", "my_token"):
        with pytest.raises(ConfigError, match="secret_env"):
            launch_config(env={name: "x"}).validate()
    launch_config(
        env={"TOKENIZERS_PARALLELISM": "false", "CACHE_KEY": "v1"}, allow_literal_env=["CACHE_KEY"]
    ).validate()
    with pytest.raises(ConfigError, match=r"env\.HF_TOKEN"):  # the YAML / component path too
        from_dict(
            TrainJobConfig, {"trainer_image": "i", "config_path": "c", "name": "n", "env": {"HF_TOKEN": "v"}}
        )


def test_secrets_reach_the_trainjob_only_as_secret_key_refs(monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("HF_TOKEN", "hf_value_that_must_not_leak")
    config = launch_config(secret_env=[SecretEnv("HF_TOKEN", "hf-token", "token", optional=True)])
    with cluster() as (server, api):
        TrainJobLauncher(config, api_client=api).run()
        (body,) = created_bodies(server)
        assert {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token", "optional": True}},
        } in body["spec"]["trainer"]["env"]
        assert not any("hf_value_that_must_not_leak" in r.raw_body for r in server.requests)
    assert "hf_value_that_must_not_leak" not in caplog.text


# ------------------------------------------------------------------------------------------- lifecycle


def test_success_streams_the_trainer_log(caplog):
    caplog.set_level(logging.INFO)
    with cluster() as (server, api):
        launcher = TrainJobLauncher(launch_config(), api_client=api)
        result = launcher.run()
        assert result.name == f"sft-{RUN_ID}" and result.namespace == "ml" and not result.adopted
        assert result.reason == "AllJobsCompleted"
        assert result.log_tail == [
            "loading model",
            "step 1/2 loss=2.10",
            "step 2/2 loss=1.70",
            "saved final model",
        ]
        assert deletes(server) == [], "a completed TrainJob is kept unless delete_on_success"
        (_body,) = created_bodies(server)
        assert server.requests_for("POST", "/trainjobs")[0].query["fieldValidation"] == ["Strict"]
        (log_request,) = [r for r in server.requests_for("GET", "/log") if r.status == 200]
        assert log_request.query["container"] == ["node"] and log_request.query["follow"][0].lower() == "true"
        pods = server.requests_for("GET", "/pods")[0].query["labelSelector"][0]
        assert f"jobset.sigs.k8s.io/jobset-name={result.name}" in pods
        assert "batch.kubernetes.io/job-completion-index=0" in pods
    assert "[node-0] step 2/2 loss=1.70" in caplog.text, "the trainer's lines reach this step's log"


def test_delete_on_success():
    with cluster() as (server, api):
        TrainJobLauncher(launch_config(delete_on_success=True), api_client=api).run()
        assert len(deletes(server)) == 1


def test_failure_reports_reason_and_last_lines_and_deletes():
    lines = [
        "loading model",
        "step 1/9 loss=2.3",
        "Traceback (most recent call last):",
        "torch.OutOfMemoryError: CUDA",
    ]
    scenario = Scenario(
        outcome="fail", log_lines=lines, fail_reason="ReachedMaxRestarts", fail_message="max restarts"
    )
    with cluster(scenarios=[scenario]) as (server, api):
        launcher = TrainJobLauncher(launch_config(tail_lines=2), api_client=api)
        with pytest.raises(TrainJobFailed) as error:
            launcher.run()
        assert error.value.reason == "ReachedMaxRestarts"
        assert "ReachedMaxRestarts: max restarts" in str(error.value)
        assert str(error.value).endswith("Traceback (most recent call last):\ntorch.OutOfMemoryError: CUDA")
        assert error.value.log_tail == lines[-2:]
        (delete,) = deletes(server)
        assert delete.path.endswith(f"/namespaces/ml/trainjobs/{launcher.name}")
        # with a body, the API server reads the delete options from it alone
        assert delete.query["propagationPolicy"] == ["Foreground"]
        assert delete.body["propagationPolicy"] == "Foreground"
        assert delete.body["preconditions"] == {"uid": server.created_uids[0]}, "only the one we created"
        assert server.wait_until(lambda: server.trainjob(launcher.name, "ml") is None, 5)


def test_timeout_deletes_the_trainjob():
    with cluster(scenarios=[Scenario(outcome="never")]) as (server, api):
        launcher = TrainJobLauncher(launch_config(timeout_seconds=0.5), api_client=api)
        started = time.monotonic()
        with pytest.raises(
            TrainJobTimeout, match=r"did not finish within 0.5 s(.|\n)*still training"
        ) as error:
            launcher.run()
        assert time.monotonic() - started < 5
        assert error.value.log_tail and len(deletes(server)) == 1


def test_sigterm_deletes_the_trainjob_and_exits_non_zero(tmp_path):
    """A cancelled step: the launcher process gets SIGTERM while waiting."""
    with cluster(scenarios=[Scenario(outcome="never")]) as (server, _):
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
                    "secret_env": [{"name": "HF_TOKEN", "secret": "hf-token", "key": "token"}],
                }
            )
        )
        env = {**os.environ, ENV_SERVER_URL: server.url, ENV_AUTH_TOKEN: server.token}
        process = subprocess.Popen(
            [sys.executable, "-m", "kfp_components.launch.trainjob", "--config", str(config_file)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            streaming = server.wait_until(
                lambda: any(r.status == 200 for r in server.requests_for("GET", "/log")), 30
            )
            assert streaming, "the launcher never started to follow the trainer's log"
            time.sleep(0.5)  # a few lines reach the launcher
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
        assert process.returncode == 128 + signal.SIGTERM, output
        (delete,) = deletes(server)
        assert delete.body["propagationPolicy"] == "Foreground"
        assert delete.body["preconditions"] == {"uid": server.created_uids[0]}
        assert server.wait_until(lambda: server.trainjob(f"sft-{RUN_ID}", "ml") is None, 5)
        assert "cancelled (SIGTERM)" in output and "still training" in output
        assert server.token not in output


def test_restart_follows_the_newest_pod():
    scenario = Scenario(
        restart=True, log_lines=["attempt 2 starting", "step 1/1 loss=1.0", "done"], line_interval=0.05
    )
    with cluster(scenarios=[scenario]) as (server, api):
        result = TrainJobLauncher(launch_config(), api_client=api).run()
        assert result.log_tail == [
            "attempt 1 starting",
            "RuntimeError: NCCL timeout",
            "attempt 2 starting",
            "step 1/1 loss=1.0",
            "done",
        ]
        followed = {r.path.split("/")[-2] for r in server.requests_for("GET", "/log") if r.status == 200}
        assert len(followed) == 2, "the log of the first pod, then of the newer one"


def test_suspended_is_waiting_not_failure(caplog):
    caplog.set_level(logging.INFO)
    with cluster(scenarios=[Scenario(suspend_seconds=0.3)]) as (_, api):
        result = TrainJobLauncher(launch_config(), api_client=api).run()
    assert result.reason == "AllJobsCompleted"
    assert "is suspended (Suspended: TrainJob is suspended): waiting" in caplog.text
    assert "resumed" in caplog.text


# ------------------------------------------------------------------------------------------------ reruns


def test_a_rerun_adopts_the_running_trainjob():
    scenario = Scenario(log_lines=[f"step {i}" for i in range(10)], line_interval=0.03)
    with cluster(scenarios=[scenario]) as (server, api):
        TrainJobLauncher(launch_config(), api_client=api).submit()  # the first attempt of the step dies here
        result = TrainJobLauncher(launch_config(), api_client=api).run()
        assert result.adopted and result.reason == "AllJobsCompleted" and result.log_tail[-1] == "step 9"
        assert len(server.created) == 1, "no second TrainJob"
        assert [r.status for r in server.requests_for("POST", "/trainjobs")] == [201, 409]


def test_a_rerun_of_a_completed_trainjob_succeeds_without_resubmitting():
    with cluster() as (server, api):
        TrainJobLauncher(launch_config(), api_client=api).run()
        logs_before = len(server.requests_for("GET", "/log"))
        result = TrainJobLauncher(launch_config(), api_client=api).run()
        assert result.adopted and result.reason == "AllJobsCompleted"
        assert len(server.created) == 1 and deletes(server) == []
        assert len(server.requests_for("GET", "/log")) == logs_before, "nothing to wait for"


def test_a_rerun_of_a_failed_trainjob_resubmits_it():
    with cluster(scenarios=[Scenario(outcome="fail"), Scenario()]) as (server, api):
        first = TrainJobLauncher(launch_config(), api_client=api)
        first.submit()
        assert server.wait_until(lambda: "Failed" in str(server.trainjob(first.name, "ml")["status"]), 5)
        result = TrainJobLauncher(launch_config(), api_client=api).run()
        assert not result.adopted and result.reason == "AllJobsCompleted"
        assert server.created == [first.name, first.name] and len(deletes(server)) == 1


def test_a_rerun_of_a_failed_trainjob_can_report_it_instead():
    with cluster(scenarios=[Scenario(outcome="fail")]) as (server, api):
        TrainJobLauncher(launch_config(), api_client=api).submit()
        name = server.created[0]
        assert server.wait_until(lambda: "Failed" in str(server.trainjob(name, "ml")["status"]), 5)
        with pytest.raises(TrainJobFailed, match="earlier attempt failed \\(FailedJobs: jobset failed"):
            TrainJobLauncher(launch_config(on_existing_failed="fail"), api_client=api).run()
        assert server.created == [name] and deletes(server) == [], "left for inspection"


def test_a_trainjob_of_the_same_name_with_another_spec_is_not_adopted():
    with cluster() as (server, api):
        TrainJobLauncher(launch_config(), api_client=api).run()
        with pytest.raises(TrainJobError, match="exists with a different spec"):
            TrainJobLauncher(launch_config(num_nodes=2), api_client=api).run()
        assert len(server.created) == 1 and deletes(server) == []
        stored = server.trainjob(server.created[0], "ml")
        assert stored["metadata"]["annotations"][SPEC_HASH_ANNOTATION]


# ------------------------------------------------------------------------------------ versions and errors


@pytest.mark.parametrize(
    ("version", "field"), [("v2.1.0", "podTemplateOverrides"), ("v2.3.0", "runtimePatches")]
)
def test_auto_detects_the_served_crd_version(version, field):
    with cluster(version) as (server, api):
        launcher = TrainJobLauncher(launch_config(), api_client=api)
        result = launcher.run()
        assert result.reason == "AllJobsCompleted"
        (body,) = created_bodies(server)
        assert field in body["spec"] and launcher.shape() == field
        assert (
            len(server.requests_for("GET", "/customresourcedefinitions/trainjobs.trainer.kubeflow.org")) == 1
        )
        pods = (
            client.CoreV1Api(api).list_namespaced_pod("ml", label_selector="kfp-components/stage=sft").items
        )
        assert pods, "the pod labels of either shape reach the pods"


def test_unreadable_crd_is_reported_and_the_option_decides(caplog):
    caplog.set_level(logging.WARNING)
    with cluster("v2.3.0", crd_readable=False) as (server, api):
        TrainJobLauncher(launch_config(), api_client=api).run()
        assert "runtimePatches" in created_bodies(server)[0]["spec"]
    assert "cannot read the CRD trainjobs.trainer.kubeflow.org" in caplog.text and "403" in caplog.text
    assert "assuming v2.3" in caplog.text
    with cluster("v2.1.0", crd_readable=False) as (server, api):
        TrainJobLauncher(launch_config(trainer_api_version="v2.1"), api_client=api).run()
        assert "podTemplateOverrides" in created_bodies(server)[0]["spec"]
        assert server.requests_for("GET", "/customresourcedefinitions/") == [], (
            "an explicit version is trusted"
        )


def test_a_wrong_explicit_version_fails_loudly_instead_of_dropping_fields():
    with cluster("v2.1.0") as (server, api):
        with pytest.raises(
            TrainJobError,
            match=r'(?s)400 Bad Request: strict decoding error: .*unknown field "spec.runtimePatches".*trainer_api_version',
        ):
            TrainJobLauncher(launch_config(trainer_api_version="v2.3"), api_client=api).run()
        assert server.created == []


def test_a_bad_token_is_a_clear_401():
    with cluster() as (server, _):
        api = token_api_client(server.url, "not-the-token")
        with pytest.raises(TrainJobError, match=r"401 Unauthorized: Unauthorized.*KUBERNETES_AUTH_TOKEN"):
            TrainJobLauncher(launch_config(), api_client=api).run()
        assert server.created == [] and all(r.status == 401 for r in server.requests)


@pytest.mark.parametrize("schema_source", ["reference", "models"])
def test_the_server_refuses_like_the_api_server(schema_source):
    """400 for an unknown field under fieldValidation=Strict; 422 Invalid with causes for a schema error; the
    Trainer webhook's 403 for reserved PET_* env. With the reference CRD where present, and with the models."""
    schema = trainjob_schema("v2.3.0") if schema_source == "reference" else ApiModelSchema("v2.3.0")
    with cluster(schema) as (server, api):
        objects = client.CustomObjectsApi(api)
        manifest = build_trainjob(launch_config(), name="sft-x", namespace="ml", shape=RUNTIME_PATCHES)
        manifest["spec"]["trainer"]["gpus"] = 8
        with pytest.raises(ApiException) as unknown:
            objects.create_namespaced_custom_object(
                "trainer.kubeflow.org", "v1alpha1", "ml", "trainjobs", manifest, field_validation="Strict"
            )
        assert unknown.value.status == 400 and 'unknown field \\"spec.trainer.gpus\\"' in unknown.value.body
        del manifest["spec"]["trainer"]["gpus"]
        manifest["spec"]["trainer"]["numNodes"] = "two"
        with pytest.raises(ApiException) as invalid:
            objects.create_namespaced_custom_object(
                "trainer.kubeflow.org", "v1alpha1", "ml", "trainjobs", manifest
            )
        assert invalid.value.status == 422 and "spec.trainer.numNodes" in invalid.value.body
        manifest["spec"]["trainer"]["numNodes"] = 1
        manifest["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "4"})
        with pytest.raises(ApiException) as denied:
            objects.create_namespaced_custom_object(
                "trainer.kubeflow.org", "v1alpha1", "ml", "trainjobs", manifest
            )
        assert denied.value.status == 403 and "reserved envs" in denied.value.body
        assert server.created == []


# ------------------------------------------------------------------------------------------ credentials


def test_credentials_from_the_environment(tmp_path, monkeypatch):
    api = api_client_from_environment({ENV_SERVER_URL: "https://api.example:6443/", ENV_AUTH_TOKEN: "t0k"})
    assert api.configuration.host == "https://api.example:6443"
    assert api.configuration.auth_settings()["BearerToken"]["value"] == "Bearer t0k"
    with pytest.raises(KubeCredentialsError, match="KUBERNETES_AUTH_TOKEN is empty"):
        api_client_from_environment({ENV_SERVER_URL: "https://api.example:6443"})
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(KubeCredentialsError, match="KUBERNETES_SERVER_URL and KUBERNETES_AUTH_TOKEN"):
        api_client_from_environment({})
