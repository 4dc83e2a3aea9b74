"""The local backend runs the same torchrun command a TrainJob runs, as a subprocess."""

from __future__ import annotations

import json
import logging
import re

import pytest
import yaml

from kfp_components.launch.local import (
    LocalTrainingError,
    forward_child_line,
    run_local_training,
    torchrun_command,
)
from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer.config import TrainingConfig

from conftest import SAMPLES


def config(tmp_path, **overrides) -> TrainingConfig:
    options = dict(
        model_name_or_path=str(tiny_model_path("qwen2", 0)),
        data_path=str(SAMPLES / "chat.jsonl"),
        output_dir=str(tmp_path / "run"),
        torch_dtype="float32",
        max_seq_len=256,
        effective_batch_size=8,
        max_tokens_per_gpu=512,
        max_steps=2,
    )
    options.update(overrides)
    return TrainingConfig(**options)


def test_local_backend_trains_and_returns_the_summary(tmp_path, caplog):
    caplog.set_level("INFO")
    summary = run_local_training(config(tmp_path))
    assert summary["steps"] == 2 and (tmp_path / "run" / "final" / "config.json").exists()
    run_yaml = yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())
    assert run_yaml["max_steps"] == 2 and run_yaml["data_path"] == str(SAMPLES / "chat.jsonl")
    steps = [r for r in caplog.records if r.getMessage().startswith("step 2/2 loss")]
    assert steps and steps[0].name == "kfp_components.trainer", "the subprocess's progress reaches our log"
    doubled = [r.getMessage() for r in caplog.records if re.match(r"\d{2}:\d{2}:\d{2} ", r.getMessage())]
    assert doubled == [], "a subprocess log line keeps its own timestamp as well as ours"
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary


def test_local_backend_failure_quotes_the_last_lines(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "not a list"}\n')
    with pytest.raises(LocalTrainingError, match=r"exit code 1.*last lines:(.|\n)*bad.jsonl:1"):
        run_local_training(config(tmp_path, data_path=str(bad)))


def test_torchrun_command_is_the_trainer_entry_point(tmp_path):
    command = torchrun_command(tmp_path / "run.yaml", nproc_per_node=4, python="python3")
    assert command == [
        "python3",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=4",
        "-m",
        "kfp_components.trainer",
        "--config",
        str(tmp_path / "run.yaml"),
    ]


def test_child_log_lines_are_logged_once_with_their_level_and_name(caplog):
    caplog.set_level("INFO")
    forward_child_line("12:00:01 INFO kfp_components.trainer: step 1/2 loss 6.9142 lr 0.003")
    forward_child_line("12:00:02 WARNING kfp_components.trainer.train: use_liger: no GPU")
    forward_child_line("Traceback (most recent call last):")
    forward_child_line("12:00:03 is not a log line")
    got = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert got == [
        ("kfp_components.trainer", logging.INFO, "step 1/2 loss 6.9142 lr 0.003"),
        ("kfp_components.trainer.train", logging.WARNING, "use_liger: no GPU"),
        ("kfp_components.launch.local", logging.INFO, "Traceback (most recent call last):"),
        ("kfp_components.launch.local", logging.INFO, "12:00:03 is not a log line"),
    ]
