"""PPO and A2C train for real on a tiny model with a value model: the reward rises with a rule reward and with
a reward model trained in the same module from the bundled preference data, the value loss falls, early stop
on the approximate KL skips passes, A2C's update is the hand-computed A2C gradient, two processes match one,
a resume matches an uninterrupted run, and bad options stop the run before anything loads."""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from test_trainer_online import REWARDS, online_config, resume_options, rise
from test_trainer_reward_model import HELD_OUT, rm_config

from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.train import train
from kfp_components.typed_config import ConfigError


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """The prompts and rule rewards of test_trainer_online."""
    return write_prompts(tmp_path_factory.mktemp("value"))


def write_prompts(folder: Path) -> Path:
    """The prompts of test_trainer_online in ``folder``, with its rule rewards beside them."""
    path = folder / "prompts.jsonl"
    words = ["cat", "dog", "sun", "map", "tree", "bird", "lamp", "rain"]
    rows = [{"prompt": f"Say something about the {w}.", "answer": str(i)} for i, w in enumerate(words * 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "rewards_for_tests.py").write_text(textwrap.dedent(REWARDS), encoding="utf-8")
    return path


def value_config(prompts: Path, output_dir: Path, **overrides) -> TrainingConfig:
    options = dict(algorithm="ppo", learning_rate=5e-2, value_learning_rate=1e-2, max_steps=10)
    options.update(overrides)
    return online_config(prompts, output_dir, **options)


def rows_of(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        {"algorithm": "ppo", "num_iterations": 2, "num_mini_batches": 2, "kl_coef": 0.01},
        {"algorithm": "a2c", "kl_coef": 0.01, "kl_estimator": "k3", "max_steps": 14, "gae_lambda": 1.0},
    ],
    ids=["ppo", "a2c"],
)
def test_value_algorithms_raise_the_reward_and_the_value_loss_falls(prompts, tmp_path, overrides):
    summary = train(value_config(prompts, tmp_path, **overrides))
    rows = rows_of(tmp_path)
    rewards = [r["reward"] for r in rows]
    assert summary.steps == len(rows) == overrides.get("max_steps", 10)
    assert rise(rewards) > 0.1, rewards
    value_losses = [r["value_loss"] for r in rows]
    assert sum(value_losses[-3:]) < sum(value_losses[:3]), value_losses
    last = rows[-1]
    for key in (
        "value_loss",
        "value_clip_fraction",
        "explained_variance",
        "value_mean",
        "returns_mean",
        "advantages_std",
        "approx_kl",
        "entropy",
        "passes",
        "score_mean",
        "kl",
        "kl_coef",
    ):
        assert isinstance(last[key], int | float), key
    if overrides["algorithm"] == "ppo":
        assert last["passes"] == 2 and last["approx_kl"] > 0
        assert any(r["value_clip_fraction"] > 0 for r in rows)
    else:
        assert last["passes"] == 1 and last["value_clip_fraction"] == 0 and last["clip_fraction"] == 0


ARITHMETIC_PROMPTS = Path(__file__).resolve().parents[1] / "examples" / "arithmetic_prompts.jsonl"


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> Path:
    """A reward model trained by the engine (``algorithm: reward_model``) on the bundled arithmetic
    preferences: a bare number over a hedged answer in words. Six steps (held-out accuracy 1.0 on this
    tiny model) leave its scores graded rather than saturated: the untrained policy's token soup scores
    about -1.2, a bare number about +0.9, so the policy has a direction to learn (digits, short answers)."""
    output_dir = tmp_path_factory.mktemp("reward_model")
    summary = train(rm_config(output_dir, eval_data_path=str(HELD_OUT), eval_steps=6, max_steps=6))
    assert summary.eval_history[-1]["eval_accuracy"] > 0.9, summary.eval_history
    return output_dir / "final"


