"""The formats people bring (ShareGPT, role/content conversations, Alpaca, prompt/completion, plain text,
implicit-prompt preference pairs), column mapping, mixtures and dataset folders, on bundled files: each is
detected, converted, reported, and trained on for a step; malformed variants fail at the right line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_fetch_hf import hf_env, hub, hub_root  # noqa: F401  (fixtures)

from kfp_components.data import DatasetConfig, DatasetError, DatasetValidationError, prepare_dataset
from kfp_components.data.formats import check_row
from kfp_components.data.mixture import parse_sources
from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.train import train
from kfp_components.typed_config import ConfigError

from conftest import chat, write_jsonl
from doubles.hf_hub_server import LocalHubServer, add_dataset_repo

FORMATS_DIR = Path(__file__).parent / "data" / "formats"
#: Bundled file -> (source format detected, format written).
BUNDLED = {
    "sharegpt.jsonl": ("sharegpt", "messages"),
    "conversations.jsonl": ("conversations", "messages"),
    "alpaca.json": ("alpaca", "messages"),
    "prompt_completion.jsonl": ("prompt_completion", "messages"),
    "text.jsonl": ("text", "text"),
    "implicit_preference.jsonl": ("implicit_preference", "preference"),
}


def prepare(tmp_path: Path, uri: str | Path, **options) -> tuple[object, list[dict]]:
    config = DatasetConfig(str(uri), train_split_ratio=1.0, **options)
    result = prepare_dataset(config, tmp_path / "train.jsonl", tmp_path / "eval.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    return result, rows


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_each_bundled_format_is_detected_converted_and_reported(tmp_path, name, caplog):
    source_format, written = BUNDLED[name]
    caplog.set_level("INFO", logger="kfp_components")
    result, rows = prepare(tmp_path, FORMATS_DIR / name)
    assert (result.data_format, result.source_format) == (written, source_format)
    assert result.metrics[f"rows_in_{source_format}"] == 8 == len(rows)
    assert all(check_row(row, written) == [] for row in rows)
    first_line = 2 if name.endswith(".json") else 1  # a JSON array's first element is on its second line
    assert f"{source_format} rows (detected from {name}:{first_line})" in caplog.text
    assert f"written as {written}" in caplog.text
    assert result.sources[0]["sha256"] == hashlib.sha256((FORMATS_DIR / name).read_bytes()).hexdigest()


def test_conversions_keep_non_ascii_tool_calls_and_systems(tmp_path):
    _, rows = prepare(tmp_path / "s", FORMATS_DIR / "sharegpt.jsonl")
    assert rows[0]["messages"][1]["content"] == "Die Hauptstadt heißt Stadt 0. 東京 ✓"
    tool_row = rows[1]
    assert [m["role"] for m in tool_row["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert tool_row["messages"][2]["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
    ]
    assert tool_row["tools"][0]["function"]["name"] == "get_weather"
    _, rows = prepare(tmp_path / "a", FORMATS_DIR / "alpaca.json")
    assert rows[0]["messages"] == [
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": "Translate to French: cat number 0\n\ncontext 0 — ça va"},
        {"role": "assistant", "content": "chat numéro 0"},
    ]
    assert rows[1]["messages"][0] == {"role": "user", "content": "Translate to French: cat number 1"}
    _, rows = prepare(tmp_path / "p", FORMATS_DIR / "implicit_preference.jsonl")
    assert rows[0] == {
        "prompt": [{"role": "user", "content": "Name 0?"}],
        "chosen": [{"role": "assistant", "content": "Nom 0"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    assert rows[1]["prompt"] == "\n\nHuman: What is 1+1?\n\nAssistant:"
    assert (rows[1]["chosen"], rows[1]["rejected"]) == (" It is 2.", " I don't know, ½?")


MALFORMED = {
    "wrong_speaker.jsonl": (
        [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}] * 2
        + [{"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}],
        "wrong_speaker.jsonl:3: conversations[1].from: 'robot' is not a known speaker",
    ),
    "missing_output.jsonl": (
        [{"instruction": "i", "output": "o"}, {"instruction": "i", "input": "x"}],
        "missing_output.jsonl:2: missing key(s) 'output' of the 'alpaca' format",
    ),
    "empty_instruction.jsonl": (
        [{"instruction": "i", "output": "o"}] * 3 + [{"instruction": "  ", "output": "o"}],
        "empty_instruction.jsonl:4: instruction: empty text",
    ),
    "no_shared_prefix.jsonl": (
        [
            {
                "chosen": [chat()["messages"][0], {"role": "assistant", "content": "a"}],
                "rejected": chat()["messages"],
            },
            {"chosen": "Good answer.", "rejected": "Bad answer."},
        ],
        "no_shared_prefix.jsonl:2: chosen and rejected share no prefix",
    ),
    "bad_function_call.jsonl": (
        [
            {
                "conversations": [
                    {"from": "human", "value": "q"},
                    {"from": "function_call", "value": "not json"},
                ]
            }
        ],
        "bad_function_call.jsonl:1: conversations[1].value: a function_call must be JSON text",
    ),
    "two_user_turns.jsonl": (
        [{"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}]}],
        "two_user_turns.jsonl:1: as messages rows: messages[1].role: two user turns in a row",
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_variants_are_rejected_at_their_line(tmp_path, name):
    rows, expected = MALFORMED[name]
    source = write_jsonl(tmp_path / name, rows)
    with pytest.raises(DatasetValidationError) as raised:
        prepare(tmp_path, source)
    assert expected in str(raised.value)
    assert not (tmp_path / "train.jsonl").exists()


def test_crlf_line_endings_are_read_as_rows(tmp_path):
    assert b"\r\n" in (FORMATS_DIR / "sharegpt.jsonl").read_bytes()
    result, _ = prepare(tmp_path, FORMATS_DIR / "sharegpt.jsonl")
    assert result.metrics["rows_read"] == 8


def test_explicit_source_format_overrides_detection(tmp_path):
    # rows with 'prompt' and 'completion' would be detected as prompt_completion; forced, they are prompts
    source = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}])
    result, rows = prepare(tmp_path, source, dataset_source_format="prompt")
    assert (result.data_format, rows) == ("prompt", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(ConfigError, match="dataset_source_format: sharegpt rows are written as messages"):
        DatasetConfig(str(source), data_format="preference", dataset_source_format="sharegpt").validate()


def test_field_map_renames_columns_before_validation(tmp_path):
    mapping = {"question": "prompt", "solution": "answer"}
    for given in (mapping, "question:prompt,solution:answer", json.dumps(mapping)):
        result, rows = prepare(tmp_path, FORMATS_DIR / "question_answer.jsonl", dataset_field_map=given)
        assert result.data_format == "prompt"
        assert rows[3] == {"prompt": "What is 3 squared?", "answer": "9"}
    with pytest.raises(ConfigError, match=r"dataset_field_map: 'solutions' is not a column of any format"):
        DatasetConfig("d.jsonl", dataset_field_map={"solution": "solutions"}).validate()
    clash = write_jsonl(tmp_path / "clash.jsonl", [{"question": "q", "prompt": "p"}])
    with pytest.raises(
        DatasetValidationError, match=r"clash\.jsonl:1: dataset_field_map maps 'question' to 'prompt'"
    ):
        prepare(tmp_path, clash, dataset_field_map=mapping)


def test_mixture_proportions_rows_per_source_and_hashes(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [chat(f"a{i}?") for i in range(1000)])
    b = FORMATS_DIR / "sharegpt.jsonl"
    big_b = tmp_path / "b.jsonl"
    big_b.write_bytes(b.read_bytes() * 125)  # 1000 ShareGPT rows
    result, rows = prepare(tmp_path / "out", f"{a}:0.7,{big_b}:0.3", seed=3)
    from_a = sum(row["messages"][0]["content"].startswith("a") for row in rows)
    assert len(rows) == 1429 and from_a == 1000  # a limits the size: 1000 / 0.7 rows, 30 % of them from b
    assert abs((len(rows) - from_a) / len(rows) - 0.3) < 0.01
    assert result.metrics["source_0_rows_used"] == 1000 and result.metrics["source_1_rows_used"] == 429
    assert result.metrics["rows_in_messages"] == 1000 and result.metrics["rows_in_sharegpt"] == 1000
    assert [s["sha256"] for s in result.sources] == [
        hashlib.sha256(path.read_bytes()).hexdigest() for path in (a, big_b)
    ]
    assert (
        0 < [row["messages"][0]["content"].startswith("a") for row in rows[:50]].count(True) < 50
    )  # shuffled
    again, rows_again = prepare(tmp_path / "again", f"{a}:0.7,{big_b}:0.3", seed=3)
    assert rows_again == rows and again.train_sha256 == result.train_sha256
    _, counted = prepare(tmp_path / "counts", f"{a}:100,{big_b}:50")
    assert (
        sum(row["messages"][0]["content"].startswith("a") for row in counted) == 100 and len(counted) == 150
    )
    with pytest.raises(DatasetError, match="asks for 2000 rows but the source has 1000 valid rows"):
        prepare(tmp_path / "x", f"{a}:2000,{big_b}:50")


def test_mixture_specs_parse_and_refuse_what_is_unclear():
    assert [(s.uri, s.weight) for s in parse_sources("hf://o/n:cfg:0.5,data/x.jsonl:.5")] == [
        ("hf://o/n:cfg", 0.5),
        ("data/x.jsonl", 0.5),
    ]
    assert parse_sources("hf://o/n:cfg") == parse_sources("hf://o/n:cfg")[:1]
    with pytest.raises(ConfigError, match="dataset_name_or_path: a mixture gives every source a weight"):
        DatasetConfig("a.jsonl:0.5,b.jsonl:10").validate()
    with pytest.raises(ConfigError, match=r"'b\.jsonl' of the mixture has no ':weight'"):
        DatasetConfig("a.jsonl:0.5,b.jsonl").validate()


def test_a_stage_yaml_may_list_the_sources_of_a_mixture(tmp_path):
    """The list form is read into the string form; each problem names the item's key path."""
    import yaml

    from kfp_components.orchestration.config import load_pipeline_config

    def load(sources):
        path = tmp_path / "chain.yaml"
        stage = {"dataset_name_or_path": sources, "eval_dataset_name_or_path": "e.jsonl"}
        path.write_text(
            yaml.safe_dump(
                {
                    "model_name_or_path": "m",
                    "output_dir": str(tmp_path / "out"),
                    "stages": ["sft"],
                    "stage_configs": {"sft": stage},
                }
            )
        )
        return load_pipeline_config(path).stage_configs["sft"]

    listed = [
        {"uri": "hf://org/chat", "weight": 0.7},
        {"uri": "/data/mine.jsonl", "weight": 1},
        "s3://data-bucket/k:0.5",
    ]
    config = load(listed)
    assert config.dataset_name_or_path == "hf://org/chat:0.7,/data/mine.jsonl:1.0,s3://data-bucket/k:0.5"
    assert [s.weight for s in parse_sources(config.dataset_name_or_path)] == [0.7, 1.0, 0.5]
    counted = load([{"uri": "a.jsonl", "rows": 5000}, {"uri": "b.jsonl", "rows": 10}]).dataset_name_or_path
    assert counted == "a.jsonl:5000,b.jsonl:10"
    with pytest.raises(ConfigError) as caught:
        load([{"uri": "a.jsonl", "weight": 0}, {"uri": "b.jsonl"}, {"uri": "c.jsonl", "rows": 2, "share": 1}])
    assert caught.value.problems == [
        ("stage_configs.sft.dataset_name_or_path[0].weight", "expected a number above 0, got 0"),
        (
            "stage_configs.sft.dataset_name_or_path[1]",
            "give the source a weight (0.3) or a number of rows (5000), one of them",
        ),
        (
            "stage_configs.sft.dataset_name_or_path[2].share",
            "unknown key; a source has uri and weight or rows",
        ),
    ]
    with pytest.raises(ConfigError, match=r"dataset_name_or_path: a mixture gives every source a weight"):
        load([{"uri": "a.jsonl", "weight": 0.5}, {"uri": "b.jsonl", "rows": 10}])
    with pytest.raises(
        ConfigError, match=r"dataset_name_or_path: a mixture lists two sources or more, got 1"
    ):
        load([{"uri": "a.jsonl", "weight": 0.5}])


