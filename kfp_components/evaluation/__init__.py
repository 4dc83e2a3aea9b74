"""Model evaluation with lm-evaluation-harness: flat KFP metrics, full results and a summary table.

See :func:`run_evaluation`; the KFP component is :mod:`kfp_components.components.evaluation`.
"""

from kfp_components.evaluation.errors import (
    EvaluationError,
    ModelNotFoundError,
    TaskDataError,
    UnknownTaskError,
)
from kfp_components.evaluation.metrics import compare, flatten_results, retention, safe_name, to_jsonable
from kfp_components.evaluation.models import ModelSource, locate_model
from kfp_components.evaluation.runner import EvalConfig, EvalResult, run_evaluation

__all__ = [
    "EvalConfig",
    "EvalResult",
    "EvaluationError",
    "ModelNotFoundError",
    "ModelSource",
    "TaskDataError",
    "UnknownTaskError",
    "compare",
    "flatten_results",
    "locate_model",
    "retention",
    "run_evaluation",
    "safe_name",
    "to_jsonable",
]
