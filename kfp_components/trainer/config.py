"""The training engine's options: one typed config for the trainer CLI, the components and the stage YAML.

Every field is a command-line flag of ``python -m kfp_components.trainer`` (``--learning_rate 2e-5``) and a
key of its ``--config`` YAML; flags override the file. The KFP training components build the same object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kfp_components.typed_config import ConfigError

Algorithm = Literal["sft", "osft"]


@dataclass
class TrainingConfig:
    """Options of one training run.

    Attributes:
        model_name_or_path: Hugging Face model id or local folder of the starting checkpoint.
        data_path: JSONL file in `messages` format (the dataset stage's train output).
        output_dir: Where checkpoints, metrics and the final model go (final model in ``<output_dir>/final``).
        algorithm: sft (full fine-tuning, or LoRA when lora_r > 0) or osft (Orthogonal Subspace Fine-Tuning).
        eval_data_path: Optional JSONL for an eval loss at the end of each epoch.
        dtype: Compute precision: bfloat16 (autocast on GPU, fp32 master weights) or float32.
        max_seq_len: Longest sample in tokens; longer samples are handled by `overlong`.
        overlong: drop (skip and count) or truncate samples longer than max_seq_len.
        unmask: Train on every token, not only the assistant turns.
        effective_batch_size: Samples per optimizer step across all ranks.
        max_tokens_per_gpu: Token budget of one micro-batch on one rank; packing and gradient accumulation
            fill each step with effective_batch_size samples under this budget.
        num_epochs: Passes over the data.
        max_steps: Stop after this many optimizer steps (0: run all epochs).
        learning_rate, adam_beta1, adam_beta2, adam_epsilon, weight_decay: AdamW.
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
        osft_unfreeze_rank_ratio: OSFT: share of each target weight's singular directions that train, in (0, 1].
        osft_target_patterns: OSFT: regexes of module names to decompose (default: chosen by model_type).
        lora_r, lora_alpha, lora_dropout, lora_target_modules: LoRA (SFT with lora_r > 0).
        qlora: Load the base model in 4 bit for LoRA (needs bitsandbytes and a GPU).
    """

    model_name_or_path: str
    data_path: str
    output_dir: str
    algorithm: Algorithm = "sft"
    eval_data_path: str = ""
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
    osft_unfreeze_rank_ratio: float = 0.25
    osft_target_patterns: list[str] = field(default_factory=list)
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    qlora: bool = False

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad option."""
        for name in ("model_name_or_path", "data_path", "output_dir"):
            if not getattr(self, name):
                raise ConfigError(name, "required option is empty")
        positive = (
            "max_seq_len",
            "effective_batch_size",
            "max_tokens_per_gpu",
            "num_epochs",
            "log_every_steps",
            "keep_checkpoints",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "checkpoint_every_steps", "lora_r"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must not be negative, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError("learning_rate", f"must be positive, got {self.learning_rate}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, f"must be in [0, 1), got {getattr(self, name)}")
        for name in ("weight_decay", "max_grad_norm", "lora_dropout"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must not be negative, got {getattr(self, name)}")
        if self.adam_epsilon <= 0:
            raise ConfigError("adam_epsilon", f"must be positive, got {self.adam_epsilon}")
        if not 0 < self.osft_unfreeze_rank_ratio <= 1:
            raise ConfigError(
                "osft_unfreeze_rank_ratio",
                f"must be in (0, 1] (1.0 trains every singular direction), got {self.osft_unfreeze_rank_ratio}",
            )
        if self.max_tokens_per_gpu < self.max_seq_len and self.overlong == "truncate":
            raise ConfigError(
                "max_tokens_per_gpu",
                f"{self.max_tokens_per_gpu} is smaller than max_seq_len {self.max_seq_len}: a truncated sample "
                "would not fit in one micro-batch",
            )
        if self.algorithm == "osft" and self.lora_r:
            raise ConfigError("lora_r", "LoRA and OSFT are alternatives; set lora_r to 0 for osft")
        if self.qlora and not self.lora_r:
            raise ConfigError("qlora", "QLoRA needs lora_r > 0")
