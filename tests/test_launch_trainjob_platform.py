"""What a platform team needs from the TrainJob launcher: the Kueue queue, image pull secrets, /dev/shm,
labels, annotations and env on every object, and TrainJobs that are preempted and restarted.

Each option is checked before any request, and then sent to the local API server serving the real Trainer
CRDs (v2.1.0 and v2.3.0) with strict field validation; the server plays the Trainer controller, so the
JobSet and the pods it serves carry what the TrainJob adds to the runtime's template in either shape.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from decimal import Decimal

import pytest
from kubernetes import client
from test_launch_trainjob import RUN_ID, VERSIONS, cluster, created_bodies, deletes, launch_config

from kfp_components.launch.manifest import (
    RUNTIME_PATCHES,
    build_trainjob,
    quantity_bytes,
    shape_for_version,
)
from kfp_components.launch.trainjob import (
    SecretEnv,
    TrainJobConfig,
    TrainJobError,
    TrainJobLauncher,
    TrainJobTimeout,
)
from kfp_components.typed_config import ConfigError, from_dict

from doubles.kube_server import Scenario
from doubles.trainjob_schema import CrdSchema, api_server_errors, trainjob_schema

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def problems_of(config: TrainJobConfig) -> dict[str, str]:
    """``{option path: message}`` of every problem ``validate`` reports."""
    with pytest.raises(ConfigError) as error:
        config.validate()
    return dict(error.value.problems)


def pods(api: client.ApiClient, name: str) -> list[dict]:
    """The TrainJob's worker pods as the API server sends them."""
    response = client.CoreV1Api(api).list_namespaced_pod(
        "ml", label_selector=f"jobset.sigs.k8s.io/jobset-name={name}", _preload_content=False
    )
    return json.loads(response.data)["items"]


def jobset(api: client.ApiClient, name: str) -> dict:
    return client.CustomObjectsApi(api).get_namespaced_custom_object(
        "jobset.x-k8s.io", "v1alpha2", "ml", "jobsets", name
    )


def trainer_container(pod: dict) -> dict:
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "node"]
    return container


@contextlib.contextmanager
def run(version: str, config: TrainJobConfig, **server_options):
    """Run ``config`` to completion on a local API server serving ``version``; give the server, the client,
    the launcher and the result while the server still holds the TrainJob."""
    with cluster(version, **server_options) as (server, api):
        launcher = TrainJobLauncher(config, api_client=api)
        result = launcher.run()
        yield server, api, launcher, result


# ------------------------------------------------------------------------------------------ validation


def test_queue_name_is_a_dns_label_given_as_its_own_option():
    launch_config(queue_name="team-a-gpu").validate()
    assert "queue_name" in problems_of(launch_config(queue_name="Team_A"))
    assert "at most 63" in problems_of(launch_config(queue_name="q" * 64))["queue_name"]
    message = problems_of(launch_config(labels={QUEUE_LABEL: "team-a-gpu"}))[f"labels.{QUEUE_LABEL}"]
    assert "queue_name" in message and "queue them as well" in message
    assert (
        "queue_name"
        in problems_of(launch_config(annotations={QUEUE_LABEL: "q"}))[f"annotations.{QUEUE_LABEL}"]
    )


def test_image_pull_secrets_are_secret_names_listed_once():
    launch_config(image_pull_secrets=["registry-pull", "mirror.example-pull"]).validate()
    found = problems_of(launch_config(image_pull_secrets=["ok", "Not_A_Name", "ok"]))
    assert "not a Secret name" in found["image_pull_secrets[1]"]
    assert "listed twice" in found["image_pull_secrets[2]"]
    many = [f"pull-{i}" for i in range(65)]
    assert "at most 64" in problems_of(launch_config(image_pull_secrets=many))["image_pull_secrets"]


