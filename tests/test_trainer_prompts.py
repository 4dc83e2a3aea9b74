"""Prompt rows for the online algorithms: rendered for generation, overlong ones dropped or cut at the front,
columns kept for the rewards, and each step's prompts split evenly and reproducibly over the ranks."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer.prompts import PromptOrder, load_prompts
from kfp_components.trainer.tokenize import SampleError


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tiny_model_path("qwen2", 0))


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompts_are_rendered_with_the_generation_prompt_and_keep_their_columns(tokenizer, tmp_path):
    path = write(
        tmp_path / "p.jsonl",
        [
            {"prompt": "What is 2 + 2?", "answer": "4", "level": 1},
            {
                "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                "level": 2,
            },
        ],
    )
    prompts = load_prompts(path, tokenizer, max_prompt_tokens=200)
    first, second = prompts.rows
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(first.prompt_ids) == expected and expected.endswith("<|im_start|>assistant\n")
    assert first.columns == {"answer": "4", "level": 1} and second.columns == {"level": 2}
    assert prompts.column_names == ["level"]  # only columns every row has reach the rewards
    assert second.where == f"{path}:2"


def test_overlong_prompts_are_dropped_or_keep_their_end(tokenizer, tmp_path):
    long = {"prompt": "word " * 300 + "the question?"}
    path = write(tmp_path / "p.jsonl", [long, {"prompt": "short"}])
    dropped = load_prompts(path, tokenizer, max_prompt_tokens=50, overlong="drop")
    assert len(dropped.rows) == 1 and dropped.stats["dropped_overlong"] == 1
    cut = load_prompts(path, tokenizer, max_prompt_tokens=50, overlong="truncate")
    assert cut.stats["truncated"] == 1 and len(cut.rows[0].prompt_ids) == 50
    assert tokenizer.decode(cut.rows[0].prompt_ids).endswith(
        "the question?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_row_of_another_format_names_its_line(tokenizer, tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(SampleError, match=rf"{path}:2: not a usable prompt row: missing key\(s\) 'prompt'"):
        load_prompts(path, tokenizer, max_prompt_tokens=50)


def test_the_order_is_a_seeded_shuffle_split_evenly_over_the_ranks():
    order = PromptOrder(num_prompts=10, prompts_per_step=4, world_size=2, seed=3)
    plan = order.epoch_plan(0)
    assert order.steps_per_epoch() == 2 and len(plan) == 2  # the last 2 prompts wait for the next shuffle
    assert len({i for step in plan for i in step}) == 8
    assert plan == PromptOrder(10, 4, 2, 3).epoch_plan(0) and plan != order.epoch_plan(1)
    assert order.for_rank(plan[0], 0) + order.for_rank(plan[0], 1) == plan[0]
    with pytest.raises(ValueError, match="do not split evenly over 3 processes"):
        PromptOrder(10, 4, 3, 0)
    with pytest.raises(ValueError, match="fewer than one step needs"):
        PromptOrder(3, 4, 1, 0)
