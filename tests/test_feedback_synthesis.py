"""Synthetic reasoning data: a scripted teacher endpoint on 127.0.0.1 that reasons and is wrong on a known share
of problems; rejection sampling keeps exactly its correct traces; retries, the budget, resume after a kill,
the key, bad input, a local tiny teacher through the rollout code, and the KFP component."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kfp_components.data.formats import MESSAGES, check_row
from kfp_components.feedback.endpoint import FeedbackError
from kfp_components.feedback.synthesis import RejectionOptions, TraceFilter, similarity, synthesize
from kfp_components.feedback.teacher import (
    DEFAULT_TEACHER_SYSTEM_PROMPT,
    Teacher,
    TeacherOptions,
    problem_seed,
)
from kfp_components.testing.openai_server import ScriptedChatServer
from kfp_components.typed_config import ConfigError, from_dict

from conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-teacher-secret-0123456789"
PROBLEM = re.compile(r"Problem (\d+): what is (\d+) \+ (\d+)\?")


def problems(count: int) -> list[dict[str, Any]]:
    return [
        {"prompt": f"Problem {i}: what is {i} + {2 * i + 1}?", "answer": str(3 * i + 1), "level": i % 3}
        for i in range(count)
    ]


def unsolved(index: int) -> bool:
    """The scripted teacher gets every sample of these problems wrong."""
    return index % 5 == 4


def correct(index: int, sample: int) -> bool:
    """Of the other problems, the even samples are right and the odd ones wrong."""
    return not unsolved(index) and sample % 2 == 0


def trace(index: int, a: int, b: int, sample: int) -> str:
    answer = a + b if correct(index, sample) else a + b + 1
    return f"Step 1: start from {a}.\nStep 2: add {b} (draft {sample}).\n#### {answer}"


class ScriptedTeacher:
    """The server's respond(): choice j of a request is sample j (the server asks once per choice, in order)."""

    def __init__(self, write=trace):
        self.write = write
        self.calls: dict[tuple[str, Any], int] = {}
        self.lock = threading.Lock()

    def __call__(self, messages: list[dict[str, Any]], body: dict[str, Any]) -> str:
        content = str(messages[-1]["content"])
        key = (content, body.get("seed"))
        with self.lock:
            sample = self.calls.get(key, 0) % int(body.get("n") or 1)
            self.calls[key] = self.calls.get(key, 0) + 1
        match = PROBLEM.search(content)
        assert match, content
        index, a, b = (int(group) for group in match.groups())
        return self.write(index, a, b, sample)


def expected_rows(count: int, num_samples: int = 4, model: str = "teacher") -> list[dict[str, Any]]:
    rows = []
    for row_index, row in enumerate(problems(count)):
        a, b = (int(g) for g in PROBLEM.search(row["prompt"]).groups()[1:])  # type: ignore[union-attr]
        for sample in range(num_samples):
            if correct(row_index, sample):
                rows.append(
                    {
                        "messages": [
                            {"role": "user", "content": row["prompt"]},
                            {"role": "assistant", "content": trace(row_index, a, b, sample)},
                        ],
                        "teacher": model,
                        "sample_index": sample,
                        "verified": True,
                        "problem": row_index,
                        "answer": row["answer"],
                    }
                )
    return rows


def teacher_options(server: ScriptedChatServer, **overrides: Any) -> TeacherOptions:
    values: dict[str, Any] = {
        "base_url": server.base_url,
        "model": "teacher",
        "num_samples": 4,
        "max_tokens": 64,
        "max_concurrency": 4,
        "timeout_seconds": 10.0,
        "retries": 3,
        "backoff_seconds": 0.01,
        **overrides,
    }
    return from_dict(TeacherOptions, values)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def asked_problems(server: ScriptedChatServer) -> list[int]:
    found = []
    for request in server.chat_requests:
        match = PROBLEM.search(request.body["messages"][-1]["content"])
        assert match
        found.append(int(match.group(1)))
    return found


