"""Hostile data: huge rows and files in bounded memory, short error messages, and pvc:// links out of the claim."""

from __future__ import annotations

import json
import logging
import random
import tracemalloc

import pytest

from kfp_components.data import DatasetConfig, DatasetError, DatasetValidationError, prepare_dataset, readers
from kfp_components.data.prepare import PROBLEMS_KEPT, eval_mask, split_rows
from kfp_components.data.readers import DataFile, RowError, read_rows

from conftest import chat, write_jsonl

GOOD = chat()


def test_error_messages_quote_a_short_snippet_never_a_whole_row(tmp_path, caplog):
    huge = "x" * 1_000_000
    rows = [
        {"k" + huge: 1},  # no known keys: the message lists the keys
        {"messages": [{"role": huge, "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [1] * 100_000},  # one problem per message
        '{"messages": "' + huge,  # not JSON: the message quotes the start of the line
    ]
    source = tmp_path / "big-rows.jsonl"
    source.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in [*rows[:1], GOOD, *rows[1:]])
    )
    with pytest.raises(DatasetValidationError) as raised:
        prepare_dataset(DatasetConfig(str(source)), tmp_path / "t", tmp_path / "e")
    text = str(raised.value)
    assert len(text) < 3000, "a row of 1 MB must not land in an exception"
    assert "big-rows.jsonl:1: cannot tell the format from the keys (kxxxx" in text
    assert "big-rows.jsonl:3: messages[0].role: 'xxxx" in text
    assert "big-rows.jsonl:4: messages[0]: expected an object" in text and "and 99995 more problem(s)" in text
    assert "big-rows.jsonl:5: not valid JSON" in text and "(1000014 characters)" in text
    with caplog.at_level(logging.INFO):
        prepare_dataset(DatasetConfig(str(source), dataset_on_invalid="drop"), tmp_path / "t", tmp_path / "e")
    assert max(len(record.getMessage()) for record in caplog.records) < 1000, "nor in a log line"


def test_a_line_longer_than_the_row_limit_is_an_invalid_row(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_ROW_BYTES", 1000)
    long_row = chat("q", "a" * 5000)
    source = write_jsonl(tmp_path / "d.jsonl", [GOOD, long_row, chat("after")])
    with pytest.raises(
        DatasetValidationError, match=r"d.jsonl:2: the line is 5\d+ bytes, longer than 1000 bytes"
    ):
        prepare_dataset(DatasetConfig(str(source)), tmp_path / "t", tmp_path / "e")
    result = prepare_dataset(
        DatasetConfig(str(source), dataset_on_invalid="drop", train_split_ratio=1.0),
        tmp_path / "t",
        tmp_path / "e",
    )
    assert result.metrics["rows_read"] == 3 and result.metrics["train_rows"] == 2
    assert json.loads((tmp_path / "t").read_text().splitlines()[1]) == chat("after"), (
        "reading goes on after it"
    )


def test_an_array_element_longer_than_the_row_limit_stops_with_its_line(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_ROW_BYTES", 1000)
    monkeypatch.setattr(readers, "_READ_CHUNK", 64)
    source = tmp_path / "d.json"
    source.write_text("[\n" + json.dumps(GOOD) + ",\n" + json.dumps(chat("q", "a" * 5000)) + "\n]")
    with pytest.raises(DatasetError, match=r"d.json:3: an array element is longer than 1000 bytes"):
        prepare_dataset(DatasetConfig(str(source)), tmp_path / "t", tmp_path / "e")


ARRAY_ROWS = [
    chat("first"),
    {"prompt": "p", "n": 12345678901234567890, "x": 1.5e-7, "neg": -0.0, "t": True, "f": False, "none": None},
    chat('ünïcödé 🙂 \u2028 \\ " / \t', "é" * 300),
    {"nested": [[[{"a": [1, [2, [3]]]}]]], "empty": {}, "list": []},
    chat("last"),
]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 16, 64, 1 << 20])
@pytest.mark.parametrize("indent", [None, 2])
def test_json_arrays_read_in_chunks_give_the_same_rows_and_lines(tmp_path, monkeypatch, chunk, indent):
    monkeypatch.setattr(readers, "_READ_CHUNK", chunk)
    source = tmp_path / "a.json"
    text = json.dumps(ARRAY_ROWS, indent=indent, ensure_ascii=False)
    source.write_bytes(b"\xef\xbb\xbf" + text.encode())
    read = list(read_rows(DataFile(source, "a.json")))
    assert [row for _, row in read] == ARRAY_ROWS
    expected_lines = [1] * 5 if indent is None else [2, 14, 23, 35, 56]  # as the reader said before
    assert [location.line for location, _ in read] == expected_lines


@pytest.mark.parametrize("chunk", [1, 3, 16, 1 << 20])
def test_an_invalid_array_element_is_located_by_line_and_column_whatever_the_chunks(
    tmp_path, monkeypatch, chunk
):
    monkeypatch.setattr(readers, "_READ_CHUNK", chunk)
    source = tmp_path / "a.json"
    source.write_text("[\n" + json.dumps(GOOD) + ",\n" + json.dumps(GOOD) + ',\n  {"messages": [}\n]')
    with pytest.raises(DatasetError, match=r"a.json:4: not valid JSON: Expecting value \(column 17\)"):
        list(read_rows(DataFile(source, "a.json")))
    source.write_text("[1, 2" + " " * 100 + "x]")
    with pytest.raises(DatasetError, match=r"a.json:1: expected ',' or ']' between array elements"):
        list(read_rows(DataFile(source, "a.json")))
    source.write_text("[1, 2] x")
    with pytest.raises(DatasetError, match=r"a.json:1: unexpected data after the closing"):
        list(read_rows(DataFile(source, "a.json")))
    source.write_bytes(b'[\n"ok",\n"\xff"]')
    with pytest.raises(DatasetError, match=r"a.json:3: not valid UTF-8"):
        list(read_rows(DataFile(source, "a.json")))


def test_a_number_cut_by_a_chunk_boundary_is_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "_READ_CHUNK", 4)
    source = tmp_path / "n.json"
    source.write_text("[12345e2, -0.125,12  ,  true]")
    assert [row for _, row in read_rows(DataFile(source, "n.json"))] == [12345e2, -0.125, 12, True]


