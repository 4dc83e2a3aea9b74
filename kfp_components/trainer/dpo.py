"""Direct Preference Optimization (Rafailov et al. 2023) on the training engine's packing and loop.

For a prompt x with a preferred completion y_w and a rejected one y_l, with sequence log-probabilities
under the policy (log pi) and a frozen reference (log pi_ref), let::

    h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))

and minimise, over the pairs of the global batch:

* ``sigmoid`` (DPO): ``-log sigmoid(beta h)``, with ``label_smoothing`` e:
  ``-(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)`` (conservative DPO);
* ``ipo`` (Azar et al. 2023): ``(h - 1 / (2 beta))^2``;
* ``hinge`` (SLiC, Zhao et al. 2023): ``max(0, 1 - beta h)``.

A pair is one *sample* of the token-budget sampler: its length is the tokens of both completions (each with
its prompt) and it counts as one loss unit, so the loss is the mean over the pairs of the global batch
whatever the packing or world size. Both sequences of a pair are packed into the same micro-batch.

The reference is frozen and runs in eval mode, so its log-probabilities are a fixed function of the data:
they are computed once, before training, in one pass (spread over the ranks), and the reference model is
freed before the policy loads. No second model sits in memory during training, and nothing is lost against a
live reference. The reference is the model training starts from unless ``ref_model_name_or_path`` says
otherwise.

Metrics per step (means over the pairs): ``loss``, ``rewards_chosen`` and ``rewards_rejected``
(``beta (log pi - log pi_ref)``), ``reward_margin`` (their difference), ``reward_accuracy`` (share of pairs
whose chosen reward is the larger) and ``implicit_kl``: ``0.5 (log pi(y|x) - log pi_ref(y|x))^2`` averaged
over both completions, Schulman's k2 estimate of the KL divergence from the reference, evaluated on the
dataset's completions. It is 0 at the start and shows how far the policy has drifted.

With ``osft_constraint``, the policy trains inside the OSFT constraint (the base model's top singular
subspace frozen), which preference-tunes without eroding what the model already knows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kfp_components.trainer.batching import IGNORE_INDEX, MicroBatch, collate, dummy_micro_batch
from kfp_components.trainer.distributed import DistInfo, all_reduce_sum
from kfp_components.trainer.preference_pairs import PairObjective, tokenized_preference_rows
from kfp_components.trainer.tokenize import TokenizedSample

log = logging.getLogger(__name__)

METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "implicit_kl")


@dataclass(frozen=True)
class PreferencePair:
    chosen: TokenizedSample
    rejected: TokenizedSample

    @property
    def length(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def tokenize_preference_jsonl(
    path: str | Path, tokenizer: Any, *, max_seq_len: int, overlong: str = "drop"
) -> tuple[list[PreferencePair], dict[str, float]]:
    """Tokenise ``{"prompt", "chosen", "rejected"}`` rows (strings or message lists) into pairs."""
    pairs: list[PreferencePair] = []
    stats: dict[str, float] = dict.fromkeys(
        ("pairs_read", "pairs_kept", "dropped_overlong", "truncated", "dropped_no_labels"), 0
    )
    for _row, sides in tokenized_preference_rows(
        path, tokenizer, max_seq_len=max_seq_len, overlong=overlong, stats=stats
    ):
        if any(sum(label != IGNORE_INDEX for label in s.labels[1:]) == 0 for s in sides):
            stats["dropped_no_labels"] += 1
            continue
        pairs.append(PreferencePair(*sides))
    stats["pairs_kept"] = len(pairs)
    stats["tokens"] = sum(p.length for p in pairs)
    return pairs, stats


def sequence_logps(model: nn.Module, batch: MicroBatch, device: torch.device) -> torch.Tensor:
    """Sum of the target tokens' log-probabilities of every sequence packed in ``batch``."""
    out = model(
        input_ids=batch.input_ids.to(device), position_ids=batch.position_ids.to(device), use_cache=False
    )
    logits = out.logits[0].float()
    targets = batch.targets[0].to(device)
    token_logps = -F.cross_entropy(logits, targets.clamp(min=0), reduction="none")
    token_logps = token_logps * (targets != IGNORE_INDEX)
    sequence = torch.cumsum(batch.position_ids[0].to(device) == 0, dim=0) - 1
    sums = torch.zeros(int(sequence[-1]) + 1, dtype=token_logps.dtype, device=device)
    return sums.index_add(0, sequence, token_logps)


