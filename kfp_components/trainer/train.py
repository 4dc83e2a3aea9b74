"""The training loop: read it top to bottom.

``train(config)`` runs SFT (full or LoRA), OSFT, DPO, reward-model training or an online algorithm (GRPO,
RLOO, REINFORCE++, PPO, A2C, TRPO; the last three with a value model, ``value_model``, saved in every
checkpoint beside the policy) in one process or under torchrun (DDP or FSDP2; trpo: DDP):

1. check the inputs (``preflight``); join the process group; load the tokenizer and tokenise the data
   (chat template, assistant-only labels, each row's loss weight), and the eval data when there is some;
   load the frozen teacher of logit distillation when ``distill_teacher_path`` is set;
2. load the model in fp32 (master weights), apply OSFT or LoRA, Liger kernels on GPU, activation
   checkpointing, then wrap it for DDP or FSDP2;
3. plan every step: ``effective_batch_size`` samples, packed padding-free into micro-batches of at most
   ``max_tokens_per_gpu`` tokens per rank (see ``batching``); ``num_train_epochs`` passes over the data, or
   exactly ``max_steps`` steps when set (more passes as needed);
4. for each step (``train_step``): forward/backward every micro-batch in the compute precision
   (``precision``) with the loss normalised by the label tokens of the whole global batch; unscale fp16
   gradients; project OSFT gradients; clip; AdamW (skipped when fp16 gradients overflowed); project OSFT
   parameters; schedule the LR;
   An online algorithm's step (``online.OnlineSteps``) first generates completions of its prompts with the
   current model and scores them, then packs them like SFT data and makes ``num_iterations`` such updates
   with the policy-gradient loss (see ``online``); the optimizer update itself is the same (``Updater``),
   except trpo's, one natural-gradient step (``trpo``; its memory is checked once the model is loaded);
5. log metrics per step, compute the eval loss at the end of every epoch and every ``eval_steps``, save
   resumable checkpoints, then the last checkpoint and the final HF checkpoint, then the final eval loss,
   the run's config and a summary of the whole run (every attempt, when it was resumed).

Around it: the run holds the lock of ``output_dir`` (one run per folder), a resume continues only a
checkpoint of the same run (its fingerprint) and passes over damaged ones, and SIGINT or SIGTERM stop it
after the current step with a checkpoint (``stopping``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from kfp_components.locking import acquire_folder_lock, release_folder_lock
from kfp_components.trainer import attention, dpo, osft, reward_modeling, trpo
from kfp_components.trainer.batching import StepPlan, TokenBudgetSampler
from kfp_components.trainer.checkpoint import (
    CHECKPOINTS,
    TrainerState,
    checkpoint_dir,
    find_resumable_checkpoint,
    full_model_state_dict,
    load_checkpoint,
    read_fingerprint,
    remove_checkpoints,
    save_checkpoint,
    save_hf_model,
    use_default_permissions,
)
from kfp_components.trainer.config import VALUE_ALGORITHMS, TrainingConfig
from kfp_components.trainer.distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_object,
    fsdp_mesh,
    gradient_sync,
    init_distributed,
    peak_memory_mib,
    unwrap,
    wrap_model,
)
from kfp_components.trainer.fingerprint import fingerprint_differences, run_fingerprint
from kfp_components.trainer.objectives import Distillation, LanguageModelling, Objective
from kfp_components.trainer.online import OnlineSteps, build_online_steps
from kfp_components.trainer.precision import Precision, finite_or_none
from kfp_components.trainer.preflight import model_source, preflight_problems
from kfp_components.trainer.progress import MetricsLog, Progress, no_transformers_progress_bars
from kfp_components.trainer.stopping import StopOnSignal, TrainingInterrupted
from kfp_components.trainer.tokenize import ChatTemplateError, SampleError, tokenize_jsonl
from kfp_components.trainer.tracking import Trackers
from kfp_components.trainer.value_model import build_critic
from kfp_components.typed_config import ConfigError

log = logging.getLogger("kfp_components.trainer")

FINAL_MODEL_DIR = "final"
#: The options of a run, beside its summary and inside its final model; written when the run succeeds.
TRAINING_CONFIG_FILE = "training_config.json"


@dataclass
class TrainingSummary:
    """What a run did; written to ``<output_dir>/summary.json``."""

    algorithm: str
    steps: int
    epochs: int
    samples_seen: int
    tokens_seen: int
    final_loss: float
    mean_loss: float
    tokens_per_second: float
    duration_seconds: float
    world_size: int
    model_path: str
    data: dict[str, float]
    peak_memory_mib: float
    #: the last eval loss (None without eval data); every evaluation is in ``eval_history``
    eval_loss: float | None = None
    #: every evaluation: step, eval_loss and the objective's metrics on the eval data (``eval_accuracy``, ...)
    eval_history: list[dict[str, float]] = field(default_factory=list)
    #: optimizer steps skipped because fp16 gradients overflowed
    skipped_steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    #: the processes that trained this run: 1, plus one per resume
    attempts: int = 1


def train(config: TrainingConfig) -> TrainingSummary:
    """Run one training (see the module's description); every rank of a torchrun job calls it.

    Raises :class:`ConfigError` for bad options or inputs, another run holding ``output_dir``, or a
    checkpoint that belongs to another run; :class:`TrainingInterrupted` after SIGINT or SIGTERM.
    """
    started = time.monotonic()
    info = init_distributed()
    check_inputs(config, info)
    lock_output_dir(config, info)
    trackers = Trackers(config, enabled=info.is_main)
    try:
        with StopOnSignal() as stop:
            summary = _train(config, info, stop, started, trackers)
        trackers.close("FINISHED")
        return summary
    except BaseException as exc:
        trackers.close("KILLED" if isinstance(exc, TrainingInterrupted | KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if info.is_main:
            release_folder_lock(config.output_dir)


def _train(
    config: TrainingConfig, info: DistInfo, stop: StopOnSignal, started: float, trackers: Trackers
) -> TrainingSummary:
    if info.distributed and config.lora_r and config.distributed == "fsdp":
        # FSDP2 shards the base weights that merging LoRA needs whole; DDP keeps a full copy on each rank.
        raise ConfigError("distributed", "LoRA on several processes runs with distributed: ddp")
    if info.distributed and config.algorithm == "trpo" and config.distributed == "fsdp":
        raise ConfigError(
            "distributed",
            f"trpo on {info.world_size} processes runs with distributed: ddp (every rank holds the whole "
            "trainable set; the Fisher-vector products take gradients of gradients, which do not reach FSDP2's "
            "sharded parameters); with LoRA (lora_r > 0) when the full trainable set does not fit one device",
        )
    output_dir = Path(config.output_dir)
    resume_from, fingerprint = plan_resume(config, info, output_dir)
    seed_everything(config.seed)
    precision = Precision(config.torch_dtype, info.device)
    if precision.note and info.is_main:
        log.info("%s", precision.note)
    if info.is_main:
        log.info("attention: %s", attention.choose_for(config, info.device).describe())

    tokenizer = load_tokenizer(config.model_name_or_path)
    steps, eval_objective = build_steps(config, tokenizer, info, precision)
    if info.is_main:
        log.info("data: %s", ", ".join(f"{k}={v:g}" for k, v in steps.stats.items()))

    model, save_dtype = load_model(
        config, info, precision=precision, from_checkpoint=resume_from is not None, tokenizer=tokenizer
    )
    model = wrap_model(model, info, config.distributed, bf16=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if config.algorithm == "trpo":  # its parameter-sized vectors, before anything else is spent
        trpo.check_memory(trainable, info.device)
    optimizer = torch.optim.AdamW(
        trainable,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )
    total_steps = planned_steps(config, steps.steps_per_epoch())
    scheduler = build_scheduler(optimizer, config, total_steps * steps.updates_per_step)
    evaluator = Evaluator(eval_objective, config, info, precision) if eval_objective else None

    critic = build_critic(config, info, tokenizer) if config.algorithm in VALUE_ALGORITHMS else None
    critic_state = (critic.module, critic.optimizer) if critic is not None else None

    state = TrainerState()
    if resume_from is not None:
        state = load_checkpoint(
            resume_from, model, optimizer, scheduler, info, precision=precision, value_model=critic_state
        )
        state.attempts += 1
        steps.load_state_dict(state.extra)
    if isinstance(steps, OnlineSteps):  # after a resume, so a vLLM engine starts from the resumed weights
        steps.attach(model, load_reference_model(config, info), critic)
    earlier_seconds = state.elapsed_seconds  # the attempts before this one, up to the checkpoint
    metrics = MetricsLog(
        output_dir / "metrics.jsonl",
        info.is_main,
        resumed_at=state.global_step if resume_from else None,
        kept_evaluations=[int(e["step"]) for e in state.eval_history],
        trackers=trackers,
    )
    progress = Progress(
        total_steps, enabled=info.is_main, every=config.log_every_steps, initial=state.global_step
    )
    saved_at = state.global_step if resume_from else None

    def checkpoint() -> Path | None:
        """Save a resumable checkpoint of this step (once; None when checkpointing is off)."""
        nonlocal saved_at
        if not config.checkpoint_every_steps:
            return None
        path = checkpoint_dir(output_dir, state.global_step)
        if saved_at == state.global_step:
            return path
        state.elapsed_seconds = round(earlier_seconds + time.monotonic() - started, 3)
        state.peak_memory_mib = max(state.peak_memory_mib, peak_memory_mib(info.device))
        state.extra.update(steps.state_dict())
        save_checkpoint(
            output_dir,
            model,
            optimizer,
            scheduler,
            state,
            info,
            precision,
            keep=config.keep_checkpoints,
            fingerprint=fingerprint,
            value_model=critic_state,
        )
        saved_at = state.global_step
        return path

    if info.is_main:
        log.info(
            "training %s: %d steps (%d per epoch), %d trainable parameters, world size %d",
            config.algorithm,
            total_steps,
            steps.steps_per_epoch(),
            sum(p.numel() for p in trainable),
            info.world_size,
        )
    received = stop.requested(info)  # while loading
    if received:
        raise interrupted(received, state, total_steps, resume_from, config)

    model.train()
    while state.global_step < total_steps:
        plan = steps.epoch_plan(state.epoch)
        for step_plan in plan[state.step_in_epoch :]:
            update = Updater(model, optimizer, scheduler, precision, trainable, config)
            step = steps.run(model, step_plan, state.global_step, update)
            state.global_step += 1
            state.step_in_epoch += 1
            state.samples_seen += step["samples"]
            state.tokens_seen += step["tokens"]
            state.step_seconds += step["seconds"]
            state.skipped_steps += step.get("step_skipped", False)
            state.loss_sum += step["loss"]
            state.last_loss = step["loss"]
            state.last_metrics = {name: step[name] for name in steps.metric_names if name in step}
            record = {"step": state.global_step, "epoch": state.epoch, **step}
            metrics.write(record)
            progress.update(state.global_step, record)

            if state.global_step >= total_steps:
                break  # the last evaluation comes after the final model is saved
            end_of_epoch = state.step_in_epoch == len(plan)
            if evaluator and (end_of_epoch or _every(config.eval_steps, state.global_step)):
                evaluate(evaluator, model, state, metrics)
            if _every(config.checkpoint_every_steps, state.global_step):
                checkpoint()
            received = stop.requested(info)
            if received:
                raise interrupted(received, state, total_steps, checkpoint(), config)
        else:
            state.epoch += 1
            state.step_in_epoch = 0
    progress.close()

    # Save what the run has made before the final evaluation, so a failure there loses nothing.
    saved = checkpoint()
    model_path = output_dir / FINAL_MODEL_DIR
    if config.save_final_model:
        export_final_model(model, config, tokenizer, model_path, info, save_dtype)
    received = stop.requested(info)
    if received:
        raise interrupted(received, state, total_steps, saved, config)
    if evaluator and not any(e["step"] == state.global_step for e in state.eval_history):
        evaluate(evaluator, model, state, metrics)
    summary = TrainingSummary(
        algorithm=config.algorithm,
        steps=state.global_step,
        epochs=state.epoch + (1 if state.step_in_epoch else 0),
        samples_seen=state.samples_seen,
        tokens_seen=state.tokens_seen,
        final_loss=state.last_loss if state.last_loss is not None else math.nan,
        mean_loss=state.loss_sum / state.global_step if state.global_step else math.nan,
        tokens_per_second=state.tokens_seen / state.step_seconds if state.step_seconds else 0.0,
        duration_seconds=round(earlier_seconds + time.monotonic() - started, 3),
        world_size=info.world_size,
        model_path=str(model_path) if config.save_final_model else "",
        data=steps.stats,
        peak_memory_mib=max(state.peak_memory_mib, peak_memory_mib(info.device)),
        eval_loss=state.eval_history[-1]["eval_loss"] if state.eval_history else None,
        eval_history=[{k: v for k, v in e.items() if k != "epoch"} for e in state.eval_history],
        skipped_steps=state.skipped_steps,
        metrics=state.last_metrics,
        attempts=state.attempts,
    )
    if info.is_main:
        write_json_atomically(output_dir / TRAINING_CONFIG_FILE, asdict(config))
        write_json_atomically(output_dir / "summary.json", asdict(summary))
        log.info(
            "done: %d steps, final loss %.4f, %.0f tokens/s, %.1f s",
            summary.steps,
            summary.final_loss,
            summary.tokens_per_second,
            summary.duration_seconds,
        )
    barrier()
    return summary


def lock_output_dir(config: TrainingConfig, info: DistInfo) -> None:
    """Rank 0 takes the exclusive lock of ``output_dir`` for the run (see ``kfp_components.locking``);
    when another run holds it, every rank raises the same :class:`ConfigError`, naming the holder."""
    problems: list[tuple[str, str]] = []
    if info.is_main:
        try:
            acquire_folder_lock(config.output_dir, purpose="training")
        except ConfigError as exc:
            problems = exc.problems
    problems = broadcast_object(problems, info)
    if problems:
        raise ConfigError.of(problems)


def plan_resume(
    config: TrainingConfig, info: DistInfo, output_dir: Path
) -> tuple[Path | None, dict[str, Any]]:
    """The checkpoint to resume from (None: start at step 0) and this run's fingerprint, decided on rank 0
    before anything loads.

    With ``resume``, the newest intact checkpoint: newer damaged ones are passed over with a warning (and
    moved aside to ``step-N.damaged``), and one written by another run (its fingerprint differs) is refused
    with a :class:`ConfigError` naming every difference. Without ``resume``, a run that writes checkpoints
    first removes those of an earlier run in ``output_dir``, so the two never mix.
    """
    if not (config.resume or config.checkpoint_every_steps):
        return None, {}
    chosen: Path | None = None
    fingerprint: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    if info.is_main:
        fingerprint = run_fingerprint(config)
        if config.resume:
            chosen, damaged = find_resumable_checkpoint(output_dir)
            problems = _resume_problems(output_dir, chosen, damaged, fingerprint)
            if not problems:
                for path, why in damaged:
                    aside = path.with_name(path.name + ".damaged")
                    shutil.rmtree(aside, ignore_errors=True)
                    path.rename(aside)
                    log.warning(
                        "checkpoint %s is damaged (%s): moved aside to %s; resuming from %s",
                        path.name,
                        why,
                        aside.name,
                        chosen,
                    )
        else:
            removed = remove_checkpoints(output_dir)
            if removed:
                log.warning(
                    "resume is off: removed the %d checkpoint(s) an earlier run left in %s",
                    removed,
                    output_dir / CHECKPOINTS,
                )
    chosen, fingerprint, problems = broadcast_object((chosen, fingerprint, problems), info)
    if problems:
        raise ConfigError.of(problems)
    if chosen is None and config.resume and info.is_main:
        log.info("resume: no checkpoint in %s yet; starting at step 0", output_dir / CHECKPOINTS)
    return chosen, fingerprint


def _resume_problems(
    output_dir: Path,
    chosen: Path | None,
    damaged: list[tuple[Path, str]],
    fingerprint: dict[str, Any],
) -> list[tuple[str, str]]:
    if chosen is None:
        if not damaged:
            return []
        details = "; ".join(f"{path.name}: {why}" for path, why in damaged)
        return [
            (
                "resume",
                f"no intact checkpoint in {output_dir / CHECKPOINTS} ({details}); remove the folder to "
                "start over",
            )
        ]
    differences = fingerprint_differences(read_fingerprint(chosen), fingerprint)
    if not differences:
        return []
    details = "; ".join(f"{key}: {what}" for key, what in differences)
    return [
        (
            "resume",
            f"{chosen} belongs to another run ({details}); resume it with the options and data it was written "
            "with, or set resume: false to start over (its checkpoints are then removed)",
        )
    ]


def interrupted(
    signal_number: int, state: TrainerState, total_steps: int, saved: Path | None, config: TrainingConfig
) -> TrainingInterrupted:
    """The error that ends a run stopped by a signal: where it stopped and how to continue."""
    name = signal.Signals(signal_number).name
    if state.global_step >= total_steps:
        where = "after its last step, before the final evaluation"
    elif state.global_step:
        where = f"after step {state.global_step} of {total_steps}"
    else:
        where = "before its first step"
    if saved is not None:
        then = f"resume: true continues from the checkpoint {saved}"
    elif not config.checkpoint_every_steps:
        then = "no checkpoint (checkpoint_every_steps is 0), so a rerun starts over"
    else:
        then = "no checkpoint yet, so a rerun starts over"
    return TrainingInterrupted(signal_number, f"training stopped by {name} {where}; {then}")


@dataclass
class Updater:
    """One optimizer update from the accumulated gradients, the same for every algorithm: unscale fp16
    gradients, project OSFT gradients, clip, AdamW (skipped when fp16 gradients overflowed), schedule the
    LR, project OSFT parameters. Calling it returns (grad norm, whether the optimizer stepped, the LR used).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    precision: Precision
    trainable: list[nn.Parameter]
    config: TrainingConfig

    def __call__(self) -> tuple[float | None, bool, float]:
        lr = self.optimizer.param_groups[0]["lr"]  # the LR this update uses (the scheduler moves it after)
        self.precision.unscale(self.optimizer)  # true gradients from here on
        if self.config.uses_osft:
            osft.project_osft_gradients(self.model)
        grad_norm = _clip(self.trainable, self.config.max_grad_norm)
        stepped = self.precision.step(self.optimizer)  # False: fp16 gradients overflowed, nothing changed
        if stepped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.config.uses_osft and stepped:
            osft.project_osft_parameters(self.model)
        return finite_or_none(grad_norm), stepped, lr

    def advance_schedule(self) -> float:
        """The schedule's step without an optimizer update, for a policy step that is not AdamW's (trpo's
        natural-gradient step): returns the LR the schedule gives this update (it scales the value model's
        learning rate), then moves the scheduler on, so a checkpoint's scheduler is where the run is."""
        lr = self.optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():  # the policy's AdamW never steps under trpo, by design
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        return lr


class StepSource(Protocol):
    """What the loop trains on: the steps of an epoch, and how to run one (offline data or online rollouts)."""

    metric_names: tuple[str, ...]
    #: optimizer updates per step (the scheduler's steps)
    updates_per_step: int

    @property
    def stats(self) -> dict[str, float]: ...

    def steps_per_epoch(self) -> int: ...

    def epoch_plan(self, epoch: int) -> Sequence[Any]: ...

    def run(self, model: nn.Module, step_plan: Any, global_step: int, update: Updater) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class OfflineSteps:
    """Steps over a fixed dataset (sft, osft, dpo): the token-budget sampler's plan and :func:`train_step`."""

    updates_per_step = 1

    def __init__(self, objective: Objective, config: TrainingConfig, info: DistInfo, precision: Precision):
        self.objective = objective
        self.config = config
        self.info = info
        self.precision = precision
        self.metric_names = objective.metric_names
        self.sampler = TokenBudgetSampler(
            objective.lengths,
            objective.loss_units,
            effective_batch_size=config.effective_batch_size,
            max_tokens_per_gpu=config.max_tokens_per_gpu,
            world_size=info.world_size,
            rank=info.rank,
            seed=config.seed,
        )

    @property
    def stats(self) -> dict[str, float]:
        return self.objective.stats

    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch()

    def epoch_plan(self, epoch: int) -> list[StepPlan]:
        return self.sampler.epoch_plan(epoch)

    def run(self, model: nn.Module, step_plan: StepPlan, global_step: int, update: Updater) -> dict[str, Any]:
        return train_step(model, self.objective, step_plan, update, self.precision, self.info)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def train_step(
    model: nn.Module,
    objective: Objective,
    step_plan: StepPlan,
    update: Updater,
    precision: Precision,
    info: DistInfo,
) -> dict[str, Any]:
    """One optimizer step over the micro-batches of ``step_plan`` on this rank; returns the step's metrics."""
    started = time.monotonic()
    loss_scale = precision.loss_scale
    # loss sum, dummy micro-batches, then the sums of the objective's metrics
    totals = torch.zeros(2 + len(objective.metric_names), dtype=torch.float64, device=info.device)
    num_items = torch.tensor(step_plan.global_label_tokens / info.world_size, device=info.device)
    for i, indices in enumerate(step_plan.micro_batches):
        batch = objective.batch(indices)
        totals[1] += 0 if indices else 1
        with gradient_sync(model, enabled=i == len(step_plan.micro_batches) - 1):
            with precision.autocast():
                loss, metric_sums = objective.loss(model, batch, num_items, info.device)
            precision.backward(loss)
        totals[0] += loss.detach().double() * num_items
        totals[2:] += metric_sums
    grad_norm, stepped, lr = update()

    loss_sum, dummies, *metric_totals = all_reduce_sum(totals).tolist()
    units = max(step_plan.global_label_tokens, 1)
    seconds = all_reduce_max(time.monotonic() - started, info.device)
    record = {
        "loss": loss_sum / units,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": step_plan.global_tokens,
        "loss_units": step_plan.global_label_tokens,
        **{n: v / units for n, v in zip(objective.metric_names, metric_totals, strict=True)},
        "samples": step_plan.global_samples,
        "seconds": round(seconds, 4),
        "tokens_per_second": step_plan.global_tokens / max(seconds, 1e-9),
        "micro_batches": len(step_plan.micro_batches),
        "padding_ratio": dummies / (step_plan.global_tokens + dummies),
        "memory_mib": peak_memory_mib(info.device),
    }
    if loss_scale is not None:
        record.update(loss_scale=loss_scale, step_skipped=not stepped)
    return record


def planned_steps(config: TrainingConfig, steps_per_epoch: int) -> int:
    """``max_steps`` when set (more passes over the data as needed), else ``num_train_epochs`` passes."""
    if config.max_steps > 0:
        return config.max_steps
    return steps_per_epoch * config.num_train_epochs


def _every(interval: int, step: int) -> bool:
    return interval > 0 and step % interval == 0


def check_inputs(config: TrainingConfig, info: DistInfo) -> None:
    """The preflight checks on rank 0, before anything loads; every rank raises the same error."""
    problems = preflight_problems(config) if info.is_main else []
    problems = broadcast_object(problems, info)
    if problems:
        raise ConfigError.of(problems)


def build_steps(
    config: TrainingConfig, tokenizer: Any, info: DistInfo, precision: Precision
) -> tuple[StepSource, Objective | None]:
    """What the loop trains on (the data's objective, or the online algorithm's rollouts) and the eval
    objective when there is eval data."""
    if config.is_online:
        return build_online_steps(config, tokenizer, info, precision), None
    objective, eval_objective = build_objectives(config, tokenizer, info, precision)
    return OfflineSteps(objective, config, info, precision), eval_objective


def load_reference_model(config: TrainingConfig, info: DistInfo) -> nn.Module | None:
    """The frozen reference of an online run with KL on: the starting model, sharded like the policy under
    FSDP2. None when KL is off, or with LoRA (the policy without its adapter is the reference)."""
    if not (config.is_online and config.kl_coef > 0) or config.lora_r:
        return None
    reference = _load_plain_model(config.model_name_or_path, config, info)
    reference.requires_grad_(False)
    reference.eval()
    if info.distributed and config.distributed == "fsdp":
        reference = wrap_model(reference, info, "fsdp", bf16=False)
    return reference


def load_distillation(config: TrainingConfig, info: DistInfo) -> Distillation | None:
    """The frozen teacher of logit distillation (``distill_teacher_path``), loaded once per rank in eval mode
    and sharded like the student under FSDP2; None when distillation is off.

    Preflight has compared the vocabularies from the configs and tokenizers; the teacher's logits width is
    checked here against the student's config before the student's weights load."""
    if not config.distill_teacher_path:
        return None
    from transformers import AutoConfig

    teacher = _load_plain_model(config.distill_teacher_path, config, info)
    teacher.requires_grad_(False)
    teacher.eval()
    output = teacher.get_output_embeddings()  # type: ignore[operator]
    width = int(output.weight.shape[0])
    student_width = (
        AutoConfig.from_pretrained(model_source(config.model_name_or_path)).get_text_config().vocab_size
    )
    if width != student_width:
        raise ConfigError(
            "distill_teacher_path",
            f"the teacher's logits have {width} entries per token, the student's {student_width}: the "
            "teacher must share the student's vocabulary",
        )
    if info.distributed and config.distributed == "fsdp":
        teacher = wrap_model(teacher, info, "fsdp", bf16=False)
    if info.is_main:
        log.info(
            "distillation: teacher %s, distill_coef %g, distill_temperature %g",
            config.distill_teacher_path,
            config.distill_coef,
            config.distill_temperature,
        )
    return Distillation(teacher, config.distill_coef, config.distill_temperature)


def build_objectives(
    config: TrainingConfig, tokenizer: Any, info: DistInfo, precision: Precision
) -> tuple[Objective, Objective | None]:
    """The objective of ``data_path`` and, with ``eval_data_path``, of the eval data.

    For DPO the reference model loads once and scores both sets before it is freed. With logit distillation
    the teacher loads once and serves both.
    """
    paths = {"data_path": config.data_path}
    if config.eval_data_path:
        paths["eval_data_path"] = config.eval_data_path
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if config.algorithm in ("sft", "osft"):
        distillation = load_distillation(config, info)
        objectives: dict[str, Objective] = {
            key: LanguageModelling(_tokenized(config, key, path, tokenizer), pad_id, distillation)
            for key, path in paths.items()
        }
    elif config.algorithm == "dpo":
        pairs = {
            key: _preference_pairs(config, key, path, tokenizer, dpo.tokenize_preference_jsonl)
            for key, path in paths.items()
        }
        reference = _load_plain_model(
            config.ref_model_name_or_path or config.model_name_or_path, config, info
        )
        with precision.autocast():
            reference_logps = {
                key: dpo.compute_reference_logps(
                    reference, key_pairs, info, max_tokens_per_gpu=config.max_tokens_per_gpu
                )
                for key, (key_pairs, _) in pairs.items()
            }
        del reference
        if info.device.type == "cuda":
            torch.cuda.empty_cache()
        objectives = {
            key: dpo.DirectPreference(
                key_pairs,
                stats,
                reference_logps[key],
                beta=config.beta,
                loss_type=config.loss_type,
                label_smoothing=config.label_smoothing,
                pad_token_id=pad_id,
            )
            for key, (key_pairs, stats) in pairs.items()
        }
    elif config.algorithm == "reward_model":
        objectives = {}
        for key, path in paths.items():
            reward_pairs, stats = _preference_pairs(
                config, key, path, tokenizer, reward_modeling.tokenize_reward_pairs
            )
            objectives[key] = reward_modeling.RewardModelling(
                reward_pairs, stats, center_rewards_coef=config.center_rewards_coef, pad_token_id=pad_id
            )
    else:
        raise ConfigError(
            "algorithm", f"expected one of sft, osft, dpo, reward_model, got {config.algorithm!r}"
        )
    return objectives["data_path"], objectives.get("eval_data_path")


def _tokenized(config: TrainingConfig, key: str, path: str, tokenizer: Any):
    try:
        data = tokenize_jsonl(
            path,
            tokenizer,
            max_seq_len=config.max_seq_len,
            overlong=config.overlong,
            unmask=config.unmask,
            data_format=config.data_format,
        )
    except (SampleError, ChatTemplateError) as exc:
        raise ConfigError(key, str(exc)) from None
    if not data.samples:
        raise ConfigError(key, f"{path}: no trainable samples after tokenisation ({data.stats})")
    return data


def _preference_pairs(
    config: TrainingConfig, key: str, path: str, tokenizer: Any, tokenize: Callable[..., tuple[list, dict]]
) -> tuple[list, dict]:
    """The pairs of ``path`` (the option ``key``) read by ``tokenize`` (DPO's or the reward model's); a row
    that cannot be read, or a file without a usable pair, is a :class:`ConfigError` naming ``key``."""
    try:
        pairs, stats = tokenize(path, tokenizer, max_seq_len=config.max_seq_len, overlong=config.overlong)
    except (SampleError, ChatTemplateError) as exc:
        raise ConfigError(key, str(exc)) from None
    if not pairs:
        raise ConfigError(key, f"{path}: no usable preference pairs after tokenisation ({stats})")
    return pairs, stats


class Evaluator:
    """The mean loss per loss unit (label token; DPO, reward_model: pair) on the eval data, packed as in
    training, and the means of the objective's metrics (``eval_<name>``).

    Every rank must call it at the same steps: the ranks share the micro-batches and sum their losses.
    """

    def __init__(self, objective: Objective, config: TrainingConfig, info: DistInfo, precision: Precision):
        self.objective = objective
        self.info = info
        self.precision = precision
        sampler = TokenBudgetSampler(
            objective.lengths,
            objective.loss_units,
            effective_batch_size=max(len(objective.lengths), 1),
            max_tokens_per_gpu=config.max_tokens_per_gpu,
            world_size=info.world_size,
            rank=info.rank,
            seed=config.seed,
            shuffle=False,
        )
        self.plan = sampler.epoch_plan(0)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        """``eval_loss`` and ``eval_<metric>`` for each of the objective's metrics."""
        device = self.info.device
        model.eval()
        names = self.objective.metric_names
        totals = torch.zeros(1 + len(names), dtype=torch.float64, device=device)
        units = 0
        one = torch.tensor(1.0, device=device)
        for step_plan in self.plan:
            for indices in step_plan.micro_batches:
                with self.precision.autocast():
                    loss, metric_sums = self.objective.loss(model, self.objective.batch(indices), one, device)
                totals[0] += loss.double()
                totals[1:] += metric_sums
            units += step_plan.global_label_tokens
        model.train()
        means = [value / max(units, 1) for value in all_reduce_sum(totals).tolist()]
        return dict(zip(("eval_loss", *(f"eval_{n}" for n in names)), means, strict=True))


def evaluate(evaluator: Evaluator, model: nn.Module, state: TrainerState, metrics: MetricsLog) -> float:
    """Compute the eval loss (and metrics) now and record them (``metrics.jsonl``, the state's history, the
    log); returns the eval loss."""
    results = evaluator(model)
    record = {"step": state.global_step, "epoch": state.epoch, **results}
    state.eval_history.append(record)
    metrics.write(record)
    if evaluator.info.is_main:
        shown = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in results.items())
        log.info("step %d %s", state.global_step, shown)
    return results["eval_loss"]


