"""The ``evaluate_held_out`` component: an rlaif stage's win rate or a cot_distillation stage's answer accuracy
on its held-out data, after its training step in a compiled chain.

The logic is :mod:`kfp_components.orchestration.held_out_step` (the local stages' own evaluation code). No
``from __future__ import annotations`` here: KFP reads the real annotation objects.
"""

from kfp import dsl

from kfp_components.images import RUNTIME_IMAGE


# The models answer in this step: a compiled chain sets its image to the trainer image (a GPU build of torch).
@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def evaluate_held_out(
    model: dsl.Input[dsl.Model],
    held_out: dsl.Input[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.Markdown],
    stage_type: str,
    stage_name: str,
    stage_options: dict,
    base_model: dsl.Input[dsl.Model] = None,
    base_model_name_or_path: str = "",
    workspace_pvc: str = "",
    workspace_path: str = "/workspace",
) -> float:
    """Evaluate a stage's tuned model on the stage's held-out data as the stage does in a local run.

    rlaif: the win rate against the model the stage started from (greedy answers, judged both ways round by
    win_rate_judge, else judge; the key from the judge's token_env, set from its Secret, never logged).
    cot_distillation: the answer accuracy of the student before and after (and of a local teacher).

    Args:
        model: The stage's trained model.
        held_out: The held-out rows (prompt rows; cot_distillation: with their reference answers).
        stage_type: rlaif or cot_distillation.
        stage_name: The stage's name in the YAML.
        stage_options: The stage's options from the YAML (stage_configs.<name>).
        base_model: The model the stage started from (the previous step's Model artifact).
        base_model_name_or_path: The model the stage started from when base_model is not given (the chain's
            model: a Hugging Face id, a folder, or pvc://<workspace_pvc>/... read where it is mounted).
        workspace_pvc: The workspace PVC, mounted at workspace_path.
        workspace_path: Where the workspace is mounted.

    Returns:
        metrics: rlaif: win_rate, win_rate_wins, win_rate_ties, win_rate_losses, win_rate_judged,
            win_rate_unjudged; cot_distillation: reasoning_<role>_accuracy, _correct, _problems, _no_answer
            for base and tuned (and teacher).
        report: The table of the result (Markdown).
        Output: The win rate, or the tuned student's answer accuracy.
    """
    from pathlib import Path

    from kfp_components.environment import ensure_writable_caches
    from kfp_components.logs import configure_logging

    configure_logging()
    ensure_writable_caches()

    from kfp_components.launch.step import whole_numbers, workspace_path_of
    from kfp_components.orchestration.held_out_step import HEADLINE, evaluate_held_out

    if (base_model is None) == (not base_model_name_or_path):
        raise ValueError("give the model the stage started from as base_model or base_model_name_or_path")
    if base_model is not None:
        base = base_model.path
    else:
        base = (
            workspace_path_of(base_model_name_or_path, workspace_pvc, workspace_path)
            or base_model_name_or_path
        )
    found = evaluate_held_out(
        stage_type,
        stage_name,
        whole_numbers(dict(stage_options)),  # KFP carries a dict's numbers as floats
        model.path,
        base,
        held_out.path,
        Path(report.path),
    )
    for name, value in found.items():
        metrics.log_metric(name.replace("/", "_"), float(value))
    return float(found[HEADLINE[stage_type]])
