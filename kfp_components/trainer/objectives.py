"""What a training step optimises: the piece that differs between SFT/OSFT and DPO.

The loop in ``train.py`` is the same for every method; an objective supplies the samples (their token
lengths and *loss units*: label tokens for SFT, one per preference pair for DPO), turns a planned
micro-batch into tensors, and computes its loss. Each micro-batch's loss is a sum over its loss units
divided by ``num_items`` (the step's loss units over all ranks, divided by the world size), so gradients do
not depend on packing, micro-batching or world size (see ``batching``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from kfp_components.trainer.batching import MicroBatch, collate, dummy_micro_batch, shifted_label_count
from kfp_components.trainer.tokenize import TokenizedDataset


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


class LanguageModelling:
    """Next-token cross-entropy on the labelled tokens (SFT and OSFT)."""

    metric_names: tuple[str, ...] = ()

    def __init__(self, data: TokenizedDataset, pad_token_id: int):
        self.samples = data.samples
        self.stats = data.stats
        self.pad_token_id = pad_token_id

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
        """Summed token loss of a packed micro-batch divided by ``num_items``.

        The targets are already shifted within each sample, so they go in as ``shift_labels`` (the model's
        loss function then does not shift again); going through the model's own loss lets Liger's fused
        linear cross-entropy avoid materialising the logits on a GPU.
        """
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
