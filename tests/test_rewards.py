"""Reward functions: loading by reference, the shipped rule rewards, weights, None, statistics, and every
error form (kfp_components.rewards)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kfp_components.rewards import (
    RewardError,
    RewardScores,
    RewardSet,
    check_reward_set,
    exact_match,
    extract_answer,
    load_reward_set,
)
from kfp_components.rewards.answers import answers_match, normalise_number
from kfp_components.rewards.shaping import overlong_penalty
from kfp_components.typed_config import ConfigError

LONG_PROMPT = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. " * 2
)


def write_module(folder: Path, name: str, source: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return path


# ---- answer extraction and exact match -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She sold 48 + 24 = 72 clips.\n#### 72", "72"),
        ("#### 1,234 apples", "1,234"),
        ("so the total is \\boxed{\\frac{3}{4}} in the end, not 5", "\\frac{3}{4}"),
        ("nested \\boxed{x^{2}+1} here", "x^{2}+1"),
        ("The answer is $18. Next we check 20.", "18"),
        ("Final answer: -7", "-7"),
        ("the answer is Paris.", "Paris"),
        ("we get 5-3 = 2, then 10", "10"),
        ("no number at all", None),
        ("an unclosed \\boxed{12 and then 13", "13"),
    ],
)
def test_extract_answer_finds_the_final_answer_by_each_convention(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "value"),
    [("1,234", 1234), ("+5", 5), ("72.0", 72), ("72.50", 72.5), ("$18", 18), ("\u22123", -3), ("3/4", 0.75)],
)
def test_numbers_are_normalised(text, value):
    assert normalise_number(text) == value


def test_answers_match_numbers_by_value_and_words_by_text():
    assert answers_match("72.0", "Natalia sold 48/2 = 24 clips in May.\n#### 72")
    assert answers_match("1,000", 1000) and answers_match("+5", "5") and answers_match("0.75", "3/4")
    assert answers_match("paris", "Paris") and not answers_match("Lyon", "Paris")
    assert not answers_match("71", "72") and not answers_match(None, "72")


def test_exact_match_scores_each_completion_and_none_without_an_answer():
    completions = [
        "48 / 2 = 24, 48 + 24 = 72\n#### 72",
        "The answer is 70.",
        "\\boxed{72}",
        "I do not know",
        "5",
    ]
    answers = ["#### 72", "72", "72", "72", None]
    assert exact_match([""] * 5, completions, answer=answers) == [1.0, 0.0, 1.0, 0.0, None]


def test_exact_match_on_another_column(tmp_path):
    rewards = load_reward_set(
        [{"function": "exact_match", "answer_column": "solution"}], None, base_dir=tmp_path
    )
    scores = rewards.score(["q", "q"], ["#### 3", "#### 4"], {"solution": ["3", "3"]})
    assert scores.per_function["exact_match"] == [1.0, 0.0]


# ---- format and length -----------------------------------------------------------------------------------


def test_format_regex_full_match_and_search(tmp_path):
    pattern = r"<think>.*</think>\s*<answer>.*</answer>"
    rewards = load_reward_set(
        [
            {"function": "format_regex", "pattern": pattern},
            {
                "function": "format_regex",
                "pattern": r"<answer>\d+</answer>",
                "match": "search",
                "name": "has_answer",
            },
        ],
        None,
        base_dir=tmp_path,
    )
    completions = [
        "<think>48/2=24\n48+24=72</think>\n<answer>72</answer>",  # spans lines: dotall
        "<think>x</think><answer>72</answer> and more",  # trailing text: no full match, but search finds it
        "the answer is 72",
    ]
    scores = rewards.score(["q"] * 3, completions, {})
    assert scores.per_function["format_regex"] == [1.0, 0.0, 0.0]
    assert scores.per_function["has_answer"] == [1.0, 1.0, 0.0]


def test_overlong_penalty_is_zero_then_linear_to_minus_one():
    assert overlong_penalty([0, 6, 7, 8, 9, 10, 11], max_length=10, buffer=4) == [
        0.0,
        0.0,
        -0.25,
        -0.5,
        -0.75,
        -1.0,
        -1.0,
    ]
    assert overlong_penalty([9, 10, 11], max_length=10, buffer=0) == [0.0, 0.0, -1.0]


def test_overlong_penalty_counts_characters_or_tokens(tmp_path):
    from transformers import AutoTokenizer

    from kfp_components.testing.tiny_model import tiny_model_path

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path("qwen2"))
    text = "1234567890"  # the qwen2 pre-tokenizer splits digits: 10 tokens, 10 characters
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 10
    by_chars = load_reward_set(
        [{"function": "overlong_penalty", "max_length": 12, "buffer": 4, "unit": "characters"}],
        None,
        base_dir=tmp_path,
    )
    assert by_chars.score(["q"] * 2, ["abcdefghij", "abc"], {}).total == [-0.5, 0.0]
    by_tokens = load_reward_set(
        [{"function": "overlong_penalty", "max_length": 12, "buffer": 4}],
        None,
        base_dir=tmp_path,
        tokenizer=tokenizer,
    )
    assert by_tokens.score(["q"], [text], {}).total == [-0.5]
    words = "The answer is"  # 13 characters (beyond max_length), 3 tokens
    assert len(tokenizer(words, add_special_tokens=False)["input_ids"]) == 3
    assert by_tokens.score(["q"], [words], {}).total == [0.0]
    named = load_reward_set(
        [
            {
                "function": "overlong_penalty",
                "max_length": 12,
                "buffer": 4,
                "tokenizer": str(tiny_model_path("qwen2")),
            }
        ],
        None,
        base_dir=tmp_path,
    )
    assert named.score(["q"], [text], {}).total == [-0.5]


def test_overlong_penalty_in_tokens_without_a_tokenizer_is_an_error(tmp_path):
    with pytest.raises(
        RewardError, match=r"overlong_penalty: cannot be loaded: .*unit: tokens needs a tokenizer"
    ):
        load_reward_set(
            [{"function": "overlong_penalty", "max_length": 8, "buffer": 2}], None, base_dir=tmp_path
        )


# ---- loading by reference --------------------------------------------------------------------------------


def test_each_reference_form_loads(tmp_path, monkeypatch):
    write_module(
        tmp_path / "pkg",
        "mod_rewards.py",
        """
        def short(prompts, completions, **columns):
            return [1.0 if len(c) < 5 else 0.0 for c in completions]

        class Scorers:
            @staticmethod
            def constant(prompts, completions, **columns):
                return [0.5] * len(completions)
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    write_module(
        tmp_path / "stage",
        "rewards/mine.py",
        """
        def echo_answer(prompts, completions, answer, **_):
            return [float(a) for a in answer]
        """,
    )
    absolute = write_module(
        tmp_path,
        "abs_rewards.py",
        "def one(prompts, completions, **kw):\n    return [1] * len(completions)\n",
    )
    rewards = load_reward_set(
        [
            "mod_rewards:short",
            "mod_rewards:Scorers.constant",
            "rewards/mine.py:echo_answer",
            f"{absolute}:one",
            {"function": "rewards/mine.py:echo_answer", "name": "answer_again"},
            "exact_match",
        ],
        [1.0, 2.0, 0.5, 1.0, 0.0, 1.0],
        base_dir=tmp_path / "stage",
    )
    assert rewards.names == ["short", "constant", "echo_answer", "one", "answer_again", "exact_match"]
    scores = rewards.score(["p1", "p2"], ["abc", "abcdefg"], {"answer": ["4", "2"]})
    assert scores.per_function == {
        "short": [1.0, 0.0],
        "constant": [0.5, 0.5],
        "echo_answer": [4.0, 2.0],
        "one": [1.0, 1.0],
        "answer_again": [4.0, 2.0],
        "exact_match": [0.0, 0.0],
    }
    assert scores.total == [1.0 + 1.0 + 2.0 + 1.0, 0.0 + 1.0 + 1.0 + 1.0]


