"""Model Registry registration with the real ``model_registry`` client against a local server that checks every
request: against the OpenAPI spec of the reference folder where present, else against the client's own
``mr_openapi`` models (see ``tests/doubles/registry_server.py``)."""

from __future__ import annotations

import json
import logging
import re
import socket
import time
import urllib.error
import urllib.request

import pytest

from kfp_components.registry import (
    RegistryAuthError,
    RegistryConfig,
    RegistryError,
    RegistryUnavailableError,
    VersionExistsError,
    build_provenance,
    model_storage,
    register_model,
    to_custom_properties,
    write_provenance,
)
from kfp_components.typed_config import ConfigError, from_dict

from doubles.registry_server import ClientModelsApi, registry_api, registry_server

TOKEN = "s3cr3t-registry-token-value"
SHA = "ab" * 32
MINIO_URI = "minio://mlpipeline/v2/artifacts/sft-pipeline/run-1234/train-model/model"
S3_ENVS = ("AWS_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")
SIGNED_DATASET_URI = "https://reader:hunter2@data.example/train.jsonl?X-Amz-Signature=c1gnature&v=1"
WANDB_KEY = "wandb-secret-key-0123456789"


@pytest.fixture
def no_s3_env(monkeypatch):
    """A pod without an S3 secret: no endpoint and no region in the environment."""
    for name in S3_ENVS:
        monkeypatch.delenv(name, raising=False)


def provenance(**overrides) -> dict:
    values = dict(
        base_model="hf://Qwen/Qwen2.5-0.5B",
        dataset_uri="s3://data/sft/train.jsonl",
        dataset_sha256=SHA,
        algorithm="sft",
        hyperparameters={"learning_rate": 2e-5, "epochs": 3, "lora": {"r": 8}, "max_tokens": 10**12},
        metrics={"eval": {"loss": 0.42, "perplexity": 1.52}, "train": {"loss": 0.3}},
        pipeline_name="sft-pipeline",
        run_id="run-1234",
        namespace="team-a",
        image="quay.io/kfp-components/runtime:test",
    )
    values.update(overrides)
    return build_provenance(**values)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("MODEL_REGISTRY_TOKEN", TOKEN)
    with registry_server(registry_api(), token=TOKEN) as running:
        yield running


def config(server, **overrides) -> RegistryConfig:
    """Options for the local (plain http) test server, which checks the token: sending it is allowed."""
    values = dict(
        address=server.url,
        is_secure=False,
        allow_insecure_token=True,
        model_name="granite-sft",
        storage_uri="s3://models/granite-sft/run-1234",
        max_attempts=2,
        backoff_seconds=0.01,
    )
    values.update(overrides)
    return from_dict(RegistryConfig, values)


def assert_all_requests_valid(server) -> None:
    """Every request the server answered itself (not an injected fault) was valid."""
    bad = [
        (r.method, r.path, r.status)
        for r in server.requests
        if r.status in (400, 401, 500, 501) and not r.injected
    ]
    assert not bad, bad


def test_new_model_registers_version_with_provenance_properties(server):
    result = register_model(config(server, version_name="v1", description="first"), provenance())
    assert result.status == "registered" and result.created_model
    assert (result.model_name, result.version_name) == ("granite-sft", "v1")
    version = server.store["model_version"][result.version_id]
    props = version["customProperties"]
    assert props["dataset_sha256"] == {"metadataType": "MetadataStringValue", "string_value": SHA}
    assert props["training_hyperparameters_epochs"] == {"metadataType": "MetadataIntValue", "int_value": "3"}
    assert props["metrics_eval_loss"]["double_value"] == 0.42
    # int64 hyperparameters do not fit MetadataIntValue (int32): stored as strings, not rejected
    assert props["training_hyperparameters_max_tokens"]["string_value"] == str(10**12)
    artifact = server.store["model_artifact"][result.artifact_id]
    assert artifact["uri"] == "s3://models/granite-sft/run-1234"
    assert artifact["modelFormatName"] == "safetensors"
    assert artifact["customProperties"]["base_model"]["string_value"] == "hf://Qwen/Qwen2.5-0.5B"
    # the provenance has no storage URI of its own: the registered one is recorded (it identifies the run)
    assert props["model_storage_uri"]["string_value"] == "s3://models/granite-sft/run-1234"
    assert_all_requests_valid(server)
    # every body went through the spec's request schemas; the artifact gets its properties in one request
    writes = [op for op in server.operations() if not op.startswith(("find", "get"))]
    assert writes == ["createRegisteredModel", "createModelVersion", "upsertModelVersionArtifact"]


