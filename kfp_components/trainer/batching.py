"""Token-budget batching with padding-free packing.

An optimizer step takes ``effective_batch_size`` samples, however long they are. Each rank runs them as
one or more *micro-batches* of at most ``max_tokens_per_gpu`` tokens and accumulates gradients over
them. A micro-batch is padding-free: its samples are concatenated into a single row of shape ``(1, T)``
whose ``position_ids`` restart at 0 for every sample. With ``attention_mask=None`` and
``use_cache=False``, transformers turns the restarting positions into a block-diagonal causal mask
(sdpa, eager) or variable-length attention (flash_attention_2), so no sample attends to another and not
a single pad token is computed.

Planning a step (:class:`TokenBudgetSampler`), identically on every rank and without communication:

1. Shuffle the dataset with a generator seeded by ``(seed, epoch)`` and cut the order into steps of
   ``effective_batch_size`` samples (the last step of an epoch is smaller unless ``drop_last``).
2. Distribute a step's samples over the ranks, longest first, each to the rank with the fewest tokens
   so far, so ranks finish their forward and backward passes at about the same time.
3. On each rank, pack the samples longest first into micro-batches (first-fit decreasing): each sample
   goes into the first micro-batch it fits in, or opens a new one.
4. Give every rank the same number of micro-batches: ranks with fewer get *dummy* micro-batches (empty
   lists in :attr:`StepPlan.micro_batches`, run as :func:`dummy_micro_batch`), because FSDP all-gathers
   parameters in every forward and DDP all-reduces gradients after every synchronising backward, and
   these collectives must line up across ranks.

Loss normalisation contract
---------------------------
The loss of one micro-batch is::

    loss = cross_entropy(logits, targets, ignore_index=-100, reduction="sum") * step.loss_scale(world_size)
         = (sum of the token losses of the micro-batch) / step.global_label_tokens * world_size

where ``step.global_label_tokens`` counts the label tokens (``targets != -100``) of the whole step over
all ranks. Backpropagating every micro-batch and letting DDP/FSDP *average* the gradients over the ranks
(hence the factor ``world_size``) gives exactly the gradient of the mean token loss over the global
batch, whatever the packing, the number of micro-batches and the world size. Each sample therefore
weighs in proportion to its label tokens, as it would in one huge unpadded batch. The count is known
without communication because every rank plans the whole step from the per-sample label counts
(:func:`shifted_label_count`). A dummy micro-batch has no label tokens, so its loss and its gradients
are exactly zero, yet running it (forward and backward) keeps the collectives in step.

Targets are shifted inside each sample (``targets[t] = labels[t + 1]``) by :func:`collate`, never across
a sample boundary: the last token of every sample has no target. Compute the loss against ``targets``
directly; do not pass ``labels`` to the model, which would shift the packed row again.

A sample may carry a loss weight (its ``weight``, 1 by default). When a micro-batch holds a sample whose
weight is not 1, :func:`collate` adds ``weights``: the weight of each target token's sample, and the
micro-batch's loss is ``sum(weights * token losses) * step.loss_scale(world_size)``; the normaliser stays
the step's label tokens, so weights of 1 give exactly the loss above.
"""

from __future__ import annotations

import array
import hashlib
import heapq
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = [
    "IGNORE_INDEX",
    "LabelledSample",
    "MicroBatch",
    "PackingStats",
    "StepPlan",
    "TokenBudgetSampler",
    "collate",
    "dummy_micro_batch",
    "packing_efficiency",
    "sample_weight",
    "shifted_label_count",
]

IGNORE_INDEX = -100
"""Label and target value of tokens that do not count in the loss (PyTorch's ``ignore_index``)."""


class LabelledSample(Protocol):
    """A tokenized sample: token ids and per-token labels of the same length (``-100``: no loss)."""

    @property
    def input_ids(self) -> Sequence[int]: ...

    @property
    def labels(self) -> Sequence[int]: ...


def sample_weight(sample: LabelledSample) -> float:
    """A sample's loss weight: its ``weight`` attribute when it has one, else 1."""
    return float(getattr(sample, "weight", 1.0))


def shifted_label_count(labels: Sequence[int]) -> int:
    """Label tokens of a sample that survive the next-token shift: ``labels[1:]`` that are not -100.

    The first token is never predicted (nothing precedes it), so its label never counts.
    """
    return sum(1 for label in itertools.islice(labels, 1, None) if label != IGNORE_INDEX)