def test_the_kept_traces_are_exactly_the_correct_ones(tmp_path):
    data = write_jsonl(tmp_path / "problems.jsonl", problems(10))
    with ScriptedChatServer(ScriptedTeacher(), models=("teacher",)) as server:
        summary = synthesize(
            data,
            tmp_path / "out" / "reasoning.jsonl",
            teacher_options(server),
            RejectionOptions(),
            chunk_size=4,
        )
    rows = read_jsonl(tmp_path / "out" / "reasoning.jsonl")
    assert rows == expected_rows(10)
    assert all(check_row(row, MESSAGES) == [] for row in rows)  # what the dataset stage accepts
    # one request per problem, num_samples choices each, every problem with its own seed
    requests = server.chat_requests
    assert sorted(asked_problems(server)) == list(range(10))
    assert {request.body["n"] for request in requests} == {4}
    seeds = {
        asked: request.body["seed"] for asked, request in zip(asked_problems(server), requests, strict=True)
    }
    assert seeds == {i: problem_seed(42, i) for i in range(10)}
    assert all(
        r.body["messages"][0] == {"role": "system", "content": DEFAULT_TEACHER_SYSTEM_PROMPT}
        for r in requests
    )
    assert "top_p" not in requests[0].body and requests[0].body["temperature"] == 0.7
    # the problems without a correct trace are listed, with what the extractor made of the first trace
    listed = read_jsonl(tmp_path / "out" / "unsolved.jsonl")
    assert [entry["problem"] for entry in listed] == [4, 9]
    assert listed[0]["first_trace"] == trace(4, 4, 9, 0) and listed[0]["extracted"] == "14"
    assert listed[0]["answer"] == "13" and listed[0]["dropped"] == {"wrong_answer": 4}
    assert summary.unsolved_path == str(tmp_path / "out" / "unsolved.jsonl")
    metrics = summary.metrics()
    assert metrics["problems"] == 10 and metrics["traces_generated"] == 40 and metrics["traces_kept"] == 16
    assert metrics["verified_share"] == pytest.approx(16 / 40)
    assert metrics["dropped_wrong_answer"] == 24 and metrics["dropped_empty"] == 0
    assert metrics["problems_without_trace"] == 2 and metrics["requests"] == 10
    assert (
        metrics["completion_tokens"] > 0 and metrics["prompt_tokens"] > 0 and metrics["resumed_problems"] == 0
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "reasoning.jsonl",
        "reasoning.jsonl.done.json",  # the finished synthesis, for a rerun
        "unsolved.jsonl",
    ]


def test_concurrency_is_bounded_and_5xx_answers_are_retried(tmp_path, caplog):
    data = write_jsonl(tmp_path / "problems.jsonl", problems(12))
    with ScriptedChatServer(ScriptedTeacher(), models=("teacher",), latency_seconds=0.05) as server:
        server.fail_next(503, count=2)
        with caplog.at_level(logging.INFO):
            summary = synthesize(
                data,
                tmp_path / "out.jsonl",
                teacher_options(server, max_concurrency=3),
                RejectionOptions(),
                chunk_size=6,
            )
    assert server.max_in_flight == 3
    assert read_jsonl(tmp_path / "out.jsonl") == expected_rows(12)
    assert (summary.requests, summary.retries, summary.failures) == (14, 2, 2)
    assert "HTTP 503" in caplog.text and "retry 1 of 3" in caplog.text
    assert "synthesis: 6/12 problems, " in caplog.text and "synthesis: 12/12 problems, " in caplog.text
    assert "ETA 0 s" in caplog.text


def test_the_budget_stops_the_run_clearly_and_a_rerun_with_more_continues(tmp_path, caplog):
    data = write_jsonl(tmp_path / "problems.jsonl", problems(10))
    output = tmp_path / "out.jsonl"
    with ScriptedChatServer(ScriptedTeacher(), models=("teacher",)) as server:
        options = teacher_options(server, max_concurrency=1, max_requests=5)
        with pytest.raises(FeedbackError, match=r"request budget spent: max_requests=5") as error:
            synthesize(data, output, options, RejectionOptions(), chunk_size=2)
    assert "synthesis stopped at problem 4 of 10" in " ".join(error.value.__notes__)
    assert not output.exists()
    progress = json.loads((tmp_path / "out.jsonl.progress.json").read_text())
    assert progress["problems_done"] == 4 and progress["counts"]["traces_kept"] == 8
    with ScriptedChatServer(ScriptedTeacher(), models=("teacher",)) as server, caplog.at_level(logging.INFO):
        summary = synthesize(
            data, output, teacher_options(server, max_concurrency=1), RejectionOptions(), chunk_size=2
        )
    assert "resuming after 4 of 10 problems" in caplog.text
    assert asked_problems(server) == list(range(4, 10))  # the finished problems are not asked again
    assert read_jsonl(output) == expected_rows(10)
    assert summary.resumed_problems == 4 and summary.requests == 5 + 6  # the budget-stopped run's count too
    assert summary.traces_kept == 16 and not (tmp_path / "out.jsonl.progress.json").exists()


