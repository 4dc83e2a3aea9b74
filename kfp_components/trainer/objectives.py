"""What a training step optimises: the piece that differs between SFT/OSFT and DPO.

The loop in ``train.py`` is the same for every method; an objective supplies the samples (their token
lengths and *loss units*: label tokens for SFT, one per preference pair for DPO), turns a planned
micro-batch into tensors, and computes its loss. Each micro-batch's loss is a sum over its loss units
divided by ``num_items`` (the step's loss units over all ranks, divided by the world size), so gradients do
not depend on packing, micro-batching or world size (see ``batching``).

Language modelling (SFT, OSFT) optionally weighs each sample's token losses by the sample's ``weight``, and
optionally mixes in logit distillation from a frozen teacher (:class:`Distillation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kfp_components.trainer.batching import (
    IGNORE_INDEX,
    MicroBatch,
    collate,
    dummy_micro_batch,
    shifted_label_count,
)
from kfp_components.trainer.tokenize import TokenizedDataset
from kfp_components.typed_config import ConfigError


class Objective(Protocol):
    #: names of the extra per-step metrics, averaged over the step's loss units
    metric_names: tuple[str, ...]
    #: data statistics (samples read, kept, dropped, tokens, ...)
    stats: dict[str, float]

    @property
    def lengths(self) -> list[int]: ...

    @property
    def loss_units(self) -> list[int]: ...

    def batch(self, indices: Sequence[int]) -> Any: ...

    def loss(
        self, model: nn.Module, batch: Any, num_items: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, metric sums): the loss to backpropagate and the sums of ``metric_names`` over the batch."""
        ...


@dataclass
class Distillation:
    """Logit distillation from a frozen teacher that shares the student's vocabulary.

    The loss of a micro-batch is ``(1 - coef) * SFT + coef * KD``, where the KD term of a loss token is
    ``temperature**2 * KL(softmax(teacher / T) || softmax(student / T))`` (forward KL, Hinton et al. 2015),
    weighted and normalised exactly like the token's cross-entropy.
    """

    teacher: nn.Module
    coef: float
    temperature: float


class LanguageModelling:
    """Next-token cross-entropy on the labelled tokens (SFT and OSFT), each sample's token losses times its
    weight, optionally mixed with logit distillation (``sft_loss`` and ``distill_kl`` per step then)."""

    def __init__(self, data: TokenizedDataset, pad_token_id: int, distillation: Distillation | None = None):
        self.samples = data.samples
        self.stats = data.stats
        self.pad_token_id = pad_token_id
        self.distillation = distillation
        #: names of the extra per-step metrics, averaged over the step's label tokens
        self.metric_names: tuple[str, ...] = ("sft_loss", "distill_kl") if distillation else ()

    @property
    def lengths(self) -> list[int]:
        return [len(s.input_ids) for s in self.samples]

    @property
    def loss_units(self) -> list[int]:
        return [shifted_label_count(s.labels) for s in self.samples]

    def batch(self, indices: Sequence[int]) -> MicroBatch:
        return collate(self.samples, indices) if indices else dummy_micro_batch(self.pad_token_id)

    def loss(
        self, model: nn.Module, batch: MicroBatch, num_items: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed (weighted) token loss of a packed micro-batch divided by ``num_items``.

        The targets are already shifted within each sample, so they go in as ``shift_labels`` (the model's
        loss function then does not shift again); going through the model's own loss lets Liger's fused
        linear cross-entropy avoid materialising the logits on a GPU. A micro-batch with a weight other
        than 1, or a run with distillation, computes the token losses from the logits here instead (the
        model is called without labels, so Liger's fused cross-entropy is not used for it).
        """
        if batch.weights is None and self.distillation is None:
            targets = batch.targets.to(device)
            out = model(
                input_ids=batch.input_ids.to(device),
                position_ids=batch.position_ids.to(device),
                labels=targets,
                shift_labels=targets,
                num_items_in_batch=num_items,
                use_cache=False,
            )
            return out.loss, torch.zeros(0, dtype=torch.float64, device=device)
        return self._token_loss(model, batch, num_items, device)

    def _token_loss(
        self, model: nn.Module, batch: MicroBatch, num_items: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = batch.input_ids.to(device)
        position_ids = batch.position_ids.to(device)
        targets = batch.targets.to(device)[0]
        loss_tokens = targets != IGNORE_INDEX
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[0]
        # Only the loss tokens' rows, in float32 (as the model's own loss function upcasts).
        student = logits[loss_tokens].float()
        weights = (
            batch.weights.to(device)[0][loss_tokens]
            if batch.weights is not None
            else torch.ones(student.shape[0], device=device)
        )
        token_ce = F.cross_entropy(student, targets[loss_tokens], reduction="none")
        sft_sum = (weights * token_ce).sum()
        if self.distillation is None:
            return sft_sum / num_items, torch.zeros(0, dtype=torch.float64, device=device)
        kd_sum = self._distillation_sum(student, input_ids, position_ids, loss_tokens, weights)
        coef = self.distillation.coef
        loss = ((1 - coef) * sft_sum + coef * kd_sum) / num_items
        return loss, torch.stack([sft_sum.detach(), kd_sum.detach()]).double()

    def _distillation_sum(
        self,
        student: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        loss_tokens: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """``T^2 * KL(teacher_T || student_T)`` summed over the loss tokens, each times its weight.

        The teacher runs on every micro-batch, a dummy one included (under FSDP2 its forward is a
        collective that every rank must make)."""
        assert self.distillation is not None
        teacher, temperature = self.distillation.teacher, self.distillation.temperature
        with torch.no_grad():
            teacher_logits = teacher(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits[
                0
            ]
        if teacher_logits.shape[-1] != student.shape[-1]:
            raise ConfigError(
                "distill_teacher_path",
                f"the teacher's logits have {teacher_logits.shape[-1]} entries per token and the student's "
                f"{student.shape[-1]}: the teacher must share the student's vocabulary",
            )
        teacher_logp = F.log_softmax(teacher_logits[loss_tokens].float() / temperature, dim=-1)
        student_logp = F.log_softmax(student / temperature, dim=-1)
        # KL(p_t || p_s) = sum_v p_t (log p_t - log p_s) per token.
        token_kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1)
        return temperature**2 * (weights * token_kl).sum()
