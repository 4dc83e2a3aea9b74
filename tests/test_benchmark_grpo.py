"""The GRPO benchmark's own logic: its prompts, its rewards, the options of both sides, its summary and report."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from benchmarks import grpo
from benchmarks.grpo_rewards import completion_text, digit_share, exact_match

# (option of the project's trainer, GRPOConfig argument) pairs that must carry the same value.
SAME_VALUE = [
    ("num_generations", "num_generations"),
    ("effective_batch_size", "per_device_train_batch_size"),
    ("max_new_tokens", "max_completion_length"),
    ("temperature", "temperature"),
    ("top_p", "top_p"),
    ("top_k", "top_k"),
    ("scale_rewards", "scale_rewards"),
    ("epsilon_low", "epsilon"),
    ("epsilon_high", "epsilon_high"),
    ("num_iterations", "num_iterations"),
    ("kl_coef", "beta"),
    ("reward_weights", "reward_weights"),
    ("learning_rate", "learning_rate"),
    ("lr_scheduler", "lr_scheduler_type"),
    ("warmup_steps", "warmup_steps"),
    ("adam_beta1", "adam_beta1"),
    ("adam_beta2", "adam_beta2"),
    ("adam_epsilon", "adam_epsilon"),
    ("weight_decay", "weight_decay"),
    ("max_grad_norm", "max_grad_norm"),
    ("seed", "seed"),
]
UNUSUAL = grpo.GRPOBenchmark(
    num_generations=4,
    prompts_per_step=3,
    max_new_tokens=7,
    temperature=0.7,
    top_p=0.9,
    top_k=5,
    learning_rate=3e-4,
    max_steps=9,
    scale_rewards="batch",
    loss_aggregation="dr_grpo",
    epsilon_low=0.1,
    epsilon_high=0.3,
    num_iterations=2,
    kl_coef=0.04,
    reward_weights=(0.5, 2.0),
)


def test_bundled_prompts_are_the_generators_output_and_their_answers_are_right():
    rows = [json.loads(line) for line in grpo.PROMPTS.read_text().splitlines()]
    assert rows == grpo.arithmetic_prompts()
    assert len(rows) == 200
    assert len({row["prompt"] for row in rows}) == 200
    for row in rows:
        a, op, b = row["prompt"].removeprefix("What is ").split("?")[0].split()
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op]
        assert row["answer"] == str(expected) and expected >= 0
        assert row["prompt"].endswith("? Answer with the number.")
    assert {row["prompt"].split()[3] for row in rows} == {"+", "-", "x"}


def test_digit_share_counts_digits_among_non_space_characters():
    completions = ["12", "a1 b2", "", "   ", "no digits", [{"role": "assistant", "content": "7 x"}]]
    assert digit_share([""] * 6, completions) == [1.0, 0.5, 0.0, 0.0, 0.0, 0.5]


def test_exact_match_takes_the_last_integer():
    completions = ["12", "it is 3 then 12", "12 or 13", "twelve", [{"role": "assistant", "content": "=12"}]]
    assert exact_match([""] * 5, completions, answer=["12"] * 5, trainer_state=None) == [1, 1, 0, 0, 1]


def test_a_completion_of_another_type_is_an_error():
    with pytest.raises(TypeError, match="string or a list of messages, got int"):
        completion_text(3)


@pytest.mark.parametrize(
    ("aggregation", "loss_type"), [("token", "dapo"), ("sequence", "grpo"), ("dr_grpo", "dr_grpo")]
)
def test_trl_loss_type_follows_the_loss_aggregation(aggregation, loss_type):
    bench = dataclasses.replace(UNUSUAL, loss_aggregation=aggregation)
    assert grpo.trl_arguments(bench, "out", seed=0)["loss_type"] == loss_type


def test_both_sides_get_the_same_values():
    ours = grpo.ours_options(UNUSUAL, "model", "data.jsonl", "out", seed=7)
    trl = grpo.trl_arguments(UNUSUAL, "out", seed=7)
    for ours_key, trl_key in SAME_VALUE:
        assert ours[ours_key] == trl[trl_key], (ours_key, trl_key)
    assert ours["effective_batch_size"] == 12  # completions per step: 3 prompts x 4 generations
    assert (ours["max_steps"], trl["max_steps"]) == (9, 18)  # TRL counts updates: 2 per generation batch
    assert ours["algorithm"] == "grpo" and ours["loss_aggregation"] == "dr_grpo"
    assert ours["torch_dtype"] == "float32"
    assert ours["reward_functions"] == [
        f"{grpo.REWARDS_FILE}:digit_share",
        f"{grpo.REWARDS_FILE}:exact_match",
    ]


def test_trl_runs_one_generation_per_step_on_the_cpu_in_fp32_without_vllm():
    trl = grpo.trl_arguments(UNUSUAL, "out", seed=7)
    assert trl["gradient_accumulation_steps"] == 1  # one generation batch of all completions per step
    assert (trl["use_vllm"], trl["use_cpu"], trl["bf16"], trl["fp16"]) == (False, True, False, False)
    assert trl["logging_steps"] == 1 and trl["mask_truncated_completions"] is False


def test_trl_accepts_the_arguments():
    """The mapping is valid for the installed TRL (skipped without TRL's virtual environment)."""
    python = grpo.DEFAULT_TRL_PYTHON
    if not python.exists():
        pytest.skip(f"no TRL virtual environment at {python}")
    script = (
        "import json, sys; from trl import GRPOConfig; c = GRPOConfig(**json.loads(sys.argv[1])); "
        "print(json.dumps([c.generation_batch_size, c.steps_per_generation, c.loss_type, c.beta, c.bf16]))"
    )
    arguments = grpo.trl_arguments(UNUSUAL, "out", seed=7)
    completed = subprocess.run(
        [str(python), "-c", script, json.dumps(arguments)], capture_output=True, text=True, check=True
    )
    assert json.loads(completed.stdout.splitlines()[-1]) == [12, 1, "dr_grpo", 0.04, False]


def test_project_trainer_accepts_the_options(tmp_path):
    from kfp_components.trainer.config import ALGORITHMS, TrainingConfig
    from kfp_components.typed_config import from_dict

    if "grpo" not in ALGORITHMS:
        pytest.skip("the trainer has no algorithm grpo yet")
    data = tmp_path / "prompts.jsonl"
    data.write_text(grpo.PROMPTS.read_text())
    config = from_dict(
        TrainingConfig, grpo.ours_options(UNUSUAL, "model", str(data), str(tmp_path / "out"), seed=0)
    )
    assert config.algorithm == "grpo"


def test_missing_trl_environment_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("TRL_PYTHON", str(tmp_path / "nowhere" / "python"))
    with pytest.raises(SystemExit, match=r"nowhere/python does not exist.*TRL_PYTHON"):
        grpo.run(["trl"])


def test_unknown_side_is_refused():
    with pytest.raises(ValueError, match=r"unknown side\(s\) \['peer'\]"):
        grpo.run(["peer"])


def test_a_benchmark_with_an_unknown_loss_aggregation_is_refused():
    with pytest.raises(ValueError, match="loss_aggregation must be one of"):
        grpo.GRPOBenchmark(loss_aggregation="mean")


def test_our_metrics_rows_become_steps():
    rows = [
        {
            "step": 1,
            "seconds": 2.0,
            "generation_seconds": 1.5,
            "training_seconds": 0.5,
            "generation_tokens_per_second": 100.0,
            "reward": 0.25,
            "reward/digit_share/mean": 0.25,
            "reward/exact_match/mean": 0.5,
        },
        {"step": 1, "epoch": 0, "eval_loss": 1.0},
    ]
    steps = grpo.ours_steps(rows, ["digit_share", "exact_match"])
    assert steps == [
        {
            "step": 1,
            "seconds": 2.0,
            "generation_seconds": 1.5,
            "update_seconds": 0.5,
            "completion_tokens": 150.0,
            "generation_tokens_per_second": 100.0,
            "reward": 0.25,
            "rewards": {"digit_share": 0.25, "exact_match": 0.5},
        }
    ]


def test_a_step_row_without_timings_is_an_error():
    with pytest.raises(ValueError, match="step 3 has no generation_seconds, generation_tokens_per_second"):
        grpo.ours_steps([{"step": 3, "seconds": 1.0, "reward": 0.0}], ["digit_share"])


def test_trl_updates_are_grouped_by_generation_batch():
    updates = [
        {
            "step": i + 1,
            "seconds": 2.0,
            "generation_seconds": g,
            "completion_tokens": t,
            "reward": r,
            "rewards": {},
        }
        for i, (g, t, r) in enumerate([(1.0, 100, 0.1), (0.0, 0, None), (1.5, 90, 0.3), (0.0, 0, None)])
    ]
    steps = grpo.per_generation(updates, num_iterations=2)
    assert [(s["step"], s["seconds"], s["generation_seconds"], s["update_seconds"]) for s in steps] == [
        (1, 4.0, 1.0, 3.0),
        (2, 4.0, 1.5, 2.5),
    ]
    assert [(s["completion_tokens"], s["generation_tokens_per_second"], s["reward"]) for s in steps] == [
        (100, 100.0, 0.1),
        (90, 60.0, 0.3),
    ]
    assert grpo.per_generation(updates[:2], num_iterations=1)[1]["generation_tokens_per_second"] is None


def _steps(seconds: list[float], generation: list[float], rewards: list[float]) -> list[dict]:
    return [
        {
            "step": i + 1,
            "seconds": s,
            "generation_seconds": g,
            "update_seconds": s - g,
            "completion_tokens": 100,
            "reward": r,
            "rewards": {"exact_match": 0.0},
        }
        for i, (s, g, r) in enumerate(zip(seconds, generation, rewards, strict=True))
    ]


def test_summary_takes_medians_shares_and_curve_ends():
    steps = _steps([1, 9, 2, 2, 4], [0.5, 1, 1, 1, 1.5], [0.0, 0.1, 0.2, 0.3, 0.4])
    summary = grpo.summarise(steps)
    assert (
        summary["step_seconds"] == 2 and summary["generation_seconds"] == 1 and summary["update_seconds"] == 1
    )
    assert summary["generation_share"] == pytest.approx(5 / 18)
    assert summary["generation_tokens_per_second"] == pytest.approx(500 / 5)
    assert summary["reward_first"] == pytest.approx(0.1) and summary["reward_last"] == pytest.approx(0.3)
    assert summary["fastest_step_seconds"] == 1 and summary["cpu_seconds_per_step"] is None
    assert grpo.summarise(steps, run_cpu_seconds=10.0)["cpu_seconds_per_step"] == 2.0


def _side(rewards_by_seed: list[list[float]], seconds: float, generation: float, cpu: float) -> dict:
    runs = [
        {
            "seed": seed,
            "steps": _steps([seconds] * 4, [generation] * 4, rewards),
            "run_cpu_seconds": cpu,
            "run_seconds": 4 * seconds + 1.0,
        }
        for seed, rewards in enumerate(rewards_by_seed)
    ]
    return {"runs": runs, "summary": grpo.summarise_runs(runs), "versions": {"trl": "9.9"}}


def _result(ours: bool) -> dict:
    sides: dict = {"trl": _side([[0.0, 0.1, 0.2, 0.3], [0.0, 0.1, 0.2, 0.3]], 2.0, 1.0, 16.0), "ours": None}
    speed = None
    if ours:
        sides["ours"] = _side([[0.0, 0.2, 0.3, 0.4], [0.0, 0.2, 0.3, 0.4]], 1.5, 0.5, 12.0)
        speed = {
            "rollout_tokens_per_second": 900,
            "generate_tokens_per_second": 1000,
            "ratio": 0.9,
            "batch": 8,
            "prompt_tokens": 26,
            "max_new_tokens": 32,
            "repeats": 3,
        }
    bench = dataclasses.replace(grpo.GRPOBenchmark(), seeds=(0, 1))
    return {
        "benchmark": dataclasses.asdict(bench),
        "model": {"arch": "qwen2", "seed": 0, **grpo.MODEL},
        "prompts": "examples/arithmetic_prompts.jsonl",
        "sides": sides,
        "generation": speed,
        "goals": grpo.compare(sides, speed),
    }


def test_runs_are_pooled_for_times_and_averaged_for_rewards():
    runs = [
        {
            "seed": 0,
            "steps": _steps([1] * 4, [0.5] * 4, [0.0, 0.1, 0.2, 0.3]),
            "run_cpu_seconds": 4,
            "run_seconds": 5,
        },
        {
            "seed": 1,
            "steps": _steps([3] * 4, [0.5] * 4, [0.0, 0.3, 0.4, 0.5]),
            "run_cpu_seconds": 12,
            "run_seconds": 15,
        },
    ]
    summary = grpo.summarise_runs(runs)
    assert summary["runs"] == 2 and summary["steps"] == 8
    assert summary["step_seconds"] == 2 and summary["fastest_step_seconds"] == 1
    assert summary["cpu_seconds_per_step"] == 2.0 and summary["outside_steps_seconds"] == 2.0
    assert summary["reward_first"] == pytest.approx((0.1 + 0.7 / 3) / 2)
    assert summary["reward_last"] == pytest.approx((0.2 + 0.4) / 2)
    assert summary["reward_last_by_seed"] == [[0, pytest.approx(0.2)], [1, pytest.approx(0.4)]]
    assert summary["reward_curve"] == pytest.approx([0.0, 0.2, 0.3, 0.4])


def test_goals_compare_step_time_reward_and_generation():
    goals = _result(ours=True)["goals"]
    assert goals["step_ratio"] == pytest.approx(0.75)
    assert goals == {**goals, "step_goal_met": True, "reward_goal_met": True, "generation_goal_met": False}
    assert set(_result(ours=False)["goals"].values()) == {None}


def test_report_with_one_side_says_the_other_is_not_measured():
    text = grpo.render(_result(ours=False))
    assert (
        "| TRL 9.9 `GRPOTrainer` | 2.000 | 2.000 | 1.000 | 1.000 | 50% | 100 | 4.00 | 1.00 | 0.100 | 0.200 | 0.00 |"
        in text
    )
    assert "| this engine | not measured |" in text
    assert "step time at most 0.8x TRL's: not measured" in text


def test_report_with_both_sides_states_each_goal(tmp_path):
    result = _result(ours=True)
    text = grpo.render(result)
    assert (
        "| this engine | 1.500 | 1.500 | 0.500 | 1.000 | 33% | 200 | 3.00 | 1.00 | 0.167 | 0.300 | 0.00 |"
        in text
    )
    assert "step time at most 0.8x TRL's: met (0.75x; CPU seconds per step 0.75x)" in text
    assert "run by run (seeds 0, 1): TRL 9.9 `GRPOTrainer` 0.200, 0.200; this engine 0.300, 0.300." in text
    assert "generation not slower than `model.generate`: not met (900 vs 1,000 tokens/s" in text
    assert "8 rows of up to 26 prompt tokens, 32 new tokens each with EOS off, median of 3)" in text
    grpo.plot(result, tmp_path / "grpo.png")
    assert (tmp_path / "grpo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_performance_page_has_a_grpo_section_once_a_result_is_stored():
    from benchmarks import run

    assert "grpo" in run.BENCHMARKS
    path = run.RESULTS / "grpo.json"
    if not path.exists():
        pytest.skip("no stored GRPO result")
    assert "## GRPO against TRL" in run.report()


def test_runner_script_imports_nothing_from_the_project():
    """The TRL side runs in another environment: its module must import without this project's packages."""
    completed = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import runpy; runpy.run_path({str(grpo.TRL_RUNNER)!r}, run_name='__main__')",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "usage:" in completed.stderr and "ModuleNotFoundError" not in completed.stderr