def test_new_version_of_existing_model(server):
    first = register_model(config(server, version_name="v1"), provenance())
    second = register_model(config(server, version_name="v2"), provenance())
    assert second.status == "registered" and not second.created_model
    assert second.model_id == first.model_id and second.version_id != first.version_id
    assert server.operations().count("createRegisteredModel") == 1
    assert_all_requests_valid(server)


def test_derived_version_name_comes_from_run_id(server):
    result = register_model(config(server), provenance(run_id="abc/123"))
    assert result.version_name == "run-abc-123"


def test_existing_version_fail_policy(server):
    register_model(config(server, version_name="v1"), provenance())
    with pytest.raises(
        VersionExistsError,
        match=r"'v1' of model 'granite-sft' already exists.*another run \(run id 'run-1234'\).*on_existing_version",
    ):
        register_model(
            config(server, version_name="v1", on_existing_version="fail"), provenance(run_id="run-5678")
        )


def test_existing_version_skip_policy_returns_existing(server):
    first = register_model(config(server, version_name="v1"), provenance())
    again = register_model(
        config(server, version_name="v1", on_existing_version="skip"), provenance(run_id="run-5678")
    )
    assert again.status == "existing"
    assert (again.version_id, again.artifact_id) == (first.version_id, first.artifact_id)
    assert len(server.store["model_version"]) == 1
    # kept unchanged: still the first run's
    props = server.store["model_version"][first.version_id]["customProperties"]
    assert props["pipeline_run_id"]["string_value"] == "run-1234"


def test_existing_version_next_policy_takes_next_free_name(server):
    register_model(config(server, version_name="v1"), provenance())
    second = register_model(
        config(server, version_name="v1", on_existing_version="next"), provenance(run_id="run-2")
    )
    third = register_model(
        config(server, version_name="v1", on_existing_version="next"), provenance(run_id="run-3")
    )
    assert (second.version_name, third.version_name) == ("v1-2", "v1-3")
    assert sorted(v["name"] for v in server.store["model_version"].values()) == ["v1", "v1-2", "v1-3"]
    assert_all_requests_valid(server)


def test_server_down_fails_quickly_after_bounded_retries(caplog):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    sleeps: list[float] = []
    cfg = from_dict(
        RegistryConfig,
        {
            "address": f"http://127.0.0.1:{port}",
            "is_secure": False,
            "model_name": "m",
            "storage_uri": "s3://b/m",
            "max_attempts": 3,
            "backoff_seconds": 0.01,
        },
    )
    start = time.monotonic()
    with pytest.raises(RegistryUnavailableError, match=rf"127.0.0.1:{port} is unreachable.*3 time"):
        register_model(cfg, provenance(), sleep=lambda s: sleeps.append(s) or time.sleep(s))
    assert time.monotonic() - start < 10
    assert sleeps == [0.01, 0.02]


def test_bad_token_is_a_clear_401(server, monkeypatch):
    monkeypatch.setenv("MODEL_REGISTRY_TOKEN", "wrong-token")
    with pytest.raises(RegistryAuthError, match=r"401 Unauthorized.*MODEL_REGISTRY_TOKEN"):
        register_model(config(server), provenance())
    assert [r.status for r in server.requests] == [401]  # not retried


def test_secure_without_token_is_refused_before_connecting(monkeypatch, tmp_path):
    monkeypatch.delenv("MODEL_REGISTRY_TOKEN", raising=False)
    cfg = from_dict(
        RegistryConfig,
        {
            "address": "registry.example",
            "model_name": "m",
            "storage_uri": "s3://b/m",
            "token_path": str(tmp_path / "x"),
        },
    )
    with pytest.raises(RegistryAuthError, match=r"no token.*\$MODEL_REGISTRY_TOKEN"):
        register_model(cfg, provenance())


def test_token_file_is_read_when_env_is_unset(monkeypatch, tmp_path):
    monkeypatch.delenv("MODEL_REGISTRY_TOKEN", raising=False)
    (tmp_path / "token").write_text("from-file\n")
    assert RegistryConfig(token_path=str(tmp_path / "token")).resolve_token() == "from-file"


def test_empty_address_skips_with_log_line(caplog):
    caplog.set_level(logging.INFO)
    result = register_model(RegistryConfig(), provenance())
    assert result.status == "skipped" and result.version_id == ""
    assert "registration skipped" in caplog.text


def test_default_kubeflow_minio_artifact_registers_as_s3_with_the_minio_endpoint(server, no_s3_env):
    cfg = config(server, version_name="v1", storage_uri=MINIO_URI, storage_key="minio-connection")
    result = register_model(cfg, provenance())
    assert result.status == "registered"
    artifact = server.store["model_artifact"][result.artifact_id]
    path = "v2/artifacts/sft-pipeline/run-1234/train-model/model"
    assert artifact["uri"] == f"s3://mlpipeline/{path}?endpoint=http://minio-service.kubeflow:9000"
    assert artifact["storagePath"] == path
    assert artifact["storageKey"] == "minio-connection"
    assert_all_requests_valid(server)


