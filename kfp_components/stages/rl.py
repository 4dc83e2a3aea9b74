"""The rl stage: online reinforcement learning from reward functions and reward models (grpo, rloo,
reinforce_pp, and with a value model ppo and a2c; see docs/rl.md).

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
        algorithm: grpo (group-normalised advantages, clipped ratio), rloo (leave-one-out baseline),
            reinforce_pp (REINFORCE++: KL in the reward, globally whitened advantages), ppo (a value model,
            GAE, clipped policy and value losses, num_iterations x num_mini_batches updates per step) or a2c
            (advantage actor-critic: one update per step, policy loss -A log pi, vf_coef 0.5 and
            entropy_coef 0.01 unless set). ppo's and a2c's options: value_model_init, value_learning_rate,
            gamma, gae_lambda, vf_coef, value_clip, entropy_coef, early_stop_kl, kl_estimator,
            reward_clip, whiten_rewards, missing_eos_penalty, whiten_advantages.
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
