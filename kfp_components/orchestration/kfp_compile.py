"""A multi-stage YAML as a Kubeflow pipeline: ``fnsft-pipeline --config chain.yaml --compile chain.yaml``.

The YAML is loaded and every stage checked as for a run (the same key-path errors as the CLI's dry run), then
each stage becomes steps of the KFP components:

* one ``dataset_download`` step per distinct dataset (URI, split, format, subset), every valid row kept (as the
  CLI's stages do: no eval split); a stage's ``eval_dataset_name_or_path`` is a dataset of its own;
* one ``train_model`` step per stage (a TrainJob each, or a subprocess with ``backend: local``), with the
  stage's engine algorithm and every option of its YAML: the options the component has as arguments are
  passed as arguments, the rest in ``training_options``. The first stage starts from the pipeline's
  ``model_name_or_path``; each later one from the previous stage's Model artifact (``base_model``: its folder
  locally, its copy on the workspace volume with a TrainJob), each stage in its own workspace folder;
* with ``eval_tasks``, an ``evaluate_model`` step of the final model against the base model (lm-eval, tuned vs
  base with retention), and with ``register_as``, a ``register_model`` step whose hyperparameters list every
  stage and its options (provenance).

Stages that are not one TrainJob each cannot be compiled yet: ``rlaif`` (its judge calls and pair labelling),
``cot_distillation`` (its synthesis step) and a ``reward_model`` stage whose reward model an ``rl`` stage uses
(the pipelines ``pipelines/training/rlaif`` and ``cot_distillation`` run those as their own steps); custom
stages neither. They are reported by name at compile time.

The pipeline's parameters are where it runs: ``backend`` (trainjob or local), ``workspace_pvc``,
``trainer_image``, ``hf_token_secret``. Everything the YAML says is fixed at compile time (the YAML is the
run's definition, as for the CLI).

No ``from __future__ import annotations`` here: KFP reads the pipeline function's real annotations.
"""

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kfp_components.stages.base import BaseStage
from kfp_components.typed_config import ConfigError, to_dict

#: Stage types a compiled chain can run: a TrainJob each.
COMPILABLE = ("sft", "osft", "dpo", "reward_model", "rl")
#: Options the chain sets itself, never passed on from a stage's YAML.
_SET_BY_CHAIN = frozenset(
    {"model_name_or_path", "data_path", "eval_data_path", "output_dir", "algorithm", "save_final_model"}
)


def chain_steps(stages: dict[str, BaseStage]) -> list[dict[str, Any]]:
    """What each stage compiles to: ``{"name", "algorithm", "dataset", "eval_dataset", "arguments",
    "training_options", "options"}``; a :class:`ConfigError` names every stage that cannot be compiled."""
    from kfp_components.components.training import train_model
    from kfp_components.stages.training import TrainingStage, training_options

    explicit = set(inspect.signature(train_model.python_func).parameters)
    problems, steps = [], []
    for name, stage in stages.items():
        kind = stage.config.stage_type or name
        if not isinstance(stage, TrainingStage) or kind not in COMPILABLE:
            problems.append(
                (
                    f"stage_configs.{name}",
                    f"a {kind} stage cannot be compiled into a chain yet (compiled chains run {', '.join(COMPILABLE)}; "
                    "rlaif and cot_distillation have their own pipelines under pipelines/training)",
                )
            )
            continue
        if getattr(stage, "reward_model_stage", None) is not None:
            problems.append(
                (
                    f"stage_configs.{name}.reward_model_path",
                    "a reward model trained by an earlier stage of the chain cannot be handed on yet; give its "
                    "folder or hub id",
                )
            )
            continue
        if getattr(stage, "linked_datasets", None):
            problems.append(
                (f"stage_configs.{name}.dataset_name_or_path", "stage:<name> datasets cannot be compiled yet")
            )
            continue
        config = stage.config
        options = {k: v for k, v in training_options(config).items() if k not in _SET_BY_CHAIN}
        defaults = _engine_defaults()
        arguments = {k: v for k, v in options.items() if k in explicit}
        rest = {k: v for k, v in options.items() if k not in explicit and v != defaults.get(k)}
        steps.append(
            {
                "name": name,
                "algorithm": stage.engine_algorithm(),
                "dataset": _dataset(config, "", stage.data_format),
                "eval_dataset": _dataset(config, "eval_", stage.data_format)
                if config.eval_dataset_name_or_path
                else None,
                "arguments": arguments,
                "training_options": rest,
                "options": {
                    k: v for k, v in to_dict(config).items() if k not in ("stage_name", "output_dir")
                },
            }
        )
    if problems:
        raise ConfigError.of(problems)
    return steps


def _engine_defaults() -> dict[str, Any]:
    from kfp_components.trainer.config import TrainingConfig
    from kfp_components.typed_config import default_of

    return {f.name: default_of(f) for f in dataclasses.fields(TrainingConfig)}


def _dataset(config: Any, prefix: str, data_format: str) -> dict[str, Any]:
    return {
        "dataset_name_or_path": getattr(config, f"{prefix}dataset_name_or_path"),
        "dataset_split": getattr(config, f"{prefix}dataset_split"),
        "data_format": data_format,
        "dataset_on_invalid": config.dataset_on_invalid,
        "dataset_subset_size": getattr(config, f"{prefix}dataset_subset_size"),
        "train_split_ratio": 1.0,
    }


