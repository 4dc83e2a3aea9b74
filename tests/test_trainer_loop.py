"""The training loop on a tiny model, for real: loss goes down, checkpoints resume exactly, 2 processes
match 1, the saved model loads in plain transformers, and the CLI reads configs and flags."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer import osft
from kfp_components.trainer.checkpoint import silence_single_process_warning
from kfp_components.trainer.cli import build_training_config, main
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.train import apply_liger, build_objectives, build_scheduler, train
from kfp_components.typed_config import ConfigError

from conftest import SAMPLES, write_jsonl

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


@pytest.mark.parametrize(
    ("algorithm", "steps"),
    [("sft", {"num_train_epochs": 2}), ("osft", {"num_train_epochs": 2}), ("sft", {"max_steps": 13})],
)
def test_resume_continues_exactly(tmp_path, monkeypatch, algorithm, steps):
    options = {
        "algorithm": algorithm,
        **steps,
        "checkpoint_every_steps": 3,
        "keep_checkpoints": 5,
        "lr_scheduler": "cosine",
        "warmup_steps": 2,
        "eval_data_path": str(SAMPLES / "chat.jsonl"),
        "eval_steps": 4,
    }
    total = steps.get("max_steps") or 10
    first = train(config(tmp_path, **options))
    run = tmp_path / "run"
    uninterrupted = metrics(run)
    assert len([r for r in uninterrupted if "loss" in r]) == total
    checkpoints = sorted(int(p.name.removeprefix("step-")) for p in (run / "checkpoints").iterdir())
    assert checkpoints == [*range(3, total, 3), total]
    # Pretend the run died after step 6: drop what came later, then resume.
    for step in checkpoints[2:]:
        shutil.rmtree(run / "checkpoints" / f"step-{step:08d}")
    svds = []
    monkeypatch.setattr(osft, "_svd", lambda *args: svds.append(args) or pytest.fail("SVD on resume"))
    resumed_summary = train(config(tmp_path, resume=True, **options))
    assert svds == []  # OSFT's factors, frozen and trainable, come from the checkpoint
    resumed = metrics(run)
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted]  # steps and evaluations
    for before, after in zip(uninterrupted, resumed, strict=True):
        for key in ("loss", "lr", "eval_loss"):
            if key in before:
                assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-6), (before, after)
    assert [e["step"] for e in resumed_summary.eval_history] == [e["step"] for e in first.eval_history]
    assert resumed_summary.eval_loss == pytest.approx(first.eval_loss, rel=1e-5)


def torchrun_two_processes(run_yaml: Path) -> None:
    """``torchrun --nproc_per_node 2 -m kfp_components.trainer --config run_yaml`` (gloo on the CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "kfp_components.trainer", "--config", str(run_yaml)]
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:  # say where the ranks stopped
        tail = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"torchrun did not finish in 300 s; the end of its log:\n{tail[-4000:]}")
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_fsdp_osft_resume_continues_exactly(tmp_path):
    """Under FSDP2 the trainable and frozen factors, sharded, all come back from the checkpoint (resume
    builds each rank's share of the OSFT modules as zeros, without SVDs, and the load fills them)."""
    options = config(
        tmp_path, algorithm="osft", distributed="fsdp", checkpoint_every_steps=3, keep_checkpoints=5
    )
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(dict(options.__dict__)))
    torchrun_two_processes(run_yaml)
    run = tmp_path / "run"
    uninterrupted = metrics(run)
    assert len(uninterrupted) == 10
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
    one = config(
        tmp_path / "one",
        num_train_epochs=1,
        algorithm=algorithm,
        data_path=str(data),
        eval_data_path=str(data),
        eval_steps=2,
    )
    train(one)
    run_yaml = tmp_path / "run.yaml"
    two_dir = tmp_path / "two" / "run"
    options = {k: v for k, v in one.__dict__.items()}
    options.update(output_dir=str(two_dir), distributed=strategy)
    run_yaml.write_text(yaml.safe_dump(options))
    torchrun_two_processes(run_yaml)
    single, double = step_records(tmp_path / "one" / "run"), step_records(two_dir)
    assert len(single) == len(double) == (2 if algorithm == "dpo" else 5)
    for a, b in zip(single, double, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    # every rank takes part in each evaluation (at step 2, 4 and the end of the epoch)
    evals = [[r for r in metrics(d) if "eval_loss" in r] for d in (tmp_path / "one" / "run", two_dir)]
    assert (
        [e["step"] for e in evals[1]]
        == [e["step"] for e in evals[0]]
        == ([2] if algorithm == "dpo" else [2, 4, 5])
    )
    for a, b in zip(*evals, strict=True):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
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


def test_fnsft_train_validates_then_trains(tmp_path, capsys, monkeypatch):
    """As the modular fine-tuning guide writes it: model and dataset, no output folder (./outputs/fnsft-train)."""
    from kfp_components.trainer.cli import fnsft_train_main

    monkeypatch.chdir(tmp_path)
    code = fnsft_train_main(
        [
            "--model_name_or_path",
            str(tiny_model_path("qwen2", 0)),
            "--dataset_name_or_path",
            str(SAMPLES / "chat.jsonl"),
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
    assert json.loads((tmp_path / "outputs" / "fnsft-train" / "summary.json").read_text())["steps"] == 2
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


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "loss" in r]


def test_max_steps_trains_that_many_steps_going_through_the_data_again(tmp_path):
    """max_steps overrides num_train_epochs (5 steps per epoch here); the LR schedule spans max_steps and the
    logged LR is the one each step used (warmup starts at 0)."""
    cfg = config(tmp_path, max_steps=12, num_train_epochs=1, lr_scheduler="linear", warmup_steps=2)
    summary = train(dataclasses.replace(cfg, save_final_model=False))
    records = step_records(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 13)) and summary.steps == 12
    assert [r["epoch"] for r in records] == [0] * 5 + [1] * 5 + [2] * 2 and summary.epochs == 3
    assert summary.samples_seen == 12 * 8
    schedule = [0.0, 0.5] + [(12 - s) / 10 for s in range(2, 12)]  # warmup 2, then linear to 0 at step 12
    assert [r["lr"] for r in records] == pytest.approx([3e-3 * f for f in schedule])


def test_eval_loss_every_epoch_and_every_eval_steps(tmp_path):
    summary = train(
        config(tmp_path, eval_data_path=str(SAMPLES / "chat.jsonl"), eval_steps=3, save_final_model=False)
    )
    lines = metrics(tmp_path / "run")
    evals = [r for r in lines if "eval_loss" in r]
    assert [(e["step"], e["epoch"]) for e in evals] == [(3, 0), (5, 0), (6, 1), (9, 1), (10, 1)]
    for e in evals:  # each evaluation follows the step it evaluates
        assert lines[lines.index(e) - 1]["step"] == e["step"] and set(e) == {"step", "epoch", "eval_loss"}
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert summary.eval_loss == evals[-1]["eval_loss"]
    history = [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in evals]
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (
        summary.eval_history == saved["eval_history"] == history and saved["eval_loss"] == summary.eval_loss
    )


def test_a_failed_rerun_leaves_the_finished_models_config_and_files(tmp_path):
    train(config(tmp_path, max_steps=2))
    run = tmp_path / "run"
    finished = json.loads((run / "training_config.json").read_text())
    assert json.loads((run / "final" / "training_config.json").read_text()) == finished
    weights = (run / "final" / "model.safetensors").read_bytes()
    # fine for the preflight (first rows), broken further down: the rerun fails after it started
    rows = [json.loads(line) for line in (SAMPLES / "chat.jsonl").read_text().splitlines()]
    data = write_jsonl(tmp_path / "late-error.jsonl", [*rows[:30], {"messages": "not a list"}])
    with pytest.raises(ConfigError, match=r"data_path: .*late-error.jsonl:31"):
        train(config(tmp_path, max_steps=2, learning_rate=1e-4, data_path=str(data)))
    assert json.loads((run / "training_config.json").read_text()) == finished
    assert json.loads((run / "final" / "training_config.json").read_text()) == finished
    assert (run / "final" / "model.safetensors").read_bytes() == weights
    assert not any(p.name.endswith(".partial") for p in run.iterdir())


def test_final_model_files_get_the_umask_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        train(config(tmp_path, max_steps=1, lora_r=2))
    finally:
        os.umask(previous)
    final = tmp_path / "run" / "final"
    modes = {p.relative_to(final).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in final.rglob("*")}
    assert modes["model.safetensors"] == modes["adapter/adapter_model.safetensors"] == 0o644
    assert modes["adapter"] == 0o755 and set(modes.values()) == {0o644, 0o755}


def test_no_progress_bars_and_no_single_process_checkpoint_warning(tmp_path, capfd):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config(tmp_path, max_steps=2, checkpoint_every_steps=1))
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err and "%|" not in err
    assert not [w for w in caught if "torch.distributed is disabled" in str(w.message)]


