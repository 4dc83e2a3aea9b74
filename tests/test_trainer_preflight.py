"""The preflight checks and the trainer CLIs' input errors: every problem at once, named by its key path,
in seconds and before any weight loads; the CLIs print one ``error:`` line and exit with code 2."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer import preflight
from kfp_components.trainer.cli import fnsft_train_main, main
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.preflight import check_training_inputs, is_local_reference, preflight_problems
from kfp_components.trainer.train import train
from kfp_components.typed_config import ConfigError

from conftest import SAMPLES, chat, write_jsonl

CHAT = str(SAMPLES / "chat.jsonl")
PREFERENCE = str(SAMPLES / "preference.jsonl")


def config(tmp_path: Path, **overrides) -> TrainingConfig:
    options = {
        "model_name_or_path": str(tiny_model_path("qwen2", 0)),
        "data_path": CHAT,
        "output_dir": str(tmp_path / "run"),
        "torch_dtype": "float32",
        "max_seq_len": 256,
        "max_tokens_per_gpu": 256,
        "effective_batch_size": 8,
    }
    options.update(overrides)
    return TrainingConfig(**options)


def keys(problems: list[tuple[str, str]]) -> list[str]:
    return [key for key, _ in problems]


def test_a_good_config_has_no_problems_and_loads_no_weights(tmp_path, monkeypatch):
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("preflight loaded weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    started = time.monotonic()
    for options in (
        {},
        {"algorithm": "osft", "target_patterns": [r"self_attn\.q_proj$"]},
        {"lora_r": 4, "lora_target_modules": ["q_proj", "v_proj"]},
        {"algorithm": "dpo", "data_path": PREFERENCE, "eval_data_path": PREFERENCE, "osft_constraint": True},
    ):
        assert preflight_problems(config(tmp_path, **options)) == [], options
    assert time.monotonic() - started < 30
    check_training_inputs(config(tmp_path))  # raises nothing


def test_every_problem_at_once_with_its_key_path(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    cfg = config(
        tmp_path,
        data_path=str(tmp_path / "missing.jsonl"),
        eval_data_path=str(folder),
        lora_r=4,
        lora_target_modules=["q_proj", "qv_proj"],
        learning_rate=-1.0,
    )
    problems = preflight_problems(cfg)
    assert keys(problems) == ["learning_rate", "data_path", "eval_data_path", "lora_target_modules[1]"]
    messages = dict(problems)
    assert messages["data_path"] == f"no such file: {tmp_path / 'missing.jsonl'}"
    assert "is a folder; expected a JSONL file" in messages["eval_data_path"]
    assert "'qv_proj' matches no module of Qwen2ForCausalLM" in messages["lora_target_modules[1]"]
    assert "q_proj" in messages["lora_target_modules[1]"]  # the names it has
    with pytest.raises(ConfigError) as raised:
        check_training_inputs(cfg)
    assert raised.value.problems == problems and "4 problems" in str(raised.value)


def test_first_rows_must_be_in_the_algorithms_format(tmp_path):
    problems = preflight_problems(config(tmp_path, algorithm="dpo"))  # chat rows for dpo
    assert keys(problems) == ["data_path"]
    assert problems[0][1] == f"{CHAT}:1: a 'messages' row; algorithm dpo trains on 'preference' rows"

    bad = write_jsonl(tmp_path / "bad.jsonl", [chat(), {"messages": "not a list"}, chat()])
    (tmp_path / "broken.jsonl").write_text('{"messages": [\n')
    (tmp_path / "empty.jsonl").write_text("\n\n")
    messages = [m for _, m in preflight_problems(config(tmp_path, data_path=str(bad)))]
    assert messages == [f"{bad}:2: messages: expected a list of messages, got a string"]
    messages = [m for _, m in preflight_problems(config(tmp_path, data_path=str(tmp_path / "broken.jsonl")))]
    assert len(messages) == 1 and messages[0].startswith(f"{tmp_path / 'broken.jsonl'}:1: not valid JSON")
    messages = [m for _, m in preflight_problems(config(tmp_path, data_path=str(tmp_path / "empty.jsonl")))]
    assert messages == [f"{tmp_path / 'empty.jsonl'} has no rows"]


def test_only_the_first_rows_are_read_and_problems_are_capped(tmp_path):
    rows = [{"messages": []}] * (preflight.ROWS_CHECKED + 10)
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    messages = [m for _, m in preflight_problems(config(tmp_path, data_path=str(path)))]
    assert len(messages) == preflight.PROBLEMS_SHOWN_PER_FILE + 1
    hidden = preflight.ROWS_CHECKED - preflight.PROBLEMS_SHOWN_PER_FILE
    assert messages[-1] == f"{path}: {hidden} more problem(s) in the first rows"


def test_model_references_local_or_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not-a-model").mkdir()
    assert is_local_reference("./x") and is_local_reference("~/x") and is_local_reference("/x")
    assert is_local_reference("not-a-model") and not is_local_reference("org/name")
    cases = {
        str(tmp_path / "nowhere"): "no such folder: ",
        "./nowhere": "no such folder: ./nowhere (a local path: absolute, or starting with . or ~)",
        "not-a-model": "not-a-model has no config.json, so it is not a Hugging Face model folder",
        CHAT: "is a file; expected a model folder",
        "org/no-such-model": "'org/no-such-model' is not a local folder (a local path is absolute or starts",
    }
    for reference, expected in cases.items():
        problems = preflight_problems(config(tmp_path, model_name_or_path=reference))
        assert keys(problems) == ["model_name_or_path"] and expected in problems[0][1], (reference, problems)
    dpo = config(tmp_path, algorithm="dpo", data_path=PREFERENCE, ref_model_name_or_path="./nowhere")
    assert keys(preflight_problems(dpo)) == ["ref_model_name_or_path"]


def test_a_hub_id_resolves_through_the_hub_cache(tmp_path, monkeypatch):
    """A Hub id is resolved by transformers (offline here, from a Hub cache laid out as the client does)."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_path("qwen2", 0), snapshot)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert preflight_problems(config(tmp_path, model_name_or_path="org/tiny")) == []


