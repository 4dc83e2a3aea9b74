"""The training loop: read it top to bottom.

``train(config)`` runs SFT (full or LoRA) or OSFT in one process or under torchrun (DDP or FSDP2):

1. join the process group; load the tokenizer and tokenise the data (chat template, assistant-only labels);
2. load the model in fp32 (master weights), apply OSFT or LoRA, Liger kernels on GPU, activation
   checkpointing, then wrap it for DDP or FSDP2;
3. plan every step: ``effective_batch_size`` samples, packed padding-free into micro-batches of at most
   ``max_tokens_per_gpu`` tokens per rank (see ``batching``);
4. for each step: forward/backward every micro-batch with the loss normalised by the label tokens of the
   whole global batch; project OSFT gradients; clip; AdamW; project OSFT parameters; schedule the LR;
5. log metrics per step, save resumable checkpoints, and write the final HF checkpoint and a summary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kfp_components.trainer import dpo, osft
from kfp_components.trainer.batching import (
    TokenBudgetSampler,
)
from kfp_components.trainer.checkpoint import (
    TrainerState,
    full_model_state_dict,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_hf_model,
)
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_object,
    gradient_sync,
    init_distributed,
    unwrap,
    wrap_model,
)
from kfp_components.trainer.objectives import LanguageModelling, Objective
from kfp_components.trainer.preflight import model_source, preflight_problems
from kfp_components.trainer.progress import MetricsLog, Progress
from kfp_components.trainer.tokenize import tokenize_jsonl
from kfp_components.typed_config import ConfigError

log = logging.getLogger("kfp_components.trainer")

FINAL_MODEL_DIR = "final"


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
    eval_loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def train(config: TrainingConfig) -> TrainingSummary:
    started = time.monotonic()
    info = init_distributed()
    check_inputs(config, info)
    if info.distributed and config.lora_r and config.distributed == "fsdp":
        # FSDP2 shards the base weights that merging LoRA needs whole; DDP keeps a full copy on each rank.
        raise ConfigError("distributed", "LoRA on several processes runs with distributed: ddp")
    output_dir = Path(config.output_dir)
    if info.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "training_config.json").write_text(json.dumps(asdict(config), indent=2))
    seed_everything(config.seed)

    tokenizer = load_tokenizer(config.model_name_or_path)
    objective = build_objective(config, config.data_path, tokenizer, info)
    if info.is_main:
        log.info("data: %s", ", ".join(f"{k}={v:g}" for k, v in objective.stats.items()))

    resume_from = latest_checkpoint(output_dir) if config.resume else None
    model, save_dtype = load_model(config, info, from_checkpoint=resume_from is not None)
    model = wrap_model(model, info, config.distributed, bf16=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )
    sampler = TokenBudgetSampler(
        objective.lengths,
        objective.loss_units,
        effective_batch_size=config.effective_batch_size,
        max_tokens_per_gpu=config.max_tokens_per_gpu,
        world_size=info.world_size,
        rank=info.rank,
        seed=config.seed,
    )
    total_steps = sampler.steps_per_epoch() * config.num_train_epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    scheduler = build_scheduler(optimizer, config, total_steps)

    state = TrainerState()
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler, info)
    metrics = MetricsLog(
        output_dir / "metrics.jsonl",
        info.is_main,
        truncate_after_step=state.global_step if resume_from else None,
    )
    progress = Progress(
        total_steps, enabled=info.is_main, every=config.log_every_steps, initial=state.global_step
    )
    if info.is_main:
        log.info(
            "training %s: %d steps (%d per epoch), %d trainable parameters, world size %d",
            config.algorithm,
            total_steps,
            sampler.steps_per_epoch(),
            sum(p.numel() for p in trainable),
            info.world_size,
        )

    losses: list[float] = []
    compute_tokens = 0
    compute_seconds = 0.0
    extra_metrics: dict[str, float] = {}
    autocast = _autocast(config, info)
    if config.torch_dtype == "bfloat16" and info.device.type != "cuda" and info.is_main:
        log.info("dtype bfloat16: no GPU, so computing in float32")
    model.train()
    while state.global_step < total_steps:
        plan = sampler.epoch_plan(state.epoch)
        for step_plan in plan[state.step_in_epoch :]:
            if state.global_step >= total_steps:
                break
            step_started = time.monotonic()
            # loss sum, dummy micro-batches, then the sums of the objective's metrics
            totals = torch.zeros(2 + len(objective.metric_names), dtype=torch.float64, device=info.device)
            num_items = torch.tensor(step_plan.global_label_tokens / info.world_size, device=info.device)
            for i, indices in enumerate(step_plan.micro_batches):
                batch = objective.batch(indices)
                totals[1] += 0 if indices else 1
                with gradient_sync(model, enabled=i == len(step_plan.micro_batches) - 1), autocast:
                    loss, metric_sums = objective.loss(model, batch, num_items, info.device)
                    loss.backward()
                totals[0] += loss.detach().double() * num_items
                totals[2:] += metric_sums
            if config.uses_osft:
                osft.project_osft_gradients(model)
            grad_norm = _clip(trainable, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if config.uses_osft:
                osft.project_osft_parameters(model)

            loss_sum, dummies, *metric_sums = all_reduce_sum(totals).tolist()
            units = max(step_plan.global_label_tokens, 1)
            loss = loss_sum / units
            extra_metrics = {n: v / units for n, v in zip(objective.metric_names, metric_sums, strict=True)}
            seconds = all_reduce_max(time.monotonic() - step_started, info.device)
            state.global_step += 1
            state.step_in_epoch += 1
            state.samples_seen += step_plan.global_samples
            state.tokens_seen += step_plan.global_tokens
            compute_tokens += step_plan.global_tokens
            compute_seconds += seconds
            losses.append(loss)
            record = {
                "step": state.global_step,
                "epoch": state.epoch,
                "loss": loss,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens": step_plan.global_tokens,
                "loss_units": step_plan.global_label_tokens,
                **extra_metrics,
                "samples": step_plan.global_samples,
                "seconds": round(seconds, 4),
                "tokens_per_second": step_plan.global_tokens / max(seconds, 1e-9),
                "micro_batches": len(step_plan.micro_batches),
                "padding_ratio": dummies / (step_plan.global_tokens + dummies),
                "memory_mib": peak_memory_mib(info.device),
            }
            metrics.write(record)
            progress.update(state.global_step, record)
            if (
                config.checkpoint_every_steps
                and state.global_step % config.checkpoint_every_steps == 0
                and state.global_step < total_steps
            ):
                save_checkpoint(
                    output_dir, model, optimizer, scheduler, state, info, keep=config.keep_checkpoints
                )
        else:
            state.epoch += 1
            state.step_in_epoch = 0
    progress.close()

    eval_loss = evaluate_loss(model, config, tokenizer, info, autocast) if config.eval_data_path else None
    if config.checkpoint_every_steps:
        save_checkpoint(output_dir, model, optimizer, scheduler, state, info, keep=config.keep_checkpoints)
    model_path = output_dir / FINAL_MODEL_DIR
    if config.save_final_model:
        export_final_model(model, config, tokenizer, model_path, info, save_dtype)
    summary = TrainingSummary(
        algorithm=config.algorithm,
        steps=state.global_step,
        epochs=state.epoch + (1 if state.step_in_epoch else 0),
        samples_seen=state.samples_seen,
        tokens_seen=state.tokens_seen,
        final_loss=losses[-1] if losses else math.nan,
        mean_loss=sum(losses) / len(losses) if losses else math.nan,
        tokens_per_second=compute_tokens / compute_seconds if compute_seconds else 0.0,
        duration_seconds=round(time.monotonic() - started, 3),
        world_size=info.world_size,
        model_path=str(model_path) if config.save_final_model else "",
        data=objective.stats,
        peak_memory_mib=peak_memory_mib(info.device),
        eval_loss=eval_loss,
        metrics=extra_metrics,
    )
    if info.is_main:
        (output_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
        log.info(
            "done: %d steps, final loss %.4f, %.0f tokens/s, %.1f s",
            summary.steps,
            summary.final_loss,
            summary.tokens_per_second,
            summary.duration_seconds,
        )
    barrier()
    return summary


def check_inputs(config: TrainingConfig, info: DistInfo) -> None:
    """The preflight checks on rank 0, before anything loads; every rank raises the same error."""
    problems = preflight_problems(config) if info.is_main else []
    problems = broadcast_object(problems, info)
    if problems:
        raise ConfigError.of(problems)


def build_objective(config: TrainingConfig, data_path: str, tokenizer: Any, info: DistInfo) -> Objective:
    """Tokenise ``data_path`` for the configured method; for DPO also compute the reference log-probs."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if config.algorithm != "dpo":
        data = tokenize_jsonl(
            data_path,
            tokenizer,
            max_seq_len=config.max_seq_len,
            overlong=config.overlong,
            unmask=config.unmask,
        )
        if not data.samples:
            raise ValueError(f"{data_path}: no trainable samples after tokenisation ({data.stats})")
        return LanguageModelling(data, pad_id)
    pairs, stats = dpo.tokenize_preference_jsonl(
        data_path, tokenizer, max_seq_len=config.max_seq_len, overlong=config.overlong
    )
    if not pairs:
        raise ValueError(f"{data_path}: no usable preference pairs after tokenisation ({stats})")
    reference = _load_plain_model(config.ref_model_name_or_path or config.model_name_or_path, config, info)
    with _autocast(config, info):
        reference_logps = dpo.compute_reference_logps(
            reference, pairs, info, max_tokens_per_gpu=config.max_tokens_per_gpu
        )
    del reference
    if info.device.type == "cuda":
        torch.cuda.empty_cache()
    return dpo.DirectPreference(
        pairs,
        stats,
        reference_logps,
        beta=config.beta,
        loss_type=config.loss_type,
        label_smoothing=config.label_smoothing,
        pad_token_id=pad_id,
    )