def test_s3_endpoint_comes_from_the_option_then_the_environment(server, no_s3_env, monkeypatch):
    monkeypatch.setenv("AWS_S3_ENDPOINT", "https://s3.odf.example:443")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    from_env = register_model(config(server, version_name="v1", storage_uri=MINIO_URI), provenance())
    uri = server.store["model_artifact"][from_env.artifact_id]["uri"]
    assert uri.endswith("/model?endpoint=https://s3.odf.example:443&defaultRegion=eu-west-1")
    cfg = config(
        server, version_name="v2", storage_uri="s3://models/m/", storage_endpoint="http://minio.team-a:9000"
    )
    from_option = register_model(cfg, provenance())
    artifact = server.store["model_artifact"][from_option.artifact_id]
    assert artifact["uri"] == "s3://models/m?endpoint=http://minio.team-a:9000&defaultRegion=eu-west-1"
    assert artifact["storagePath"] == "m" and "storageKey" not in artifact
    assert_all_requests_valid(server)


def test_recorded_s3_uri_is_the_registry_clients_own_form(no_s3_env):
    from model_registry.utils import s3_uri_from

    storage = model_storage("minio://mlpipeline/a/b", "http://minio:9000")
    assert storage.uri == s3_uri_from("a/b", "mlpipeline", endpoint="http://minio:9000", region=None)
    assert (storage.path, storage.endpoint, storage.source_uri) == (
        "a/b",
        "http://minio:9000",
        "minio://mlpipeline/a/b",
    )
    # a URI already in that form keeps its endpoint and region
    again = model_storage(s3_uri_from("a/b", "bkt", endpoint="http://minio:9000", region="r1"))
    assert again.uri == "s3://bkt/a/b?endpoint=http://minio:9000&defaultRegion=r1"


@pytest.mark.parametrize(
    ("uri", "recorded", "path"),
    [
        ("s3://models/granite/v1", "s3://models/granite/v1", "granite/v1"),  # AWS S3: no endpoint
        (
            "gs://kfp-artifacts/v2/artifacts/model",
            "gs://kfp-artifacts/v2/artifacts/model",
            "v2/artifacts/model",
        ),
        ("pvc://models-pvc/granite/v1", "pvc://models-pvc/granite/v1", "granite/v1"),
        ("oci://quay.io/org/granite:v1", "oci://quay.io/org/granite:v1", ""),
    ],
)
def test_object_store_and_volume_uris_are_accepted(no_s3_env, uri, recorded, path):
    storage = from_dict(
        RegistryConfig, {"address": "http://r", "model_name": "m", "storage_uri": uri}
    ).storage()
    assert (storage.uri, storage.path) == (recorded, path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"storage_uri": "s3://AKIAXX:s3cr3t-registry-token-value@models/m"},
            "storage_uri: the s3:// URI carries credentials",
        ),
        (
            {"storage_uri": MINIO_URI, "storage_endpoint": f"http://minio:{TOKEN}@minio:9000"},
            "storage_endpoint: .*credentials",
        ),
        ({"storage_uri": "s3://models/m?endpoint=http://a:9000&token=x"}, "unknown query key.*token"),
        (
            {"storage_uri": "s3://models/m?endpoint=http://a:9000", "storage_endpoint": "http://b:9000"},
            "set only one",
        ),
        ({"storage_uri": "s3://models"}, "no path of the model"),
        ({"storage_uri": "hdfs://nn/models/m"}, "unsupported scheme 'hdfs://'"),
        (
            {"storage_uri": MINIO_URI, "storage_endpoint": "minio-service.kubeflow:9000"},
            "storage_endpoint: expected an S3 endpoint",
        ),
        ({"storage_uri": MINIO_URI, "storage_key": "s3://x"}, "storage_key: expected the name of a secret"),
    ],
)
def test_bad_storage_is_refused_without_echoing_credentials(no_s3_env, options, message):
    with pytest.raises(ConfigError, match=message) as caught:
        from_dict(RegistryConfig, {"address": "http://registry", "model_name": "m", **options})
    assert TOKEN not in str(caught.value) and "s3cr3t" not in str(caught.value)


def test_endpoint_from_the_environment_is_checked_and_named(no_s3_env, monkeypatch):
    monkeypatch.setenv("AWS_S3_ENDPOINT", "minio-service.kubeflow:9000")
    with pytest.raises(ConfigError, match=r"\$AWS_S3_ENDPOINT: expected an S3 endpoint"):
        model_storage(MINIO_URI)