def _python_peak(run) -> int:
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("layout", ["jsonl", "json"])
def test_peak_memory_does_not_grow_with_the_file(tmp_path, layout):
    """The stage held every valid row in memory (a 2 GB file took 2.5 GB); now the peak is a few bytes a
    row. 24 MB of rows must not take more than 8 MB of Python memory at any point."""
    rng = random.Random(0)
    rows = [
        chat(f"q{i} " + "word " * rng.randrange(100, 400), "answer " * rng.randrange(100, 800))
        for i in range(8000)
    ]
    source = tmp_path / f"d.{layout}"
    if layout == "jsonl":
        write_jsonl(source, rows)
    else:
        source.write_text(json.dumps(rows))  # one line: the reader cannot hold it
    del rows
    assert source.stat().st_size > 20_000_000

    def run():
        prepare_dataset(
            DatasetConfig(str(source), train_split_ratio=0.9, seed=1), tmp_path / "t", tmp_path / "e"
        )

    peak = _python_peak(run)
    assert peak < 8_000_000, (
        f"peak {peak / 1e6:.1f} MB of Python memory for {source.stat().st_size / 1e6:.0f} MB"
    )
    assert (tmp_path / "t").stat().st_size + (tmp_path / "e").stat().st_size > 20_000_000


def test_only_the_first_problems_are_kept_and_all_are_counted(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [GOOD] + [{"messages": []}] * (PROBLEMS_KEPT + 500))
    with pytest.raises(DatasetValidationError) as raised:
        prepare_dataset(DatasetConfig(str(source)), tmp_path / "t", tmp_path / "e")
    error = raised.value
    assert len(error.problems) == PROBLEMS_KEPT and error.problem_count == PROBLEMS_KEPT + 500
    assert f"{PROBLEMS_KEPT + 500} invalid row(s) of {PROBLEMS_KEPT + 501}" in str(error)
    assert f"... and {PROBLEMS_KEPT + 480} more" in str(error)


def _split_by_shuffling_a_list(rows: list, ratio: float, seed: int) -> tuple[list, list]:
    """The split as the stage made it when it held every row in a list: the reference it must keep."""
    if ratio >= 1 or len(rows) < 2:
        return list(rows), []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_train = min(max(round(len(rows) * ratio), 1), len(rows) - 1)
    return [rows[i] for i in sorted(order[:n_train])], [rows[i] for i in sorted(order[n_train:])]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 999, 4096])
