"""Judges against a scripted OpenAI-compatible server (the real openai client) and a local tiny model:
templates and their errors, score parsing (None counted, never 0; out of scale), the pairwise order averaging
that cancels a judge's position bias, the cache, soft scores from token probabilities, labelling pairs and
the win rate, and the judge reward's errors (no score at all, an unreachable endpoint, a missing key)."""

from __future__ import annotations

import math
import re

import pytest

from kfp_components.feedback.comparisons import Responses, compare, label_pairs
from kfp_components.feedback.judges import JudgeOptions, PairwiseJudge, PointwiseJudge, build_backend
from kfp_components.rewards import RewardError, check_reward_set, load_reward_set
from kfp_components.rewards.scoring import unscored_problem
from kfp_components.testing.openai_server import ScriptedChatServer
from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.typed_config import ConfigError, from_dict


def response_of(text: str) -> str:
    return re.search(r"\[Response\]\n(.*?)\n\nScore:", text, re.S).group(1)


def length_score(messages, body) -> str:
    """A pointwise judge: 1 plus the response's length, capped at 10."""
    return f"Score: {min(10, 1 + len(response_of(messages[-1]['content'])))}"


def pair(text: str) -> tuple[str, str]:
    found = re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]\n(.*?)\n\nBetter", text, re.S)
    return found.group(1), found.group(2)


def longer_wins(messages, body) -> str:
    """A pairwise judge without position bias: the longer response wins."""
    a, b = pair(messages[-1]["content"])
    return "A" if len(a) >= len(b) else "B"


def judge_options(server: ScriptedChatServer, **overrides) -> JudgeOptions:
    return from_dict(JudgeOptions, {"base_url": server.base_url, "model": "judge", **overrides})


def test_pointwise_scores_parse_and_unscored_replies_are_none_and_counted():
    replies = iter(["7", "I cannot rate this.", "Score: 42", "3.5 out of 10"])
    with ScriptedChatServer(lambda messages, body: next(replies)) as server:
        options = judge_options(server, max_concurrency=1)
        judge = PointwiseJudge(options, build_backend(options))
        scores = judge.score(["q"] * 4, ["a", "b", "c", "d"], {})
        usage = judge.usage()
    assert scores == [7.0, None, None, 3.5]
    assert (usage["unscored"], usage["out_of_scale"], usage["requests"]) == (2, 1, 4)
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0


def test_templates_render_columns_and_the_cache_sends_a_request_once():
    with ScriptedChatServer(length_score) as server:
        template = "Reference: {answer}\n[Response]\n{response}\n\nScore:"
        options = judge_options(server, prompt_template=template, system_prompt="You grade answers.")
        judge = PointwiseJudge(options, build_backend(options))
        scores = judge.score(["q", "q", "q"], ["12", "1234", "12"], {"answer": ["7", "7", "7"]})
        assert scores == [3.0, 5.0, 3.0]
        assert judge.usage()["cache_hits"] == 1 and len(server.chat_requests) == 2
        sent = server.chat_requests[0].body
        assert sent["messages"][0] == {"role": "system", "content": "You grade answers."}
        assert sent["messages"][1]["content"].startswith("Reference: 7\n")
        assert sent["temperature"] == 0


def test_pairwise_order_averaging_cancels_position_bias():
    with ScriptedChatServer(lambda messages, body: "A") as server:  # always the first position
        options = judge_options(server)
        biased = PairwiseJudge(options, build_backend(options))
        assert biased.prefer(
            ["q", "q"], ["short", "a much longer answer"], ["a much longer answer", "x"]
        ) == [
            0.5,
            0.5,
        ]
    with ScriptedChatServer(longer_wins) as server:
        options = judge_options(server)
        fair = PairwiseJudge(options, build_backend(options))
        assert fair.prefer(["q", "q"], ["short", "a much longer answer"], ["a much longer answer", "x"]) == [
            0.0,
            1.0,
        ]
        # both orders were asked: "A" then "B" as the first response
        shown = [pair(r.body["messages"][-1]["content"]) for r in server.chat_requests]
        assert ("short", "a much longer answer") in shown and ("a much longer answer", "short") in shown


def test_pairwise_verdicts_read_the_first_label_and_none_without_one():
    replies = iter(["Response B is better.", "Neither.", "B"])
    with ScriptedChatServer(lambda messages, body: next(replies)) as server:
        options = judge_options(server, max_concurrency=1)
        judge = PairwiseJudge(options, build_backend(options))
        assert judge.parse("B, clearly") == 0.0 and judge.parse("A") == 1.0 and judge.parse("BA") is None
        # forward "B" (0.0) and backward "Neither" (None): no verdict for the pair
        assert judge.prefer(["q"], ["x"], ["y"]) == [None]
        assert judge.usage()["unscored"] >= 1


