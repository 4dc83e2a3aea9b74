"""The reward functions of the GRPO benchmark, shared by both trainers it compares.

Plain Python, no imports beyond the standard library: the project's trainer loads them by reference
(``benchmarks/grpo_rewards.py:digit_share``) and TRL's ``GRPOTrainer``, in its own virtual environment, imports
this file by path. Both call ``fn(prompts, completions, **columns) -> list[float]``; TRL hands conversational
completions as message lists and extra keyword arguments (``completion_ids``, ``trainer_state``), which are
ignored here.

* :func:`digit_share`: the share of the completion's non-space characters that are digits (0 for an empty
  completion). A graded reward a tiny random model can climb within a few steps (its completions start with
  about 1% digits), and the direction the arithmetic task needs: an answer is a number.
* :func:`exact_match`: 1.0 when the last number in the completion equals the ``answer`` column, else 0.0.
  Recorded alongside (weight 0): a tiny model without a warm-up is not expected to solve arithmetic.
"""

from __future__ import annotations

import re
from typing import Any

_NUMBER = re.compile(r"-?\d+")


def completion_text(completion: Any) -> str:
    """The text of one completion: a string, or the content of the last message of a message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion is a string or a list of messages, got {type(completion).__name__}")


def digit_share(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
    """Share of non-space characters that are ASCII digits, per completion."""
    rewards = []
    for completion in completions:
        characters = [c for c in completion_text(completion) if not c.isspace()]
        rewards.append(sum(c in "0123456789" for c in characters) / len(characters) if characters else 0.0)
    return rewards


def exact_match(prompts: list[Any], completions: list[Any], answer: list[Any], **columns: Any) -> list[float]:
    """1.0 when the completion's last integer equals ``answer``, else 0.0."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        numbers = _NUMBER.findall(completion_text(completion))
        rewards.append(1.0 if numbers and int(numbers[-1]) == int(expected) else 0.0)
    return rewards
