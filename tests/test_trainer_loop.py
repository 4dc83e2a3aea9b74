"""The training loop on a tiny model, for real: loss goes down, checkpoints resume exactly, 2 processes
match 1, the saved model loads in plain transformers, and the CLI reads configs and flags."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer import osft
from kfp_components.trainer.cli import build_training_config, main
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.train import apply_liger, train
from kfp_components.typed_config import ConfigError

from conftest import SAMPLES

ROOT = Path(__file__).resolve().parents[1]


def config(tmp_path: Path, **overrides) -> TrainingConfig:
    options = {
        "model_name_or_path": str(tiny_model_path("qwen2", 0)),
        "data_path": str(SAMPLES / "chat.jsonl"),
        "output_dir": str(tmp_path / "run"),
        "torch_dtype": "float32",
        "max_seq_len": 256,
        "effective_batch_size": 8,
        "max_tokens_per_gpu": 256,
        "learning_rate": 3e-3,
        "lr_scheduler": "constant",
        "num_train_epochs": 2,
        "seed": 0,
    }
    options.update(overrides)
    return TrainingConfig(**options)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_loss_goes_down_and_model_loads_in_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = train(config(tmp_path, num_train_epochs=4))
    run = tmp_path / "run"
    records = metrics(run)
    assert len(records) == summary.steps == 20  # 40 samples / 8 per step * 4 epochs
    assert records[-1]["loss"] < 0.6 * records[0]["loss"]
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_second",
        "padding_ratio",
        "memory_mib",
        "micro_batches",
    ):
        assert key in records[0]
    assert all(r["samples"] == 8 for r in records)
    saved = json.loads((run / "summary.json").read_text())
    assert saved["steps"] == 20 and saved["final_loss"] == pytest.approx(records[-1]["loss"])
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert tokenizer.chat_template and model.config.model_type == "qwen2"


def test_osft_trains_and_exports_a_dense_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    summary = train(
        config(
            tmp_path,
            algorithm="osft",
            unfreeze_rank_ratio=0.5,
            num_train_epochs=3,
            activation_checkpointing=True,
        )
    )
    records = metrics(tmp_path / "run")
    assert records[-1]["loss"] < records[0]["loss"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path("qwen2", 0))
    assert set(model.state_dict()) == set(base.state_dict())
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert any("q_proj" in n for n in changed) and summary.steps == 15


def test_lora_trains_saves_adapter_and_merged_model(tmp_path):
    from transformers import AutoModelForCausalLM

    train(config(tmp_path, lora_r=4, lora_alpha=8, learning_rate=1e-2, num_train_epochs=3))
    run = tmp_path / "run"
    records = metrics(run)
    assert records[-1]["loss"] < records[0]["loss"]
    assert (run / "final" / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(run / "final")
    assert not any("lora" in name for name in merged.state_dict())


@pytest.mark.parametrize("algorithm", ["sft", "osft"])
def test_resume_continues_exactly(tmp_path, monkeypatch, algorithm):
    options = {
        "algorithm": algorithm,
        "num_train_epochs": 2,
        "checkpoint_every_steps": 3,
        "keep_checkpoints": 5,
        "lr_scheduler": "cosine",
        "warmup_steps": 2,
    }
    train(config(tmp_path, **options))
    run = tmp_path / "run"
    uninterrupted = metrics(run)
    assert len(uninterrupted) == 10
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["step-00000003", "step-00000006", "step-00000009", "step-00000010"]
    # Pretend the run died after step 6: drop what came later, then resume.
    for name in ("step-00000009", "step-00000010"):
        import shutil

        shutil.rmtree(run / "checkpoints" / name)
    svds = []
    monkeypatch.setattr(osft, "_svd", lambda *args: svds.append(args) or pytest.fail("SVD on resume"))
    train(config(tmp_path, resume=True, **options))
    assert svds == []  # OSFT's factors, frozen and trainable, come from the checkpoint
    resumed = metrics(run)
    assert [r["step"] for r in resumed] == list(range(1, 11))
    for before, after in zip(uninterrupted[6:], resumed[6:], strict=True):
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-5, abs=1e-6)
        assert after["lr"] == pytest.approx(before["lr"])


def torchrun_two_processes(run_yaml: Path) -> None:
    """``torchrun --nproc_per_node 2 -m kfp_components.trainer --config run_yaml`` (gloo on the CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "kfp_components.trainer", "--config", str(run_yaml)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_fsdp_osft_resume_continues_exactly(tmp_path):
    """Under FSDP2 the sharded trainable factors and the replicated frozen ones all come back from the
    checkpoint (resume builds the OSFT modules without SVDs)."""
    options = config(
        tmp_path, algorithm="osft", distributed="fsdp", checkpoint_every_steps=3, keep_checkpoints=5
    )
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(dict(options.__dict__)))
    torchrun_two_processes(run_yaml)
    run = tmp_path / "run"
    uninterrupted = metrics(run)
    assert len(uninterrupted) == 10
    import shutil

    for name in ("step-00000009", "step-00000010"):
        shutil.rmtree(run / "checkpoints" / name)
    run_yaml.write_text(yaml.safe_dump({**options.__dict__, "resume": True}))
    torchrun_two_processes(run_yaml)
    resumed = metrics(run)
    assert [r["step"] for r in resumed] == list(range(1, 11))
    for before, after in zip(uninterrupted[6:], resumed[6:], strict=True):
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-5, abs=1e-6)
        assert after["grad_norm"] == pytest.approx(before["grad_norm"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "algorithm"), [("ddp", "sft"), ("fsdp", "sft"), ("fsdp", "osft"), ("fsdp", "dpo")]
)
def test_two_processes_match_one(tmp_path, strategy, algorithm):
    data = SAMPLES / ("preference.jsonl" if algorithm == "dpo" else "chat.jsonl")
    one = config(tmp_path / "one", num_train_epochs=1, algorithm=algorithm, data_path=str(data))
    train(one)
    run_yaml = tmp_path / "run.yaml"
    two_dir = tmp_path / "two" / "run"
    options = {k: v for k, v in one.__dict__.items()}
    options.update(output_dir=str(two_dir), distributed=strategy)
    run_yaml.write_text(yaml.safe_dump(options))
    torchrun_two_processes(run_yaml)
    single, double = metrics(tmp_path / "one" / "run"), metrics(two_dir)
    assert len(single) == len(double) == (2 if algorithm == "dpo" else 5)
    for a, b in zip(single, double, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    from safetensors.torch import load_file

    w1 = load_file(tmp_path / "one" / "run" / "final" / "model.safetensors")
    w2 = load_file(two_dir / "final" / "model.safetensors")
    # Adam divides by the root of the second moment, so an element whose gradient is round-off noise (a rare
    # token's embedding row under DPO) can move by up to ~lr per step in either run: allow that for DPO.
    atol = 5e-4 if algorithm == "dpo" else 1e-5
    for name, tensor in w1.items():
        torch.testing.assert_close(w2[name], tensor, rtol=1e-4, atol=atol)


def test_config_file_flags_override_and_errors_name_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": "m",
                "data_path": "d.jsonl",
                "output_dir": "o",
                "learning_rate": "1e-5",
                "target_patterns": ["q_proj"],
            }
        )
    )
    cfg, _ = build_training_config(["--config", str(path), "--learning_rate", "3e-4", "--algorithm", "osft"])
    assert cfg.learning_rate == 3e-4 and cfg.algorithm == "osft" and cfg.target_patterns == ["q_proj"]
    with pytest.raises(ConfigError, match="learnin_rate: unknown option"):
        path.write_text(
            yaml.safe_dump(
                {"model_name_or_path": "m", "data_path": "d", "output_dir": "o", "learnin_rate": 1}
            )
        )
        build_training_config(["--config", str(path)])
    with pytest.raises(ConfigError, match="unfreeze_rank_ratio: must be in \\(0, 1\\]"):
        TrainingConfig(
            model_name_or_path="m", data_path="d", output_dir="o", unfreeze_rank_ratio=1.5
        ).validate()
    path.write_text("model_name_or_path: m\n  bad: [indent\n")
    assert main(["--config", str(path)]) == 2