@pytest.mark.parametrize("uri", ["/tmp/model", "file:///mnt/model", "model"])
def test_container_local_storage_uri_is_refused(uri):
    with pytest.raises(ConfigError, match=r"storage_uri: .*inside the container"):
        from_dict(RegistryConfig, {"address": "http://registry", "model_name": "m", "storage_uri": uri})


def test_bad_policy_and_unknown_option_are_config_errors():
    with pytest.raises(ConfigError, match="on_existing_version"):
        from_dict(RegistryConfig, {"on_existing_version": "overwrite"})
    with pytest.raises(ConfigError, match="adress: unknown option"):
        from_dict(RegistryConfig, {"adress": "x"})


def test_token_never_logged_or_recorded(server, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    record = provenance(hyperparameters={"lr": 1e-4, "hf_token": TOKEN})
    result = register_model(config(server, version_name="v1"), record)
    json_path, card_path = write_provenance(record, tmp_path)
    assert TOKEN not in caplog.text
    assert TOKEN not in json_path.read_text() and TOKEN not in card_path.read_text()
    assert TOKEN not in json.dumps(server.store)
    assert TOKEN not in repr(result)


def test_provenance_files_content(tmp_path):
    record = provenance()
    json_path, card_path = write_provenance(record, tmp_path / "model")
    data = json.loads(json_path.read_text())
    assert data["dataset"] == {"uri": "s3://data/sft/train.jsonl", "sha256": SHA}
    assert data["training"]["hyperparameters"]["lora"] == {"r": 8}
    assert data["pipeline"] == {
        "name": "sft-pipeline",
        "run_id": "run-1234",
        "namespace": "team-a",
        "image": "quay.io/kfp-components/runtime:test",
    }
    assert set(data["packages"]) >= {"kfp_components", "torch", "transformers", "kfp"}
    assert data["timestamps"]["created_at"].endswith("Z")
    card = card_path.read_text()
    assert "Fine-tuned from `hf://Qwen/Qwen2.5-0.5B` with **sft**" in card
    assert SHA in card and "| learning_rate | 2e-05 |" in card and "| eval.loss | 0.42 |" in card


def test_custom_properties_are_flat_safe_scalars():
    props = to_custom_properties(
        provenance(
            hyperparameters={
                "big": 2**31 - 1,
                "ok": 999_999_999,
                "LR-max": 1.0,
                "layers": [1, 2],
                "nan": float("nan"),
            }
        )
    )
    assert props["training_hyperparameters_lr_max"] == 1.0
    assert (props["training_hyperparameters_big"], props["training_hyperparameters_ok"]) == (
        "2147483647",
        999_999_999,
    )
    assert props["training_hyperparameters_layers"] == "[1, 2]"
    assert props["training_hyperparameters_nan"] == "nan"
    assert all(k.replace("_", "").isalnum() and k == k.lower() for k in props)
    assert all(isinstance(v, str | int | float | bool) for v in props.values())


@pytest.mark.parametrize("api_source", ["reference", "models"])
def test_server_rejects_bodies_that_break_the_api(api_source):
    """Missing, unknown and mistyped fields are refused with their path: with the reference spec where present,
    and with the client's models."""
    api = registry_api() if api_source == "reference" else ClientModelsApi()

    def post(path: str, body: dict) -> tuple[int, str]:
        request = urllib.request.Request(
            f"{server.url}/api/model_registry/v1alpha3/{path}",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, json.loads(response.read())["name"]
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())["message"]

    with registry_server(api, token=TOKEN) as server:
        status, message = post("registered_models", {"description": "no name"})
        assert status == 400 and re.search(r"name.*required|required.*name", message), message
        big_int = {"metadataType": "MetadataIntValue", "int_value": str(10**12)}  # int32 only
        status, message = post("registered_models", {"name": "m", "customProperties": {"n": big_int}})
        assert status == 400 and "customProperties/n" in message, message
        status, message = post("registered_models", {"name": "m", "colour": "blue"})
        assert status == 400 and "colour: unknown field" in message, message
        extra = {"metadataType": "MetadataStringValue", "string_value": "x", "unit": "cm"}
        status, message = post("registered_models", {"name": "m", "customProperties": {"n": extra}})
        assert status == 400 and "customProperties/n/unit: unknown field" in message, message
        status, message = post("registered_models", {"name": ["m"]})
        assert status == 400 and message.startswith("createRegisteredModel") and "name" in message, message
        assert post("registered_models", {"name": "m"}) == (201, "m")
        assert post("registered_models", {"name": "m"})[0] == 409


def test_server_routes_and_parameters_come_from_the_client_models():
    """Without the spec, every operation of the client is served, and its query parameters are checked."""
    api = ClientModelsApi()
    operations = {route.operation for route in api.routes}
    assert {"createRegisteredModel", "findModelVersion", "upsertModelVersionArtifact"} <= operations
    with registry_server(api, token=TOKEN) as server:
        base = f"{server.url}/api/model_registry/v1"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        for query, expected in [("pageSize=2", 200), ("orderBy=NAME", 400), ("colour=blue", 400)]:
            request = urllib.request.Request(f"{base}/registered_models?{query}", headers=headers)
            try:
                with urllib.request.urlopen(request) as response:
                    status = response.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            assert status == expected, query


# --- idempotent registration: faults in transit, reruns of a half-registered version ----------------------

WRITES = ("createRegisteredModel", "createModelVersion", "upsertModelVersionArtifact")
FAULTS = [
    pytest.param({"kind": "status", "status": 500, "after_store": True}, id="500-after-store"),
    pytest.param({"kind": "status", "status": 503, "after_store": False}, id="503-before-store"),
    pytest.param({"kind": "reset", "after_store": True}, id="reset-after-store"),
]


def assert_one_complete_version(server, result, run_id: str = "run-1234") -> None:
    """One registered model, one version, one model artifact, with the run's provenance on both."""
    assert len(server.store["registered_model"]) == 1
    (version,) = server.store["model_version"].values()
    (artifact,) = server.store["model_artifact"].values()
    assert (result.version_id, result.artifact_id) == (version["id"], artifact["id"])
    assert artifact["_parent"] == version["id"] and artifact["uri"] == "s3://models/granite-sft/run-1234"
    for entity in (version, artifact):
        assert entity["customProperties"]["pipeline_run_id"]["string_value"] == run_id
        assert entity["customProperties"]["dataset_sha256"]["string_value"] == SHA
    assert_all_requests_valid(server)


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("operation", WRITES)
def test_a_write_lost_in_transit_is_not_made_twice(server, operation, fault):
    """A create whose answer was lost (5xx or connection reset, after the server stored it or before) is looked
    up before it is retried: one call still ends with exactly one model, version and artifact."""
    injected = server.inject(operation, **fault)
    result = register_model(config(server, version_name="v1", max_attempts=3), provenance())
    assert injected.times == 0  # the fault did happen
    assert result.status == "registered" and result.version_name == "v1"
    assert_one_complete_version(server, result)
    assert server.operations().count(operation) == (1 if fault["after_store"] else 2)


def half_registered(server, **fault) -> str:
    """A first run that stored the version and then lost the registry for good: the version has no artifact."""
    server.inject("upsertModelVersionArtifact", after_store=False, times=2, **fault)
    with pytest.raises(RegistryUnavailableError, match="'create the model artifact' failed 2 time"):
        register_model(config(server, version_name="v1"), provenance())
    (version,) = server.store["model_version"].values()
    assert not server.store["model_artifact"]
    return version["id"]


@pytest.mark.parametrize("kind", ["status", "reset"])
@pytest.mark.parametrize("policy", ["fail", "skip", "next"])
def test_rerun_completes_the_version_it_left_half_registered(server, policy, kind):
    """The rerun of the same run (same run id, dataset SHA-256, storage URI) finishes its own version, whatever
    on_existing_version says: no error (fail), no broken version reported as a success (skip), no duplicate
    (next)."""
    version_id = half_registered(server, kind=kind)
    again = register_model(config(server, version_name="v1", on_existing_version=policy), provenance())
    assert again.status == "completed" and again.version_id == version_id and again.version_name == "v1"
    assert "created the missing model artifact" in again.message
    assert_one_complete_version(server, again)
    # and once complete, a further rerun changes nothing
    writes = len([op for op in server.operations() if op in WRITES])
    third = register_model(config(server, version_name="v1", on_existing_version=policy), provenance())
    assert third.status == "existing" and third.version_id == version_id
    assert len([op for op in server.operations() if op in WRITES]) == writes


def test_a_single_500_after_the_version_was_stored_does_not_fail_the_run(server):
    """The reported fault: one transient 500 on the version's create, after the server stored it."""
    server.inject("createModelVersion", after_store=True)
    result = register_model(config(server, version_name="v1", on_existing_version="fail"), provenance())
    assert result.status == "registered"
    assert_one_complete_version(server, result)


def test_rerun_adds_the_properties_a_version_and_artifact_lack(server):
    first = register_model(config(server, version_name="v1"), provenance())
    version = server.store["model_version"][first.version_id]
    artifact = server.store["model_artifact"][first.artifact_id]
    del version["customProperties"]["metrics_eval_loss"]
    artifact["customProperties"] = {}  # as when the step that added them never ran
    again = register_model(config(server, version_name="v1"), provenance())
    assert again.status == "completed" and again.version_id == first.version_id
    assert version["customProperties"]["metrics_eval_loss"]["double_value"] == 0.42
    assert artifact["customProperties"]["pipeline_run_id"]["string_value"] == "run-1234"
    assert len(server.store["model_version"]) == len(server.store["model_artifact"]) == 1
    assert_all_requests_valid(server)


def test_another_runs_half_registered_version_goes_by_the_policy(server):
    """A version left without an artifact by a *different* run is not completed with this run's model."""
    half_registered(server)
    other = provenance(run_id="run-5678")
    with pytest.raises(VersionExistsError, match=r"another run \(run id 'run-1234'\)"):
        register_model(config(server, version_name="v1", on_existing_version="fail"), other)
    with pytest.raises(RegistryError, match=r"has no model artifact.*run id 'run-1234'.*half-registered"):
        register_model(config(server, version_name="v1", on_existing_version="skip"), other)
    nxt = register_model(config(server, version_name="v1", on_existing_version="next"), other)
    assert (nxt.status, nxt.version_name) == ("registered", "v1-2")
    assert server.store["model_artifact"][nxt.artifact_id]["_parent"] == nxt.version_id
    assert len(server.store["model_artifact"]) == 1  # v1 is still the other run's to complete


@pytest.mark.parametrize(
    "change",
    [
        {"dataset_sha256": "cd" * 32},
        {"base_model": "hf://other/model"},
        {"algorithm": "dpo"},
    ],
    ids=["dataset", "base-model", "algorithm"],
)
def test_same_run_id_with_other_provenance_is_another_run(server, change):
    register_model(config(server, version_name="v1"), provenance())
    with pytest.raises(VersionExistsError):
        register_model(config(server, version_name="v1"), provenance(**change))


def test_same_run_with_another_storage_uri_is_another_run(server):
    register_model(config(server, version_name="v1"), provenance())
    with pytest.raises(VersionExistsError):
        register_model(config(server, version_name="v1", storage_uri="s3://models/elsewhere"), provenance())


def test_without_run_id_or_dataset_hash_no_version_is_taken_for_this_run(server):
    """Nothing tells two runs apart: an existing version goes by the policy, even with equal provenance, but a
    create lost in transit within the call is still recognised (its properties are this record's own)."""
    record = provenance(run_id="", dataset_sha256="")
    server.inject("createModelVersion", after_store=True)
    first = register_model(config(server, version_name="v1"), record)
    assert first.status == "registered" and len(server.store["model_version"]) == 1
    # The same record again (equal properties, registration time included: as two runs within one second).
    with pytest.raises(VersionExistsError, match="no run id recorded"):
        register_model(config(server, version_name="v1"), record)


# --- the token and the transport ---------------------------------------------------------------------------


def test_token_over_plain_http_is_refused_before_any_request(server):
    """is_secure: false is not consent to send the token in clear text."""
    with pytest.raises(
        ConfigError, match=r"allow_insecure_token: .*plain http.*\$MODEL_REGISTRY_TOKEN"
    ) as caught:
        register_model(config(server, allow_insecure_token=False), provenance())
    assert TOKEN not in str(caught.value)
    assert server.requests == []


def test_service_account_token_over_plain_http_is_refused(monkeypatch, tmp_path):
    monkeypatch.delenv("MODEL_REGISTRY_TOKEN", raising=False)
    (tmp_path / "token").write_text("eyJhbGciOiJSUzI1NiJ9.sa-token\n")
    with registry_server(registry_api()) as plain:
        cfg = config(plain, allow_insecure_token=False, token_path=str(tmp_path / "token"))
        with pytest.raises(ConfigError, match=r"service-account token at .*token"):
            register_model(cfg, provenance())
        # a secure setting with an http:// address is plain http all the same
        cfg = config(plain, is_secure=True, allow_insecure_token=False, token_path=str(tmp_path / "token"))
        with pytest.raises(ConfigError, match="plain http"):
            register_model(cfg, provenance())
        assert plain.requests == []


def test_token_over_http_is_sent_when_allowed(server):
    register_model(config(server, version_name="v1", allow_insecure_token=True), provenance())
    assert server.requests and all(r.authorized for r in server.requests)


def test_no_token_over_http_sends_no_authorization_header(monkeypatch, tmp_path):
    """Without a token nothing is sent, not even the token the client would look for by itself
    (``KF_PIPELINES_SA_TOKEN_PATH``)."""
    monkeypatch.delenv("MODEL_REGISTRY_TOKEN", raising=False)
    (tmp_path / "sa-token").write_text("client-found-token")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "sa-token"))
    with registry_server(registry_api()) as plain:
        cfg = config(plain, version_name="v1", allow_insecure_token=False, token_path=str(tmp_path / "none"))
        assert register_model(cfg, provenance()).status == "registered"
        assert plain.requests and not any(r.authorization_sent for r in plain.requests)


