"""The steps of the online algorithms (grpo, rloo, reinforce_pp): generate, score, learn.

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
6. **learn**: ``num_iterations`` optimizer updates over the micro-batches, with the clipped policy loss
   normalised by the whole step's completion tokens (or completions), so every rank count gives the same
   update; then the adaptive KL coefficient moves toward its target.
"""

from __future__ import annotations

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
from kfp_components.trainer.config import TrainingConfig
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
        self.sampling = SamplingOptions(
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            max_new_tokens=config.max_new_tokens,
            stop_strings=tuple(config.stop_strings),
            num_generations=config.num_generations,
        )
        self.kl = pg.KLController(coef=config.kl_coef, target=config.kl_target, horizon=config.kl_horizon)
        self.updates_per_step = config.num_iterations
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
        )
        self.backend: Any = None
        self.reference: nn.Module | None = None

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

    def attach(self, model: nn.Module, reference: nn.Module | None) -> None:
        """The (wrapped) policy to generate with, and the reference model when KL is on."""
        from kfp_components.trainer.rollout import HFRollouts

        self.reference = reference
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
        rollouts = self.score(local, completions)

        learn_started = time.monotonic()
        samples = [self.sample(r) for r in rollouts]
        plan = TokenBudgetSampler.from_samples(
            samples,
            effective_batch_size=len(samples),
            max_tokens_per_gpu=self.config.max_tokens_per_gpu,
            world_size=self.info.world_size,
            rank=self.info.rank,
            seed=self.config.seed + global_step,
        ).epoch_plan(0)[0]
        batches = [self.batch(samples, indices) for indices in plan.micro_batches]
        old, ref = self.fixed_logps(model, batches)
        advantages, kl_rewarded = self.advantages(rollouts, batches, old, ref)
        with_loss = sum(1 for s in samples if s.num_label_tokens)
        normaliser = pg.loss_normaliser(
            self.config.loss_aggregation,
            completion_tokens=max(plan.global_label_tokens, 1),
            completions=max(with_loss, 1),
            max_new_tokens=self.config.max_new_tokens,
        )
        sums: dict[str, float] = {}
        updates = []
        for _ in range(self.config.num_iterations):
            for key, value in self.learn(model, batches, advantages, old, ref, normaliser).items():
                sums[key] = sums.get(key, 0.0) + value
            updates.append(update())
            self.backend.sync_weights(model)
        training_seconds = all_reduce_max(time.monotonic() - learn_started, self.info.device)
        if kl_rewarded is not None:
            sums["kl"] = kl_rewarded * self.config.num_iterations
        return self.record(
            rollouts, plan, sums, updates, generation_seconds, training_seconds, time.monotonic() - started
        )

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
        return rollouts

    def sample(self, rollout: Rollout) -> TokenizedSample:
        """The completion as a training sample: its prompt labelled -100, and all of it when it is truncated
        and ``mask_truncated_completions`` is set."""
        masked = self.config.mask_truncated_completions and rollout.finish_reason == "length"
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
        self, model: nn.Module, batch: MicroBatch, with_entropy: bool = False
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
        )

    @torch.no_grad()
    def fixed_logps(
        self, model: nn.Module, batches: list[tuple[MicroBatch, torch.Tensor]]
    ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """Per micro-batch, computed once per step: the generating policy's log-probs (needed with
        ``num_iterations > 1``, or for the KL in the reward) and the reference model's (KL on)."""
        kl_on = self.config.kl_coef > 0
        old = None
        if self.config.num_iterations > 1 or (kl_on and self.config.kl_in == "reward"):
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
        """Per micro-batch, the advantage of every token; and with ``kl_in: reward`` the summed k1 KL of this
        rank's tokens (for the metrics)."""
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
        if self.config.algorithm == "reinforce_pp":
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
        if self.config.algorithm == "grpo":
            per_completion = pg.group_advantages(
                rewards, self.config.num_generations, self.config.scale_rewards
            )
        else:
            per_completion = pg.rloo_advantages(rewards, self.config.num_generations)
        return [pg.per_token(per_completion, i).float() for i in ids], kl_sum

    def reward_statistics(self, rollouts: list[Rollout]) -> dict[str, float]:
        """The step's reward metrics over every rank's completions (see ``RewardScores.statistics``)."""
        from kfp_components.rewards import RewardScores

        per_function = {name: [r.rewards[name] for r in rollouts] for name in self.reward_names}
        return RewardScores(per_function, [r.total for r in rollouts]).statistics()

    def learn(
        self,
        model: nn.Module,
        batches: list[tuple[MicroBatch, torch.Tensor]],
        advantages: list[torch.Tensor],
        old: list[torch.Tensor] | None,
        ref: list[torch.Tensor] | None,
        normaliser: float,
    ) -> dict[str, float]:
        """Forward and backward every micro-batch of this rank once (the gradients accumulate for one
        update); returns this rank's metric sums."""
        # DDP and FSDP2 average the gradients over the ranks, so each rank divides by its share of the
        # step's normaliser: the update is that of the whole step in one process.
        per_rank = normaliser / self.info.world_size
        kl_in_loss = ref is not None and self.config.kl_in == "loss"
        sums: dict[str, float] = {}
        for i, (batch, sequence_ids) in enumerate(batches):
            with gradient_sync(model, enabled=i == len(batches) - 1):
                logps, entropy = self.token_logps(model, batch, with_entropy=True)
                loss, metric_sums = pg.policy_loss(
                    logps,
                    old[i] if old is not None else logps.detach(),
                    advantages[i],
                    sequence_ids,
                    ratio_level="sequence" if self.config.algorithm == "rloo" else "token",
                    epsilon_low=self.config.epsilon_low,
                    epsilon_high=self.config.epsilon_high,
                    aggregation=self.config.loss_aggregation,
                    normaliser=per_rank,
                    ref_logps=ref[i] if kl_in_loss and ref is not None else None,
                    kl_coef=self.kl.coef if kl_in_loss else 0.0,
                    entropies=entropy,
                )
                self.precision.backward(loss)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) / self.info.world_size
            for key, value in metric_sums.items():
                sums[key] = sums.get(key, 0.0) + float(value)
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
        if not all(stepped for _, stepped, _ in updates):
            record["step_skipped"] = True
        if self.kl.adaptive:  # Ziegler et al.: the horizon counts completions
            self.kl.update(kl_per_completion, len(rollouts))
        return record


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
            config.reward_functions,
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