def test_changed_options_start_over(tmp_path, caplog):
    data = write_jsonl(tmp_path / "problems.jsonl", problems(6))
    output = tmp_path / "out.jsonl"
    with ScriptedChatServer(ScriptedTeacher(), models=("teacher",)) as server, pytest.raises(FeedbackError):
        synthesize(
            data,
            output,
            teacher_options(server, max_concurrency=1, max_requests=3),
            RejectionOptions(),
            chunk_size=2,
        )
    with ScriptedChatServer(ScriptedTeacher(), models=("teacher",)) as server, caplog.at_level(logging.INFO):
        summary = synthesize(
            data, output, teacher_options(server, temperature=0.9), RejectionOptions(), chunk_size=2
        )
    assert "the problems or the options changed since the interrupted run" in caplog.text
    assert "starting over" in caplog.text
    assert summary.resumed_problems == 0 and sorted(asked_problems(server)) == list(range(6))
    assert read_jsonl(output) == expected_rows(6)


_KILLED_RUN = """
import sys
from kfp_components.feedback.synthesis import RejectionOptions, synthesize
from kfp_components.feedback.teacher import TeacherOptions

base_url, problems, output = sys.argv[1:4]
options = TeacherOptions(base_url=base_url, model="teacher", num_samples=4, max_tokens=64, max_concurrency=1)
synthesize(problems, output, options, RejectionOptions(), chunk_size=2, progress=False)
print("finished", flush=True)
"""


