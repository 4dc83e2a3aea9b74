"""DPO on the training engine: the losses, packed sequence log-probs, and real training on a tiny model that
raises the reward margin and preference accuracy on held-out pairs."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.distributed import DistInfo
from kfp_components.trainer.dpo import (
    compute_reference_logps,
    pack_pairs,
    preference_loss,
    preference_metrics,
    sequence_logps,
    tokenize_preference_jsonl,
)
from kfp_components.trainer.train import train

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def preference_rows(n: int, seed: int) -> list[dict]:
    """Chosen answers state the sum; rejected ones dodge. The preference generalises to unseen prompts."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append(
            {
                "prompt": f"What is {a} + {b}?",
                "chosen": f"{a} + {b} = {a + b}.",
                "rejected": "I would rather not say.",
            }
        )
    return rows


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_losses_at_zero_margin_and_their_direction():
    policy = torch.tensor([[-5.0, -7.0], [-6.0, -6.0]])
    reference = torch.tensor([[-6.0, -6.0], [-6.0, -6.0]])  # pair 0: h = 1 - (-1) = 2; pair 1: h = 0
    sigmoid, metrics = preference_loss(policy, reference, beta=0.5, loss_type="sigmoid")
    assert sigmoid[1] == pytest.approx(math.log(2)) and sigmoid[0] == pytest.approx(
        -math.log(1 / (1 + math.e**-1))
    )
    ipo, _ = preference_loss(policy, reference, beta=0.5, loss_type="ipo")
    assert ipo.tolist() == pytest.approx([(2 - 1) ** 2, (0 - 1) ** 2])
    hinge, _ = preference_loss(policy, reference, beta=0.5, loss_type="hinge")
    assert hinge.tolist() == pytest.approx([0.0, 1.0])
    smoothed, _ = preference_loss(policy, reference, beta=0.5, loss_type="sigmoid", label_smoothing=0.1)
    assert smoothed[0] > sigmoid[0]
    chosen, rejected, margin, accuracy, kl = metrics[0].tolist()
    assert (chosen, rejected, margin, accuracy) == pytest.approx((0.5, -0.5, 1.0, 1.0))
    assert kl == pytest.approx(0.5 * (1 + 1) / 2) and metrics[1].tolist() == pytest.approx([0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(policy, reference, beta=0.5, loss_type="l2")


def test_packed_sequence_logps_match_unpacked(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_path("qwen2", 0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    pairs, stats = tokenize_preference_jsonl(
        write(tmp_path / "p.jsonl", preference_rows(3, 0)), tokenizer, max_seq_len=256
    )
    assert stats["pairs_kept"] == 3
    with torch.no_grad():
        packed = sequence_logps(model, pack_pairs(pairs, [0, 1, 2]), torch.device("cpu"))
        for i, pair in enumerate(pairs):
            for j, side in enumerate((pair.chosen, pair.rejected)):
                logits = model(torch.tensor([side.input_ids])).logits[0, :-1]
                targets = torch.tensor(side.labels[1:])
                keep = targets != -100
                expected = torch.log_softmax(logits, -1)[keep].gather(1, targets[keep][:, None]).sum()
                assert packed[2 * i + j] == pytest.approx(float(expected), abs=1e-4)
    # the prompt is never scored: only the completion's tokens are labelled
    assert all(label == -100 for label in pairs[0].chosen.labels[:5])


def test_dpo_raises_reward_margin_and_accuracy_on_held_out_pairs(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_model_path("qwen2", 0)
    train_path = write(tmp_path / "train.jsonl", preference_rows(48, 1))
    held_out = write(tmp_path / "held_out.jsonl", preference_rows(16, 2))
    summary = train(
        TrainingConfig(
            model_name_or_path=str(base),
            data_path=str(train_path),
            output_dir=str(tmp_path / "run"),
            algorithm="dpo",
            beta=0.1,
            torch_dtype="float32",
            max_seq_len=128,
            effective_batch_size=8,
            max_tokens_per_gpu=512,
            learning_rate=5e-3,
            lr_scheduler="constant",
            num_train_epochs=3,
            seed=0,
        )
    )
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6) and records[0][
        "loss"
    ] == pytest.approx(math.log(2), abs=1e-5)
    assert records[-1]["loss"] < records[0]["loss"] and "implicit_kl" in records[-1]
    assert summary.metrics["reward_accuracy"] > 0.5

    tokenizer = AutoTokenizer.from_pretrained(base)
    pairs, _ = tokenize_preference_jsonl(held_out, tokenizer, max_seq_len=128)
    reference = compute_reference_logps(
        AutoModelForCausalLM.from_pretrained(base), pairs, CPU, max_tokens_per_gpu=512
    )
    before = preference_metrics(AutoModelForCausalLM.from_pretrained(base), pairs, reference, beta=0.1)
    after = preference_metrics(
        AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final"), pairs, reference, beta=0.1
    )
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert after["reward_margin"] > 0.5 and after["reward_accuracy"] >= 0.9 > before["reward_accuracy"]
    assert after["loss"] < before["loss"]


def test_dpo_inside_the_osft_constraint_keeps_the_frozen_subspace(tmp_path):
    from transformers import AutoModelForCausalLM

    base = tiny_model_path("qwen2", 0)
    train_path = write(tmp_path / "train.jsonl", preference_rows(16, 3))
    train(
        TrainingConfig(
            model_name_or_path=str(base),
            data_path=str(train_path),
            output_dir=str(tmp_path / "run"),
            algorithm="dpo",
            osft_constraint=True,
            unfreeze_rank_ratio=0.25,
            torch_dtype="float32",
            max_seq_len=128,
            effective_batch_size=8,
            max_tokens_per_gpu=512,
            learning_rate=5e-3,
            num_train_epochs=2,
            seed=0,
        )
    )
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").state_dict()
    original = AutoModelForCausalLM.from_pretrained(base).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    w0, w1 = original[name].double(), tuned[name].double()
    u, _s, vh = torch.linalg.svd(w0, full_matrices=False)
    k = math.floor(min(w0.shape) * 0.75)
    delta = w1 - w0
    assert delta.abs().max() > 1e-4, "the weight trained"
    # the update lies outside the frozen top-k subspace on both sides
    assert (u[:, :k].T @ delta).abs().max() < 1e-4 and (delta @ vh[:k].T).abs().max() < 1e-4


def test_a_separate_reference_model_is_used(tmp_path):
    base = tiny_model_path("qwen2", 0)
    other = tiny_model_path("qwen2", 1)
    train_path = write(tmp_path / "train.jsonl", preference_rows(8, 4))
    common = dict(
        data_path=str(train_path),
        algorithm="dpo",
        torch_dtype="float32",
        max_seq_len=128,
        effective_batch_size=8,
        max_tokens_per_gpu=512,
        max_steps=1,
        save_final_model=False,
    )
    train(TrainingConfig(model_name_or_path=str(base), output_dir=str(tmp_path / "a"), **common))
    train(
        TrainingConfig(
            model_name_or_path=str(base),
            output_dir=str(tmp_path / "b"),
            ref_model_name_or_path=str(other),
            **common,
        )
    )
    first = [json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0]) for d in ("a", "b")]
    assert first[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert abs(first[1]["reward_margin"]) > 1e-3, "a different reference gives a non-zero starting margin"
