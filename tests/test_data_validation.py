"""A corpus of malformed files, each with the error it must produce (file, line and what is wrong)."""

from __future__ import annotations

import gzip
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kfp_components.data import DatasetConfig, DatasetError, DatasetValidationError, prepare_dataset

from conftest import chat


def lines(*rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def msgs(*turns) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


GOOD = chat()
GOOD_TEXT = json.dumps(GOOD)
DEEP = "[" * 5000 + "]" * 5000  # deeper than Python's parser recurses
SURROGATE = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\\ud800"}]}'
HUGE_INTEGER = '{"messages": [{"role": "user", "content": "q"}], "n": ' + "9" * 5000 + "}"

CORPUS = {
    "bad_json.jsonl": (lines(GOOD, '{"messages": [', GOOD), "bad_json.jsonl:2: not valid JSON"),
    "wrong_role.jsonl": (
        lines(GOOD, GOOD, msgs(("user", "q"), ("robot", "a"))),
        "wrong_role.jsonl:3: messages[1].role: 'robot' is not one of system, user, assistant, tool",
    ),
    "missing_role.jsonl": (
        lines({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}),
        "missing_role.jsonl:1: messages[0].role: missing is not one of",
    ),
    "empty_content.jsonl": (
        lines(msgs(("user", "q"), ("assistant", "  "))),
        "messages[1].content: empty text",
    ),
    "no_assistant.jsonl": (
        lines(GOOD, msgs(("user", "q"))),
        "no_assistant.jsonl:2: messages: no assistant turn",
    ),
    "system_late.jsonl": (
        lines(msgs(("user", "q"), ("system", "s"), ("assistant", "a"))),
        "messages[1].role: a system message may only come first",
    ),
    "starts_with_assistant.jsonl": (
        lines(msgs(("assistant", "a"), ("user", "q"), ("assistant", "a"))),
        "must start with a user turn",
    ),
    "double_user.jsonl": (
        lines(msgs(("user", "q"), ("user", "q"), ("assistant", "a"))),
        "two user turns in a row",
    ),
    "orphan_tool.jsonl": (
        lines(msgs(("user", "q"), ("tool", "{}"), ("assistant", "a"))),
        "a tool message must follow an assistant or tool message",
    ),
    "mixed_formats.jsonl": (
        lines(GOOD, GOOD, {"prompt": "p", "chosen": "c", "rejected": "r"}),
        "mixed_formats.jsonl:3: row is in 'preference' format but the dataset is 'messages' "
        "(detected from mixed_formats.jsonl:1)",
    ),
    "empty.jsonl": (b"", "empty.jsonl: the file is empty"),
    "blank_lines_only.jsonl": (b"\n\n  \n", "blank_lines_only.jsonl: the file is empty"),
    "content_not_string.jsonl": (
        lines({"messages": [{"role": "user", "content": ["q"]}, {"role": "assistant", "content": 5}]}),
        "messages[0].content: expected a string, got a list; messages[1].content: expected a string, got a number",
    ),
    "messages_not_list.jsonl": (
        lines({"messages": "hello"}),
        "messages: expected a list of messages, got a string",
    ),
    "row_not_object.jsonl": (
        lines(GOOD, [1, 2]),
        "row_not_object.jsonl:2: expected a JSON object, got a list",
    ),
    "unknown_keys.jsonl": (lines({"body": "x"}), "cannot tell the format from the keys (body)"),
    "pref_identical.jsonl": (lines({"prompt": "p", "chosen": "same", "rejected": "same"}), "are identical"),
    "pref_wrong_type.jsonl": (
        lines({"prompt": "p", "chosen": 1, "rejected": "r"}),
        "pref_wrong_type.jsonl:1: chosen: expected a string, got a number",
    ),
    "prompt_answer_type.jsonl": (
        lines({"prompt": "p", "answer": 3}),
        "answer: expected a string, got a number",
    ),
    "not_utf8.jsonl": (lines(GOOD) + b'{"messages": "\xff\xfe"}\n', "not_utf8.jsonl:2: not valid UTF-8"),
    "array_unclosed.json": (b'[\n  {"messages": []},\n', "array_unclosed.json:"),
    "array_bad_element.json": (
        b"[\n" + json.dumps(GOOD).encode() + b',\n{"messages": [{"role": "user", "content": "q"}]}\n]',
        "array_bad_element.json:3: messages: no assistant turn",
    ),
    "not_parquet.parquet": (b"this is not parquet at all", "not_parquet.parquet: not a Parquet file"),
    # hostile content: a clear error with file:line, never a traceback
    "deep_nesting.jsonl": (
        lines(GOOD, '{"messages": ' + DEEP + "}"),
        "deep_nesting.jsonl:2: lists and objects nested more than 100 levels deep",
    ),
    "deep_but_parseable.jsonl": (
        lines({**GOOD, "meta": json.loads("[" * 150 + "]" * 150)}),
        "deep_but_parseable.jsonl:1: lists and objects nested more than 100 levels deep",
    ),
    "lone_surrogate.jsonl": (
        lines(GOOD, SURROGATE),
        "lone_surrogate.jsonl:2: messages[1].content: holds a lone UTF-16 surrogate",
    ),
    "huge_integer.jsonl": (
        lines(HUGE_INTEGER),
        "huge_integer.jsonl:1: a number has more than 4300 digits",
    ),
    "nan.jsonl": (
        lines(GOOD_TEXT[:-1] + ', "score": NaN}'),
        "nan.jsonl:1: not valid JSON: NaN is not a JSON value",
    ),
    "infinity.jsonl": (
        lines(GOOD, GOOD_TEXT[:-1] + ', "score": -Infinity}'),
        "infinity.jsonl:2: not valid JSON: -Infinity is not a JSON value",
    ),
    "gzip.jsonl": (
        gzip.compress(lines(GOOD)),
        "gzip.jsonl: the file is gzip-compressed; decompress it (gunzip)",
    ),
    "utf16.jsonl": (
        lines(GOOD, GOOD).decode().encode("utf-16"),
        "utf16.jsonl: the file is UTF-16 (little-endian) text; JSON files must be UTF-8",
    ),
    "utf16_big_endian_no_bom.jsonl": (
        lines(GOOD).decode().encode("utf-16-be"),
        "the file is UTF-16 (big-endian) text",
    ),
    "utf32.jsonl": (
        lines(GOOD).decode().encode("utf-32"),
        "utf32.jsonl: the file is UTF-32 (little-endian) text",
    ),
    "binary.jsonl": (b"\x00\x01\x02\x03 not text", "binary.jsonl: the file holds binary data (NUL bytes)"),
    "array_deep.json": (
        ("[\n" + GOOD_TEXT + ",\n" + DEEP + "\n]").encode(),
        "array_deep.json:3: lists and objects nested more than 100 levels deep",
    ),
    "array_nan.json": (
        ("[\n" + GOOD_TEXT + ",\n" + GOOD_TEXT[:-1] + ', "x": NaN}\n]').encode(),
        "array_nan.json:3: not valid JSON: NaN is not a JSON value",
    ),
    "array_huge_integer.json": (
        ("[\n" + HUGE_INTEGER + "\n]").encode(),
        "array_huge_integer.json:2: a number has more than 4300 digits",
    ),
    "array_surrogate.json": (
        ("[" + GOOD_TEXT + ",\n " + SURROGATE + "]").encode(),
        "array_surrogate.json:2: messages[1].content: holds a lone UTF-16 surrogate",
    ),
    "array_utf16.json": (("[" + GOOD_TEXT + "]").encode("utf-16"), "array_utf16.json: the file is UTF-16"),
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_malformed_file_gives_the_expected_error_and_writes_nothing(tmp_path, name):
    content, expected = CORPUS[name]
    source = tmp_path / "in" / name
    source.parent.mkdir()
    source.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(DatasetError) as raised:
        prepare_dataset(DatasetConfig(str(source)), out / "train.jsonl", out / "eval.jsonl")
    assert expected in str(raised.value)
    assert not out.exists() or not any(out.iterdir()), "no half-written output may be left behind"


def test_hostile_rows_are_dropped_like_any_invalid_row(tmp_path, caplog):
    source = tmp_path / "hostile.jsonl"
    nan = GOOD_TEXT[:-1] + ', "score": NaN}'
    source.write_bytes(lines(GOOD, '{"messages": ' + DEEP + "}", SURROGATE, HUGE_INTEGER, nan, chat("last")))
    with caplog.at_level(logging.WARNING):
        result = prepare_dataset(
            DatasetConfig(str(source), dataset_on_invalid="drop", train_split_ratio=1.0),
            tmp_path / "t.jsonl",
            tmp_path / "e.jsonl",
        )
    assert result.metrics["rows_dropped"] == 4 and result.metrics["train_rows"] == 2
    assert "hostile.jsonl:2: lists and objects nested more than 100 levels deep" in caplog.text

    def strict(constant: str) -> None:
        raise AssertionError(f"{constant} in the output")

    kept = [
        json.loads(line, parse_constant=strict) for line in (tmp_path / "t.jsonl").read_text().splitlines()
    ]
    assert kept == [GOOD, chat("last")]


def test_nan_from_parquet_is_an_invalid_row_not_invalid_json_output(tmp_path):
    path = tmp_path / "scores.parquet"
    pq.write_table(pa.Table.from_pylist([{**GOOD, "score": 0.5}, {**GOOD, "score": float("nan")}]), path)
    with pytest.raises(DatasetValidationError, match=r"scores.parquet: row 2: score: NaN or Infinity"):
        prepare_dataset(DatasetConfig(str(path)), tmp_path / "t", tmp_path / "e")


def test_error_lists_first_problems_and_counts_the_rest(tmp_path):
    rows = [GOOD] + [msgs(("user", f"q{i}")) for i in range(30)]
    source = tmp_path / "many.jsonl"
    source.write_bytes(lines(*rows))
    with pytest.raises(DatasetValidationError) as raised:
        prepare_dataset(DatasetConfig(str(source)), tmp_path / "t.jsonl", tmp_path / "e.jsonl")
    error = raised.value
    assert len(error.problems) == 30 and error.rows_read == 31
    text = str(error)
    assert "30 invalid row(s) of 31" in text and "many.jsonl:2:" in text and "many.jsonl:21:" in text
    assert "many.jsonl:22:" not in text and "... and 10 more" in text


def test_every_row_is_validated_not_just_the_first_hundred(tmp_path):
    rows = [GOOD] * 5000 + [msgs(("user", "q"), ("wizard", "a"))]
    source = tmp_path / "big.jsonl"
    source.write_bytes(lines(*rows))
    with pytest.raises(DatasetValidationError, match=r"big.jsonl:5001: messages"):
        prepare_dataset(DatasetConfig(str(source)), tmp_path / "t.jsonl", tmp_path / "e.jsonl")


def test_bom_is_accepted(tmp_path):
    source = tmp_path / "bom.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + lines(GOOD, GOOD))
    result = prepare_dataset(
        DatasetConfig(str(source), train_split_ratio=1.0), tmp_path / "t.jsonl", tmp_path / "e.jsonl"
    )
    assert result.metrics["train_rows"] == 2 and result.data_format == "messages"


def test_one_very_long_line(tmp_path):
    long_answer = "word " * 400_000  # a 2 MB line
    source = tmp_path / "long.jsonl"
    source.write_bytes(lines(GOOD, chat("q", long_answer), '{"messages": "' + "x" * 300_000))
    with pytest.raises(DatasetValidationError) as raised:
        prepare_dataset(DatasetConfig(str(source)), tmp_path / "t.jsonl", tmp_path / "e.jsonl")
    text = str(raised.value)
    assert "long.jsonl:3: not valid JSON" in text and "(300014 characters)" in text
    assert len(text) < 1000, "an error message must not echo a huge line"
    result = prepare_dataset(
        DatasetConfig(str(source), dataset_on_invalid="drop", train_split_ratio=1.0),
        tmp_path / "t.jsonl",
        tmp_path / "e.jsonl",
    )
    assert result.metrics["chars_max"] >= 2_000_000 and result.metrics["rows_dropped"] == 1


def test_explicit_format_override_checks_the_keys(tmp_path):
    source = tmp_path / "chat.jsonl"
    source.write_bytes(lines(GOOD))
    # a whole file in another format is said once, from its first row
    with pytest.raises(
        DatasetError,
        match=r"chat.jsonl:1: the rows are in 'messages' format \(written as 'messages'\), not a format "
        r"written as 'preference' \(preference, implicit_preference\)",
    ):
        prepare_dataset(DatasetConfig(str(source), data_format="preference"), tmp_path / "t", tmp_path / "e")
    # a later row of another format is a problem of that row
    pair = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    source.write_text(json.dumps(pair) + "\n" + lines(GOOD).decode())
    with pytest.raises(
        DatasetValidationError,
        match=r"chat.jsonl:2: row is in 'messages' format but the dataset is 'preference'",
    ):
        prepare_dataset(DatasetConfig(str(source), data_format="preference"), tmp_path / "t", tmp_path / "e")
    assert not (tmp_path / "t").exists()


def test_formats_are_detected(tmp_path):
    cases = {
        "messages": chat(),
        "preference": {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        },
        "prompt": {"prompt": "What is 2 + 2?", "answer": "4"},
    }
    for expected, row in cases.items():
        source = tmp_path / f"{expected}.jsonl"
        source.write_bytes(lines(row, row))
        result = prepare_dataset(
            DatasetConfig(str(source), train_split_ratio=1.0), tmp_path / "t", tmp_path / "e"
        )
        assert result.data_format == expected


def test_tool_calls_and_tool_results_are_valid(tmp_path):
    row = {
        "messages": [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "w"}}],
            },
            {"role": "tool", "content": '{"temp": 3}'},
            {"role": "assistant", "content": "It is 3 degrees."},
        ]
    }
    source = tmp_path / "tools.jsonl"
    source.write_bytes(lines(row))
    result = prepare_dataset(
        DatasetConfig(str(source), train_split_ratio=1.0), tmp_path / "t", tmp_path / "e"
    )
    assert result.metrics["turns_max"] == 5


