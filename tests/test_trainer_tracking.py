"""Experiment tracking (``report_to``): TensorBoard event files that protobuf's own parser (and TensorBoard's
reader, where installed) reads, holding every scalar of metrics.jsonl; MLflow runs on a local tracking
server with the params and every step's metrics."""

from __future__ import annotations

import json
import logging
import shutil
import struct
import time
from pathlib import Path

import pytest

from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer import tensorboard_events as tb
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.tracking import MlflowTracker, scalars_of
from kfp_components.trainer.train import train
from kfp_components.typed_config import ConfigError, from_dict

from conftest import SAMPLES
from doubles.mlflow_server import mlflow_server


def config(tmp_path: Path, **overrides) -> TrainingConfig:
    options = {
        "model_name_or_path": str(tiny_model_path("qwen2", 0)),
        "data_path": str(SAMPLES / "chat.jsonl"),
        "eval_data_path": str(SAMPLES / "chat.jsonl"),
        "output_dir": str(tmp_path / "run"),
        "torch_dtype": "float32",
        "max_seq_len": 256,
        "effective_batch_size": 8,
        "max_tokens_per_gpu": 256,
        "learning_rate": 3e-3,
        "max_steps": 3,
        "eval_steps": 2,
        "seed": 0,
    }
    options.update(overrides)
    return TrainingConfig(**options)


def metrics_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected_scalars(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in scalars_of(record).items():
            expected.setdefault(key, []).append((record["step"], value))
    return expected


def event_classes():
    """Event, Summary and Summary.Value built with protobuf from their field numbers in TensorFlow's
    event.proto and summary.proto: an independent decoder of what tensorboard_events encodes by hand."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="tb_event_test.proto", package="tbtest", syntax="proto3")
    summary = proto.message_type.add(name="Summary")
    value = summary.nested_type.add(name="Value")
    value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
    summary.field.add(
        name="value", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED, type_name=".tbtest.Summary.Value"
    )
    event = proto.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    event.field.add(
        name="summary", number=5, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL, type_name=".tbtest.Summary"
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tbtest.Event"))


def protobuf_scalars(folder: Path) -> tuple[list[str], dict[str, list[tuple[int, float]]]]:
    """The file versions and scalars of the event files in ``folder``, read with protobuf and zlib-free
    TFRecord framing checked against the spec's masked CRC-32C."""
    event_class = event_classes()
    versions, scalars = [], {}
    for path in sorted(folder.glob("*tfevents*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            payload = data[offset + 12 : offset + 12 + length]
            offset += 12 + length + 4
            event = event_class.FromString(payload)
            if event.file_version:
                versions.append(event.file_version)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return versions, scalars


def close_enough(got, want):
    assert [s for s, _ in got] == [s for s, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-30)  # float32 in the event file


# ------------------------------------------------------------------------------------------- event format


def test_crc32c_and_record_framing_match_the_tfrecord_spec():
    assert tb.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert tb.crc32c(b"") == 0
    record = tb.tfrecord(b"abc")
    assert record[:8] == struct.pack("<Q", 3) and record[12:15] == b"abc" and len(record) == 19
    assert list(tb.read_records_from_bytes(record * 2)) == [b"abc", b"abc"]
    broken = bytearray(record)
    broken[13] ^= 1
    with pytest.raises(ValueError, match="bad payload checksum"):
        list(tb.read_records_from_bytes(bytes(broken)))


def test_event_files_parse_with_protobuf(tmp_path):
    writer = tb.EventFileWriter(tmp_path / "tb")
    writer.add_scalars(1, {"loss": 2.5, "reward/exact/mean": 0.25}, wall_time=1000.0)
    writer.add_scalars(2, {"loss": 1.5}, wall_time=1001.0)
    writer.add_scalars(3, {})  # nothing to write
    writer.close()
    versions, scalars = protobuf_scalars(tmp_path / "tb")
    assert versions == ["brain.Event:2"]
    assert scalars == {"loss": [(1, 2.5), (2, 1.5)], "reward/exact/mean": [(1, 0.25)]}
    assert tb.read_scalars(tmp_path / "tb") == scalars
    assert "tfevents" in writer.path.name


def test_event_files_parse_with_tensorboards_reader(tmp_path):
    loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
    writer = tb.EventFileWriter(tmp_path / "tb")
    writer.add_scalars(7, {"loss": 0.5})
    writer.close()
    events = list(loader.LegacyEventFileLoader(str(writer.path)).Load())
    assert events[0].file_version == "brain.Event:2"
    assert events[1].step == 7 and events[1].summary.value[0].tag == "loss"
    assert events[1].summary.value[0].simple_value == 0.5


# ---------------------------------------------------------------------------------------------- options


def test_report_to_defaults_to_tensorboard_and_refuses_unknown_names(tmp_path):
    assert config(tmp_path).report_to == ["tensorboard"]
    base = {"model_name_or_path": "m", "data_path": "d", "output_dir": "o"}
    with pytest.raises(ConfigError) as info:
        from_dict(TrainingConfig, {**base, "report_to": ["tensorboard", "wandb"]})
    assert "report_to[1]" in str(info.value) and "mlflow" in str(info.value)
    with pytest.raises(ConfigError, match="report_to: tensorboard is listed more than once"):
        config(tmp_path, report_to=["tensorboard", "tensorboard"]).validate()
    with pytest.raises(ConfigError, match=r"report_to\[0\]"):
        config(tmp_path, report_to=["wandb"]).validate()


def test_mlflow_without_a_tracking_uri_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="report_to: mlflow needs MLFLOW_TRACKING_URI"):
        train(config(tmp_path, report_to=["mlflow"]))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------------ runs


def test_training_writes_every_scalar_of_metrics_jsonl_as_tensorboard_events(tmp_path):
    train(config(tmp_path))
    run_dir = tmp_path / "run"
    records = metrics_records(run_dir)
    expected = expected_scalars(records)
    assert {"loss", "lr", "tokens_per_second", "grad_norm", "eval_loss", "epoch"} <= set(expected)
    assert [s for s, _ in expected["eval_loss"]] == [2, 3]
    versions, scalars = protobuf_scalars(run_dir / "tensorboard")
    assert versions == ["brain.Event:2"]
    assert set(scalars) == set(expected)
    for tag, points in expected.items():
        close_enough(scalars[tag], points)


def test_no_event_files_with_report_to_empty(tmp_path):
    train(config(tmp_path, report_to=[], max_steps=1, eval_steps=0, eval_data_path=""))
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_a_resumed_run_rewrites_the_event_files_as_one_series(tmp_path):
    options = {"checkpoint_every_steps": 2, "eval_steps": 0, "eval_data_path": "", "max_steps": 4}
    train(config(tmp_path, **options))
    run_dir = tmp_path / "run"
    # As if the first attempt had stopped after writing step 4's metrics but before its checkpoint: a second
    # attempt resumes at step 2; the first attempt's events give way to one series.
    shutil.rmtree(run_dir / "checkpoints" / "step-00000004")
    train(config(tmp_path, resume=True, **options))
    _, scalars = protobuf_scalars(run_dir / "tensorboard")
    assert len(list((run_dir / "tensorboard").glob("*tfevents*"))) == 1
    close_enough(scalars["loss"], expected_scalars(metrics_records(run_dir))["loss"])
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4]


def test_mlflow_gets_the_params_and_every_steps_metrics(tmp_path, monkeypatch):
    with mlflow_server() as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "fine-tuning")
        train(config(tmp_path, report_to=["tensorboard", "mlflow"], run_name="run-42-train-sft"))
    run = server.run_named("run-42-train-sft")
    (experiment,) = [e for e in server.experiments.values() if e["name"] == "fine-tuning"]
    assert run["info"]["experiment_id"] == experiment["experiment_id"]
    assert run["info"]["status"] == "FINISHED"
    assert run["params"]["learning_rate"] == "0.003" and run["params"]["algorithm"] == "sft"
    assert run["params"]["report_to"] == "['tensorboard', 'mlflow']"
    expected = expected_scalars(metrics_records(tmp_path / "run"))
    for key, points in expected.items():
        assert server.history(run, key) == [(s, pytest.approx(v)) for s, v in points], key
    assert (tmp_path / "run" / "tensorboard").is_dir()


