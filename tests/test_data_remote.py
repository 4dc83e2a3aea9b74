"""s3:// against moto's S3 server and http(s):// against a local HTTP server, through the real clients."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kfp_components.data import DatasetConfig, DatasetError, prepare_dataset
from kfp_components.testing.servers import http_file_server

from conftest import chat, write_jsonl


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def bucket(s3):
    client = s3.client()
    name = "datasets"
    if name not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=name)
    return client, name


def test_s3_single_object(tmp_path, s3_env, bucket, caplog):
    client, name = bucket
    client.put_object(
        Bucket=name,
        Key="chat/train.jsonl",
        Body="".join(json.dumps(chat(f"q{i}")) + "\n" for i in range(6)).encode(),
    )
    with caplog.at_level(logging.DEBUG):
        result = prepare_dataset(
            DatasetConfig(f"s3://{name}/chat/train.jsonl", train_split_ratio=1.0),
            tmp_path / "t",
            tmp_path / "e",
        )
    assert result.metrics["train_rows"] == 6 and result.files == ["train.jsonl"]
    assert s3_env.secret_key not in caplog.text, "the secret key must not reach any log, even at DEBUG"
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("kfp_components"))
    assert "downloaded s3://datasets/chat/train.jsonl" in ours and s3_env.access_key not in ours


def test_s3_prefix_of_shards_in_key_order(tmp_path, s3_env, bucket):
    client, name = bucket
    for shard in (2, 0, 1):
        table = pa.Table.from_pylist([chat(f"shard{shard}-{i}") for i in range(3)])
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        client.put_object(Bucket=name, Key=f"shards/part-{shard}.parquet", Body=sink.getvalue().to_pybytes())
    client.put_object(Bucket=name, Key="shards/_SUCCESS", Body=b"")
    result = prepare_dataset(
        DatasetConfig(f"s3://{name}/shards", train_split_ratio=1.0), tmp_path / "t", tmp_path / "e"
    )
    assert result.files == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]
    assert [r["messages"][0]["content"] for r in _rows(tmp_path / "t")][:4] == [
        "shard0-0",
        "shard0-1",
        "shard0-2",
        "shard1-0",
    ]


def test_s3_missing_key_and_bucket(tmp_path, s3_env, bucket):
    _, name = bucket
    with pytest.raises(DatasetError, match="no object with that key and no data files under that prefix"):
        prepare_dataset(DatasetConfig(f"s3://{name}/absent/x.jsonl"), tmp_path / "t", tmp_path / "e")
    with pytest.raises(DatasetError, match="NoSuchBucket"):
        prepare_dataset(DatasetConfig("s3://no-such-bucket/x.jsonl"), tmp_path / "t", tmp_path / "e")


def test_s3_without_credentials_says_which_variables(tmp_path, s3_env, monkeypatch):
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(variable)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(
        DatasetError, match="no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    ):
        prepare_dataset(DatasetConfig("s3://datasets/x.jsonl"), tmp_path / "t", tmp_path / "e")


def test_s3_endpoint_from_aws_endpoint_url(tmp_path, s3_env, bucket, monkeypatch):
    client, name = bucket
    client.put_object(Bucket=name, Key="alt.jsonl", Body=(json.dumps(chat()) + "\n").encode())
    monkeypatch.delenv("AWS_S3_ENDPOINT")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint)
    result = prepare_dataset(DatasetConfig(f"s3://{name}/alt.jsonl"), tmp_path / "t", tmp_path / "e")
    assert result.metrics["rows_read"] == 1


def test_http_file(tmp_path):
    write_jsonl(tmp_path / "www" / "data.jsonl", [chat(f"q{i}") for i in range(10)])
    with http_file_server(tmp_path / "www") as server:
        result = prepare_dataset(
            DatasetConfig(f"{server.url}/data.jsonl", seed=3, train_split_ratio=0.8),
            tmp_path / "t",
            tmp_path / "e",
        )
    assert (result.metrics["train_rows"], result.metrics["eval_rows"]) == (8, 2)
    assert result.source == f"{server.url}/data.jsonl"


def test_http_retries_transient_errors(tmp_path, monkeypatch):
    monkeypatch.setattr("kfp_components.data.fetch.time.sleep", lambda seconds: None)
    write_jsonl(tmp_path / "www" / "data.jsonl", [chat()])
    with http_file_server(tmp_path / "www", fail_first=2) as server:
        result = prepare_dataset(DatasetConfig(f"{server.url}/data.jsonl"), tmp_path / "t", tmp_path / "e")
    assert result.metrics["rows_read"] == 1 and len(server.requests) == 3


def test_http_404_and_unreachable_hide_credentials(tmp_path, monkeypatch):
    monkeypatch.setattr("kfp_components.data.fetch.time.sleep", lambda seconds: None)
    (tmp_path / "www").mkdir()
    with http_file_server(tmp_path / "www") as server:
        url = server.url.replace("http://", "http://user:s3cret@") + "/missing.jsonl?token=abc"
        with pytest.raises(DatasetError) as raised:
            prepare_dataset(DatasetConfig(url), tmp_path / "t", tmp_path / "e")
    assert (
        "HTTP 404" in str(raised.value)
        and "s3cret" not in str(raised.value)
        and "abc" not in str(raised.value)
    )
    with pytest.raises(DatasetError, match="could not download after 3 attempts"):
        prepare_dataset(DatasetConfig("http://127.0.0.1:9/x.jsonl"), tmp_path / "t", tmp_path / "e")
