"""The rl stage: online reinforcement learning from reward functions (grpo, rloo, reinforce_pp).

The stage's ``algorithm`` option chooses the algorithm (the engine's option of the same name); the data is
the dataset stage's ``prompt`` rows, whose other columns (``answer``, ...) reach the reward functions. A
reward function given as ``path/to/file.py:function`` is found like every other relative path of the YAML:
from the folder ``fnsft-pipeline`` runs in. The reference model of the KL penalty is the stage's input
model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kfp_components.stages.training import TrainingStage, TrainingStageConfig
from kfp_components.trainer.config import Algorithm, OptimOptions, OSFTOptions, RLAlgorithm, RLOptions


@dataclass(kw_only=True)
class RLStageConfig(TrainingStageConfig, OptimOptions, RLOptions, OSFTOptions):
    """Options of the rl stage: the data (`prompt` rows), the algorithm, the reward functions, sampling,
    the engine's training options, and OSFT's (used with osft_constraint).

    Attributes:
        algorithm: grpo (group-normalised advantages, clipped ratio), rloo (leave-one-out baseline) or
            reinforce_pp (REINFORCE++: KL in the reward, globally whitened advantages).
    """

    algorithm: RLAlgorithm = "grpo"


class RLStage(TrainingStage):
    """Learn from the model's own completions, scored by reward functions."""

    stage_name: ClassVar[str] = "rl"
    config_class: ClassVar[type[RLStageConfig]] = RLStageConfig
    data_format: ClassVar[str] = "prompt"

    config: RLStageConfig

    def engine_algorithm(self) -> Algorithm:
        return self.config.algorithm