def test_tokenizer_without_chat_template(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_path("qwen2", 0), model)
    (model / "chat_template.jinja").unlink()
    problems = preflight_problems(config(tmp_path, model_name_or_path=str(model)))
    assert keys(problems) == ["model_name_or_path"] and "has no chat template" in problems[0][1]


def test_osft_patterns_must_match_weights(tmp_path):
    cfg = config(tmp_path, algorithm="osft", target_patterns=[r"self_attn\.q_proj$", r"attn\.qkv$", "("])
    problems = preflight_problems(cfg)
    assert keys(problems) == ["target_patterns[2]", "target_patterns[1]"]  # invalid regex, then no match
    assert "OSFT found no target modules in Qwen2ForCausalLM" in problems[1][1]


def test_flash_attention_needs_its_package_and_a_gpu(tmp_path):
    cfg = config(tmp_path, attn_implementation="flash_attention_2")
    problems = preflight_problems(cfg)
    assert keys(problems) == ["attn_implementation", "attn_implementation"]
    assert "needs the flash-attn package" in problems[0][1] and "needs a CUDA GPU" in problems[1][1]
    assert preflight_problems(cfg, check_environment=False) == []
    assert keys(preflight_problems(config(tmp_path, model_name_or_path="./x"), check_model=False)) == []


def test_train_checks_first_and_writes_nothing(tmp_path):
    cfg = config(tmp_path, eval_data_path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="eval_data_path: no such file"):
        train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--data_path", "{tmp}/missing.jsonl"], "error: data_path: no such file: {tmp}/missing.jsonl\n"),
        (["--data_path", "{tmp}"], "error: data_path: {tmp} is a folder; expected a JSONL file"),
        (
            ["--model_name_or_path", "{tmp}/nowhere"],
            "error: model_name_or_path: no such folder: {tmp}/nowhere",
        ),
        (["--model_name_or_path", "{tmp}/no-template"], "error: model_name_or_path: the tokenizer of"),
    ],
)
def test_cli_input_errors_are_one_line_and_exit_code_2(tmp_path, capsys, flags, expected):
    no_template = tmp_path / "no-template"
    shutil.copytree(tiny_model_path("qwen2", 0), no_template)
    (no_template / "chat_template.jinja").unlink()
    argv = ["--model_name_or_path", str(tiny_model_path("qwen2", 0)), "--data_path", CHAT]
    argv += ["--output_dir", str(tmp_path / "out"), "--max_seq_len", "256", "--max_tokens_per_gpu", "256"]
    argv += [flag.format(tmp=tmp_path) for flag in flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected.format(tmp=tmp_path)) and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_fnsft_train_checks_the_model_before_fetching_data(tmp_path, capsys):
    argv = ["--model_name_or_path", "./nowhere", "--dataset_name_or_path", "s3://bucket/never-fetched.jsonl"]
    assert fnsft_train_main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model_name_or_path: no such folder: ./nowhere") and err.count("\n") == 1
