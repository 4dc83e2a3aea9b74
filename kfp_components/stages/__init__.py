"""Stages of a multi-stage fine-tuning pipeline: the base classes, the built-in stages (sft, osft, dpo,
reward_model, rl, rlaif, cot_distillation) and the registry of stage names. ``docs/multistage.md`` describes them."""

from kfp_components.stages.base import BaseStage, StageConfig, StageResult
from kfp_components.stages.dpo import DPOStage, DPOStageConfig
from kfp_components.stages.osft import OSFTStage, OSFTStageConfig
from kfp_components.stages.registry import (
    BUILTIN_STAGES,
    available_stages,
    get_stage_class,
    register_stage,
    unregister_stage,
)
from kfp_components.stages.reward_model import RewardModelStage, RewardModelStageConfig
from kfp_components.stages.sft import SFTStage, SFTStageConfig
from kfp_components.stages.training import TrainingData, TrainingStage, TrainingStageConfig

__all__ = [
    "BUILTIN_STAGES",
    "BaseStage",
    "DPOStage",
    "DPOStageConfig",
    "OSFTStage",
    "OSFTStageConfig",
    "RewardModelStage",
    "RewardModelStageConfig",
    "SFTStage",
    "SFTStageConfig",
    "StageConfig",
    "StageResult",
    "TrainingData",
    "TrainingStage",
    "TrainingStageConfig",
    "available_stages",
    "get_stage_class",
    "register_stage",
    "unregister_stage",
]
