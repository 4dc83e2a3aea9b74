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
