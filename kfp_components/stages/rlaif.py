"""The rlaif stage: reinforcement learning from AI feedback, a judge LLM in place of human labels.

The judge (``judge``: :class:`~kfp_components.feedback.judges.JudgeOptions`) is a local Hugging Face model or
any OpenAI-compatible endpoint. ``mode`` says how its feedback is used:

* ``direct`` (d-RLAIF): the policy generates, the judge scores every completion (pointwise, the ``judge``
  reward), and the RL engine updates the policy with ``algorithm`` (ppo by default, or any other of the rl
  stage). ``reward_functions`` add rule rewards (a format check, say) to the judge's score; ``reward_weights``
  has one weight per reward function and the judge's last.
* ``distilled``: the input model answers every training prompt twice, the pairwise judge says which answer
  is better (both orders), a reward model is trained on those pairs (``reward_model_training``: the options
  of the reward_model stage) and the policy is tuned against it with ``algorithm``, as RLAIF was first done
  (Bai et al. 2022; Lee et al. 2023). ``reward_weights``: one per reward function and the reward model's last.
* ``preference_data``: only the judged pairs, written as a ``preference`` dataset for a later stage
  (``dataset_name_or_path: stage:<this stage>`` of a dpo stage: sft -> rlaif -> dpo). The model passes on
  unchanged.

With held-out prompts (``eval_dataset_name_or_path``), direct and distilled end with the win rate of the
tuned model against the input model, judged pairwise in both orders by ``win_rate_judge`` (default: the
judge), reported as ``win_rate`` (and wins, ties, losses) in the stage's metrics.

Before anything trains (a dry run, and the pipeline's start) the judge is checked: the endpoint lists the
model (``/v1/models``) or the local model loads, its key variable is set, the templates render on the first
prompt row, and one call returns a score (or a verdict).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from kfp_components.data import PreparedDataset
from kfp_components.feedback.comparisons import WinRate
from kfp_components.feedback.judges import JudgeOptions
from kfp_components.stages.base import StageResult
from kfp_components.stages.reward_model import RewardModelStage, RewardModelStageConfig
from kfp_components.stages.rl import RLStage, RLStageConfig
from kfp_components.trainer.config import RLAlgorithm, RLOptions, TrainingConfig
from kfp_components.typed_config import ConfigError, from_dict, to_dict

Mode = Literal["direct", "distilled", "preference_data"]
#: The two stand-in responses of the pairwise judge's check.
CHECK_RESPONSES = ("The answer is 4.", "I do not know.")
#: Options of the reward_model stage the distilled mode sets itself.
_REWARD_MODEL_SET_BY_STAGE = ("dataset_name_or_path", "output_dir", "stage_name", "stage_type")


@dataclass(kw_only=True)
class RLAIFStageConfig(RLStageConfig):
    """Options of the rlaif stage: the rl stage's (data: `prompt` rows; algorithm, sampling, training) and

    Attributes:
        algorithm: The RL algorithm of direct and distilled: ppo (the default here), grpo, rloo,
            reinforce_pp, a2c or trpo, with the rl stage's options.
        mode: direct (the judge's score is the reward), distilled (the judge labels pairs of the policy's own
            answers, a reward model learns them, RL against it) or preference_data (write the judged pairs as a
            preference dataset for a later stage; no training).
        judge: The judge: backend (openai or local), model, base_url, token_env, the templates, the score
            scale and the endpoint's limits (see the judge options table).
        win_rate_judge: The judge of the win rate on eval_dataset_name_or_path (default: judge).
        win_rate_prompts: Judge the win rate on the first N held-out prompts (0: all of them).
        preference_min_margin: Keep a judged pair when |2p - 1| is at least this (p: the order-averaged
            probability that the first answer is better); 0.5 keeps the pairs whose two orders agree.
        reward_model_training: distilled: options of the reward model's training (those of the reward_model
            stage, such as learning_rate, num_epochs, use_lora; its data and folder are set by this stage).
    """

    algorithm: RLAlgorithm = "ppo"
    mode: Mode = "direct"
    judge: JudgeOptions
    win_rate_judge: JudgeOptions | None = None
    win_rate_prompts: int = 0
    preference_min_margin: float = 0.5
    reward_model_training: dict[str, Any] = field(default_factory=dict)

    @property
    def all_reward_functions(self) -> list[str | dict[str, Any]]:
        """The rl stage's reward functions, then the judge (direct) or the reward model it trains
        (distilled): what ``reward_weights`` weighs, one weight each."""
        extra: list[str | dict[str, Any]] = []
        if self.mode == "direct":
            extra = [{"function": "judge", "name": "judge", **to_dict(self.judge)}]
        elif self.mode == "distilled":
            extra = [{"function": "reward_model", "model": "<the reward model trained on the judged pairs>"}]
        else:
            return RLOptions.all_reward_functions.fget(self)  # type: ignore[attr-defined]
        return [*self.reward_functions, *extra]

    def validate(self) -> None:
        problems = []
        if self.win_rate_prompts < 0:
            problems.append(("win_rate_prompts", f"must be 0 (all) or positive, got {self.win_rate_prompts}"))
        if not 0.0 <= self.preference_min_margin <= 1.0:
            problems.append(
                ("preference_min_margin", f"must be in [0, 1], got {self.preference_min_margin:g}")
            )
        if self.reward_model_path:
            problems.append(
                (
                    "reward_model_path",
                    "the rlaif stage's reward is the judge (direct) or a reward model it trains from the judge's "
                    "labels (distilled); to tune against a reward model you have, use the rl stage",
                )
            )
        if self.reward_model_training and self.mode != "distilled":
            problems.append(("reward_model_training", f"applies to mode distilled, not {self.mode}"))
        if self.mode == "preference_data" and self.eval_dataset_name_or_path:
            problems.append(
                (
                    "eval_dataset_name_or_path",
                    "preference_data trains nothing, so there is no win rate to measure",
                )
            )
        if problems:
            raise ConfigError.of(problems)
        super().validate()


class RLAIFStage(RLStage):
    """Learn from a judge LLM's feedback (see the module docstring)."""

    stage_name: ClassVar[str] = "rlaif"
    config_class: ClassVar[type[RLAIFStageConfig]] = RLAIFStageConfig

    config: RLAIFStageConfig

    @property
    def preferences_path(self) -> Path:
        """The judged pairs (distilled and preference_data)."""
        return Path(self.config.output_dir) / "preferences.jsonl"

    @property
    def reward_model_dir(self) -> Path:
        return Path(self.config.output_dir) / "reward_model"

    def output_dataset(self) -> tuple[Path, str] | None:
        if self.config.mode == "direct":
            return None
        return self.preferences_path, "preference"

    # ------------------------------------------------------------------------------------------- config

    def distilled_reward_model(self) -> RewardModelStage:
        """The reward_model stage that distilled mode runs on the judged pairs."""
        given = dict(self.config.reward_model_training)
        for key in _REWARD_MODEL_SET_BY_STAGE:
            if key in given:
                raise ConfigError(f"reward_model_training.{key}", "is set by the rlaif stage")
        options = {
            **given,
            "dataset_name_or_path": str(self.preferences_path),
            "output_dir": str(self.reward_model_dir),
            "stage_name": f"{self.name}.reward_model",
        }
        config = from_dict(RewardModelStageConfig, options, "reward_model_training")
        return RewardModelStage(config)

    def validate_config(self) -> None:
        if self.config.mode == "distilled":
            try:
                self.distilled_reward_model().validate_config()
            except ConfigError as exc:
                raise exc.under("reward_model_training") from None
        if self.config.mode != "preference_data":  # preference_data trains nothing
            super().validate_config()

    def judge_reward(self) -> dict[str, Any]:
        """The judge as the engine's ``judge`` reward (direct mode)."""
        return {"function": "judge", "name": "judge", **to_dict(self.config.judge)}

    def training_config(self, model: str, data_path: str, eval_data_path: str = "") -> TrainingConfig:
        # the held-out prompts are the win rate's, not the engine's (an online algorithm has no eval loss)
        config = super().training_config(model, data_path, "")
        if self.config.mode == "direct":
            config.reward_functions = [*config.reward_functions, self.judge_reward()]
        elif self.config.mode == "distilled":
            config.reward_model_path = str(self.reward_model_dir / "final")
        return config

    def discard_stale_outputs(self) -> None:
        """Also the judged pairs and the reward model of an earlier attempt with other options."""
        super().discard_stale_outputs()
        self.preferences_path.unlink(missing_ok=True)
        shutil.rmtree(self.reward_model_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------------------- checks

    def _reward_model_pending(self) -> bool:
        return (
            self.config.mode == "distilled"
            and not (self.reward_model_dir / "final" / "config.json").is_file()
        )

    def engine_problems(self, model: str, prepared: dict[str, PreparedDataset]) -> list[tuple[str, str]]:
        """The engine's preflight (direct: the judge reward scores the first prompt row), then the pairwise
        judges'; preference_data trains nothing and checks its judge only."""
        found = [] if self.config.mode == "preference_data" else super().engine_problems(model, prepared)
        return found or self.judge_problems(prepared)

    def reward_problems(self, config: TrainingConfig) -> list[tuple[str, str]]:
        if not self._reward_model_pending():
            return super().reward_problems(config)
        # distilled, before its reward model exists: check the other reward functions, if any
        if not config.reward_functions:
            return []
        return super().reward_problems(
            dataclasses.replace(config, reward_model_path="", reward_weights=config.reward_weights[:-1])
        )

    def judge_problems(self, prepared: dict[str, PreparedDataset]) -> list[tuple[str, str]]:
        """The pairwise judges this stage uses answer with a verdict on the first prompt row (the pointwise
        judge of direct mode is checked as a reward by the engine's preflight)."""
        problems: list[tuple[str, str]] = []
        first = _first_row(prepared.get(""))
        if self.config.mode != "direct":
            problems += _pairwise_problems(self.config.judge, "judge", first)
        if "eval_" in prepared and self.config.mode != "preference_data":
            judge, key = self.win_rate_judge()
            problems += _pairwise_problems(judge, key, _first_row(prepared["eval_"]) or first)
        return problems

    def win_rate_judge(self) -> tuple[JudgeOptions, str]:
        """The win rate's judge and its option's name."""
        if self.config.win_rate_judge is not None:
            return self.config.win_rate_judge, "win_rate_judge"
        return self.config.judge, "judge"

    def dry_run(self, model: str, tokenizer: str) -> dict[str, Any]:
        plan = super().dry_run(model, tokenizer)
        plan["mode"] = self.config.mode
        plan["judge"] = self.config.judge.describe()
        if self.config.mode != "direct":
            plan["preference_data"] = str(self.preferences_path)
        if self.config.mode == "preference_data":
            plan["algorithm"] = "none: the judged pairs only"
            plan.pop("final_model", None)
            plan["next_stage_starts_from"] = model
        if self.config.mode == "distilled":
            plan["reward_model"] = f"{self.reward_model_dir / 'final'} (trained on the judged pairs first)"
        if self.config.eval_dataset_name_or_path:
            plan["win_rate_judge"] = self.win_rate_judge()[0].describe()
        return plan

    # ---------------------------------------------------------------------------------------------- run

    def execute(self, model: str, tokenizer: str, previous_result: StageResult | None) -> StageResult:
        from kfp_components.stages.training import model_with_tokenizer

        out = Path(self.config.output_dir)
        if "" not in self._prepared:
            self._prepared = self._prepare_all(out / "data")
        prepared = dict(self._prepared)
        start = model_with_tokenizer(model, tokenizer, out / "input_model")  # the tokenizer training uses
        metrics: dict[str, float] = {}
        artifacts: dict[str, str] = {}
        if self.config.mode != "direct":
            metrics.update(self.label_preferences(start, str(prepared[""].train_path)))
            artifacts["preference_data"] = str(self.preferences_path)
        if self.config.mode == "preference_data":
            self._prepared = {}
            return StageResult(
                stage_name=self.name,
                model_path=model,
                tokenizer_path=tokenizer if tokenizer and tokenizer != model else "",
                metrics=metrics,
                artifacts=artifacts,
                input_model=model,
            )
        if self.config.mode == "distilled":
            reward_stage = self.distilled_reward_model()
            reward_stage.check_inputs(model, tokenizer)
            trained = reward_stage.execute(model, tokenizer, previous_result)
            metrics.update({f"reward_model/{k}": v for k, v in trained.metrics.items()})
            artifacts["reward_model"] = trained.artifacts["reward_model"]
        result = super().execute(model, tokenizer, previous_result)
        result.metrics.update(metrics)
        result.artifacts.update(artifacts)
        if "eval_" in prepared:
            result.metrics.update(
                self.measure_win_rate(result.model_path, start, str(prepared["eval_"].train_path)).metrics()
            )
        return result

    def label_preferences(self, model: str, prompts_path: str) -> dict[str, float]:
        """Two answers of ``model`` per training prompt, judged pairwise into :attr:`preferences_path`."""
        from kfp_components.feedback.comparisons import label_preferences
        from kfp_components.trainer.rollout import SamplingOptions

        config = self.config
        return label_preferences(
            model,
            prompts_path,
            self.preferences_path,
            config.judge,
            SamplingOptions.of(config, num_generations=2),
            min_margin=config.preference_min_margin,
            max_seq_len=config.max_seq_len,
            seed=config.seed,
            overlong=config.overlong,
        )

    def measure_win_rate(self, tuned: str, base: str, prompts_path: str) -> WinRate:
        """The tuned model's win rate against the input model on the held-out prompts."""
        from kfp_components.feedback.comparisons import win_rate
        from kfp_components.feedback.judges import PairwiseJudge, build_backend

        options, _ = self.win_rate_judge()
        judge = PairwiseJudge(options, build_backend(options))
        try:
            result = win_rate(
                tuned,
                base,
                prompts_path,
                judge,
                max_new_tokens=self.config.max_new_tokens,
                max_seq_len=self.config.max_seq_len,
                stop_strings=self.config.stop_strings,
                limit=self.config.win_rate_prompts,
                overlong=self.config.overlong,
            )
        finally:
            judge.close()
        return result


def _first_row(prepared: PreparedDataset | None) -> dict[str, Any] | None:
    if prepared is None:
        return None
    with open(prepared.train_path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row: dict[str, Any] = json.loads(line)
                return row
    return None


def _pairwise_problems(
    options: JudgeOptions, key: str, row: Mapping[str, Any] | None
) -> list[tuple[str, str]]:
    """``options``' pairwise judge reachable, its template rendering on ``row`` and its reply a verdict."""
    from kfp_components.feedback.endpoint import FeedbackError
    from kfp_components.feedback.judges import PairwiseJudge, build_backend

    try:
        judge = PairwiseJudge(options, build_backend(options))
    except (FeedbackError, OSError, ValueError, ImportError) as exc:
        return [(key, f"the judge {options.describe()} cannot be used: {exc}")]
    try:
        judge.check()
        if row is None:
            return []
        columns = {name: [value] for name, value in row.items() if name != "prompt"}
        verdict = judge.prefer([row["prompt"]], [CHECK_RESPONSES[0]], [CHECK_RESPONSES[1]], columns)
    except ConfigError as exc:
        return [(f"{key}.{path}", message) for path, message in exc.problems]
    except (FeedbackError, ValueError, ImportError) as exc:
        return [(key, f"the judge {options.describe()} cannot be used: {exc}")]
    finally:
        judge.close()
    if verdict[0] is None:
        return [
            (
                key,
                f"the judge {options.describe()} answered the first prompt row without a verdict "
                f"({options.answer_a!r} or {options.answer_b!r}): {judge.counts.last_unscored_reply!r}; check "
                "pairwise_template, answer_a and answer_b",
            )
        ]
    return []
