"""The steps of the online algorithms (grpo, rloo, reinforce_pp, ppo, a2c, trpo): generate, score, learn.

One step, on every rank of a torchrun job (``train`` runs the loop around it, as for SFT and DPO):

1. **generate**: this rank's share of the step's prompts (:class:`~kfp_components.trainer.prompts.PromptOrder`)
   gets ``num_generations`` completions each from the current model (``rollout``), sampled with seeds of
   (seed, step, prompt), so one process and several, and a resumed run, sample exactly the same;
2. **score**: the reward functions score this rank's completions; then every rank gathers every completion
   and score of the step (token ids and numbers: small beside the model), so what follows is computed on
   the whole batch, identically everywhere;
3. **plan**: the completions (prompt tokens labelled -100) are packed padding-free into micro-batches by the
   token-budget sampler, balanced over the ranks, exactly like SFT data;
4. **reference and old log-probs**, once per step, without gradients: the reference model's (when KL is
   on) and, with ``num_iterations > 1``, the generating policy's;
5. **advantages** (``policy_gradient``): group-normalised (grpo), leave-one-out (rloo) or whitened returns
   with the KL in the reward (reinforce_pp); a completion without a score gets none;
6. **learn**: ``num_iterations`` passes over the step's completions, each of ``num_mini_batches``
   optimizer updates (mini-batches reshuffled every pass), with the clipped policy loss normalised by the
   update's completion tokens (or completions) over all ranks, so every rank count gives the same update;
   then the adaptive KL coefficient moves toward its target.

The value algorithms (ppo, a2c, trpo) have a critic (``value_model.Critic``) and their step is, in order:
rollouts -> old log-probs, reference log-probs and values (no gradients) -> token rewards (the shaped score
at each completion's last token, the KL penalty on every token) -> GAE advantages and returns -> the policy
phase -> the critic phase. ppo and a2c run the two phases as one backward (policy loss + ``vf_coef`` x value
loss; the critic has its own optimizer); :meth:`OnlineSteps.critic_update` runs the critic's passes alone,
for an algorithm whose policy step is not a gradient step.

trpo's policy phase is one natural-gradient step (:meth:`OnlineSteps.trpo_update`,
``kfp_components.trainer.trpo``) instead of optimizer updates: the policy's AdamW is not used, the LR
schedule advances once per step and scales only the critic's learning rate; then ``value_epochs`` passes of
the critic (:meth:`OnlineSteps.critic_update`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kfp_components.trainer import policy_gradient as pg
from kfp_components.trainer.batching import (
    IGNORE_INDEX,
    MicroBatch,
    StepPlan,
    TokenBudgetSampler,
    collate,
    dummy_micro_batch,
)
from kfp_components.trainer.config import VALUE_ALGORITHMS, TrainingConfig
from kfp_components.trainer.distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_sum,
    gradient_sync,
    peak_memory_mib,
    unwrap,
)
from kfp_components.trainer.precision import Precision
from kfp_components.trainer.prompts import PromptOrder, PromptSet
from kfp_components.trainer.rollout import Completion, SamplingOptions
from kfp_components.trainer.tokenize import TokenizedSample

log = logging.getLogger("kfp_components.trainer")


@dataclass
class Rollout:
    """One completion of the step with everything the update needs, the same on every rank."""

    row: int  # index of its prompt in the prompt set
    group: int  # index of its prompt within the step
    prompt_ids: list[int]
    completion_ids: list[int]
    finish_reason: str
    rewards: dict[str, float | None]  # per reward function
    total: float | None  # their weighted sum; None when no function scored it
    #: a reward function's failure on this rank: (reference, message, sample index, prompt)
    error: tuple[str, str, int | None, Any] | None = None


@dataclass
class StepTensors:
    """What the updates of a step read, per micro-batch of one plan (one tensor per micro-batch, each of
    its tokens): fixed before the first update."""

    advantages: list[torch.Tensor]
    old: list[torch.Tensor] | None = None  # log-probs of the generating policy
    ref: list[torch.Tensor] | None = None  # log-probs of the reference model
    values: list[torch.Tensor] | None = None  # the critic's values at generation (value algorithms)
    returns: list[torch.Tensor] | None = None  # GAE returns (value algorithms)

    def fields(self) -> dict[str, list[torch.Tensor]]:
        names = ("advantages", "old", "ref", "values", "returns")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass
class Update:
    """One optimizer update's inputs: this rank's micro-batches and their tensors, and the update's counts
    over all ranks (the loss normalisers)."""

    batches: list[tuple[MicroBatch, torch.Tensor]]
    tensors: StepTensors
    label_tokens: int
    completions: int
    #: each completion's tensors by name, gathered from every rank (built for mini-batches, once per step)
    pieces: dict[str, dict[int, torch.Tensor]] | None = None


def by_completion(tensors: list[torch.Tensor], ids: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per-micro-batch, per-token tensors cut into each completion's tokens (in order), on the CPU."""
    out: dict[int, torch.Tensor] = {}
    for tensor, sequence_ids in zip(tensors, ids, strict=True):
        for completion in torch.unique(sequence_ids[sequence_ids >= 0]).tolist():
            out[int(completion)] = tensor[sequence_ids == completion].detach().cpu()
    return out


