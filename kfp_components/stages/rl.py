"""The rl stage: online reinforcement learning from reward functions and reward models (grpo, rloo,
reinforce_pp, and with a value model ppo, a2c and trpo; see docs/rl.md).

The stage's ``algorithm`` option chooses the algorithm (the engine's option of the same name); the data is
the dataset stage's ``prompt`` rows, whose other columns (``answer``, ...) reach the reward functions. A
reward function given as ``path/to/file.py:function`` is found like every other relative path of the YAML:
from the folder ``fnsft-pipeline`` runs in. The reference model of the KL penalty is the stage's input
model.

``reward_model_path`` adds a reward model's score as one more reward, after ``reward_functions``: a folder or
hub id, or ``stage:<name>``, the reward model an earlier ``reward_model`` stage of the pipeline trains
(``<its output_dir>/final``). Before that stage has run, the checks of a dry run and of the pipeline's start
leave the reward model out (it does not exist yet) and check the other reward functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from kfp_components.stages.base import STAGE_REFERENCE, BaseStage
from kfp_components.stages.reward_model import RewardModelStage
from kfp_components.stages.training import TrainingStage, TrainingStageConfig
from kfp_components.trainer.config import (
    Algorithm,
    OptimOptions,
    OSFTOptions,
    RLAlgorithm,
    RLOptions,
    TrainingConfig,
)
from kfp_components.typed_config import ConfigError


@dataclass(kw_only=True)
class RLStageConfig(TrainingStageConfig, OptimOptions, RLOptions, OSFTOptions):
    """Options of the rl stage: the data (`prompt` rows), the algorithm, the reward functions, sampling,
    the engine's training options, and OSFT's (used with osft_constraint).

    Attributes:
        algorithm: grpo (group-normalised advantages, clipped ratio), rloo (leave-one-out baseline),
            reinforce_pp (REINFORCE++: KL in the reward, globally whitened advantages), ppo (a value model,
            GAE, clipped policy and value losses, num_iterations x num_mini_batches updates per step) or a2c
            (advantage actor-critic: one update per step, policy loss -A log pi, vf_coef 0.5 and
            entropy_coef 0.01 unless set) or trpo (one natural-gradient step of the policy within the trust
            region max_kl per step, then value_epochs passes of the value model; no learning rate for the
            policy; distributed: ddp on several processes). ppo's and a2c's options: value_model_init,
            value_learning_rate, gamma, gae_lambda, vf_coef, value_clip, entropy_coef, early_stop_kl,
            kl_estimator, reward_clip, whiten_rewards, missing_eos_penalty, whiten_advantages; trpo uses
            them too (not entropy_coef, early_stop_kl) and its own: max_kl, cg_iterations, cg_damping,
            line_search_steps, line_search_shrink, value_epochs.
    """

    algorithm: RLAlgorithm = "grpo"


class RLStage(TrainingStage):
    """Learn from the model's own completions, scored by reward functions and a reward model."""

    stage_name: ClassVar[str] = "rl"
    config_class: ClassVar[type[RLStageConfig]] = RLStageConfig
    data_format: ClassVar[str] = "prompt"

    config: RLStageConfig

    def __init__(self, config: RLStageConfig):
        super().__init__(config)
        #: (stage name, folder) of the reward model an earlier stage trains, when reward_model_path names one
        self.reward_model_stage: tuple[str, Path] | None = None

    def engine_algorithm(self) -> Algorithm:
        return self.config.algorithm

    def link_earlier_stages(self, earlier: Mapping[str, BaseStage]) -> None:
        super().link_earlier_stages(earlier)
        reference = self.config.reward_model_path
        if not reference.startswith(STAGE_REFERENCE):
            return
        name = reference[len(STAGE_REFERENCE) :]
        stage = earlier.get(name)
        if not isinstance(stage, RewardModelStage):
            candidates = [n for n, s in earlier.items() if isinstance(s, RewardModelStage)]
            found = (
                f"the reward_model stages before it: {', '.join(candidates)}"
                if candidates
                else ("no reward_model stage comes before it")
            )
            what = (
                "is not a reward_model stage"
                if stage is not None
                else "is not a stage listed before this one"
            )
            raise ConfigError("reward_model_path", f"{reference}: {name!r} {what} ({found})")
        self.reward_model_stage = (name, stage.reward_model_dir)

    def reward_model_reference(self) -> str:
        """``reward_model_path`` as the engine reads it: a ``stage:<name>`` reference resolved to the folder."""
        reference = self.config.reward_model_path
        if not reference.startswith(STAGE_REFERENCE):
            return reference
        if self.reward_model_stage is None:
            raise ConfigError(
                "reward_model_path",
                f"{reference} names a pipeline stage; outside a pipeline give the reward model's folder",
            )
        return str(self.reward_model_stage[1])

    def training_config(self, model: str, data_path: str, eval_data_path: str = "") -> TrainingConfig:
        config = super().training_config(model, data_path, eval_data_path)
        config.reward_model_path = self.reward_model_reference()
        return config

    def _reward_model_pending(self) -> bool:
        """Whether the reward model comes from an earlier stage that has not written it yet."""
        return (
            self.reward_model_stage is not None and not (self.reward_model_stage[1] / "config.json").is_file()
        )

    def reward_problems(self, config: TrainingConfig) -> list[tuple[str, str]]:
        if not self._reward_model_pending():
            return super().reward_problems(config)
        # The reward model does not exist yet: check the other reward functions, if any.
        if not config.reward_functions:
            return []
        weights = config.reward_weights[:-1]  # the reward model's weight is the last
        return super().reward_problems(
            dataclasses.replace(config, reward_model_path="", reward_weights=weights)
        )

    def dry_run(self, model: str, tokenizer: str) -> dict[str, Any]:
        plan = super().dry_run(model, tokenizer)
        if self.config.reward_model_path:
            plan["reward_model"] = self._describe_reward_model(tokenizer or model)
        return plan

    def _describe_reward_model(self, policy_tokenizer: str) -> str:
        path = self.reward_model_reference()
        if self._reward_model_pending():
            assert self.reward_model_stage is not None
            return f"{path} (trained by stage {self.reward_model_stage[0]!r} first)"
        from kfp_components.rewards.reward_model import tokenizer_difference

        try:
            difference = tokenizer_difference(path, policy_tokenizer)
        except (OSError, ValueError) as exc:  # the engine's preflight names the load error
            return f"{path} ({type(exc).__name__})"
        return f"{path} ({difference})" if difference else path
