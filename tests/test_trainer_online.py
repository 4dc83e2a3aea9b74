"""The online algorithms train for real on a tiny model: the reward rises, ranks and resumes agree, OSFT's
constraint holds, and bad input stops the run before any update."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from test_trainer_rollout import FakeLLM, fake_vllm  # noqa: F401  (a fixture)

from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.train import train
from kfp_components.typed_config import ConfigError

#: A graded reward a random tiny model can climb within a few steps: the share of "a" in the completion.
REWARDS = """
def share_of_a(prompts, completions, **columns):
    return [text.count("a") / max(len(text), 1) for text in completions]

def wrong_length(prompts, completions, **columns):
    return [1.0]

def raises(prompts, completions, **columns):
    raise RuntimeError("the scorer is down")
"""


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("online")
    path = folder / "prompts.jsonl"
    words = ["cat", "dog", "sun", "map", "tree", "bird", "lamp", "rain"]
    rows = [{"prompt": f"Say something about the {w}.", "answer": str(i)} for i, w in enumerate(words * 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "rewards_for_tests.py").write_text(textwrap.dedent(REWARDS), encoding="utf-8")
    return path


def online_config(prompts: Path, output_dir: Path, **overrides) -> TrainingConfig:
    options = dict(
        model_name_or_path=str(tiny_model_path("qwen2", 0)),
        data_path=str(prompts),
        output_dir=str(output_dir),
        algorithm="grpo",
        reward_functions=[f"{prompts.parent / 'rewards_for_tests.py'}:share_of_a"],
        num_generations=4,
        effective_batch_size=16,
        max_new_tokens=8,
        max_seq_len=256,
        max_tokens_per_gpu=1024,
        learning_rate=5e-2,
        lr_scheduler="constant",
        max_steps=10,
        torch_dtype="float32",
        save_final_model=False,
        seed=3,
    )
    options.update(overrides)
    config = TrainingConfig(**options)
    config.validate()
    return config


def rewards_of(output_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["reward"] for row in rows if "reward" in row]


def rise(rewards: list[float], window: int = 3) -> float:
    return sum(rewards[-window:]) / window - sum(rewards[:window]) / window


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        {"algorithm": "grpo"},
        {"algorithm": "rloo"},
        {"algorithm": "reinforce_pp", "kl_coef": 0.002, "kl_in": "reward"},
    ],
    ids=["grpo", "rloo", "reinforce_pp"],
)
def test_each_algorithm_raises_the_reward(prompts, tmp_path, overrides, caplog):
    caplog.set_level(logging.INFO, logger="kfp_components.trainer")
    summary = train(online_config(prompts, tmp_path, **overrides))
    rewards = rewards_of(tmp_path)
    assert summary.steps == 10 and len(rewards) == 10
    assert rise(rewards) > 0.1, rewards
    assert summary.metrics["reward"] == rewards[-1]
    # what a pod's log shows every step: the reward, the KL and where the time went
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step 10/10")]
    assert (
        lines and f"reward {rewards[-1]:.4f}" in lines[0] and " kl " in lines[0] and "generation" in lines[0]
    )
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for key in (
        "reward_std",
        "reward/share_of_a/mean",
        "kl",
        "entropy",
        "clip_fraction",
        "completion_length_mean",
        "completion_length_max",
        "truncated_share",
        "generation_seconds",
        "training_seconds",
        "generation_tokens_per_second",
        "training_tokens_per_second",
    ):
        assert isinstance(record[key], int | float), key


def test_grpo_inside_the_osft_constraint_keeps_the_frozen_subspace(prompts, tmp_path):
    """RL that keeps the base model's main subspace: the update of a decomposed weight is orthogonal to its
    top singular directions on both sides, while the weight does train."""
    from transformers import AutoModelForCausalLM

    base = tiny_model_path("qwen2", 0)
    train(
        online_config(
            prompts,
            tmp_path,
            osft_constraint=True,
            unfreeze_rank_ratio=0.25,
            max_steps=3,
            save_final_model=True,
        )
    )
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    original = AutoModelForCausalLM.from_pretrained(base).state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        w0, w1 = original[name].double(), tuned[name].double()
        u, _s, vh = torch.linalg.svd(w0, full_matrices=False)
        k = math.floor(min(w0.shape) * 0.75)
        delta = w1 - w0
        assert delta.abs().max() > 1e-4, f"{name} trained"
        assert (u[:, :k].T @ delta).abs().max() < 1e-4 and (delta @ vh[:k].T).abs().max() < 1e-4, name


def resume_options(**extra: object) -> dict[str, object]:
    """The options of the resume tests: a checkpoint every 2 steps (all kept), an adaptive KL coefficient
    (so its controller's state must come back) and a cosine schedule; ``extra`` added or replacing."""
    return {
        "checkpoint_every_steps": 2,
        "keep_checkpoints": 5,
        "kl_coef": 0.05,
        "kl_target": 0.01,
        "kl_horizon": 64,
        "lr_scheduler": "cosine",
        **extra,
    }


def test_resume_continues_exactly(prompts, tmp_path):
    """Killed after step 4 and resumed: the same prompts, the same samples (the sampling generator is seeded
    by step and rank), the same adaptive KL coefficient, hence the same rewards and losses."""
    options = resume_options(max_steps=6, num_iterations=2)
    train(online_config(prompts, tmp_path, **options))
    first = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000006")
    train(online_config(prompts, tmp_path, resume=True, **options))
    resumed = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [r["step"] for r in first] == list(range(1, 7))
    for before, after in zip(first, resumed, strict=True):
        for key in ("reward", "loss", "kl", "kl_coef", "lr", "completion_length_mean"):
            assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-7), (key, before, after)
    assert len({r["kl_coef"] for r in first}) > 1  # the controller moved, and resumed where it was
    # Ziegler et al.'s controller on the KL per completion, its horizon in completions (16 per step)
    coef = 0.05
    for row in first:
        assert row["kl_coef"] == pytest.approx(coef, rel=1e-9)
        coef *= 1 + min(max(row["kl_per_completion"] / 0.01 - 1, -0.2), 0.2) * 16 / 64