def _load_plain_model(name_or_path: str, config: TrainingConfig, info: DistInfo) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with no_transformers_progress_bars():
        model: nn.Module = AutoModelForCausalLM.from_pretrained(
            model_source(name_or_path),
            dtype=torch.float32,
            attn_implementation=attention.implementation(config, info.device),
        )
    return model.to(info.device)


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_source(name_or_path))
    if tokenizer.chat_template is None:
        raise ConfigError(
            "model_name_or_path",
            f"the tokenizer of {name_or_path} has no chat template; chat data cannot be rendered",
        )
    return tokenizer


def load_model(
    config: TrainingConfig,
    info: DistInfo,
    *,
    precision: Precision | None = None,
    from_checkpoint: bool = False,
    tokenizer: Any = None,
) -> tuple[nn.Module, torch.dtype]:
    """The model in fp32 master weights on this rank's device, with OSFT or LoRA, Liger and checkpointing.

    ``precision``: under a 16-bit autocast, OSFT caches its frozen weights in that dtype (half the memory).
    ``from_checkpoint``: a training checkpoint is loaded into the model next (resume), so OSFT skips the SVDs
    (the checkpoint holds the frozen and trainable factors).
    ``reward_model``: an ``AutoModelForSequenceClassification`` with one label (``tokenizer``'s pad token,
    loaded from the model when not given, becomes its ``pad_token_id``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    source = model_source(config.model_name_or_path)
    hf_config = AutoConfig.from_pretrained(source)
    save_dtype = _checkpoint_dtype(hf_config)
    kwargs: dict[str, Any] = {
        "dtype": torch.float32,
        "attn_implementation": attention.implementation(config, info.device),
    }
    if config.qlora:
        kwargs.update(_qlora_kwargs(info))
    model: Any  # a PreTrainedModel (peft: PeftModel)
    with no_transformers_progress_bars():
        if config.algorithm == "reward_model":
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model_name_or_path)
            model = reward_modeling.load_reward_model(source, tokenizer, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if not config.qlora:  # a 4-bit model is placed by its device_map
        model.to(info.device)  # before OSFT, so the SVDs run on the GPU
    if config.use_liger:
        apply_liger(model, info)
    if config.uses_osft:
        names = osft.apply_osft(
            model,
            unfreeze_rank_ratio=config.unfreeze_rank_ratio,
            target_patterns=config.target_patterns or None,
            dense_dtype=precision.compute_dtype if precision and precision.reduced else None,
            decompose=not from_checkpoint,
            # under FSDP2 each rank keeps only its share of the frozen factors from the start
            frozen_mesh=fsdp_mesh(info) if info.distributed and config.distributed == "fsdp" else None,
        )
        if info.is_main:
            log.info(
                "osft: %s %d weights (unfreeze_rank_ratio %g)",
                "restoring the factors of" if from_checkpoint else "decomposed",
                len(names),
                config.unfreeze_rank_ratio,
            )
    elif config.lora_r:
        model = _apply_lora(model, config)
    if config.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model, save_dtype


def apply_liger(model: nn.Module, info: DistInfo) -> bool:
    """Liger's fused kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) on a GPU; a warning elsewhere."""
    if info.device.type != "cuda":
        log.warning("use_liger: Liger kernels need a CUDA GPU; training on %s without them", info.device.type)
        return False
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        log.warning(
            "use_liger: liger-kernel is not installed (pip install 'kfp-components[gpu]'); "
            "training without it"
        )
        return False
    _apply_liger_kernel_to_instance(model=model)
    log.info("use_liger: Liger kernels applied to %s", type(model).__name__)
    return True


