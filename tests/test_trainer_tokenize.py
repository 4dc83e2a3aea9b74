"""Tests for ``kfp_components.trainer.tokenize``: chat-template rendering and assistant-only labels."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import pytest
from tokenizers import normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from kfp_components.testing.tiny_model import ARCHS, tiny_model_path
from kfp_components.trainer.tokenize import (
    IGNORE_INDEX,
    ChatTemplateError,
    SampleError,
    TokenizedSample,
    tokenize_jsonl,
    tokenize_messages,
    tokenize_prompt_completion,
)

EOT = {"qwen2": "<|im_end|>", "llama": "<|eot_id|>"}

SYSTEM = "You are a terse geography tutor."
CONVERSATION = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And the capital of Japan?"},
    {"role": "assistant", "content": "Tokyo is the capital of Japan."},
    {"role": "user", "content": "Thanks! Which animal barks?"},
    {"role": "assistant", "content": "A dog barks."},
]
ANSWERS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
TOOL_CONVERSATION = [
    {"role": "system", "content": "You can look up the weather."},
    {"role": "user", "content": "How warm is it in Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
        ],
    },
    {"role": "tool", "content": "Cloudy, 12 degrees."},
    {"role": "assistant", "content": "It is cloudy and 12 degrees in Oslo."},
]

# A ChatML template; tests replace its content expression and generation prompt to break it on purpose.
CHATML = (
    "{%- for message in messages %}"
    "{%- set content = CONTENT %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- GENERATION_PROMPT }}{%- endif %}"
)


def chatml(content: str = "message.content", generation_prompt: str = "'<|im_start|>assistant\\n'") -> str:
    return CHATML.replace("CONTENT", content).replace("GENERATION_PROMPT", generation_prompt)


EARLIER_TURN = "message.role == 'assistant' and not loop.last"


@pytest.fixture(scope="module", params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def by_arch() -> dict[str, PreTrainedTokenizerBase]:
    """The tiny models' tokenizers, shared by the tests that do not change them."""
    return {name: AutoTokenizer.from_pretrained(tiny_model_path(name)) for name in ARCHS}


@pytest.fixture
def tokenizer(by_arch: dict[str, PreTrainedTokenizerBase], arch: str) -> PreTrainedTokenizerBase:
    return by_arch[arch]


