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

An ``rlaif`` stage compiles in its ``direct`` mode (the judge is one of the training step's rewards; its key
reaches the TrainJob's workers from ``judge.token_secret``); a ``cot_distillation`` stage becomes a
``synthesize_reasoning_data`` step (the teacher's key from ``teacher.token_secret``) whose traces its training
step learns. A ``reward_model`` stage trains its reward model and passes its input model on, as in a run;
an ``rl`` stage's ``reward_model_path: stage:<name>`` receives that reward model's artifact. What cannot be
compiled yet is reported by name at compile time: rlaif's ``distilled`` and ``preference_data`` modes (pair
labelling before training), cot_distillation's ``step_by_step`` mode and given traces, ``stage:<name>``
datasets, and custom stages. ``eval_every_stage`` evaluates every stage's model against the base too.

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

#: Stage types a compiled chain can run: a TrainJob each (rlaif in its direct mode: the judge is a reward of
#: the training step; cot_distillation: a synthesis step, then the student's TrainJob).
COMPILABLE = ("sft", "osft", "dpo", "reward_model", "rl", "rlaif", "cot_distillation")
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
    defaults = _engine_defaults()
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
        reward_model_from = getattr(stage, "reward_model_stage", None)
        if kind == "rlaif" and stage.config.mode != "direct":  # type: ignore[attr-defined]
            problems.append(
                (
                    f"stage_configs.{name}.mode",
                    f"an rlaif stage in mode {stage.config.mode} labels pairs before it trains: compiled chains "  # type: ignore[attr-defined]
                    "run mode direct (the judge scores each completion in the TrainJob)",
                )
            )
            continue
        if kind == "cot_distillation" and (
            stage.config.dataset_name_or_path or stage.config.distillation_mode != "traces"  # type: ignore[attr-defined]
        ):
            problems.append(
                (
                    f"stage_configs.{name}",
                    "a compiled cot_distillation stage synthesizes its traces (no dataset_name_or_path) and "
                    "learns them as they are (distillation_mode traces)",
                )
            )
            continue
        if getattr(stage, "linked_datasets", None):
            problems.append(
                (f"stage_configs.{name}.dataset_name_or_path", "stage:<name> datasets cannot be compiled yet")
            )
            continue
        config = stage.config
        # the engine's config as the stage builds it (an rlaif stage adds its judge to the rewards)
        engine = to_dict(stage.training_config("<model>", "<data>", ""))
        options = {k: engine[k] for k in training_options(config) if k not in _SET_BY_CHAIN}
        if reward_model_from is not None:  # the earlier reward_model step's artifact, not the CLI's folder
            options.pop("reward_model_path", None)
        arguments = {k: v for k, v in options.items() if k in explicit}
        arguments["gpus_per_node"] = max(config.nproc_per_node, 1)  # the stage's processes: GPUs per worker
        rest = {k: v for k, v in options.items() if k not in explicit and v != defaults.get(k)}
        synthesis = None
        if kind == "cot_distillation":
            synthesis = _synthesis(stage)
        steps.append(
            {
                "name": name,
                "algorithm": stage.engine_algorithm(),
                "synthesis": synthesis,
                "reward_model_from": reward_model_from[0] if reward_model_from is not None else "",
                "dataset": _dataset(config, "", stage.data_format)
                if synthesis is None
                else {
                    **_dataset(config, "", "prompt"),
                    "dataset_name_or_path": getattr(config, "reasoning_dataset_path", ""),
                },
                # rlaif's and cot_distillation's held-out data are for their own evaluations, not an eval loss
                "eval_dataset": _dataset(config, "eval_", stage.data_format)
                if config.eval_dataset_name_or_path and kind not in ("rlaif", "cot_distillation")
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


def _synthesis(stage: Any) -> dict[str, Any]:
    """The ``synthesize_reasoning_data`` arguments of a cot_distillation stage (its teacher and rejection)."""
    teacher = stage.config.teacher_options()
    rejection = stage.config.rejection
    return {
        "teacher_model": teacher.model,
        "teacher_backend": teacher.backend,
        "teacher_base_url": teacher.base_url,
        "teacher_token_env": teacher.token_env,
        "system_prompt": teacher.system_prompt,
        "prompt_template": teacher.prompt_template,
        "num_samples": teacher.num_samples,
        "temperature": teacher.temperature,
        "top_p": teacher.top_p,
        "max_tokens": teacher.max_tokens,
        "max_concurrency": teacher.max_concurrency,
        "timeout_seconds": teacher.timeout_seconds,
        "retries": teacher.retries,
        "backoff_seconds": teacher.backoff_seconds,
        "max_requests": teacher.max_requests,
        "answer_column": rejection.answer_column,
        "answer_checker": rejection.answer_checker,
        "answer_tolerance": rejection.answer_tolerance,
        "min_trace_chars": rejection.min_trace_chars,
        "max_trace_chars": rejection.max_trace_chars,
        "language": rejection.language,
        "dedup_threshold": rejection.dedup_threshold,
        "max_traces_per_problem": rejection.max_traces_per_problem,
        "seed": stage.config.seed,
        "token_secret": teacher.token_secret,
    }


def _engine_defaults() -> dict[str, Any]:
    """The engine's defaults: a stage option equal to its default is not passed on, so the training step's
    own defaults apply (a TrainJob resumes from its checkpoints after a preemption: ``resume`` true)."""
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
    eval_every_stage: bool = False,
) -> Callable[..., Any]:
    """The KFP pipeline function of the multi-stage YAML ``config_path`` (see the module docstring)."""
    from kfp import dsl, kubernetes

    from kfp_components.components.dataset import dataset_download
    from kfp_components.components.evaluation import evaluate_model
    from kfp_components.components.registry import register_model
    from kfp_components.components.synthesis import synthesize_reasoning_data
    from kfp_components.components.training import train_model
    from kfp_components.images import TRAINER_IMAGE
    from kfp_components.orchestration.config import load_pipeline_config
    from kfp_components.orchestration.pipeline import Pipeline
    from kfp_components.pipelines.training import common

    config = load_pipeline_config(config_path, overrides or {})
    pipeline = Pipeline(config)  # every stage built and checked: the CLI's key-path errors
    if config.tokenizer_name_or_path:
        raise ConfigError(
            "tokenizer_name_or_path",
            "a compiled chain starts from the model's own tokenizer; save the model with the tokenizer you want",
        )
    stages = {name: pipeline.stages[name] for name in config.stages if pipeline.stages[name].config.enabled}
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
        num_nodes: int = 1,
        eval_gpu: int = 1,
        eval_memory: str = "64Gi",
        registry_address: str = "",
        registry_port: int = 0,
    ) -> None:
        """The stages of the multi-stage YAML, one step each.

        Args:
            backend: Where each stage trains: trainjob (a TrainJob) or local (a subprocess of the step).
            workspace_pvc: The ReadWriteMany PVC the TrainJobs share; models go from stage to stage there.
            trainer_image: The training image of the TrainJobs.
            hf_token_secret: Secret with key HF_TOKEN given to the workers (gated models); empty: none.
            num_nodes: TrainJob workers of every stage (each with the stage's nproc_per_node GPUs).
            eval_gpu: GPUs of the evaluation step.
            eval_memory: Memory limit of the evaluation step.
            registry_address: Model Registry service address (used with register_as at compile time).
            registry_port: Model Registry port (0: the default of the scheme).
        """
        datasets: dict[tuple[Any, ...], Any] = {}

        def download(spec: dict[str, Any]) -> Any:
            key = tuple(sorted(spec.items()))
            if key not in datasets:
                task = dataset_download(**spec)
                task.set_display_name(f"dataset: {Path(str(spec['dataset_name_or_path'])).name}")
                task.set_retry(**common.NETWORK_RETRIES)
                common.give_fetch_secrets(task)
                datasets[key] = task
            return datasets[key]

        def evaluate(trained: Any, title: str) -> Any:
            evaluation = evaluate_model(
                model=trained.outputs["model"],
                tasks=list(eval_tasks or []),
                base_model_name_or_path=base_model,
                workspace_pvc=workspace_pvc,
                workspace_path=common.WORKSPACE_MOUNT,
            )
            evaluation.set_display_name(title)
            evaluation.set_retry(**common.NETWORK_RETRIES)
            evaluation.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(eval_gpu)
            evaluation.set_memory_limit(eval_memory)
            kubernetes.mount_pvc(evaluation, pvc_name=workspace_pvc, mount_path=common.WORKSPACE_MOUNT)
            common.give_fetch_secrets(evaluation)
            return evaluation

        previous = None
        reward_models: dict[str, Any] = {}
        first_data = download(steps[0]["dataset"])
        for step in steps:
            data = download(step["dataset"])
            train_data = data.outputs["train_dataset"]
            if step["synthesis"] is not None:
                arguments = dict(step["synthesis"])
                token_secret = arguments.pop("token_secret")
                synthesis = synthesize_reasoning_data(problems=train_data, **arguments)
                synthesis.set_display_name(f"{step['name']}: teacher traces")
                synthesis.set_retry(**common.NETWORK_RETRIES)
                if (
                    token_secret
                ):  # the teacher's key from its Kubernetes Secret, as the TrainJob gets a judge's
                    secret, _, key = token_secret.partition("/")
                    env = arguments["teacher_token_env"]
                    kubernetes.use_secret_as_env(
                        synthesis, secret_name=secret, secret_key_to_env={key or env: env}
                    )
                train_data = synthesis.outputs["dataset"]
            extra: dict[str, Any] = {}
            if step["eval_dataset"] is not None:
                extra["eval_dataset"] = download(step["eval_dataset"]).outputs["train_dataset"]
            if previous is not None:
                extra["base_model"] = previous.outputs["model"]
            if step["reward_model_from"]:
                extra["reward_model"] = reward_models[step["reward_model_from"]].outputs["model"]
            task = train_model(
                train_dataset=train_data,
                model_name_or_path=base_model,
                algorithm=step["algorithm"],
                backend=backend,
                training_options=step["training_options"],
                trainer_image=trainer_image,
                workspace_pvc=workspace_pvc,
                workspace_path=common.WORKSPACE_MOUNT,
                num_nodes=num_nodes,
                hf_token_secret=hf_token_secret,
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                stage_name=f"stage-{step['name']}",
                **step["arguments"],
                **extra,
            )
            task.set_display_name(f"{step['name']} ({step['algorithm']})")
            task.set_caching_options(False)  # a rerun adopts or resubmits its TrainJob, never a stale model
            common.give_cluster_credentials(task)
            # the data, the models handed from stage to stage and the TrainJobs' outputs are on the workspace
            kubernetes.mount_pvc(task, pvc_name=workspace_pvc, mount_path=common.WORKSPACE_MOUNT)
            if step["algorithm"] == "reward_model":
                reward_models[step["name"]] = task  # the policy goes on from this stage's input model
                continue
            previous = task
            if eval_every_stage and eval_tasks and step is not steps[-1]:
                evaluate(task, f"evaluate: {step['name']} vs base")
        assert previous is not None
        evaluation = evaluate(previous, "evaluate: final vs base") if eval_tasks else None
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
            registration.set_retry(**common.NETWORK_RETRIES)
            common.give_registry_token(registration)

    return chain


def compile_chain(
    config_path: str | Path,
    output: str | Path,
    overrides: dict[str, Any] | None = None,
    *,
    eval_tasks: list[str] | None = None,
    register_as: str = "",
    eval_every_stage: bool = False,
) -> Path:
    """Compile ``config_path`` to the pipeline YAML ``output`` (uploadable with ``kfp pipeline upload``)."""
    from kfp import compiler

    function = chain_pipeline(
        config_path,
        overrides,
        eval_tasks=eval_tasks,
        register_as=register_as,
        eval_every_stage=eval_every_stage,
    )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(function, str(output))
    return output