@pytest.mark.parametrize(
    "overrides",
    [
        {
            "algorithm": "ppo",
            "num_iterations": 2,
            "value_model_init": "reward_model",
            "value_learning_rate": 5e-2,
        },
        {"algorithm": "a2c", "learning_rate": 0.1, "value_learning_rate": 2e-2, "max_steps": 14},
    ],
    ids=["ppo-critic-from-reward-model", "a2c"],
)
def test_value_algorithms_raise_a_reward_model_score(reward_model, tmp_path, overrides):
    """The only reward is the reward model's score: its mean over the last three steps is more than 1 above
    that of the first three (over seeds 0-4: ppo 1.8-2.5, a2c 1.9-2.6, the first three steps' mean between
    -1.35 and -1.05, its seed-to-seed standard deviation under 0.1), and the value loss of the last three steps is under 0.75 x that of the
    first three (over seeds 0-4: at most 0.11 x for ppo, 0.52 x for a2c)."""
    config = value_config(
        ARITHMETIC_PROMPTS, tmp_path, reward_functions=[], reward_model_path=str(reward_model), **overrides
    )
    assert config.all_reward_functions == [{"function": "reward_model", "model": str(reward_model)}]
    summary = train(config)
    rows = rows_of(tmp_path)
    assert summary.steps == len(rows) == overrides.get("max_steps", 10)
    rewards = [r["reward"] for r in rows]
    assert sum(rewards[:3]) / 3 < -0.5, rewards  # the untrained policy's text reads as words to the RM
    assert rise(rewards) > 1.0, rewards
    value_losses = [r["value_loss"] for r in rows]
    assert sum(value_losses[-3:]) < 0.75 * sum(value_losses[:3]), value_losses
    assert all(r["passes"] == overrides.get("num_iterations", 1) for r in rows)


def test_trpo_raises_a_reward_model_score_within_its_trust_region(reward_model, tmp_path):
    """trpo learns from the same reward model alone: no learning rate for the policy, each step the
    natural-gradient step that keeps the mean KL per token within max_kl (0.1 here). Over 16 steps the
    reward model's mean over the last three steps is more than 0.5 above that of the first three (seeds
    0-3: 0.35, 0.93, 0.71 (seed 0), 1.16; the first three steps' mean varies by about 0.1 from seed to
    seed), every step stays within the trust region, and the value loss falls (last three under 0.75 x the
    first three; seeds 0-3: at most 0.49 x)."""
    config = value_config(
        ARITHMETIC_PROMPTS,
        tmp_path,
        reward_functions=[],
        reward_model_path=str(reward_model),
        algorithm="trpo",
        value_model_init="reward_model",
        value_learning_rate=5e-2,
        max_kl=0.1,
        max_steps=16,
        seed=1,
    )
    summary = train(config)
    rows = rows_of(tmp_path)
    assert summary.steps == len(rows) == 16
    rewards = [r["reward"] for r in rows]
    assert sum(rewards[:3]) / 3 < -0.5, rewards
    assert rise(rewards) > 0.5, rewards
    assert all(r["trpo_kl"] <= 0.1 for r in rows), [r["trpo_kl"] for r in rows]
    value_losses = [r["value_loss"] for r in rows]
    assert sum(value_losses[-3:]) < 0.75 * sum(value_losses[:3]), value_losses


@pytest.mark.parametrize(("early_stop_kl", "passes"), [(1e-9, 1), (1e9, 4), (0.0, 4)])
def test_early_stop_kl_skips_the_remaining_passes(prompts, tmp_path, early_stop_kl, passes):
    """Four passes of two mini-batches: the first pass's second mini-batch already sees a policy that moved,
    so a tiny early_stop_kl stops every step after its first pass (two updates), while a huge one or 0
    (off) runs all four."""
    summary = train(
        value_config(
            prompts,
            tmp_path,
            max_steps=2,
            num_iterations=4,
            num_mini_batches=2,
            learning_rate=1e-2,
            early_stop_kl=early_stop_kl,
        )
    )
    rows = rows_of(tmp_path)
    assert summary.steps == len(rows) == 2
    assert [r["passes"] for r in rows] == [passes, passes]
    assert all(r["approx_kl"] > 1e-9 for r in rows)