def test_a_relative_file_is_found_from_the_base_dir_not_the_working_directory(tmp_path, monkeypatch):
    write_module(
        tmp_path / "stage",
        "r.py",
        "def f(prompts, completions, **kw):\n    return [1.0] * len(completions)\n",
    )
    monkeypatch.chdir(tmp_path)
    assert load_reward_set(["r.py:f"], None, base_dir=tmp_path / "stage").names == ["f"]
    with pytest.raises(RewardError, match=r"r\.py:f: no such file: .*r\.py"):
        load_reward_set(["r.py:f"], None, base_dir=None)


# ---- weights and None ------------------------------------------------------------------------------------


def fixed(values):
    def function(prompts, completions, **columns):
        return list(values)

    return function


def test_weighted_total_skips_none_and_is_none_when_every_function_gave_none():
    reward_set = RewardSet(
        names=["a", "b"],
        functions=[fixed([1.0, None, None, 2]), fixed([0.5, 3.0, None, -1.0])],
        weights=[2.0, -1.0],
    )
    scores = reward_set.score(["p"] * 4, ["c"] * 4, {})
    assert scores.total == [1.5, -3.0, None, 5.0]
    assert scores.per_function["a"] == [1.0, None, None, 2.0]


def test_statistics_of_a_step():
    scores = RewardScores(
        per_function={"a": [1.0, None, 3.0, 5.0], "b": [None] * 4}, total=[1.0, None, 3.0, 5.0]
    )
    result = scores.statistics()
    assert result["reward"] == 3.0 and result["reward_min"] == 1.0 and result["reward_max"] == 5.0
    assert math.isclose(result["reward_std"], math.sqrt(8 / 3))
    assert result["reward_none_share"] == 0.25
    assert result["reward/a/mean"] == 3.0 and math.isclose(result["reward/a/std"], math.sqrt(8 / 3))
    assert result["reward/a/none_share"] == 0.25 and result["reward/b/none_share"] == 1.0
    assert "reward/b/mean" not in result and "reward/b/std" not in result  # no value: no statistic, not NaN
    merged = RewardScores.concatenate([scores, RewardScores({"a": [7.0], "b": [1.0]}, [7.0])])
    assert merged.total == [1.0, None, 3.0, 5.0, 7.0] and merged.statistics()["reward/b/mean"] == 1.0


