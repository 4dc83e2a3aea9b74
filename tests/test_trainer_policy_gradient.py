"""The policy-gradient math of the online engine against hand-computed values and independent naive loops:
GRPO / RLOO / REINFORCE++ advantages (with None rewards), the KL estimators against the exact KL from full
logits, the KL controller and its resume, the clipped loss and its aggregations, the first-iteration
equivalence with REINFORCE, the split over ranks (in one process, and over two real gloo processes for the
statistics that span ranks), and the log-prob/entropy helper's results and memory."""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kfp_components.trainer.batching import collate
from kfp_components.trainer.policy_gradient import (
    METRIC_NAMES,
    KLController,
    group_advantages,
    kl_per_token,
    loss_normaliser,
    masked_moments,
    packed_sequence_ids,
    per_token,
    policy_loss,
    reinforce_pp_advantages,
    reinforce_pp_token_rewards,
    reverse_cumsum_per_sequence,
    rloo_advantages,
    token_logps_and_entropy,
    whiten,
)

ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")


def tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(actual: torch.Tensor, expected: list[float], tol: float = 1e-9) -> None:
    assert actual.tolist() == pytest.approx(expected, abs=tol)


# --------------------------------------------------------------------------------------------------------
# Independent naive references (plain Python, one completion at a time)
# --------------------------------------------------------------------------------------------------------


def naive_grpo(rewards: list[float], group: int, scale: str, eps: float = 1e-4) -> list[float]:
    scored_all = [r for r in rewards if not math.isnan(r)]
    batch_std = statistics.stdev(scored_all) if len(scored_all) > 1 else 0.0
    out = []
    for start in range(0, len(rewards), group):
        members = rewards[start : start + group]
        scored = [r for r in members if not math.isnan(r)]
        mean = sum(scored) / len(scored) if scored else 0.0
        std = {"group": statistics.stdev(scored) if len(scored) > 1 else 0.0, "batch": batch_std}.get(scale)
        for r in members:
            if math.isnan(r):
                out.append(0.0)
            elif std is None:
                out.append(r - mean)
            else:
                out.append((r - mean) / (std + eps))
    return out


def naive_rloo(rewards: list[float], group: int) -> list[float]:
    out = []
    for start in range(0, len(rewards), group):
        members = rewards[start : start + group]
        for i, r in enumerate(members):
            others = [o for j, o in enumerate(members) if j != i and not math.isnan(o)]
            out.append(0.0 if math.isnan(r) or not others else r - sum(others) / len(others))
    return out


def naive_reinforce_pp(
    rewards: list[float], sequence_ids: list[int], kl: list[float], kl_coef: float, eps: float = 1e-8
) -> list[float]:
    returns = [0.0] * len(sequence_ids)
    for sequence in set(sequence_ids) - {-1}:
        if math.isnan(rewards[sequence]):
            continue
        tokens = [t for t, s in enumerate(sequence_ids) if s == sequence]
        running = 0.0
        for t in reversed(tokens):
            reward = -kl_coef * kl[t] + (rewards[sequence] if t == tokens[-1] else 0.0)
            running += reward
            returns[t] = running
    kept = [t for t, s in enumerate(sequence_ids) if s >= 0 and not math.isnan(rewards[s])]
    mean = sum(returns[t] for t in kept) / len(kept)
    variance = sum((returns[t] - mean) ** 2 for t in kept) / len(kept)
    return [
        (returns[t] - mean) / math.sqrt(max(variance, eps)) if t in kept else 0.0 for t in range(len(returns))
    ]


def naive_policy_loss(
    logps: list[float],
    old: list[float],
    adv: list[float],
    seq: list[int],
    *,
    ratio_level: str,
    el: float,
    eh: float,
    aggregation: str,
    normaliser: float,
    ref: list[float] | None = None,
    kl_coef: float = 0.0,
) -> float:
    sequences = sorted(set(seq) - {-1})
    tokens_of = {s: [t for t, x in enumerate(seq) if x == s] for s in sequences}
    total = 0.0
    for s in sequences:
        tokens = tokens_of[s]
        sequence_ratio = math.exp(sum(logps[t] - old[t] for t in tokens) / len(tokens))
        losses = []
        for t in tokens:
            r = sequence_ratio if ratio_level == "sequence" else math.exp(logps[t] - old[t])
            loss = -min(r * adv[t], min(max(r, 1 - el), 1 + eh) * adv[t])
            if ref is not None:
                loss += kl_coef * (math.exp(ref[t] - logps[t]) - (ref[t] - logps[t]) - 1)
            losses.append(loss)
        total += sum(losses) / len(losses) if aggregation == "sequence" else sum(losses)
    return total / normaliser


