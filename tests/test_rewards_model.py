"""The ``reward_model`` reward with tiny sequence-classification checkpoints built here from the tiny
model's shapes (no download): batched scores equal one-by-one scores, the chat template renders the pair,
and the label is chosen as asked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification

from kfp_components.rewards import RewardError, load_reward_set
from kfp_components.testing.tiny_model import tiny_model_path

PROMPTS = [
    "What is 2 + 2?",
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[int, Path]:
    """Reward models with 1 and 3 labels, random weights, and the tiny model's tokenizer and template."""
    base = tiny_model_path("qwen2")
    folder = tmp_path_factory.mktemp("reward_models")
    built = {}
    for labels in (1, 3):
        config = Qwen2Config.from_pretrained(base, num_labels=labels)
        config.pad_token_id = None  # as many reward checkpoints ship: the loader must pick one
        torch.manual_seed(labels)
        model = Qwen2ForSequenceClassification(config)
        path = folder / f"labels-{labels}"
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(base).save_pretrained(path)
        built[labels] = path
    return built


def one_by_one(path: Path, prompt, completion: str, label: int = 0) -> float:
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = Qwen2ForSequenceClassification.from_pretrained(path).eval()
    messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": completion}], tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return float(model(input_ids=ids).logits[0, label])


def test_batched_scores_equal_one_by_one_scores(tmp_path, checkpoints):
    rewards = load_reward_set(
        [{"function": "reward_model", "model": str(checkpoints[1]), "batch_size": 2}], None, base_dir=tmp_path
    )
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    completions = [
        "4",
        "Blue, the colour of the sky on a clear day.",
        "It is four, since two and two make four.",
        "Red",
        "",
    ]
    scores = rewards.score(prompts, completions, {}).total
    expected = [one_by_one(checkpoints[1], p, c) for p, c in zip(prompts, completions, strict=True)]
    assert scores == pytest.approx(expected, abs=1e-4)
    assert len({round(s, 4) for s in scores}) == 5  # the model reads each sample: five different scores


def test_the_pair_is_rendered_with_the_chat_template(tmp_path, checkpoints):
    rewards = load_reward_set(
        [{"function": "reward_model", "model": str(checkpoints[1])}], None, base_dir=tmp_path
    )
    scorer = rewards.functions[0]
    tokenizer = AutoTokenizer.from_pretrained(checkpoints[1])
    text = tokenizer.decode(scorer.encode(PROMPTS[1], "Green."))
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
        "<|im_start|>assistant\nGreen.<|im_end|>\n"
    )


def test_a_label_index_picks_the_logit_and_several_labels_need_one(tmp_path, checkpoints):
    with pytest.raises(
        RewardError, match=r"reward_model: cannot be loaded: .*has 3 labels; set label_index \(0 to 2\)"
    ):
        load_reward_set([{"function": "reward_model", "model": str(checkpoints[3])}], None, base_dir=tmp_path)
    with pytest.raises(RewardError, match=r"label_index 3 is out of range"):
        load_reward_set(
            [{"function": "reward_model", "model": str(checkpoints[3]), "label_index": 3}],
            None,
            base_dir=tmp_path,
        )
    rewards = load_reward_set(
        [{"function": "reward_model", "model": str(checkpoints[3]), "label_index": 2}],
        None,
        base_dir=tmp_path,
    )
    assert rewards.score([PROMPTS[0]], ["4"], {}).total == pytest.approx(
        [one_by_one(checkpoints[3], PROMPTS[0], "4", 2)], abs=1e-4
    )


def test_max_length_keeps_the_end(tmp_path, checkpoints):
    rewards = load_reward_set(
        [{"function": "reward_model", "model": str(checkpoints[1]), "max_length": 6}], None, base_dir=tmp_path
    )
    full = load_reward_set(
        [{"function": "reward_model", "model": str(checkpoints[1])}], None, base_dir=tmp_path
    )
    assert rewards.functions[0].encode(PROMPTS[0], "4") == full.functions[0].encode(PROMPTS[0], "4")[-6:]


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(RewardError, match=r"reward_model: cannot be loaded: "):
        load_reward_set(
            [{"function": "reward_model", "model": str(tmp_path / "nothing")}], None, base_dir=tmp_path
        )
