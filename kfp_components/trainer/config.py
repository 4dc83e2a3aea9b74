"""The training engine's options: one set of typed dataclasses for the trainer CLI, the components and the
multi-stage YAML.

Options come in groups that the stage configs reuse, so an option has one name and one meaning everywhere:

* :class:`OptimOptions`: data handling, batching, optimizer, schedule, precision, distribution, checkpoints;
* :class:`OSFTOptions`, :class:`LoRAOptions`, :class:`DPOOptions`: what each method adds.

:class:`TrainingConfig` is all of them plus what one run needs (model, data, output, algorithm). Every field
is a command-line flag of ``python -m kfp_components.trainer`` (``--learning_rate 2e-5``) and a key of its
``--config`` YAML; flags override the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal, get_args

from kfp_components.typed_config import ConfigError, Options

Algorithm = Literal["sft", "osft", "dpo"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
TorchDtype = Literal["bfloat16", "float16", "float32"]
#: Attention kernels transformers can load a model with.
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"]


def _at_least(config: object, names: tuple[str, ...], minimum: float) -> None:
    for name in names:
        value = getattr(config, name)
        if value < minimum:
            rule = "must not be negative" if minimum == 0 else f"must be at least {minimum}"
            raise ConfigError(name, f"{rule}, got {value}")


@dataclass(kw_only=True)
class OptimOptions(Options):
    """How to train, whatever the method.

    Attributes:
        torch_dtype: Compute precision over fp32 master weights: bfloat16 (autocast on a GPU), float16
            (autocast with dynamic loss scaling, for GPUs without bf16) or float32. A CPU computes in
            float32 whatever is set (and says so once).
        max_seq_len: Longest sample in tokens; longer samples are handled by `overlong`.
        overlong: drop (skip and count) or truncate samples longer than max_seq_len.
        unmask: Train on every token, not only the assistant turns.
        effective_batch_size: Samples (DPO: preference pairs) per optimizer step across all ranks.
        max_tokens_per_gpu: Token budget of one micro-batch on one rank; packing and gradient accumulation
            fill each step with effective_batch_size samples under this budget.
        num_train_epochs: Passes over the data (ignored when max_steps is set).
        max_steps: Train exactly this many optimizer steps, starting further passes over the data as needed;
            overrides num_train_epochs (0: num_train_epochs decides).
        learning_rate: Peak learning rate of AdamW.
        adam_beta1: AdamW beta1.
        adam_beta2: AdamW beta2.
        adam_epsilon: AdamW epsilon.
        weight_decay: AdamW decoupled weight decay.
        lr_scheduler: constant, linear or cosine decay after warmup (alias: lr_scheduler_type).
        warmup_steps: Linear warmup from 0 over this many optimizer steps.
        max_grad_norm: Clip the global gradient norm (0: no clipping).
        seed: Seed for data order, initialisation of LoRA weights and dropout.
        activation_checkpointing: Recompute activations in backward to save memory (alias:
            gradient_checkpointing).
        use_liger: Liger fused kernels (GPU only; on a CPU a warning and the plain path).
        distributed: fsdp (FSDP2, sharded) or ddp when run under torchrun with more than one process.
        attn_implementation: Attention kernel: sdpa, eager, flash_attention_2, flash_attention_3 or
            flex_attention.
        checkpoint_every_steps: Save a resumable checkpoint every N optimizer steps (0: only at the end;
            alias: save_steps).
        keep_checkpoints: How many resumable checkpoints to keep (alias: save_total_limit).
        resume: Continue from the newest checkpoint in output_dir when there is one.
        save_final_model: Write the final Hugging Face checkpoint to ``<output_dir>/final``.
        log_every_steps: Log a line (and a progress bar update) every N steps (alias: logging_steps).
        eval_steps: With eval data, compute the eval loss every N optimizer steps too (0: only at the end of
            each epoch).
    """

    option_aliases: ClassVar[dict[str, str]] = {
        "lr_scheduler_type": "lr_scheduler",
        "gradient_checkpointing": "activation_checkpointing",
        "save_steps": "checkpoint_every_steps",
        "save_total_limit": "keep_checkpoints",
        "logging_steps": "log_every_steps",
    }

    torch_dtype: TorchDtype = "bfloat16"
    max_seq_len: int = 4096
    overlong: Literal["drop", "truncate"] = "drop"
    unmask: bool = False
    effective_batch_size: int = 128
    max_tokens_per_gpu: int = 64000
    num_train_epochs: int = 1
    max_steps: int = 0
    learning_rate: float = 1e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 42
    activation_checkpointing: bool = False
    use_liger: bool = False
    distributed: Literal["fsdp", "ddp"] = "fsdp"
    attn_implementation: AttnImplementation = "sdpa"
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    save_final_model: bool = True
    log_every_steps: int = 1
    eval_steps: int = 0

    def validate(self) -> None:
        _at_least(
            self,
            (
                "max_seq_len",
                "effective_batch_size",
                "max_tokens_per_gpu",
                "num_train_epochs",
                "log_every_steps",
                "keep_checkpoints",
            ),
            1,
        )
        _at_least(
            self,
            (
                "max_steps",
                "warmup_steps",
                "checkpoint_every_steps",
                "eval_steps",
                "weight_decay",
                "max_grad_norm",
            ),
            0,
        )
        if self.learning_rate <= 0:
            raise ConfigError("learning_rate", f"must be positive, got {self.learning_rate}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.adam_epsilon <= 0:
            raise ConfigError("adam_epsilon", f"must be positive, got {self.adam_epsilon}")
        if self.max_tokens_per_gpu < self.max_seq_len:
            raise ConfigError(
                "max_tokens_per_gpu",
                f"{self.max_tokens_per_gpu} is smaller than max_seq_len {self.max_seq_len}: a sample of "
                "max_seq_len tokens would not fit in one micro-batch; raise max_tokens_per_gpu or lower "
                "max_seq_len",
            )


@dataclass(kw_only=True)
class OSFTOptions(Options):
    """Orthogonal Subspace Fine-Tuning.

    Attributes:
        unfreeze_rank_ratio: Share of each target weight's singular directions that train, in (0, 1];
            1.0 trains every direction.
        target_patterns: Regexes of module names to decompose (default: chosen by model_type).
    """

    unfreeze_rank_ratio: float = 0.25
    target_patterns: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not 0 < self.unfreeze_rank_ratio <= 1:
            raise ConfigError(
                "unfreeze_rank_ratio",
                f"must be in (0, 1] (1.0 trains every singular direction), got {self.unfreeze_rank_ratio}",
            )
        for i, pattern in enumerate(self.target_patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"target_patterns[{i}]", f"not a valid regular expression: {exc}") from None


@dataclass(kw_only=True)
class LoRAOptions(Options):
    """LoRA adapters through peft (SFT).

    Attributes:
        lora_r: LoRA rank; 0 means full fine-tuning.
        lora_alpha: LoRA scaling numerator (the update is scaled by lora_alpha / lora_r).
        lora_dropout: Dropout on the LoRA input, in [0, 1).
        lora_target_modules: Module names to adapt, or ["all-linear"].
        qlora: Load the base model in 4 bit for LoRA (needs bitsandbytes and a GPU).
    """

    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    qlora: bool = False

    def validate(self) -> None:
        _at_least(self, ("lora_r", "lora_alpha"), 0)
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise ConfigError(
                "lora_target_modules", 'empty; name modules such as [q_proj, v_proj] or ["all-linear"]'
            )
        if self.qlora and not self.lora_r:
            raise ConfigError("qlora", "QLoRA needs lora_r > 0")


@dataclass(kw_only=True)
class DPOOptions(Options):
    """Direct Preference Optimization.

    Attributes:
        beta: Strength of the KL constraint to the reference model (higher: stay closer).
        loss_type: sigmoid (the DPO paper), ipo (identity preference optimisation) or hinge (SLiC).
        label_smoothing: Assumed share of flipped preference labels (conservative DPO; sigmoid loss only).
        ref_model_name_or_path: Reference model (default: the model training starts from). Its log-probs are
            computed once, before training, so it never sits in memory beside the policy.
        osft_constraint: Preference-tune inside the OSFT constraint: the base model's top singular subspace
            stays frozen (uses unfreeze_rank_ratio and target_patterns).
    """

    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = 0.0
    ref_model_name_or_path: str = ""
    osft_constraint: bool = False

    def validate(self) -> None:
        if self.beta <= 0:
            raise ConfigError("beta", f"must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError("label_smoothing", "applies to loss_type sigmoid only")


#: Options every run must set.
REQUIRED = ("model_name_or_path", "data_path", "output_dir")


@dataclass(kw_only=True)
class TrainingConfig(OptimOptions, OSFTOptions, LoRAOptions, DPOOptions):
    """Options of one training run: the model, the data, where outputs go, the method, and every option of
    :class:`OptimOptions`, :class:`OSFTOptions`, :class:`LoRAOptions` and :class:`DPOOptions`.

    Attributes:
        model_name_or_path: Hugging Face model id or local folder of the starting checkpoint.
        data_path: JSONL file from the dataset stage: `messages` rows for sft and osft, `preference` rows
            (prompt, chosen, rejected) for dpo.
        output_dir: Where checkpoints, metrics and the final model go (final model in ``<output_dir>/final``).
        algorithm: sft (full fine-tuning, or LoRA when lora_r > 0), osft (Orthogonal Subspace Fine-Tuning) or
            dpo (Direct Preference Optimization).
        eval_data_path: Optional JSONL in the same format as data_path: its loss is computed at the end of
            every epoch (and every eval_steps) and reported as eval_loss.
    """

    model_name_or_path: str
    data_path: str
    output_dir: str
    algorithm: Algorithm = "sft"
    eval_data_path: str = ""

    def validate(self) -> None:
        """Raise :class:`ConfigError` listing the bad options (the first problem of each option group)."""
        problems = [(name, "required option is empty") for name in REQUIRED if not getattr(self, name)]
        for check in (
            OptimOptions.validate,
            OSFTOptions.validate,
            LoRAOptions.validate,
            DPOOptions.validate,
            TrainingConfig._check_combinations,
        ):
            try:
                check(self)
            except ConfigError as exc:
                problems.extend(exc.problems)
        if problems:
            raise ConfigError.of(problems)

    def _check_combinations(self) -> None:
        if self.algorithm == "osft" and self.lora_r:
            raise ConfigError("lora_r", "LoRA and OSFT are alternatives; set lora_r to 0 for osft")
        if self.algorithm == "dpo" and self.osft_constraint and self.lora_r:
            raise ConfigError("lora_r", "osft_constraint and LoRA are alternatives; set lora_r to 0")
        if self.eval_steps and not self.eval_data_path:
            raise ConfigError("eval_steps", "needs eval data (eval_data_path)")

    @property
    def uses_osft(self) -> bool:
        """OSFT itself, or DPO inside the OSFT constraint."""
        return self.algorithm == "osft" or (self.algorithm == "dpo" and self.osft_constraint)
