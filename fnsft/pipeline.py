"""``from fnsft.pipeline import Pipeline``: the multi-stage pipeline of :mod:`kfp_components.orchestration`
(``Pipeline.register_stage("my_stage", MyStage)`` registers a custom stage)."""

from kfp_components.orchestration import Pipeline, PipelineConfig, load_pipeline_config

__all__ = ["Pipeline", "PipelineConfig", "load_pipeline_config"]