def test_a_folder_reads_the_data_files_of_one_dataset(tmp_path):
    folder = tmp_path / "artifact"
    folder.mkdir()
    shutil.copy(FORMATS_DIR / "sharegpt.jsonl", folder / "data.jsonl")
    (folder / "executor_output.json").write_text('{"parameterValues": {}}')
    (folder / "dataset_info.json").write_text("{}")
    result, _ = prepare(tmp_path / "out", folder)
    assert result.files == ["data.jsonl"] and result.metrics["rows_read"] == 8
    pq.write_table(pa.table({"text": ["x"]}), folder / "more.parquet")
    with pytest.raises(DatasetError, match=r"data files of several kinds \(1 JSON text, 1 Parquet\)"):
        prepare(tmp_path / "out", folder)


def test_parquet_shards_and_save_to_disk_folders_are_datasets(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(2):
        conversations = [
            [{"from": "human", "value": f"q{shard}{i}"}, {"from": "gpt", "value": f"a{shard}{i}"}]
            for i in range(3)
        ]
        pq.write_table(
            pa.table({"conversations": conversations}), shards / f"train-0000{shard}-of-00002.parquet"
        )
    result, rows = prepare(tmp_path / "p", shards)
    assert result.source_format == "sharegpt" and len(rows) == 6
    saved = tmp_path / "saved"
    saved.mkdir()
    table = pa.table({"instruction": ["Say hi", "Say bye"], "output": ["hi", "bye"]})
    with pa.ipc.new_stream(saved / "data-00000-of-00001.arrow", table.schema) as writer:
        writer.write_table(table)
    (saved / "dataset_info.json").write_text("{}")
    (saved / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    result, rows = prepare(tmp_path / "s", saved)
    assert result.source_format == "alpaca" and rows[1]["messages"][1]["content"] == "bye"
    (saved.parent / "dict").mkdir()
    (saved.parent / "dict" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(DatasetError, match="a save_to_disk DatasetDict"):
        prepare(tmp_path / "d", saved.parent / "dict")


def test_sharegpt_dataset_from_the_local_hub(hub: LocalHubServer, hub_root: Path, tmp_path: Path):  # noqa: F811
    add_dataset_repo(hub_root, "org/sharegpt", {"train.jsonl": (FORMATS_DIR / "sharegpt.jsonl").read_text()})
    result, rows = prepare(tmp_path, "hf://org/sharegpt")
    assert (result.source_format, result.data_format, len(rows)) == ("sharegpt", "messages", 8)
    assert result.sources[0]["uri"] == "hf://org/sharegpt"


def engine_config(tmp_path: Path, data: Path, **overrides) -> TrainingConfig:
    options = {
        "model_name_or_path": str(tiny_model_path("qwen2", 0)),
        "data_path": str(data),
        "output_dir": str(tmp_path / "run"),
        "torch_dtype": "float32",
        "max_seq_len": 256,
        "effective_batch_size": 4,
        "max_tokens_per_gpu": 512,
        "max_steps": 1,
        "save_final_model": False,
        "seed": 0,
        **overrides,
    }
    return TrainingConfig(**options)


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_each_bundled_format_trains_a_step_on_a_tiny_model(tmp_path, name):
    result, _ = prepare(tmp_path / "data", FORMATS_DIR / name)
    overrides: dict = {"algorithm": "dpo"} if result.data_format == "preference" else {}
    if result.data_format == "text":
        overrides["data_format"] = "text"
    train(engine_config(tmp_path, result.train_path, **overrides))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and r.get("step") == 1]
    assert steps and steps[0]["loss"] > 0


def test_text_rows_are_labelled_on_every_token():
    from transformers import AutoTokenizer

    from kfp_components.trainer.tokenize import tokenize_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path("qwen2", 0))
    sample = tokenize_text("Plain Ünïcödé text.", tokenizer)
    assert sample.labels == sample.input_ids and sample.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(sample.input_ids[:-1]).strip().endswith("Plain Ünïcödé text.")
    with pytest.raises(ConfigError, match="data_format: text rows train sft and osft, not dpo"):
        engine_config(Path("/tmp"), Path("d.jsonl"), algorithm="dpo", data_format="text").validate()