def test_a_killed_run_resumes_and_writes_what_an_uninterrupted_run_writes(tmp_path):
    count = 30
    data = write_jsonl(tmp_path / "problems.jsonl", problems(count))
    killed = tmp_path / "killed" / "out.jsonl"
    killed.parent.mkdir()
    progress = killed.with_name("out.jsonl.progress.json")
    with ScriptedChatServer(ScriptedTeacher(), models=("teacher",), latency_seconds=0.1) as server:
        process = subprocess.Popen(
            [sys.executable, "-c", _KILLED_RUN, server.base_url, str(data), str(killed)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and process.poll() is None:
                if progress.exists() and json.loads(progress.read_text())["problems_done"] >= 6:
                    break
                time.sleep(0.02)
            assert process.poll() is None, "the run ended before it could be killed"
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
    assert not killed.exists()
    done = json.loads(progress.read_text())["problems_done"]
    assert 6 <= done < count

    with ScriptedChatServer(ScriptedTeacher(), models=("teacher",)) as server:
        resumed = synthesize(data, killed, teacher_options(server), RejectionOptions(), chunk_size=2)
        assert sorted(asked_problems(server)) == list(range(done, count))
    with ScriptedChatServer(ScriptedTeacher(), models=("teacher",)) as server:
        whole = synthesize(
            data, tmp_path / "whole" / "out.jsonl", teacher_options(server), RejectionOptions(), chunk_size=2
        )
    assert killed.read_bytes() == (tmp_path / "whole" / "out.jsonl").read_bytes()
    assert read_jsonl(killed) == expected_rows(count)
    assert (tmp_path / "killed" / "unsolved.jsonl").read_bytes() == (
        tmp_path / "whole" / "unsolved.jsonl"
    ).read_bytes()
    assert resumed.resumed_problems == done and resumed.traces_kept == whole.traces_kept
    assert resumed.problems_without_trace == whole.problems_without_trace == count // 5


def test_the_key_is_sent_as_a_bearer_token_and_never_logged_or_written(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TEACHER_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    data = write_jsonl(tmp_path / "problems.jsonl", problems(5))
    with ScriptedChatServer(ScriptedTeacher(), models=("teacher",), api_key=KEY) as server:
        server.fail_next(500, body=f'{{"error": {{"message": "bad key {KEY}"}}}}')
        synthesize(
            data, tmp_path / "out.jsonl", teacher_options(server, token_env="TEACHER_KEY"), RejectionOptions()
        )
    assert {r.headers["authorization"] for r in server.requests} == {f"Bearer {KEY}"}
    assert "retry 1 of 3" in caplog.text
    assert KEY not in caplog.text
    for record in caplog.records:
        assert KEY not in record.getMessage()
    for path in tmp_path.iterdir():
        assert KEY not in path.read_text(), path


def test_problems_without_the_answer_column_fail_before_any_request(tmp_path):
    rows = problems(4)
    del rows[2]["answer"]
    rows[3]["answer"] = " "
    data = write_jsonl(tmp_path / "problems.jsonl", rows)
    with ScriptedChatServer(ScriptedTeacher(), models=("teacher",)) as server:
        with pytest.raises(ValueError) as error:
            synthesize(data, tmp_path / "out.jsonl", teacher_options(server), RejectionOptions())
        assert server.requests == []
    text = str(error.value)
    assert f"{data}:3: the answer column 'answer' is missing (the row has: level, prompt)" in text
    assert f"{data}:4: answer: empty text" in text
    assert list(tmp_path.iterdir()) == [data]


def test_an_endpoint_that_does_not_serve_the_model_fails_before_any_file_is_written(tmp_path):
    data = write_jsonl(tmp_path / "problems.jsonl", problems(2))
    with (
        ScriptedChatServer(ScriptedTeacher(), models=("other",)) as server,
        pytest.raises(FeedbackError) as error,
    ):
        synthesize(data, tmp_path / "out.jsonl", teacher_options(server), RejectionOptions())
    assert "the model 'teacher' is not served; the endpoint serves 'other'" in str(error.value)
    assert server.chat_requests == [] and list(tmp_path.iterdir()) == [data]


def test_an_unknown_template_placeholder_fails_before_any_request(tmp_path):
    data = write_jsonl(tmp_path / "problems.jsonl", problems(2))
    with ScriptedChatServer(ScriptedTeacher(), models=("teacher",)) as server:
        options = teacher_options(server, prompt_template="{prompt} (difficulty {difficulty})")
        with pytest.raises(
            ConfigError, match=r"prompt_template: placeholder \{difficulty\} .* \(answer, level\)"
        ):
            synthesize(data, tmp_path / "out.jsonl", options, RejectionOptions())
        assert server.requests == []


def test_an_extractor_that_never_matches_quotes_the_teachers_output(tmp_path):
    data = write_jsonl(tmp_path / "problems.jsonl", problems(3))
    words = ("one", "two", "three", "four")
    vague = ScriptedTeacher(
        lambda index, a, b, sample: f"Adding them gives a big result (try {words[sample]})."
    )
    with ScriptedChatServer(vague, models=("teacher",)) as server, pytest.raises(ValueError) as error:
        synthesize(data, tmp_path / "out.jsonl", teacher_options(server), RejectionOptions())
    text = str(error.value)
    assert "no trace was kept: 12 traces generated for 3 problems, all dropped (no_answer 12)" in text
    assert "never matched the 'answer' column" in text
    assert (
        "problem 0: the teacher wrote 'Adding them gives a big result (try one).'; extracted None; " in text
    )
    assert "answer is '1'" in text and "problem 1:" in text
    assert list(tmp_path.iterdir()) == [data]  # nothing half-written


def test_empty_and_malformed_texts_are_counted(tmp_path):
    def sometimes_empty(index: int, a: int, b: int, sample: int) -> str:
        return "" if sample == 1 else trace(index, a, b, sample)

    data = write_jsonl(tmp_path / "problems.jsonl", problems(5))
    with ScriptedChatServer(ScriptedTeacher(sometimes_empty), models=("teacher",)) as server:
        server.malformed_next(1, body='{"choices": []}')  # a 200 without choices: four None texts
        summary = synthesize(
            data, tmp_path / "out.jsonl", teacher_options(server, max_concurrency=1), RejectionOptions()
        )
    # the malformed reply is one problem's four texts; the others have one empty sample each
    assert summary.dropped["empty"] == 4 + 4 and summary.traces_generated == 20
    assert summary.metrics()["dropped_empty"] == 8

    empty = ScriptedTeacher(lambda *_: "  ")
    with (
        ScriptedChatServer(empty, models=("teacher",)) as server,
        pytest.raises(ValueError, match="only empty texts"),
    ):
        synthesize(data, tmp_path / "empty.jsonl", teacher_options(server), RejectionOptions())
    assert not (tmp_path / "empty.jsonl").exists()


def test_a_messages_prompt_keeps_its_turns_and_the_template_wraps_the_last_user_turn(tmp_path):
    rows = [
        {
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Problem 0: what is 0 + 1?"},
            ],
            "answer": "1",
        }
    ]
    data = write_jsonl(tmp_path / "problems.jsonl", rows)
    with ScriptedChatServer(ScriptedTeacher(), models=("teacher",)) as server:
        options = teacher_options(
            server, num_samples=1, temperature=0.0, top_p=0.9, prompt_template="Solve: {prompt}"
        )
        synthesize(data, tmp_path / "out.jsonl", options, RejectionOptions())
    sent = server.chat_requests[0].body["messages"]
    assert (server.chat_requests[0].body["top_p"], server.chat_requests[0].body["temperature"]) == (0.9, 0.0)
    assert sent == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Solve: Problem 0: what is 0 + 1?"},
    ]  # the row's own system turn replaces the default system prompt
    (row,) = read_jsonl(tmp_path / "out.jsonl")
    assert row["messages"] == [*sent, {"role": "assistant", "content": trace(0, 0, 1, 0)}]


# ------------------------------------------------------------------ the rejection checks, one by one


def test_numbers_match_within_the_tolerance():
    exact = TraceFilter(RejectionOptions())
    loose = TraceFilter(RejectionOptions(answer_tolerance=0.01))
    assert exact.verdict("so #### 100.5", "100").verified is False
    assert loose.verdict("so #### 100.5", "100").verified is True  # |0.5| <= 0.01 * 100
    assert loose.verdict("so #### 102", "100").verified is False
    assert loose.verdict("so #### 0.005", "0").verified is True  # max(1, |b|) keeps a bound near 0
    assert loose.verdict("the answer is Paris", "paris").verified is True


def test_length_language_duplicate_and_limit_filters_count_their_drops():
    options = RejectionOptions(
        min_trace_chars=12, max_trace_chars=60, language="latin", max_traces_per_problem=2
    )
    texts = [
        "#### 7",  # too short
        "Seven is what we get after adding three and four. #### 7" + " pad" * 5,  # too long
        "Сложим три и четыре, получим семь. #### 7",  # cyrillic
        "Three plus four makes seven. #### 7",
        "three  PLUS four makes seven. #### 7",  # the same words
        None,  # empty
        "3 + 4 = 8 #### 8",  # wrong
        "Add 3 and 4: that is 7. #### 7",
        "So we add them up. #### 7",  # a third verified trace
    ]
    selection = TraceFilter(options).select(texts, "7")
    assert [index for index, _ in selection.kept] == [3, 7]
    assert selection.dropped == {
        "empty": 1,
        "no_answer": 0,
        "wrong_answer": 1,
        "too_short": 1,
        "too_long": 1,
        "language": 1,
        "duplicate": 1,
        "over_limit": 1,
    }
    assert selection.verified == 7


def test_near_duplicates_go_below_a_threshold_of_one():
    a = "First add three and four to get seven, then double it to get fourteen. #### 14"
    b = "First add three and four to get seven, then double it to get fourteen! #### 14"
    assert 0.6 < similarity(a, b) < 1.0 and similarity(a, a.upper()) == 1.0
    assert [i for i, _ in TraceFilter(RejectionOptions()).select([a, b], "14").kept] == [0, 1]
    assert [i for i, _ in TraceFilter(RejectionOptions(dedup_threshold=0.6)).select([a, b], "14").kept] == [0]


def test_a_user_checker_decides_and_must_answer_a_bool(tmp_path):
    (tmp_path / "checks.py").write_text(
        "def ends_with(trace, reference):\n    return trace.endswith(str(reference))\n"
        "def loose(trace, reference):\n    return 1\n"
    )
    checker = TraceFilter(RejectionOptions(answer_checker="checks.py:ends_with"), base_dir=tmp_path)
    selection = checker.select(["it is 7", "#### 7 no", "it is 8"], "7")
    assert [i for i, _ in selection.kept] == [0] and selection.dropped["wrong_answer"] == 2
    with pytest.raises(TypeError, match="returned int 1; it must return True or False"):
        TraceFilter(RejectionOptions(answer_checker="checks.py:loose"), base_dir=tmp_path).verdict("x", "7")
    with pytest.raises(ConfigError, match=r"answer_checker: .*has no function missing"):
        TraceFilter(RejectionOptions(answer_checker="checks.py:missing"), base_dir=tmp_path)


def test_bad_options_are_reported_together_with_their_keys():
    with pytest.raises(ConfigError) as error:
        from_dict(
            TeacherOptions,
            {
                "base_url": "ftp://x",
                "model": "t",
                "prompt_template": "Solve {problem}",
                "temperature": 0.0,
                "top_p": 0,
            },
        )
    paths = [path for path, _ in error.value.problems]
    assert paths == ["base_url", "prompt_template", "temperature", "top_p"]
    assert "must contain {prompt} (where the problem goes); it has {problem}" in str(error.value)
    assert "the 4 samples of a problem would be one" in str(error.value)
    with pytest.raises(ConfigError, match=r"language: expected one of , latin, cyrillic, .*, got 'klingon'"):
        from_dict(RejectionOptions, {"language": "klingon"})
    with pytest.raises(ConfigError) as error:
        from_dict(
            RejectionOptions, {"answer_checker": "nocolon", "dedup_threshold": 0, "max_trace_chars": -1}
        )
    assert [path for path, _ in error.value.problems] == [
        "answer_checker",
        "max_trace_chars",
        "dedup_threshold",
    ]
    with pytest.raises(ConfigError, match="model: required: the model's folder"):
        from_dict(TeacherOptions, {"backend": "local"})


# ------------------------------------------------------------------------------ a local tiny teacher


def test_a_local_teacher_samples_through_the_rollout_code(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kfp_components.testing.tiny_model import tiny_model_path
    from kfp_components.trainer.rollout import HFRollouts, SamplingOptions

    torch.set_num_threads(1)
    path = str(tiny_model_path("qwen2", 0))
    options = TeacherOptions(
        backend="local",
        model=path,
        num_samples=2,
        max_tokens=8,
        temperature=1.0,
        batch_size=2,
        system_prompt="",
    )
    rows = problems(3)
    teacher = Teacher(options)
    teacher.check()
    texts = teacher.solve(rows, seed=7, indices=[0, 1, 2])
    usage = teacher.usage()
    teacher.close()
    # the same draws as the rollout backend's, problem by problem (whatever shares the batch)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rollouts = HFRollouts(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tokenizer, "cpu"
    )
    prompts = [
        list(tokenizer(text, add_special_tokens=False)["input_ids"])
        for text in tokenizer.apply_chat_template(
            [[{"role": "user", "content": row["prompt"]}] for row in rows],
            tokenize=False,
            add_generation_prompt=True,
        )
    ]
    sampling = SamplingOptions(temperature=1.0, max_new_tokens=8, num_generations=2)
    direct = rollouts.generate(prompts, sampling, [problem_seed(7, i) for i in range(3)])
    assert texts == [[c.text for c in direct[2 * i : 2 * i + 2]] for i in range(3)]
    assert usage["requests"] == 3 and usage["completion_tokens"] == sum(len(c.completion_ids) for c in direct)
    alone = Teacher(options)
    assert alone.solve(rows[2:], seed=7, indices=[2]) == texts[2:]

    # end to end, with a checker that accepts any text (a tiny random model is never right)
    (tmp_path / "any.py").write_text("def anything(trace, reference):\n    return True\n")
    data = write_jsonl(tmp_path / "problems.jsonl", rows)
    summary = synthesize(
        data,
        tmp_path / "out.jsonl",
        options,
        RejectionOptions(answer_checker=str(tmp_path / "any.py") + ":anything"),
        seed=7,
    )
    written = read_jsonl(tmp_path / "out.jsonl")
    assert summary.traces_generated == 6 and summary.traces_kept == len(written) > 0
    assert {row["teacher"] for row in written} == {path}
    assert all(
        row["messages"][-1]["content"] in texts[row["problem"]][row["sample_index"]] for row in written
    )
