"""Reward-model training (``algorithm: reward_model``): real training of a tiny model's scalar head on the
bundled separable preference set."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.reward_modeling import (
    bradley_terry_loss,
    pack_reward_pairs,
    packed_scores,
    reward_metrics,
    tokenize_reward_pairs,
)
from kfp_components.trainer.train import train
from kfp_components.typed_config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "arithmetic_preferences.jsonl"
HELD_OUT = ROOT / "examples" / "arithmetic_preferences_eval.jsonl"


def rm_config(output_dir: Path, data: Path = TRAIN, **overrides) -> TrainingConfig:
    options = dict(
        model_name_or_path=str(tiny_model_path("qwen2", 0)),
        data_path=str(data),
        output_dir=str(output_dir),
        algorithm="reward_model",
        torch_dtype="float32",
        max_seq_len=128,
        effective_batch_size=16,
        max_tokens_per_gpu=512,
        learning_rate=3e-3,
        lr_scheduler="constant",
        max_steps=12,
        seed=0,
    )
    options.update(overrides)
    return TrainingConfig(**options)


def records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def held_out_pairs():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path("qwen2", 0))
    return tokenize_reward_pairs(HELD_OUT, tokenizer, max_seq_len=128)[0]


def test_held_out_accuracy_rises_above_0_9_and_transformers_alone_scores_the_same(tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    summary = train(rm_config(tmp_path / "run", eval_data_path=str(HELD_OUT), eval_steps=6))
    pairs = held_out_pairs()
    final = tmp_path / "run" / "final"
    saved = AutoConfig.from_pretrained(final)
    assert saved.architectures == ["Qwen2ForSequenceClassification"] and saved.num_labels == 1
    assert saved.pad_token_id is not None
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    after = reward_metrics(model, pairs)
    assert after["accuracy"] > 0.9 and after["margin"] > 0

    # before training: the same architecture with the head as the run initialised it (seed 0)
    torch.manual_seed(0)
    start = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_path("qwen2", 0), num_labels=1, pad_token_id=saved.pad_token_id
    ).eval()
    before = reward_metrics(start, pairs)
    assert 0.2 <= before["accuracy"] <= 0.8, before

    # the eval split's accuracy and margin in metrics.jsonl and the summary
    evals = [r for r in records(tmp_path / "run") if "eval_loss" in r]
    assert [e["step"] for e in evals] == [6, 12]
    assert evals[-1]["eval_accuracy"] == pytest.approx(after["accuracy"], abs=1e-6)
    assert evals[-1]["eval_margin"] == pytest.approx(after["margin"], rel=1e-4)
    assert summary.eval_history[-1]["eval_accuracy"] == evals[-1]["eval_accuracy"]
    assert summary.eval_loss == pytest.approx(after["loss"], rel=1e-4)

    # plain transformers, one unpadded sequence at a time, reads the same score as the packed scoring
    packed = pack_reward_pairs(pairs, range(6))
    with torch.no_grad():
        trainer_scores = packed_scores(model, packed, torch.device("cpu"))
        plain = [
            model(input_ids=torch.tensor([side.input_ids])).logits[0, 0]
            for pair in pairs[:6]
            for side in (pair.chosen, pair.rejected)
        ]
    torch.testing.assert_close(trainer_scores, torch.stack(plain), rtol=1e-4, atol=1e-5)


def test_packed_and_one_pair_per_micro_batch_give_the_same_loss_margin_and_centering():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_path("qwen2", 0), num_labels=1, pad_token_id=0
    ).eval()
    pairs = held_out_pairs()[:6]
    device = torch.device("cpu")
    with torch.no_grad():
        packed = packed_scores(model, pack_reward_pairs(pairs, range(6)), device).view(-1, 2)
        single = torch.cat([packed_scores(model, pack_reward_pairs(pairs, [i]), device) for i in range(6)])
    torch.testing.assert_close(packed, single.view(-1, 2), rtol=1e-4, atol=1e-5)
    margins = torch.tensor([0.0, 1.0, -0.5, 2.0, 0.0, 0.3])
    losses, metrics = bradley_terry_loss(packed, margins, center_rewards_coef=0.1)
    chosen, rejected = packed[:, 0], packed[:, 1]
    expected = [
        math.log1p(math.exp(-(float(c) - float(r) - float(m)))) + 0.1 * float(c + r) ** 2
        for c, r, m in zip(chosen, rejected, margins, strict=True)
    ]
    torch.testing.assert_close(losses, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert metrics[:, 0].tolist() == [float(c > r) for c, r in zip(chosen, rejected, strict=True)]
    torch.testing.assert_close(metrics[:, 1], chosen - rejected)


def test_the_margin_column_is_read_and_a_bad_margin_is_named(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path("qwen2", 0))
    rows = [
        {"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3", "margin": 1.5},
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, stats = tokenize_reward_pairs(path, tokenizer, max_seq_len=128)
    assert [p.margin for p in pairs] == [1.5, 0.0] and stats["with_margin"] == 1
    path.write_text(json.dumps({**rows[0], "margin": "high"}) + "\n")
    with pytest.raises(Exception, match=r"pairs.jsonl:1: .*margin must be a finite number"):
        tokenize_reward_pairs(path, tokenizer, max_seq_len=128)


def test_resume_matches_an_uninterrupted_run(tmp_path):
    options = dict(max_steps=6, checkpoint_every_steps=2, keep_checkpoints=5, lora_r=4, lora_alpha=8)
    train(rm_config(tmp_path, **options))
    first = records(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000006")
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000004")
    train(rm_config(tmp_path, resume=True, **options))
    resumed = records(tmp_path)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for before, after in zip(first, resumed, strict=True):
        for key in ("loss", "accuracy", "margin", "grad_norm"):
            assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-6), (key, before, after)
    assert first[-1]["loss"] < first[0]["loss"]  # the head trains under LoRA (modules_to_save)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, strategy):
    import yaml
    from test_trainer_loop import torchrun_two_processes

    common = dict(max_steps=3, center_rewards_coef=0.05)
    train(rm_config(tmp_path / "one", **common))
    two = rm_config(tmp_path / "two", distributed=strategy, **common)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(dict(two.__dict__)))
    torchrun_two_processes(run_yaml)
    single, double = records(tmp_path / "one"), records(tmp_path / "two")
    assert len(single) == len(double) == 3
    for a, b in zip(single, double, strict=True):
        for key in ("loss", "accuracy", "margin", "rewards_chosen", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key


def problems_of(config: TrainingConfig) -> str:
    from kfp_components.trainer.preflight import preflight_problems

    return "; ".join(f"{key}: {message}" for key, message in preflight_problems(config))


def test_bad_input_is_named_before_training(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    messages = ROOT / "examples" / "arithmetic_sft.jsonl"
    assert "data_path" in problems_of(rm_config(tmp_path / "a", data=messages))
    assert "trains on 'preference' rows" in problems_of(rm_config(tmp_path / "a", data=messages))
    prompts = str(ROOT / "examples" / "arithmetic_prompts.jsonl")
    online = dict(
        algorithm="grpo", data_path=prompts, num_generations=2, effective_batch_size=4, max_new_tokens=4
    )
    with pytest.raises(ConfigError, match="reward_functions: grpo needs something to learn from"):
        rm_config(tmp_path / "b", **online).validate()
    with pytest.raises(
        ConfigError,
        match=r"reward_weights: 1 weight\(s\) for 1 reward function\(s\) and the "
        "reward model",
    ):
        rm_config(
            tmp_path / "b",
            reward_functions=["exact_match"],
            reward_weights=[1.0],
            reward_model_path="some/model",
            **online,
        ).validate()
    # a classifier with two labels and no label_index
    two_labels = tmp_path / "two_labels"
    base = tiny_model_path("qwen2", 0)
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, pad_token_id=0).save_pretrained(
        two_labels
    )
    AutoTokenizer.from_pretrained(base).save_pretrained(two_labels)
    found = problems_of(rm_config(tmp_path / "c", reward_model_path=str(two_labels), **online))
    assert "reward_model_path: " in found and "has 2 labels, not a single score; set label_index" in found
    plain = problems_of(rm_config(tmp_path / "c", reward_model_path=str(base), **online))
    assert "reward_model_path: " in plain and "not a sequence-classification checkpoint" in plain