def test_use_liger_on_cpu_warns_and_falls_back(caplog):
    from kfp_components.trainer.distributed import DistInfo

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with caplog.at_level(logging.WARNING):
        assert apply_liger(torch.nn.Linear(2, 2), info) is False
    assert "Liger kernels need a CUDA GPU" in caplog.text


def test_use_liger_wiring_on_gpu(monkeypatch):
    from kfp_components.trainer.distributed import DistInfo

    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = lambda model: calls.append(model)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    model = torch.nn.Linear(2, 2)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))
    assert apply_liger(model, info) is True and calls == [model]


def test_fnsft_train_validates_then_trains(tmp_path, capsys):
    from kfp_components.trainer.cli import fnsft_train_main

    code = fnsft_train_main(
        [
            "--model_name_or_path",
            str(tiny_model_path("qwen2", 0)),
            "--dataset_name_or_path",
            str(SAMPLES / "chat.jsonl"),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_steps",
            "2",
            "--effective_batch_size",
            "4",
            "--max_tokens_per_gpu",
            "512",
            "--max_seq_len",
            "256",
            "--torch_dtype",
            "float32",
        ]
    )
    assert code == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "only a prompt"}\n')
    argv = ["--model_name_or_path", str(tiny_model_path("qwen2", 0)), "--dataset_name_or_path", str(bad)]
    assert fnsft_train_main([*argv, "--output_dir", str(tmp_path / "o2")]) == 2
    assert "bad.jsonl" in capsys.readouterr().err