# --------------------------------------------------------------------------------------------------------
# Micro-batches
# --------------------------------------------------------------------------------------------------------


@dataclass
class MicroBatch:
    """One forward pass on one rank: samples concatenated into a single padding-free row.

    Run it as ``model(input_ids=mb.input_ids, position_ids=mb.position_ids, attention_mask=None,
    use_cache=False)`` and compute the loss against ``targets`` (see the module docstring).

    Attributes:
        input_ids: ``(1, T)`` long: the samples' token ids, one after the other.
        position_ids: ``(1, T)`` long: positions restarting at 0 at the start of every sample.
        targets: ``(1, T)`` long: next-token targets shifted within each sample,
            ``targets[t] = labels[t + 1]`` of the same sample; -100 at the last token of every sample
            and wherever the label is -100.
        num_samples: Samples in the row (0 for a dummy micro-batch).
        num_tokens: Real tokens, ``T`` (0 for a dummy micro-batch, whose row holds a single pad token).
        num_label_tokens: Tokens with a target, ``(targets != -100).sum()``.
        sample_indices: Dataset indices of the samples, in row order.
        weights: ``(1, T)`` float: the loss weight of each token's sample, or None when every sample of
            the micro-batch weighs 1.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    num_samples: int
    num_tokens: int
    num_label_tokens: int
    sample_indices: list[int]
    weights: torch.Tensor | None = None

    @property
    def is_dummy(self) -> bool:
        """Whether this micro-batch only keeps the collectives in step (no samples, zero loss)."""
        return self.num_samples == 0

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MicroBatch:
        """A copy with the tensors on ``device``."""
        return MicroBatch(
            input_ids=self.input_ids.to(device, non_blocking=non_blocking),
            position_ids=self.position_ids.to(device, non_blocking=non_blocking),
            targets=self.targets.to(device, non_blocking=non_blocking),
            num_samples=self.num_samples,
            num_tokens=self.num_tokens,
            num_label_tokens=self.num_label_tokens,
            sample_indices=list(self.sample_indices),
            weights=None if self.weights is None else self.weights.to(device, non_blocking=non_blocking),
        )


def collate(samples: Sequence[LabelledSample], indices: Sequence[int]) -> MicroBatch:
    """Pack ``samples[i]`` for ``i`` in ``indices`` into one padding-free micro-batch.

    Raises:
        ValueError: ``indices`` is empty (use :func:`dummy_micro_batch`), or a sample is empty or has
            ``input_ids`` and ``labels`` of different lengths.
    """
    if not indices:
        raise ValueError("collate needs at least one sample; use dummy_micro_batch for an empty micro-batch")
    input_ids: list[int] = []
    position_ids: list[int] = []
    targets: list[int] = []
    weights: list[float] = []
    for index in indices:
        sample = samples[index]
        length = len(sample.input_ids)
        if length == 0:
            raise ValueError(f"sample {index} is empty")
        if len(sample.labels) != length:
            raise ValueError(
                f"sample {index} has {length} input_ids but {len(sample.labels)} labels; they must match"
            )
        input_ids.extend(sample.input_ids)
        position_ids.extend(range(length))
        targets.extend(itertools.islice(sample.labels, 1, None))
        targets.append(
            IGNORE_INDEX
        )  # The last token of a sample predicts nothing: no crossing into the next.
        weights.extend([sample_weight(sample)] * length)
    targets_tensor = torch.tensor([targets], dtype=torch.long)
    weighted = any(weight != 1.0 for weight in weights)
    return MicroBatch(
        input_ids=torch.tensor([input_ids], dtype=torch.long),
        position_ids=torch.tensor([position_ids], dtype=torch.long),
        targets=targets_tensor,
        num_samples=len(indices),
        num_tokens=len(input_ids),
        num_label_tokens=int((targets_tensor != IGNORE_INDEX).sum()),
        sample_indices=list(indices),
        weights=torch.tensor([weights], dtype=torch.float32) if weighted else None,
    )


def dummy_micro_batch(pad_token_id: int) -> MicroBatch:
    """A one-token micro-batch without labels, for a rank that has run out of micro-batches in a step.

    Its loss (a sum over no tokens) is exactly 0 and so are its gradients, but its forward and backward
    passes make the same collective calls as a real micro-batch.
    """
    return MicroBatch(
        input_ids=torch.tensor([[pad_token_id]], dtype=torch.long),
        position_ids=torch.zeros((1, 1), dtype=torch.long),
        targets=torch.full((1, 1), IGNORE_INDEX, dtype=torch.long),
        num_samples=0,
        num_tokens=0,
        num_label_tokens=0,
        sample_indices=[],
    )


# --------------------------------------------------------------------------------------------------------
# Step planning
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step as seen by one rank.

    Attributes:
        micro_batches: This rank's micro-batches, each a list of sample indices; an empty list is a
            dummy micro-batch. Every rank has the same number of micro-batches in a step.
        global_label_tokens: Label tokens (after the shift) of the whole step over all ranks.
        global_samples: Samples of the whole step over all ranks.
        global_tokens: Tokens of the whole step over all ranks.
    """

    micro_batches: list[list[int]]
    global_label_tokens: int
    global_samples: int
    global_tokens: int

    def loss_scale(self, world_size: int) -> float:
        """Factor for the summed token loss of a micro-batch: ``world_size / global_label_tokens``.

        A step without any label token (every label masked) has a zero loss; its scale is
        ``world_size`` so that nothing divides by zero.
        """
        return world_size / max(self.global_label_tokens, 1)


