"""``from fnsft.stages.base import BaseStage, StageConfig, StageResult``: the classes of
:mod:`kfp_components.stages.base`."""

from kfp_components.stages.base import BaseStage, StageConfig, StageResult

__all__ = ["BaseStage", "StageConfig", "StageResult"]
