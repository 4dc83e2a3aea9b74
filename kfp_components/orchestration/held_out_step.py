"""A stage's own evaluation on its held-out data, as a step of a compiled chain.

Two stages measure what they are for on ``eval_dataset_name_or_path`` at the end of a run: ``rlaif`` the
tuned model's win rate against the model it started from (greedy answers, judged pairwise in both orders by
``win_rate_judge``, else ``judge``), ``cot_distillation`` the answer accuracy of the student before and after
(and of a local teacher). In a compiled chain the stage trains in a TrainJob, so its evaluation is a step of
its own after the training step: :func:`evaluate_held_out` builds the stage from the YAML's options (checked
at compile time) and runs the same code the local stage runs, on the step's Model artifacts.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from kfp_components.stages.base import config_class_of
from kfp_components.typed_config import from_dict

#: Built-in stages with an evaluation of their own, and the metric that sums it up.
HEADLINE = {"rlaif": "win_rate", "cot_distillation": "reasoning/tuned/accuracy"}


def has_held_out_evaluation(stage_type: str, config: Any) -> bool:
    """Whether a stage of ``stage_type`` with ``config`` evaluates on held-out data after training (an rlaif
    stage in preference_data mode, which trains nothing, refuses held-out data when its options are read)."""
    return stage_type in HEADLINE and bool(config.eval_dataset_name_or_path)


def evaluate_held_out(
    stage_type: str,
    stage_name: str,
    options: dict[str, Any],
    tuned: str,
    base: str,
    held_out: str | Path,
    report: Path,
) -> dict[str, float]:
    """Run the evaluation of the ``stage_type`` stage ``stage_name`` (its YAML ``options``) of the model
    ``tuned`` against ``base``, the model the stage started from, on the held-out rows of ``held_out``; write
    its Markdown table to ``report`` and return its metrics (the local stage's names)."""
    from kfp_components.stages.registry import BUILTIN_STAGES

    if stage_type not in HEADLINE:
        raise ValueError(f"stage_type: {stage_type!r} has no held-out evaluation; one of {sorted(HEADLINE)}")
    stage_class = BUILTIN_STAGES[stage_type]
    work = Path(tempfile.mkdtemp(prefix=f"kfp-held-out-{stage_name}-"))
    try:
        # from_dict validates the options too, its problems under the YAML's key path
        options = {**options, "stage_name": stage_name, "output_dir": str(work)}
        stage: Any = stage_class(
            from_dict(config_class_of(stage_class), options, f"stage_configs.{stage_name}")
        )
        if stage_type == "rlaif":
            result = stage.measure_win_rate(tuned, base, str(held_out))
            report.write_text(result.table(tuned, base), encoding="utf-8")
            return dict(result.metrics())
        table, metrics = stage.evaluate(base, tuned, str(held_out))
        shutil.copyfile(table, report)
        return dict(metrics)
    finally:
        shutil.rmtree(work, ignore_errors=True)
