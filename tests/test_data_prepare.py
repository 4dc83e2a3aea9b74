"""Options, split, subset, drop, outputs and provenance of the dataset stage."""

from __future__ import annotations

import hashlib
import json

import pytest

from kfp_components.data import DatasetConfig, DatasetError, prepare_dataset
from kfp_components.data.prepare import split_rows
from kfp_components.typed_config import ConfigError, from_dict

from conftest import SAMPLES, chat, write_jsonl


def numbered(n: int) -> list[dict]:
    return [chat(f"question {i}", f"answer {i}") for i in range(n)]


def users(path) -> list[str]:
    return [json.loads(line)["messages"][0]["content"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"train_split_ratio": 0.0}, "train_split_ratio: 0.0 is not in (0, 1]"),
        ({"train_split_ratio": 1.5}, "train_split_ratio: 1.5 is not in (0, 1]"),
        ({"train_split_ratio": "half"}, "train_split_ratio: expected a number"),
        ({"dataset_subset_size": -1}, "dataset_subset_size: -1 is negative"),
        (
            {"dataset_subset_mode": "random"},
            "dataset_subset_mode: expected one of first, sample, got 'random'",
        ),
        ({"dataset_on_invalid": "ignore"}, "dataset_on_invalid: expected one of fail, drop, got 'ignore'"),
        ({"data_format": "sharegpt"}, "data_format: expected one of auto, messages, preference, prompt"),
    ],
)
def test_bad_options_fail_before_any_download(tmp_path, options, message):
    # 127.0.0.1:9 (discard) refuses connections: reaching it would fail differently and slowly.
    with pytest.raises(ConfigError) as raised:
        config = DatasetConfig("http://127.0.0.1:9/never-fetched.jsonl", **options)
        prepare_dataset(config, tmp_path / "t", tmp_path / "e")
    assert message in str(raised.value)
    assert not (tmp_path / "t").exists()


def test_every_bad_option_is_reported_at_once():
    with pytest.raises(ConfigError) as raised:
        from_dict(
            DatasetConfig,
            {"dataset_name_or_path": "ftp://x/y", "train_split_ratio": 2.0, "dataset_subset_size": -3},
        )
    assert [path for path, _ in raised.value.problems] == [
        "dataset_name_or_path",
        "train_split_ratio",
        "dataset_subset_size",
    ]