def assemble(pieces: dict[int, torch.Tensor], sequence_ids: torch.Tensor) -> torch.Tensor:
    """A per-token tensor for a packed row from each completion's pieces (0 on tokens without loss)."""
    dtype = next(iter(pieces.values())).dtype if pieces else torch.float32
    out = torch.zeros(sequence_ids.numel(), dtype=dtype, device=sequence_ids.device)
    for completion in torch.unique(sequence_ids[sequence_ids >= 0]).tolist():
        out[sequence_ids == completion] = pieces[int(completion)].to(sequence_ids.device)
    return out


def prompt_seed(seed: int, step: int, row: int) -> int:
    """The sampling seed of the prompt in row ``row`` of the prompt set at step ``step``."""
    digest = hashlib.sha256(f"rollout:{seed}:{step}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def gather_objects(items: list[Any], info: DistInfo) -> list[Any]:
    """Every rank's ``items``, concatenated in rank order, on every rank."""
    if not dist.is_initialized() or info.world_size == 1:
        return list(items)
    boxes: list[Any] = [None] * info.world_size
    dist.all_gather_object(boxes, items)
    return [item for box in boxes for item in box]


class OnlineSteps:
    """The steps of an online run; ``train`` calls :meth:`run` once per step.

    Args:
        config: The run's options (an online ``algorithm``).
        tokenizer: The policy's tokenizer (decodes completions for the reward functions).
        info: This process's rank and device.
        precision: The compute precision (autocast) of every forward pass.
        prompts: The prompt set (``prompts.load_prompts``).
        rewards: The reward functions (``kfp_components.rewards.load_reward_set``).
    """

    updates_per_step: int

    def __init__(
        self,
        config: TrainingConfig,
        tokenizer: Any,
        info: DistInfo,
        precision: Precision,
        prompts: PromptSet,
        rewards: Any,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.info = info
        self.precision = precision
        self.prompts = prompts
        self.rewards = rewards
        self.order = PromptOrder(
            num_prompts=len(prompts.rows),
            prompts_per_step=config.effective_batch_size // config.num_generations,
            world_size=info.world_size,
            seed=config.seed,
        )
        self.sampling = SamplingOptions.of(config)
        self.kl = pg.KLController(coef=config.kl_coef, target=config.kl_target, horizon=config.kl_horizon)
        self.passes = int(config.num_iterations or 1)
        #: the scheduler's steps per step: trpo advances it once (its policy step replaces the updates)
        self.updates_per_step = 1 if config.algorithm == "trpo" else self.passes * config.num_mini_batches
        self.value_based = config.algorithm in VALUE_ALGORITHMS
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.reward_names = list(rewards.names)
        self.metric_names = (
            "reward",
            "reward_std",
            *(f"reward/{name}/mean" for name in self.reward_names),
            "kl",
            "entropy",
            "clip_fraction",
            "completion_length_mean",
            "truncated_share",
            *(("score_mean", "value_loss", "explained_variance", "approx_kl") if self.value_based else ()),
        )
        if config.algorithm == "trpo":  # no clipping, no entropy; the step's own numbers instead
            dropped = ("entropy", "clip_fraction", "approx_kl")
            self.metric_names = (
                *(n for n in self.metric_names if n not in dropped),
                "trpo_accepted",
                "trpo_kl",
            )
        self.backend: Any = None
        self.reference: nn.Module | None = None
        self.critic: Any = None  # value_model.Critic of the value algorithms

    @property
    def stats(self) -> dict[str, float]:
        return self.prompts.stats

    def steps_per_epoch(self) -> int:
        return self.order.steps_per_epoch()

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        return self.order.epoch_plan(epoch)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps beyond the model, optimizer and position: the KL coefficient."""
        return {"kl": self.kl.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "kl" in state:
            self.kl.load_state_dict(state["kl"])

    def attach(self, model: nn.Module, reference: nn.Module | None, critic: Any = None) -> None:
        """The (wrapped) policy to generate with, the reference model when KL is on, and the critic of the
        value algorithms (``value_model.Critic``)."""
        from kfp_components.trainer.rollout import HFRollouts

        if self.value_based and critic is None:
            raise ValueError(f"{self.config.algorithm} needs its value model (critic)")
        self.reference = reference
        self.critic = critic
        if self.config.rollout_backend == "vllm":
            from kfp_components.trainer.rollout_vllm import VLLMRollouts

            self.backend = VLLMRollouts(
                self.config.model_name_or_path,
                gpu_memory_utilization=self.config.vllm_gpu_memory_utilization,
                max_model_len=self.config.max_seq_len,
                seed=self.config.seed,
            )
            self.backend.sync_weights(model)  # a resumed policy is not the checkpoint the engine loaded
        else:
            self.backend = HFRollouts(model, self.tokenizer, self.info.device, self.precision.autocast)

    # ------------------------------------------------------------------------------------------------
    # One step
    # ------------------------------------------------------------------------------------------------

    def run(
        self,
        model: nn.Module,
        step_prompts: Sequence[int],
        global_step: int,
        update: Any,
    ) -> dict[str, Any]:
        """Generate, score and learn from one step's prompts; ``update()`` makes one optimizer update and
        returns (grad norm, whether it stepped, the LR used). Returns the step's metrics."""
        started = time.monotonic()
        local = self.order.for_rank(step_prompts, self.info.rank)
        completions = self.generate(local, global_step)
        generation_seconds = all_reduce_max(time.monotonic() - started, self.info.device)
        scoring_started = time.monotonic()
        rollouts = self.score(local, completions)
        reward_seconds = all_reduce_max(time.monotonic() - scoring_started, self.info.device)

        learn_started = time.monotonic()
        samples = [self.sample(r) for r in rollouts]
        plan = self.plans(samples, global_step, parts=1, epoch=0)[0]
        batches = [self.batch(samples, indices) for indices in plan.micro_batches]
        old, ref = self.fixed_logps(model, batches)
        extra: dict[str, float] = {}
        if self.value_based:
            tensors, kl_rewarded, extra = self.value_advantages(model, rollouts, batches, old, ref)
        else:
            advantages, kl_rewarded = self.advantages(rollouts, batches, old, ref)
            tensors = StepTensors(advantages=advantages, old=old, ref=ref)
        with_loss = sum(1 for s in samples if s.num_label_tokens)
        whole = Update(batches, tensors, plan.global_label_tokens, with_loss)
        sums: dict[str, float] = {}
        updates: list[tuple[float | None, bool, float]] = []
        passes_run = 0
        if self.config.algorithm == "trpo":
            sums, updates, trpo_metrics = self.trpo_update(model, samples, whole, global_step, update)
            extra.update(trpo_metrics)
            passes_run = 1
        else:
            for pass_index in range(self.passes):
                pass_sums: dict[str, float] = {}
                for chunk in self.mini_batches(samples, whole, global_step, pass_index):
                    pass_sums = _added(pass_sums, self.learn(model, chunk))
                    updates.append(update())
                    self.critic_step(updates[-1], pass_sums)
                    self.backend.sync_weights(model)
                sums = _added(sums, pass_sums)
                passes_run += 1
                if self.stop_early(pass_sums):
                    break
        training_seconds = all_reduce_max(time.monotonic() - learn_started, self.info.device)
        if kl_rewarded is not None:
            sums["kl"] = kl_rewarded * passes_run
        extra["passes"] = passes_run
        extra["reward_seconds"] = round(reward_seconds, 4)
        extra.update(self.reward_usage())
        return self.record(
            rollouts,
            plan,
            sums,
            updates,
            generation_seconds,
            training_seconds,
            time.monotonic() - started,
            extra,
        )

    def plans(
        self, samples: list[TokenizedSample], global_step: int, parts: int, epoch: int
    ) -> list[StepPlan]:
        """The step's completions in ``parts`` updates (mini-batches), planned by the token-budget sampler
        and balanced over the ranks; ``epoch`` reshuffles them (one per pass)."""
        return TokenBudgetSampler.from_samples(
            samples,
            effective_batch_size=len(samples) // parts,
            max_tokens_per_gpu=self.config.max_tokens_per_gpu,
            world_size=self.info.world_size,
            rank=self.info.rank,
            seed=self.config.seed + global_step,
        ).epoch_plan(epoch)

    def mini_batches(
        self, samples: list[TokenizedSample], whole: Update, global_step: int, pass_index: int
    ) -> list[Update]:
        """The updates of one pass: the whole step (``num_mini_batches`` 1), or its completions reshuffled
        into ``num_mini_batches`` mini-batches, each with its micro-batches, their tensors and its counts."""
        parts = self.config.num_mini_batches
        if parts == 1:
            return [whole]
        if whole.pieces is None:  # each completion's tensors, from every rank, once per step
            ids = [sequence_ids for _, sequence_ids in whole.batches]
            local = {name: by_completion(values, ids) for name, values in whole.tensors.fields().items()}
            gathered = gather_objects([local], self.info)
            whole.pieces = {
                name: {c: t for rank_part in gathered for c, t in rank_part[name].items()} for name in local
            }
        pieces = whole.pieces
        chunks = []
        for plan in self.plans(samples, global_step, parts=parts, epoch=pass_index + 1):
            batches = [self.batch(samples, indices) for indices in plan.micro_batches]
            tensors = StepTensors(
                **{
                    name: [assemble(pieces[name], sequence_ids) for _, sequence_ids in batches]
                    for name in pieces
                }
            )
            mine = sum(1 for indices in plan.micro_batches for i in indices if samples[i].num_label_tokens)
            completions = int(all_reduce_sum(torch.tensor([float(mine)], device=self.info.device))[0])
            chunks.append(Update(batches, tensors, plan.global_label_tokens, completions))
        return chunks

    def stop_early(self, pass_sums: dict[str, float]) -> bool:
        """Whether a pass's approximate KL to the generating policy (per token, over all ranks) is above
        ``early_stop_kl``: the same answer on every rank."""
        if not self.config.early_stop_kl or "approx_kl" not in pass_sums:
            return False
        totals = all_reduce_sum(
            torch.tensor(
                [pass_sums["approx_kl"], pass_sums["tokens"]], dtype=torch.float64, device=self.info.device
            )
        )
        return float(totals[0] / totals[1].clamp(min=1)) > self.config.early_stop_kl

    def critic_step(self, update: tuple[float | None, bool, float], sums: dict[str, float]) -> None:
        """The critic's optimizer update after the policy's, at the policy's schedule factor."""
        if self.critic is None:
            return
        _, stepped, lr = update
        if stepped:
            norm = self.critic.step(lr / self.config.learning_rate)
            sums["value_grad_norm"] = sums.get("value_grad_norm", 0.0) + norm / self.info.world_size
            sums["value_updates"] = sums.get("value_updates", 0.0) + 1.0 / self.info.world_size

    def critic_update(
        self,
        samples: list[TokenizedSample],
        whole: Update,
        global_step: int,
        passes: int,
        lr_scale: float,
    ) -> dict[str, float]:
        """The critic's value-loss passes on their own (``passes`` x ``num_mini_batches`` updates of the
        value model only), for an algorithm whose policy step is not a gradient step; returns this rank's
        metric sums (``value_loss``, ``value_clipped``, ``value_tokens``, ...)."""
        if self.critic is None:
            raise ValueError(f"{self.config.algorithm} has no value model")
        sums: dict[str, float] = {}
        for pass_index in range(passes):
            for chunk in self.mini_batches(samples, whole, global_step, pass_index):
                sums = _added(sums, self.learn(None, chunk))
                norm = self.critic.step(lr_scale)
                sums["value_grad_norm"] = sums.get("value_grad_norm", 0.0) + norm / self.info.world_size
                sums["value_updates"] = sums.get("value_updates", 0.0) + 1.0 / self.info.world_size
        return sums

    def trpo_update(
        self, model: nn.Module, samples: list[TokenizedSample], whole: Update, global_step: int, update: Any
    ) -> tuple[dict[str, float], list[tuple[float | None, bool, float]], dict[str, float]]:
        """trpo's policy and critic phases: one natural-gradient step of the policy over this rank's
        micro-batches (normalised by the step's loss tokens over all ranks, reduced over the ranks, projected
        under ``osft_constraint``), the LR schedule's step (``update.advance_schedule``: the policy's AdamW
        is not used), then ``value_epochs`` passes of the critic at the schedule's factor, then the weights
        to the rollout backend. Returns this rank's metric sums, the step's update as the loop records it
        (the surrogate's gradient norm, True, the schedule's LR) and the step's ``trpo_*`` metrics."""
        from kfp_components.trainer import trpo
        from kfp_components.trainer.osft import project_osft_parameters

        config = self.config
        tensors = whole.tensors
        if tensors.old is None:
            raise ValueError("trpo needs the generating policy's log-probs of the step")
        policy = unwrap(model)
        params = [p for p in policy.parameters() if p.requires_grad]
        batches = [
            trpo.packed_micro_batch(
                policy,
                batch,
                sequence_ids,
                advantages,
                old,
                temperature=config.temperature,
                device=self.info.device,
                autocast=self.precision.autocast,
            )
            for (batch, sequence_ids), advantages, old in zip(
                whole.batches, tensors.advantages, tensors.old, strict=True
            )
        ]
        was_training = policy.training
        policy.eval()  # no dropout: the line search compares separate forwards (see docs/rl.md, TRPO)
        try:
            result = trpo.natural_gradient_step(
                params,
                batches,
                normaliser=float(max(whole.label_tokens, 1)),
                max_kl=config.max_kl,
                cg_iterations=config.cg_iterations,
                cg_damping=config.cg_damping,
                line_search_steps=config.line_search_steps,
                line_search_shrink=config.line_search_shrink,
                reduce=all_reduce_sum,
                project=trpo.osft_projection(policy, params) if config.uses_osft else None,
            )
        finally:
            policy.train(was_training)
        if result.accepted and config.uses_osft:
            project_osft_parameters(model)  # as after an optimizer step, against rounding
        lr = update.advance_schedule()
        sums = self.critic_update(samples, whole, global_step, config.value_epochs, lr / config.learning_rate)
        sums.pop("loss", None)  # the critic's weighted loss; the step's loss is the policy's
        self.backend.sync_weights(model)
        ids = [sequence_ids for _, sequence_ids in whole.batches]
        sums["tokens"] = float(sum(int((i >= 0).sum()) for i in ids))
        sums["completions"] = float(sum(torch.unique(i[i >= 0]).numel() for i in ids))
        # the policy loss before the step, -L(theta_old), the same on every rank: counted once
        sums["loss"] = -result.surrogate if self.info.rank == 0 else 0.0
        return sums, [(result.gradient_norm, True, lr)], result.metrics()

    def generate(self, local: list[int], global_step: int) -> list[Completion]:
        """This rank's completions; each prompt's draws come from a seed of (seed, step, prompt), so they do
        not depend on the number of ranks or on where a resumed run started."""
        seeds = [prompt_seed(self.config.seed, global_step, row) for row in local]
        prompt_ids = [self.prompts.rows[i].prompt_ids for i in local]
        return self.backend.generate(prompt_ids, self.sampling, seeds)

    def score(self, local: list[int], completions: list[Completion]) -> list[Rollout]:
        """Score this rank's completions, then gather every rank's; a reward error on any rank stops all."""
        from kfp_components.rewards import RewardError, RewardScores

        rows = [self.prompts.rows[local[c.prompt_index]] for c in completions]
        columns = {name: [row.columns.get(name) for row in rows] for name in self.prompts.column_names}
        error = None
        nothing: list[float | None] = [None] * len(rows)
        scores = RewardScores({name: nothing for name in self.reward_names}, nothing)
        try:
            scores = self.rewards.score([row.prompt for row in rows], [c.text for c in completions], columns)
        except RewardError as exc:
            error = (exc.reference, exc.detail, exc.index, exc.prompt)
        offset = self.info.rank * len(local)
        mine = [
            Rollout(
                row=local[c.prompt_index],
                group=offset + c.prompt_index,
                prompt_ids=list(c.prompt_ids),
                completion_ids=list(c.completion_ids),
                finish_reason=c.finish_reason,
                rewards={name: scores.per_function[name][i] for name in self.reward_names},
                total=scores.total[i],
                error=error,
            )
            for i, c in enumerate(completions)
        ]
        rollouts = gather_objects(mine, self.info)
        failed = next((r.error for r in rollouts if r.error), None)
        if failed:
            reference, message, index, prompt = failed
            raise RewardError(reference, message, index=index, prompt=prompt)
        from kfp_components.rewards.scoring import unscored_problem

        unscored = unscored_problem(
            self.rewards, {name: [r.rewards[name] for r in rollouts] for name in self.reward_names}
        )
        if unscored is not None:  # the same on every rank: the step's scores are gathered
            raise unscored
        return rollouts

    def sample(self, rollout: Rollout) -> TokenizedSample:
        """The completion as a training sample: its prompt labelled -100, and all of it when it is truncated
        and ``mask_truncated_completions`` is set."""
        masked = self.config.mask_truncated_completions and rollout.finish_reason == "length"
        masked = masked or (self.value_based and rollout.total is None)  # no score: no loss at all
        completion_labels = [IGNORE_INDEX] * len(rollout.completion_ids) if masked else rollout.completion_ids
        return TokenizedSample(
            input_ids=rollout.prompt_ids + rollout.completion_ids,
            labels=[IGNORE_INDEX] * len(rollout.prompt_ids) + list(completion_labels),
        )

    def batch(self, samples: list[TokenizedSample], indices: list[int]) -> tuple[MicroBatch, torch.Tensor]:
        """A packed micro-batch and the completion index of each of its tokens (-1: no loss)."""
        if not indices:
            dummy = dummy_micro_batch(self.pad_token_id)
            return dummy, torch.full((1,), -1, dtype=torch.long, device=self.info.device)
        micro_batch = collate(samples, indices)
        ids = pg.packed_sequence_ids(
            micro_batch.position_ids, micro_batch.targets, micro_batch.sample_indices
        )
        return micro_batch, ids.to(self.info.device)

    # ------------------------------------------------------------------------------------------------

    def token_logps(
        self, model: nn.Module, batch: MicroBatch, with_entropy: bool = False, entropy_grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token log-probabilities (of the sampling distribution, temperature included) and entropies."""
        device = self.info.device
        with self.precision.autocast():
            out = model(
                input_ids=batch.input_ids.to(device),
                position_ids=batch.position_ids.to(device),
                use_cache=False,
            )
        return pg.token_logps_and_entropy(
            out.logits,
            batch.targets.to(device),
            temperature=self.config.temperature,
            with_entropy=with_entropy,
            entropy_grad=entropy_grad,
        )

    @torch.no_grad()
    def fixed_logps(
        self, model: nn.Module, batches: list[tuple[MicroBatch, torch.Tensor]]
    ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """Per micro-batch, computed once per step: the generating policy's log-probs (needed with
        ``num_iterations > 1``, or for the KL in the reward) and the reference model's (KL on)."""
        kl_on = self.config.kl_coef > 0
        old = None
        trpo = self.config.algorithm == "trpo"  # the surrogate's ratio needs them
        if trpo or self.updates_per_step > 1 or (kl_on and self.config.kl_in == "reward"):
            old = [self.token_logps(model, b)[0] for b, _ in batches]
        ref = None
        if kl_on:
            if self.reference is not None:
                ref = [self.token_logps(self.reference, b)[0] for b, _ in batches]
            else:  # LoRA: the reference is the model without its adapter
                with unwrap(model).disable_adapter():  # type: ignore[operator]
                    ref = [self.token_logps(model, b)[0] for b, _ in batches]
        return old, ref

    def advantages(
        self,
        rollouts: list[Rollout],
        batches: list[tuple[MicroBatch, torch.Tensor]],
        old: list[torch.Tensor] | None,
        ref: list[torch.Tensor] | None,
    ) -> tuple[list[torch.Tensor], float | None]:
        """Per micro-batch, the advantage of every token (grpo, rloo, reinforce_pp; the value algorithms'
        are :meth:`value_advantages`); and with ``kl_in: reward`` the summed k1 KL of this rank's tokens (for
        the metrics)."""
        algorithm = self.config.algorithm
        if algorithm not in ("grpo", "rloo", "reinforce_pp"):
            raise ValueError(
                f"advantages without a value model are those of grpo, rloo and reinforce_pp, not {algorithm!r}"
            )
        device = self.info.device
        rewards = torch.tensor(
            [math.nan if r.total is None else r.total for r in rollouts], dtype=torch.float64, device=device
        )
        ids = [sequence_ids for _, sequence_ids in batches]
        kl = None
        kl_sum = None
        if ref is not None and old is not None and self.config.kl_in == "reward":
            kl = [
                torch.where(i >= 0, pg.kl_per_token(o, r, "k1"), 0.0)
                for o, r, i in zip(old, ref, ids, strict=True)
            ]
            kl_sum = float(sum(float(k.sum()) for k in kl))
        if algorithm == "reinforce_pp":
            # Whitened over every token of the step: this rank's micro-batches in one vector, the moments
            # summed over the ranks.
            sizes = [len(i) for i in ids]
            joined = pg.reinforce_pp_advantages(
                rewards,
                torch.cat(ids),
                kl=torch.cat(kl).double() if kl is not None else None,
                kl_coef=self.kl.coef,
                baseline=self.config.reinforce_pp_baseline,
                group_size=self.config.num_generations,
                reduce=all_reduce_sum,
            )
            return [part.float() for part in torch.split(joined, sizes)], kl_sum
        if kl is not None:  # grpo, rloo: a completion's summed KL comes off its reward
            penalty = torch.zeros_like(rewards)
            for k, i in zip(kl, ids, strict=True):
                penalty.index_add_(0, i[i >= 0], k[i >= 0].double())
            rewards = rewards - self.kl.coef * all_reduce_sum(penalty)
        if algorithm == "grpo":
            per_completion = pg.group_advantages(
                rewards, self.config.num_generations, self.config.scale_rewards
            )
        else:  # rloo
            per_completion = pg.rloo_advantages(rewards, self.config.num_generations)
        return [pg.per_token(per_completion, i).float() for i in ids], kl_sum

    @torch.no_grad()
    def value_advantages(
        self,
        model: nn.Module,
        rollouts: list[Rollout],
        batches: list[tuple[MicroBatch, torch.Tensor]],
        old: list[torch.Tensor] | None,
        ref: list[torch.Tensor] | None,
    ) -> tuple[StepTensors, float | None, dict[str, float]]:
        """The value algorithms' tensors of a step: the critic's values, the token rewards (the shaped score
        at each completion's last token, minus ``kl_coef`` x the per-token KL with ``kl_in: reward``), GAE
        advantages (whitened over the step with ``whiten_advantages``) and returns; the summed KL of this
        rank's tokens (``kl_in: reward``) and the step's value metrics (the same on every rank)."""
        config = self.config
        device = self.info.device
        ids = [sequence_ids for _, sequence_ids in batches]
        values = []
        for batch, _ in batches:
            with self.precision.autocast():
                values.append(self.critic.values(batch.input_ids, batch.position_ids).float())
        scores = torch.tensor(
            [math.nan if r.total is None else r.total for r in rollouts], dtype=torch.float64, device=device
        )
        truncated = torch.tensor([r.finish_reason == "length" for r in rollouts], device=device)
        shaped = pg.shape_scores(
            scores, truncated, missing_eos_penalty=config.missing_eos_penalty, reward_clip=config.reward_clip
        )
        kl: list[torch.Tensor | None] = [None] * len(batches)
        kl_sum = None
        if ref is not None and old is not None and config.kl_in == "reward":
            kl = [
                torch.where(i >= 0, pg.kl_per_token(o, r, config.kl_estimator), 0.0).double()
                for o, r, i in zip(old, ref, ids, strict=True)
            ]
            kl_sum = float(sum(float(k.sum()) for k in kl if k is not None))
        token_rewards = [
            pg.reinforce_pp_token_rewards(shaped, i, k, self.kl.coef) for i, k in zip(ids, kl, strict=True)
        ]
        masks = [i >= 0 for i in ids]
        if config.whiten_rewards:
            sizes = [len(i) for i in ids]
            joined = pg.whiten(
                torch.cat(token_rewards), torch.cat(masks), reduce=all_reduce_sum, shift_mean=False
            )
            token_rewards = list(torch.split(joined, sizes))
        gae = [
            pg.gae_advantages(r, v, i, gamma=config.gamma, lam=config.gae_lambda)
            for r, v, i in zip(token_rewards, values, ids, strict=True)
        ]
        advantages = [a for a, _ in gae]
        returns = [r for _, r in gae]
        mask = torch.cat(masks)
        joined_advantages = torch.cat(advantages)
        _, variance = pg.masked_moments(joined_advantages, mask, reduce=all_reduce_sum)
        value_mean, _ = pg.masked_moments(torch.cat(values), mask, reduce=all_reduce_sum)
        returns_mean, _ = pg.masked_moments(torch.cat(returns), mask, reduce=all_reduce_sum)
        if config.whiten_advantages:
            sizes = [len(i) for i in ids]
            advantages = list(torch.split(pg.whiten(joined_advantages, mask, reduce=all_reduce_sum), sizes))
        scored = shaped[~torch.isnan(shaped)]
        metrics = {
            "score_mean": float(scored.mean()) if scored.numel() else math.nan,
            "value_mean": float(value_mean),
            "returns_mean": float(returns_mean),
            "advantages_std": float(variance.sqrt()),
            "explained_variance": pg.explained_variance(
                torch.cat(values), torch.cat(returns), mask, reduce=all_reduce_sum
            ),
        }
        tensors = StepTensors(
            advantages=[a.float() for a in advantages],
            old=old,
            ref=ref,
            values=values,
            returns=[r.float() for r in returns],
        )
        return tensors, kl_sum, metrics

    def reward_usage(self) -> dict[str, float]:
        """What the reward functions that count their work (a judge's requests, tokens, cache hits) did so
        far in this run, summed over the ranks: ``reward/<name>/<counter>``."""
        usage = self.rewards.usage()
        if not usage:
            return {}
        names = sorted(usage)
        reduced = all_reduce_sum(
            torch.tensor([usage[n] for n in names], dtype=torch.float64, device=self.info.device)
        )
        return dict(zip(names, reduced.tolist(), strict=True))

    def reward_statistics(self, rollouts: list[Rollout]) -> dict[str, float]:
        """The step's reward metrics over every rank's completions (see ``RewardScores.statistics``)."""
        from kfp_components.rewards import RewardScores

        per_function = {name: [r.rewards[name] for r in rollouts] for name in self.reward_names}
        return RewardScores(per_function, [r.total for r in rollouts]).statistics()

    def learn(self, model: nn.Module | None, chunk: Update) -> dict[str, float]:
        """Forward and backward every micro-batch of this rank in ``chunk`` once (the gradients accumulate
        for one update); returns this rank's metric sums. ``model`` None: the critic's value loss only."""
        config = self.config
        # DDP and FSDP2 average the gradients over the ranks, so each rank divides by its share of the
        # update's normaliser: the update is that of the whole update in one process.
        world = self.info.world_size
        normaliser = pg.loss_normaliser(
            config.loss_aggregation,
            completion_tokens=max(chunk.label_tokens, 1),
            completions=max(chunk.completions, 1),
            max_new_tokens=config.max_new_tokens,
        )
        per_rank = normaliser / world
        per_rank_tokens = max(chunk.label_tokens, 1) / world
        tensors = chunk.tensors
        ref, old = tensors.ref, tensors.old
        kl_in_loss = ref is not None and config.kl_in == "loss"
        entropy_coef = float(config.entropy_coef or 0.0) if self.value_based else 0.0
        vf_coef = float(config.vf_coef or 0.0)
        sums: dict[str, float] = {}
        last = len(chunk.batches) - 1
        for i, (batch, sequence_ids) in enumerate(chunk.batches):
            with contextlib.ExitStack() as stack:
                if model is not None:
                    stack.enter_context(gradient_sync(model, enabled=i == last))
                if self.critic is not None:
                    stack.enter_context(gradient_sync(self.critic.module, enabled=i == last))
                loss = torch.zeros((), device=self.info.device)
                if model is not None:
                    logps, entropy = self.token_logps(
                        model, batch, with_entropy=True, entropy_grad=entropy_coef > 0
                    )
                    policy, metric_sums = pg.policy_loss(
                        logps,
                        old[i] if old is not None else logps.detach(),
                        tensors.advantages[i],
                        sequence_ids,
                        ratio_level="sequence" if config.algorithm == "rloo" else "token",
                        epsilon_low=config.epsilon_low,
                        epsilon_high=config.epsilon_high,
                        aggregation=config.loss_aggregation,
                        normaliser=per_rank,
                        ref_logps=ref[i] if kl_in_loss and ref is not None else None,
                        kl_coef=self.kl.coef if kl_in_loss else 0.0,
                        entropies=entropy,
                    )
                    if entropy_coef and entropy is not None:
                        policy = (
                            policy - entropy_coef * (entropy * (sequence_ids >= 0)).sum() / per_rank_tokens
                        )
                    loss = loss + policy
                    for key, value in metric_sums.items():
                        sums[key] = sums.get(key, 0.0) + float(value)
                    if old is not None:  # approximate KL(generating || current), k3 on the sampled tokens
                        approx = pg.kl_per_token(old[i], logps.detach(), "k3")
                        sums["approx_kl"] = sums.get("approx_kl", 0.0) + float(
                            torch.where(sequence_ids >= 0, approx, 0.0).double().sum()
                        )
                if self.critic is not None and tensors.values is not None and tensors.returns is not None:
                    with self.precision.autocast():
                        values = self.critic.values(batch.input_ids, batch.position_ids)
                    critic_loss, value_sums = pg.value_loss(
                        values,
                        tensors.values[i],
                        tensors.returns[i],
                        sequence_ids,
                        value_clip=config.value_clip if config.algorithm != "a2c" else 0.0,
                        normaliser=per_rank_tokens,
                    )
                    loss = loss + vf_coef * critic_loss
                    for key, value in value_sums.items():
                        sums[key] = sums.get(key, 0.0) + float(value)
                self.precision.backward(loss)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / world
        return sums

    def record(
        self,
        rollouts: list[Rollout],
        plan: StepPlan,
        sums: dict[str, float],
        updates: list[tuple[float | None, bool, float]],
        generation_seconds: float,
        training_seconds: float,
        seconds: float,
        extra: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """The step's metrics (``metrics.jsonl``), the same on every rank; then the KL controller's update."""
        names = sorted(sums)
        reduced = all_reduce_sum(
            torch.tensor([sums[n] for n in names], dtype=torch.float64, device=self.info.device)
        )
        total = dict(zip(names, reduced.tolist(), strict=True))
        iterations = len(updates)
        tokens = max(total.get("tokens", 0.0), 1.0)  # loss tokens over every iteration
        lengths = [len(r.completion_ids) for r in rollouts]
        generated = sum(lengths)
        grad_norm, _, lr = updates[-1]
        kl = total.get("kl", 0.0) / tokens if self.config.kl_coef > 0 else 0.0
        kl_per_completion = total.get("kl", 0.0) / max(total.get("completions", 0.0), 1.0)
        record: dict[str, Any] = {
            "loss": total.get("loss", 0.0) / iterations,
            "lr": lr,
            "grad_norm": grad_norm,
            **self.reward_statistics(rollouts),
            "kl": kl,
            "kl_per_completion": kl_per_completion if self.config.kl_coef > 0 else 0.0,
            "kl_coef": self.kl.coef,
            "entropy": total.get("entropy", 0.0) / tokens,
            "clip_fraction": (total.get("clipped_low", 0.0) + total.get("clipped_high", 0.0)) / tokens,
            "clip_low_fraction": total.get("clipped_low", 0.0) / tokens,
            "clip_high_fraction": total.get("clipped_high", 0.0) / tokens,
            "completion_length_mean": generated / max(len(rollouts), 1),
            "completion_length_max": max(lengths, default=0),
            "truncated_share": sum(r.finish_reason == "length" for r in rollouts) / max(len(rollouts), 1),
            "samples": len(rollouts),
            "tokens": plan.global_tokens,
            "loss_units": plan.global_label_tokens,
            "micro_batches": len(plan.micro_batches),
            "generation_seconds": round(generation_seconds, 4),
            "training_seconds": round(training_seconds, 4),
            "seconds": round(seconds, 4),
            "generation_tokens_per_second": generated / max(generation_seconds, 1e-9),
            "training_tokens_per_second": plan.global_tokens * iterations / max(training_seconds, 1e-9),
            "tokens_per_second": plan.global_tokens / max(seconds, 1e-9),
            "memory_mib": peak_memory_mib(self.info.device),
        }
        if self.value_based:
            value_tokens = max(total.get("value_tokens", 0.0), 1.0)
            value_updates = max(total.get("value_updates", 0.0), 1.0)
            record.update(
                {
                    "value_loss": total.get("value_loss", 0.0) / value_tokens,
                    "value_clip_fraction": total.get("value_clipped", 0.0) / value_tokens,
                    "value_grad_norm": total.get("value_grad_norm", 0.0) / value_updates,
                    "approx_kl": total.get("approx_kl", 0.0) / tokens,
                }
            )
        if (
            self.config.algorithm == "trpo"
        ):  # no ratio clipping, no entropy, no approximate KL: trpo_* instead
            for key in ("entropy", "clip_fraction", "clip_low_fraction", "clip_high_fraction", "approx_kl"):
                record.pop(key, None)
        record.update(extra or {})
        if not all(stepped for _, stepped, _ in updates):
            record["step_skipped"] = True
        if self.kl.adaptive:  # Ziegler et al.: the horizon counts completions
            self.kl.update(kl_per_completion, len(rollouts))
        return record


def _added(into: dict[str, float], more: dict[str, float]) -> dict[str, float]:
    """``into`` with ``more``'s values added key by key."""
    for key, value in more.items():
        into[key] = into.get(key, 0.0) + value
    return into


def build_online_steps(
    config: TrainingConfig, tokenizer: Any, info: DistInfo, precision: Precision
) -> OnlineSteps:
    """Read the prompts and load the reward functions (before any model loads); errors name the option."""
    from kfp_components.rewards import RewardError, load_reward_set
    from kfp_components.trainer.prompts import load_prompts
    from kfp_components.trainer.tokenize import ChatTemplateError, SampleError
    from kfp_components.typed_config import ConfigError

    try:
        prompts = load_prompts(
            config.data_path,
            tokenizer,
            max_prompt_tokens=config.max_seq_len - config.max_new_tokens,
            overlong=config.overlong,
        )
    except (SampleError, ChatTemplateError) as exc:
        raise ConfigError("data_path", str(exc)) from None
    if not prompts.rows:
        raise ConfigError("data_path", f"{config.data_path}: no usable prompts ({prompts.stats})")
    try:
        rewards = load_reward_set(
            config.all_reward_functions,
            config.reward_weights or None,
            base_dir=None,
            tokenizer=tokenizer,
            device=str(info.device),
        )
    except RewardError as exc:
        raise ConfigError("reward_functions", str(exc)) from None
    try:
        return OnlineSteps(config, tokenizer, info, precision, prompts, rewards)
    except ValueError as exc:  # the prompts do not fill a step, or do not split over the ranks
        raise ConfigError("effective_batch_size", str(exc)) from None