def test_default_weights_are_one_and_weights_are_checked(tmp_path):
    assert load_reward_set(["exact_match"], None, base_dir=tmp_path).weights == [1.0]
    with pytest.raises(ConfigError) as error:
        load_reward_set(["exact_match", "exact_match"], [1.0, "x", 3.0], base_dir=tmp_path)
    paths = [path for path, _ in error.value.problems]
    assert paths == ["reward_weights", "reward_weights[1]"]
    with pytest.raises(ConfigError, match=r"reward_weights\[0\]: expected a finite float, got nan"):
        load_reward_set(["exact_match"], [float("nan")], base_dir=tmp_path)


# ---- options of shipped rewards --------------------------------------------------------------------------


def test_options_are_checked_with_key_paths_and_every_problem_at_once(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_reward_set(
            [
                "exact_match",
                {"function": "format_regex", "patern": "x"},
                {"function": "format_regex", "pattern": "(", "match": "full"},
                {"function": "http", "url": "ftp://x", "max_concurrency": 0},
                "format_regx",
                {"function": "overlong_penalty", "max_length": 4, "buffer": 9},
                "reward_model",
            ],
            None,
            base_dir=tmp_path,
        )
    problems = dict(error.value.problems)
    assert "did you mean pattern?" in problems["reward_functions[1].patern"]
    assert problems["reward_functions[1].pattern"] == "required option is missing"
    assert (
        problems["reward_functions[2].match"]
        == "expected one of fullmatch, search, got 'full' (did you mean fullmatch?)"
    )
    assert "expected an http:// or https:// URL" in problems["reward_functions[3].url"]
    assert "did you mean format_regex?" in problems["reward_functions[4]"]
    assert (
        "exact_match, format_regex, overlong_penalty, reward_model, http" in problems["reward_functions[4]"]
    )
    assert problems["reward_functions[5].buffer"] == "must be in [0, max_length=4], got 9"
    assert problems["reward_functions[6].model"] == "required option is missing"


def test_a_bad_pattern_and_later_options_are_named(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_reward_set([{"function": "format_regex", "pattern": "("}], None, base_dir=tmp_path)
    assert error.value.path == "reward_functions[0].pattern" and "not a valid regular expression" in str(
        error.value
    )
    with pytest.raises(ConfigError, match=r"reward_functions\[0\]\.max_concurrency: must be at least 1"):
        load_reward_set(
            [{"function": "http", "url": "http://127.0.0.1:9/x", "max_concurrency": 0}],
            None,
            base_dir=tmp_path,
        )
    with pytest.raises(ConfigError, match=r"reward_functions\[0\]\.url: the URL carries credentials"):
        load_reward_set([{"function": "http", "url": "https://u:pw@h.example/x"}], None, base_dir=tmp_path)


def test_user_references_take_only_function_and_name(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"reward_functions\[0\]\.scale: unknown option; UserRewardOptions accepts: function, name",
    ):
        load_reward_set([{"function": "m:f", "scale": 2}], None, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"reward_functions\[0\]\.function: required option is missing"):
        load_reward_set([{"name": "x"}], None, base_dir=tmp_path)


def test_two_functions_with_one_name_are_refused(tmp_path):
    with pytest.raises(
        ConfigError, match=r"reward_functions\[0\] and reward_functions\[1\] are both named 'format_regex'"
    ):
        load_reward_set(
            [{"function": "format_regex", "pattern": "a"}, {"function": "format_regex", "pattern": "b"}],
            None,
            base_dir=tmp_path,
        )


# ---- errors of user functions ----------------------------------------------------------------------------


BAD_REWARDS = """
def raises_on_b(prompts, completions, **columns):
    return [1.0 / (0 if c == "b" else 1) for c in completions]

def always_raises(prompts, completions, **columns):
    if len(completions) > 1:
        raise RuntimeError("needs the whole batch to fail")
    return [0.0]

def too_short(prompts, completions, **columns):
    return [1.0] * (len(completions) - 1)

def a_string(prompts, completions, **columns):
    return [1.0, "high", 0.0]

def a_bool(prompts, completions, **columns):
    return [c == "a" for c in completions]

def a_nan(prompts, completions, **columns):
    return [0.0, 0.0, float("nan")]

def not_a_list(prompts, completions, **columns):
    return 3.0

def no_kwargs(prompts, completions):
    return [0.0] * len(completions)

NOT_CALLABLE = 42
"""


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "raises_on_b",
            r"rewards\.py:raises_on_b \(sample 1, prompt 'Natalia sold clips.{59}\.\.\.'\): raised ZeroDivisionError",
        ),
        ("always_raises", r"rewards\.py:always_raises: raised RuntimeError: needs the whole batch to fail"),
        ("too_short", r"rewards\.py:too_short: returned 2 scores for 3 completions"),
        (
            "a_string",
            r"rewards\.py:a_string \(sample 1, prompt 'Natalia.*'\): returned 'high' \(str\); expected a float or None",
        ),
        (
            "a_bool",
            r"rewards\.py:a_bool \(sample 0, prompt .*\): returned True \(bool\); expected a float or None",
        ),
        ("a_nan", r"rewards\.py:a_nan \(sample 2, prompt 'third'\): returned nan; a score must be finite"),
        ("not_a_list", r"rewards\.py:not_a_list: returned float; expected a list of 3 floats"),
        (
            "no_kwargs",
            r"rewards\.py:no_kwargs: cannot be called as fn\(prompts, completions, answer=\.\.\.\): .*\*\*columns",
        ),
    ],
)
def test_a_failing_function_names_itself_and_the_sample(tmp_path, name, message):
    write_module(tmp_path, "rewards.py", BAD_REWARDS)
    reward_set = load_reward_set([f"rewards.py:{name}"], None, base_dir=tmp_path)
    with pytest.raises(RewardError, match=message) as error:
        reward_set.score([LONG_PROMPT, LONG_PROMPT, "third"], ["a", "b", "c"], {"answer": ["1", "2", "3"]})
    assert error.value.reference == f"rewards.py:{name}"
    if error.value.prompt is not None:
        assert len(error.value.prompt) <= 80


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        (
            "no_such_module_xyz:f",
            r"no_such_module_xyz:f: cannot import module no_such_module_xyz: ModuleNotFoundError",
        ),
        (
            "rewards.py:missing",
            r"rewards\.py:missing: rewards\.py has no function missing \(it defines: a_bool, a_nan, ",
        ),
        ("rewards.py:NOT_CALLABLE", r"rewards\.py:NOT_CALLABLE: NOT_CALLABLE is a int, not a function"),
        ("broken.py:f", r"broken\.py:f: importing .*broken\.py failed: SyntaxError"),
        ("raising.py:f", r"raising\.py:f: importing .*raising\.py failed: ImportError: no helpers here"),
        ("nowhere.py:f", r"nowhere\.py:f: no such file: "),
    ],
)
def test_a_function_that_cannot_be_loaded_is_named(tmp_path, reference, message):
    write_module(tmp_path, "rewards.py", BAD_REWARDS)
    write_module(tmp_path, "broken.py", "def f(:\n")
    write_module(tmp_path, "raising.py", "raise ImportError('no helpers here')\n")
    with pytest.raises(RewardError, match=message):
        load_reward_set([reference], None, base_dir=tmp_path)


