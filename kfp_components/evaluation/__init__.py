"""Model evaluation with lm-evaluation-harness: flat KFP metrics, full results and a summary table.

See :func:`run_evaluation`; the KFP component is :mod:`kfp_components.components.evaluation`.
"""

from kfp_components.evaluation.metrics import compare, flatten_results, retention, safe_name, to_jsonable
from kfp_components.evaluation.runner import (
    EvalConfig,
    EvalResult,
    EvaluationError,
    TaskDataError,
    UnknownTaskError,
    run_evaluation,
)

__all__ = [
    "EvalConfig",
    "EvalResult",
    "EvaluationError",
    "TaskDataError",
    "UnknownTaskError",
    "compare",
    "flatten_results",
    "retention",
    "run_evaluation",
    "safe_name",
    "to_jsonable",
]