# --------------------------------------------------------------------------------------------------------
# GRPO advantages
# --------------------------------------------------------------------------------------------------------


def test_grpo_group_advantages_by_hand():
    # group 1: mean 0.5, sample std sqrt(1/3); group 2: all equal, std 0 -> advantage 0
    advantages = group_advantages(tensor([1, 0, 0, 1, 2, 2, 2, 2]), 4, "group")
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    close(advantages, [a, -a, -a, a, 0, 0, 0, 0])


def test_grpo_none_rewards_are_left_out_of_the_group_and_get_zero():
    # scored 1, 3, 5: mean 3, sample std 2
    close(group_advantages(tensor([1, NAN, 3, 5]), 4, "group"), [-2 / 2.0001, 0, 0, 2 / 2.0001])
    close(group_advantages(tensor([1, NAN, 3, 5]), 4, "none"), [-2, 0, 0, 2])
    # a group with one scored member, and a group with none: zeros, never NaN
    close(group_advantages(tensor([NAN, 7, NAN, NAN, NAN, NAN]), 3, "group"), [0] * 6)
    close(group_advantages(tensor([NAN, 7, NAN, NAN, NAN, NAN]), 3, "batch"), [0] * 6)


def test_grpo_batch_scaling_divides_by_the_std_of_the_whole_step():
    rewards = [1.0, 3.0, NAN, 10.0, 20.0, 30.0]
    # group means 2 and 20; batch sample std of {1, 3, 10, 20, 30}
    std = statistics.stdev([1, 3, 10, 20, 30])
    expected = [-1 / (std + 1e-4), 1 / (std + 1e-4), 0, -10 / (std + 1e-4), 0, 10 / (std + 1e-4)]
    close(group_advantages(tensor(rewards), 3, "batch"), expected)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_matches_a_naive_loop_on_random_rewards_with_none(scale):
    generator = torch.Generator().manual_seed(3)
    rewards = torch.randn(48, generator=generator, dtype=torch.float64)
    rewards[torch.rand(48, generator=generator) < 0.25] = NAN
    close(group_advantages(rewards, 6, scale), naive_grpo(rewards.tolist(), 6, scale))


def test_grpo_bad_input_is_named():
    with pytest.raises(ValueError, match=r"scale_rewards: 'std' is not one of group, batch, none"):
        group_advantages(tensor([1, 2]), 2, "std")
    with pytest.raises(ValueError, match="num_generations: 4 does not divide the 6 completions"):
        group_advantages(tensor([1, 2, 3, 4, 5, 6]), 4, "group")


# --------------------------------------------------------------------------------------------------------
# RLOO advantages
# --------------------------------------------------------------------------------------------------------


def test_rloo_by_hand_with_none():
    # scored 1, 2, 3: baselines 2.5, 2, 1.5; the None gets 0
    close(rloo_advantages(tensor([1, 2, 3, NAN]), 4), [-1.5, 0, 1.5, 0])
    # the only scored member of its group has no baseline: 0; a fully unscored group: 0
    close(rloo_advantages(tensor([NAN, 4, NAN, NAN, NAN, NAN]), 3), [0] * 6)
    close(rloo_advantages(tensor([5, 1]), 2), [4, -4])


def test_rloo_matches_a_naive_loop():
    generator = torch.Generator().manual_seed(4)
    rewards = torch.rand(40, generator=generator, dtype=torch.float64)
    rewards[torch.rand(40, generator=generator) < 0.3] = NAN
    close(rloo_advantages(rewards, 5), naive_rloo(rewards.tolist(), 5))


# --------------------------------------------------------------------------------------------------------
# REINFORCE++
# --------------------------------------------------------------------------------------------------------

# two completions in one packed row: prompt tokens and each sample's last token have no loss
SEQUENCE_IDS = [-1, -1, 0, 0, 0, -1, -1, 1, 1, -1]