def test_shm_size_is_unlimited_a_size_between_64mi_and_memory_or_off():
    assert TrainJobConfig.__dataclass_fields__["shm_size"].default == "unlimited"
    for good in ("unlimited", "", "64Mi", "16Gi", "1e9", "2147483648"):
        launch_config(shm_size=good, memory="64Gi").validate()
    message = problems_of(launch_config(shm_size="lots"))["shm_size"]
    assert "'lots' is not a Kubernetes quantity" in message
    assert "16Gi" in message and "'unlimited'" in message and "''" in message, "the allowed values"
    assert "less than the 64Mi" in problems_of(launch_config(shm_size="32Mi"))["shm_size"]
    assert "less than the 64Mi" in problems_of(launch_config(shm_size="500m"))["shm_size"], "0.5 bytes"
    too_big = problems_of(launch_config(shm_size="16Gi", memory="8Gi"))["shm_size"]
    assert "more than memory=8Gi" in too_big
    assert (
        "/dev/shm" in problems_of(launch_config(shm_size="1Gi", workspace_path="/dev/shm"))["workspace_path"]
    )
    launch_config(shm_size="", workspace_path="/dev/shm").validate()


def test_quantities_are_read_as_kubernetes_reads_them():
    assert quantity_bytes("64Gi") == 64 * 2**30
    assert quantity_bytes("1.5Ki") == 1536
    assert quantity_bytes("500M") == 500 * 10**6
    assert quantity_bytes("1e9") == 10**9
    assert quantity_bytes("500m") == Decimal("0.5")
    assert quantity_bytes("16 GB") is None and quantity_bytes("Gi") is None and quantity_bytes("") is None


def test_label_and_annotation_keys_are_checked_and_the_launchers_own_refused():
    found = problems_of(
        launch_config(
            labels={"has space": "x", "app.kubernetes.io/managed-by": "me", "team": "bad value!"},
            annotations={"kfp-components/spec-hash": "0", "Bad_Prefix/x": "y"},
        )
    )
    assert "not a valid key" in found["labels.has space"]
    assert "set by the launcher" in found["labels.app.kubernetes.io/managed-by"]
    assert "not a valid label value" in found["labels.team"]
    assert "set by the launcher" in found["annotations.kfp-components/spec-hash"]
    assert "prefix" in found["annotations.Bad_Prefix/x"]
    launch_config(annotations={"example.com/note": "any text: at all"}).validate()


def test_every_problem_is_reported_at_once_and_no_secret_is_quoted():
    data = {
        "trainer_image": "trainer:1",
        "config_path": "/workspace/run.yaml",
        "name": "n",
        "queue_name": "Bad Queue",
        "image_pull_secrets": ["UPPER"],
        "shm_size": "huge",
        "env": {"HF_TOKEN": "hf_literal_value", "PET_NNODES": "2"},
        "labels": {QUEUE_LABEL: "q"},
    }
    with pytest.raises(ConfigError) as error:
        from_dict(TrainJobConfig, data)
    paths = [path for path, _ in error.value.problems]
    assert paths == [
        "shm_size",
        "queue_name",
        "image_pull_secrets[0]",
        "env.PET_NNODES",
        "env.HF_TOKEN",
        f"labels.{QUEUE_LABEL}",
    ]
    assert "6 problems" in str(error.value) and "hf_literal_value" not in str(error.value)


# ------------------------------------------------------------------------- on the API server, both shapes


@pytest.mark.parametrize("version", VERSIONS)
def test_the_queue_labels_the_trainjob_only(version):
    config = launch_config(queue_name="team-a-gpu", labels={"team": "llm"})
    with run(version, config) as (server, api, launcher, _):
        (body,) = created_bodies(server)  # accepted with fieldValidation=Strict
        assert body["metadata"]["labels"][QUEUE_LABEL] == "team-a-gpu", "where Kueue reads it"
        assert server.trainjob(launcher.name, "ml")["metadata"]["labels"][QUEUE_LABEL] == "team-a-gpu"
        assert QUEUE_LABEL not in json.dumps(body["spec"])
        made = jobset(api, launcher.name)
        assert made["metadata"]["labels"]["team"] == "llm", "labels do reach the JobSet"
        assert QUEUE_LABEL not in json.dumps(made), "Kueue could queue the JobSet as well"
        (pod,) = pods(api, launcher.name)
        assert pod["metadata"]["labels"]["team"] == "llm" and QUEUE_LABEL not in pod["metadata"]["labels"]
        with pytest.raises(TrainJobError, match="exists with a different spec"):
            TrainJobLauncher(
                launch_config(queue_name="team-b-gpu", labels={"team": "llm"}), api_client=api
            ).run()


