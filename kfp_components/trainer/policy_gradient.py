"""Policy-gradient math of the online engine: advantages, KL estimators and control, the clipped loss.

Pure tensor functions on *packed rows*. A micro-batch of rollouts is one padding-free row of ``T`` tokens
(see ``batching``); every per-token tensor here has shape ``(T,)`` and comes with ``sequence_ids``, a
``(T,)`` long vector giving each token's completion index in the step (an index into the step's
per-completion tensors of shape ``(N,)``), or -1 for a token without loss (prompt tokens, the last token of
a sample, masked completions). :func:`packed_sequence_ids` builds it from a :class:`MicroBatch`.

Rewards are per completion, ``(N,)`` float, with NaN for "no score" (a reward function returned None): such
a completion is left out of every statistic (group mean and std, leave-one-out baseline, whitening) and gets
advantage 0.

Advantages
----------
* GRPO (:func:`group_advantages`): ``(r - group mean) / (std + eps)``, groups of ``num_generations``
  contiguous completions; ``scale_rewards`` picks the std: ``group`` (of the group), ``batch`` (of the whole
  step's rewards) or ``none`` (mean-centred only, Dr. GRPO). Stds are the sample std (Bessel-corrected), as
  in TRL's ``GRPOTrainer``; fewer than two scored rewards give std 0.
* RLOO (:func:`rloo_advantages`): ``r_i`` minus the mean of the *other* scored members of its group; a
  group with one scored member gives it 0.
* REINFORCE++ (:func:`reinforce_pp_advantages`): per-token rewards ``-kl_coef * k1`` on every completion
  token plus the completion's reward on its last token, returns as the reverse cumulative sum within each
  completion (gamma 1), then whitening over all completion tokens of the step (population mean and variance,
  ``(x - mean) * rsqrt(max(var, eps))`` as in OpenRLHF). The ``group`` baseline variant subtracts the group
  mean reward first.

The step statistics that span ranks (the batch std, the whitening moments) go through a ``reduce`` hook that
sums a tensor over the ranks (``distributed.all_reduce_sum``); with it, every rank gets the one-process
answer. Without it, the tensors given are taken to be the whole step.

KL against the reference
------------------------
:func:`kl_per_token`: with ``d = logp - ref_logp`` on tokens sampled from the policy, ``k1 = d`` (unbiased,
can be negative), ``k2 = d^2 / 2`` (biased, low variance) and ``k3 = exp(-d) + d - 1`` (unbiased and
non-negative; Schulman 2020). :class:`KLController` holds the coefficient: fixed, or adaptive with the
proportional controller of Ziegler et al. (2019).

The loss
--------
:func:`policy_loss`: ratio ``exp(logp - old_logp)`` per token, or per sequence (the geometric mean over the
sequence's tokens, GSPO style), PPO-clipped: ``-min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A)``,
plus ``kl_coef * k3`` per token when the KL is in the loss. Aggregations:

* ``token``: the sum over the tokens / the completion tokens of the step over all ranks;
* ``sequence``: each completion's token mean, summed / the completions of the step over all ranks;
* ``dr_grpo``: the sum over the tokens / (``max_new_tokens`` x the completions of the step over all ranks).

The divisor (:func:`loss_normaliser`) is global, so the per-rank, per-micro-batch losses *sum* to the loss
of the whole step in one process, whatever the packing or the number of ranks (a completion is never split
across micro-batches). Under DDP/FSDP, which average gradients over ranks, scale each rank's loss by the
world size, as ``batching`` does. The metrics come back as per-rank sums, to all-reduce and then divide.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from kfp_components.trainer.batching import IGNORE_INDEX

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "METRIC_NAMES",
    "RATIO_LEVELS",
    "REINFORCE_PP_BASELINES",
    "SCALE_REWARDS",
    "KLController",
    "Reduce",
    "explained_variance",
    "gae_advantages",
    "group_advantages",
    "kl_per_token",
    "loss_normaliser",
    "masked_moments",
    "packed_sequence_ids",
    "per_token",
    "policy_loss",
    "reinforce_pp_advantages",
    "reinforce_pp_token_rewards",
    "reverse_cumsum_per_sequence",
    "rloo_advantages",
    "shape_scores",
    "token_logps_and_entropy",
    "value_loss",
    "whiten",
]

Reduce = Callable[[Tensor], Tensor]
"""Sums a tensor over the ranks and returns the sum (``distributed.all_reduce_sum``)."""

SCALE_REWARDS = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
RATIO_LEVELS = ("token", "sequence")
AGGREGATIONS = ("token", "sequence", "dr_grpo")
REINFORCE_PP_BASELINES = ("none", "group")
METRIC_NAMES = ("tokens", "completions", "clipped_low", "clipped_high", "ratio", "kl", "entropy")
"""Keys of :func:`policy_loss`'s metric sums, in this order."""


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(allowed)}")


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"per-token tensors must have one shape (T,): {described}")
    if any(len(shape) != 1 for shape in shapes.values()):
        raise ValueError(f"per-token tensors must be 1-d (T,): {shapes}")


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-d (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"num_generations: {group_size} does not divide the {rewards.numel()} completions into whole groups"
        )
    return rewards.reshape(-1, group_size)


