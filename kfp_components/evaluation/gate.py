"""The promotion gate: whether an evaluated model may be registered, and why.

The evaluation step compares the tuned model with its base (``<score>_delta`` = tuned - base,
``<score>_retention`` and ``mean_retention``; see :mod:`kfp_components.evaluation.metrics`). The gate passes
when the mean gain over the scores is at least ``min_task_gain`` and ``mean_retention`` is at least
``min_retention``. A gate that is on but finds no base comparison fails (it cannot tell), never passes
silently. The decision comes with a reason a person can read and with numbers for the metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from kfp_components.typed_config import ConfigError, Options

DELTA = "_delta"


@dataclass(kw_only=True)
class GateOptions(Options):
    """Attributes:
    enabled: Register only when the evaluation passes the thresholds; off, every model is registered.
    min_task_gain: Lowest mean gain over the evaluated scores (tuned - base in each score's units, a fall of
        a lower-is-better score such as perplexity counting as a gain), e.g. 0.0: no worse on average.
    min_retention: Lowest mean retention of the base model's scores (tuned / base), e.g. 0.95.
    """

    enabled: bool = False
    min_task_gain: float = 0.0
    min_retention: float = 0.95

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        for name in ("min_task_gain", "min_retention"):
            if not math.isfinite(getattr(self, name)):
                problems.append((name, f"must be a finite number, got {getattr(self, name)!r}"))
        if self.min_retention < 0:
            problems.append(("min_retention", f"must be >= 0, got {self.min_retention}"))
        if problems:
            raise ConfigError.of(problems)


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)


def decide(eval_metrics: Mapping[str, float], options: GateOptions) -> GateDecision:
    """The gate's decision on an evaluation step's flat metrics."""
    numbers = {
        "gate_enabled": float(options.enabled),
        "gate_min_task_gain": options.min_task_gain,
        "gate_min_retention": options.min_retention,
    }
    deltas = []
    for key, value in eval_metrics.items():
        if not key.endswith(DELTA) or not isinstance(value, int | float):
            continue
        # a gain is an improvement whichever way the score points: retention > 1 says it improved (tuned /
        # base for higher-is-better scores, base / tuned for lower-is-better ones such as perplexity)
        ratio = eval_metrics.get(key[: -len(DELTA)] + "_retention")
        improved = float(value) >= 0 if not isinstance(ratio, int | float) else float(ratio) >= 1.0
        deltas.append(abs(float(value)) if improved else -abs(float(value)))
    retention = eval_metrics.get("mean_retention")
    if deltas:
        numbers["gate_mean_task_gain"] = sum(deltas) / len(deltas)
    if isinstance(retention, int | float):
        numbers["gate_mean_retention"] = float(retention)
    if not options.enabled:
        return GateDecision(
            True, "gate off: every evaluated model is registered", {**numbers, "gate_passed": 1.0}
        )
    if not deltas or "gate_mean_retention" not in numbers:
        reason = (
            "failed: the evaluation has no base comparison (no <score>_delta or mean_retention); "
            "set compare_base and a base model, or turn the gate off"
        )
        return GateDecision(False, reason, {**numbers, "gate_passed": 0.0})
    failures = []
    gain, kept = numbers["gate_mean_task_gain"], numbers["gate_mean_retention"]
    if gain < options.min_task_gain:
        failures.append(f"mean task gain {gain:.4f} < min_task_gain {options.min_task_gain}")
    if kept < options.min_retention:
        failures.append(f"mean retention {kept:.4f} < min_retention {options.min_retention}")
    if failures:
        return GateDecision(False, "failed: " + "; ".join(failures), {**numbers, "gate_passed": 0.0})
    reason = (
        f"passed: mean task gain {gain:.4f} >= {options.min_task_gain}, "
        f"mean retention {kept:.4f} >= {options.min_retention}"
    )
    return GateDecision(True, reason, {**numbers, "gate_passed": 1.0})
