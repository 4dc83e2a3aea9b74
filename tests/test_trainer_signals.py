"""SIGINT and SIGTERM stop training cleanly (the current step ends, a checkpoint is saved, a short message and
the shell's exit code), and a resume continues exactly: real processes and real signals, one process and
torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer import train as train_module
from kfp_components.trainer.checkpoint import find_resumable_checkpoint, verify_checkpoint
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.stopping import TrainingInterrupted
from kfp_components.trainer.train import train

from conftest import SAMPLES

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
STEP = "step-{:08d}"


def options(tmp_path: Path, **overrides) -> dict:
    values = {
        "model_name_or_path": str(tiny_model_path("qwen2", 0)),
        "data_path": str(SAMPLES / "chat.jsonl"),
        "output_dir": str(tmp_path / "run"),
        "torch_dtype": "float32",
        "max_seq_len": 256,
        "effective_batch_size": 8,
        "max_tokens_per_gpu": 256,
        "learning_rate": 3e-3,
        "lr_scheduler": "cosine",
        "warmup_steps": 2,
        "max_steps": 8,
        "checkpoint_every_steps": 5,
        "keep_checkpoints": 5,
        "seed": 0,
    }
    values.update(overrides)
    return values


def step_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    return [r for r in map(json.loads, lines) if "loss" in r]


def wait_for_steps(run: Path, count: int, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while len(step_records(run)) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "training did not reach the step in time"
        time.sleep(0.05)


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_training_saves_a_checkpoint_and_exits_with_a_short_message(tmp_path, signal_number):
    """Before: SIGINT ended in a KeyboardInterrupt traceback and SIGTERM killed the process, both without
    a checkpoint (the last one was up to checkpoint_every_steps steps back)."""
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(options(tmp_path, max_steps=40, checkpoint_every_steps=100)))
    process = subprocess.Popen(
        [sys.executable, "-m", "kfp_components.trainer", "--config", str(run_yaml)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = tmp_path / "run"
    wait_for_steps(run, 2, process)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=120)
    name = signal.Signals(signal_number).name
    assert process.returncode == 128 + signal_number, stderr[-3000:]
    assert "Traceback" not in stderr
    assert f"{name} received: stopping after the current step" in stderr
    stopped = step_records(run)[-1]["step"]
    assert 2 <= stopped < 40
    saved = run / "checkpoints" / STEP.format(stopped)
    assert stderr.rstrip().splitlines()[-1] == (
        f"stopped: training stopped by {name} after step {stopped} of 40; resume: true continues from the "
        f"checkpoint {saved}"
    )
    assert verify_checkpoint(saved).global_step == stopped
    assert not (run / "final").exists() and not (run / "summary.json").exists()


def test_after_a_signal_the_resume_continues_exactly(tmp_path, monkeypatch):
    """A real SIGTERM to this process in the middle of step 3: the step ends, step-3 is saved (the cadence
    is every 5), and the resumed run ends bit for bit where an uninterrupted one does."""
    from safetensors.torch import load_file

    train(TrainingConfig(**options(tmp_path / "uninterrupted")))
    reference = tmp_path / "uninterrupted" / "run"

    real_step = train_module.train_step
    calls = []

    def signalled_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the step runs
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", signalled_step)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as caught:
        train(TrainingConfig(**options(tmp_path)))
    assert signal.getsignal(signal.SIGTERM) is previous  # the handlers are given back
    assert caught.value.exit_code == 143
    run = tmp_path / "run"
    assert str(caught.value).startswith(
        "training stopped by SIGTERM after step 3 of 8; resume: true continues"
    )
    assert find_resumable_checkpoint(run)[0] == run / "checkpoints" / STEP.format(3)
    monkeypatch.undo()
    summary = train(TrainingConfig(**options(tmp_path, resume=True)))
    assert summary.attempts == 2
    keys = ("step", "loss", "lr", "grad_norm")
    assert [[r[k] for k in keys] for r in step_records(run)] == [
        [r[k] for k in keys] for r in step_records(reference)
    ]
    ours, theirs = (
        load_file(run / "final" / "model.safetensors"),
        load_file(reference / "final" / "model.safetensors"),
    )
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_signal_while_loading_stops_before_the_first_step(tmp_path, monkeypatch):
    real_load = train_module.load_model

    def signalled_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(train_module, "load_model", signalled_load)
    with pytest.raises(TrainingInterrupted) as caught:
        train(TrainingConfig(**options(tmp_path, checkpoint_every_steps=0)))
    assert caught.value.exit_code == 130
    assert str(caught.value) == (
        "training stopped by SIGINT before its first step; no checkpoint (checkpoint_every_steps is 0), so "
        "a rerun starts over"
    )
    assert step_records(tmp_path / "run") == []


def test_a_second_sigint_stops_at_once(tmp_path, monkeypatch):
    real_step = train_module.train_step
    calls = []

    def twice(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
            # The signal may reach another thread (a tracking writer's); Python runs the handler in the main
            # thread at its next check: wait for it (it puts the previous handler back), or both signals
            # would count as one.
            deadline = time.monotonic() + 10
            while signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
                assert time.monotonic() < deadline, "the first SIGINT was never handled"
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)  # the handler that was there before: KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", twice)
    # Python's own SIGINT handler before training (whatever an earlier test in this process left)
    outside = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(TrainingConfig(**options(tmp_path)))
        assert len(step_records(tmp_path / "run")) == 1
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outside)


def torchrun(run_yaml: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "kfp_components.trainer", "--config", str(run_yaml)]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def worker_of_rank(agent: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker of ``rank``."""
    children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} among {children}")


@pytest.mark.slow
def test_under_torchrun_every_rank_stops_after_the_same_step(tmp_path):
    """SIGTERM to one rank only, then to torchrun itself (what Kubernetes sends): every rank ends the same
    step, the checkpoint holds both ranks' RNG states, and the last resume finishes the run."""
    run_yaml = tmp_path / "run.yaml"
    values = options(tmp_path, max_steps=24, checkpoint_every_steps=100, distributed="ddp", resume=True)
    run_yaml.write_text(yaml.safe_dump(values))
    run = tmp_path / "run"
    stops = []
    for target in ("rank 1", "torchrun"):
        agent = torchrun(run_yaml)
        wait_for_steps(run, len(step_records(run)) + 2, agent)
        os.kill(worker_of_rank(agent, 1) if target == "rank 1" else agent.pid, signal.SIGTERM)
        output, _ = agent.communicate(timeout=180)
        assert agent.returncode != 0
        stopped = step_records(run)[-1]["step"]
        assert f"stopped: training stopped by SIGTERM after step {stopped} of 24" in output, output[-3000:]
        assert output.count("stopped: training stopped") == 1 and "SIGABRT" not in output
        saved = run / "checkpoints" / STEP.format(stopped)
        assert verify_checkpoint(saved).global_step == stopped
        assert {p.name for p in saved.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
        stops.append(stopped)
    agent = torchrun(run_yaml)
    output, _ = agent.communicate(timeout=300)
    assert agent.returncode == 0, output[-3000:]
    assert [r["step"] for r in step_records(run)] == list(range(1, 25))
    assert json.loads((run / "summary.json").read_text())["attempts"] == 3
    assert stops[0] < stops[1]