def test_the_checkpoint_warning_filter_is_targeted():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with silence_single_process_warning():
            warnings.warn(
                "torch.distributed is disabled, unavailable or uninitialized, assuming ...", stacklevel=1
            )
            warnings.warn("something else", stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else"]


def test_unknown_enumerated_values_are_errors_not_fallbacks(tmp_path):
    from kfp_components.trainer.distributed import DistInfo
    from kfp_components.trainer.precision import Precision

    cfg = config(tmp_path)
    cfg.lr_scheduler = "polynomial"  # assigned after construction, past the config's own check
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(
        ConfigError, match="lr_scheduler: expected one of constant, linear, cosine, got 'polynomial'"
    ):
        build_scheduler(optimizer, cfg, 10)
    cfg.algorithm = "grpo"
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    tokenizer = types.SimpleNamespace(pad_token_id=0)
    with pytest.raises(
        ConfigError, match="algorithm: expected one of sft, osft, dpo, reward_model, got 'grpo'"
    ):
        build_objectives(cfg, tokenizer, info, Precision("float32", info.device))


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
    kernels = "sdpa,eager,flash_attention_2,flash_attention_3,flex_attention,auto,sdpa_per_sample"
    assert f"--attn_implementation {{{kernels}}}" in text
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


def test_a_percent_sign_in_an_option_help_does_not_break_help(monkeypatch, capsys):
    """argparse %-formats help texts; a docstring's "20% x" once made --help raise a TypeError."""
    from kfp_components import cli_args

    real = cli_args.field_help
    monkeypatch.setattr(
        cli_args, "field_help", lambda cls: {**real(cls), "kl_horizon": "moves by at most 20% x n / horizon"}
    )
    with pytest.raises(SystemExit):
        build_training_config(["--help"])
    assert "moves by at most 20% x n / horizon" in capsys.readouterr().out