def test_address_with_credentials_is_refused():
    with pytest.raises(ConfigError, match="address: the address carries credentials"):
        from_dict(
            RegistryConfig,
            {"address": "http://admin:pw@registry:8080", "model_name": "m", "storage_uri": "s3://b/m"},
        ).validate()


# --- secrets in the provenance -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "recorded", "secrets"),
    [
        (
            "https://reader:hunter2@data.example/train.jsonl",
            "https://***@data.example/train.jsonl",
            ["hunter2", "reader"],
        ),
        (
            "https://b.s3.amazonaws.com/t.jsonl?X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20240101"
            "&X-Amz-Signature=0badc0ffee&X-Amz-Date=20240101T000000Z",
            "https://b.s3.amazonaws.com/t.jsonl?X-Amz-Credential=***&X-Amz-Signature=***"
            "&X-Amz-Date=20240101T000000Z",
            ["AKIAIOSFODNN7EXAMPLE", "0badc0ffee"],
        ),
        (
            "https://acct.blob.core.windows.net/c/t.jsonl?sv=2022-11-02&sig=s1gn3d",
            "https://acct.blob.core.windows.net/c/t.jsonl?sv=2022-11-02&sig=***",
            ["s1gn3d"],
        ),
        ("https://data.example/t.jsonl?token=t0ken", "https://data.example/t.jsonl?token=***", ["t0ken"]),
    ],
    ids=["user-info", "aws-presigned", "azure-sas", "token-query"],
)
def test_dataset_uri_credentials_are_never_recorded(server, tmp_path, uri, recorded, secrets):
    record = provenance(dataset_uri=uri)
    assert record["dataset"]["uri"] == recorded
    register_model(config(server, version_name="v1"), record)
    json_path, card_path = write_provenance(record, tmp_path)
    assert f"- **Dataset:** {recorded}" in card_path.read_text()
    for where in (json_path.read_text(), card_path.read_text(), json.dumps(server.store)):
        assert not [secret for secret in secrets if secret in where]


