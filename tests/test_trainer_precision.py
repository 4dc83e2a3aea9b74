"""Compute precision for real on the CPU: float16 autocast (forced on the CPU, which torch supports) with
dynamic loss scaling over fp32 master weights, an overflowed step skipped with the scale lowered, and a tiny
model's loss falling under SFT, OSFT and DPO; DDP and FSDP2 ranks skip the same steps."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer import precision
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.precision import Precision
from kfp_components.trainer.train import train
from kfp_components.typed_config import ConfigError

from conftest import SAMPLES

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture
def cpu_autocast(monkeypatch):
    """Let a reduced torch_dtype autocast on the CPU, as it does on a GPU."""
    monkeypatch.setattr(precision, "AUTOCAST_DEVICE_TYPES", ("cuda", "cpu"))


def config(tmp_path: Path, **overrides) -> TrainingConfig:
    options = {
        "model_name_or_path": str(tiny_model_path("qwen2", 0)),
        "data_path": str(SAMPLES / "chat.jsonl"),
        "output_dir": str(tmp_path / "run"),
        "torch_dtype": "float16",
        "max_seq_len": 256,
        "effective_batch_size": 8,
        "max_tokens_per_gpu": 256,
        "learning_rate": 3e-3,
        "lr_scheduler": "constant",
        "num_train_epochs": 1,
        "seed": 0,
    }
    options.update(overrides)
    return TrainingConfig(**options)


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def linear_and_batch() -> tuple[torch.nn.Linear, torch.optim.Optimizer, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(16, 8)


def test_float16_scales_the_loss_and_unscales_before_the_gradients_are_read(cpu_autocast):
    model, optimizer, x = linear_and_batch()
    reference = model(x).pow(2).mean()
    (expected,) = torch.autograd.grad(reference, model.weight)

    fp16 = Precision("float16", CPU)
    assert fp16.compute_dtype == torch.float16 and fp16.loss_scale == precision.INITIAL_LOSS_SCALE
    with fp16.autocast():
        out = model(x)
    assert out.dtype == torch.float16
    fp16.backward(out.float().pow(2).mean())
    assert model.weight.grad.dtype == torch.float32  # fp32 master weights and gradients
    torch.testing.assert_close(model.weight.grad, expected * fp16.loss_scale, rtol=1e-2, atol=1.0)
    fp16.unscale(optimizer)
    torch.testing.assert_close(model.weight.grad, expected, rtol=1e-2, atol=1e-4)
    before = model.weight.detach().clone()
    assert fp16.step(optimizer) is True
    assert not torch.equal(model.weight, before) and model.weight.dtype == torch.float32


def test_an_overflowed_step_is_skipped_and_the_scale_lowered(cpu_autocast):
    model, optimizer, x = linear_and_batch()
    fp16 = Precision("float16", CPU)
    with fp16.autocast():
        loss = model(x).float().pow(2).mean()
    fp16.backward(loss)
    model.weight.grad[0, 0] = float("inf")  # what an fp16 overflow leaves in a gradient
    before = [p.detach().clone() for p in model.parameters()]
    fp16.unscale(optimizer)
    assert fp16.step(optimizer) is False
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert fp16.loss_scale == precision.INITIAL_LOSS_SCALE / 2
    state = fp16.state_dict()
    restored = Precision("float16", CPU)
    restored.load_state_dict(state)
    assert restored.loss_scale == fp16.loss_scale  # resumable


def test_without_autocast_every_dtype_computes_in_float32_and_says_so():
    for dtype in ("bfloat16", "float16"):
        cpu = Precision(dtype, CPU)
        assert cpu.compute_dtype == torch.float32 and cpu.scaler is None and cpu.loss_scale is None
        assert cpu.note == f"torch_dtype {dtype}: no GPU, so computing in float32"
        with cpu.autocast():
            assert not torch.is_autocast_enabled("cpu")
    assert Precision("float32", CPU).note is None


def test_an_unknown_dtype_is_an_error():
    with pytest.raises(
        ConfigError, match=r"torch_dtype: expected one of bfloat16, float16, float32, got 'fp8'"
    ):
        Precision("fp8", CPU)


@pytest.mark.parametrize("algorithm", ["sft", "osft", "dpo"])
def test_float16_training_on_a_tiny_model(tmp_path, cpu_autocast, algorithm, caplog):
    data = str(SAMPLES / ("preference.jsonl" if algorithm == "dpo" else "chat.jsonl"))
    epochs = 4 if algorithm == "dpo" else 2
    caplog.set_level("INFO")
    cfg = config(tmp_path, algorithm=algorithm, data_path=data, eval_data_path=data, num_train_epochs=epochs)
    summary = train(cfg)
    records = metrics(tmp_path / "run")
    assert all(r["loss_scale"] == precision.INITIAL_LOSS_SCALE and not r["step_skipped"] for r in records)
    assert records[-1]["loss"] < 0.9 * records[0]["loss"]
    assert summary.skipped_steps == 0 and summary.eval_loss is not None
    assert "computing in float32" not in caplog.text

    fp32 = train(
        config(tmp_path / "fp32", algorithm=algorithm, data_path=data, torch_dtype="float32", max_steps=1)
    )
    first_fp32 = metrics(tmp_path / "fp32" / "run")[0]["loss"]
    if algorithm == "dpo":
        # the policy starts as its own reference: the first loss is log 2 exactly, in either precision
        assert records[0]["loss"] == first_fp32 == pytest.approx(math.log(2), abs=1e-12)
    else:
        # the same first step, computed in float16: close, not equal
        assert records[0]["loss"] == pytest.approx(first_fp32, rel=2e-2) and records[0]["loss"] != first_fp32
    assert fp32.steps == 1


def test_overflowed_steps_are_skipped_in_the_loop(tmp_path, cpu_autocast, monkeypatch, caplog):
    monkeypatch.setattr(precision, "INITIAL_LOSS_SCALE", 2.0**24)  # the scaled gradients overflow fp16
    caplog.set_level("INFO")
    summary = train(config(tmp_path, num_train_epochs=2, lr_scheduler="linear"))
    records = metrics(tmp_path / "run")
    skipped = [r["step"] for r in records if r["step_skipped"]]
    assert skipped and skipped[0] == 1 and summary.skipped_steps == len(skipped)
    assert records[1]["loss_scale"] == records[0]["loss_scale"] / 2  # lowered after the overflow
    assert records[0]["grad_norm"] is None  # inf: not a number JSON can hold
    taken = [r for r in records if not r["step_skipped"]]
    assert taken and all(r["grad_norm"] is not None for r in taken)
    # a skipped step leaves the LR schedule where it was: the first step taken uses the first LR
    assert taken[0]["lr"] == records[0]["lr"] == pytest.approx(3e-3)
    assert "step 1: fp16 gradients overflowed at loss scale 1.67772e+07" in caplog.text


FORCED_AUTOCAST_TRAINER = """
import sys
from kfp_components.trainer import precision
precision.AUTOCAST_DEVICE_TYPES = ("cuda", "cpu")
precision.INITIAL_LOSS_SCALE = 2.0 ** 24
from kfp_components.trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_skip_the_same_steps_as_one_process(tmp_path, cpu_autocast, monkeypatch, strategy):
    """DDP ranks see the all-reduced gradients; under FSDP2 each rank sees only its shard of a gradient and the
    overflow check is reduced over the ranks (DTensor's handler of GradScaler's unscale). Either way 2
    processes skip exactly the steps 1 process skips and train the same."""
    monkeypatch.setattr(precision, "INITIAL_LOSS_SCALE", 2.0**24)
    one = config(tmp_path / "one", num_train_epochs=2)
    train(one)
    script = tmp_path / "train_forced_autocast.py"
    script.write_text(FORCED_AUTOCAST_TRAINER)
    run_yaml = tmp_path / "run.yaml"
    two_dir = tmp_path / "two" / "run"
    run_yaml.write_text(yaml.safe_dump({**one.__dict__, "output_dir": str(two_dir), "distributed": strategy}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(script), "--config", str(run_yaml)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    single, double = metrics(tmp_path / "one" / "run"), metrics(two_dir)
    assert any(r["step_skipped"] for r in single)
    assert [r["step_skipped"] for r in double] == [r["step_skipped"] for r in single]
    assert [r["loss_scale"] for r in double] == [r["loss_scale"] for r in single]
    for a, b in zip(single, double, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2)


OVERFLOW_ON_ONE_RANK = """
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from kfp_components.trainer import precision
precision.AUTOCAST_DEVICE_TYPES = ("cuda", "cpu")
dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
fully_shard(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
fp16 = precision.Precision("float16", torch.device("cpu"))
with fp16.autocast():
    loss = model(torch.randn(4, 8)).float().pow(2).mean()
fp16.backward(loss)
if dist.get_rank() == 1:
    model[0].weight.grad.to_local()[0, 0] = float("inf")  # only rank 1's shard overflowed
fp16.unscale(optimizer)
print(f"rank {dist.get_rank()} stepped {fp16.step(optimizer)} scale {fp16.loss_scale:g}", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp_an_overflow_in_one_ranks_shard_skips_the_step_on_every_rank(tmp_path):
    script = tmp_path / "overflow_on_one_rank.py"
    script.write_text(OVERFLOW_ON_ONE_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*command, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    scale = f"{precision.INITIAL_LOSS_SCALE / 2:g}"
    lines = sorted(re.findall(r"rank \d stepped \w+ scale \d+", result.stdout))  # lines may interleave
    assert lines == [f"rank 0 stepped False scale {scale}", f"rank 1 stepped False scale {scale}"]
