"""The dataset_download component runs for real under kfp.local, against the local S3 and HTTP servers."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from pathlib import Path

import pytest
from kfp import local

from kfp_components.components.dataset import dataset_download
from kfp_components.data import DatasetConfig
from kfp_components.testing.servers import http_file_server

from conftest import chat, write_jsonl


@pytest.fixture
def kfp_local(tmp_path):
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "pipeline_root"))
    return tmp_path / "pipeline_root"


def test_component_reads_s3_and_writes_artifacts(kfp_local, s3_env, capfd):
    client = s3_env.client()
    client.create_bucket(Bucket="component-data")
    body = "".join(json.dumps(chat(f"q{i}", f"a{i}")) + "\n" for i in range(20))
    client.put_object(Bucket="component-data", Key="sft/train.jsonl", Body=body.encode())

    task = dataset_download(
        dataset_name_or_path="s3://component-data/sft/train.jsonl", train_split_ratio=0.75, seed=1
    )

    assert task.outputs["data_format"] == "messages"
    assert (task.outputs["train_rows"], task.outputs["eval_rows"]) == (15, 5)
    train = task.outputs["train_dataset"]
    train_bytes = Path(train.path).read_bytes()
    assert hashlib.sha256(train_bytes).hexdigest() == task.outputs["train_sha256"] == train.metadata["sha256"]
    assert len(Path(task.outputs["eval_dataset"].path).read_text().splitlines()) == 5
    metrics = task.outputs["metrics"].metadata
    assert metrics["rows_read"] == 20 and metrics["rows_dropped"] == 0
    assert s3_env.secret_key not in capfd.readouterr().err


def test_component_reads_http_and_drops_invalid_rows(kfp_local, tmp_path):
    rows = [chat(f"q{i}") for i in range(9)] + [{"messages": [{"role": "user", "content": "unanswered"}]}]
    write_jsonl(tmp_path / "www" / "chat.jsonl", rows)
    with http_file_server(tmp_path / "www") as server:
        task = dataset_download(
            dataset_name_or_path=f"{server.url}/chat.jsonl", dataset_on_invalid="drop", train_split_ratio=1.0
        )
    assert task.outputs["train_rows"] == 9 and task.outputs["eval_rows"] == 0
    assert task.outputs["metrics"].metadata["rows_dropped"] == 1


def test_component_failure_names_the_line(kfp_local, tmp_path, capfd):
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat(), {"messages": [{"role": "wizard", "content": "x"}]}])
    with pytest.raises(RuntimeError, match="dataset-download"):
        dataset_download(dataset_name_or_path=str(bad))
    assert "bad.jsonl:2: messages[0].role: 'wizard' is not one of" in capfd.readouterr().out


def test_component_arguments_are_the_dataset_options_by_name_and_default():
    """One name and one default per option: the component's arguments are DatasetConfig's fields."""
    outputs = {"train_dataset", "eval_dataset", "metrics"}
    arguments = {
        name: parameter.default
        for name, parameter in inspect.signature(dataset_download.python_func).parameters.items()
        if name not in outputs
    }
    options = {
        field.name: field.default if field.default is not dataclasses.MISSING else inspect.Parameter.empty
        for field in dataclasses.fields(DatasetConfig)
    }
    assert arguments == options