def _identity(values: Tensor) -> Tensor:
    return values


# --------------------------------------------------------------------------------------------------------
# Packed rows
# --------------------------------------------------------------------------------------------------------


def packed_sequence_ids(position_ids: Tensor, targets: Tensor, completion_indices: Sequence[int]) -> Tensor:
    """``(T,)`` completion index of every token of a packed row, -1 where ``targets`` is -100.

    ``position_ids`` and ``targets`` are a :class:`~kfp_components.trainer.batching.MicroBatch`'s (shape
    ``(1, T)`` or ``(T,)``); ``completion_indices[k]`` is the step's index of the row's k-th sample (for
    rollouts packed as samples: ``micro_batch.sample_indices``).
    """
    positions, targets = position_ids.reshape(-1), targets.reshape(-1)
    segment = torch.cumsum(positions == 0, dim=0) - 1
    starts = int((positions == 0).sum())
    if starts != len(completion_indices):
        raise ValueError(f"the row holds {starts} samples but {len(completion_indices)} completion indices")
    indices = torch.as_tensor(list(completion_indices), dtype=torch.long, device=positions.device)
    return torch.where(targets != IGNORE_INDEX, indices[segment], torch.full_like(segment, -1))


def per_token(values: Tensor, sequence_ids: Tensor) -> Tensor:
    """Broadcast per-completion ``values`` (N,) to the tokens: ``values[sequence_ids]``, 0 where -1."""
    mask = sequence_ids >= 0
    return torch.where(mask, values[sequence_ids.clamp(min=0)], torch.zeros((), dtype=values.dtype))


