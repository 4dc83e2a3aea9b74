"""No credential reaches a record: a multi-stage run and the training step, each on a tiny model, read data
through a private HTTP server (Basic auth in the URI's user info, a signed query) with secrets in the
environment too; then every file they wrote and every log line they produced is searched for the secrets.

No ``from __future__ import annotations`` here: KFP reads the annotations of the test pipeline."""

import dataclasses
import io
import json
import logging
import re
from pathlib import Path

import pytest
from kfp import dsl, local

from kfp_components.orchestration import Pipeline, StageFailedError, pipeline_config_from_dict
from kfp_components.orchestration.cli import main
from kfp_components.stages import BaseStage, StageConfig, StageResult, register_stage, unregister_stage
from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.typed_config import ConfigError

from conftest import SAMPLES
from doubles.private_file_server import Credentials, private_file_server

#: Secrets a pod gets from its environment (Kubernetes secrets); they must not be written down either.
ENV_SECRETS = {
    "HF_TOKEN": "hf_envTokenZ81kQm3vX9",
    "AWS_SECRET_ACCESS_KEY": "awsEnvSecret/Jq7+Lr2Tn5Wp",
    "OPENAI_API_KEY": "sk-envKey3Hh8Ff1Dd6",
}
#: What makes a training stage tiny.
SMALL = {
    "max_steps": 2,
    "effective_batch_size": 4,
    "max_tokens_per_gpu": 512,
    "max_seq_len": 256,
    "use_liger": False,
}


@pytest.fixture(scope="module")
def tiny() -> str:
    return str(tiny_model_path("qwen2", 0))


@pytest.fixture
def env_secrets(monkeypatch) -> list[str]:
    for name, value in ENV_SECRETS.items():
        monkeypatch.setenv(name, value)
    return list(ENV_SECRETS.values())


@pytest.fixture
def www(tmp_path) -> Path:
    folder = tmp_path / "www"
    folder.mkdir()
    for name in ("chat.jsonl", "preference.jsonl"):
        (folder / name).write_bytes((SAMPLES / name).read_bytes())
    return folder


def leaks(secrets: list[str], *, folder: Path | None = None, text: str = "") -> dict[str, list[str]]:
    """Where each secret appears: every file under ``folder`` (read as bytes) and ``text``."""
    found: dict[str, list[str]] = {}
    if folder is not None:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                hits = [s for s in secrets if s.encode() in data]
                if hits:
                    found[str(path.relative_to(folder))] = hits
    hits = [s for s in secrets if s in text]
    if hits:
        found["<logs>"] = hits
    return found


def all_secrets(credentials: Credentials, env: list[str]) -> list[str]:
    return [*credentials.secrets(), *env]


# ------------------------------------------------------------------------------------------------------
# The multi-stage runner
# ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_multistage_run_records_no_credential(tiny, www, tmp_path, env_secrets, caplog, capfd):
    """sft in the pipeline's process, then dpo under torchrun (run.yaml), on data behind Basic auth and a
    signed query: pipeline_config.json, pipeline_state.json, pipeline_training.log, every stage's files
    and the console hold no secret; nor do they after a rerun with a freshly signed link for dpo."""
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "run"
    with private_file_server(www) as server:
        config = {
            "model_name_or_path": tiny,
            "output_dir": str(out),
            "torch_dtype": "float32",
            "stages": ["sft", "dpo"],
            "stage_configs": {
                "sft": {
                    "dataset_name_or_path": server.url("chat.jsonl"),
                    "eval_dataset_name_or_path": server.url("chat.jsonl", part="eval"),
                    **SMALL,
                },
                "dpo": {"dataset_name_or_path": server.url("preference.jsonl"), "nproc_per_node": 1, **SMALL},
            },
        }
        args = ["--config", str(write_yaml(tmp_path / "pipeline.yaml", config))]
        assert main(args) == 0
        assert len(server.granted) == 3 and not server.refused, "the credentials reached the server"
    captured = capfd.readouterr()
    secrets = all_secrets(server.credentials, env_secrets)
    assert (out / "stages" / "02_dpo" / "run.yaml").is_file()
    assert leaks(secrets, folder=out, text=caplog.text + captured.out + captured.err) == {}
    recorded = json.loads((out / "pipeline_config.json").read_text())
    assert recorded["stage_configs"]["sft"]["dataset_name_or_path"] == (
        f"http://***@{server.host}/chat.jsonl?X-Amz-Signature=***&sig=***"
    ), "the record still says where the data came from"

    # A rerun with new credentials for dpo's data (a new password, a freshly signed link): sft is reused, dpo
    # runs again (its option changed), and the state keeps the options only as digests.
    fresh = Credentials(password="pw-Rotated-0e55", signature="0a1b2c3d4e5f", sig="svNEWsig")
    before = json.loads((out / "pipeline_state.json").read_text())["stages"]
    port = int(server.host.rsplit(":", 1)[1])
    with private_file_server(www, fresh, port=port) as server:
        config["stage_configs"]["dpo"]["dataset_name_or_path"] = server.url("preference.jsonl")
        assert main(["--config", str(write_yaml(tmp_path / "pipeline.yaml", config))]) == 0
        assert server.granted == ["/preference.jsonl"] and not server.refused
    after = json.loads((out / "pipeline_state.json").read_text())["stages"]
    assert after["sft"]["finished_at"] == before["sft"]["finished_at"]
    assert after["dpo"]["fingerprint"] != before["dpo"]["fingerprint"]
    assert all(re.fullmatch(r"[0-9a-f]{16}", entry["fingerprint"]) for entry in after.values())
    captured = capfd.readouterr()
    assert "skipping stage 'sft'" in (out / "pipeline_training.log").read_text()
    assert (
        leaks([*secrets, *fresh.secrets()], folder=out, text=caplog.text + captured.out + captured.err) == {}
    )


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