def _apply_lora(model: nn.Module, config: TrainingConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.qlora:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.activation_checkpointing
        )
    targets = config.lora_target_modules
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        # SEQ_CLS: peft trains the new scalar head fully (modules_to_save) beside the adapters
        task_type="SEQ_CLS" if config.algorithm == "reward_model" else "CAUSAL_LM",
        target_modules=targets[0] if targets == ["all-linear"] else targets,
    )
    return get_peft_model(model, lora)


def _qlora_kwargs(info: DistInfo) -> dict[str, Any]:
    if info.device.type != "cuda":
        raise ValueError(
            "qlora: 4-bit loading needs a CUDA GPU and bitsandbytes; use lora_r without qlora on CPU"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ValueError("qlora: bitsandbytes is not installed") from exc
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {"quantization_config": quant, "device_map": {"": info.local_rank}}


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig, total_steps: int):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup = min(config.warmup_steps, total_steps)
    schedules = {
        "constant": lambda: get_constant_schedule_with_warmup(optimizer, warmup),
        "linear": lambda: get_linear_schedule_with_warmup(optimizer, warmup, total_steps),
        "cosine": lambda: get_cosine_schedule_with_warmup(optimizer, warmup, total_steps),
    }
    if config.lr_scheduler not in schedules:
        raise ConfigError(
            "lr_scheduler", f"expected one of {', '.join(schedules)}, got {config.lr_scheduler!r}"
        )
    return schedules[config.lr_scheduler]()