@pytest.mark.parametrize(("ratio", "seed"), [(0.9, 42), (0.5, 0), (0.01, 7), (0.99, 3), (1.0, 1)])
def test_the_split_by_row_number_is_the_split_of_a_shuffled_list(n, ratio, seed):
    rows = [f"row {i}" for i in range(n)]
    assert split_rows(rows, ratio, seed) == _split_by_shuffling_a_list(rows, ratio, seed)
    held_out = eval_mask(n, ratio, seed)
    assert (0 if held_out is None else len(held_out)) == len(_split_by_shuffling_a_list(rows, ratio, seed)[1])


def test_outputs_are_byte_identical_to_the_in_memory_stage(tmp_path):
    """The train file's sha256 of a fixed dataset and seed, as the stage wrote it before it streamed."""
    source = write_jsonl(tmp_path / "d.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(200)])
    result = prepare_dataset(
        DatasetConfig(
            str(source), train_split_ratio=0.8, seed=5, dataset_subset_size=150, dataset_subset_mode="sample"
        ),
        tmp_path / "t",
        tmp_path / "e",
    )
    assert result.train_sha256 == "c71f324aba898b670dbdf3d52c16f52dde2692fb7ded608c8ed5e6e06738679c"
    assert result.metrics["train_rows"] == 120 and result.metrics["eval_rows"] == 30


# -- pvc:// ---------------------------------------------------------------------------------------


@pytest.fixture
def claim(tmp_path, monkeypatch):
    root = tmp_path / "pvc"
    (root / "workspace" / "data").mkdir(parents=True)
    monkeypatch.setenv("KFP_COMPONENTS_PVC_ROOT", str(root))
    outside = write_jsonl(tmp_path / "elsewhere" / "secret.jsonl", [chat("not yours")])
    return root / "workspace", outside


def test_pvc_file_link_out_of_the_claim_is_refused(tmp_path, claim):
    root, outside = claim
    (root / "data" / "link.jsonl").symlink_to(outside)
    with pytest.raises(
        DatasetError,
        match=r"pvc://workspace/data/link.jsonl: the path is a symbolic link that leads out of claim 'workspace'",
    ):
        prepare_dataset(DatasetConfig("pvc://workspace/data/link.jsonl"), tmp_path / "t", tmp_path / "e")
    assert not (tmp_path / "t").exists()


def test_pvc_folder_holding_a_link_out_of_the_claim_is_refused(tmp_path, claim):
    root, outside = claim
    write_jsonl(root / "data" / "a.jsonl", [GOOD])
    (root / "data" / "b.jsonl").symlink_to(outside)
    with pytest.raises(
        DatasetError, match=r"pvc://workspace/data: b.jsonl is a symbolic link that leads out of claim"
    ):
        prepare_dataset(DatasetConfig("pvc://workspace/data"), tmp_path / "t", tmp_path / "e")


def test_pvc_folder_link_out_of_the_claim_is_refused(tmp_path, claim):
    root, outside = claim
    (root / "escape").symlink_to(outside.parent)
    with pytest.raises(
        DatasetError, match=r"pvc://workspace/escape: the path is a symbolic link that leads out"
    ):
        prepare_dataset(DatasetConfig("pvc://workspace/escape"), tmp_path / "t", tmp_path / "e")


def test_pvc_links_inside_the_claim_are_followed(tmp_path, claim):
    root, _ = claim
    write_jsonl(root / "data" / "real.jsonl", [GOOD, chat("two")])
    (root / "current.jsonl").symlink_to(root / "data" / "real.jsonl")
    result = prepare_dataset(
        DatasetConfig("pvc://workspace/current.jsonl", train_split_ratio=1.0), tmp_path / "t", tmp_path / "e"
    )
    assert result.metrics["train_rows"] == 2 and result.files == ["current.jsonl"]


def test_row_errors_do_not_stop_a_jsonl_file(tmp_path):
    source = tmp_path / "d.jsonl"
    source.write_text(json.dumps(GOOD) + "\n" + '{"a": NaN}\n' + json.dumps(GOOD) + "\n")
    read = list(read_rows(DataFile(source, "d.jsonl")))
    assert [location.line for location, _ in read] == [1, 2, 3]
    assert isinstance(read[1][1], RowError) and read[2][1] == GOOD
