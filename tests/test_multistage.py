"""Multi-stage fine-tuning on a tiny model: the example configs (dry run and end to end), resume, subsets,
failures, a custom stage, config errors with key paths, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kfp_components.orchestration import (
    DryRunError,
    Pipeline,
    load_pipeline_config,
    pipeline_config_from_dict,
)
from kfp_components.orchestration.cli import load_plugin, main
from kfp_components.orchestration.options_doc import main as options_doc_main
from kfp_components.stages import BaseStage, StageConfig, StageResult, register_stage, unregister_stage
from kfp_components.stages.training import model_with_tokenizer
from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.typed_config import ConfigError

from conftest import SAMPLES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "multistage"
CHAT = str(SAMPLES / "chat.jsonl")
PREFERENCE = str(SAMPLES / "preference.jsonl")
PROMPTS = str(SAMPLES / "prompts.jsonl")
#: What makes the examples' real-model settings small enough for a tiny model on a CPU.
SMALL = {
    "max_steps": 2,
    "effective_batch_size": 4,
    "max_tokens_per_gpu": 512,
    "max_seq_len": 256,
    "use_liger": False,
    "dataset_subset_size": 0,
    "eval_dataset_subset_size": 0,
    "dataset_split": "",  # the bundled samples are single files: no splits
    "eval_dataset_split": "",
}
#: And what the rl stage needs beside: whole groups of few completions, short ones.
SMALL_RL = {"num_generations": 2, "max_new_tokens": 4}


@pytest.fixture(scope="module")
def tiny() -> str:
    return str(tiny_model_path("qwen2", 0))


@pytest.fixture(scope="module")
def wise_ft():
    """The example custom stage, imported the way ``--plugin`` imports it (which registers it)."""
    load_plugin(str(EXAMPLES / "custom_stage.py"))
    return sys.modules["kfp_components_plugin_custom_stage"]


def example_overrides(name: str, tiny: str, output_dir: Path, **extra: object) -> dict[str, object]:
    """Overrides that point an example at the tiny model and the bundled samples, with tiny step counts."""
    data = yaml.safe_load((EXAMPLES / name).read_text())
    overrides: dict[str, object] = {
        "model_name_or_path": tiny,
        "output_dir": str(output_dir),
        "torch_dtype": "float32",
    }
    for stage in data["stages"]:
        sample = {"dpo": PREFERENCE, "rl": PROMPTS}.get(stage, CHAT)
        overrides[f"stage_configs.{stage}.dataset_name_or_path"] = sample
        if "eval_dataset_name_or_path" in data["stage_configs"][stage]:
            overrides[f"stage_configs.{stage}.eval_dataset_name_or_path"] = sample
        for key, value in {**SMALL, **(SMALL_RL if stage == "rl" else {})}.items():
            overrides[f"stage_configs.{stage}.{key}"] = value
    overrides.update(extra)
    return overrides


def cli_args(name: str, tiny: str, output_dir: Path, **extra: object) -> list[str]:
    """The same overrides as ``fnsft-pipeline`` flags."""
    sets = []
    for key, value in example_overrides(name, tiny, output_dir, **extra).items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        sets.append(f"{key}={text}")
    return ["--config", str(EXAMPLES / name), "--set", *sets]


def state(output_dir: Path) -> dict:
    return json.loads((output_dir / "pipeline_state.json").read_text())["stages"]


def log_text(output_dir: Path) -> str:
    return (output_dir / "pipeline_training.log").read_text()


def weights(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(path) / "model.safetensors")


# ------------------------------------------------------------------------------------------------------
# The example configs
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sft.yaml", "sft_dpo.yaml", "sft_osft.yaml", "sft_grpo.yaml"])
def test_example_dry_run_prints_the_plan_and_trains_nothing(name, tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*cli_args(name, tiny, out), "--dry_run"]) == 0
    printed = capsys.readouterr().out
    stages = yaml.safe_load((EXAMPLES / name).read_text())["stages"]
    assert "Pipeline plan" in printed and "nothing was trained" in printed
    for i, stage in enumerate(stages, start=1):
        assert f"{i}. {stage}: run" in printed
        assert str(out / "stages" / f"{i:02d}_{stage}") in printed
    assert "(messages, 40 rows)" in printed
    if "dpo" in stages:
        assert "(preference, 15 rows)" in printed
    if "rl" in stages:
        assert "(prompt, 40 rows)" in printed and "algorithm: grpo" in printed
    assert not out.exists(), "a dry run writes nothing"


def test_sft_only_end_to_end_with_a_separate_tokenizer(tiny, tmp_path, capsys):
    # A tokenizer folder whose chat template differs from the model's (harmlessly): it must reach training.
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(tiny) / name).exists():
            shutil.copy(Path(tiny) / name, tokenizer_dir / name)
    template = tokenizer_dir / "chat_template.jinja"
    template.write_text(template.read_text() + "{#- pipeline test -#}")

    out = tmp_path / "run"
    args = cli_args("sft.yaml", tiny, out, tokenizer_name_or_path=str(tokenizer_dir))
    assert main(args) == 0
    assert f"final model: {out / 'final_model'}" in capsys.readouterr().out

    sft = state(out)["sft"]
    assert sft["status"] == "finished"
    assert sft["model_path"] == str(out / "stages" / "01_sft" / "final")
    assert sft["metrics"]["steps"] == 2 and sft["metrics"]["final_loss"] > 0
    assert sft["metrics"]["eval_loss"] > 0 and sft["metrics"]["dataset.train_rows"] == 40
    for path in sft["artifacts"].values():
        assert Path(path).exists()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "final_model")
    assert AutoTokenizer.from_pretrained(out / "final_model").chat_template.endswith("{#- pipeline test -#}")
    log = log_text(out)
    assert "stage 'sft' (1 of 1)" in log and "kfp_components.trainer" in log
    assert (
        json.loads((out / "pipeline_config.json").read_text())["stage_configs"]["sft"]["torch_dtype"]
        == "float32"
    )


def test_sft_then_dpo_end_to_end_and_reruns_what_changed(tiny, tmp_path):
    out = tmp_path / "run"
    config = load_pipeline_config(EXAMPLES / "sft_dpo.yaml", example_overrides("sft_dpo.yaml", tiny, out))
    sft, dpo = Pipeline(config).run()
    assert dpo.input_model == sft.model_path, "dpo starts from the SFT model"
    assert dpo.metrics["steps"] == 2 and "metrics.reward_margin" in dpo.metrics
    # The reference model is the stage's input model, so the first DPO loss is exactly log 2.
    first = json.loads((out / "stages" / "02_dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.693147, abs=1e-4)
    assert not torch.equal(
        weights(sft.model_path)["lm_head.weight"], weights(dpo.model_path)["lm_head.weight"]
    )
    assert weights(out / "final_model").keys() == weights(dpo.model_path).keys()

    def mtimes() -> tuple[float, float]:
        return tuple((out / "stages" / d / "metrics.jsonl").stat().st_mtime_ns for d in ("01_sft", "02_dpo"))

    before = mtimes()
    changed = example_overrides("sft_dpo.yaml", tiny, out, **{"stage_configs.dpo.beta": 0.2})
    Pipeline(load_pipeline_config(EXAMPLES / "sft_dpo.yaml", changed)).run()
    after = mtimes()
    assert after[0] == before[0] and after[1] != before[1], "only the changed stage runs again"
    assert "skipping stage 'sft': finished" in log_text(out)

    changed["stage_configs.sft.learning_rate"] = 2e-5
    Pipeline(load_pipeline_config(EXAMPLES / "sft_dpo.yaml", changed)).run()
    again = mtimes()
    assert again[0] != after[0] and again[1] != after[1], "a changed stage re-runs every stage after it"


def test_rl_dry_run_calls_the_reward_functions_on_a_prompt_row(tiny, tmp_path, capsys):
    """A dry run finds a reward function that cannot score before anything trains: here one that needs a
    column the prompt rows do not have."""
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text("def by_level(prompts, completions, level):\n    return [float(x) for x in level]\n")
    out = tmp_path / "run"
    overrides = {
        "stage_configs.rl.reward_functions": f"[{rewards}:by_level]",
        "stage_configs.rl.reward_weights": "[1.0]",
    }
    args = cli_args("sft_grpo.yaml", tiny, out, **overrides)
    assert main([*args, "--dry_run"]) == 2
    error = capsys.readouterr().err
    assert "stage_configs.rl.reward_functions" in error and "by_level" in error and "level" in error
    assert not out.exists()


@pytest.mark.slow
def test_sft_then_grpo_raises_the_exact_match_reward(tiny, tmp_path):
    """The sft_grpo example on a task a tiny model can learn in seconds: "What is a + 0?" (or 0 + b), whose
    answer is the digit in the question. SFT teaches the format (a digit, then the end of the turn); GRPO's
    exact-match reward then rises above what any fixed answer earns (2 of 19 prompts share an answer)."""
    pairs = [(a, 0) for a in range(10)] + [(0, b) for b in range(1, 10)]
    question = "What is {} + {}?".format
    sft_data, rl_data = tmp_path / "sft.jsonl", tmp_path / "rl.jsonl"
    sft_data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": question(a, b)},
                        {"role": "assistant", "content": str(a + b)},
                    ]
                }
            )
            + "\n"
            for a, b in pairs
        )
    )
    rl_data.write_text(
        "".join(json.dumps({"prompt": question(a, b), "answer": str(a + b)}) + "\n" for a, b in pairs)
    )
    out = tmp_path / "run"
    overrides = example_overrides(
        "sft_grpo.yaml",
        tiny,
        out,
        **{
            "stage_configs.sft.dataset_name_or_path": str(sft_data),
            "stage_configs.sft.max_steps": 0,
            "stage_configs.sft.num_train_epochs": 4,
            "stage_configs.sft.effective_batch_size": 3,
            "stage_configs.sft.learning_rate": 1e-2,
            "stage_configs.sft.warmup_steps": 0,
            "stage_configs.sft.lr_scheduler": "constant",
            "stage_configs.rl.dataset_name_or_path": str(rl_data),
            "stage_configs.rl.reward_functions": ["exact_match"],
            "stage_configs.rl.reward_weights": [1.0],
            "stage_configs.rl.num_generations": 8,
            "stage_configs.rl.effective_batch_size": 152,
            "stage_configs.rl.max_new_tokens": 4,
            "stage_configs.rl.max_steps": 60,
            "stage_configs.rl.learning_rate": 3e-3,
            "stage_configs.rl.kl_coef": 0.0,
            "stage_configs.rl.checkpoint_every_steps": 0,
            "stage_configs.rl.max_tokens_per_gpu": 2048,
        },
    )
    sft, rl = Pipeline(load_pipeline_config(EXAMPLES / "sft_grpo.yaml", overrides)).run()
    assert rl.input_model == sft.model_path
    rewards = [
        json.loads(line)["reward"]
        for line in (out / "stages" / "02_rl" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(rewards) == 60
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.05 and last > 2 / 19 + 0.05, rewards
    assert rl.metrics["metrics.reward"] == rewards[-1]


def test_sft_then_osft_end_to_end_with_cleanup(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    args = cli_args("sft_osft.yaml", tiny, out, **{"stage_configs.osft.nproc_per_node": 1})
    assert main([*args, "--cleanup_intermediate"]) == 0
    entries = state(out)
    assert "torch.distributed.run --standalone --nproc_per_node=1" in log_text(out), "osft ran under torchrun"
    assert Path(entries["osft"]["artifacts"]["run_config"]).is_file()
    assert entries["osft"]["input_model"] == entries["sft"]["model_path"]
    assert entries["osft"]["metrics"]["steps"] == 2 and "eval_loss" in entries["osft"]["metrics"]
    assert not Path(entries["sft"]["model_path"]).exists(), "cleanup_intermediate deletes the SFT model"
    assert Path(entries["osft"]["model_path"]).is_dir()
    assert (out / "final_model" / "model.safetensors").exists()

    # Nothing changed: nothing runs, although the SFT model is gone (only a stage that runs would need it).
    assert main(args) == 0
    assert "skipping stage 'osft': finished" in log_text(out)
    assert state(out)["osft"]["finished_at"] == entries["osft"]["finished_at"]


# ------------------------------------------------------------------------------------------------------
# Custom stages, failures, resume, subsets
# ------------------------------------------------------------------------------------------------------


def sft_and(stage: str, tiny: str, out: Path, options: dict | None = None, **sft: object) -> dict:
    return {
        "model_name_or_path": tiny,
        "output_dir": str(out),
        "torch_dtype": "float32",
        "stages": ["sft", stage],
        "stage_configs": {
            "sft": {
                "dataset_name_or_path": CHAT,
                **{k: v for k, v in SMALL.items() if "subset" not in k},
                **sft,
            },
            stage: options or {},
        },
    }


def test_each_stage_sets_where_its_metrics_are_reported(tiny, tmp_path):
    """report_to is a stage option: the sft stage keeps the default (TensorBoard event files beside its
    metrics.jsonl), the dpo stage's report_to: [] writes none; changing it does not make a finished stage
    run again."""
    from kfp_components.trainer.tensorboard_events import read_scalars

    out = tmp_path / "run"
    data = sft_and("dpo", tiny, out, {"dataset_name_or_path": PREFERENCE, "report_to": [], **SMALL})
    data["stage_configs"]["sft"]["run_name"] = "chain-sft"
    Pipeline(pipeline_config_from_dict(data)).run()
    sft_dir, dpo_dir = out / "stages" / "01_sft", out / "stages" / "02_dpo"
    assert [step for step, _ in read_scalars(sft_dir / "tensorboard")["loss"]] == [1, 2]
    assert not (dpo_dir / "tensorboard").exists() and (dpo_dir / "metrics.jsonl").exists()
    recorded = {d: json.loads((d / "training_config.json").read_text()) for d in (sft_dir, dpo_dir)}
    assert recorded[sft_dir]["report_to"] == ["tensorboard"] and recorded[sft_dir]["run_name"] == "chain-sft"
    assert recorded[dpo_dir]["report_to"] == []

    data["stage_configs"]["sft"]["report_to"] = []
    Pipeline(pipeline_config_from_dict(data)).run()
    assert "skipping stage 'sft': finished" in log_text(out)


def test_custom_stage_runs_after_sft_and_is_recorded(wise_ft, tiny, tmp_path):
    assert "wise_ft" in Pipeline.available_stages()
    Pipeline.register_stage("wise_ft", wise_ft.WiseFTStage)  # the same class again: nothing happens
    out = tmp_path / "run"
    config = pipeline_config_from_dict(sft_and("wise_ft", tiny, out, {"alpha": 0.25}))
    sft, wise = Pipeline(config).run()

    entry = state(out)["wise_ft"]
    assert entry["status"] == "finished" and entry["metrics"]["alpha"] == 0.25
    assert entry["model_path"] == wise.model_path == str(out / "stages" / "02_wise_ft" / "final")
    assert entry["metrics"]["relative_distance_to_base"] > 0
    tuned, base, mixed = weights(sft.model_path), weights(tiny), weights(wise.model_path)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(mixed[name], 0.25 * tuned[name] + 0.75 * base[name])


def test_failed_stage_keeps_earlier_outputs_and_a_rerun_skips_them(wise_ft, tiny, tmp_path, capsys):
    out = tmp_path / "run"
    config_file = tmp_path / "pipeline.yaml"
    broken = sft_and("wise_ft", tiny, out, {"base_model_name_or_path": str(tmp_path / "missing")})
    config_file.write_text(yaml.safe_dump(broken))
    plugin = ["--plugin", str(EXAMPLES / "custom_stage.py")]

    assert main(["--config", str(config_file), *plugin]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: stage 'wise_ft' (2 of 2) failed: OSError: ")
    entries = state(out)
    assert entries["sft"]["status"] == "finished" and entries["wise_ft"]["status"] == "failed"
    assert Path(entries["sft"]["model_path"]).is_dir()
    assert "Traceback" in log_text(out), "the log file keeps the stage's traceback"
    sft_metrics = out / "stages" / "01_sft" / "metrics.jsonl"
    trained_at = sft_metrics.stat().st_mtime_ns

    config_file.write_text(yaml.safe_dump(sft_and("wise_ft", tiny, out, {})))  # the fix
    assert main(["--config", str(config_file), *plugin]) == 0
    assert sft_metrics.stat().st_mtime_ns == trained_at, "the finished stage did not train again"
    assert "skipping stage 'sft': finished" in log_text(out)
    assert state(out)["wise_ft"]["status"] == "finished"


def test_dpo_on_messages_data_fails_before_the_first_stage_trains(tiny, tmp_path):
    out = tmp_path / "run"
    config = pipeline_config_from_dict(sft_and("dpo", tiny, out, {"dataset_name_or_path": CHAT, **SMALL}))
    with pytest.raises(ConfigError) as info:
        Pipeline(config).run()
    assert info.value.problems == [
        (
            "stage_configs.dpo.dataset_name_or_path",
            "the dpo stage trains on 'preference' rows: chat.jsonl:1: the rows are in 'messages' format "
            "(written as 'messages'), not a format written as 'preference' (preference, implicit_preference); "
            "nothing was written",
        )
    ]
    assert not (out / "pipeline_state.json").exists(), "no stage may start when a later stage's data is wrong"
    assert not (out / "stages" / "01_sft" / "final").exists()


def test_a_subset_runs_in_config_order_from_the_latest_finished_stage(tiny, tmp_path):
    out = tmp_path / "run"
    config = pipeline_config_from_dict(
        sft_and("dpo", tiny, out, {"dataset_name_or_path": PREFERENCE, **SMALL})
    )
    pipeline = Pipeline(config)

    (dpo,) = pipeline.run(["dpo"])  # nothing finished before dpo: it starts from model_name_or_path
    assert dpo.input_model == tiny
    (sft,) = pipeline.run(["sft"])
    assert "dpo" not in state(out), "dpo was built on a model that sft no longer leads to"
    (dpo,) = pipeline.run(["dpo"])
    assert dpo.input_model == sft.model_path

    results = pipeline.run(["dpo", "sft"])
    assert [r.stage_name for r in results] == ["sft", "dpo"]
    assert log_text(out).count("skipping stage 'dpo'") == 1
    with pytest.raises(ConfigError, match="stages: 'osft' is not a stage of this pipeline"):
        pipeline.run(["osft"])


def test_a_disabled_stage_is_left_out(tiny, tmp_path):
    out = tmp_path / "run"
    data = sft_and("dpo", tiny, out, {"dataset_name_or_path": PREFERENCE, **SMALL})
    data["stage_configs"]["sft"]["enabled"] = False
    (dpo,) = Pipeline(pipeline_config_from_dict(data)).run()
    assert dpo.stage_name == "dpo" and dpo.input_model == tiny
    assert not (out / "stages" / "01_sft").exists()


# ------------------------------------------------------------------------------------------------------
# Config errors, dry run errors, CLI
# ------------------------------------------------------------------------------------------------------


def valid_config(tiny: str, tmp_path: Path) -> dict:
    return {
        "model_name_or_path": tiny,
        "output_dir": str(tmp_path / "run"),
        "stages": ["sft", "dpo"],
        "stage_configs": {"sft": {"dataset_name_or_path": CHAT}, "dpo": {"dataset_name_or_path": PREFERENCE}},
    }


def _set(data: dict, path: str, value: object) -> None:
    *parents, last = path.split(".")
    for key in parents:
        data = data[key]
    if value is KeyError:
        del data[last]
    else:
        data[last] = value


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"modle_name": "x"},
            "modle_name: unknown option; did you mean model_name_or_path? PipelineConfig accepts: ",
        ),
        ({"stage_configs.sft.learnin_rate": 1e-5}, "stage_configs.sft.learnin_rate: unknown option"),
        ({"stage_configs.dpo.beta": "high"}, "stage_configs.dpo.beta: expected a float, got 'high'"),
        ({"stage_configs.sft.max_steps": 2.5}, "stage_configs.sft.max_steps: expected an integer, got 2.5"),
        ({"model_name_or_path": KeyError}, "model_name_or_path: required option is missing"),
        (
            {"stage_configs.sft.dataset_name_or_path": KeyError},
            "stage_configs.sft.dataset_name_or_path: required option is missing",
        ),
        (
            {"stages": ["sft", "foo"]},
            "stages[1]: no stage named 'foo'; available stages: cot_distillation, dpo, osft, reward_model, rl, rlaif, sft",
        ),
        ({"stages": ["sft", "dpp"]}, "stages[1]: no stage named 'dpp'; did you mean dpo? available stages"),
        (
            {"stage_configs.dpo.type": "dpp"},
            "stage_configs.dpo.type: no stage named 'dpp'; did you mean dpo?",
        ),
        ({"stages": ["sft", "sft"]}, "stages[1]: stage 'sft' is listed twice"),
        ({"stages": []}, "stages: list at least one stage"),
        (
            {"stage_configs.dpo": KeyError},
            "stage_configs.dpo: stage 'dpo' is listed in stages but has no options",
        ),
        (
            {"stage_configs.osft": {"dataset_name_or_path": CHAT}},
            "stage_configs.osft: stage 'osft' is not listed in stages",
        ),
        ({"stage_configs.sft.stage_name": "x"}, "stage_configs.sft.stage_name: set by the pipeline"),
        (
            {"stage_configs.dpo.loss_type": "kto"},
            "stage_configs.dpo.loss_type: expected one of sigmoid, ipo, hinge",
        ),
        (
            {"stage_configs.dpo.label_smoothing": 0.7},
            "stage_configs.dpo.label_smoothing: must be in [0, 0.5)",
        ),
        ({"stage_configs.sft.qlora": True}, "stage_configs.sft.qlora: QLoRA needs lora_r > 0"),
        (
            {"stage_configs.sft.save_final_model": False},
            "stage_configs.sft.save_final_model: a stage always saves",
        ),
        (
            {"stage_configs.sft.dataset_name_or_path": "ftp://host/data"},
            "stage_configs.sft.dataset_name_or_path: 'ftp://host/data': unsupported scheme",
        ),
        ({"stage_configs.sft.log_level": "loud"}, "stage_configs.sft.log_level: expected one of DEBUG"),
        (
            {"stage_configs.dpo.report_to": ["tensorboard", "wandb"]},
            "stage_configs.dpo.report_to[1]: expected one of tensorboard, mlflow, got 'wandb'",
        ),
        ({"torch_dtype": "fp8"}, "torch_dtype: expected one of auto, bfloat16, float16, float32, got 'fp8'"),
    ],
)
def test_config_errors_name_the_key_path(change, message, tiny, tmp_path):
    data = valid_config(tiny, tmp_path)
    for path, value in change.items():
        _set(data, path, value)
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        Pipeline(load_pipeline_config(config_file))
    lines = [f"{path}: {text}" if path else text for path, text in info.value.problems]
    assert any(line.startswith(message) for line in lines), str(info.value)


def test_yaml_syntax_errors_and_overrides(tiny, tmp_path):
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text("model_name_or_path: m\nstages: [sft\n")
    with pytest.raises(ConfigError, match=rf"{config_file}:\d+: not valid YAML"):
        load_pipeline_config(config_file)
    config_file.write_text(yaml.safe_dump(valid_config(tiny, tmp_path)))
    config = load_pipeline_config(
        config_file, ["stage_configs.sft.max_steps=3", "stage_configs.dpo.beta=2e-1", "torch_dtype=float32"]
    )
    assert config.stage_configs["sft"].max_steps == 3 and config.stage_configs["dpo"].beta == 0.2
    assert config.stage_configs["dpo"].torch_dtype == "float32", "torch_dtype applies where a stage sets none"
    assert config.stage_configs["dpo"].output_dir == str(tmp_path / "run" / "stages" / "02_dpo")
    with pytest.raises(
        ConfigError,
        match=r"stage_configs.sft.dataset_name_or_path.x: override: stage_configs.sft.dataset_name_or_path is not",
    ):
        load_pipeline_config(config_file, ["stage_configs.sft.dataset_name_or_path.x=1"])


def test_dry_run_catches_missing_and_wrongly_formatted_data_and_models(tiny, tmp_path, capsys):
    data = valid_config(tiny, tmp_path)
    data["stage_configs"]["sft"]["dataset_name_or_path"] = str(tmp_path / "missing.jsonl")
    data["stage_configs"]["dpo"]["dataset_name_or_path"] = CHAT
    pipeline = Pipeline(pipeline_config_from_dict(data))
    with pytest.raises(DryRunError) as info:
        pipeline.dry_run()
    assert [path for path, _ in info.value.problems] == [
        "stage_configs.sft.dataset_name_or_path",
        "stage_configs.dpo.dataset_name_or_path",
    ]
    assert "missing.jsonl" in info.value.problems[0][1]
    assert "the dpo stage trains on 'preference' rows" in info.value.problems[1][1]

    config_file = tmp_path / "pipeline.yaml"
    data["stages"] = ["sft"]
    del data["stage_configs"]["dpo"]
    data["stage_configs"]["sft"]["dataset_name_or_path"] = PREFERENCE
    config_file.write_text(yaml.safe_dump(data))
    assert main(["--config", str(config_file), "--dry_run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "error: stage_configs.sft.dataset_name_or_path: the sft stage trains on 'messages' rows"
    )

    missing_model = [
        "--model_name_or_path",
        str(tmp_path / "no-model"),
        "--set",
        f"stage_configs.sft.dataset_name_or_path={CHAT}",
    ]
    assert main(["--config", str(config_file), "--dry_run", *missing_model]) == 2
    assert "model_name_or_path: cannot load the model config" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_exit_codes_and_error_lines(tiny, tmp_path):
    script = Path(sys.executable).parent / "fnsft-pipeline"
    config_file = tmp_path / "pipeline.yaml"
    data = valid_config(tiny, tmp_path)
    data["stage_configs"]["dpo"]["beta"] = "high"
    config_file.write_text(yaml.safe_dump(data))
    bad = subprocess.run([str(script), "--config", str(config_file)], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: stage_configs.dpo.beta: expected a float, got 'high'"

    module = subprocess.run(
        [
            sys.executable,
            "-m",
            "kfp_components.orchestration",
            "--config",
            str(config_file),
            "--save_final_model",
            "maybe",
        ],
        capture_output=True,
        text=True,
    )
    assert module.returncode == 2 and module.stderr.startswith(
        "error: --save_final_model: expected true or false"
    )
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2


def test_a_second_run_on_the_same_output_dir_fails_at_once_naming_the_first(tiny, tmp_path):
    """Before: both runs went ahead in the folder, rewriting each other's pipeline_state.json, stage outputs
    and final_model."""
    out = tmp_path / "run"
    script = Path(sys.executable).parent / "fnsft-pipeline"
    long_run = cli_args("sft.yaml", tiny, out, **{"stage_configs.sft.max_steps": 400})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [str(script), *long_run], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        metrics = out / "stages" / "01_sft" / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert first.poll() is None and time.monotonic() < deadline, (
                "the first run did not start training"
            )
            time.sleep(0.1)
        state_before = (out / "pipeline_state.json").read_text()
        second = subprocess.run(
            [str(script), *cli_args("sft.yaml", tiny, out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr
        assert second.stderr.startswith(
            f"error: output_dir: {out} is in use by another run (pid {first.pid} on host "
        )
        assert "pipeline since" in second.stderr and "Traceback" not in second.stderr
        assert (out / "pipeline_state.json").read_text() == state_before and first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    # killed with -9, the first run's lock blocks nobody: the next run goes ahead
    assert main(cli_args("sft.yaml", tiny, out)) == 0
    assert state(out)["sft"]["status"] == "finished"


# ------------------------------------------------------------------------------------------------------
# Registry, tokenizer overlay, docs
# ------------------------------------------------------------------------------------------------------


class _Echo(BaseStage):
    stage_name = "echo"
    config_class = StageConfig

    def execute(self, model: str, tokenizer: str, previous_result: StageResult | None) -> StageResult:
        return StageResult(stage_name=self.name, model_path=model)


def test_stage_registry_rules():
    with pytest.raises(
        ValueError,
        match=r"'cot_distillation' is taken by kfp_components.stages.cot_distillation.CoTDistillationStage",
    ):
        Pipeline.register_stage("cot_distillation", _Echo)
    with pytest.raises(ValueError, match=r"'rlaif' is taken by kfp_components.stages.rlaif.RLAIFStage"):
        Pipeline.register_stage("rlaif", _Echo)
    with pytest.raises(ValueError, match=r"taken by kfp_components.stages.sft.SFTStage"):
        Pipeline.register_stage("sft", _Echo)
    with pytest.raises(TypeError, match="not a subclass of BaseStage"):
        Pipeline.register_stage("thing", dict)  # type: ignore[arg-type]
    register_stage("echo", _Echo)
    try:
        register_stage("echo", _Echo)  # the same class again is fine
        assert "echo" in Pipeline.available_stages()
    finally:
        unregister_stage("echo")


def test_model_with_tokenizer_links_the_model_beside_another_tokenizer(tiny, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    assert model_with_tokenizer(tiny, tiny, tmp_path / "x") == tiny
    other = tmp_path / "tokenizer"
    AutoTokenizer.from_pretrained(tiny).save_pretrained(other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["model_max_length"] = 77
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    folder = Path(model_with_tokenizer(tiny, str(other), tmp_path / "input_model"))
    assert AutoTokenizer.from_pretrained(folder).model_max_length == 77
    assert AutoConfig.from_pretrained(folder).model_type == "qwen2"
    assert (folder / "model.safetensors").is_symlink()


def test_docs_option_tables_and_custom_stage_example_are_current():
    docs = ROOT / "docs" / "multistage.md"
    assert options_doc_main(["--check", str(docs)]) == 0
    text = docs.read_text()
    block = text.split("```python\nimport shutil\n", 1)[1].split("```", 1)[0]
    assert "import shutil\n" + block in (EXAMPLES / "custom_stage.py").read_text()
