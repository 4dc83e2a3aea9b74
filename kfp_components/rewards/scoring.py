"""Score completions with a set of weighted reward functions, and summarise the scores of a step.

A reward function is ``fn(prompts, completions, **columns) -> list[float | None]``: ``prompts`` and
``completions`` are aligned lists (one item per completion; a prompt repeats for each of its
``num_generations`` completions), ``columns`` the prompt rows' other columns (``answer``, ...) aligned the
same way. ``None`` means no score for that sample: it is left out of the statistics here and of the baseline
in the advantage estimators.

:meth:`RewardSet.score` calls every function once on the whole batch and checks what comes back: a list of
the right length holding numbers (``int``/``float``, finite; not ``bool``) or ``None``. A function that
raises, answers the wrong length or a non-number stops scoring with a :class:`RewardError` naming the
function, the sample index and the sample's prompt (cut to 80 characters). When a function raises on the
batch, it is called again on one sample at a time to find the sample it fails on.

A sample's total is the weighted sum of the functions that scored it, ``None`` when none did.
"""

from __future__ import annotations

import inspect
import math
import numbers
import statistics as stats
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kfp_components.rewards.errors import RewardError

RewardFunction = Callable[..., list[float | None]]

#: The completion :func:`check_reward_set` scores when none is given.
DUMMY_COMPLETION = "Let me think step by step. 2 + 2 = 4. The answer is 4."


@dataclass
class RewardScores:
    """The scores of one batch: per function (by name) and the weighted total, one item per completion."""

    per_function: dict[str, list[float | None]]
    total: list[float | None]

    @classmethod
    def concatenate(cls, parts: Sequence[RewardScores]) -> RewardScores:
        """The scores of several batches (e.g. gathered from every rank) as one."""
        names = list(parts[0].per_function) if parts else []
        return cls(
            per_function={name: [s for part in parts for s in part.per_function[name]] for name in names},
            total=[s for part in parts for s in part.total],
        )

    def statistics(self) -> dict[str, float]:
        """``reward`` (mean of the totals), ``reward_std``, ``reward_min``, ``reward_max``, per function
        ``reward/<name>/mean``, ``/std``, ``/min``, ``/max``, ``/none_share``, and ``reward_none_share`` (share
        of samples without a total). Standard deviations are of the population (0 for one value); None
        scores are left out, and a statistic without any value is left out."""
        result: dict[str, float] = {}
        result.update(_summary(self.total, "reward", "reward_"))
        result["reward_none_share"] = _none_share(self.total)
        for name, values in self.per_function.items():
            result.update(_summary(values, f"reward/{name}/mean", f"reward/{name}/"))
            result[f"reward/{name}/none_share"] = _none_share(values)
        return result


def _summary(values: list[float | None], mean_key: str, prefix: str) -> dict[str, float]:
    present = [v for v in values if v is not None]
    if not present:
        return {}
    return {
        mean_key: stats.fmean(present),
        f"{prefix}std": stats.pstdev(present),
        f"{prefix}min": min(present),
        f"{prefix}max": max(present),
    }


def _none_share(values: list[float | None]) -> float:
    return sum(v is None for v in values) / len(values) if values else 0.0


@dataclass
class RewardSet:
    """Weighted reward functions. ``references`` says how the config named each (for errors); it defaults to
    ``names``."""

    names: list[str]
    functions: list[RewardFunction]
    weights: list[float]
    references: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.references:
            self.references = list(self.names)
        lengths = {len(self.names), len(self.functions), len(self.weights), len(self.references)}
        if len(lengths) != 1:
            raise ValueError("names, functions, weights and references must have one item per function")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"reward function names must differ, got {self.names}")

    def score(
        self, prompts: list[str | list[dict]], completions: list[str], columns: dict[str, list[Any]]
    ) -> RewardScores:
        """Score every completion with every function (see the module docstring); raises :class:`RewardError`."""
        count = len(completions)
        if len(prompts) != count:
            raise ValueError(
                f"{len(prompts)} prompts for {count} completions; give one prompt per completion"
            )
        for name, values in columns.items():
            if len(values) != count:
                raise ValueError(f"column {name!r} has {len(values)} values for {count} completions")
        per_function = {
            name: call_reward(function, reference, prompts, completions, columns)
            for name, function, reference in zip(self.names, self.functions, self.references, strict=True)
        }
        total: list[float | None] = []
        for i in range(count):
            given = [(w, s[i]) for w, s in zip(self.weights, per_function.values(), strict=True)]
            parts = [weight * score for weight, score in given if score is not None]
            total.append(math.fsum(parts) if parts else None)
        return RewardScores(per_function=per_function, total=total)

    def usage(self) -> dict[str, float]:
        """The counters of the functions that keep them (a ``usage()`` method returning additive numbers, such
        as a judge's requests and tokens), as ``reward/<name>/<counter>``, cumulative over the run."""
        counters: dict[str, float] = {}
        for name, function in zip(self.names, self.functions, strict=True):
            usage = getattr(function, "usage", None)
            if callable(usage):
                counters.update({f"reward/{name}/{key}": float(value) for key, value in usage().items()})
        return counters