@pytest.mark.parametrize("version", VERSIONS)
def test_image_pull_secrets_reach_the_pods(version):
    config = launch_config(image_pull_secrets=["registry-pull", "mirror-pull"], num_nodes=2)
    with run(version, config) as (_, api, launcher, _):
        workers = pods(api, launcher.name)
        assert len(workers) == 2
        for pod in workers:
            assert pod["spec"]["imagePullSecrets"] == [{"name": "registry-pull"}, {"name": "mirror-pull"}]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("shm_size", "empty_dir"),
    [
        ("unlimited", {"medium": "Memory"}),
        ("16Gi", {"medium": "Memory", "sizeLimit": "16Gi"}),
        ("", None),
    ],
)
def test_dev_shm_is_a_memory_volume_of_the_trainer_container(version, shm_size, empty_dir):
    with run(version, launch_config(shm_size=shm_size, memory="64Gi")) as (_, api, launcher, _):
        (pod,) = pods(api, launcher.name)
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in trainer_container(pod)["volumeMounts"]}
        assert mounts["/workspace"] == "workspace", "the workspace mount is kept beside it"
        if empty_dir is None:
            assert "dshm" not in volumes and "/dev/shm" not in mounts, "off: the runtime's /dev/shm"
        else:
            assert volumes["dshm"] == {"name": "dshm", "emptyDir": empty_dir}
            assert mounts["/dev/shm"] == "dshm"


@pytest.mark.parametrize("version", VERSIONS)
def test_shm_without_a_workspace_still_mounts_in_the_trainer_container(version):
    with run(version, launch_config(workspace_pvc="")) as (_, api, launcher, _):
        (pod,) = pods(api, launcher.name)
        assert pod["spec"]["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
        assert trainer_container(pod)["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]


@pytest.mark.parametrize("version", VERSIONS)
def test_the_crd_refuses_a_size_limit_that_is_not_a_quantity(version):
    """The CRD checks sizeLimit too: the schema check would catch a manifest that skipped validation. The
    release's Python models have no quantity pattern, so without the CRD file only our own check stands."""
    config = launch_config(shm_size="16Gi")
    manifest = build_trainjob(config, name="sft-x", namespace="ml", shape=shape_for_version(version[:4]))
    schema = trainjob_schema(version)
    assert api_server_errors(manifest, schema) == []
    text = json.dumps(manifest).replace('"sizeLimit": "16Gi"', '"sizeLimit": "16 GB"')
    if isinstance(schema, CrdSchema):
        assert any("sizeLimit" in e for e in api_server_errors(json.loads(text), schema))
    assert "shm_size" in problems_of(launch_config(shm_size="16 GB"))


@pytest.mark.parametrize("version", VERSIONS)
def test_labels_annotations_and_env_reach_the_trainjob_the_jobset_and_the_pods(version):
    config = launch_config(
        labels={"team": "llm", "cost-center": "r-and-d"},
        annotations={"example.com/owner": "fine-tuning team"},
        env={"NCCL_DEBUG": "INFO", "TOKENIZERS_PARALLELISM": "false"},
        secret_env=[SecretEnv("HF_TOKEN", "hf-token", "token")],
    )
    own = {"app.kubernetes.io/managed-by": "kfp-components", "kfp-components/stage": "sft"}
    with run(version, config) as (server, api, launcher, _):
        stored = server.trainjob(launcher.name, "ml")["metadata"]
        made = jobset(api, launcher.name)
        (job,) = made["spec"]["replicatedJobs"]
        (pod,) = pods(api, launcher.name)
        for where, metadata in (
            ("TrainJob", stored),
            ("JobSet", made["metadata"]),
            ("Job", job["template"]["metadata"]),
            ("pod", pod["metadata"]),
        ):
            assert {"team": "llm", "cost-center": "r-and-d", **own}.items() <= metadata["labels"].items(), (
                where
            )
            assert metadata["labels"]["kfp-components/pipeline-run-id"] == RUN_ID, where
            assert metadata["annotations"]["example.com/owner"] == "fine-tuning team", where
        env = trainer_container(pod)["env"]
        assert {"name": "NCCL_DEBUG", "value": "INFO"} in env
        assert {"name": "TOKENIZERS_PARALLELISM", "value": "false"} in env
        assert {"name": "PYTHONUNBUFFERED", "value": "1"} in env
        assert {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}},
        } in env
    with pytest.raises(ConfigError, match=r"env\.HF_TOKEN: looks like a secret"):
        launch_config(env={"HF_TOKEN": "hf_literal"}).validate()


