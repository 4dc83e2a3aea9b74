"""The value algorithms' math against hand-computed values: shaped scores, token rewards with the KL
penalty, GAE within each completion of a packed row, the clipped policy and value losses, whitening, and
A2C's gradient."""

from __future__ import annotations

import math

import pytest
import torch

from kfp_components.trainer import policy_gradient as pg


def test_shape_scores_penalises_missing_eos_then_clips():
    scores = torch.tensor([2.0, 0.5, math.nan, -3.0], dtype=torch.float64)
    truncated = torch.tensor([True, False, True, True])
    shaped = pg.shape_scores(scores, truncated, missing_eos_penalty=1.0, reward_clip=1.5)
    assert shaped[0] == 1.0  # 2 - 1
    assert shaped[1] == 0.5
    assert math.isnan(shaped[2])  # no score stays no score
    assert shaped[3] == -1.5  # -3 - 1 = -4, clipped
    assert torch.equal(pg.shape_scores(scores[:2], truncated[:2]), scores[:2])


def test_token_rewards_put_the_score_on_the_last_token_and_the_kl_on_every_token():
    # a packed row: prompt (-1), completion 0 (3 tokens), the sample's last token (-1), completion 1 (2)
    ids = torch.tensor([-1, 0, 0, 0, -1, -1, 1, 1, -1])
    logps = torch.tensor([0.0, -1.0, -0.5, -2.0, 0.0, 0.0, -0.1, -0.3, 0.0])
    ref = torch.tensor([0.0, -1.5, -0.5, -1.0, 0.0, 0.0, -0.2, -0.1, 0.0])
    d = logps - ref
    k1 = pg.kl_per_token(logps, ref, "k1")
    k3 = pg.kl_per_token(logps, ref, "k3")
    assert torch.allclose(k1, d)
    assert torch.allclose(k3, torch.exp(-d) + d - 1)
    assert float(k3[3]) == pytest.approx(math.exp(1.0) - 1.0 - 1.0)  # d = -1
    scores = torch.tensor([1.0, -2.0], dtype=torch.float64)
    rewards = pg.reinforce_pp_token_rewards(scores, ids, k1.double(), 0.1)
    expected = [0, -0.1 * 0.5, 0, -0.1 * -1.0 + 1.0, 0, 0, -0.1 * 0.1, -0.1 * -0.2 - 2.0, 0]
    assert torch.allclose(rewards, torch.tensor(expected, dtype=torch.float64))


