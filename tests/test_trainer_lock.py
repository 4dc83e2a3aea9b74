"""One run per output folder: the folder lock (``kfp_components.locking``) with real processes, the trainer
and ``fnsft-train`` holding it, and torchrun's ranks failing together when another run holds it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from kfp_components.locking import (
    LOCK_FILE,
    FolderLockedError,
    acquire_folder_lock,
    hold_folder_lock,
    release_folder_lock,
)
from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer.cli import fnsft_train_main
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.train import train

from conftest import SAMPLES

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def options(output_dir: Path, **overrides) -> dict:
    values = {
        "model_name_or_path": str(tiny_model_path("qwen2", 0)),
        "data_path": str(SAMPLES / "chat.jsonl"),
        "output_dir": str(output_dir),
        "torch_dtype": "float32",
        "max_seq_len": 256,
        "effective_batch_size": 8,
        "max_tokens_per_gpu": 256,
        "learning_rate": 3e-3,
        "lr_scheduler": "constant",
        "max_steps": 3,
        "seed": 0,
    }
    values.update(overrides)
    return values


def holder(folder: Path) -> subprocess.Popen:
    """Another process that takes ``folder``'s lock and keeps it until it is killed."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from kfp_components.locking import acquire_folder_lock
        acquire_folder_lock({str(folder)!r}, purpose="holder")
        print("held", flush=True)
        time.sleep(600)
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "held", process.stderr
    return process


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def test_a_live_holder_blocks_and_is_named_a_killed_one_does_not(tmp_path):
    folder = tmp_path / "out"
    other = holder(folder)
    try:
        started = time.monotonic()
        with pytest.raises(FolderLockedError) as caught:
            acquire_folder_lock(folder, purpose="training")
        assert time.monotonic() - started < 5  # at once, not after a wait
        error = caught.value
        assert error.path == "output_dir" and error.holder["pid"] == other.pid
        assert f"pid {other.pid} on host {socket.gethostname()}, holder since " in str(error)
        assert "in use by another run" in str(error)
    finally:
        kill(other)  # kill -9: the OS releases the lock; the lock file with the dead holder's record stays
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == other.pid
    with hold_folder_lock(folder, purpose="training"):
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_the_lock_is_reentrant_in_a_process_and_the_last_release_frees_it(tmp_path):
    folder = tmp_path / "out"
    probe = [sys.executable, "-c", f"from kfp_components.locking import acquire_folder_lock; "
             f"acquire_folder_lock({str(folder)!r}, purpose='probe')"]  # fmt: skip
    acquire_folder_lock(folder, purpose="fnsft-train")
    acquire_folder_lock(folder, purpose="training")  # the same process again: fine
    release_folder_lock(folder)
    blocked = subprocess.run(probe, env=ENV, capture_output=True, text=True, timeout=60)
    assert blocked.returncode != 0 and "FolderLockedError" in blocked.stderr
    assert f"pid {os.getpid()}" in blocked.stderr and "fnsft-train since" in blocked.stderr
    release_folder_lock(folder)
    assert subprocess.run(probe, env=ENV, capture_output=True, text=True, timeout=60).returncode == 0


def test_a_second_trainer_run_on_the_same_output_dir_fails_at_once_naming_the_first(tmp_path):
    """Before: both runs trained in the folder; the second truncated the first's metrics.jsonl and the
    last to finish wrote summary.json and final/."""
    out = tmp_path / "run"
    first_yaml, second_yaml = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first_yaml.write_text(yaml.safe_dump(options(out, max_steps=400)))
    second_yaml.write_text(yaml.safe_dump(options(out, learning_rate=1e-4)))
    command = [sys.executable, "-m", "kfp_components.trainer", "--config"]
    first = subprocess.Popen(
        [*command, str(first_yaml)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert first.poll() is None and time.monotonic() < deadline, (
                "the first run did not start training"
            )
            time.sleep(0.1)
        second = subprocess.run(
            [*command, str(second_yaml)], env=ENV, capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr
        assert f"error: output_dir: {out} is in use by another run (pid {first.pid} on host " in second.stderr
        assert "training since" in second.stderr
        assert first.poll() is None  # the first run goes on, its records intact
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert records[0]["step"] == 1 and all(r["lr"] == 3e-3 for r in records)
    finally:
        kill(first)
    # the first run was killed with -9: its lock file stays behind and blocks nobody
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == first.pid
    summary = train(TrainingConfig(**options(out, learning_rate=1e-4)))
    assert summary.steps == 3


def test_fnsft_train_holds_the_folder_before_it_writes_the_data(tmp_path, capsys):
    out = tmp_path / "run"
    other = holder(out)
    try:
        code = fnsft_train_main(
            [
                "--model_name_or_path",
                str(tiny_model_path("qwen2", 0)),
                "--dataset_name_or_path",
                str(SAMPLES / "chat.jsonl"),
                "--output_dir",
                str(out),
            ]
        )
    finally:
        kill(other)
    assert code == 2
    assert f"is in use by another run (pid {other.pid} on host" in capsys.readouterr().err
    assert not (out / "data").exists()


@pytest.mark.slow
def test_under_torchrun_rank_0_takes_the_lock_and_every_rank_fails_together(tmp_path):
    out = tmp_path / "run"
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(options(out, distributed="ddp")))
    other = holder(out)
    try:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        command += ["-m", "kfp_components.trainer", "--config", str(run_yaml)]
        result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        kill(other)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count(f"error: output_dir: {out} is in use by another run (pid {other.pid}") == 1  # rank 0
    assert "exitcode  : 2" in output and "SIGABRT" not in output  # they leave together, none aborts
    assert not (out / "metrics.jsonl").exists()
