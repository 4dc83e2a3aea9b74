"""The SFT stage: supervised fine-tuning on conversations, every weight or LoRA adapters (``lora_r > 0``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kfp_components.stages.training import TrainingStage, TrainingStageConfig
from kfp_components.trainer.config import Algorithm, LoRAOptions, OptimOptions


@dataclass(kw_only=True)
class SFTStageConfig(TrainingStageConfig, OptimOptions, LoRAOptions):
    """Options of the sft stage: the data (`messages` rows), the engine's training options and LoRA."""


class SFTStage(TrainingStage):
    """Supervised fine-tuning on `messages` rows; with ``lora_r > 0`` LoRA adapters, merged into the saved
    model so the next stage starts from a plain checkpoint."""

    stage_name: ClassVar[str] = "sft"
    config_class: ClassVar[type[SFTStageConfig]] = SFTStageConfig
    algorithm: ClassVar[Algorithm] = "sft"
    data_format: ClassVar[str] = "messages"
