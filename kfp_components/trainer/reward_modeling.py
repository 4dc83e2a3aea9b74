"""Reward-model training (``algorithm: reward_model``) on the training engine's packing and loop.

A reward model is a causal LM with a scalar head: ``AutoModelForSequenceClassification`` with
``num_labels: 1`` (a ``score`` linear layer on the last hidden state, newly initialised when the starting
checkpoint is a plain causal LM). Its reward for a prompt x and completion y is the head's output at the last
token of the rendered conversation (the last token that is not the pad token, which is where
``transformers`` reads a sequence-classification model's score). For a pair with chosen y_c, rejected y_r
and an optional per-pair ``margin`` m (the rows' ``margin`` column; 0 when absent), with r_c = r(x, y_c) and
r_r = r(x, y_r), the loss is the Bradley-Terry negative log-likelihood::

    -log sigmoid(r_c - r_r - m)  +  center_rewards_coef * (r_c + r_r)^2

The second term (Eisenstein et al. 2023) keeps the rewards centred on 0, which the Bradley-Terry loss alone
leaves free (it only sees differences).

Packing is padding-free as for DPO: a pair is one *sample* of the token-budget sampler (its length the tokens
of both sequences, one loss unit), both sequences of a pair are packed into the same micro-batch, and the
score of each sequence is read at its own last token of the packed row. The model is called as a whole (so
DDP's and FSDP2's hooks run); the per-token scores are taken from the head's output with a forward hook.

Metrics per step and on the eval data (means over pairs): ``accuracy`` (share of pairs whose chosen reward is
the larger), ``margin`` (mean r_c - r_r), ``rewards_chosen`` and ``rewards_rejected``.

The final model is a standard ``AutoModelForSequenceClassification`` checkpoint (``architectures``
``...ForSequenceClassification``, ``num_labels: 1``, ``pad_token_id`` set), which ``transformers`` loads on its
own and the ``reward_model`` reward of the online algorithms scores with (``reward_model_path``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kfp_components.trainer.batching import IGNORE_INDEX, MicroBatch, collate, dummy_micro_batch
from kfp_components.trainer.distributed import unwrap
from kfp_components.trainer.preference_pairs import PairObjective, tokenized_preference_rows
from kfp_components.trainer.tokenize import TokenizedSample

METRICS = ("accuracy", "margin", "rewards_chosen", "rewards_rejected")
#: Names of the scalar head in transformers' sequence-classification models.
HEAD_NAMES = ("score", "classifier")


@dataclass(frozen=True)
class RewardPair:
    """A tokenised preference pair, the position of each sequence's score, and the pair's margin."""

    chosen: TokenizedSample
    rejected: TokenizedSample
    chosen_end: int
    rejected_end: int
    margin: float = 0.0

    @property
    def length(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


def score_position(input_ids: Sequence[int], pad_token_id: int | None) -> int:
    """Index of the token whose hidden state gives the score: the last one that is not the pad token (as
    ``transformers`` pools a sequence-classification model), the last one when every token is a pad."""
    for index in range(len(input_ids) - 1, -1, -1):
        if input_ids[index] != pad_token_id:
            return index
    return len(input_ids) - 1


def _margin(row: dict) -> float:
    """The row's ``margin`` (0 when absent or null); anything but a finite number is an error."""
    value = row.get("margin", 0.0)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"margin must be a finite number, got {value!r}")
    return float(value)


