"""Reward functions of the online engine: load them from the config, score completions, summarise a step.

* :func:`load_reward_set` reads ``reward_functions`` (shipped names, ``module:function``,
  ``path/to/file.py:function``, or mappings with options) and ``reward_weights``;
* :meth:`RewardSet.score` calls each ``fn(prompts, completions, **columns) -> list[float | None]`` on a
  batch and checks what it returns; :meth:`RewardScores.statistics` gives the step's reward metrics;
* :func:`check_reward_set` is the dry run: every function called on one prompt row.

Shipped rewards: ``exact_match`` (:mod:`.answers`), ``format_regex`` and ``overlong_penalty``
(:mod:`.shaping`), ``reward_model`` (:mod:`.reward_model`), ``http`` (:mod:`.http`), ``judge`` (:mod:`.judge`).

Importing this package imports neither torch nor transformers; a reward model imports them when it loads.
"""

from __future__ import annotations

from kfp_components.rewards.answers import exact_match, extract_answer
from kfp_components.rewards.errors import RewardError
from kfp_components.rewards.loading import SHIPPED, RewardReference, load_reward_set, parse_references
from kfp_components.rewards.scoring import (
    RewardFunction,
    RewardScores,
    RewardSet,
    check_reward_set,
)

__all__ = [
    "SHIPPED",
    "RewardError",
    "RewardFunction",
    "RewardReference",
    "RewardScores",
    "RewardSet",
    "check_reward_set",
    "exact_match",
    "extract_answer",
    "load_reward_set",
    "parse_references",
]
