"""Tests for ``kfp_components.testing.tiny_model``: tiny offline models that plain transformers can load."""

from __future__ import annotations

import os

# Nothing may be downloaded: make any accidental Hub access fail fast (set before transformers is imported).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kfp_components.testing import tiny_model as tiny_model_module
from kfp_components.testing.tiny_model import (
    ARCHS,
    CACHE_ENV_VAR,
    TinyModelSpec,
    build_corpus,
    build_tiny_model,
    default_cache_dir,
    tiny_model_path,
)

# Per architecture: (special tokens that must exist, the EOS token, the assistant generation prompt).
EXPECTED = {
    "qwen2": (("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|im_end|>", "<|im_start|>assistant\n"),
    "llama": (
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
}
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 12 + 7?"},
    {"role": "assistant", "content": "19"},
]
UNICODE_TEXT = "Héllo, wörld! 12345 + 678 = 13023\n\tСпасибо 日本語 🤖🚀  naïve café  "  # noqa: RUF001


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model(root / arch, arch=arch, seed=0) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_builds_standard_hf_layout(models: dict[str, Path], arch: str) -> None:
    files = {p.name for p in models[arch].iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= files

    config = json.loads((models[arch] / "config.json").read_text())
    assert config["model_type"] == arch
    assert config["architectures"] == ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"]
    assert config["dtype"] == "float32"
    assert config["tie_word_embeddings"] is False
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (64, 2, 1024)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert "{% generation %}" not in (models[arch] / "chat_template.jinja").read_text()


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_with_plain_transformers_and_runs_forward(models: dict[str, Path], arch: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(models[arch])
    tokenizer = AutoTokenizer.from_pretrained(models[arch])
    assert model.config.model_type == arch
    assert model.dtype == torch.float32
    assert len(tokenizer) == model.config.vocab_size

    specials, eos, _ = EXPECTED[arch]
    assert tokenizer.eos_token == eos
    assert tokenizer.eos_token_id == model.config.eos_token_id
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id == model.config.pad_token_id
    for token in specials:  # each special token is one id and survives encoding intact
        assert tokenizer.convert_ids_to_tokens(tokenizer.encode(token, add_special_tokens=False)) == [token]

    batch = tokenizer(["The capital of France is", "2 + 2 ="], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_same_seed_is_byte_identical_and_seed_changes_weights(tmp_path: Path) -> None:
    first = build_tiny_model(tmp_path / "a", arch="qwen2", seed=0)
    again = build_tiny_model(tmp_path / "b", arch="qwen2", seed=0)
    other = build_tiny_model(tmp_path / "c", arch="qwen2", seed=1)

    for name in ("model.safetensors", "tokenizer.json"):
        assert sha256(first / name) == sha256(again / name), name
    assert sha256(first / "model.safetensors") != sha256(other / "model.safetensors")
    # The seed drives only the weights: every seed shares one tokenizer.
    assert sha256(first / "tokenizer.json") == sha256(other / "tokenizer.json")


def test_build_leaves_global_rng_untouched(tmp_path: Path) -> None:
    state = torch.get_rng_state()
    build_tiny_model(tmp_path / "m", arch="llama", seed=3)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template_renders_roles_and_generation_prompt(models: dict[str, Path], arch: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(models[arch])
    specials, eos, generation_prompt = EXPECTED[arch]

    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    for token in specials[1:] if arch == "qwen2" else specials:
        assert token in rendered
    for message in CONVERSATION:
        assert message["content"] in rendered
    assert rendered.index("terse") < rendered.index("12 + 7") < rendered.index("19")
    assert rendered.rstrip().endswith(eos)

    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith(generation_prompt)
    # The conversation so far is a prefix of the prompt, and the prompt a prefix of the full render.
    assert rendered.startswith(prompt)


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_template_supports_tools(models: dict[str, Path], arch: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(models[arch])
    tool = {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
    conversation = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
            ],
        },
        {"role": "tool", "content": '{"temp": -3}'},
        {"role": "assistant", "content": "It is -3 degrees."},
    ]
    rendered = tokenizer.apply_chat_template(conversation, tools=[tool], tokenize=False)
    assert rendered.count("get_weather") == 2  # once in the tool list, once in the call
    assert '{"temp": -3}' in rendered
    assert rendered.index('"city": "Oslo"') < rendered.index('{"temp": -3}') < rendered.index("It is -3")


def test_default_system_prompt_is_optional(tmp_path: Path) -> None:
    plain = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "plain", arch="qwen2"))
    assert "system" not in plain.apply_chat_template(CONVERSATION[1:], tokenize=False)

    path = build_tiny_model(tmp_path / "default", arch="qwen2", default_system_prompt='Be "tiny".')
    rendered = AutoTokenizer.from_pretrained(path).apply_chat_template(CONVERSATION[1:], tokenize=False)
    assert rendered.startswith('<|im_start|>system\nBe "tiny".<|im_end|>\n<|im_start|>user\n')


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_round_trips_unicode(models: dict[str, Path], arch: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(models[arch])
    ids = tokenizer.encode(UNICODE_TEXT, add_special_tokens=False)
    assert tokenizer.decode(ids) == UNICODE_TEXT
    # Trained merges compress English well below one token per character.
    sentence = "The capital of France is Paris."
    assert len(tokenizer.encode(sentence, add_special_tokens=False)) < len(sentence) / 2


def test_llama_tokenizer_adds_bos_like_llama3(models: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id
    chat_ids = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert chat_ids.count(tokenizer.bos_token_id) == 1


def test_corpus_is_deterministic() -> None:
    corpus = build_corpus()
    assert corpus == build_corpus()
    assert len(corpus) >= 1000
    assert any("+" in line and "=" in line for line in corpus)


def test_invalid_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="arch"):
        build_tiny_model(tmp_path, arch="gpt2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="divisible"):
        build_tiny_model(tmp_path, hidden_size=64, num_attention_heads=3)


def test_tiny_model_path_builds_once_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = tiny_model_path("qwen2", seed=0, cache_dir=tmp_path)
    assert first.parent == tmp_path and first.name.startswith("qwen2-0-")
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    assert tiny_model_path("qwen2", seed=0, cache_dir=tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert tiny_model_path("qwen2", seed=0, cache_dir=tmp_path, hidden_size=32) != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left
    assert AutoConfig.from_pretrained(first).model_type == "qwen2"

    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache" / "tiny_models"


def test_tiny_model_path_losing_a_build_race_uses_the_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_build = tiny_model_module._build
    winners: list[Path] = []

    def build_while_another_process_finishes_first(out_dir: Path, spec: TinyModelSpec) -> object:
        target = tmp_path / f"{spec.arch}-{spec.seed}-{spec.cache_key()}"
        real_build(target, spec)  # the "other process" renames its complete model into place first
        winners.append(target)
        return real_build(out_dir, spec)

    monkeypatch.setattr(tiny_model_module, "_build", build_while_another_process_finishes_first)
    path = tiny_model_path("llama", seed=0, cache_dir=tmp_path, hidden_size=32)
    assert winners == [path]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # our staging copy was discarded


def test_cli_builds_a_loadable_model(tmp_path: Path) -> None:
    out = tmp_path / "cli-model"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kfp_components.testing.tiny_model",
            str(out),
            "--arch",
            "llama",
            "--seed",
            "1",
            "--hidden-size",
            "32",
            "--layers",
            "1",
            "--vocab-size",
            "512",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert str(out.resolve()) in lines[0] and "parameters" in lines[0]

    config = AutoConfig.from_pretrained(out)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.vocab_size) == (
        "llama",
        32,
        1,
        512,
    )
    assert len(AutoTokenizer.from_pretrained(out)) == 512