def test_reinforce_pp_token_rewards_and_returns_by_hand():
    ids = torch.tensor(SEQUENCE_IDS)
    kl = tensor([9, 9, 0.1, 0.2, 0.3, 9, 9, -0.5, 0.4, 9])
    token_rewards = reinforce_pp_token_rewards(tensor([1.0, 2.0]), ids, kl, kl_coef=0.5)
    close(token_rewards, [0, 0, -0.05, -0.1, 1 - 0.15, 0, 0, 0.25, 2 - 0.2, 0])
    returns = reverse_cumsum_per_sequence(token_rewards, ids)
    close(returns, [0, 0, 0.7, 0.75, 0.85, 0, 0, 2.05, 1.8, 0])


def test_reinforce_pp_whitened_advantages_by_hand():
    ids = torch.tensor(SEQUENCE_IDS)
    kl = tensor([9, 9, 0.1, 0.2, 0.3, 9, 9, -0.5, 0.4, 9])
    returns = [0.7, 0.75, 0.85, 2.05, 1.8]
    mean = sum(returns) / 5
    std = math.sqrt(sum((r - mean) ** 2 for r in returns) / 5)
    expected = [
        0,
        0,
        *((r - mean) / std for r in returns[:3]),
        0,
        0,
        *((r - mean) / std for r in returns[3:]),
        0,
    ]
    close(reinforce_pp_advantages(tensor([1.0, 2.0]), ids, kl=kl, kl_coef=0.5), expected)


def test_reinforce_pp_none_reward_gets_zero_and_stays_out_of_the_whitening():
    ids = torch.tensor([*SEQUENCE_IDS, 2, 2, -1])
    kl = tensor([0.0] * 13)
    advantages = reinforce_pp_advantages(tensor([1.0, NAN, 3.0]), ids, kl=kl, kl_coef=0.1)
    # left: completion 0 (returns 1, 1, 1) and completion 2 (returns 3, 3): mean 1.8, population std 0.98
    mean, std = 1.8, math.sqrt((3 * 0.8**2 + 2 * 1.2**2) / 5)
    close(advantages, [0, 0, *[(1 - mean) / std] * 3, 0, 0, 0, 0, 0, *[(3 - mean) / std] * 2, 0])


def test_reinforce_pp_group_baseline_subtracts_the_scored_group_mean_first():
    ids = torch.tensor([0, 0, -1, 1, -1, 2, 2, 2, 3])
    rewards = tensor([1, 3, 5, NAN])  # groups of 2: (1, 3) -> -1, 1; (5, None) -> 0, None
    plain = reinforce_pp_advantages(tensor([-1, 1, 0, NAN]), ids)
    close(reinforce_pp_advantages(rewards, ids, baseline="group", group_size=2), plain.tolist())
    # returns -1, -1, 1, 0, 0, 0 (the None completion's token left out): mean -1/6
    assert plain[8] == 0 and plain[2] == 0 and plain[4] == 0


def test_reinforce_pp_matches_a_naive_loop():
    generator = torch.Generator().manual_seed(5)
    ids = []
    for sequence in range(12):
        ids += [-1] * int(torch.randint(1, 4, (1,), generator=generator)) + [sequence] * int(
            torch.randint(1, 7, (1,), generator=generator)
        )
    sequence_ids = torch.tensor([*ids, -1])
    kl = torch.randn(len(sequence_ids), generator=generator, dtype=torch.float64)
    rewards = torch.randn(12, generator=generator, dtype=torch.float64)
    rewards[[2, 7]] = NAN
    actual = reinforce_pp_advantages(rewards, sequence_ids, kl=kl, kl_coef=0.05)
    close(actual, naive_reinforce_pp(rewards.tolist(), sequence_ids.tolist(), kl.tolist(), 0.05), 1e-9)


def test_whitening_with_given_moments_equals_the_computed_ones():
    values, mask = tensor([1, 2, 3, 100]), torch.tensor([True, True, True, False])
    mean, variance = masked_moments(values, mask)
    assert (float(mean), float(variance)) == pytest.approx((2.0, 2 / 3))
    close(whiten(values, mask, mean=mean, variance=variance), whiten(values, mask).tolist())
    close(whiten(values, mask), [-1 / math.sqrt(2 / 3), 0, 1 / math.sqrt(2 / 3), 0])
    with pytest.raises(ValueError, match="both mean and variance"):
        whiten(values, mask, mean=1.0)


