"""The DPO stage: Direct Preference Optimization on (prompt, chosen, rejected) pairs, usually after SFT.

The reference model defaults to the stage's input model (the SFT model when it follows an sft stage), as in
the DPO paper; ``osft_constraint: true`` preference-tunes inside OSFT's frozen subspace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kfp_components.stages.training import TrainingStage, TrainingStageConfig
from kfp_components.trainer.config import Algorithm, DPOOptions, OptimOptions, OSFTOptions


@dataclass(kw_only=True)
class DPOStageConfig(TrainingStageConfig, OptimOptions, DPOOptions, OSFTOptions):
    """Options of the dpo stage: the data (`preference` rows), the engine's training options, DPO's, and
    OSFT's (used with osft_constraint). The data may also be given as `preference_dataset_path`."""

    option_aliases: ClassVar[dict[str, str]] = {"preference_dataset_path": "dataset_name_or_path"}


class DPOStage(TrainingStage):
    """Direct Preference Optimization on `preference` rows."""

    stage_name: ClassVar[str] = "dpo"
    config_class: ClassVar[type[DPOStageConfig]] = DPOStageConfig
    algorithm: ClassVar[Algorithm] = "dpo"
    data_format: ClassVar[str] = "preference"