def fresh_tokenizer(arch: str, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """A tokenizer of its own, for tests that change it."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path(arch))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def labelled_runs(sample: TokenizedSample) -> list[list[int]]:
    """The token ids of each contiguous run of labelled tokens."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return runs


def decoded_runs(sample: TokenizedSample, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    return [tokenizer.decode(run, skip_special_tokens=False) for run in labelled_runs(sample)]


def unlabelled_text(sample: TokenizedSample, tokenizer: PreTrainedTokenizerBase) -> str:
    ids = [t for t, label in zip(sample.input_ids, sample.labels, strict=True) if label == IGNORE_INDEX]
    return tokenizer.decode(ids, skip_special_tokens=False)


def write_rows(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


# --------------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------------


def test_labels_are_exactly_the_answer_and_end_of_turn(tokenizer, arch):
    sample = tokenize_messages(CONVERSATION[:3], tokenizer)

    assert len(sample.input_ids) == len(sample.labels)
    assert decoded_runs(sample, tokenizer) == [ANSWERS[0] + EOT[arch]]
    assert sample.num_label_tokens == len(labelled_runs(sample)[0])
    # The end-of-turn token is the last labelled token; the newline Qwen writes after it is not labelled.
    last = max(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)
    assert sample.input_ids[last] == tokenizer.convert_tokens_to_ids(EOT[arch])
    assert all(label == IGNORE_INDEX for label in sample.labels[last + 1 :])
    # The whole sequence is the template's rendering, token for token.
    rendered = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert tokenizer.decode(sample.input_ids, skip_special_tokens=False) == rendered


def test_system_and_user_text_is_never_labelled(tokenizer, arch):
    sample = tokenize_messages(CONVERSATION, tokenizer)

    labelled = "".join(decoded_runs(sample, tokenizer))
    unlabelled = unlabelled_text(sample, tokenizer)
    for message in CONVERSATION:
        if message["role"] in ("system", "user"):
            assert message["content"] not in labelled
            assert message["content"] in unlabelled
    assert "assistant" not in labelled  # the role header is context, not target


def test_multi_turn_labels_every_assistant_turn(tokenizer, arch):
    sample = tokenize_messages(CONVERSATION, tokenizer)

    assert decoded_runs(sample, tokenizer) == [answer + EOT[arch] for answer in ANSWERS]


def test_unmask_labels_every_token(tokenizer):
    sample = tokenize_messages(CONVERSATION, tokenizer, unmask=True)

    assert sample.labels == sample.input_ids
    assert sample.num_label_tokens == len(sample.input_ids)


def test_llama_has_exactly_one_bos_and_qwen_none(by_arch):
    llama = by_arch["llama"]
    ids = tokenize_messages(CONVERSATION, llama).input_ids
    assert ids[0] == llama.bos_token_id
    assert ids.count(llama.bos_token_id) == 1

    qwen = by_arch["qwen2"]
    ids = tokenize_messages(CONVERSATION, qwen).input_ids
    assert qwen.bos_token is None
    assert ids[0] == qwen.convert_tokens_to_ids("<|im_start|>")


def test_tool_call_conversation(tokenizer, arch):
    sample = tokenize_messages(TOOL_CONVERSATION, tokenizer, tools=TOOLS)

    call, answer = decoded_runs(sample, tokenizer)
    assert "get_weather" in call and "Oslo" in call and call.endswith(EOT[arch])
    assert "assistant" not in call
    assert answer == TOOL_CONVERSATION[-1]["content"] + EOT[arch]
    unlabelled = unlabelled_text(sample, tokenizer)
    assert "Cloudy, 12 degrees." in unlabelled  # the tool's result is context
    assert "The current weather in a city." in unlabelled  # and so are the tool schemas


def test_prompt_completion_labels_only_the_completion(tokenizer, arch):
    prompt, completion = CONVERSATION[:4], CONVERSATION[4:5]
    sample = tokenize_prompt_completion(prompt, completion, tokenizer)

    assert decoded_runs(sample, tokenizer) == [completion[0]["content"] + EOT[arch]]
    assert ANSWERS[0] in unlabelled_text(sample, tokenizer)  # an assistant turn of the prompt is context
    # The prompt part is the prompt as rendered for generation.
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    first = next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)
    assert tokenizer.decode(sample.input_ids[:first], skip_special_tokens=False) == prompt_text

    with pytest.raises(ValueError, match="must start with an assistant"):
        tokenize_prompt_completion(prompt[:2], prompt[1:2], tokenizer)


def test_nfc_normalising_tokenizer_is_accepted(by_arch):
    """Qwen2 by_arch compose characters (NFC): a canonically equivalent decoding is not an error."""
    qwen = by_arch["qwen2"]
    answer = "Cafe\u0301 au lait costs 3 \u20ac."  # e + combining acute accent
    sample = tokenize_messages(
        [{"role": "user", "content": "Price?"}, {"role": "assistant", "content": answer}], qwen
    )

    assert decoded_runs(sample, qwen) == [unicodedata.normalize("NFC", answer) + "<|im_end|>"]


def test_generation_markers_are_used_when_the_template_has_them(by_arch):
    # Without its markers this template would be refused: it strips the reasoning of earlier answers.
    body = (
        "{%- for message in messages %}"
        "{%- if message.role == 'assistant' %}"
        "{%- set content = message.content.split('</think>')[-1] if not loop.last else message.content %}"
        "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- content + '<|im_end|>' }}{% endgeneration %}"
        "{{- '\\n' }}"
        "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    marked = fresh_tokenizer("qwen2", body)
    messages = [
        *CONVERSATION[:2],
        {"role": "assistant", "content": "<think>Hm.</think>Paris."},
        *CONVERSATION[3:],
    ]

    sample = tokenize_messages(messages, marked)
    assert decoded_runs(sample, marked) == [f"{answer}<|im_end|>" for answer in ["Paris.", *ANSWERS[1:]]]
    prompt_completion = tokenize_prompt_completion(messages[:4], messages[4:5], marked)
    assert decoded_runs(prompt_completion, marked) == [ANSWERS[1] + "<|im_end|>"]

    unmarked = fresh_tokenizer(
        "qwen2", body.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    )
    with pytest.raises(ChatTemplateError, match="is not a prefix"):
        tokenize_messages(messages, unmarked)


# --------------------------------------------------------------------------------------------------------
# Templates and by_arch that defeat the labelling
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        # Earlier answers are rewritten once later turns follow (here lower-cased).
        (chatml(f"message.content | lower if {EARLIER_TURN} else message.content"), "is not a prefix"),
        # Qwen3 / DeepSeek-R1 style: the reasoning of earlier assistant turns is stripped.
        (
            chatml(f"message.content.split('</think>')[-1] | trim if {EARLIER_TURN} else message.content"),
            "is not a prefix",
        ),
        # The generation prompt opens a block that stored assistant turns lack.
        (chatml(generation_prompt="'<|im_start|>assistant\\n<think>\\n'"), "the generation prompt differs"),
        # Assistant content is dropped altogether.
        (chatml("'' if message.role == 'assistant' else message.content"), "does not render assistant turn"),
    ],
    ids=["rewrites-earlier-turns", "strips-earlier-reasoning", "thinking-generation-prompt", "drops-content"],
)
def test_broken_template_raises(template, problem):
    tokenizer = fresh_tokenizer("qwen2", template)
    messages = [
        {"role": "user", "content": "Where is the Eiffel Tower?"},
        {"role": "assistant", "content": "<think>Easy.</think>It is in Paris, France."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ]

    with pytest.raises(ChatTemplateError, match=problem) as error:
        tokenize_messages(messages, tokenizer)
    assert str(error.value).startswith("conversation [user, assistant, user, assistant]: ")


def test_the_unbroken_test_template_works():
    tokenizer = fresh_tokenizer("qwen2", chatml())
    sample = tokenize_messages(CONVERSATION, tokenizer)
    assert decoded_runs(sample, tokenizer) == [answer + "<|im_end|>" for answer in ANSWERS]


def test_normalising_tokenizer_raises():
    tokenizer = fresh_tokenizer("qwen2")
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()

    with pytest.raises(ChatTemplateError, match="do not decode back to the rendered text"):
        tokenize_messages(CONVERSATION, tokenizer)


def test_double_bos_raises():
    llama = fresh_tokenizer("llama")
    llama.chat_template = "{{- bos_token }}" + llama.chat_template

    with pytest.raises(ChatTemplateError, match="two BOS tokens"):
        tokenize_messages(CONVERSATION, llama)


def test_template_that_fails_to_render_raises():
    tokenizer = fresh_tokenizer("qwen2", "{{ raise_exception('no tools here') }}")

    with pytest.raises(ChatTemplateError, match="failed to render: no tools here"):
        tokenize_messages(CONVERSATION, tokenizer)


# --------------------------------------------------------------------------------------------------------
# JSONL files
# --------------------------------------------------------------------------------------------------------


def test_tokenize_jsonl_reads_every_row_in_order(tmp_path, by_arch):
    qwen = by_arch["qwen2"]
    rows = [
        {"messages": CONVERSATION},
        {"messages": TOOL_CONVERSATION, "tools": TOOLS},
        {"messages": CONVERSATION[1:3]},
    ]
    path = write_rows(tmp_path / "train.jsonl", [rows[0], "", rows[1], rows[2]])  # blank lines are skipped

    data = tokenize_jsonl(path, qwen, max_seq_len=4096)

    expected = [
        tokenize_messages(CONVERSATION, qwen),
        tokenize_messages(TOOL_CONVERSATION, qwen, tools=TOOLS),
        tokenize_messages(CONVERSATION[1:3], qwen),
    ]
    assert data.samples == expected
    assert data.lengths == [len(s.input_ids) for s in expected]
    assert data.stats == {
        "samples_read": 3,
        "samples_kept": 3,
        "dropped_overlong": 0,
        "truncated": 0,
        "dropped_no_labels": 0,
        "tokens": sum(data.lengths),
        "label_tokens": sum(s.num_label_tokens for s in expected),
        "max_len": max(data.lengths),
        "mean_len": round(sum(data.lengths) / 3, 2),
    }
    assert tokenize_jsonl(path, qwen, max_seq_len=4096, unmask=True).stats["label_tokens"] == sum(
        data.lengths
    )


def test_tokenize_jsonl_truncate_vs_drop(tmp_path, by_arch):
    qwen = by_arch["qwen2"]
    short = {"messages": CONVERSATION[1:3]}
    long_answer = {"messages": [CONVERSATION[1], {"role": "assistant", "content": "Paris, of course. " * 40}]}
    long_question = {"messages": [{"role": "user", "content": "Tell me. " * 60}, CONVERSATION[2]]}
    path = write_rows(tmp_path / "train.jsonl", [short, long_answer, long_question, short])
    short_len = len(tokenize_messages(short["messages"], qwen).input_ids)
    max_seq_len = short_len + 10

    dropped = tokenize_jsonl(path, qwen, max_seq_len=max_seq_len, overlong="drop")
    assert dropped.lengths == [short_len, short_len]
    assert {
        k: dropped.stats[k] for k in ("samples_read", "samples_kept", "dropped_overlong", "truncated")
    } == {
        "samples_read": 4,
        "samples_kept": 2,
        "dropped_overlong": 2,
        "truncated": 0,
    }

    truncated = tokenize_jsonl(path, qwen, max_seq_len=max_seq_len, overlong="truncate")
    # The long answer is cut (its labels with it); the long question leaves nothing to learn and goes.
    assert truncated.lengths == [short_len, max_seq_len, short_len]
    assert {
        k: truncated.stats[k] for k in ("samples_kept", "dropped_overlong", "truncated", "dropped_no_labels")
    } == {
        "samples_kept": 3,
        "dropped_overlong": 0,
        "truncated": 1,
        "dropped_no_labels": 1,
    }
    full = tokenize_messages(long_answer["messages"], qwen)
    assert truncated.samples[1] == TokenizedSample(full.input_ids[:max_seq_len], full.labels[:max_seq_len])
    assert truncated.stats["max_len"] == max_seq_len


@pytest.mark.parametrize(
    ("bad_row", "problem"),
    [
        ('{"messages": [', "not valid JSON"),
        ({"messages": [{"role": "robot", "content": "beep"}]}, "messages[0].role: 'robot' is not one of"),
        ({"messages": CONVERSATION[1:3], "tools": "get_weather"}, "tools: expected a list"),
    ],
    ids=["json", "role", "tools"],
)
def test_tokenize_jsonl_names_file_and_line_of_a_bad_row(tmp_path, by_arch, bad_row, problem):
    path = write_rows(tmp_path / "train.jsonl", [{"messages": CONVERSATION}, "", bad_row])

    with pytest.raises(SampleError, match=re.escape(problem)) as error:
        tokenize_jsonl(path, by_arch["qwen2"], max_seq_len=4096)
    assert str(error.value).startswith(f"{path}:3: ")


def test_tokenize_jsonl_names_file_and_line_of_a_template_error(tmp_path):
    tokenizer = fresh_tokenizer(
        "qwen2", chatml(f"message.content | lower if {EARLIER_TURN} else message.content")
    )
    path = write_rows(tmp_path / "train.jsonl", [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION}])

    with pytest.raises(ChatTemplateError, match="is not a prefix") as error:
        tokenize_jsonl(path, tokenizer, max_seq_len=4096)
    assert str(error.value).startswith(f"{path}:2: ")


def test_tokenize_jsonl_with_workers_matches_one_process(tmp_path, by_arch):
    llama = by_arch["llama"]
    rows = [{"messages": CONVERSATION[: 3 + 2 * (i % 3)]} for i in range(700)]  # several chunks
    path = write_rows(tmp_path / "train.jsonl", rows)

    one = tokenize_jsonl(path, llama, max_seq_len=4096)
    two = tokenize_jsonl(path, llama, max_seq_len=4096, num_workers=2)
    assert two.samples == one.samples
    assert two.stats == one.stats

    write_rows(path, [*rows, {"messages": "nope"}])
    with pytest.raises(SampleError, match=re.escape(f"{path}:701: messages: expected a list")):
        tokenize_jsonl(path, llama, max_seq_len=4096, num_workers=2)


def test_tokenize_jsonl_checks_its_arguments(tmp_path, by_arch):
    path = write_rows(tmp_path / "train.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(ValueError, match="max_seq_len"):
        tokenize_jsonl(path, by_arch["qwen2"], max_seq_len=0)
    with pytest.raises(ValueError, match="overlong"):
        tokenize_jsonl(path, by_arch["qwen2"], max_seq_len=10, overlong="wrap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_workers"):
        tokenize_jsonl(path, by_arch["qwen2"], max_seq_len=10, num_workers=0)