def test_parquet_and_json_array_and_folder_of_shards(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps([chat("a1"), chat("a2")], indent=2))
    (folder / "c.jsonl").write_bytes(lines(chat("c1")))
    (folder / "README.md").write_text("not data")
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    pq.write_table(pa.Table.from_pylist([chat("p1"), chat("p2")]), parquet / "b-00000.parquet")
    pq.write_table(pa.Table.from_pylist([chat("p3")]), parquet / "b-00001.parquet")
    users = []
    for shards, names in ((folder, ["a.json", "c.jsonl"]), (parquet, ["b-00000.parquet", "b-00001.parquet"])):
        result = prepare_dataset(
            DatasetConfig(str(shards), train_split_ratio=1.0), tmp_path / "t.jsonl", tmp_path / "e.jsonl"
        )
        assert result.files == names
        users += [
            json.loads(line)["messages"][0]["content"]
            for line in (tmp_path / "t.jsonl").read_text().splitlines()
        ]
    assert users == ["a1", "a2", "c1", "p1", "p2", "p3"]


def test_parquet_rows_are_located_by_row_number(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                chat(),
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": "q",
                        }
                    ]
                },
            ]
        ),
        path,
    )
    with pytest.raises(DatasetValidationError, match=r"d.parquet: row 2: messages: no assistant turn"):
        prepare_dataset(DatasetConfig(str(path)), tmp_path / "t", tmp_path / "e")