def test_an_mlflow_run_is_named_after_the_output_folder_without_run_name(tmp_path, monkeypatch):
    with mlflow_server() as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        train(config(tmp_path, report_to=["mlflow"], max_steps=1, eval_steps=0, eval_data_path=""))
    run = server.run_named("run")
    assert run["info"]["experiment_id"] == "0" and server.history(run, "loss")


def test_an_mlflow_outage_mid_run_neither_stops_training_nor_loses_metrics(tmp_path, monkeypatch, caplog):
    with mlflow_server(fail_log_batch=3) as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        with caplog.at_level(logging.WARNING, logger="kfp_components.trainer"):
            train(config(tmp_path, report_to=["mlflow"], run_name="flaky", eval_steps=0, eval_data_path=""))
    run = server.run_named("flaky")
    assert "could not log" in caplog.text
    expected = expected_scalars(metrics_records(tmp_path / "run"))
    assert server.history(run, "loss") == [(s, pytest.approx(v)) for s, v in expected["loss"]]


def test_a_slow_mlflow_server_does_not_delay_the_training_loop(tmp_path, monkeypatch):
    """Every request takes 1 s on the server: handing the start and five records over takes a fraction of
    that (the sending thread waits, not the loop), and close still delivers every metric and the end."""
    with mlflow_server(latency_seconds=1.0) as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        tracker = MlflowTracker(config(tmp_path, report_to=["mlflow"]), "slow")
        started = time.monotonic()
        tracker.start([{"step": 0, "loss": 2.0}], resumed=False)
        for step in range(1, 6):
            tracker.write({"step": step, "loss": 1.0 / step})
        handed_over = time.monotonic() - started
        tracker.close("FINISHED")
    assert handed_over < 0.5, handed_over
    run = server.run_named("slow")
    assert run["info"]["status"] == "FINISHED"
    assert server.history(run, "loss") == [(0, 2.0)] + [(s, pytest.approx(1.0 / s)) for s in range(1, 6)]


def test_an_mlflow_server_that_fails_neither_blocks_nor_fails_the_loop(tmp_path, monkeypatch, caplog):
    """Every log-batch answered 503 after a delay: the records are handed over at once, close gives up after
    its flush bound with a warning, and nothing is raised; a full queue drops records and says so."""
    with mlflow_server(fail_log_batch=10**9, latency_seconds=0.3) as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        tracker = MlflowTracker(
            config(tmp_path, report_to=["mlflow"]), "down", max_records=3, flush_seconds=1.5
        )
        with caplog.at_level(logging.WARNING, logger="kfp_components.trainer"):
            started = time.monotonic()
            tracker.start([], resumed=False)
            for step in range(1, 21):
                tracker.write({"step": step, "loss": 1.0})
            handed_over = time.monotonic() - started
            tracker.close("FINISHED")
            closed = time.monotonic() - started
    assert handed_over < 0.5, handed_over
    assert closed < 1.5 + 1.0, closed  # the flush bound, not the server's pace
    assert tracker.dropped > 0 and "dropped" in caplog.text