def test_first_step_loss_is_the_mean_token_loss_of_its_batch(tmp_path):
    """Checks the loss path end to end (packing, shifted targets, normalisation) against plain HF losses."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kfp_components.trainer.batching import TokenBudgetSampler, shifted_label_count
    from kfp_components.trainer.tokenize import tokenize_jsonl

    cfg = config(tmp_path, max_steps=1, save_final_model=False)
    train(cfg)
    first = metrics(tmp_path / "run")[0]["loss"]

    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
    data = tokenize_jsonl(cfg.data_path, tokenizer, max_seq_len=cfg.max_seq_len)
    sampler = TokenBudgetSampler(
        data.lengths,
        [shifted_label_count(s.labels) for s in data.samples],
        effective_batch_size=cfg.effective_batch_size,
        max_tokens_per_gpu=cfg.max_tokens_per_gpu,
        seed=cfg.seed,
    )
    indices = [i for micro in sampler.epoch_plan(0)[0].micro_batches for i in micro]
    model = AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in indices:
            sample = data.samples[i]
            out = model(input_ids=torch.tensor([sample.input_ids]), labels=torch.tensor([sample.labels]))
            n = shifted_label_count(sample.labels)
            total += float(out.loss) * n
            count += n
    assert len(indices) == cfg.effective_batch_size
    assert first == pytest.approx(total / count, rel=1e-5)


def test_help_lists_required_options_first_with_allowed_values_and_aliases(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_training_config(["--help"])
    text = capsys.readouterr().out
    options = re.findall(
        r"^  (--\w+)", text.split("TrainingConfig options (override the --config file):")[1], flags=re.M
    )
    assert options[:3] == ["--model_name_or_path", "--data_path", "--output_dir"]
    assert "--torch_dtype {bfloat16,float16,float32}" in text
    assert "--lr_scheduler {constant,linear,cosine}, --lr_scheduler_type {constant,linear,cosine}" in text
    assert "--attn_implementation {sdpa,eager,flash_attention_2,flash_attention_3,flex_attention}" in text
    assert "--save_steps VALUE" in text and "--unmask {true,false}" in text
    required = ["--model_name_or_path", "m", "--data_path", "d", "--output_dir", "o"]
    cfg, _ = build_training_config([*required, "--lr_scheduler_type", "linear", "--save_steps", "5"])
    assert cfg.lr_scheduler == "linear" and cfg.checkpoint_every_steps == 5
    with pytest.raises(ConfigError, match="lr_scheduler_type and lr_scheduler are the same option"):
        build_training_config([*required, "--lr_scheduler", "cosine", "--lr_scheduler_type", "linear"])
    with pytest.raises(ConfigError, match=r"lr_scheduler_type: expected one of constant, linear, cosine"):
        build_training_config([*required, "--lr_scheduler_type", "polynomial"])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"lr_scheduler_type": "linear", "gradient_checkpointing": True}))
    cfg, _ = build_training_config(["--config", str(path), *required, "--lr_scheduler", "constant"])
    assert cfg.lr_scheduler == "constant" and cfg.activation_checkpointing is True  # the flag wins
