"""The ``step_by_step_targets`` component: reasoning traces as the two targets of distilling step by step
(cot_distillation's ``distillation_mode: step_by_step`` in a compiled chain).

The library code is :func:`kfp_components.feedback.step_by_step.step_by_step_targets`, the same as the local
stage's. No ``from __future__ import annotations`` here: KFP reads the real annotation objects.
"""

from kfp import dsl

from kfp_components.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def step_by_step_targets(
    traces: dsl.Input[dsl.Dataset],
    dataset: dsl.Output[dsl.Dataset],
    rationale_prefix: str = "[rationale] ",
    label_prefix: str = "[label] ",
    rationale_weight: float = 1.0,
    answer_column: str = "answer",
) -> int:
    """Turn every trace into a rationale target and, once per problem, an answer target.

    Args:
        traces: messages rows whose last turn is a trace, with the reference answer (synthesize_reasoning_data's
            dataset, or traces written before with an answer column).
        rationale_prefix: Put before a problem whose target is the rationale.
        label_prefix: Put before a problem whose target is the answer (and at evaluation).
        rationale_weight: The loss weight of the rationale targets (the answer's is 1).
        answer_column: The reference answer's column when a row has no answer column.

    Returns:
        dataset: messages rows with a weight column, for train_model.
        Output: The number of rows.
    """
    from pathlib import Path

    from kfp_components.feedback.step_by_step import step_by_step_targets as targets
    from kfp_components.logs import configure_logging

    configure_logging()
    rows = targets(
        Path(traces.path),
        Path(dataset.path),
        rationale_prefix=rationale_prefix,
        label_prefix=label_prefix,
        rationale_weight=rationale_weight,
        answer_column=answer_column,
    )
    dataset.metadata.update({"format": "messages", "rows": rows})
    return rows
