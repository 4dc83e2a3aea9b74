"""The ``http`` reward against a real endpoint on 127.0.0.1 (tests/doubles/reward_server.py): batching,
bounded concurrency, retries on 5xx, timeouts, wrong answers, and a bearer token that never shows."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from kfp_components.rewards import RewardError, load_reward_set

from doubles.reward_server import reward_server

TOKEN = "rw-9f8e7d6c5b4a3921"  # shaped like no known credential: only its own redaction hides it


def http_rewards(tmp_path, url: str, **options):
    return load_reward_set([{"function": "http", "url": url, **options}], None, base_dir=tmp_path)


def test_samples_go_in_batches_with_their_columns_and_scores_come_back_in_order(tmp_path):
    with reward_server() as server:
        rewards = http_rewards(tmp_path, server.url, batch_size=2)
        completions = ["a", "bb", "ccc", "dddd", "eeeee"]
        scores = rewards.score(
            [f"p{i}" for i in range(5)], completions, {"answer": ["1", "2", "3", "4", "5"]}
        )
    assert scores.total == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert rewards.names == ["http"]
    bodies = sorted(server.bodies, key=lambda b: b["prompts"][0])
    assert bodies == [
        {"prompts": ["p0", "p1"], "completions": ["a", "bb"], "answer": ["1", "2"]},
        {"prompts": ["p2", "p3"], "completions": ["ccc", "dddd"], "answer": ["3", "4"]},
        {"prompts": ["p4"], "completions": ["eeeee"], "answer": ["5"]},
    ]


def test_no_more_requests_in_flight_than_max_concurrency(tmp_path):
    with reward_server(delay=0.2) as server:
        rewards = http_rewards(tmp_path, server.url, batch_size=1, max_concurrency=3)
        started = time.monotonic()
        scores = rewards.score(["p"] * 9, ["x" * i for i in range(9)], {})
        elapsed = time.monotonic() - started
    assert scores.total == [float(i) for i in range(9)]
    assert server.max_in_flight == 3  # bounded, and used
    assert elapsed > 0.55  # 9 requests of 0.2 s, 3 at a time: at least 3 rounds (no upper bound: load varies)


def test_a_500_is_retried_and_then_succeeds(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("REWARD_ENDPOINT_AUTH", TOKEN)
    with reward_server(script=[500, 503], token=TOKEN) as server, caplog.at_level(logging.WARNING):
        rewards = http_rewards(
            tmp_path, server.url, retries=2, backoff_seconds=0.01, token_env="REWARD_ENDPOINT_AUTH"
        )
        assert rewards.score(["p"], ["abc"], {}).total == [3.0]
    assert len(server.bodies) == 3
    assert all(h["Authorization"] == f"Bearer {TOKEN}" for h in server.headers)
    assert "HTTP 500" in caplog.text and "retry 1 of 2" in caplog.text and "retry 2 of 2" in caplog.text
    assert TOKEN not in caplog.text and "***" in caplog.text  # the server echoed the token back


def test_retries_run_out_with_an_error_naming_the_endpoint_and_sample_and_never_the_token(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("REWARD_ENDPOINT_AUTH", TOKEN)
    with reward_server(script=[502] * 10, token=TOKEN) as server:
        rewards = http_rewards(
            tmp_path,
            server.url,
            batch_size=2,
            retries=1,
            backoff_seconds=0.01,
            token_env="REWARD_ENDPOINT_AUTH",
        )
        with pytest.raises(RewardError) as error:
            rewards.score(["p0", "p1"], ["a", "b"], {})
    text = str(error.value)
    assert f"reward function http ({server.url}) (sample 0, prompt 'p0')" in text
    assert "the endpoint failed 2 time(s); last: HTTP 502" in text
    assert TOKEN not in text and repr(rewards.functions[0]).count(TOKEN) == 0
    assert len(server.bodies) == 2


def test_a_timeout_is_retried_then_reported(tmp_path):
    with reward_server(script=["sleep:3", "sleep:3"]) as server:
        rewards = http_rewards(tmp_path, server.url, timeout_seconds=0.3, retries=1, backoff_seconds=0.01)
        started = time.monotonic()
        with pytest.raises(
            RewardError, match=r"failed 2 time\(s\); last: no answer within timeout_seconds=0\.3"
        ):
            rewards.score(["p"], ["abc"], {})
        assert time.monotonic() - started < 2.0
    assert len(server.bodies) == 2


def test_a_slow_first_answer_then_a_timely_one(tmp_path):
    with reward_server(script=["sleep:2"]) as server:
        rewards = http_rewards(tmp_path, server.url, timeout_seconds=0.3, retries=1, backoff_seconds=0.01)
        assert rewards.score(["p"], ["abcd"], {}).total == [4.0]


def test_a_wrong_length_answer_fails_at_once(tmp_path):
    with reward_server(script=["short"]) as server:
        rewards = http_rewards(tmp_path, server.url, retries=3)
        with pytest.raises(
            RewardError, match=r"\(sample 0, prompt 'p0'\): the answer has 1 rewards for 2 completions"
        ):
            rewards.score(["p0", "p1"], ["a", "b"], {})
    assert len(server.bodies) == 1  # not retried: the endpoint would answer the same


def test_an_answer_that_is_not_json_or_a_4xx_fails_at_once(tmp_path):
    garbage = pytest.raises(RewardError, match=r"the answer is not JSON: <html>not json</html>")
    with reward_server(script=["garbage"]) as server, garbage:
        http_rewards(tmp_path, server.url).score(["p"], ["a"], {})
    refused = pytest.raises(RewardError, match=r"the endpoint answered HTTP 401")
    with reward_server(token=TOKEN) as server, refused:
        http_rewards(tmp_path, server.url, retries=3).score(["p"], ["a"], {})
    assert len(server.bodies) == 1


def test_a_refused_connection_is_retried_then_reported(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rewards = http_rewards(tmp_path, f"http://127.0.0.1:{port}/score", retries=1, backoff_seconds=0.01)
    with pytest.raises(RewardError, match=r"failed 2 time\(s\); last: cannot connect: .*[Rr]efused"):
        rewards.score(["p"], ["a"], {})


def test_null_rewards_are_no_score_and_a_non_number_names_its_sample(tmp_path):
    def score(completion: str):
        return {"none": None, "bad": "high"}.get(completion, 1.0)

    with reward_server(score=score) as server:
        rewards = http_rewards(tmp_path, server.url, batch_size=2)
        assert rewards.score(["p"] * 3, ["x", "none", "y"], {}).total == [1.0, None, 1.0]
        with pytest.raises(RewardError, match=r"\(sample 3, prompt 'p3'\): returned 'high' \(str\)"):
            rewards.score([f"p{i}" for i in range(4)], ["x", "y", "z", "bad"], {})


def test_an_unset_token_variable_stops_loading(tmp_path, monkeypatch):
    monkeypatch.delenv("REWARD_ENDPOINT_AUTH", raising=False)
    with pytest.raises(RewardError, match=r"token_env names REWARD_ENDPOINT_AUTH, which is not set or empty"):
        http_rewards(tmp_path, "http://127.0.0.1:9/score", token_env="REWARD_ENDPOINT_AUTH")


def test_columns_that_cannot_be_sent_as_json_are_named(tmp_path):
    with reward_server() as server:
        rewards = http_rewards(tmp_path, server.url)
        with pytest.raises(RewardError, match=r"cannot be sent as JSON: .*bytes"):
            rewards.score(["p"], ["a"], {"blob": [b"\x00"]})


def test_the_dry_run_check_reaches_the_endpoint(tmp_path):
    from kfp_components.rewards import check_reward_set

    with reward_server(token=TOKEN) as server:
        rewards = http_rewards(tmp_path, server.url, retries=0)
        problems = check_reward_set(rewards, {"prompt": "What is 2 + 2?", "answer": "4"})
    assert len(problems) == 1 and "the endpoint answered HTTP 401" in problems[0]
    assert server.bodies[0]["answer"] == ["4"] and server.bodies[0]["prompts"] == ["What is 2 + 2?"]