def export_final_model(
    model: nn.Module,
    config: TrainingConfig,
    tokenizer: Any,
    out_dir: Path,
    info: DistInfo,
    dtype: torch.dtype,
) -> None:
    """Write the final model as a standard HF checkpoint (OSFT factors rebuilt dense, LoRA merged, the run's
    ``training_config.json`` beside it) into ``<out_dir>.partial``, then put it in place of ``out_dir``: a
    run that fails never leaves a half-written or mismatched final model. Files get the permissions the
    umask gives (safetensors writes through a private temporary file, mode 0600)."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    if info.is_main:
        shutil.rmtree(partial, ignore_errors=True)
    if config.lora_r and not config.uses_osft:
        if info.is_main:
            inner: Any = unwrap(model)  # a peft PeftModel
            inner.save_pretrained(partial / "adapter")
            merged = inner.merge_and_unload()
            save_hf_model(merged, merged.state_dict(), tokenizer, partial, dtype)
    else:
        state_dict = full_model_state_dict(model)  # a collective under FSDP2
        if info.is_main:
            if config.uses_osft:
                state_dict = osft.dense_state_dict(state_dict)
            save_hf_model(model, state_dict, tokenizer, partial, dtype)
    if info.is_main:
        (partial / TRAINING_CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2))
        use_default_permissions(partial)
        shutil.rmtree(out_dir, ignore_errors=True)
        partial.rename(out_dir)
        log.info("saved the model to %s", out_dir)
    barrier()


def write_json_atomically(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to a temporary sibling and rename it over ``path``."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2))
    os.replace(partial, path)


def _clip(parameters: list[nn.Parameter], max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def _checkpoint_dtype(hf_config: Any) -> torch.dtype:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32