@dataclasses.dataclass(kw_only=True)
class EndpointStageConfig(StageConfig):
    """A custom stage that calls an endpoint (a judge, say).

    Attributes:
        endpoint: The endpoint's URL, with its credentials.
        api_key: A key the endpoint wants.
    """

    endpoint: str = ""
    api_key: str = ""


class EndpointStage(BaseStage):
    """Fails the way a client library does: its message quotes the URL it could not reach."""

    stage_name = "endpoint"
    config_class = EndpointStageConfig

    def execute(self, model: str, tokenizer: str, previous_result: StageResult | None) -> StageResult:
        config = self.config
        assert isinstance(config, EndpointStageConfig)
        self.log.info("calling %s", config.endpoint)
        raise ConnectionError(f"HTTPSConnectionPool: max retries exceeded with url: {config.endpoint}")


@pytest.fixture
def endpoint_stage():
    register_stage("endpoint", EndpointStage)
    yield
    unregister_stage("endpoint")


def test_a_failed_stage_records_no_credential(
    tiny, www, tmp_path, env_secrets, endpoint_stage, caplog, capfd
):
    """A stage that fails with its endpoint's URL (credentials and all) in the message: the state's error,
    the log (with the traceback), the StageFailedError and the CLI's message hold no secret."""
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "run"
    credentials = Credentials()
    key = "sk-optionKey-77Gh2"
    with private_file_server(www, credentials) as server:
        endpoint = server.url("v1/judge")
        data = {
            "model_name_or_path": tiny,
            "output_dir": str(out),
            "stages": ["endpoint"],
            "stage_configs": {"endpoint": {"endpoint": endpoint, "api_key": key}},
        }
        with pytest.raises(StageFailedError) as info:
            Pipeline(pipeline_config_from_dict(data)).run()
        assert main(["--config", str(write_yaml(tmp_path / "pipeline.yaml", data))]) == 1
    captured = capfd.readouterr()
    secrets = [*all_secrets(credentials, env_secrets), key]
    assert leaks(secrets, folder=out, text=caplog.text + captured.out + captured.err + str(info.value)) == {}
    entry = json.loads((out / "pipeline_state.json").read_text())["stages"]["endpoint"]
    assert entry["status"] == "failed" and f"http://***@{server.host}/v1/judge" in entry["error"]
    assert "ConnectionError" in (out / "pipeline_training.log").read_text()


def test_a_model_reference_with_credentials_is_named_without_them(www, tmp_path, env_secrets, capfd):
    """A dry run of a model that cannot load: the problem names the model without its credentials."""
    credentials = Credentials()
    with private_file_server(www, credentials) as server:
        model = server.url("models/base")
        args = [
            "--config",
            str(
                write_yaml(
                    tmp_path / "p.yaml",
                    {
                        "model_name_or_path": model,
                        "output_dir": str(tmp_path / "run"),
                        "stages": ["sft"],
                        "stage_configs": {"sft": {"dataset_name_or_path": server.url("chat.jsonl"), **SMALL}},
                    },
                )
            ),
        ]
        assert main([*args, "--dry_run"]) == 2
        assert main(args) == 2
    captured = capfd.readouterr()
    assert "model_name_or_path" in captured.err
    assert (
        leaks(
            all_secrets(credentials, env_secrets), folder=tmp_path / "run", text=captured.out + captured.err
        )
        == {}
    )