def test_a2c_update_is_the_hand_computed_a2c_gradient(prompts, tmp_path):
    """One A2C step: the policy's gradient equals -sum(A * grad log pi) / tokens (minus the entropy bonus's
    gradient), and the critic's equals vf_coef x the gradient of the unclipped value loss, both computed here
    by hand from the step's completions, advantages and returns."""
    from kfp_components.trainer import online

    captured: dict = {}
    original_learn = online.OnlineSteps.learn

    def learn(self, model, chunk):
        result = original_learn(self, model, chunk)
        captured["chunk"] = chunk
        captured["policy_grads"] = {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }
        captured["critic_grads"] = {
            n: p.grad.clone() for n, p in self.critic.module.named_parameters() if p.grad is not None
        }
        captured["steps"] = self
        captured["policy"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        captured["critic"] = {n: p.detach().clone() for n, p in self.critic.module.named_parameters()}
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(online.OnlineSteps, "learn", learn)
        train(value_config(prompts, tmp_path, algorithm="a2c", max_steps=1, entropy_coef=0.01, vf_coef=0.5))
    from transformers import AutoModelForCausalLM

    from kfp_components.trainer.value_model import load_value_model

    steps = captured["steps"]
    chunk = captured["chunk"]
    config = steps.config
    policy = AutoModelForCausalLM.from_pretrained(config.model_name_or_path, dtype=torch.float32)
    policy.load_state_dict(captured["policy"])
    critic = load_value_model(config, steps.info)
    critic.load_state_dict(captured["critic"])
    tokens = max(chunk.label_tokens, 1)
    policy_objective = torch.zeros(())
    critic_objective = torch.zeros(())
    for i, (batch, ids) in enumerate(chunk.batches):
        # use_cache=False, as the engine: with a cache transformers does not split a packed row into its samples
        out = policy(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
        logits = out.logits[0] / config.temperature
        mask = ids >= 0
        targets = batch.targets[0].clamp(min=0)
        logp = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
        entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
        advantages = chunk.tensors.advantages[i]
        policy_objective = (
            policy_objective
            + (-(advantages * logp)[mask].sum() - config.entropy_coef * entropy[mask].sum()) / tokens
        )
        values = critic(batch.input_ids, batch.position_ids)[0]
        returns = chunk.tensors.returns[i]
        critic_objective = critic_objective + 0.5 * ((values - returns)[mask] ** 2).sum() / tokens
    policy_objective.backward()
    (config.vf_coef * critic_objective).backward()
    for name, parameter in policy.named_parameters():
        if name in captured["policy_grads"]:
            assert torch.allclose(captured["policy_grads"][name], parameter.grad, atol=1e-6, rtol=1e-4), name
    for name, parameter in critic.named_parameters():
        assert torch.allclose(captured["critic_grads"][name], parameter.grad, atol=1e-6, rtol=1e-4), name
    assert any(g.abs().max() > 0 for g in captured["policy_grads"].values())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(prompts, tmp_path, strategy):
    """PPO with two passes of two mini-batches, KL in the reward: two gloo processes (DDP, FSDP2) and one
    make the same steps, value model included."""
    import yaml
    from test_trainer_loop import torchrun_two_processes

    common = dict(
        max_steps=2,
        learning_rate=1e-3,
        value_learning_rate=1e-3,
        num_iterations=2,
        num_mini_batches=2,
        kl_coef=0.05,
    )
    train(value_config(prompts, tmp_path / "one", **common))
    two = value_config(prompts, tmp_path / "two", distributed=strategy, **common)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(dict(two.__dict__)))
    torchrun_two_processes(run_yaml)
    single, double = rows_of(tmp_path / "one"), rows_of(tmp_path / "two")
    assert len(single) == len(double) == 2
    for a, b in zip(single, double, strict=True):
        for key in ("reward", "completion_length_mean", "kl", "value_mean", "returns_mean", "advantages_std"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        for key in ("loss", "value_loss", "approx_kl", "explained_variance"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), key
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
        assert b["value_grad_norm"] == pytest.approx(a["value_grad_norm"], rel=1e-3)


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(prompts, tmp_path):
    """Stopped after step 2 and resumed: the value model's weights and optimizer, the adaptive KL coefficient
    and the schedule come back, so every later step matches."""
    options = resume_options(max_steps=4, num_iterations=2)
    train(value_config(prompts, tmp_path, **options))
    first = rows_of(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000004")
    train(value_config(prompts, tmp_path, resume=True, **options))
    resumed = rows_of(tmp_path)
    assert [r["step"] for r in resumed] == [r["step"] for r in first] == [1, 2, 3, 4]
    for before, after in zip(first, resumed, strict=True):
        for key in ("reward", "loss", "kl", "kl_coef", "lr", "value_loss", "value_mean", "approx_kl"):
            assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-7), (key, before, after)
    assert len({r["kl_coef"] for r in first}) > 1


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"ppo_epochs": 0}, r"num_iterations: must be at least 1, got 0"),
        ({"algorithm": "a2c", "num_iterations": 2}, r"num_iterations: a2c makes one update .* must be 1"),
        ({"algorithm": "a2c", "num_mini_batches": 2}, r"num_mini_batches: a2c makes one update"),
        ({"value_model_init": "reward_model"}, r"value_model_init: reward_model needs reward_model_path"),
        ({"num_mini_batches": 3}, r"num_mini_batches: 3 mini-batches do not split effective_batch_size 16"),
        ({"gamma": 1.5}, r"gamma: must be in \[0, 1\], got 1.5"),
        ({"value_clip": -1.0}, r"value_clip: must not be negative"),
        ({"torch_dtype": "float16"}, r"torch_dtype: ppo trains a value model"),
        ({"kl_estimator": "k2"}, r"kl_estimator"),
        ({"value_model_init": "critic"}, r"value_model_init"),
    ],
    ids=[
        "ppo_epochs-0",
        "a2c-iterations",
        "a2c-mini-batches",
        "no-reward-model",
        "uneven-mini-batches",
        "gamma",
        "value-clip",
        "float16",
        "estimator",
        "init",
    ],
)
def test_bad_value_options_are_errors_before_anything_loads(prompts, tmp_path, overrides, expected):
    from kfp_components.typed_config import from_dict

    base = value_config(prompts, tmp_path).__dict__
    data = {k: v for k, v in base.items() if k not in ("num_iterations", "vf_coef", "entropy_coef", "kl_in")}
    with pytest.raises(ConfigError) as caught:
        from_dict(TrainingConfig, {**data, **overrides})
    assert re.search(expected, str(caught.value)), caught.value
    assert not (tmp_path / "metrics.jsonl").exists()


def test_per_algorithm_defaults(prompts, tmp_path):
    ppo = value_config(prompts, tmp_path)
    assert (ppo.num_iterations, ppo.kl_in, ppo.vf_coef, ppo.entropy_coef) == (4, "reward", 0.1, 0.0)
    a2c = value_config(prompts, tmp_path, algorithm="a2c")
    assert (a2c.num_iterations, a2c.kl_in, a2c.vf_coef, a2c.entropy_coef) == (1, "reward", 0.5, 0.01)
    grpo = online_config(prompts, tmp_path)
    assert (grpo.num_iterations, grpo.kl_in) == (1, "loss")
    from kfp_components.typed_config import from_dict

    data = {k: v for k, v in ppo.__dict__.items() if k not in ("num_iterations", "vf_coef", "entropy_coef")}
    assert from_dict(TrainingConfig, {**data, "ppo_epochs": 2}).num_iterations == 2
    assert from_dict(TrainingConfig, {**data, "num_ppo_epochs": 3}).num_iterations == 3