@pytest.mark.parametrize(
    ("options", "key", "message"),
    [
        ({"prompt_template": "Rate {prompt}"}, "prompt_template", r"must contain \{response\}"),
        ({"pairwise_template": "{prompt} {response_a}"}, "pairwise_template", r"must contain \{response_b\}"),
        ({"prompt_template": "{response} {x.y}"}, "prompt_template", "plain names"),
        ({"prompt_template": "{response} {"}, "prompt_template", "not a valid template"),
        ({"score_method": "expectation"}, "score_method", "backend local only"),
        ({"score_min": 5, "score_max": 5}, "score_max", "must be above score_min"),
        ({"score_pattern": "(a)(b)"}, "score_pattern", "at most one group"),
        ({"base_url": "http://user:pw@127.0.0.1:1/v1"}, "base_url", "carries credentials"),
        ({"backend": "vllm"}, "backend", "openai"),
        ({"answer_b": "A"}, "answer_b", "must differ"),
    ],
)
def test_bad_judge_options_name_the_key(options, key, message):
    data = {"base_url": "http://127.0.0.1:9/v1", "model": "judge", **options}
    with pytest.raises(ConfigError, match=message) as caught:
        from_dict(JudgeOptions, data, "judge")
    assert f"judge.{key}" in {path for path, _ in caught.value.problems}


def test_unknown_placeholder_names_the_columns_the_rows_have():
    with ScriptedChatServer(length_score) as server:
        options = judge_options(server, prompt_template="{response} vs {reference}")
        judge = PointwiseJudge(options, build_backend(options))
        with pytest.raises(
            ConfigError, match=r"placeholder \{reference\} .* column of the prompt rows \(answer\)"
        ):
            judge.score(["q"], ["r"], {"answer": ["1"]})


def test_judge_reward_stops_when_the_judge_never_returns_a_number():
    """The dry run's check of one row and a step's scores over every rank: no score at all is an error
    quoting the judge's reply; a step with some scores goes on."""
    with ScriptedChatServer(lambda messages, body: "This response is good.") as server:
        rewards = load_reward_set(
            [{"function": "judge", "base_url": server.base_url, "model": "judge"}], None, base_dir=None
        )
        (problem,) = check_reward_set(rewards, {"prompt": "q"})
        assert "gave no score to any of the 1 completion(s)" in problem and "This response is good" in problem
        scores = rewards.score(["q", "q"], ["a", "b"], {})
        assert scores.total == [None, None]
        error = unscored_problem(rewards, scores.per_function)
        assert error is not None and "gave no score to any of the 2 completion(s)" in str(error)
        assert unscored_problem(rewards, {"judge": [None, 3.0]}) is None


def test_an_optional_score_group_that_matches_nothing_is_no_score():
    replies = iter(["Score: none", "Score: 4"])
    with ScriptedChatServer(lambda messages, body: next(replies)) as server:
        options = judge_options(server, score_pattern=r"Score: (\d+)?", max_concurrency=1)
        judge = PointwiseJudge(options, build_backend(options))
        assert judge.score(["q", "q"], ["a", "b"], {}) == [None, 4.0]


def test_a_reply_without_a_score_is_asked_again_and_counted_each_time():
    replies = iter(["no idea", "7", "7"])
    with ScriptedChatServer(lambda messages, body: next(replies)) as server:
        options = judge_options(server, max_concurrency=1)
        judge = PointwiseJudge(options, build_backend(options))
        assert judge.score(["q"], ["a"], {}) == [None]
        assert judge.score(["q", "q"], ["a", "a"], {}) == [7.0, 7.0]  # asked again, once
        usage = judge.usage()
    assert (usage["requests"], usage["unscored"], usage["cache_hits"], usage["judged"]) == (2, 1, 1, 3)


def test_judge_reward_needs_a_reachable_endpoint_serving_the_model_and_its_key(monkeypatch):
    with ScriptedChatServer(length_score, models=("other",)) as server:
        with pytest.raises(RewardError, match=r"judge.*other"):
            load_reward_set(
                [{"function": "judge", "base_url": server.base_url, "model": "judge"}], None, base_dir=None
            )
        url = server.base_url
    with pytest.raises(RewardError, match="judge"):
        load_reward_set(
            [{"function": "judge", "base_url": url, "model": "judge", "retries": 0, "timeout_seconds": 2}],
            None,
            base_dir=None,
        )
    monkeypatch.delenv("JUDGE_KEY_FOR_TESTS", raising=False)
    with pytest.raises(RewardError, match="JUDGE_KEY_FOR_TESTS"):
        load_reward_set(
            [{"function": "judge", "base_url": url, "model": "judge", "token_env": "JUDGE_KEY_FOR_TESTS"}],
            None,
            base_dir=None,
        )


