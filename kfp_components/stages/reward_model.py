"""The reward_model stage: train a reward model (a scalar head on the input model) on preference pairs.

The stage trains ``algorithm: reward_model`` (see ``kfp_components.trainer.reward_modeling``) from its input
model, usually the SFT model, as InstructGPT does. Its reward model is written to ``<output_dir>/final`` (an
``AutoModelForSequenceClassification`` checkpoint) and listed in the result's artifacts as ``reward_model``;
the model the next stage starts from is the stage's *input* model, unchanged, so ``sft -> reward_model -> rl``
tunes the SFT policy with the rl stage's ``reward_model_path: stage:reward_model``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from kfp_components.stages.base import StageResult
from kfp_components.stages.training import TrainingStage, TrainingStageConfig
from kfp_components.trainer.config import Algorithm, LoRAOptions, OptimOptions, RewardModelTrainingOptions


@dataclass(kw_only=True)
class RewardModelStageConfig(TrainingStageConfig, OptimOptions, LoRAOptions, RewardModelTrainingOptions):
    """Options of the reward_model stage: the data (`preference` rows, an optional `margin` column), the
    engine's training options, LoRA (the scalar head always trains fully) and reward-model training's. The
    data may also be given as `preference_dataset_path`."""

    option_aliases: ClassVar[dict[str, str]] = {"preference_dataset_path": "dataset_name_or_path"}


class RewardModelStage(TrainingStage):
    """Train a reward model on `preference` rows; pass the input model on to the next stage."""

    stage_name: ClassVar[str] = "reward_model"
    config_class: ClassVar[type[RewardModelStageConfig]] = RewardModelStageConfig
    algorithm: ClassVar[Algorithm] = "reward_model"
    data_format: ClassVar[str] = "preference"

    @property
    def reward_model_dir(self) -> Path:
        """Where the stage's reward model is (once the stage has run)."""
        return Path(self.config.output_dir) / "final"

    def execute(self, model: str, tokenizer: str, previous_result: StageResult | None) -> StageResult:
        result = super().execute(model, tokenizer, previous_result)
        result.artifacts["reward_model"] = result.model_path
        result.model_path = model
        result.tokenizer_path = tokenizer if tokenizer and tokenizer != model else ""
        return result

    def dry_run(self, model: str, tokenizer: str) -> dict[str, Any]:
        plan = super().dry_run(model, tokenizer)
        plan["reward_model"] = plan.pop("final_model")
        plan["next_stage_starts_from"] = model
        return plan
