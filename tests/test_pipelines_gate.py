"""The promotion gate's decision and the rewards of the online pipelines (the plain modules the gate and
online_training_options components call)."""

from __future__ import annotations

import pytest

from kfp_components.evaluation.gate import GateOptions, decide
from kfp_components.launch.reward_options import judge_reward, with_rewards
from kfp_components.typed_config import ConfigError, from_dict

COMPARED = {
    "kfp_capitals_acc": 0.6,
    "base_kfp_capitals_acc": 0.5,
    "kfp_capitals_acc_delta": 0.1,
    "kfp_capitals_acc_retention": 1.2,
    "arc_easy_acc": 0.45,
    "base_arc_easy_acc": 0.5,
    "arc_easy_acc_delta": -0.05,
    "arc_easy_acc_retention": 0.9,
    "mean_retention": 1.05,
}


def test_a_gate_that_is_off_passes_and_says_so():
    decision = decide({}, GateOptions())
    assert decision.passed and decision.reason.startswith("gate off")
    assert decision.metrics["gate_passed"] == 1.0 and decision.metrics["gate_enabled"] == 0.0


def test_the_gate_passes_on_gain_and_retention_with_the_numbers_in_the_reason():
    decision = decide(COMPARED, GateOptions(enabled=True, min_task_gain=0.0, min_retention=1.0))
    assert decision.passed
    assert decision.metrics["gate_mean_task_gain"] == pytest.approx(0.025)
    assert decision.metrics["gate_mean_retention"] == 1.05 and decision.metrics["gate_passed"] == 1.0
    assert "0.0250 >= 0.0" in decision.reason and "1.0500 >= 1.0" in decision.reason


def test_the_gate_fails_naming_every_threshold_missed():
    decision = decide(COMPARED, GateOptions(enabled=True, min_task_gain=0.05, min_retention=1.1))
    assert not decision.passed and decision.metrics["gate_passed"] == 0.0
    assert decision.reason == (
        "failed: mean task gain 0.0250 < min_task_gain 0.05; mean retention 1.0500 < min_retention 1.1"
    )


def test_a_gate_without_a_base_comparison_fails_rather_than_passing():
    decision = decide({"kfp_capitals_acc": 0.9}, GateOptions(enabled=True))
    assert not decision.passed and "no base comparison" in decision.reason


def test_gate_options_are_checked():
    with pytest.raises(ConfigError) as info:
        from_dict(GateOptions, {"enabled": True, "min_retention": -1.0, "min_task_gain": float("nan")})
    assert sorted(path for path, _ in info.value.problems) == ["min_retention", "min_task_gain"]


def test_rewards_are_added_to_training_options_and_the_judge_comes_last():
    merged = with_rewards(
        {"num_generations": 4, "reward_functions": ["exact_match"]},
        judge=judge_reward("http://judge:8000/v1", "judge-model", "judge-credentials"),
    )
    assert merged["num_generations"] == 4
    assert merged["reward_functions"] == [
        "exact_match",
        {
            "function": "judge",
            "backend": "openai",
            "base_url": "http://judge:8000/v1",
            "model": "judge-model",
            "token_env": "JUDGE_API_KEY",
            "token_secret": "judge-credentials",
        },
    ]
    assert "token_env" not in judge_reward("http://judge:8000/v1", "m", "")
    assert with_rewards({}, reward_model_path="rm") == {"reward_model_path": "rm"}


def test_a_reward_given_twice_is_an_error_naming_both_places():
    with pytest.raises(ConfigError) as info:
        with_rewards(
            {"reward_functions": ["a"], "reward_model_path": "x"},
            reward_functions=["b"],
            reward_model_path="y",
            parameters={"reward_functions": "rewards_param"},
        )
    assert [path for path, _ in info.value.problems] == [
        "training_options.reward_functions",
        "training_options.reward_model_path",
    ]
    assert "rewards_param" in str(info.value)


def test_whole_floats_of_a_kfp_dict_parameter_reach_the_trainer_as_integers():
    """KFP hands training_options over as a protobuf Struct: {"num_generations": 4} arrives as 4.0."""
    from kfp_components.launch.step import step_training_config

    config = step_training_config(
        {"algorithm": "grpo", "model_name_or_path": "m", "effective_batch_size": 8},
        {
            "num_generations": 4.0,
            "max_new_tokens": 8.0,
            "max_grad_norm": 1.0,
            "reward_functions": ["exact_match"],
        },
        data_path="d",
        output_dir="o",
    )
    assert (config.num_generations, config.max_new_tokens, config.max_grad_norm) == (4, 8, 1.0)
    assert type(config.num_generations) is int


def test_a_lower_is_better_score_counts_its_fall_as_a_gain():
    """Perplexity up by 4 is a loss even though its delta is positive; down by 3 is a gain."""
    from kfp_components.evaluation.gate import GateOptions, decide

    worse = {
        "arc_easy_acc_delta": 0.01,
        "arc_easy_acc_retention": 1.02,
        "wikitext_word_perplexity_delta": 4.0,
        "wikitext_word_perplexity_retention": 0.8,
        "mean_retention": 0.91,
    }
    options = GateOptions(enabled=True, min_task_gain=0.0, min_retention=0.0)
    decision = decide(worse, options)
    assert not decision.passed and decision.metrics["gate_mean_task_gain"] == pytest.approx(-1.995)
    better = {**worse, "wikitext_word_perplexity_delta": -3.0, "wikitext_word_perplexity_retention": 1.2}
    assert decide(better, options).passed
