"""The sft -> reward_model -> rl example on a tiny model: the reward model stage passes the SFT model on, and
the rl stage runs PPO with the reward model it trained (``reward_model_path: stage:reward_model``), the value
model starting from that reward model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kfp_components.orchestration import Pipeline
from kfp_components.orchestration.config import load_pipeline_config
from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.typed_config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "multistage" / "sft_reward_model_rl.yaml"
SMALL = {"max_steps": 2, "effective_batch_size": 4, "max_tokens_per_gpu": 512, "max_seq_len": 256}


def overrides(out: Path, **extra: object) -> dict[str, object]:
    values: dict[str, object] = {
        "model_name_or_path": str(tiny_model_path("qwen2", 0)),
        "output_dir": str(out),
        "torch_dtype": "float32",
    }
    for stage in ("sft", "reward_model", "rl"):
        for key, value in SMALL.items():
            values[f"stage_configs.{stage}.{key}"] = value
    values.update(
        {
            "stage_configs.reward_model.eval_steps": 1,
            "stage_configs.rl.num_generations": 2,
            "stage_configs.rl.max_new_tokens": 4,
            "stage_configs.rl.checkpoint_every_steps": 0,
            "stage_configs.rl.ppo_epochs": 2,
        }
    )
    values.update(extra)
    return values


def test_sft_then_reward_model_then_rl_end_to_end(tmp_path):
    out = tmp_path / "run"
    pipeline = Pipeline(load_pipeline_config(EXAMPLE, overrides(out)))
    plan = pipeline.dry_run()
    rm_stage = out / "stages" / "02_reward_model"
    assert "trained by stage 'reward_model' first" in plan.stages[2].details["reward_model"]
    sft, reward_model, rl = pipeline.run()
    assert reward_model.model_path == sft.model_path == rl.input_model  # the policy chain skips the RM
    assert reward_model.artifacts["reward_model"] == str(rm_stage / "final")
    config = json.loads((rm_stage / "final" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"] and len(config["id2label"]) == 1
    evals = [
        r for r in map(json.loads, (rm_stage / "metrics.jsonl").read_text().splitlines()) if "eval_loss" in r
    ]
    assert evals and {"eval_accuracy", "eval_margin"} <= evals[-1].keys()
    used = json.loads((out / "stages" / "03_rl" / "training_config.json").read_text())
    assert used["reward_model_path"] == str(rm_stage / "final")
    assert (used["algorithm"], used["value_model_init"], used["num_mini_batches"]) == (
        "ppo",
        "reward_model",
        2,
    )
    rl_metrics = [
        json.loads(line) for line in (out / "stages" / "03_rl" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(rl_metrics) == 2 and all("reward" in r and "reward/reward_model/mean" in r for r in rl_metrics)
    assert all(r["value_loss"] > 0 and r["passes"] in (1, 2) for r in rl_metrics)  # the critic trained
    # once the reward model exists, the dry run compares its tokenizer with the policy's (the same here)
    details = pipeline.stages["rl"].dry_run(sft.model_path, sft.model_path)
    assert details["reward_model"] == str(rm_stage / "final")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stage_configs.rl.reward_model_path": "stage:sft"}, "'sft' is not a reward_model stage"),
        ({"stage_configs.rl.reward_model_path": "stage:judge"}, "'judge' is not a stage listed before this"),
    ],
)
def test_a_reward_model_reference_to_a_wrong_stage_is_named(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message) as caught:
        Pipeline(load_pipeline_config(EXAMPLE, overrides(tmp_path, **change)))
    assert "stage_configs.rl.reward_model_path" in str(caught.value)


def test_reward_model_stage_on_prompt_rows_fails_before_training(tmp_path):
    change = {
        "stage_configs.reward_model.dataset_name_or_path": str(ROOT / "examples" / "arithmetic_prompts.jsonl")
    }
    pipeline = Pipeline(load_pipeline_config(EXAMPLE, overrides(tmp_path, **change)))
    with pytest.raises(Exception, match=r"stage_configs\.reward_model\.dataset_name_or_path.*preference"):
        pipeline.dry_run()


def test_an_rl_stage_without_any_reward_is_named(tmp_path):
    data = yaml.safe_load(EXAMPLE.read_text())
    assert data["stages"] == ["sft", "reward_model", "rl"]
    change = {
        "stage_configs.rl.reward_model_path": "",
        "stage_configs.rl.reward_functions": [],
        "stage_configs.rl.reward_weights": [],
    }
    with pytest.raises(
        ConfigError, match=r"stage_configs\.rl\.reward_functions: ppo needs something to learn"
    ):
        Pipeline(load_pipeline_config(EXAMPLE, overrides(tmp_path, **change)))
