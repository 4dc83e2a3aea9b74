"""The PPO benchmark's own logic: the options of both sides, the reward model's options, the summary and the
report; the TRL runner's completion ends; a missing algorithm (trpo) skipped with its reason."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import online_bench, ppo

# (option of the project's trainer, PPOConfig argument) pairs that must carry the same value.
SAME_VALUE = [
    ("effective_batch_size", "per_device_train_batch_size"),
    ("effective_batch_size", "local_rollout_forward_batch_size"),
    ("num_mini_batches", "num_mini_batches"),
    ("num_iterations", "num_ppo_epochs"),
    ("max_new_tokens", "response_length"),
    ("temperature", "temperature"),
    ("missing_eos_penalty", "missing_eos_penalty"),
    ("kl_coef", "kl_coef"),
    ("kl_estimator", "kl_estimator"),
    ("gamma", "gamma"),
    ("gae_lambda", "lam"),
    ("epsilon_low", "cliprange"),
    ("epsilon_high", "cliprange"),
    ("value_clip", "cliprange_value"),
    ("vf_coef", "vf_coef"),
    ("whiten_rewards", "whiten_rewards"),
    ("learning_rate", "learning_rate"),
    ("lr_scheduler", "lr_scheduler_type"),
    ("warmup_steps", "warmup_steps"),
    ("adam_beta1", "adam_beta1"),
    ("adam_beta2", "adam_beta2"),
    ("adam_epsilon", "adam_epsilon"),
    ("weight_decay", "weight_decay"),
    ("seed", "seed"),
]
UNUSUAL = ppo.PPOBenchmark(
    completions_per_step=12,
    max_new_tokens=7,
    temperature=0.7,
    learning_rate=3e-4,
    max_steps=9,
    num_iterations=3,
    num_mini_batches=3,
    kl_coef=0.02,
    kl_estimator="k3",
    gamma=0.99,
    gae_lambda=0.9,
    epsilon=0.15,
    vf_coef=0.3,
    value_clip=0.4,
    missing_eos_penalty=0.5,
    whiten_rewards=True,
    adam_beta1=0.8,
    adam_beta2=0.95,
    adam_epsilon=1e-6,
    weight_decay=0.01,
)


def _ours(algorithm: str = "ppo") -> dict:
    return ppo.ours_options(UNUSUAL, "model", "rm", "data.jsonl", "out", seed=7, algorithm=algorithm)


def test_both_sides_get_the_same_values():
    ours, trl = _ours(), ppo.trl_arguments(UNUSUAL, "out", seed=7)
    for ours_key, trl_key in SAME_VALUE:
        assert ours[ours_key] == trl[trl_key], (ours_key, trl_key)
    assert trl["total_episodes"] == 9 * 12  # TRL counts completions: max_steps x completions per step
    assert trl["gradient_accumulation_steps"] == 1  # one update per mini-batch
    assert (trl["stop_token"], trl["use_cpu"], trl["bf16"], trl["fp16"]) == ("eos", True, False, False)
    assert trl["num_sample_generations"] == 0 and trl["logging_steps"] == 1


def test_ours_matches_what_trl_does_without_an_option_for_it():
    ours = _ours()
    assert ours["num_generations"] == 1  # TRL's PPO samples one completion per prompt
    assert (ours["top_p"], ours["top_k"]) == (1.0, 0)  # TRL's PPO fixes these
    assert ours["max_grad_norm"] == 0.0  # TRL's PPO loop does not clip gradients
    assert ours["loss_aggregation"] == "token"  # TRL: masked mean over the mini-batch's tokens
    assert (ours["kl_in"], ours["kl_target"], ours["whiten_advantages"]) == ("reward", 0.0, True)
    assert (ours["entropy_coef"], ours["early_stop_kl"], ours["reward_clip"]) == (0.0, 0.0, 0.0)
    assert (ours["value_model_init"], ours["reward_model_path"], ours["reward_model_path"]) == (
        "reward_model",
        "rm",
        "rm",
    )
    assert ours["value_learning_rate"] == 0.0  # TRL: one optimizer, one learning rate
    assert ours["torch_dtype"] == "float32" and ours["algorithm"] == "ppo"


def test_other_algorithms_keep_their_own_update_defaults():
    for algorithm in ("a2c", "trpo"):
        options = _ours(algorithm)
        assert options["algorithm"] == algorithm
        assert not set(ppo.PPO_ONLY) & set(options)
        assert {k: v for k, v in options.items() if k != "algorithm"} == {
            k: v for k, v in _ours().items() if k not in ppo.PPO_ONLY and k != "algorithm"
        }


def test_a_benchmark_that_does_not_split_into_mini_batches_is_refused():
    with pytest.raises(ValueError, match="num_mini_batches 5 does not split completions_per_step 32"):
        ppo.PPOBenchmark(num_mini_batches=5)
    with pytest.raises(ValueError, match="kl_estimator must be k1 or k3"):
        ppo.PPOBenchmark(kl_estimator="k2")
    with pytest.raises(ValueError, match="trl_reward_input must be token_ids or conversation"):
        ppo.PPOBenchmark(trl_reward_input="text")


@pytest.mark.parametrize("reward_input", ["token_ids", "conversation"])
def test_the_trl_job_says_what_its_reward_model_reads(monkeypatch, tmp_path, reward_input):
    """``trl_reward_input`` reaches the TRL runner's job (default: TRL's own token ids)."""
    jobs = []

    def fake_run(command, **kwargs):
        job = json.loads(Path(command[-1]).read_text())
        jobs.append(job)
        with open(job["output"], "w") as out:
            json.dump({"steps": []}, out)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(ppo, "ppo_trl_python", lambda: sys.executable)
    monkeypatch.setattr(online_bench.subprocess, "run", fake_run)
    bench = dataclasses.replace(ppo.PPOBenchmark(), trl_reward_input=reward_input)
    ppo.run_trl(bench, tmp_path / "model", "rm", tmp_path / "trl", seed=0)
    assert jobs[0]["reward_input"] == reward_input
    assert ppo.PPOBenchmark().trl_reward_input == "token_ids"


@pytest.mark.parametrize("algorithm", ["ppo", "a2c", "trpo"])
def test_project_trainer_accepts_the_options(tmp_path, algorithm):
    from kfp_components.trainer.config import RL_ALGORITHMS, TrainingConfig
    from kfp_components.typed_config import from_dict

    if algorithm not in RL_ALGORITHMS:
        pytest.skip(f"the trainer has no algorithm {algorithm} yet")
    options = ppo.ours_options(
        ppo.PPOBenchmark(), "model", "rm", str(ppo.PROMPTS), str(tmp_path / "out"), 0, algorithm
    )
    config = from_dict(TrainingConfig, options)
    assert config.algorithm == algorithm and config.value_model_init == "reward_model"
    if algorithm == "ppo":
        assert (config.num_iterations, config.num_mini_batches, config.vf_coef) == (4, 2, 0.1)


def test_reward_model_is_trained_by_the_project_from_the_bundled_preferences(tmp_path):
    from kfp_components.trainer.config import TrainingConfig
    from kfp_components.typed_config import from_dict

    options = ppo.reward_model_options(ppo.PPOBenchmark(), "model", str(tmp_path))
    assert options["data_path"].endswith("examples/arithmetic_preferences.jsonl")
    assert options["eval_data_path"].endswith("examples/arithmetic_preferences_eval.jsonl")
    assert from_dict(TrainingConfig, options).algorithm == "reward_model"


def test_trl_accepts_the_arguments(tmp_path):
    """The mapping is valid for the installed TRL (skipped without TRL's PPO environment)."""
    python = ppo.DEFAULT_TRL_PYTHON
    if not python.exists():
        pytest.skip(f"no TRL PPO virtual environment at {python}")
    script = (
        "import json, sys; from trl.experimental.ppo import PPOConfig; "
        "c = PPOConfig(**json.loads(sys.argv[1])); "
        "print(json.dumps([c.num_ppo_epochs, c.num_mini_batches, c.lam, c.cliprange_value, c.kl_estimator, "
        "c.total_episodes, c.stop_token, c.bf16]))"
    )
    arguments = ppo.trl_arguments(UNUSUAL, str(tmp_path / "out"), seed=7)
    completed = subprocess.run(
        [str(python), "-c", script, json.dumps(arguments)], capture_output=True, text=True, check=True
    )
    assert json.loads(completed.stdout.splitlines()[-1]) == [3, 3, 0.9, 0.4, "k3", 108, "eos", False]


def test_our_metrics_rows_become_steps():
    rows = [
        {
            "step": 1,
            "seconds": 2.0,
            "generation_seconds": 0.5,
            "generation_tokens_per_second": 100.0,
            "score_mean": -1.5,
            "reward": -0.5,
            "kl_per_completion": 0.1,
            "value_loss": 0.2,
        },
        {"step": 1, "epoch": 0, "eval_loss": 1.0},
    ]
    assert ppo.ours_steps(rows) == [
        {
            "step": 1,
            "seconds": 2.0,
            "generation_seconds": 0.5,
            "update_seconds": 1.5,
            "completion_tokens": 50.0,
            "score": -1.5,
            "kl_per_completion": 0.1,
            "value_loss": 0.2,
        }
    ]
    with pytest.raises(ValueError, match="step 3 has no generation_tokens_per_second, score_mean"):
        ppo.ours_steps([{"step": 3, "seconds": 1.0, "generation_seconds": 0.2}])


def _steps(seconds: list[float], generation: list[float], scores: list[float]) -> list[dict]:
    return [
        {
            "step": i + 1,
            "seconds": s,
            "generation_seconds": g,
            "update_seconds": s - g,
            "completion_tokens": 100,
            "score": r,
            "kl_per_completion": 0.5,
        }
        for i, (s, g, r) in enumerate(zip(seconds, generation, scores, strict=True))
    ]


def _side(scores_by_seed: list[list[float]], seconds: float, generation: float, cpu: float) -> dict:
    runs = [
        {
            "seed": seed,
            "steps": _steps([seconds] * 4, [generation] * 4, scores),
            "run_cpu_seconds": cpu,
            "run_seconds": 4 * seconds + 1.0,
        }
        for seed, scores in enumerate(scores_by_seed)
    ]
    return {"runs": runs, "summary": ppo.summarise_runs(runs), "versions": {"trl": "9.9"}}


def _result(measured: tuple[str, ...]) -> dict:
    made = {
        "trl": _side([[-2.0, -1.9, -1.8, -1.7], [-2.0, -1.9, -1.8, -1.7]], 2.0, 0.5, 16.0),
        "ppo": _side([[-2.0, -1.6, -1.4, -1.2], [-2.0, -1.6, -1.4, -1.2]], 1.5, 0.25, 12.0),
        "a2c": _side([[-2.0, -1.8, -1.7, -1.6], [-2.0, -1.8, -1.7, -1.6]], 0.6, 0.25, 4.8),
    }
    sides = {side: made.get(side) if side in measured else None for side in ppo.SIDES}
    bench = dataclasses.replace(ppo.PPOBenchmark(), seeds=(0, 1))
    return {
        "benchmark": dataclasses.asdict(bench),
        "model": {"arch": "qwen2", "seed": 0, **ppo.MODEL},
        "prompts": "examples/arithmetic_prompts.jsonl",
        "reward_model": {"steps": 12, "eval_accuracy": 0.97, "eval_margin": 3.0, "seconds": 5.0},
        "sides": sides,
        "skipped": {"trpo": "the trainer has no algorithm trpo"},
        "goals": ppo.compare(sides),
    }


def test_runs_are_pooled_for_times_and_averaged_for_scores():
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
    summary = ppo.summarise_runs(runs)
    assert summary["runs"] == 2 and summary["steps"] == 8
    assert summary["step_seconds"] == 2 and summary["fastest_step_seconds"] == 1
    assert summary["cpu_seconds_per_step"] == 2.0 and summary["outside_steps_seconds"] == 2.0
    assert summary["generation_share"] == pytest.approx(4 / 16)
    assert summary["score_first"] == pytest.approx((0.1 + 0.7 / 3) / 2)
    assert summary["score_last"] == pytest.approx((0.2 + 0.4) / 2)
    assert summary["score_last_by_seed"] == [[0, pytest.approx(0.2)], [1, pytest.approx(0.4)]]
    assert summary["score_curve"] == pytest.approx([0.0, 0.2, 0.3, 0.4])
    assert summary["kl_last"] == 0.5


def test_goals_compare_ppo_with_trl_and_the_other_algorithms_with_ppo():
    goals = _result(("trl", "ppo", "a2c"))["goals"]
    assert goals["step_ratio"] == pytest.approx(0.75) and goals["cpu_ratio"] == pytest.approx(0.75)
    assert goals["step_goal_met"] is True and goals["score_goal_met"] is True
    assert goals["a2c_over_ppo"] == pytest.approx(0.4) and goals["trpo_over_ppo"] is None
    assert set(_result(("trl",))["goals"].values()) == {None}


def test_report_states_each_goal_the_ratios_and_the_differences(tmp_path):
    result = _result(("trl", "ppo", "a2c"))
    text = ppo.render(result)
    assert (
        "| TRL 9.9 `PPOTrainer` | 2.000 | 2.000 | 0.500 | 1.500 | 25% | 4.00 | 1.00 | -1.900 | -1.800 | 0.500 |"
        in text
    )
    assert (
        "| this engine, ppo | 1.500 | 1.500 | 0.250 | 1.250 | 17% | 3.00 | 1.00 | -1.667 | -1.400 | 0.500 |"
        in text
    )
    assert "| this engine, trpo | not measured (the trainer has no algorithm trpo) |" in text
    assert "step time at most 0.8x TRL's: met (0.75x; CPU seconds per step 0.75x)" in text
    assert "equal or better score after the same steps: met" in text
    assert "a2c 0.40x, trpo not measured" in text
    assert "held-out accuracy 0.97" in text
    assert all(f"- {difference}" in text for difference in ppo.DIFFERENCES)
    ppo.plot(result, tmp_path / "ppo.png")
    assert (tmp_path / "ppo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_with_trl_only_says_ours_is_not_measured():
    text = ppo.render(_result(("trl",)))
    assert "| this engine, ppo | not measured | | |" in text
    assert (
        "step time at most 0.8x TRL's: not measured; equal or better score after the same steps: not measured"
        in text
    )


def test_a_missing_algorithm_is_skipped_with_its_reason_before_anything_is_built(monkeypatch):
    monkeypatch.setattr(ppo, "available_algorithms", lambda: ("grpo", "ppo", "a2c"))
    result = ppo.run(["trpo"])
    assert result["skipped"] == {"trpo": "the trainer has no algorithm trpo"}
    assert set(result["sides"].values()) == {None} and result["reward_model"] is None
    assert "| this engine, trpo | not measured (the trainer has no algorithm trpo) |" in ppo.render(result)


def test_missing_trl_environment_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("TRL_PPO_PYTHON", str(tmp_path / "nowhere" / "python"))
    with pytest.raises(SystemExit, match=r"nowhere/python does not exist.*ppo\.py.*TRL_PPO_PYTHON"):
        ppo.run(["trl"])


def test_unknown_side_is_refused():
    with pytest.raises(ValueError, match=r"unknown side\(s\) \['ours'\]"):
        ppo.run(["ours"])


def test_performance_page_has_a_ppo_section_once_a_result_is_stored():
    from benchmarks import run

    assert "ppo" in run.BENCHMARKS
    if not (run.RESULTS / "ppo.json").exists():
        pytest.skip("no stored PPO result")
    assert "## PPO against TRL" in run.report()


def _runner():
    spec = importlib.util.spec_from_file_location("ppo_trl_runner", ppo.TRL_RUNNER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trl_runner_ends_a_completion_at_its_eos_or_first_pad():
    end = _runner()._end
    eos, pad = 7, 0
    assert end([5, 6, eos, pad, pad], eos, pad) == 3  # the EOS counts
    assert end([5, pad, 6], eos, pad) == 1  # a sampled pad ends it, as TRL reads the sequence length
    assert end([5, 6, 8], eos, pad) == 3  # cut at the response length


def test_runner_script_imports_nothing_from_the_project():
    """The TRL side runs in another environment: its module must import without this project's packages."""
    completed = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import runpy; runpy.run_path({str(ppo.TRL_RUNNER)!r}, run_name='__main__')",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "usage:" in completed.stderr and "ModuleNotFoundError" not in completed.stderr
