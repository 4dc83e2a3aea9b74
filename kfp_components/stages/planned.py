"""Stages the multi-stage YAML may name that this version cannot run yet: ``cot_distillation``.

Their options are recognised, so a dry run of a whole chain checks every key (``reasoning_dataset_path``,
``teacher_model_path``, ``teacher_model_type`` of ``cot_distillation``, as users' configs already have them)
and reports, with every other problem it finds, that the stage is not available; a real run stops with the
same message before the first stage trains, so no GPU time is spent on a chain that cannot finish.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from kfp_components.stages.base import BaseStage, StageConfig, StageResult
from kfp_components.typed_config import ConfigError


@dataclass(kw_only=True)
class CoTDistillationStageConfig(StageConfig):
    """Options of the cot_distillation stage (a teacher writes reasoning, the student learns it); not
    available in this version.

    Attributes:
        reasoning_dataset_path: Reasoning problems with reference answers (same URI forms as a training
            stage's dataset_name_or_path).
        teacher_model_path: The teacher: a model name served behind an OpenAI-compatible endpoint
            (teacher_model_type api) or a Hugging Face id or folder (local).
        teacher_model_type: api (an OpenAI-compatible endpoint) or local (a Hugging Face causal LM).
    """

    reasoning_dataset_path: str = ""
    teacher_model_path: str = ""
    teacher_model_type: Literal["api", "local"] = "api"


class UnavailableStage(BaseStage):
    """A stage whose options are checked but which cannot run in this version."""

    description: ClassVar[str]

    def unavailable(self) -> ConfigError:
        return ConfigError(
            "",
            f"the {self.name} stage ({self.description}) is not available in this version of kfp-components; "
            "its options were checked. Remove it from stages to run the others",
        )

    def check_inputs(self, model: str, tokenizer: str) -> None:
        raise self.unavailable()

    def dry_run(self, model: str, tokenizer: str) -> dict[str, Any]:
        raise self.unavailable()

    def execute(self, model: str, tokenizer: str, previous_result: StageResult | None) -> StageResult:
        raise self.unavailable()


class CoTDistillationStage(UnavailableStage):
    stage_name: ClassVar[str] = "cot_distillation"
    config_class: ClassVar[type[StageConfig]] = CoTDistillationStageConfig
    description = "chain-of-thought distillation from a teacher model"
