"""The ``run_custom_stage`` component: a custom stage of a multi-stage YAML, run in a step of its own.

The logic is :mod:`kfp_components.orchestration.custom_step`. No ``from __future__ import annotations`` here:
KFP reads the real annotation objects.
"""

from kfp import dsl

from kfp_components.images import RUNTIME_IMAGE


# A compiled chain sets the image to its trainer image (the package, a GPU build of torch).
@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def run_custom_stage(
    model: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    stage_name: str,
    stage_class: str,
    stage_options: dict,
    plugin_name: str = "",
    plugin_source: str = "",
    model_name_or_path: str = "",
    base_model: dsl.Input[dsl.Model] = None,
    previous_stage: str = "",
    previous_input_model: dsl.Input[dsl.Model] = None,
    previous_input_name: str = "",
    backend: str = "local",
    workspace_pvc: str = "",
    workspace_path: str = "/workspace",
    run_id: str = "",
) -> str:
    """Run a custom stage (registered with Pipeline.register_stage) on the model handed on, as a run would.

    Args:
        stage_name: The stage's name in the YAML.
        stage_class: The stage class as <module>:<qualname>.
        stage_options: The stage's options from the YAML (stage_configs.<name>).
        plugin_name: The name of the plugin file (without .py) plugin_source is loaded as; empty: the module
            is imported from the image.
        plugin_source: The source of the stage's --plugin file or module; empty: imported by name.
        model_name_or_path: The model the stage starts from, when base_model is not given.
        base_model: The previous step's Model artifact, the model the stage starts from.
        previous_stage: The name of the stage before this one (its result is the stage's previous_result).
        previous_input_model: The model that previous stage started from, as an artifact.
        previous_input_name: The model that previous stage started from, as a name (the chain's base model).
        backend: trainjob (also copy the model to the workspace volume, where the next TrainJob reads it)
            or local (the artifact only).
        workspace_pvc: The workspace PVC (mounted at workspace_path) with backend trainjob.
        workspace_path: Where the workspace is mounted.
        run_id: Pipeline run id: the model's folder on the workspace (runs/<run_id>/stage-<name>/final).

    Returns:
        model: The model the stage returned (a Hugging Face checkpoint folder).
        metrics: The stage's metrics.
        Output: The stage's model reference as the stage returned it.
    """
    import shutil
    from pathlib import Path

    from kfp_components.environment import ensure_writable_caches
    from kfp_components.logs import configure_logging

    configure_logging()
    ensure_writable_caches()

    from kfp_components.launch.step import whole_numbers
    from kfp_components.orchestration.custom_step import load_stage_class
    from kfp_components.orchestration.custom_step import run_custom_stage as run

    start = base_model.path if base_model is not None else model_name_or_path
    if not start:
        raise ValueError("give the model the stage starts from as base_model or model_name_or_path")
    stage_class_object = load_stage_class(stage_class, plugin_name, plugin_source)
    result = run(
        stage_class_object,
        stage_name,
        whole_numbers(dict(stage_options)),  # KFP carries a dict's numbers as floats
        start,
        Path(model.path),
        previous_stage=previous_stage,
        previous_input_model=previous_input_model.path
        if previous_input_model is not None
        else previous_input_name,
    )
    model.metadata.update({"stage": stage_name, "stage_class": stage_class, "framework": "transformers"})
    if backend == "trainjob":
        folder = f"runs/{run_id or 'run'}/stage-{stage_name}/final"
        target = Path(workspace_path) / folder
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(model.path, target)
        model.metadata["workspace_uri"] = f"pvc://{workspace_pvc}/{folder}"
    for name, value in result.metrics.items():
        metrics.log_metric(name.replace("/", "_"), float(value))
    return result.model_path