TWO_RANKS = """
import torch, torch.distributed as dist
from kfp_components.trainer.distributed import all_reduce_sum
from kfp_components.trainer.policy_gradient import group_advantages, reinforce_pp_advantages
dist.init_process_group("gloo")
rank = dist.get_rank()
g = torch.Generator().manual_seed(11)
rewards = torch.randn(12, generator=g, dtype=torch.float64); rewards[[1, 8]] = float("nan")
ids = torch.tensor([-1, 0, 0, 0, -1, 1, 1, -1, 2, -1, 3, 3, 3, 3, -1, 4, 4, -1, 5, 5])
kl = torch.randn(ids.numel(), generator=g, dtype=torch.float64)
whole_batch = group_advantages(rewards, 3, "batch")
whole_pp = reinforce_pp_advantages(rewards[:6], ids, kl=kl, kl_coef=0.1)
# rank 0 holds groups 0-1 and completions 0-2, rank 1 groups 2-3 and completions 3-5
mine = slice(0, 6) if rank == 0 else slice(6, 12)
split_batch = group_advantages(rewards[mine], 3, "batch", reduce=all_reduce_sum)
cut = 10
part = ids[:cut] if rank == 0 else ids[cut:]
pkl = kl[:cut] if rank == 0 else kl[cut:]
split_pp = reinforce_pp_advantages(rewards[:6], part, kl=pkl, kl_coef=0.1, reduce=all_reduce_sum)
ok_batch = torch.allclose(split_batch, whole_batch[mine], rtol=0, atol=1e-12)
ok_pp = torch.allclose(split_pp, whole_pp[:cut] if rank == 0 else whole_pp[cut:], rtol=0, atol=1e-12)
results = [None, None]
dist.all_gather_object(results, f"rank {rank} batch {ok_batch} whitening {ok_pp}")
if rank == 0:  # one writer: two processes printing at once may interleave their lines
    for line in results:
        print(line, flush=True)
dist.destroy_process_group()
"""