def _load_plain_model(name_or_path: str, config: TrainingConfig, info: DistInfo) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_source(name_or_path), dtype=torch.float32, attn_implementation=config.attn_implementation
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
    config: TrainingConfig, info: DistInfo, *, from_checkpoint: bool = False
) -> tuple[nn.Module, torch.dtype]:
    """The model in fp32 master weights on this rank's device, with OSFT or LoRA, Liger and checkpointing.

    ``from_checkpoint``: a training checkpoint is loaded into the model next (resume), so OSFT skips the SVDs
    (the checkpoint holds the frozen and trainable factors).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    source = model_source(config.model_name_or_path)
    hf_config = AutoConfig.from_pretrained(source)
    save_dtype = _checkpoint_dtype(hf_config)
    kwargs: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": config.attn_implementation}
    if config.qlora:
        kwargs.update(_qlora_kwargs(info))
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if not config.qlora:  # a 4-bit model is placed by its device_map
        model.to(info.device)  # before OSFT, so the SVDs run on the GPU
    if config.use_liger:
        apply_liger(model, info)
    if config.uses_osft:
        bf16 = config.torch_dtype == "bfloat16" and info.device.type == "cuda"
        names = osft.apply_osft(
            model,
            unfreeze_rank_ratio=config.unfreeze_rank_ratio,
            target_patterns=config.target_patterns or None,
            dense_dtype=torch.bfloat16 if bf16 else None,
            decompose=not from_checkpoint,
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
        task_type="CAUSAL_LM",
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
    if config.lr_scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    if config.lr_scheduler == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)


def export_final_model(
    model: nn.Module,
    config: TrainingConfig,
    tokenizer: Any,
    out_dir: Path,
    info: DistInfo,
    dtype: torch.dtype,
) -> None:
    """Write the final model as a standard HF checkpoint: OSFT factors rebuilt dense, LoRA merged."""
    if config.lora_r:
        if info.is_main:
            inner = unwrap(model)
            inner.save_pretrained(out_dir / "adapter")
            merged = inner.merge_and_unload()
            save_hf_model(merged, merged.state_dict(), tokenizer, out_dir, dtype)
        barrier()
        return
    state_dict = full_model_state_dict(model)
    if info.is_main:
        if config.uses_osft:
            state_dict = osft.dense_state_dict(state_dict)
        save_hf_model(model, state_dict, tokenizer, out_dir, dtype)
    barrier()


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    config: TrainingConfig,
    tokenizer: Any,
    info: DistInfo,
    autocast: contextlib.AbstractContextManager,
) -> float:
    """Mean loss per loss unit (label token; DPO: pair) on ``eval_data_path``, packed as in training."""
    objective = build_objective(config, config.eval_data_path, tokenizer, info)
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
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=info.device)
    units = 0
    one = torch.tensor(1.0, device=info.device)
    for step_plan in sampler.epoch_plan(0):
        for indices in step_plan.micro_batches:
            with autocast:
                loss, _ = objective.loss(model, objective.batch(indices), one, info.device)
            total += loss.double()
        units += step_plan.global_label_tokens
    model.train()
    eval_loss = float(all_reduce_sum(total).item()) / max(units, 1)
    if info.is_main:
        log.info("eval loss %.4f over %d loss units", eval_loss, units)
    return eval_loss


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _autocast(config: TrainingConfig, info: DistInfo) -> contextlib.AbstractContextManager:
    """bf16 autocast over fp32 master weights on a GPU; a CPU computes in fp32 (bf16 there is slower)."""
    if config.torch_dtype == "bfloat16" and info.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
