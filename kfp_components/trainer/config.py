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

from dataclasses import dataclass, field
from typing import Literal

from kfp_components.typed_config import ConfigError

Algorithm = Literal["sft", "osft", "dpo"]
ALGORITHMS = ("sft", "osft", "dpo")


def _at_least(config: object, names: tuple[str, ...], minimum: float) -> None:
    for name in names:
        value = getattr(config, name)
        if value < minimum:
            rule = "must not be negative" if minimum == 0 else f"must be at least {minimum}"
            raise ConfigError(name, f"{rule}, got {value}")


@dataclass(kw_only=True)
class OptimOptions:
    """How to train, whatever the method.

    Attributes:
        dtype: Compute precision: bfloat16 (autocast on GPU, fp32 master weights) or float32.
        max_seq_len: Longest sample in tokens; longer samples are handled by `overlong`.
        overlong: drop (skip and count) or truncate samples longer than max_seq_len.
        unmask: Train on every token, not only the assistant turns.
        effective_batch_size: Samples (DPO: preference pairs) per optimizer step across all ranks.
        max_tokens_per_gpu: Token budget of one micro-batch on one rank; packing and gradient accumulation
            fill each step with effective_batch_size samples under this budget.
        num_epochs: Passes over the data.
        max_steps: Stop after this many optimizer steps (0: run all epochs).
        learning_rate: Peak learning rate of AdamW.
        adam_beta1: AdamW beta1.
        adam_beta2: AdamW beta2.
        adam_epsilon: AdamW epsilon.
        weight_decay: AdamW decoupled weight decay.
        lr_scheduler: constant, linear or cosine decay after warmup.
        warmup_steps: Linear warmup from 0 over this many optimizer steps.
        max_grad_norm: Clip the global gradient norm (0: no clipping).
        seed: Seed for data order, initialisation of LoRA weights and dropout.
        activation_checkpointing: Recompute activations in backward to save memory.
        use_liger: Liger fused kernels (GPU only; on a CPU a warning and the plain path).
        distributed: fsdp (FSDP2, sharded) or ddp when run under torchrun with more than one process.
        attn_implementation: Attention kernel (sdpa, flash_attention_2, eager).
        checkpoint_every_steps: Save a resumable checkpoint every N optimizer steps (0: only at the end).
        keep_checkpoints: How many resumable checkpoints to keep.
        resume: Continue from the newest checkpoint in output_dir when there is one.
        save_final_model: Write the final Hugging Face checkpoint to ``<output_dir>/final``.
        log_every_steps: Log a line (and a progress bar update) every N steps.
    """

    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    max_seq_len: int = 4096
    overlong: Literal["drop", "truncate"] = "drop"
    unmask: bool = False
    effective_batch_size: int = 128
    max_tokens_per_gpu: int = 64000
    num_epochs: int = 1
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
    attn_implementation: str = "sdpa"
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    save_final_model: bool = True
    log_every_steps: int = 1

    def validate(self) -> None:
        _at_least(
            self,
            (
                "max_seq_len",
                "effective_batch_size",
                "max_tokens_per_gpu",
                "num_epochs",
                "log_every_steps",
                "keep_checkpoints",
            ),
            1,
        )
        _at_least(
            self, ("max_steps", "warmup_steps", "checkpoint_every_steps", "weight_decay", "max_grad_norm"), 0
        )
        if self.learning_rate <= 0:
            raise ConfigError("learning_rate", f"must be positive, got {self.learning_rate}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.adam_epsilon <= 0:
            raise ConfigError("adam_epsilon", f"must be positive, got {self.adam_epsilon}")
        if self.max_tokens_per_gpu < self.max_seq_len and self.overlong == "truncate":
            raise ConfigError(
                "max_tokens_per_gpu",
                f"{self.max_tokens_per_gpu} is smaller than max_seq_len {self.max_seq_len}: a truncated sample "
                "would not fit in one micro-batch",
            )


@dataclass(kw_only=True)
class OSFTOptions:
    """Orthogonal Subspace Fine-Tuning.

    Attributes:
        osft_unfreeze_rank_ratio: Share of each target weight's singular directions that train, in (0, 1];
            1.0 trains every direction.
        osft_target_patterns: Regexes of module names to decompose (default: chosen by model_type).
    """

    osft_unfreeze_rank_ratio: float = 0.25
    osft_target_patterns: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not 0 < self.osft_unfreeze_rank_ratio <= 1:
            raise ConfigError(
                "osft_unfreeze_rank_ratio",
                f"must be in (0, 1] (1.0 trains every singular direction), got {self.osft_unfreeze_rank_ratio}",
            )


@dataclass(kw_only=True)
class LoRAOptions:
    """LoRA adapters through peft (SFT).

    Attributes:
        lora_r: LoRA rank; 0 means full fine-tuning.
        lora_alpha: LoRA scaling numerator (the update is scaled by lora_alpha / lora_r).
        lora_dropout: Dropout on the LoRA input.
        lora_target_modules: Module names to adapt, or ["all-linear"].
        qlora: Load the base model in 4 bit for LoRA (needs bitsandbytes and a GPU).
    """

    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    qlora: bool = False

    def validate(self) -> None:
        _at_least(self, ("lora_r", "lora_dropout"), 0)
        if self.qlora and not self.lora_r:
            raise ConfigError("qlora", "QLoRA needs lora_r > 0")


@dataclass(kw_only=True)
class DPOOptions:
    """Direct Preference Optimization.

    Attributes:
        beta: Strength of the KL constraint to the reference model (higher: stay closer).
        loss_type: sigmoid (the DPO paper), ipo (identity preference optimisation) or hinge (SLiC).
        label_smoothing: Assumed share of flipped preference labels (conservative DPO; sigmoid loss only).
        ref_model_name_or_path: Reference model (default: the model training starts from). Its log-probs are
            computed once, before training, so it never sits in memory beside the policy.
        osft_constraint: Preference-tune inside the OSFT constraint: the base model's top singular subspace
            stays frozen (uses osft_unfreeze_rank_ratio and osft_target_patterns).
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
        eval_data_path: Optional JSONL for an eval loss at the end of training.
    """

    model_name_or_path: str
    data_path: str
    output_dir: str
    algorithm: Algorithm = "sft"
    eval_data_path: str = ""

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad option."""
        for name in ("model_name_or_path", "data_path", "output_dir"):
            if not getattr(self, name):
                raise ConfigError(name, "required option is empty")
        for group in (OptimOptions, OSFTOptions, LoRAOptions, DPOOptions):
            group.validate(self)
        if self.algorithm == "osft" and self.lora_r:
            raise ConfigError("lora_r", "LoRA and OSFT are alternatives; set lora_r to 0 for osft")
        if self.algorithm == "dpo" and self.osft_constraint and self.lora_r:
            raise ConfigError("lora_r", "osft_constraint and LoRA are alternatives; set lora_r to 0")

    @property
    def uses_osft(self) -> bool:
        """OSFT itself, or DPO inside the OSFT constraint."""
        return self.algorithm == "osft" or (self.algorithm == "dpo" and self.osft_constraint)