def chain_pipeline(
    config_path: str | Path,
    overrides: dict[str, Any] | None = None,
    *,
    eval_tasks: list[str] | None = None,
    register_as: str = "",
) -> Callable[..., Any]:
    """The KFP pipeline function of the multi-stage YAML ``config_path`` (see the module docstring)."""
    from kfp import dsl

    from kfp_components.components.dataset import dataset_download
    from kfp_components.components.evaluation import evaluate_model
    from kfp_components.components.registry import register_model
    from kfp_components.components.training import train_model
    from kfp_components.images import TRAINER_IMAGE
    from kfp_components.orchestration.config import load_pipeline_config
    from kfp_components.orchestration.pipeline import Pipeline

    config = load_pipeline_config(config_path, overrides or {})
    pipeline = Pipeline(config)  # every stage built and checked: the CLI's key-path errors
    stages = {name: pipeline.stages[name] for name in config.stages}
    steps = chain_steps(stages)
    base_model = config.model_name_or_path
    name = f"chain-{'-'.join(step['name'] for step in steps)}".replace("_", "-")[:120]

    @dsl.pipeline(
        name=name, description=f"{' -> '.join(s['name'] for s in steps)} from {Path(config_path).name}"
    )
    def chain(
        backend: str = "trainjob",
        workspace_pvc: str = "fine-tuning-workspace",
        trainer_image: str = TRAINER_IMAGE,
        hf_token_secret: str = "",
        registry_address: str = "",
        registry_port: int = 0,
    ) -> None:
        """The stages of the multi-stage YAML, one step each.

        Args:
            backend: Where each stage trains: trainjob (a TrainJob) or local (a subprocess of the step).
            workspace_pvc: The ReadWriteMany PVC the TrainJobs share; models go from stage to stage there.
            trainer_image: The training image of the TrainJobs.
            hf_token_secret: Secret with key HF_TOKEN given to the workers (gated models); empty: none.
            registry_address: Model Registry service address (used with register_as at compile time).
            registry_port: Model Registry port (0: the default of the scheme).
        """
        datasets: dict[tuple[Any, ...], Any] = {}

        def download(spec: dict[str, Any]) -> Any:
            key = tuple(sorted(spec.items()))
            if key not in datasets:
                task = dataset_download(**spec)
                task.set_display_name(f"dataset: {Path(str(spec['dataset_name_or_path'])).name}")
                task.set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2.0)
                datasets[key] = task
            return datasets[key]

        previous = None
        first_data = download(steps[0]["dataset"])
        for step in steps:
            data = download(step["dataset"])
            extra: dict[str, Any] = {}
            if step["eval_dataset"] is not None:
                extra["eval_dataset"] = download(step["eval_dataset"]).outputs["train_dataset"]
            if previous is not None:
                extra["base_model"] = previous.outputs["model"]
            task = train_model(
                train_dataset=data.outputs["train_dataset"],
                model_name_or_path=base_model,
                algorithm=step["algorithm"],
                backend=backend,
                training_options=step["training_options"],
                trainer_image=trainer_image,
                workspace_pvc=workspace_pvc,
                hf_token_secret=hf_token_secret,
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                stage_name=f"stage-{step['name']}",
                **step["arguments"],
                **extra,
            )
            task.set_display_name(f"{step['name']} ({step['algorithm']})")
            task.set_caching_options(False)
            previous = task
        assert previous is not None
        evaluation = None
        if eval_tasks:
            evaluation = evaluate_model(
                model=previous.outputs["model"], tasks=list(eval_tasks), base_model_name_or_path=base_model
            )
            evaluation.set_display_name("evaluate: final vs base")
            evaluation.set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2.0)
        if register_as:
            registration = register_model(
                model=previous.outputs["model"],
                base_model_name_or_path=base_model,
                dataset_name_or_path=str(steps[0]["dataset"]["dataset_name_or_path"]),
                dataset_sha256=first_data.outputs["train_sha256"],
                registry_address=registry_address,
                registry_port=registry_port,
                algorithm=" -> ".join(f"{s['name']}:{s['algorithm']}" for s in steps),
                model_name=register_as,
                hyperparameters={
                    "stages": [s["name"] for s in steps],
                    **{s["name"]: s["options"] for s in steps},
                },
                training_metrics=previous.outputs["metrics"],
                eval_metrics=evaluation.outputs["metrics"] if evaluation is not None else None,
            )
            registration.set_caching_options(False)
            registration.set_retry(num_retries=3, backoff_duration="30s", backoff_factor=2.0)

    return chain


def compile_chain(
    config_path: str | Path,
    output: str | Path,
    overrides: dict[str, Any] | None = None,
    *,
    eval_tasks: list[str] | None = None,
    register_as: str = "",
) -> Path:
    """Compile ``config_path`` to the pipeline YAML ``output`` (uploadable with ``kfp pipeline upload``)."""
    from kfp import compiler

    function = chain_pipeline(config_path, overrides, eval_tasks=eval_tasks, register_as=register_as)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(function, str(output))
    return output