def test_a_step_whose_completions_are_all_masked_learns_nothing_and_does_not_fail(prompts, tmp_path):
    """Every completion truncated and masked: micro-batches without a loss token still run backward (so
    DDP/FSDP2 would still reduce), the loss is 0 and the weights do not move."""
    from safetensors.torch import load_file

    config = online_config(
        prompts,
        tmp_path,
        mask_truncated_completions=True,
        max_new_tokens=2,
        max_steps=2,
        save_final_model=True,
    )
    train(config)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["truncated_share"] == 1.0 and r["loss"] == 0.0 and r["loss_units"] == 0 for r in rows)
    before = load_file(tiny_model_path("qwen2", 0) / "model.safetensors")
    after = load_file(tmp_path / "final" / "model.safetensors")
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())


# --- bad input stops the run before any update ---------------------------------------------------------


def _problems(config: TrainingConfig) -> str:
    with pytest.raises(ConfigError) as caught:
        train(config)
    return str(caught.value)


def test_a_messages_row_in_the_prompt_data_is_named(prompts, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        prompts.read_text().splitlines()[0]
        + "\n"
        + json.dumps(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
        )
        + "\n"
    )
    message = _problems(online_config(prompts, tmp_path / "run", data_path=str(bad)))
    assert f"{bad}:2" in message and "'messages' row" in message and "'prompt'" in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_unimportable_reward_function_is_named(prompts, tmp_path):
    message = _problems(
        online_config(prompts, tmp_path, reward_functions=["no_such_module_for_rewards:score"])
    )
    assert "reward_functions" in message and "no_such_module_for_rewards" in message