# ------------------------------------------------------------------------------------------------------
# The training step
# ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_step_records_no_credential(tiny, www, tmp_path, env_secrets, capfd):
    """dataset_download reads the private server, train_model trains with the local backend (kfp.local): no
    file of the run (the Model artifact's metadata with training_config included) and no log line holds a
    secret."""
    from kfp_components.components.dataset import dataset_download
    from kfp_components.components.training import train_model

    @dsl.pipeline
    def fetch_and_train(uri: str, model: str):
        data = dataset_download(dataset_name_or_path=uri, train_split_ratio=0.8)
        train_model(
            train_dataset=data.outputs["train_dataset"],
            eval_dataset=data.outputs["eval_dataset"],
            model_name_or_path=model,
            algorithm="sft",
            backend="local",
            effective_batch_size=4,
            max_steps=2,
            max_seq_len=256,
            max_tokens_per_gpu=512,
            torch_dtype="float32",
            use_liger=False,
        )

    root = tmp_path / "root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    credentials = Credentials()
    with private_file_server(www, credentials) as server:
        uri = server.url("chat.jsonl")
        fetch_and_train(uri=uri, model=tiny)
        assert server.granted, "the credentials reached the server"
    captured = capfd.readouterr()
    # KFP's executor logs its input, parameter values included, before any code of ours runs (KFP keeps them
    # in the run's details and the pod's spec as well): that one dump of dataset_download's input is KFP's.
    kfp_dump = f'"dataset_name_or_path": "{uri}"'
    assert (captured.out + captured.err).count(kfp_dump) == 1
    logs = (captured.out + captured.err).replace(kfp_dump, "")
    (run_dir,) = root.iterdir()
    outputs = json.loads((run_dir / "train-model" / "executor_output.json").read_text())["artifacts"]
    metadata = outputs["model"]["artifacts"][0]["metadata"]
    assert metadata["training_config"]["max_steps"] == 2
    assert leaks(all_secrets(credentials, env_secrets), folder=root, text=logs) == {}


@pytest.mark.parametrize("option", ["model_name_or_path", "ref_model_name_or_path"])
def test_training_step_names_a_model_reference_without_its_credentials(
    option, tiny, tmp_path, env_secrets, caplog
):
    """A model reference (the model, or DPO's reference model) with credentials: the error names the option
    and the reference without them, and nothing is written."""
    from kfp_components.launch.step import run_train_model_step

    credentials = Credentials()
    reference = f"https://{credentials.user}:{credentials.password}@hub.example/m?sig={credentials.sig}"
    train = tmp_path / "in" / "train.jsonl"
    train.parent.mkdir()
    train.write_bytes((SAMPLES / "preference.jsonl").read_bytes())
    options = {"model_name_or_path": tiny, "algorithm": "dpo", "torch_dtype": "float32", "use_liger": False}
    training_options = {}
    if option == "model_name_or_path":
        options[option] = reference
    else:
        training_options[option] = reference
    with pytest.raises(ConfigError) as info:
        run_train_model_step(
            train_data=train,
            eval_data=None,
            model_dir=tmp_path / "out" / "model",
            backend="local",
            options=options,
            training_options=training_options,
            trainjob_options={},
            stage="train-dpo",
        )
    message = str(info.value)
    assert f"{option}: 'https://***@hub.example/m?sig=***'" in message
    assert not (tmp_path / "out").exists()
    assert leaks(all_secrets(credentials, env_secrets), text=message + caplog.text) == {}


# ------------------------------------------------------------------------------------------------------
# The last line of defence: the log filter, on a host's own handlers
# ------------------------------------------------------------------------------------------------------


def test_log_filter_on_a_host_that_set_up_logging_is_on_only_while_a_pipeline_runs(
    tiny, tmp_path, endpoint_stage
):
    """Pipeline.run (the Python API, no configure_logging) redacts on the host's own handlers while it runs,
    the failed stage's traceback included, and takes the filter off again afterwards."""
    from kfp_components.logs import RedactSecrets

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    credentials = Credentials()
    endpoint = f"https://{credentials.user}:{credentials.password}@judge.example/v1?sig={credentials.sig}"
    data = {
        "model_name_or_path": tiny,
        "output_dir": str(tmp_path / "run"),
        "stages": ["endpoint"],
        "stage_configs": {"endpoint": {"endpoint": endpoint}},
    }
    try:
        with pytest.raises(StageFailedError):
            Pipeline(pipeline_config_from_dict(data)).run()
    finally:
        root.removeHandler(handler)
    assert not any(isinstance(f, RedactSecrets) for f in handler.filters), "the host's handler is as it was"
    assert "ConnectionError: HTTPSConnectionPool" in stream.getvalue()
    assert "https://***@judge.example/v1?sig=***" in stream.getvalue()
    assert leaks(credentials.secrets(), folder=tmp_path / "run", text=stream.getvalue()) == {}