def test_the_batch_must_be_aligned(tmp_path):
    reward_set = load_reward_set(["exact_match"], None, base_dir=tmp_path)
    with pytest.raises(ValueError, match="2 prompts for 3 completions"):
        reward_set.score(["a", "b"], ["1", "2", "3"], {"answer": ["1", "2", "3"]})
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 completions"):
        reward_set.score(["a", "b"], ["1", "2"], {"answer": ["1"]})


def test_exact_match_without_the_answer_column_says_so(tmp_path):
    reward_set = load_reward_set(["exact_match"], None, base_dir=tmp_path)
    with pytest.raises(
        RewardError, match=r"exact_match: needs a 'answer' column in the prompt rows \(they have: level\)"
    ):
        reward_set.score(["a"], ["1"], {"level": [1]})


# ---- dry run ---------------------------------------------------------------------------------------------


def test_check_reward_set_calls_every_function_on_one_row_and_lists_problems(tmp_path):
    write_module(tmp_path, "rewards.py", BAD_REWARDS)
    reward_set = load_reward_set(
        [
            "exact_match",
            "rewards.py:too_short",
            "rewards.py:no_kwargs",
            {"function": "format_regex", "pattern": ".*"},
        ],
        None,
        base_dir=tmp_path,
    )
    problems = check_reward_set(reward_set, {"prompt": "What is 2 + 2?", "answer": "4"})
    assert len(problems) == 2
    assert "rewards.py:too_short: returned 0 scores for 1 completions" in problems[0]
    assert "rewards.py:no_kwargs: cannot be called" in problems[1]
    good = load_reward_set(["exact_match"], None, base_dir=tmp_path)
    assert check_reward_set(good, {"prompt": [{"role": "user", "content": "2+2?"}], "answer": "4"}) == []
    assert "needs a 'answer' column" in check_reward_set(good, {"prompt": "2+2?"})[0]
    assert check_reward_set(good, {"question": "2+2?"}) == [
        "the row has no 'prompt' column (it has: question)"
    ]


def test_importing_the_package_imports_neither_torch_nor_transformers():
    code = "import sys, kfp_components.rewards; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
