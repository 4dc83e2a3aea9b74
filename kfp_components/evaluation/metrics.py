"""Turn lm-eval's nested results into flat, KFP-safe metric names, and compare a tuned model with its base.

lm-eval reports ``results[task]["acc,none"]`` and ``results[task]["acc_stderr,none"]``: the part after
the comma is the filter (``none`` when the task has no filter pipeline). Here they become
``<task>_acc`` and ``<task>_acc_stderr``; a named filter is kept as a suffix of the metric
(``gsm8k_exact_match_strict_match``, ``gsm8k_exact_match_strict_match_stderr``). Every character
outside ``[A-Za-z0-9_]`` becomes ``_`` so the names are valid KFP metric names.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_UNSAFE = re.compile(r"[^0-9A-Za-z_]+")
STDERR = "_stderr"


@dataclasses.dataclass(frozen=True)
class MetricValue:
    """One score of one task: ``name`` is the flat metric name, ``stderr`` is None where lm-eval gives none."""

    task: str
    metric: str
    filter: str
    value: float
    stderr: float | None
    higher_is_better: bool
    name: str


def safe_name(*parts: str) -> str:
    """Join ``parts`` with ``_`` and replace anything that is not a letter, digit or ``_``."""
    return _UNSAFE.sub("_", "_".join(p for p in parts if p)).strip("_")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            import numpy as np

            if isinstance(value, np.generic):
                value = value.item()
            else:
                return None
        except ImportError:  # pragma: no cover - numpy ships with lm-eval
            return None
    value = float(value)
    return value if math.isfinite(value) else None


def metric_values(results: Mapping[str, Any]) -> list[MetricValue]:
    """Every numeric score in an lm-eval result (tasks and groups), in lm-eval's order."""
    table: Mapping[str, Mapping[str, Any]] = dict(results.get("results", {}))
    for group, scores in results.get("groups", {}).items():
        table.setdefault(group, scores)  # type: ignore[attr-defined]
    higher = results.get("higher_is_better", {})
    values = []
    for task, scores in table.items():
        for key, raw in scores.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith(STDERR) or metric == "alias":
                continue
            value = _number(raw)
            if value is None:
                continue
            stderr = _number(scores.get(f"{metric}{STDERR},{filter_name}"))
            suffix = "" if filter_name == "none" else filter_name
            values.append(
                MetricValue(
                    task=task,
                    metric=metric,
                    filter=filter_name,
                    value=value,
                    stderr=stderr,
                    higher_is_better=bool(higher.get(task, {}).get(metric, True) is not False),
                    name=safe_name(task, metric, suffix),
                )
            )
    return values


def flatten_results(results: Mapping[str, Any]) -> dict[str, float]:
    """Flat metrics: ``<task>_<metric>[_<filter>]`` and, where lm-eval gives one, the same name + ``_stderr``."""
    flat: dict[str, float] = {}
    for item in metric_values(results):
        flat[item.name] = item.value
        if item.stderr is not None:
            flat[item.name + STDERR] = item.stderr
    return flat


def retention(tuned: float, base: float, higher_is_better: bool = True) -> float | None:
    """How much of the base model's score the tuned model keeps (1.0 = all); None when undefined.

    For lower-is-better metrics (perplexity) the ratio is inverted, so above 1.0 is always better.
    """
    numerator, denominator = (tuned, base) if higher_is_better else (base, tuned)
    if denominator == 0:
        return 1.0 if numerator == 0 else None
    return numerator / denominator


def compare(tuned: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, float]:
    """Forgetting check: ``base_<name>``, ``<name>_delta`` (tuned - base), ``<name>_retention`` per score,
    and ``mean_retention`` over every score both results share."""
    base_values = {item.name: item for item in metric_values(base)}
    flat: dict[str, float] = {}
    kept: list[float] = []
    for item in metric_values(tuned):
        other = base_values.get(item.name)
        if other is None:
            continue
        flat[f"base_{item.name}"] = other.value
        flat[f"{item.name}_delta"] = item.value - other.value
        ratio = retention(item.value, other.value, item.higher_is_better)
        if ratio is not None:
            flat[f"{item.name}_retention"] = ratio
            kept.append(ratio)
    if kept:
        flat["mean_retention"] = sum(kept) / len(kept)
    return flat


def to_jsonable(value: Any) -> Any:
    """A copy of ``value`` that :func:`json.dumps` accepts: numpy scalars and arrays, sets, paths,
    dtypes, functions and other objects found in lm-eval results become numbers, lists or strings."""
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    number = _number(value)
    if number is not None:
        return int(number) if hasattr(value, "dtype") and "int" in str(value.dtype) else number
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        try:
            return to_jsonable(tolist())
        except Exception:
            pass
    return str(value)


def dump_json(value: Any, path: Path) -> None:
    """Write ``value`` as indented JSON, converting what JSON cannot hold."""
    path.write_text(json.dumps(to_jsonable(value), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