def test_split_is_deterministic_disjoint_and_complete(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", numbered(100))
    runs = []
    for attempt in range(2):
        out = tmp_path / f"run{attempt}"
        result = prepare_dataset(
            DatasetConfig(str(source), train_split_ratio=0.8, seed=7), out / "t", out / "e"
        )
        runs.append((users(out / "t"), users(out / "e"), result.train_sha256))
    assert runs[0] == runs[1]
    train, held_out, _ = runs[0]
    assert len(train) == 80 and len(held_out) == 20
    assert set(train).isdisjoint(held_out) and len(set(train) | set(held_out)) == 100
    assert train == sorted(train, key=lambda u: int(u.split()[1])), "each split keeps the source order"
    other = prepare_dataset(
        DatasetConfig(str(source), train_split_ratio=0.8, seed=8), tmp_path / "o" / "t", tmp_path / "o" / "e"
    )
    assert users(tmp_path / "o" / "t") != train and other.metrics["train_rows"] == 80


def test_ratio_one_means_no_eval_split(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", numbered(10))
    result = prepare_dataset(
        DatasetConfig(str(source), train_split_ratio=1.0), tmp_path / "t", tmp_path / "e"
    )
    assert result.metrics["train_rows"] == 10 and result.metrics["eval_rows"] == 0
    assert (tmp_path / "e").read_text() == ""


def test_small_ratio_still_keeps_a_training_row_and_an_eval_row():
    assert [len(part) for part in split_rows(["a", "b"], 0.01, 0)] == [1, 1]
    assert [len(part) for part in split_rows(["a", "b", "c"], 0.99, 0)] == [2, 1]


def test_subset_first_and_sample(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", numbered(50))
    prepare_dataset(
        DatasetConfig(str(source), train_split_ratio=1.0, dataset_subset_size=5),
        tmp_path / "t",
        tmp_path / "e",
    )
    assert users(tmp_path / "t") == [f"question {i}" for i in range(5)]
    picks = []
    for seed in (1, 1, 2):
        prepare_dataset(
            DatasetConfig(
                str(source),
                train_split_ratio=1.0,
                dataset_subset_size=5,
                dataset_subset_mode="sample",
                seed=seed,
            ),
            tmp_path / "t",
            tmp_path / "e",
        )
        picks.append(users(tmp_path / "t"))
    assert picks[0] == picks[1] != picks[2] and len(picks[0]) == 5


def test_drop_reports_counts(tmp_path):
    rows = [
        *numbered(8),
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"prompt": "other format"},
    ]
    source = write_jsonl(tmp_path / "d.jsonl", rows)
    result = prepare_dataset(
        DatasetConfig(str(source), dataset_on_invalid="drop", train_split_ratio=0.75),
        tmp_path / "t",
        tmp_path / "e",
    )
    assert result.metrics["rows_read"] == 10 and result.metrics["rows_dropped"] == 2
    assert (
        result.metrics["rows_valid"] == 8 and result.metrics["train_rows"] + result.metrics["eval_rows"] == 8
    )


def test_all_rows_invalid_under_drop_is_an_error(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [{"body": "x"}])
    with pytest.raises(DatasetError, match="no valid rows: 1 row"):
        prepare_dataset(DatasetConfig(str(source), dataset_on_invalid="drop"), tmp_path / "t", tmp_path / "e")


def test_sha256_is_of_the_written_train_file(tmp_path):
    result = prepare_dataset(
        DatasetConfig(str(SAMPLES / "chat.jsonl")), tmp_path / "t.jsonl", tmp_path / "e.jsonl"
    )
    assert result.train_sha256 == hashlib.sha256((tmp_path / "t.jsonl").read_bytes()).hexdigest()


def test_failure_keeps_earlier_outputs_untouched(tmp_path):
    (tmp_path / "t.jsonl").write_text("previous\n")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"body": "x"}])
    with pytest.raises(DatasetError):
        prepare_dataset(DatasetConfig(str(bad)), tmp_path / "t.jsonl", tmp_path / "e.jsonl")
    assert (tmp_path / "t.jsonl").read_text() == "previous\n" and not (tmp_path / "e.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "t.jsonl"]


def test_pvc_uri_reads_the_mounted_claim(tmp_path, monkeypatch):
    monkeypatch.setenv("KFP_COMPONENTS_PVC_ROOT", str(tmp_path / "mnt"))
    write_jsonl(tmp_path / "mnt" / "workspace" / "data" / "train.jsonl", numbered(4))
    result = prepare_dataset(
        DatasetConfig("pvc://workspace/data/train.jsonl", train_split_ratio=1.0),
        tmp_path / "t",
        tmp_path / "e",
    )
    assert result.metrics["train_rows"] == 4
    with pytest.raises(DatasetError, match="claim 'other' is not mounted at"):
        prepare_dataset(DatasetConfig("pvc://other/x.jsonl"), tmp_path / "t", tmp_path / "e")


def test_missing_local_path(tmp_path):
    with pytest.raises(DatasetError, match="no such file or folder"):
        prepare_dataset(DatasetConfig(str(tmp_path / "nope.jsonl")), tmp_path / "t", tmp_path / "e")


def test_dataset_split_picks_a_folders_split_and_is_refused_for_a_single_file(tmp_path):
    folder = tmp_path / "folder"
    write_jsonl(folder / "train.jsonl", numbered(6))
    write_jsonl(folder / "test.jsonl", [chat("held-out question", "answer")])
    out = tmp_path / "out"
    every = prepare_dataset(DatasetConfig(str(folder), train_split_ratio=1.0), out / "a", out / "b")
    assert every.metrics["train_rows"] == 7
    test = prepare_dataset(
        DatasetConfig(str(folder), dataset_split="test", train_split_ratio=1.0), out / "t", out / "e"
    )
    assert users(out / "t") == ["held-out question"] and test.files == ["test.jsonl"]
    with pytest.raises(DatasetError, match="no files for split 'validation'"):
        prepare_dataset(DatasetConfig(str(folder), dataset_split="validation"), out / "v", out / "w")
    with pytest.raises(
        DatasetError, match=r"is a single file, which has no splits, but dataset_split is 'test'"
    ):
        prepare_dataset(
            DatasetConfig(str(folder / "train.jsonl"), dataset_split="test"), out / "x", out / "y"
        )
    assert not (out / "x").exists()
