"""The rewards of an online training step, set by pipeline parameters, folded into its ``training_options``.

The rl and rlaif pipelines give the reward functions, the reward model and the judge their own parameters;
the training step takes every further trainer option in one ``training_options`` mapping. An option may come
from one place only: a reward set by its parameter and in ``training_options`` too is an error naming both.
A judge (rlaif) is added after the other reward functions, so its weight is the last of ``reward_weights``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kfp_components.typed_config import ConfigError

#: The judge reward's API key variable in the TrainJob's workers (set from the judge's ``token_secret``).
JUDGE_TOKEN_ENV = "JUDGE_API_KEY"


def judge_reward(base_url: str, model: str, token_secret: str) -> dict[str, Any]:
    """The ``judge`` reward function for an endpoint judge; its key comes from ``token_secret`` (empty: none)."""
    judge: dict[str, Any] = {"function": "judge", "backend": "openai", "base_url": base_url, "model": model}
    if token_secret:
        judge.update(token_env=JUDGE_TOKEN_ENV, token_secret=token_secret)
    return judge


def with_rewards(
    training_options: Mapping[str, Any],
    *,
    reward_functions: Sequence[Any] = (),
    reward_model_path: str = "",
    judge: Mapping[str, Any] | None = None,
    parameters: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``training_options`` with the rewards added. ``parameters`` names the pipeline parameter of each
    argument (reward_functions, reward_model_path, training_options) for the error messages."""
    names = {"training_options": "training_options", **(parameters or {})}
    problems = []
    for option, value in (("reward_functions", reward_functions), ("reward_model_path", reward_model_path)):
        if value and option in training_options:
            problems.append(
                (
                    f"{names['training_options']}.{option}",
                    f"is set by {names.get(option, option)}; set it there only",
                )
            )
    if problems:
        raise ConfigError.of(problems)
    merged = dict(training_options)
    functions = list(reward_functions) or list(merged.get("reward_functions", []))
    if judge:
        functions.append(dict(judge))
    if functions:
        merged["reward_functions"] = functions
    if reward_model_path:
        merged["reward_model_path"] = reward_model_path
    return merged