def call_reward(
    function: RewardFunction,
    reference: str,
    prompts: Sequence[Any],
    completions: Sequence[str],
    columns: Mapping[str, Sequence[Any]],
) -> list[float | None]:
    """``function(prompts, completions, **columns)``, checked (see the module docstring)."""
    count = len(completions)
    _check_arguments(function, reference, columns)
    try:
        scores = function(list(prompts), list(completions), **{k: list(v) for k, v in columns.items()})
    except RewardError as exc:
        index = exc.index
        raise exc.at(
            reference, index, prompts[index] if index is not None and index < count else None
        ) from exc
    except Exception as exc:
        index = _failing_sample(function, prompts, completions, columns)
        prompt = prompts[index] if index is not None else None
        raise RewardError(
            reference, f"raised {type(exc).__name__}: {exc}", index=index, prompt=prompt
        ) from exc
    return check_scores(scores, reference, prompts, count)


def _check_arguments(function: RewardFunction, reference: str, columns: Mapping[str, Sequence[Any]]) -> None:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # a builtin or extension without a signature: the call itself will tell
    try:
        signature.bind([], [], **{name: [] for name in columns})
    except TypeError as exc:
        given = ", ".join(["prompts", "completions", *(f"{k}=..." for k in columns)])
        raise RewardError(
            reference,
            f"cannot be called as fn({given}): {exc}; write it as fn(prompts, completions, **columns)",
        ) from None


def _failing_sample(
    function: RewardFunction,
    prompts: Sequence[Any],
    completions: Sequence[str],
    columns: Mapping[str, Sequence[Any]],
) -> int | None:
    """The first sample ``function`` raises on when called with that sample alone, or ``None``."""
    for i in range(len(completions)):
        try:
            function([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in columns.items()})
        except Exception:
            return i
    return None


def check_scores(scores: Any, reference: str, prompts: Sequence[Any], count: int) -> list[float | None]:
    """``scores`` as a list of floats and ``None``; a wrong length or value is a :class:`RewardError`."""
    if hasattr(scores, "tolist") and not isinstance(scores, list):  # a numpy array or a tensor
        scores = scores.tolist()
    if not isinstance(scores, list | tuple):
        raise RewardError(
            reference, f"returned {type(scores).__name__}; expected a list of {count} floats (None: no score)"
        )
    if len(scores) != count:
        raise RewardError(reference, f"returned {len(scores)} scores for {count} completions")
    checked: list[float | None] = []
    for i, value in enumerate(scores):
        if value is None:
            checked.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardError(
                reference,
                f"returned {value!r} ({type(value).__name__}); expected a float or None",
                index=i,
                prompt=prompts[i],
            )
        number = float(value)
        if not math.isfinite(number):
            raise RewardError(
                reference,
                f"returned {number}; a score must be finite (None: no score)",
                index=i,
                prompt=prompts[i],
            )
        checked.append(number)
    return checked


def check_reward_set(
    reward_set: RewardSet, one_row: dict[str, Any], completion: str = DUMMY_COMPLETION
) -> list[str]:
    """Problems met calling every function on one prompt row (``{"prompt": ..., <columns>}``) with a
    stand-in completion: the dry run's check of the reward functions. Empty when every function scored it."""
    if "prompt" not in one_row:
        return [f"the row has no 'prompt' column (it has: {', '.join(sorted(one_row)) or 'nothing'})"]
    prompts = [one_row["prompt"]]
    columns = {k: [v] for k, v in one_row.items() if k != "prompt"}
    problems = []
    for function, reference in zip(reward_set.functions, reward_set.references, strict=True):
        try:
            scores = call_reward(function, reference, prompts, [completion], columns)
        except RewardError as exc:
            problems.append(str(exc))
            continue
        if scores == [None] and getattr(function, "stop_when_unscored", False):
            problems.append(str(RewardError(reference, function.unscored_message(1))))  # type: ignore[attr-defined]
    return problems


def unscored_problem(
    reward_set: RewardSet, per_function: Mapping[str, Sequence[float | None]]
) -> RewardError | None:
    """The error for a function that must score something (``stop_when_unscored``) and scored none of a
    step's completions (``per_function``: every rank's scores by name); None when there is none."""
    for name, function, reference in zip(
        reward_set.names, reward_set.functions, reward_set.references, strict=True
    ):
        scores = per_function.get(name, [])
        if scores and getattr(function, "stop_when_unscored", False) and all(s is None for s in scores):
            return RewardError(reference, function.unscored_message(len(scores)))  # type: ignore[attr-defined]
    return None
