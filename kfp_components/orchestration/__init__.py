"""Multi-stage fine-tuning: a YAML lists stages (sft, osft, dpo, custom) that run in order, each from the
model the previous one saved. Entry points: ``fnsft-pipeline`` and :class:`Pipeline`; see
``docs/multistage.md``."""

from kfp_components.orchestration.config import (
    PipelineConfig,
    load_pipeline_config,
    pipeline_config_from_dict,
)
from kfp_components.orchestration.pipeline import (
    DryRunError,
    Pipeline,
    PlannedStage,
    RunPlan,
    StageFailedError,
)
from kfp_components.orchestration.state import PipelineError, PipelineState

__all__ = [
    "DryRunError",
    "Pipeline",
    "PipelineConfig",
    "PipelineError",
    "PipelineState",
    "PlannedStage",
    "RunPlan",
    "StageFailedError",
    "load_pipeline_config",
    "pipeline_config_from_dict",
]