def tokenize_reward_pairs(
    path: str | Path, tokenizer: Any, *, max_seq_len: int, overlong: str = "drop"
) -> tuple[list[RewardPair], dict[str, float]]:
    """Tokenise ``{"prompt", "chosen", "rejected"[, "margin"]}`` rows (strings or message lists) into pairs.

    Rendering is the same as DPO's (the chat template, the completion as the assistant's turn). A pair whose
    sequences exceed ``max_seq_len`` is dropped, or with ``overlong: truncate`` cut to its first
    ``max_seq_len`` tokens (the score is then read at the cut); a pair left without completion tokens is
    dropped.
    """
    pad_id = tokenizer.pad_token_id
    pairs: list[RewardPair] = []
    stats: dict[str, float] = dict.fromkeys(
        ("pairs_read", "pairs_kept", "dropped_overlong", "truncated", "dropped_no_labels", "with_margin"), 0
    )
    for row, sides in tokenized_preference_rows(
        path, tokenizer, max_seq_len=max_seq_len, overlong=overlong, stats=stats, check_row=_margin
    ):
        if any(all(label == IGNORE_INDEX for label in s.labels) for s in sides):
            stats["dropped_no_labels"] += 1
            continue
        stats["with_margin"] += "margin" in row
        chosen, rejected = sides
        pairs.append(
            RewardPair(
                chosen,
                rejected,
                score_position(chosen.input_ids, pad_id),
                score_position(rejected.input_ids, pad_id),
                _margin(row),
            )
        )
    stats["pairs_kept"] = len(pairs)
    stats["tokens"] = sum(p.length for p in pairs)
    return pairs, stats


@dataclass
class RewardBatch:
    micro_batch: MicroBatch
    #: index in the packed row of the score of each sequence: chosen, rejected, chosen, ...
    score_indices: torch.Tensor
    margins: torch.Tensor
    pair_indices: list[int]


def pack_reward_pairs(pairs: Sequence[RewardPair], indices: Sequence[int]) -> RewardBatch:
    """Pack the pairs as ``[c0, r0, c1, r1, ...]`` into one padding-free row, with each score's position."""
    sequences, positions, offset = [], [], 0
    for i in indices:
        pair = pairs[i]
        for sample, end in ((pair.chosen, pair.chosen_end), (pair.rejected, pair.rejected_end)):
            sequences.append(sample)
            positions.append(offset + end)
            offset += len(sample.input_ids)
    return RewardBatch(
        collate(sequences, range(len(sequences))),
        torch.tensor(positions, dtype=torch.long),
        torch.tensor([pairs[i].margin for i in indices], dtype=torch.float32),
        list(indices),
    )


def score_head(model: nn.Module) -> nn.Module:
    """The scalar head of a sequence-classification model (plain, DDP-wrapped, FSDP2-sharded or peft: the
    outermost module named ``score`` or ``classifier``)."""
    found = [
        (name.count("."), module)
        for name, module in unwrap(model).named_modules()
        if name.rpartition(".")[2] in HEAD_NAMES
    ]
    if not found:
        raise ValueError(f"{type(unwrap(model)).__name__} has no score or classifier head")
    return min(found, key=lambda item: item[0])[1]