def _gae_by_hand(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    advantages = [0.0] * len(rewards)
    running = 0.0
    for t in reversed(range(len(rewards))):
        following = values[t + 1] if t + 1 < len(values) else 0.0
        delta = rewards[t] + gamma * following - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages


def test_gae_runs_within_each_completion_of_a_packed_row():
    ids = torch.tensor([-1, 3, 3, 3, -1, -1, 0, 0, -1, 7])
    rewards = torch.tensor([9.0, 0.1, -0.2, 1.0, 9.0, 9.0, 0.3, 2.0, 9.0, -1.0])
    values = torch.tensor([5.0, 0.5, 0.4, 0.8, 5.0, 5.0, -0.2, 1.5, 5.0, 0.25])
    advantages, returns = pg.gae_advantages(rewards, values, ids, gamma=0.9, lam=0.8)
    for completion in (3, 0, 7):
        mask = ids == completion
        expected = _gae_by_hand(rewards[mask].tolist(), values[mask].tolist(), 0.9, 0.8)
        assert advantages[mask].tolist() == pytest.approx(expected, abs=1e-12)
        assert returns[mask].tolist() == pytest.approx(
            [a + v for a, v in zip(expected, values[mask].tolist(), strict=True)], abs=1e-6
        )
    assert torch.all(advantages[ids < 0] == 0) and torch.all(returns[ids < 0] == 0)
    # gamma = lambda = 1: the advantage is the return-to-go minus the value
    advantages, _ = pg.gae_advantages(rewards, values, ids, gamma=1.0, lam=1.0)
    to_go = pg.reverse_cumsum_per_sequence(rewards.double(), ids)
    assert torch.allclose(advantages, torch.where(ids >= 0, to_go - values.double(), 0.0))


def test_clipped_value_loss_by_hand():
    ids = torch.tensor([0, 0, 1, -1])
    old = torch.tensor([1.0, 0.0, 2.0, 0.0])
    new = torch.tensor([1.5, -0.1, 1.0, 7.0], requires_grad=True)
    returns = torch.tensor([2.0, 0.0, 1.0, 0.0])
    loss, sums = pg.value_loss(new, old, returns, ids, value_clip=0.2, normaliser=3.0)
    # token 0: unclipped (1.5-2)^2 = .25, clipped V = 1.2: (1.2-2)^2 = .64 -> .64 (clipped term larger)
    # token 1: (-.1)^2 = .01, clipped V = -.1 (within): .01
    # token 2: (1-1)^2 = 0, clipped V = 1.8: .64 -> .64 (clipped larger)
    assert float(loss.detach()) == pytest.approx(0.5 * (0.64 + 0.01 + 0.64) / 3)
    assert float(sums["value_clipped"]) == 2 and float(sums["value_tokens"]) == 3
    loss.backward()
    # the clipped term has no gradient where the clip is active: only token 1 moves
    assert new.grad.tolist() == pytest.approx([0.0, 0.5 * 2 * -0.1 / 3, 0.0, 0.0])
    unclipped, sums = pg.value_loss(new.detach(), old, returns, ids, value_clip=0.0, normaliser=3.0)
    assert float(unclipped) == pytest.approx(0.5 * (0.25 + 0.01 + 0.0) / 3)
    assert float(sums["value_clipped"]) == 0


def test_clipped_policy_loss_by_hand():
    ids = torch.tensor([0, 0, 1])
    old = torch.tensor([-1.0, -1.0, -1.0])
    logps = torch.tensor([-1.0 + math.log(1.5), -1.0 + math.log(0.7), -1.0 + math.log(0.5)])
    advantages = torch.tensor([1.0, -1.0, -2.0])
    loss, sums = pg.policy_loss(
        logps, old, advantages, ids, normaliser=3.0, epsilon_low=0.2, epsilon_high=0.2
    )
    # -min(r A, clip(r) A): 1.5 -> -min(1.5, 1.2) = -1.2; 0.7 with A=-1 -> -min(-.7, -.8) = .8;
    # 0.5 with A=-2 -> -min(-1, -1.6) = 1.6
    assert float(loss) == pytest.approx((-1.2 + 0.8 + 1.6) / 3)
    assert float(sums["clipped_high"]) == 1 and float(sums["clipped_low"]) == 2


def test_whitening_and_reward_scaling():
    values = torch.tensor([1.0, 2.0, 3.0, 100.0, 6.0], dtype=torch.float64)
    mask = torch.tensor([True, True, True, False, True])
    kept = values[mask]
    mean, std = kept.mean(), kept.std(unbiased=False)
    whitened = pg.whiten(values, mask)
    assert torch.allclose(whitened[mask], (kept - mean) / std) and whitened[3] == 0
    scaled = pg.whiten(values, mask, shift_mean=False)
    assert torch.allclose(scaled[mask], (kept - mean) / std + mean)


def test_explained_variance():
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = torch.ones(4, dtype=torch.bool)
    assert pg.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert pg.explained_variance(torch.full((4,), 2.5), returns, mask) == pytest.approx(0.0)
    values = torch.tensor([1.5, 1.5, 3.5, 3.5])
    expected = 1 - torch.var(returns - values, unbiased=False) / torch.var(returns, unbiased=False)
    assert pg.explained_variance(values, returns, mask) == pytest.approx(float(expected))


def test_differentiable_entropy_matches_the_detached_one_and_has_the_right_gradient():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, requires_grad=True)
    targets = torch.tensor([1, -100, 3, 0, 6])
    _, detached = pg.token_logps_and_entropy(logits, targets, temperature=0.7)
    _, entropy = pg.token_logps_and_entropy(logits, targets, temperature=0.7, entropy_grad=True)
    assert entropy is not None and detached is not None and not detached.requires_grad
    assert torch.allclose(entropy, detached, atol=1e-6)
    entropy.sum().backward()
    reference = logits.detach().clone().requires_grad_(True)
    p = torch.softmax(reference / 0.7, -1)
    h = -(p * torch.log_softmax(reference / 0.7, -1)).sum(-1)
    (h * (targets != -100)).sum().backward()
    assert torch.allclose(logits.grad, reference.grad, atol=1e-5)