def test_v2_3_has_one_patch_of_ours_with_every_pod_option():
    """Kueue writes its own runtimePatches entry; ours stays one entry with everything the pods need."""
    config = launch_config(image_pull_secrets=["registry-pull"], queue_name="q", shm_size="8Gi")
    manifest = build_trainjob(config, name="sft-x", namespace="ml", shape=RUNTIME_PATCHES)
    (patch,) = manifest["spec"]["runtimePatches"]
    assert patch["manager"] == "kfp-components/trainjob-launcher"
    pod_spec = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"][
        "template"
    ]["spec"]
    assert set(pod_spec) == {"imagePullSecrets", "volumes", "containers"}


# -------------------------------------------------------------------------- preemption and restarts


RESUMED_LINES = ["resumed from checkpoint-1 (step 1)", "step 2/4", "step 4/4", "saved final model"]


@pytest.mark.parametrize("version", VERSIONS)
def test_a_preempted_trainjob_is_waited_out_and_completes(version, caplog):
    """Kueue suspends the running TrainJob (its pods are deleted), later resumes it; new pods run the same
    command and the trainer resumes from its checkpoint. The launcher waits it out and succeeds."""
    caplog.set_level(logging.INFO)
    scenario = Scenario(preempt_seconds=0.5, log_lines=RESUMED_LINES, line_interval=0.08)
    config = launch_config(trainer_flags={"resume": True})
    with run(version, config, scenarios=[scenario]) as (server, _, _, result):
        assert result.reason == "AllJobsCompleted" and not result.adopted
        assert result.preemptions == 1 and result.suspended_seconds >= 0.3
        assert result.log_tail == scenario.preempt_lines + RESUMED_LINES, "both pods' logs, in order"
        followed = [r.path.split("/")[-2] for r in server.requests_for("GET", "/log") if r.status == 200]
        assert len(set(followed)) == 2, "the first pod's log, then the new pod's"
        assert len(server.created) == 1 and deletes(server) == [], "waited for, not resubmitted or deleted"
        (body,) = created_bodies(server)
        assert body["spec"]["trainer"]["args"][-2:] == ["--resume", "true"]
    assert (
        "was suspended while running (Suspended: TrainJob is suspended), e.g. preempted by Kueue"
        in caplog.text
    )
    assert "resumed after" in caplog.text and "worker 0 has a new pod" in caplog.text
    assert "completed (suspended" in caplog.text and "preempted 1 time)" in caplog.text


def test_queued_then_preempted_then_restarted_completes_within_the_timeout(caplog):
    """Held by Kueue at first (not a preemption), preempted once, then a pod fails and the JobSet starts a
    new one: all within timeout_seconds, and it completes."""
    caplog.set_level(logging.INFO)
    scenario = Scenario(
        suspend_seconds=0.3, preempt_seconds=0.3, restart=True, log_lines=RESUMED_LINES, line_interval=0.08
    )
    started = time.monotonic()
    with run("v2.3.0", launch_config(timeout_seconds=30), scenarios=[scenario]) as (_, _, _, result):
        assert result.reason == "AllJobsCompleted"
        assert result.preemptions == 1, "the first suspension was the wait for admission"
        assert result.suspended_seconds >= 0.4
        assert result.log_tail == scenario.preempt_lines + scenario.restart_lines + RESUMED_LINES
    assert time.monotonic() - started < 30
    assert "is suspended (Suspended: TrainJob is suspended): waiting for it to be admitted" in caplog.text


@pytest.mark.parametrize("version", VERSIONS)
def test_a_preemption_that_outlasts_the_timeout_deletes_the_trainjob(version):
    scenario = Scenario(preempt_seconds=60, line_interval=0.05)
    with cluster(version, scenarios=[scenario]) as (server, api):
        launcher = TrainJobLauncher(launch_config(timeout_seconds=1.5), api_client=api)
        started = time.monotonic()
        with pytest.raises(TrainJobTimeout) as error:
            launcher.run()
        assert time.monotonic() - started < 10
        assert "did not finish within 1.5 s" in str(error.value)
        assert "preempted 1 time, suspended now" in str(error.value)
        assert error.value.log_tail == scenario.preempt_lines, "the lines before the preemption are quoted"
        (delete,) = deletes(server)
        assert delete.query["propagationPolicy"] == ["Foreground"]
        assert server.wait_until(lambda: server.trainjob(launcher.name, "ml") is None, 5)