def test_clean_uris_are_recorded_exactly_as_given():
    record = provenance(
        dataset_uri="hf://squad@refs/pr/1",
        base_model="s3://models/base?endpoint=http://minio:9000&defaultRegion=eu-west-1",
    )
    assert record["dataset"]["uri"] == "hf://squad@refs/pr/1"
    assert record["base_model"] == "s3://models/base?endpoint=http://minio:9000&defaultRegion=eu-west-1"


HF_TOKEN = "hf_" + "a1B2c3D4e5" * 4
SA_TOKEN = "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEifQ.eyJpc3MiOiJrdWJlcm5ldGVzIn0.c2lnbmF0dXJlLXNpZ25hdHVyZQ"


def test_secret_looking_hyperparameter_and_env_values_are_redacted(server, tmp_path):
    hyperparameters = {
        "learning_rate": 2e-5,
        "max_tokens": 4096,  # a token *count*, kept
        "report_to": HF_TOKEN,  # a value shaped like a Hugging Face token, under an innocent key
        "torchrun_args": f"--nproc_per_node=2 --hf_token={HF_TOKEN[:12]}xyz HF_HOME=/cache",
        "env": {"WANDB_API_KEY": "wandb-0123", "OPENAI_KEY": "k-0123", "TOKENIZERS_PARALLELISM": "false"},
        "pod_env": [{"name": "MY_SECRET", "value": "v-0123"}, {"name": "HF_HOME", "value": "/cache"}],
        "header": f"Bearer {SA_TOKEN}",
        "aws": "AKIAIOSFODNN7EXAMPLE",
    }
    record = provenance(hyperparameters=hyperparameters, extra={"model_artifact": {"note": SA_TOKEN}})
    recorded = record["training"]["hyperparameters"]
    assert (recorded["learning_rate"], recorded["max_tokens"]) == (2e-5, 4096)
    assert recorded["env"]["TOKENIZERS_PARALLELISM"] == "false"
    assert recorded["pod_env"][1] == {"name": "HF_HOME", "value": "/cache"}
    assert recorded["torchrun_args"] == "--nproc_per_node=2 --hf_token=*** HF_HOME=/cache"
    register_model(config(server, version_name="v1"), record)
    json_path, card_path = write_provenance(record, tmp_path)
    secrets = [HF_TOKEN, HF_TOKEN[:12], SA_TOKEN, "wandb-0123", "k-0123", "v-0123", "AKIAIOSFODNN7EXAMPLE"]
    for where in (json_path.read_text(), card_path.read_text(), json.dumps(server.store)):
        assert not [secret for secret in secrets if secret in where]