@dataclass
class PreferenceBatch:
    micro_batch: MicroBatch
    pair_indices: list[int]


class DirectPreference(PairObjective):
    """The DPO objective for the training loop (see ``objectives``)."""

    pairs: list[PreferencePair]
    metric_names: tuple[str, ...] = METRICS

    def __init__(
        self,
        pairs: list[PreferencePair],
        stats: dict[str, float],
        reference_logps: torch.Tensor,
        *,
        beta: float,
        loss_type: str,
        label_smoothing: float,
        pad_token_id: int,
    ):
        self.pairs = pairs
        self.stats = stats
        self.reference_logps = reference_logps  # (pairs, 2): chosen, rejected
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.pad_token_id = pad_token_id

    def batch(self, indices: Sequence[int]) -> PreferenceBatch:
        if not indices:
            return PreferenceBatch(dummy_micro_batch(self.pad_token_id), [])
        return PreferenceBatch(pack_pairs(self.pairs, indices), list(indices))

    def loss(
        self, model: nn.Module, batch: PreferenceBatch, num_items: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not batch.pair_indices:
            return self.empty_loss(model, batch.micro_batch, device)
        policy = sequence_logps(model, batch.micro_batch, device).view(-1, 2)
        reference = self.reference_logps[batch.pair_indices].to(device)
        losses, metrics = preference_loss(
            policy, reference, beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing
        )
        return losses.sum() / num_items, metrics.sum(dim=0).double()


def pack_pairs(pairs: Sequence[PreferencePair], indices: Sequence[int]) -> MicroBatch:
    """Pack the chosen and rejected sequences of the pairs as ``[c0, r0, c1, r1, ...]``."""
    sequences = [s for i in indices for s in (pairs[i].chosen, pairs[i].rejected)]
    return collate(sequences, range(len(sequences)))


def preference_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses and metrics (columns in the order of ``METRICS``) from ``(pairs, 2)`` log-probs."""
    ratios = policy - reference  # log pi - log pi_ref, chosen then rejected
    h = ratios[:, 0] - ratios[:, 1]
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"loss_type: {loss_type!r} is not one of sigmoid, ipo, hinge")
    rewards = beta * ratios.detach()
    metrics = torch.stack(
        [
            rewards[:, 0],
            rewards[:, 1],
            rewards[:, 0] - rewards[:, 1],
            (rewards[:, 0] > rewards[:, 1]).to(rewards.dtype),
            0.5 * (ratios.detach() ** 2).mean(dim=1),
        ],
        dim=1,
    )
    return losses, metrics


@torch.no_grad()
def compute_reference_logps(
    model: nn.Module, pairs: Sequence[PreferencePair], info: DistInfo, *, max_tokens_per_gpu: int
) -> torch.Tensor:
    """Sequence log-probs ``(pairs, 2)`` under ``model`` in eval mode; ranks share the work."""
    was_training = model.training
    model.eval()
    result = torch.zeros(len(pairs), 2, dtype=torch.float64, device=info.device)
    mine = list(range(info.rank, len(pairs), info.world_size))
    group: list[int] = []
    tokens = 0
    for index in [*mine, None]:
        if index is not None and tokens + pairs[index].length <= max_tokens_per_gpu:
            group.append(index)
            tokens += pairs[index].length
            continue
        if group:
            logps = sequence_logps(model, pack_pairs(pairs, group), info.device).view(-1, 2)
            result[group] = logps.double()
        if index is not None:
            group, tokens = [index], pairs[index].length
    model.train(was_training)
    return all_reduce_sum(result).cpu()


@torch.no_grad()
def preference_metrics(
    model: nn.Module,
    pairs: Sequence[PreferencePair],
    reference_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    max_tokens_per_gpu: int = 4096,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Mean loss and DPO metrics of ``model`` on ``pairs`` (one process): e.g. on a held-out set."""
    device = device or next(model.parameters()).device
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    policy = compute_reference_logps(model, pairs, info, max_tokens_per_gpu=max_tokens_per_gpu)
    losses, metrics = preference_loss(policy, reference_logps.to(policy), beta=beta, loss_type=loss_type)
    means = metrics.mean(dim=0).tolist()
    return {"loss": float(losses.mean()), **dict(zip(METRICS, means, strict=True))}
