"""The OSFT stage: Orthogonal Subspace Fine-Tuning, which keeps the model's top singular directions frozen
so that a new task is learnt with little forgetting of what the input model knew."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kfp_components.stages.training import TrainingStage, TrainingStageConfig
from kfp_components.trainer.config import Algorithm, OptimOptions, OSFTOptions


@dataclass(kw_only=True)
class OSFTStageConfig(TrainingStageConfig, OptimOptions, OSFTOptions):
    """Options of the osft stage: the data (`messages` rows), the engine's training options and OSFT's."""


class OSFTStage(TrainingStage):
    """Orthogonal Subspace Fine-Tuning on `messages` rows; the saved model is dense again."""

    stage_name: ClassVar[str] = "osft"
    config_class: ClassVar[type[OSFTStageConfig]] = OSFTStageConfig
    algorithm: ClassVar[Algorithm] = "osft"
    data_format: ClassVar[str] = "messages"