def _segments(sequence_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mask, local segment index per token (0 where masked), tokens per segment) of the loss tokens."""
    mask = sequence_ids >= 0
    _, inverse, counts = torch.unique(sequence_ids[mask], return_inverse=True, return_counts=True)
    local = torch.zeros_like(sequence_ids)
    local[mask] = inverse
    return mask, local, counts


# --------------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------------


def _masked_group_mean(groups: Tensor, scored: Tensor) -> tuple[Tensor, Tensor]:
    counts = scored.sum(dim=1, keepdim=True)
    sums = torch.where(scored, groups, 0.0).sum(dim=1, keepdim=True)
    return sums / counts.clamp(min=1), counts


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale_rewards: str,
    eps: float = 1e-4,
    *,
    reduce: Reduce | None = None,
) -> Tensor:
    """GRPO advantages ``(r - group mean) / (std + eps)`` of per-completion ``rewards`` (N,), NaN = no score.

    ``scale_rewards``: ``group`` (each group's sample std), ``batch`` (the sample std of every scored reward
    of the step; with ``reduce``, over all ranks' ``rewards``) or ``none`` (no division, Dr. GRPO). NaN
    rewards are left out of the means and stds and get 0. A group or batch with fewer than two scored rewards
    has std 0.
    """
    _check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    groups = _groups(rewards, group_size).to(torch.float64)
    scored = ~torch.isnan(groups)
    mean, counts = _masked_group_mean(groups, scored)
    centred = torch.where(scored, groups - mean, 0.0)
    if scale_rewards == "group":
        variance = centred.pow(2).sum(dim=1, keepdim=True) / (counts - 1).clamp(min=1)
        centred = centred / (variance.sqrt() + eps)
    elif scale_rewards == "batch":
        _, variance = masked_moments(groups.reshape(-1), scored.reshape(-1), reduce=reduce, unbiased=True)
        centred = centred / (variance.sqrt() + eps)
    return centred.reshape(-1).to(rewards.dtype)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO advantages: ``r_i`` minus the mean of the other scored rewards of its group (N,), NaN = no score.

    A NaN reward gets 0; so does the only scored member of a group (it has no baseline).
    """
    groups = _groups(rewards, group_size).to(torch.float64)
    scored = ~torch.isnan(groups)
    counts = scored.sum(dim=1, keepdim=True)
    sums = torch.where(scored, groups, 0.0).sum(dim=1, keepdim=True)
    baseline = (sums - groups) / (counts - 1).clamp(min=1)
    advantages = torch.where(scored & (counts > 1), groups - baseline, 0.0)
    return advantages.reshape(-1).to(rewards.dtype)


def masked_moments(
    values: Tensor, mask: Tensor, *, reduce: Reduce | None = None, unbiased: bool = False
) -> tuple[Tensor, Tensor]:
    """(mean, variance) of ``values[mask]`` in float64, over all ranks with ``reduce``.

    Two passes (the mean, then the squared deviations from it), each reduced once, so the variance is as
    exact over several ranks as in one process. ``unbiased``: divide by ``n - 1`` (n < 2 gives 0).
    """
    reduce = reduce or _identity
    values = values.detach().to(torch.float64)
    mask = mask.to(torch.bool)
    zero = torch.zeros((), dtype=torch.float64, device=values.device)
    totals = reduce(torch.stack([torch.where(mask, values, zero).sum(), mask.sum().to(torch.float64)]))
    count = totals[1]
    mean = totals[0] / count.clamp(min=1)
    squares = reduce(torch.where(mask, values - mean, zero).pow(2).sum().reshape(1))[0]
    divisor = (count - 1) if unbiased else count
    variance = torch.where(divisor > 0, squares / divisor.clamp(min=1), zero)
    return mean, variance


def whiten(
    values: Tensor,
    mask: Tensor,
    *,
    mean: Tensor | float | None = None,
    variance: Tensor | float | None = None,
    reduce: Reduce | None = None,
    eps: float = 1e-8,
    shift_mean: bool = True,
) -> Tensor:
    """``(values - mean) * rsqrt(max(variance, eps))`` on ``mask``, 0 elsewhere.

    The moments are those given, or else the population moments of ``values[mask]`` (over all ranks with
    ``reduce``; see :func:`masked_moments`). ``shift_mean=False`` only scales: the mean is added back
    (``whiten_rewards``, as TRL's ``masked_whiten(shift_mean=False)``).
    """
    if (mean is None) != (variance is None):
        raise ValueError("whiten: give both mean and variance, or neither")
    if mean is None or variance is None:
        mean, variance = masked_moments(values, mask, reduce=reduce)
    mean_t = torch.as_tensor(mean, dtype=torch.float64, device=values.device)
    variance_t = torch.as_tensor(variance, dtype=torch.float64, device=values.device)
    whitened = (values.to(torch.float64) - mean_t) * variance_t.clamp(min=eps).rsqrt()
    if not shift_mean:
        whitened = whitened + mean_t
    return torch.where(mask.to(torch.bool), whitened, 0.0).to(values.dtype)


def reverse_cumsum_per_sequence(values: Tensor, sequence_ids: Tensor) -> Tensor:
    """Return-to-go within each completion (gamma 1): the sum of ``values[s]`` over the completion's tokens
    ``s >= t``; 0 where ``sequence_ids`` is -1. A completion's tokens may have no-loss tokens between them
    but no token of another completion (packing keeps each completion in one piece)."""
    _check_same_shape(values=values, sequence_ids=sequence_ids)
    mask, local, counts = _segments(sequence_ids)
    masked = torch.where(mask, values.to(torch.float64), 0.0)
    # from_here[t]: the sum over the whole row from t on; a completion's return-to-go is that minus the
    # same sum just after its last token
    from_here = torch.flip(torch.cumsum(torch.flip(masked, (0,)), dim=0), (0,))
    from_here = torch.cat([from_here, from_here.new_zeros(1)])
    positions = torch.arange(values.numel(), device=values.device)
    last = torch.full((counts.numel(),), -1, dtype=torch.long, device=values.device)
    last = last.scatter_reduce(0, local[mask], positions[mask], reduce="amax")
    to_go = from_here[:-1] - from_here[last + 1][local]
    return torch.where(mask, to_go, 0.0).to(values.dtype)


def reinforce_pp_token_rewards(
    rewards: Tensor, sequence_ids: Tensor, kl: Tensor | None = None, kl_coef: float = 0.0
) -> Tensor:
    """Per-token rewards of REINFORCE++: ``-kl_coef * kl`` on every completion token, plus the completion's
    reward (``rewards[sequence_ids]``, (N,)) on its last token. 0 on no-loss tokens and on every token of a
    completion whose reward is NaN."""
    mask, local, counts = _segments(sequence_ids)
    positions = torch.arange(sequence_ids.numel(), device=sequence_ids.device)
    last = torch.full((counts.numel(),), -1, dtype=torch.long, device=sequence_ids.device)
    last = last.scatter_reduce(0, local[mask], positions[mask], reduce="amax")
    token_rewards = torch.zeros(sequence_ids.numel(), dtype=rewards.dtype, device=rewards.device)
    if kl is not None and kl_coef:
        _check_same_shape(kl=kl, sequence_ids=sequence_ids)
        token_rewards = torch.where(mask, -kl_coef * kl.detach().to(rewards.dtype), token_rewards)
    token_rewards[last] += rewards[sequence_ids[last]]
    scored = mask & ~torch.isnan(per_token(rewards, sequence_ids))
    return torch.where(scored, token_rewards, torch.zeros((), dtype=rewards.dtype))


def reinforce_pp_advantages(
    rewards: Tensor,
    sequence_ids: Tensor,
    *,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    baseline: str = "none",
    group_size: int | None = None,
    reduce: Reduce | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """Per-token REINFORCE++ advantages ``(T,)``.

    ``rewards`` (N,) per completion, NaN = no score; ``kl`` (T,) the per-token k1 of the rollout policy
    against the reference (the KL in the reward), weighted by ``kl_coef``. ``baseline``: ``none``, or
    ``group`` (subtract the mean scored reward of each group of ``group_size`` first). Returns are whitened
    over every token of a scored completion of the step (all ranks with ``reduce``); tokens of NaN-reward
    completions and no-loss tokens get 0.
    """
    _check_choice("reinforce_pp_baseline", baseline, REINFORCE_PP_BASELINES)
    if baseline == "group":
        if group_size is None:
            raise ValueError("reinforce_pp_baseline: group needs num_generations (group_size)")
        groups = _groups(rewards, group_size)
        mean, _ = _masked_group_mean(groups, ~torch.isnan(groups))
        rewards = (groups - mean).reshape(-1)  # NaN stays NaN
    token_rewards = reinforce_pp_token_rewards(rewards, sequence_ids, kl, kl_coef)
    returns = reverse_cumsum_per_sequence(token_rewards, sequence_ids)
    scored = (sequence_ids >= 0) & ~torch.isnan(per_token(rewards, sequence_ids))
    return whiten(returns, scored, reduce=reduce, eps=eps)


# --------------------------------------------------------------------------------------------------------
# KL
# --------------------------------------------------------------------------------------------------------


def kl_per_token(logps: Tensor, ref_logps: Tensor, estimator: Literal["k1", "k2", "k3"] | str) -> Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs.

    ``k1 = logp - ref``, ``k2 = (logp - ref)^2 / 2``, ``k3 = exp(ref - logp) - (ref - logp) - 1``. Over
    tokens sampled from the policy, k1 and k3 are unbiased; k2 is biased (its expectation approaches the KL
    as the two distributions get close).
    """
    _check_choice("kl estimator", estimator, KL_ESTIMATORS)
    difference = logps - ref_logps
    if estimator == "k1":
        return difference
    if estimator == "k2":
        return 0.5 * difference.pow(2)
    return torch.exp(-difference) + difference - 1


class KLController:
    """The KL coefficient: fixed (``target == 0``) or adaptive (Ziegler et al. 2019).

    Adaptive: after a step with observed KL ``kl``, ``error = clip(kl / target - 1, -0.2, 0.2)`` and
    ``coef *= 1 + error * n_steps / horizon``. ``n_steps`` and ``horizon`` count the same unit (Ziegler et
    al. count samples: ``n_steps`` = the completions of the step, ``horizon`` = 10000), and ``observed_kl``
    is measured the way ``target`` is meant (for example the mean over the step's completions of the
    summed k1 over their tokens).
    """

    def __init__(self, coef: float, target: float = 0.0, horizon: int = 10000):
        if coef < 0 or not math.isfinite(coef):
            raise ValueError(f"kl_coef: {coef} must be a finite number >= 0")
        if target < 0 or not math.isfinite(target):
            raise ValueError(f"kl_target: {target} must be a finite number >= 0 (0: fixed coefficient)")
        if target > 0 and horizon <= 0:
            raise ValueError(f"kl_horizon: {horizon} must be > 0 for an adaptive coefficient")
        self.coef = float(coef)
        self.target = float(target)
        self.horizon = int(horizon)

    @property
    def adaptive(self) -> bool:
        return self.target > 0

    def update(self, observed_kl: float, n_steps: int) -> float:
        """Adapt the coefficient to the KL observed over the last ``n_steps``; returns the new coefficient."""
        if not self.adaptive:
            return self.coef
        observed = float(observed_kl)
        if not math.isfinite(observed):
            raise ValueError(f"observed KL {observed} is not finite; the KL coefficient cannot adapt to it")
        error = min(max(observed / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon
        return self.coef

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the coefficient; the target and horizon must be the ones this controller was built with."""
        for key, current in (("target", self.target), ("horizon", self.horizon)):
            if state.get(key) != current:
                raise ValueError(
                    f"KL controller state: {key} {state.get(key)!r} in the checkpoint, {current!r} configured"
                )
        self.coef = float(state["coef"])


# --------------------------------------------------------------------------------------------------------
# Log-probs, entropy, loss
# --------------------------------------------------------------------------------------------------------


def token_logps_and_entropy(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = True,
    entropy_grad: bool = False,
    chunk_tokens: int = 512,
) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs of ``targets`` (differentiable) and entropies (detached) from packed logits.

    ``logits`` ``(T, V)`` or ``(1, T, V)`` in any float dtype; ``targets`` ``(T,)`` or ``(1, T)``, -100 for no
    loss (a MicroBatch's ``targets``, already shifted). Both are of the distribution ``softmax(logits /
    temperature)``, the one rollouts sample from. Returns float32 ``(T,)`` tensors, 0 where the target is
    -100 (entropy ``None`` unless ``with_entropy``). ``entropy_grad``: the entropy is differentiable too
    (an entropy bonus in the loss; it keeps each chunk's probabilities for the backward pass).

    Only the rows with a target are computed, ``chunk_tokens`` at a time in float32: the float32 copies
    kept for the backward pass add up to one ``(tokens with a target, V)`` tensor, the forward and backward
    passes add temporaries of a few chunks (four at most), and no ``(T, V)`` log-softmax is ever held.
    """
    if temperature <= 0:
        raise ValueError(f"temperature: {temperature} must be > 0")
    logits = logits.reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1).to(logits.device)
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"logits have {logits.shape[0]} rows but targets {targets.shape[0]} tokens")
    rows = torch.nonzero(targets != IGNORE_INDEX).squeeze(1)
    logp_chunks: list[Tensor] = []
    entropy_chunks: list[Tensor] = []
    for start in range(0, rows.numel(), chunk_tokens):
        chunk = rows[start : start + chunk_tokens]
        scaled = logits.index_select(0, chunk).float()  # a fresh copy: dividing it in place is safe
        if temperature != 1.0:
            scaled.div_(temperature)
        normaliser = torch.logsumexp(scaled, dim=-1)
        logp_chunks.append(scaled.gather(-1, targets[chunk].unsqueeze(-1)).squeeze(-1) - normaliser)
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                # H = logsumexp - sum(p * x), the sum as a batched dot product
                probabilities = torch.softmax(scaled, dim=-1)
                expected = torch.bmm(probabilities.unsqueeze(1), scaled.unsqueeze(2)).reshape(-1)
                entropy_chunks.append((normaliser if entropy_grad else normaliser.detach()) - expected)
                del probabilities
    zeros = torch.zeros(targets.numel(), dtype=torch.float32, device=logits.device)
    # With no target at all (a dummy micro-batch, or completions all masked): zeros that stay in the graph,
    # so backward still reaches every parameter (and DDP/FSDP2 still reduce their gradients).
    logps = zeros.index_copy(0, rows, torch.cat(logp_chunks)) if logp_chunks else logits[:, 0].float() * 0.0
    entropy = None
    if with_entropy:
        if entropy_chunks:
            entropy = zeros.index_copy(0, rows, torch.cat(entropy_chunks))
        else:
            entropy = zeros if not entropy_grad else logits[:, 0].float() * 0.0
    return logps, entropy


def loss_normaliser(
    aggregation: str, *, completion_tokens: int, completions: int, max_new_tokens: int | None = None
) -> float:
    """The global divisor of :func:`policy_loss` for ``aggregation``, from the step's counts over all ranks:
    ``token``: completion tokens with loss; ``sequence``: completions with loss; ``dr_grpo``:
    ``max_new_tokens`` x completions."""
    _check_choice("loss_aggregation", aggregation, AGGREGATIONS)
    if aggregation == "token":
        return float(completion_tokens)
    if aggregation == "sequence":
        return float(completions)
    if max_new_tokens is None or max_new_tokens < 1:
        raise ValueError(f"loss_aggregation: dr_grpo needs max_new_tokens >= 1, got {max_new_tokens}")
    return float(max_new_tokens * completions)


def policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    sequence_ids: Tensor,
    *,
    ratio_level: str = "token",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    aggregation: str = "token",
    normaliser: float | Tensor,
    ref_logps: Tensor | None = None,
    kl_coef: float = 0.0,
    entropies: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped policy-gradient loss of one packed micro-batch and its metric sums.

    All tensors are per token ``(T,)``; ``advantages`` per token (broadcast per-completion advantages with
    :func:`per_token`); ``old_logps`` of the rollout policy (detached; equal to ``logps`` on the first
    iteration, where the ratio is 1 and the gradient is REINFORCE's). ``normaliser``: the global divisor of
    ``aggregation`` (:func:`loss_normaliser`). With ``ref_logps``, the k3 KL against the reference is
    measured, and added to the loss with weight ``kl_coef``.

    Returns ``(loss, sums)``: the loss (a sum over this micro-batch divided by ``normaliser``, so the losses
    of all micro-batches of all ranks add up to the step's loss) and float64 per-rank sums over the loss
    tokens, keyed by :data:`METRIC_NAMES`: ``tokens``, ``completions``, ``clipped_low`` (tokens whose ratio is
    below ``1 - epsilon_low`` with a negative advantage: clipped, no gradient), ``clipped_high`` (above
    ``1 + epsilon_high`` with a positive advantage), ``ratio``, ``kl`` (k3; 0 without ``ref_logps``) and
    ``entropy`` (0 without ``entropies``).
    """
    _check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    _check_choice("loss_aggregation", aggregation, AGGREGATIONS)
    _check_same_shape(logps=logps, old_logps=old_logps, advantages=advantages, sequence_ids=sequence_ids)
    if epsilon_low < 0 or epsilon_high < 0:
        raise ValueError(f"epsilon_low {epsilon_low} and epsilon_high {epsilon_high} must be >= 0")
    if float(normaliser) <= 0:
        raise ValueError(f"normaliser: {float(normaliser)} must be > 0 (the step's count over all ranks)")
    mask, local, counts = _segments(sequence_ids)
    weights = mask.to(logps.dtype)
    log_ratio = torch.where(mask, logps - old_logps.detach(), torch.zeros((), dtype=logps.dtype))
    if ratio_level == "sequence" and counts.numel():  # (a row without loss tokens has no sequences)
        sequence_sums = torch.zeros(counts.numel(), dtype=logps.dtype, device=logps.device).index_add(
            0, local[mask], log_ratio[mask]
        )
        log_ratio = torch.where(mask, (sequence_sums / counts.to(logps.dtype))[local], log_ratio)
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach().to(logps.dtype)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    token_loss = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if ref_logps is not None:
        _check_same_shape(logps=logps, ref_logps=ref_logps)
        kl = kl_per_token(logps, ref_logps.detach(), "k3")
        if kl_coef:
            token_loss = token_loss + kl_coef * kl
    token_loss = token_loss * weights
    if aggregation == "sequence":
        per_sequence = torch.zeros(counts.numel(), dtype=logps.dtype, device=logps.device).index_add(
            0, local[mask], token_loss[mask]
        )
        total = (per_sequence / counts.to(logps.dtype)).sum()
    else:
        total = token_loss.sum()
    loss = total / normaliser

    with torch.no_grad():
        ratio_d = ratio.detach()

        def masked_sum(values: Tensor | None) -> Tensor:
            if values is None:
                return torch.zeros((), dtype=torch.float64, device=logps.device)
            return torch.where(mask, values.detach().to(torch.float64), 0.0).sum()

        sums = {
            "tokens": mask.sum().to(torch.float64),
            "completions": torch.tensor(float(counts.numel()), dtype=torch.float64, device=logps.device),
            "clipped_low": masked_sum(((ratio_d < 1 - epsilon_low) & (advantages < 0)).to(torch.float64)),
            "clipped_high": masked_sum(((ratio_d > 1 + epsilon_high) & (advantages > 0)).to(torch.float64)),
            "ratio": masked_sum(ratio_d),
            "kl": masked_sum(kl),
            "entropy": masked_sum(entropies),
        }
    return loss, sums


# --------------------------------------------------------------------------------------------------------
# Value algorithms (ppo, a2c): scores, token rewards, GAE, the value loss
# --------------------------------------------------------------------------------------------------------


def shape_scores(
    scores: Tensor, truncated: Tensor, *, missing_eos_penalty: float = 0.0, reward_clip: float = 0.0
) -> Tensor:
    """The score each completion gets at its last token: ``scores`` (N,) (NaN = no score) minus
    ``missing_eos_penalty`` where ``truncated`` (cut at max_new_tokens, no end-of-sequence), then clipped to
    ``[-reward_clip, reward_clip]`` when ``reward_clip > 0``. NaN stays NaN."""
    if missing_eos_penalty < 0 or reward_clip < 0:
        raise ValueError(
            f"missing_eos_penalty {missing_eos_penalty} and reward_clip {reward_clip} must be >= 0"
        )
    shaped = scores - missing_eos_penalty * truncated.to(scores.dtype)
    if reward_clip > 0:
        shaped = shaped.clamp(-reward_clip, reward_clip)  # NaN passes through clamp unchanged
    return shaped


def _padded_per_sequence(sequence_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """(mask, segment of each loss token, its position within its completion, longest completion)."""
    mask, local, counts = _segments(sequence_ids)
    segment = local[mask]
    order = torch.arange(segment.numel(), device=sequence_ids.device)
    first = torch.full((counts.numel(),), segment.numel(), dtype=torch.long, device=sequence_ids.device)
    first = first.scatter_reduce(0, segment, order, reduce="amin")
    within = order - first[segment]
    return mask, segment, within, int(counts.max()) if counts.numel() else 0


def gae_advantages(
    token_rewards: Tensor, values: Tensor, sequence_ids: Tensor, *, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) within each completion of a packed row.

    ``token_rewards``, ``values`` and ``sequence_ids`` are per token (T,); a completion's loss tokens are
    its actions in order, ``values[t]`` the critic's estimate before action ``t``, and the value after the
    last action is 0 (the episode ends). ``delta_t = r_t + gamma V_{t+1} - V_t``,
    ``A_t = delta_t + gamma lam A_{t+1}``, never across two completions. Returns ``(advantages, returns)``
    in float64 with ``returns = advantages + values``; 0 on tokens without loss.
    """
    _check_same_shape(token_rewards=token_rewards, values=values, sequence_ids=sequence_ids)
    mask, segment, within, longest = _padded_per_sequence(sequence_ids)
    count = int(segment.max()) + 1 if segment.numel() else 0
    device = values.device
    rewards = torch.zeros(count, longest + 1, dtype=torch.float64, device=device)
    value = torch.zeros(count, longest + 1, dtype=torch.float64, device=device)
    rewards[segment, within] = token_rewards[mask].detach().to(torch.float64)
    value[segment, within] = values[mask].detach().to(torch.float64)  # the column past the end stays 0
    advantages = torch.zeros_like(value)
    running = torch.zeros(count, dtype=torch.float64, device=device)
    for t in range(longest - 1, -1, -1):
        delta = rewards[:, t] + gamma * value[:, t + 1] - value[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    out = torch.zeros(sequence_ids.numel(), dtype=torch.float64, device=device)
    out[mask] = advantages[segment, within]
    returns = torch.where(mask, out + values.detach().to(torch.float64), 0.0)
    return out, returns


def explained_variance(
    values: Tensor, returns: Tensor, mask: Tensor, *, reduce: Reduce | None = None
) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over ``mask`` (all ranks with ``reduce``): 1 for a
    perfect critic, 0 for one that predicts the mean, negative for a worse one; NaN when the returns do not
    vary."""
    _, residual = masked_moments(returns.double() - values.double(), mask, reduce=reduce)
    _, spread = masked_moments(returns, mask, reduce=reduce)
    return float(1 - residual / spread) if float(spread) > 0 else math.nan


VALUE_METRIC_NAMES = ("value_tokens", "value_loss", "value_clipped")
"""Keys of :func:`value_loss`'s metric sums."""


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    sequence_ids: Tensor,
    *,
    value_clip: float,
    normaliser: float | Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The critic's loss on one packed micro-batch: per token ``0.5 * (V - R)^2``, or with ``value_clip > 0``
    PPO's clipped form ``0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``; summed over the loss
    tokens and divided by ``normaliser`` (the loss tokens of the update over all ranks, so the losses of every
    micro-batch of every rank add up to the token mean). Returns the loss and float64 sums keyed by
    :data:`VALUE_METRIC_NAMES` (``value_clipped``: tokens where the clipped term is the larger one).
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, sequence_ids=sequence_ids)
    if value_clip < 0:
        raise ValueError(f"value_clip: {value_clip} must be >= 0 (0: no clipping)")
    if float(normaliser) <= 0:
        raise ValueError(f"normaliser: {float(normaliser)} must be > 0")
    mask = sequence_ids >= 0
    returns = returns.detach().to(values.dtype)
    error = (values - returns).pow(2)
    clipped_more = torch.zeros_like(mask)
    if value_clip > 0:
        old = old_values.detach().to(values.dtype)
        clipped_values = old + torch.clamp(values - old, -value_clip, value_clip)
        clipped_error = (clipped_values - returns).pow(2)
        clipped_more = clipped_error > error
        error = torch.maximum(error, clipped_error)
    per_token_loss = 0.5 * torch.where(mask, error, torch.zeros((), dtype=values.dtype))
    loss = per_token_loss.sum() / normaliser
    with torch.no_grad():
        sums = {
            "value_tokens": mask.sum().to(torch.float64),
            "value_loss": per_token_loss.detach().to(torch.float64).sum(),
            "value_clipped": (clipped_more & mask).sum().to(torch.float64),
        }
    return loss, sums