@contextmanager
def captured_output(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The outputs of ``module``'s forward calls while the block runs (in the autograd graph)."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _module, _args, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


def packed_scores(model: nn.Module, batch: RewardBatch, device: torch.device) -> torch.Tensor:
    """The score of every sequence packed in ``batch`` (in the row's order), in the autograd graph."""
    head = score_head(model)
    with captured_output(head) as outputs:
        model(
            input_ids=batch.micro_batch.input_ids.to(device),
            position_ids=batch.micro_batch.position_ids.to(device),
            use_cache=False,
        )
    per_token = outputs[-1][0, :, 0].float()  # (tokens,): the head's output at every position
    return per_token[batch.score_indices.to(device)]


def bradley_terry_loss(
    scores: torch.Tensor, margins: torch.Tensor, *, center_rewards_coef: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses and metrics (columns in the order of ``METRICS``) from ``(pairs, 2)`` scores
    (chosen, rejected) and per-pair margins."""
    chosen, rejected = scores[:, 0], scores[:, 1]
    losses = -F.logsigmoid(chosen - rejected - margins)
    if center_rewards_coef:
        losses = losses + center_rewards_coef * (chosen + rejected) ** 2
    detached = scores.detach()
    difference = detached[:, 0] - detached[:, 1]
    metrics = torch.stack(
        [(difference > 0).to(detached.dtype), difference, detached[:, 0], detached[:, 1]], dim=1
    )
    return losses, metrics


class RewardModelling(PairObjective):
    """The reward-model objective for the training loop (see ``objectives``)."""

    pairs: list[RewardPair]
    metric_names: tuple[str, ...] = METRICS

    def __init__(
        self,
        pairs: list[RewardPair],
        stats: dict[str, float],
        *,
        center_rewards_coef: float,
        pad_token_id: int,
    ):
        self.pairs = pairs
        self.stats = stats
        self.center_rewards_coef = center_rewards_coef
        self.pad_token_id = pad_token_id

    def batch(self, indices: Sequence[int]) -> RewardBatch:
        if not indices:
            empty = torch.zeros(0, dtype=torch.long)
            return RewardBatch(dummy_micro_batch(self.pad_token_id), empty, empty.float(), [])
        return pack_reward_pairs(self.pairs, indices)

    def loss(
        self, model: nn.Module, batch: RewardBatch, num_items: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not batch.pair_indices:
            return self.empty_loss(model, batch.micro_batch, device)
        scores = packed_scores(model, batch, device).view(-1, 2)
        losses, metrics = bradley_terry_loss(
            scores, batch.margins.to(device), center_rewards_coef=self.center_rewards_coef
        )
        return losses.sum() / num_items, metrics.sum(dim=0).double()


def load_reward_model(source: str, tokenizer: Any, **kwargs: Any) -> nn.Module:
    """``AutoModelForSequenceClassification`` with one label from ``source`` (a causal LM gets a new head),
    its ``pad_token_id`` set from the tokenizer (pad, else EOS) so the saved checkpoint scores batches."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(source)
    labels = int(getattr(config, "num_labels", 1))
    if (
        getattr(config, "architectures", None)
        and any(a.endswith("ForSequenceClassification") for a in config.architectures)
        and labels != 1
    ):
        raise ValueError(
            f"{source} is a sequence-classification model with {labels} labels; a reward model has one"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError(f"the tokenizer of {source} has neither a pad nor an EOS token")
    model: nn.Module = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, pad_token_id=pad_id, **kwargs
    )
    return model


@torch.no_grad()
def reward_metrics(
    model: nn.Module,
    pairs: Sequence[RewardPair],
    *,
    max_tokens_per_gpu: int = 4096,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Mean loss and metrics of ``model`` on ``pairs`` (one process, eval mode): e.g. a held-out set."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = reward_scores(model, pairs, max_tokens_per_gpu=max_tokens_per_gpu, device=device)
    margins = torch.tensor([p.margin for p in pairs], dtype=scores.dtype)
    losses, metrics = bradley_terry_loss(scores, margins)
    model.train(was_training)
    return {"loss": float(losses.mean()), **dict(zip(METRICS, metrics.mean(dim=0).tolist(), strict=True))}


@torch.no_grad()
def reward_scores(
    model: nn.Module, pairs: Sequence[RewardPair], *, max_tokens_per_gpu: int, device: torch.device
) -> torch.Tensor:
    """``(pairs, 2)`` scores (chosen, rejected) of ``model``, packed under ``max_tokens_per_gpu``."""
    result = torch.zeros(len(pairs), 2, dtype=torch.float64)
    group: list[int] = []
    tokens = 0
    for index in [*range(len(pairs)), None]:
        if index is not None and (not group or tokens + pairs[index].length <= max_tokens_per_gpu):
            group.append(index)
            tokens += pairs[index].length
            continue
        if group:
            result[group] = (
                packed_scores(model, pack_reward_pairs(pairs, group), device).view(-1, 2).double().cpu()
            )
        if index is not None:
            group, tokens = [index], pairs[index].length
    return result