def test_a_record_built_by_hand_is_redacted_when_written(tmp_path):
    record = provenance()
    record["dataset"]["uri"] = "https://u:hunter2@h/x.jsonl"  # after build_provenance
    record["registry"] = {"note": f"token {HF_TOKEN}"}
    json_path, card_path = write_provenance(record, tmp_path)
    for text in (json_path.read_text(), card_path.read_text(), json.dumps(to_custom_properties(record))):
        assert "hunter2" not in text and HF_TOKEN not in text
    assert json.loads(json_path.read_text())["dataset"]["uri"] == "https://***@h/x.jsonl"


@pytest.fixture
def kfp_local(tmp_path):
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "pipeline_root"))
    return tmp_path / "pipeline_root"


@pytest.mark.filterwarnings("ignore:It looks like you're using the remote file:UserWarning")
def test_component_registers_the_model_artifacts_minio_uri_by_default(kfp_local, server, no_s3_env):
    """No storage_uri: the Model artifact's URI (minio:// on a default Kubeflow install) is registered."""
    from kfp import dsl

    from kfp_components.components.registry import register_model as register_component

    @dsl.pipeline(name="register-default-storage")
    def pipeline():
        model = dsl.importer(artifact_uri=MINIO_URI, artifact_class=dsl.Model, reimport=False)
        task = register_component(
            model=model.output,
            base_model_name_or_path="Qwen/Qwen2.5-0.5B",
            dataset_name_or_path="s3://data/train.jsonl",
            dataset_sha256=SHA,
            algorithm="sft",
            model_name="tiny-sft",
            registry_address=server.url,
            registry_is_secure=False,
            registry_allow_insecure_token=True,
            version_name="v1",
            max_attempts=1,
        )
        task.set_env_variable("MODEL_REGISTRY_TOKEN", TOKEN)

    pipeline()
    (artifact,) = server.store["model_artifact"].values()
    expected = "s3://mlpipeline/v2/artifacts/sft-pipeline/run-1234/train-model/model?endpoint=http://minio-service.kubeflow:9000"
    assert artifact["uri"] == expected
    (record,) = kfp_local.rglob("provenance.json")
    data = json.loads(record.read_text())
    assert data["model"]["storage_uri"] == expected
    assert data["extra"]["model_artifact"]["uri"] == MINIO_URI
    assert_all_requests_valid(server)