def test_two_gloo_ranks_get_the_one_process_batch_std_and_whitening(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run([*command, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("rank ")]
    assert lines == ["rank 0 batch True whitening True", "rank 1 batch True whitening True"]


# --------------------------------------------------------------------------------------------------------
# KL estimators and controller
# --------------------------------------------------------------------------------------------------------


def sampled_kl(ref_noise: float, samples: int = 200_000) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Exact per-position KL(p || q) from full logits, and per-position k1/k2/k3 over tokens sampled from p."""
    generator = torch.Generator().manual_seed(0)
    positions, vocab = 6, 12
    policy_logits = torch.randn(positions, vocab, generator=generator, dtype=torch.float64) * 2
    ref_logits = policy_logits + ref_noise * torch.randn(
        positions, vocab, generator=generator, dtype=torch.float64
    )
    logp, logq = policy_logits.log_softmax(-1), ref_logits.log_softmax(-1)
    exact = (logp.exp() * (logp - logq)).sum(-1)
    tokens = torch.multinomial(logp.exp(), samples, replacement=True, generator=generator)
    sampled_logp, sampled_logq = logp.gather(1, tokens), logq.gather(1, tokens)
    estimates = {name: kl_per_token(sampled_logp, sampled_logq, name) for name in ("k1", "k2", "k3")}
    return exact, estimates


def test_k1_and_k3_are_unbiased_estimates_of_the_exact_kl():
    exact, estimates = sampled_kl(ref_noise=1.0)
    assert (exact > 0.05).all()
    for name in ("k1", "k3"):
        mean = estimates[name].mean(dim=1)
        standard_error = estimates[name].std(dim=1) / math.sqrt(estimates[name].shape[1])
        # 4.5 standard errors: a false failure once in ~150000 positions; the estimate is off by < 1%
        assert ((mean - exact).abs() < 4.5 * standard_error).all(), (name, mean, exact, standard_error)
    assert (estimates["k3"] >= 0).all()  # k3 never goes negative; k1 does
    assert (estimates["k1"] < 0).any()


def test_k2_is_biased_but_close_to_the_kl_for_close_distributions():
    exact, estimates = sampled_kl(ref_noise=1.0)
    far_bias = (estimates["k2"].mean(dim=1) - exact).abs() / exact
    assert far_bias.max() > 0.1  # a real bias when the distributions differ
    exact, estimates = sampled_kl(ref_noise=0.05)
    mean = estimates["k2"].mean(dim=1)
    standard_error = estimates["k2"].std(dim=1) / math.sqrt(estimates["k2"].shape[1])
    # second-order agreement: within 5% of the KL (plus sampling noise) when the policies are close
    assert ((mean - exact).abs() < 0.05 * exact + 4.5 * standard_error).all(), (mean, exact)


def test_kl_estimators_by_hand_and_bad_name():
    logps, ref = tensor([-1.0, -2.0]), tensor([-1.5, -1.0])
    close(kl_per_token(logps, ref, "k1"), [0.5, -1.0])
    close(kl_per_token(logps, ref, "k2"), [0.125, 0.5])
    close(kl_per_token(logps, ref, "k3"), [math.exp(-0.5) + 0.5 - 1, math.exp(1) - 1 - 1])
    with pytest.raises(ValueError, match="kl estimator: 'k4' is not one of k1, k2, k3"):
        kl_per_token(logps, ref, "k4")


def test_kl_controller_fixed_and_adaptive_by_hand():
    fixed = KLController(0.05)
    assert fixed.update(100.0, 64) == 0.05 and not fixed.adaptive
    adaptive = KLController(0.1, target=6.0, horizon=10000)
    assert adaptive.update(12.0, 256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))  # error clipped to 0.2
    coef = adaptive.coef
    assert adaptive.update(6.6, 100) == pytest.approx(coef * (1 + 0.1 * 100 / 10000))  # error 0.1
    coef = adaptive.coef
    assert adaptive.update(0.0, 100) == pytest.approx(coef * (1 - 0.2 * 100 / 10000))  # clipped to -0.2


def test_kl_controller_resumes_exactly():
    observed = [3.0, 9.0, 7.5, 1.0, 6.1, 12.0, 5.9, 0.3, 6.0, 8.8]
    uninterrupted = KLController(0.2, target=6.0, horizon=500)
    for kl in observed:
        uninterrupted.update(kl, 32)
    first = KLController(0.2, target=6.0, horizon=500)
    for kl in observed[:5]:
        first.update(kl, 32)
    state = first.state_dict()
    resumed = KLController(0.2, target=6.0, horizon=500)
    resumed.load_state_dict(state)
    for kl in observed[5:]:
        resumed.update(kl, 32)
    assert resumed.coef == uninterrupted.coef  # bit for bit
    with pytest.raises(ValueError, match=r"target 6.0 in the checkpoint, 3.0 configured"):
        KLController(0.2, target=3.0, horizon=500).load_state_dict(state)


def test_kl_controller_rejects_bad_settings():
    with pytest.raises(ValueError, match="kl_coef"):
        KLController(-1.0)
    with pytest.raises(ValueError, match="kl_horizon"):
        KLController(0.1, target=1.0, horizon=0)
    with pytest.raises(ValueError, match="not finite"):
        KLController(0.1, target=1.0).update(float("nan"), 1)


# --------------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------------


def loss_inputs(seed: int = 7, sequences: int = 6) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for sequence in range(sequences):
        ids += [-1] * 2 + [sequence] * int(torch.randint(1, 6, (1,), generator=generator)) + [-1]
    sequence_ids = torch.tensor(ids)
    count = len(ids)
    logps = (-torch.rand(count, generator=generator, dtype=torch.float64) * 3).requires_grad_()
    old = logps.detach() + 0.4 * torch.randn(count, generator=generator, dtype=torch.float64)
    ref = logps.detach() + 0.3 * torch.randn(count, generator=generator, dtype=torch.float64)
    advantages = per_token(torch.randn(sequences, generator=generator, dtype=torch.float64), sequence_ids)
    return {"logps": logps, "old": old, "ref": ref, "advantages": advantages, "sequence_ids": sequence_ids}


def test_policy_loss_by_hand():
    # one completion of two tokens and one of one token; advantages 2 and -1; epsilon 0.2
    logps = tensor([0.0, math.log(1.5), math.log(0.9), math.log(0.5)])
    old = tensor([0.0, 0.0, 0.0, 0.0])
    ids = torch.tensor([-1, 0, 0, 1])
    advantages = per_token(tensor([2.0, -1.0]), ids)
    loss, sums = policy_loss(logps, old, advantages, ids, aggregation="token", normaliser=3.0)
    # token 1: ratio 1.5 clipped to 1.2 -> -2.4; token 2: ratio 0.9 -> -1.8; token 3: ratio 0.5, A<0 -> 0.8*1
    assert float(loss.detach()) == pytest.approx((-2.4 - 1.8 + 0.8) / 3)
    assert {k: float(v) for k, v in sums.items()} == pytest.approx(
        {
            "tokens": 3,
            "completions": 2,
            "clipped_low": 1,
            "clipped_high": 1,
            "ratio": 2.9,
            "kl": 0,
            "entropy": 0,
        }
    )
    assert tuple(sums) == METRIC_NAMES
    loss, _ = policy_loss(logps, old, advantages, ids, aggregation="sequence", normaliser=2.0)
    assert float(loss.detach()) == pytest.approx(((-2.4 - 1.8) / 2 + 0.8) / 2)
    loss, _ = policy_loss(logps, old, advantages, ids, aggregation="dr_grpo", normaliser=8.0)
    assert float(loss.detach()) == pytest.approx((-2.4 - 1.8 + 0.8) / 8)
    # sequence ratio: completion 0's geometric mean sqrt(1.5 * 0.9) = 1.1619 (inside the clip range)
    loss, _ = policy_loss(logps, old, advantages, ids, ratio_level="sequence", normaliser=3.0)
    assert float(loss.detach()) == pytest.approx((-2 * 2 * math.sqrt(1.35) + 0.8) / 3)


@pytest.mark.parametrize("aggregation", ["token", "sequence", "dr_grpo"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_policy_loss_matches_a_naive_loop(aggregation, ratio_level):
    x = loss_inputs()
    normaliser = 17.0
    loss, sums = policy_loss(
        x["logps"], x["old"], x["advantages"], x["sequence_ids"], ratio_level=ratio_level,
        epsilon_low=0.2, epsilon_high=0.28, aggregation=aggregation, normaliser=normaliser,
        ref_logps=x["ref"], kl_coef=0.04,
    )  # fmt: skip
    expected = naive_policy_loss(
        x["logps"].tolist(), x["old"].tolist(), x["advantages"].tolist(), x["sequence_ids"].tolist(),
        ratio_level=ratio_level, el=0.2, eh=0.28, aggregation=aggregation, normaliser=normaliser,
        ref=x["ref"].tolist(), kl_coef=0.04,
    )  # fmt: skip
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12)
    assert float(sums["clipped_low"] + sums["clipped_high"]) > 0  # the clip is exercised


@pytest.mark.parametrize("aggregation", ["token", "sequence", "dr_grpo"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_two_ranks_losses_and_metric_sums_add_up_to_the_one_batch_values(aggregation, ratio_level):
    x = loss_inputs(seed=9, sequences=8)
    ids = x["sequence_ids"]
    normaliser = loss_normaliser(
        aggregation, completion_tokens=int((ids >= 0).sum()), completions=8, max_new_tokens=5
    )
    entropies = torch.rand(ids.numel(), dtype=torch.float64)

    def run(part: slice) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return policy_loss(
            x["logps"][part], x["old"][part], x["advantages"][part], ids[part], ratio_level=ratio_level,
            aggregation=aggregation, normaliser=normaliser, ref_logps=x["ref"][part], kl_coef=0.1,
            entropies=entropies[part],
        )  # fmt: skip

    cut = int(torch.nonzero(ids == 4)[0])  # completions 0-3 on "rank 0", 4-7 on "rank 1"
    whole, whole_sums = run(slice(None))
    rank0, sums0 = run(slice(0, cut))
    rank1, sums1 = run(slice(cut, None))
    assert float((rank0 + rank1).detach()) == pytest.approx(float(whole.detach()), rel=1e-12)
    for name in METRIC_NAMES:
        assert float(sums0[name] + sums1[name]) == pytest.approx(float(whole_sums[name]), rel=1e-12)
    # the gradients add up too
    (whole_grad,) = torch.autograd.grad(whole, x["logps"])
    (grad0,) = torch.autograd.grad(rank0, x["logps"])
    (grad1,) = torch.autograd.grad(rank1, x["logps"])
    torch.testing.assert_close(grad0 + grad1, whole_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_first_iteration_loss_is_minus_mean_advantage_and_gradient_is_reinforce(ratio_level):
    generator = torch.Generator().manual_seed(1)
    targets = torch.tensor([-100, -100, 3, 1, 4, -100, -100, 2, 0, -100])
    ids = torch.tensor([-1, -1, 0, 0, 0, -1, -1, 1, 1, -1])
    logits = torch.randn(10, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    logps, _ = token_logps_and_entropy(logits, targets, with_entropy=False)
    advantages = per_token(tensor([1.5, -0.7]), ids)
    tokens = int((ids >= 0).sum())
    loss, sums = policy_loss(
        logps, logps.detach(), advantages, ids, ratio_level=ratio_level, normaliser=float(tokens)
    )
    assert float(loss.detach()) == pytest.approx(-(1.5 * 3 - 0.7 * 2) / 5)  # -mean(A) over the tokens
    assert (
        float(sums["ratio"]) == pytest.approx(tokens)
        and float(sums["clipped_low"] + sums["clipped_high"]) == 0
    )
    (grad,) = torch.autograd.grad(loss, logits)
    logps_again, _ = token_logps_and_entropy(logits, targets, with_entropy=False)
    reinforce = -(advantages * logps_again).sum() / tokens
    (expected,) = torch.autograd.grad(reinforce, logits)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


def test_second_iteration_clips_and_stops_the_gradient_of_clipped_tokens():
    logps = tensor([math.log(1.5), math.log(1.1)]).requires_grad_()
    ids = torch.tensor([0, 0])
    loss, sums = policy_loss(logps, tensor([0.0, 0.0]), tensor([1.0, 1.0]), ids, normaliser=2.0)
    (grad,) = torch.autograd.grad(loss, logps)
    close(grad, [0.0, -1.1 / 2])  # the clipped token (1.5 > 1.2, A > 0) gets no gradient
    assert float(sums["clipped_high"]) == 1


def test_policy_loss_bad_input_is_named():
    ids = torch.tensor([0, 0])
    zeros = tensor([0.0, 0.0])
    with pytest.raises(ValueError, match="loss_aggregation: 'mean' is not one of token, sequence, dr_grpo"):
        policy_loss(zeros, zeros, zeros, ids, aggregation="mean", normaliser=1.0)
    with pytest.raises(ValueError, match="ratio_level: 'group'"):
        policy_loss(zeros, zeros, zeros, ids, ratio_level="group", normaliser=1.0)
    with pytest.raises(ValueError, match="normaliser"):
        policy_loss(zeros, zeros, zeros, ids, normaliser=0.0)
    with pytest.raises(ValueError, match="one shape"):
        policy_loss(zeros, tensor([0.0]), zeros, ids, normaliser=1.0)


def test_loss_normaliser():
    assert loss_normaliser("token", completion_tokens=120, completions=8) == 120
    assert loss_normaliser("sequence", completion_tokens=120, completions=8) == 8
    assert loss_normaliser("dr_grpo", completion_tokens=120, completions=8, max_new_tokens=32) == 256
    with pytest.raises(ValueError, match="dr_grpo needs max_new_tokens"):
        loss_normaliser("dr_grpo", completion_tokens=120, completions=8)


# --------------------------------------------------------------------------------------------------------
# Packed rows: sequence ids, log-probs and entropy
# --------------------------------------------------------------------------------------------------------


class Sample:
    def __init__(self, input_ids: list[int], labels: list[int]):
        self.input_ids, self.labels = input_ids, labels


def test_packed_sequence_ids_from_a_collated_micro_batch():
    # prompt tokens labelled -100; the completion's labels follow; completion indices 5 and 2 of the step
    samples = [Sample([1, 2, 3, 4], [-100, -100, 3, 4]), Sample([7, 8, 9], [-100, 8, 9])]
    batch = collate(samples, [0, 1])
    ids = packed_sequence_ids(batch.position_ids, batch.targets, [5, 2])
    assert ids.tolist() == [-1, 5, 5, -1, 2, 2, -1]
    with pytest.raises(ValueError, match="2 samples but 1 completion"):
        packed_sequence_ids(batch.position_ids, batch.targets, [5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logps_and_entropy_equal_the_full_log_softmax(dtype):
    generator = torch.Generator().manual_seed(2)
    logits = (torch.randn(1, 40, 50, generator=generator) * 3).to(dtype)
    targets = torch.randint(0, 50, (1, 40), generator=generator)
    targets[0, ::3] = -100
    logps, entropy = token_logps_and_entropy(logits, targets, temperature=0.7, chunk_tokens=7)
    assert entropy is not None
    full = (logits[0].float() / 0.7).log_softmax(-1)
    mask = targets[0] != -100
    expected_logps = torch.where(mask, full.gather(1, targets[0].clamp(min=0)[:, None])[:, 0], 0.0)
    expected_entropy = torch.where(mask, -(full.exp() * full).sum(-1), 0.0)
    torch.testing.assert_close(logps, expected_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, expected_entropy, rtol=1e-5, atol=1e-5)
    assert logps.dtype == torch.float32 and not entropy.requires_grad


class Float32Peak(TorchDispatchMode):
    """The most bytes of float32 tensors made by operations that are alive at once (inputs not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.peak = 0

    def _forget(self, key: int) -> None:
        self.live.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, tuple | list) else (out,):
            if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                key = value.untyped_storage().data_ptr()
                if key not in self.live:
                    self.live[key] = value.untyped_storage().nbytes()
                    weakref.finalize(value, self._forget, key)
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def float32_peak(function) -> int:  # type: ignore[no-untyped-def]
    mode = Float32Peak()
    with mode:
        function()
    return mode.peak


def test_token_logps_and_entropy_hold_one_float32_copy_of_the_rows_with_a_target_plus_a_few_chunks():
    tokens, vocab = 1024, 1000
    logits = torch.randn(tokens, vocab, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    targets[:224] = -100  # 800 tokens with a target

    def ours() -> None:
        logps, _ = token_logps_and_entropy(logits, targets, temperature=0.9, chunk_tokens=64)
        logps.sum().backward()

    def straightforward() -> None:  # what the helper avoids
        full = (logits.float() / 0.9).log_softmax(-1)
        entropy = -(full.exp() * full).sum(-1).detach()
        (full.gather(1, targets.clamp(min=0)[:, None]).sum() + entropy.sum() * 0).backward()

    one_copy = tokens * vocab * 4
    ours_peak, straightforward_peak = float32_peak(ours), float32_peak(straightforward)
    # the chunks kept for backward (800 rows) plus the backward's temporaries of one chunk (4 x 64 rows)
    assert ours_peak <= (800 + 4 * 64) * vocab * 4 + 64 * 1024, (ours_peak, one_copy)
    assert straightforward_peak >= 2 * one_copy


@pytest.mark.parametrize("aggregation", ["token", "sequence", "dr_grpo"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_a_micro_batch_without_loss_tokens_gives_zero_loss_and_zero_gradients(aggregation, ratio_level):
    logps = tensor([-1.0, -2.0]).requires_grad_()  # a dummy micro-batch keeps the collectives in step
    ids = torch.tensor([-1, -1])
    loss, sums = policy_loss(
        logps, logps.detach() - 1, tensor([1.0, 1.0]), ids, ratio_level=ratio_level, aggregation=aggregation,
        normaliser=4.0, ref_logps=tensor([0.0, 0.0]), kl_coef=0.1,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, logps)
    assert float(loss.detach()) == 0 and grad.tolist() == [0.0, 0.0]
    assert all(float(value) == 0 for value in sums.values())


def test_a_row_without_targets_gives_zero_log_probs_that_stay_in_the_graph():
    """A dummy micro-batch (or one whose completions are all masked) must still backpropagate: under DDP and
    FSDP2 every rank's backward takes part in the gradient reduction."""
    logits = torch.randn(3, 7, requires_grad=True)
    targets = torch.full((3,), -100)
    logps, entropy = token_logps_and_entropy(logits, targets, temperature=0.7)
    assert logps.tolist() == [0.0, 0.0, 0.0] and entropy is not None and entropy.tolist() == [0.0, 0.0, 0.0]
    logps.sum().backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad) == 0