def test_a_reward_function_that_raises_is_caught_by_the_preflight(prompts, tmp_path):
    reference = f"{prompts.parent / 'rewards_for_tests.py'}:raises"
    message = _problems(online_config(prompts, tmp_path, reward_functions=[reference]))
    assert "reward_functions" in message and "the scorer is down" in message
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_reward_function_of_the_wrong_length_stops_before_any_update(prompts, tmp_path):
    from kfp_components.rewards import RewardError

    reference = f"{prompts.parent / 'rewards_for_tests.py'}:wrong_length"
    with pytest.raises(RewardError, match=r"wrong_length.*(1 scores|length|16)"):
        train(online_config(prompts, tmp_path, reward_functions=[reference], checkpoint_every_steps=1))
    assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text()
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"num_generations": 1, "effective_batch_size": 4}, r"num_generations: grpo compares .* at least 2"),
        ({"effective_batch_size": 10}, r"effective_batch_size: 10 completions per step is not a multiple"),
        (
            {"reward_functions": []},
            r"reward_functions: grpo needs something to learn from: at least one reward function, or a reward "
            r"model \(reward_model_path\)",
        ),
        ({"temperature": 0.0}, r"temperature: must be positive"),
        (
            {"reward_weights": [1.0, 2.0]},
            r"reward_weights: 2 weight\(s\) for 1 reward function\(s\): give one weight for each",
        ),
        ({"effective_batch_size": 128}, r"effective_batch_size: .*fewer than one step needs"),
    ],
    ids=["one-generation", "not-a-multiple", "no-reward", "greedy", "weights", "too-few-prompts"],
)
def test_bad_options_are_errors_before_anything_loads(prompts, tmp_path, overrides, expected):
    with pytest.raises(ConfigError) as caught:
        train(online_config(prompts, tmp_path, **overrides))
    assert re.search(expected, str(caught.value)), caught.value
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "overrides"),
    [
        ("ddp", {"algorithm": "grpo", "scale_rewards": "batch", "kl_coef": 0.05}),
        ("fsdp", {"algorithm": "reinforce_pp", "kl_coef": 0.05, "kl_in": "reward", "num_iterations": 2}),
    ],
    ids=["ddp-grpo", "fsdp-reinforce_pp"],
)
def test_two_processes_match_one(prompts, tmp_path, strategy, overrides):
    """The same completions (each prompt's seed, not the rank, decides its samples), the same rewards,
    advantages normalised over the whole step, and the same update: two gloo processes and one agree."""
    import yaml
    from safetensors.torch import load_file
    from test_trainer_loop import torchrun_two_processes

    common = dict(max_steps=3, save_final_model=True, learning_rate=1e-3, **overrides)
    train(online_config(prompts, tmp_path / "one", **common))
    two = online_config(prompts, tmp_path / "two", distributed=strategy, **common)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(dict(two.__dict__)))
    torchrun_two_processes(run_yaml)
    single = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    double = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(single) == len(double) == 3
    for a, b in zip(single, double, strict=True):
        for key in ("reward", "reward_std", "completion_length_mean", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    w1 = load_file(tmp_path / "one" / "final" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "final" / "model.safetensors")
    # Adam moves an element by about lr whatever its gradient's size, so where the gradient is round-off
    # noise (output rows of tokens the step never sampled) the runs may differ by up to 2 lr per step; every
    # element with a real gradient agrees closely.
    # (k_proj's bias, say, has no effect on attention, so its gradient is nothing but round-off).
    bound = 2 * two.learning_rate * two.max_steps
    differences = torch.cat([(w2[name] - tensor).abs().flatten() for name, tensor in w1.items()])
    assert differences.max() <= bound
    assert (differences > 1e-6).float().mean() < 0.002


@pytest.mark.parametrize("lora_r", [0, 4], ids=["reference-model", "lora-adapter-off"])
def test_the_reference_is_the_starting_model(prompts, tmp_path, lora_r):
    """KL against the reference is exactly 0 on the first step (the policy is the reference: a separate copy
    of the starting model, or the LoRA policy with its adapter disabled) and grows as the policy learns."""
    train(online_config(prompts, tmp_path, kl_coef=0.1, lora_r=lora_r, max_steps=4, learning_rate=2e-2))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["kl"] > 1e-4 and rows[-1]["kl_coef"] == 0.1


@pytest.mark.usefixtures("fake_vllm")
def test_vllm_rollouts_are_wired_into_the_step(prompts, tmp_path):
    """With rollout_backend vllm, the step sends its prompts' token ids with one seed each to the engine, learns
    from what the engine returns, and loads the updated weights into the engine after every update (and once
    at the start, for a resumed policy). The engine is the stand-in of tests/test_trainer_rollout.py, checked
    against vLLM's documented API; vLLM itself cannot run here."""
    FakeLLM.instances.clear()
    config = online_config(prompts, tmp_path, rollout_backend="vllm", max_steps=2, num_iterations=2)
    train(config)
    (engine,) = FakeLLM.instances
    assert engine.kwargs["model"] == config.model_name_or_path
    assert engine.kwargs["max_model_len"] == config.max_seq_len
    assert len(engine.calls) == 2  # one generate call per step
    sent, params = engine.calls[0]
    assert len(sent) == config.effective_batch_size // config.num_generations
    assert all(p.n == config.num_generations and p.max_tokens == config.max_new_tokens for p in params)
    assert len({p.seed for p in params}) == len(params)  # each prompt its own seed
    names = {name for name, _ in engine.loaded}
    assert "lm_head.weight" in names
    loads = sum(1 for name, _ in engine.loaded if name == "lm_head.weight")
    assert loads == 1 + 2 * 2  # at the start, then after each of 2 updates of 2 steps
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["truncated_share"] == pytest.approx(0.25)