@pytest.mark.parametrize("with_server", [False, True], ids=["skip", "register"])
def test_component_under_kfp_local(kfp_local, tmp_path, request, with_server):
    from kfp import dsl

    from kfp_components.components.registry import register_model as register_component

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    address = ""
    if with_server:
        address = request.getfixturevalue("server").url

    @dsl.pipeline(name="register-test")
    def pipeline():
        model = dsl.importer(artifact_uri=str(model_dir), artifact_class=dsl.Model, reimport=False)
        task = register_component(
            model=model.output,
            base_model_name_or_path="hf://tiny/model",
            dataset_name_or_path=SIGNED_DATASET_URI,
            dataset_sha256=SHA,
            algorithm="sft",
            model_name="tiny-sft",
            storage_uri="s3://models/tiny-sft",
            hyperparameters={"learning_rate": 0.001, "epochs": 1, "env": {"WANDB_API_KEY": WANDB_KEY}},
            registry_address=address,
            registry_is_secure=False,
            registry_allow_insecure_token=True,
            version_name="v1",
            max_attempts=1,
        )
        task.set_env_variable("MODEL_REGISTRY_TOKEN", TOKEN)

    pipeline()
    provenance_dirs = list(kfp_local.rglob("provenance.json"))
    assert len(provenance_dirs) == 1
    data = json.loads(provenance_dirs[0].read_text())
    assert data["dataset"]["sha256"] == SHA and data["training"]["hyperparameters"]["epochs"] == 1
    card = (provenance_dirs[0].parent / "model_card.md").read_text()
    # the dataset URI is recorded, its credentials are not
    assert data["dataset"]["uri"] == "https://***@data.example/train.jsonl?X-Amz-Signature=***&v=1"
    written = provenance_dirs[0].read_text() + card
    assert "hunter2" not in written and "c1gnature" not in written and WANDB_KEY not in written
    if with_server:
        server = request.getfixturevalue("server")
        version_id = data["registry"]["version_id"]
        assert server.store["model_version"][version_id]["name"] == "v1"
        assert TOKEN not in provenance_dirs[0].read_text()
        stored = json.dumps(server.store)
        assert "hunter2" not in stored and "c1gnature" not in stored and WANDB_KEY not in stored
    else:
        assert "registry" not in data