def test_judge_reward_scores_and_reports_its_usage():
    with ScriptedChatServer(length_score) as server:
        rewards = load_reward_set(
            [{"function": "judge", "base_url": server.base_url, "model": "judge", "name": "helpfulness"}],
            None,
            base_dir=None,
        )
        scores = rewards.score(["q", "q"], ["ab", "abcdef"], {})
        assert scores.per_function["helpfulness"] == [3.0, 7.0]
        usage = rewards.usage()
    assert usage["reward/helpfulness/requests"] == 2 and usage["reward/helpfulness/judged"] == 2


def local_options(**overrides) -> JudgeOptions:
    return from_dict(
        JudgeOptions, {"backend": "local", "model": str(tiny_model_path("qwen2", 0)), **overrides}
    )


def test_local_judge_expectation_and_soft_preference_come_from_token_probabilities():
    options = local_options(score_method="expectation", score_min=1, score_max=9, batch_size=2)
    judge = PointwiseJudge(options, build_backend(options))
    scores = judge.score(["q", "q", "q"], ["a", "bb", "ccc"], {})
    assert all(1.0 < s < 9.0 for s in scores) and len(set(scores)) == 3  # smooth, not a sampled digit
    pairwise = PairwiseJudge(local_options(), build_backend(local_options()))
    forward = pairwise._ask([pairwise.request("q", "x", "yy", {})])[0]
    backward = pairwise._ask([pairwise.request("q", "yy", "x", {})])[0]
    (preference,) = pairwise.prefer(["q"], ["x"], ["yy"])
    assert 0.0 < forward < 1.0 and math.isclose(preference, (forward + 1.0 - backward) / 2, rel_tol=1e-6)


def test_local_judge_refuses_a_scale_whose_items_are_several_tokens():
    options = local_options(score_method="expectation", score_min=1, score_max=10)
    judge = PointwiseJudge(options, build_backend(options))
    with pytest.raises(ValueError, match=r"'10' is 2 tokens"):
        judge.score(["q"], ["a"], {})


def test_local_judge_parses_greedy_replies():
    judge = PointwiseJudge(local_options(max_tokens=4), build_backend(local_options(max_tokens=4)))
    first = judge.score(["q", "q"], ["a", "b"], {})
    judge._cache.clear()
    assert judge.score(["q", "q"], ["a", "b"], {}) == first  # greedy: the same replies again


def test_label_pairs_keeps_decided_pairs_and_counts_the_rest():
    responses = Responses(
        prompts=["p1", "p2", "p3", "p4"],
        columns=[{"answer": "1"}, {"answer": "2"}, {"answer": "3"}, {"answer": "4"}],
        texts=[["short", "much longer"], ["same", "same"], ["long answer", "x"], ["aa", "bb"]],
    )
    with ScriptedChatServer(longer_wins) as server:
        options = judge_options(server)
        rows, counts = label_pairs(responses, PairwiseJudge(options, build_backend(options)), min_margin=0.5)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [
        ("p1", "much longer", "short"),
        ("p3", "long answer", "x"),
    ]
    assert rows[0]["answer"] == "1" and rows[0]["judge_preference"] == 1.0
    # "aa" vs "bb": the judge follows the position (A, then A): 0.5, undecided
    assert (counts.kept, counts.dropped_identical, counts.dropped_undecided) == (2, 1, 1)


def test_win_rate_counts_wins_ties_and_losses():
    tuned = Responses(prompts=["a", "b", "c"], columns=[{}, {}, {}], texts=[["long one"], ["x"], ["same"]])
    base = Responses(prompts=["a", "b", "c"], columns=[{}, {}, {}], texts=[["s"], ["longer"], ["same"]])
    with ScriptedChatServer(longer_wins) as server:
        options = judge_options(server)
        result = compare(tuned, base, PairwiseJudge(options, build_backend(options)))
    # "same" vs "same": the longer-wins judge answers A both ways round: 0.5, a tie
    assert (result.wins, result.ties, result.losses, result.judged) == (1, 1, 1, 3)
    assert result.win_rate == pytest.approx(0.5)