class TokenBudgetSampler:
    """Plans optimizer steps of ``effective_batch_size`` samples packed under a per-rank token budget.

    Every rank builds the sampler from the same per-sample lengths and label counts and computes the
    same global plan; each keeps its own part. The plan of an epoch depends only on ``seed`` and the
    epoch, so it can be recomputed at will and training resumes exactly from a saved position::

        sampler = TokenBudgetSampler.from_samples(samples, effective_batch_size=128,
                                                  max_tokens_per_gpu=16384, world_size=world, rank=rank)
        sampler.load_state_dict(checkpoint["sampler"])  # when resuming
        while sampler.epoch < num_train_epochs:
            for step in sampler:  # the rest of the current epoch
                for indices in step.micro_batches:
                    mb = collate(samples, indices) if indices else dummy_micro_batch(pad_token_id)
                    ...  # forward, loss as in the module docstring, backward
                ...  # optimizer step; a checkpoint saved now resumes at the next step

    Args:
        lengths: Tokens of each sample.
        label_counts: Label tokens of each sample after the shift, ``shifted_label_count(labels)``.
        effective_batch_size: Samples per optimizer step over all ranks.
        max_tokens_per_gpu: Most tokens in one micro-batch.
        world_size: Number of ranks.
        rank: This rank.
        seed: Seed of the data order.
        shuffle: Shuffle the samples every epoch (otherwise steps take them in dataset order).
        drop_last: Leave out the last step of an epoch when it has fewer than effective_batch_size samples.

    Raises:
        ValueError: Inconsistent arguments, or a sample longer than ``max_tokens_per_gpu`` (the data
            stage must drop or truncate it first).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        label_counts: Sequence[int],
        *,
        effective_batch_size: int,
        max_tokens_per_gpu: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if effective_batch_size < 1:
            raise ValueError(f"effective_batch_size must be at least 1, got {effective_batch_size}")
        if max_tokens_per_gpu < 1:
            raise ValueError(f"max_tokens_per_gpu must be at least 1, got {max_tokens_per_gpu}")
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if len(lengths) != len(label_counts):
            raise ValueError(f"got {len(lengths)} lengths but {len(label_counts)} label counts")
        _check_samples(lengths, label_counts, max_tokens_per_gpu)

        self.lengths = list(lengths)
        self.label_counts = list(label_counts)
        self.effective_batch_size = effective_batch_size
        self.max_tokens_per_gpu = max_tokens_per_gpu
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        # Identifies the dataset in a saved position: resuming on other data would silently reshuffle it.
        self._dataset_digest = hashlib.sha256(
            array.array("q", self.lengths).tobytes() + array.array("q", self.label_counts).tobytes()
        ).hexdigest()[:16]
        self.epoch = 0
        """Epoch of the next step to run."""
        self.step = 0
        """Index, within :attr:`epoch`, of the next step to run."""

    @classmethod
    def from_samples(cls, samples: Sequence[LabelledSample], **kwargs: Any) -> TokenBudgetSampler:
        """A sampler over tokenized samples; ``kwargs`` are the keyword arguments of the constructor."""
        lengths = [len(sample.input_ids) for sample in samples]
        label_counts = [shifted_label_count(sample.labels) for sample in samples]
        return cls(lengths, label_counts, **kwargs)

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch."""
        if self.drop_last:
            return len(self.lengths) // self.effective_batch_size
        return math.ceil(len(self.lengths) / self.effective_batch_size)

    def epoch_plan(self, epoch: int) -> list[StepPlan]:
        """This rank's plan of every step of ``epoch``; a pure function of the arguments and the epoch."""
        order = self._epoch_order(epoch)
        batch = self.effective_batch_size
        return [
            self._plan_step(order[step * batch : (step + 1) * batch])
            for step in range(self.steps_per_epoch())
        ]

    def __iter__(self) -> Iterator[StepPlan]:
        """Yield the remaining steps of the current epoch, advancing the position as each is handed out.

        A step counts as taken when it is yielded, so a checkpoint saved after its optimizer update
        resumes at the next step. Once the epoch is exhausted the position moves to the next epoch.
        """
        epoch = self.epoch
        plan = self.epoch_plan(epoch)
        while self.epoch == epoch and self.step < len(plan):
            step_plan = plan[self.step]
            self.step += 1
            yield step_plan
        if self.epoch == epoch:
            self.epoch, self.step = epoch + 1, 0

    # ----------------------------------------------------------------------------------------------------
    # Planning
    # ----------------------------------------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> list[int]:
        """The order of the samples in ``epoch``: a permutation drawn from a generator for (seed, epoch)."""
        if not self.shuffle:
            return list(range(len(self.lengths)))
        # Hash (seed, epoch) into a 63-bit seed: independent streams, no collisions between neighbours.
        key = hashlib.sha256(f"kfp_components.batching/{self.seed}/{epoch}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
        return torch.randperm(len(self.lengths), generator=generator).tolist()

    def _plan_step(self, indices: list[int]) -> StepPlan:
        """Split one step's samples over the ranks and micro-batches, then keep this rank's part."""
        per_rank = self._balance_over_ranks(indices)
        micro_batches = [self._pack(rank_indices) for rank_indices in per_rank]
        count = max(len(batches) for batches in micro_batches)
        own = micro_batches[self.rank]
        own += [[] for _ in range(count - len(own))]
        return StepPlan(
            micro_batches=own,
            global_label_tokens=sum(self.label_counts[i] for i in indices),
            global_samples=len(indices),
            global_tokens=sum(self.lengths[i] for i in indices),
        )

    def _longest_first(self, indices: Iterable[int]) -> list[int]:
        # Stable: equally long samples keep their shuffled order.
        return sorted(indices, key=lambda index: -self.lengths[index])

    def _balance_over_ranks(self, indices: list[int]) -> list[list[int]]:
        """Greedy longest-first: each sample goes to the rank with the fewest tokens (lowest rank on ties)."""
        per_rank: list[list[int]] = [[] for _ in range(self.world_size)]
        loads = [(0, rank) for rank in range(self.world_size)]  # A heap of (tokens, rank).
        for index in self._longest_first(indices):
            tokens, rank = heapq.heappop(loads)
            per_rank[rank].append(index)
            heapq.heappush(loads, (tokens + self.lengths[index], rank))
        return per_rank

    def _pack(self, indices: list[int]) -> list[list[int]]:
        """First-fit decreasing: each sample, longest first, joins the first micro-batch with room for it."""
        micro_batches: list[list[int]] = []
        room: list[int] = []  # Tokens still free in each micro-batch.
        for index in self._longest_first(indices):
            length = self.lengths[index]
            for position, free in enumerate(room):
                if length <= free:
                    micro_batches[position].append(index)
                    room[position] -= length
                    break
            else:
                micro_batches.append([index])
                room.append(self.max_tokens_per_gpu - length)
        return micro_batches

    # ----------------------------------------------------------------------------------------------------
    # Resumption
    # ----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The position (next epoch and step) and what the data order depends on, for an exact resume."""
        epoch, step = self.epoch, self.step
        if step >= self.steps_per_epoch():
            epoch, step = epoch + 1, 0
        return {"epoch": epoch, "step": step, **self._order_fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved position.

        The world size and the token budget may differ from the saved run (they only change how a step
        is split over ranks and micro-batches); the dataset, the seed and the batch size may not.

        Raises:
            ValueError: The state comes from a run with another data order.
        """
        mismatched = [
            f"{key}: saved {state.get(key)!r}, now {value!r}"
            for key, value in self._order_fingerprint().items()
            if state.get(key) != value
        ]
        if mismatched:
            raise ValueError("cannot resume the data order of another run (" + "; ".join(mismatched) + ")")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def _order_fingerprint(self) -> dict[str, Any]:
        """Everything that decides which samples each step holds."""
        return {
            "seed": self.seed,
            "num_samples": len(self.lengths),
            "dataset_digest": self._dataset_digest,
            "effective_batch_size": self.effective_batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }


def _check_samples(lengths: Sequence[int], label_counts: Sequence[int], max_tokens_per_gpu: int) -> None:
    """Raise ValueError for an empty sample, an impossible label count, or a sample over the budget."""
    too_long = [index for index, length in enumerate(lengths) if length > max_tokens_per_gpu]
    if too_long:
        first = too_long[0]
        others = f" ({len(too_long) - 1} more samples are too long too)" if len(too_long) > 1 else ""
        raise ValueError(
            f"sample {first} has {lengths[first]} tokens, more than max_tokens_per_gpu={max_tokens_per_gpu}"
            f"{others}; the data stage must drop or truncate samples longer than the token budget"
        )
    for index, (length, label_count) in enumerate(zip(lengths, label_counts, strict=True)):
        if length < 1:
            raise ValueError(f"sample {index} is empty")
        if not 0 <= label_count < length:
            raise ValueError(
                f"sample {index} has {label_count} label tokens but {length} tokens; "
                "a sample of n tokens has at most n - 1 label tokens after the shift"
            )


# --------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackingStats:
    """How well a plan fills the token budget. Add the stats of every rank to get the global figures.

    Attributes:
        steps: Optimizer steps covered.
        micro_batches: Micro-batches (forward passes), dummies included.
        dummy_micro_batches: Micro-batches that only keep the collectives in step.
        samples: Samples packed.
        tokens: Real tokens packed (no pad tokens are ever computed).
        max_tokens_per_gpu: The token budget of a micro-batch.
    """

    steps: int
    micro_batches: int
    dummy_micro_batches: int
    samples: int
    tokens: int
    max_tokens_per_gpu: int

    @property
    def budget_fill(self) -> float:
        """Real tokens over ``micro_batches * max_tokens_per_gpu``.

        The share of non-pad tokens that a collator padding every micro-batch to the budget would get;
        below 1 when a rank's share of a step does not fill its last micro-batch.
        """
        capacity = self.micro_batches * self.max_tokens_per_gpu
        return self.tokens / capacity if capacity else 0.0

    def __add__(self, other: PackingStats) -> PackingStats:
        if self.max_tokens_per_gpu != other.max_tokens_per_gpu:
            raise ValueError("cannot add packing stats of different token budgets")
        return PackingStats(
            steps=max(self.steps, other.steps),  # Ranks run the same steps.
            micro_batches=self.micro_batches + other.micro_batches,
            dummy_micro_batches=self.dummy_micro_batches + other.dummy_micro_batches,
            samples=self.samples + other.samples,
            tokens=self.tokens + other.tokens,
            max_tokens_per_gpu=self.max_tokens_per_gpu,
        )


def packing_efficiency(
    plan_steps: Iterable[StepPlan], lengths: Sequence[int], max_tokens_per_gpu: int
) -> PackingStats:
    """Packing figures of one rank's steps (for example ``sampler.epoch_plan(epoch)``)."""
    steps = micro_batches = dummies = samples = tokens = 0
    for step in plan_steps:
        steps += 1
        for indices in step.micro_batches:
            micro_batches += 1
            dummies += not indices
            samples += len(indices)
            tokens += sum(lengths[index] for index in indices)
    return PackingStats(steps, micro_batches, dummies, samples, tokens, max_tokens_per_gpu)
