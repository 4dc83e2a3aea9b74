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

An ``rlaif`` stage in its ``direct`` mode is one training step (the judge is one of its rewards; its key
reaches the TrainJob's workers from ``judge.token_secret``); in ``preference_data`` and ``distilled`` a
``label_preference_pairs`` step first samples two answers per prompt from the stage's input model and has the
judge label them (its key from ``judge.token_secret``); ``preference_data`` hands the judged pairs on to the
stage that names ``stage:<rlaif stage>`` (the model passes on), ``distilled`` trains a reward model on them
and then the rl step against it. A ``cot_distillation`` stage becomes a ``synthesize_reasoning_data`` step
(the teacher's key from ``teacher.token_secret``) unless its traces are given, then (``step_by_step``) a
``step_by_step_targets`` step, then the student's training step. With ``eval_dataset_name_or_path``, an rlaif
stage (``direct``, ``distilled``) and a cot_distillation stage are followed by an ``evaluate_held_out`` step:
the stage's own evaluation on those rows, as a local run makes it (rlaif: the win rate against the stage's
input model, judged by ``win_rate_judge`` or ``judge``; cot_distillation: the student's answer accuracy
before and after). A ``reward_model`` stage trains its reward
model and passes its input model on, as in a run; an ``rl`` stage's ``reward_model_path: stage:<name>``
receives that reward model's artifact. A ``stage:<name>`` dataset is the producing step's Dataset output. A
custom stage runs its own code in a ``run_custom_stage`` step (see
:mod:`kfp_components.orchestration.custom_step`). ``eval_every_stage`` evaluates every stage's model against
the base too.

The pipeline's parameters are where it runs: ``backend`` (trainjob or local), ``workspace_pvc``,
``trainer_image``, ``hf_token_secret``. Everything the YAML says is fixed at compile time (the YAML is the
run's definition, as for the CLI).

No ``from __future__ import annotations`` here: KFP reads the pipeline function's real annotations.
"""

import dataclasses
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kfp_components.orchestration.held_out_step import HEADLINE, has_held_out_evaluation
from kfp_components.stages.base import BaseStage
from kfp_components.typed_config import ConfigError, to_dict

#: Built-in stage types a compiled chain runs as TrainJobs (rlaif and cot_distillation with their own steps
#: before training); any other registered stage runs as a custom stage in a step of its own.
COMPILABLE = ("sft", "osft", "dpo", "reward_model", "rl", "rlaif", "cot_distillation")
#: Options the chain sets itself, never passed on from a stage's YAML.
_SET_BY_CHAIN = frozenset(
    {"model_name_or_path", "data_path", "eval_data_path", "output_dir", "algorithm", "save_final_model"}
)


def chain_steps(stages: dict[str, BaseStage]) -> list[dict[str, Any]]:
    """What each stage compiles to, in order: ``{"name", "kind", ...}`` with ``kind`` ``train`` (a training
    step, after a synthesis, a pair labelling or a step_by_step step where the stage has one),
    ``preference_data`` (the pair labelling only) or ``custom``; a :class:`ConfigError` names every stage that
    cannot be compiled and why."""
    from kfp_components.components.training import train_model
    from kfp_components.stages.registry import BUILTIN_STAGES

    explicit = set(inspect.signature(train_model.python_func).parameters)
    defaults = _engine_defaults()
    problems: list[tuple[str, str]] = []
    steps: list[dict[str, Any]] = []
    kinds: dict[str, str] = {}
    for name, stage in stages.items():
        try:
            if type(stage) not in BUILTIN_STAGES.values():
                step = _custom_step(name, stage)
            else:
                step = _builtin_step(name, stage, explicit, defaults)
            for prefix in ("", "eval_"):
                source = step.get(f"{prefix}dataset_from", "")
                if source and kinds.get(source) == "custom":
                    raise ConfigError(
                        f"stage_configs.{name}.{prefix}dataset_name_or_path",
                        f"stage:{source}: {source!r} is a custom stage, whose written dataset a compiled chain "
                        "does not hand on (its step hands on its model); give the dataset by its URI",
                    )
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        kinds[name] = step["kind"]
        steps.append(step)
    if not problems and steps and all(step["kind"] == "preference_data" for step in steps):
        problems.append(
            (
                "stages",
                "every stage is an rlaif stage in mode preference_data: the chain would train nothing; add the "
                "stage that learns the pairs (a dpo stage with dataset_name_or_path: stage:<rlaif stage>)",
            )
        )
    if problems:
        raise ConfigError.of(problems)
    return steps


def _custom_step(name: str, stage: BaseStage) -> dict[str, Any]:
    """A custom stage: its own code in a ``run_custom_stage`` step (see
    :mod:`kfp_components.orchestration.custom_step`)."""
    from kfp_components.orchestration.custom_step import stage_source

    key = f"stage_configs.{name}"
    if getattr(stage, "linked_datasets", None):
        raise ConfigError(
            f"{key}.dataset_name_or_path",
            "a custom stage runs in a step of its own, which reads its data from its options: give the dataset "
            "by its URI, not as stage:<name>",
        )
    return {
        "name": name,
        "kind": "custom",
        "algorithm": stage.config.stage_type or name,
        **stage_source(type(stage), key),
        "options": _options(stage.config),
    }


def _options(config: Any) -> dict[str, Any]:
    """A stage's options as a KFP parameter value: all but its name and folder, less the options left unset
    (None where None is the default: the algorithm's own default, which the step's stage falls back to as
    well; KFP parameters carry no None)."""
    unset = {
        f.name for f in dataclasses.fields(config) if f.default is None and getattr(config, f.name) is None
    }
    return {
        k: v for k, v in to_dict(config).items() if k not in ("stage_name", "output_dir") and k not in unset
    }


def _training(stage: Any, explicit: set[str], defaults: dict[str, Any], drop: tuple[str, ...] = ()) -> dict:
    """The ``train_model`` arguments of a training stage: the options the component has as arguments, the
    rest (those not at the engine's default) as ``training_options``."""
    from kfp_components.stages.training import training_options

    config = stage.config
    # the engine's config as the stage builds it (an rlaif stage adds its judge to the rewards)
    engine = to_dict(stage.training_config("<model>", "<data>", ""))
    options = {k: engine[k] for k in training_options(config) if k not in _SET_BY_CHAIN and k not in drop}
    arguments = {k: v for k, v in options.items() if k in explicit}
    arguments["gpus_per_node"] = max(config.nproc_per_node, 1)  # the stage's processes: GPUs per worker
    return {
        "algorithm": stage.engine_algorithm(),
        "arguments": arguments,
        "training_options": {k: v for k, v in options.items() if k not in explicit and v != defaults.get(k)},
    }


def _builtin_step(name: str, stage: Any, explicit: set[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """A built-in stage's steps (see :func:`chain_steps`)."""
    kind = type(stage).stage_name
    config = stage.config
    linked = {prefix: source for prefix, (source, _) in getattr(stage, "linked_datasets", {}).items()}
    mode = getattr(config, "mode", "direct")
    reward_model_from = getattr(stage, "reward_model_stage", None)
    step: dict[str, Any] = {
        "name": name,
        "stage_type": kind,
        "kind": "preference_data" if kind == "rlaif" and mode == "preference_data" else "train",
        "synthesis": None,
        "labelling": None,
        "reward_model_step": None,
        "step_by_step": None,
        "reward_model_from": reward_model_from[0] if reward_model_from is not None else "",
        "dataset_from": linked.get("", ""),
        "eval_dataset_from": "",
        "options": _options(config),
    }
    data_format = stage.data_format
    if kind == "cot_distillation":
        if not config.dataset_name_or_path:
            step["synthesis"] = _synthesis(stage)
            step["dataset"] = {
                **_dataset(config, "", "prompt"),
                "dataset_name_or_path": config.reasoning_dataset_path,
            }
        if config.distillation_mode == "step_by_step":
            step["step_by_step"] = {
                "rationale_prefix": config.rationale_prefix,
                "label_prefix": config.label_prefix,
                "rationale_weight": config.rationale_weight,
                "answer_column": config.rejection.answer_column,
            }
    if "dataset" not in step:
        step["dataset"] = None if "" in linked else _dataset(config, "", data_format)
    # rlaif's and cot_distillation's held-out data are for their own evaluations (an evaluate_held_out step
    # after training), not an eval loss
    step["eval_dataset"] = step["held_out"] = None
    step["held_out_from"] = ""
    if has_held_out_evaluation(kind, config):
        if "eval_" in linked:
            step["held_out_from"] = linked["eval_"]
        else:
            step["held_out"] = _dataset(config, "eval_", "prompt")
    elif config.eval_dataset_name_or_path and kind not in HEADLINE:
        if "eval_" in linked:
            step["eval_dataset_from"] = linked["eval_"]
        else:
            step["eval_dataset"] = _dataset(config, "eval_", data_format)
    if kind == "rlaif" and mode != "direct":
        step["labelling"] = _labelling(stage)
    if step["kind"] == "preference_data":
        step["algorithm"] = "preference_data"  # judged pairs, no training (what provenance lists)
        return step
    drop: tuple[str, ...] = ()
    if reward_model_from is not None or (kind == "rlaif" and mode == "distilled"):
        drop = ("reward_model_path",)  # the reward model step's artifact, not the CLI's folder
    if kind == "rlaif" and mode == "distilled":
        reward_stage = stage.distilled_reward_model()
        step["reward_model_step"] = {
            **_training(reward_stage, explicit, defaults),
            "options": {
                k: v
                for k, v in to_dict(reward_stage.config).items()
                if k not in ("stage_name", "output_dir", "dataset_name_or_path")
            },
        }
    step.update(_training(stage, explicit, defaults, drop))
    return step


def _labelling(stage: Any) -> dict[str, Any]:
    """The ``label_preference_pairs`` arguments of an rlaif stage in mode distilled or preference_data."""
    config = stage.config
    return {
        "judge": to_dict(config.judge),
        "min_margin": config.preference_min_margin,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "top_k": config.top_k,
        "max_new_tokens": config.max_new_tokens,
        "max_seq_len": config.max_seq_len,
        "stop_strings": list(config.stop_strings),
        "seed": config.seed,
        "overlong": config.overlong,
    }


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


def _field_map_text(field_map: dict[str, str] | str) -> str:
    """A stage's ``dataset_field_map`` as the dataset component's string argument (JSON for a mapping)."""
    return json.dumps(field_map, sort_keys=True) if isinstance(field_map, dict) else field_map


def _dataset(config: Any, prefix: str, data_format: str) -> dict[str, Any]:
    return {
        "dataset_name_or_path": getattr(config, f"{prefix}dataset_name_or_path"),
        "dataset_split": getattr(config, f"{prefix}dataset_split"),
        "data_format": data_format,
        "dataset_on_invalid": config.dataset_on_invalid,
        "dataset_source_format": config.dataset_source_format,
        "dataset_field_map": _field_map_text(config.dataset_field_map),
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

    from kfp_components.components.custom_stage import run_custom_stage
    from kfp_components.components.dataset import dataset_download
    from kfp_components.components.evaluation import evaluate_model
    from kfp_components.components.held_out import evaluate_held_out
    from kfp_components.components.preferences import label_preference_pairs
    from kfp_components.components.registry import register_model
    from kfp_components.components.step_by_step import step_by_step_targets
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
        sample_gpu: int = 1,
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
            sample_gpu: GPUs of the steps where a model answers prompts outside a TrainJob (rlaif's judged
                pairs, the win rate and answer accuracy on held-out data).
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

        previous = None  # the step whose model the next stage starts from (None: the base model)
        previous_name = ""  # its stage
        started_from: Any = None  # the step whose model `previous` started from (None: the base model)
        reward_models: dict[str, Any] = {}
        written: dict[str, Any] = {}  # stage name -> the Dataset output its stage:<name> readers get
        downloads = [step["dataset"] for step in steps if step.get("dataset")]
        first_data = download(downloads[0]) if downloads else None

        def dataset_input(stage: str, spec: Any) -> Any:
            """The Dataset a step reads: what the stage ``stage`` wrote (a ``stage:<name>`` dataset), else the
            download of ``spec``."""
            return written[stage] if stage else download(spec).outputs["train_dataset"]

        def with_secret(task: Any, token_env: str, token_secret: str) -> None:
            """An endpoint's key from its Kubernetes Secret as ``token_env``, as the TrainJob gets a judge's."""
            if token_secret:
                secret, _, key = token_secret.partition("/")
                kubernetes.use_secret_as_env(
                    task, secret_name=secret, secret_key_to_env={key or token_env: token_env}
                )

        def on_workspace(task: Any) -> Any:
            task.set_caching_options(False)  # a rerun adopts or resubmits its TrainJob, never a stale model
            common.give_cluster_credentials(task)
            # the data, the models handed on and the TrainJobs' outputs are on the workspace
            kubernetes.mount_pvc(task, pvc_name=workspace_pvc, mount_path=common.WORKSPACE_MOUNT)
            return task

        def evaluate_stage(step: dict[str, Any], trained: Any, started: Any, held_out: Any) -> Any:
            """The stage's own evaluation of ``trained`` against the model it ``started`` from (None: the
            chain's model): rlaif's win rate, cot_distillation's answer accuracy."""
            task = evaluate_held_out(
                model=trained.outputs["model"],
                held_out=held_out,
                stage_type=step["stage_type"],
                stage_name=step["name"],
                stage_options=step["options"],
                workspace_pvc=workspace_pvc,
                workspace_path=common.WORKSPACE_MOUNT,
                **(
                    {"base_model": started.outputs["model"]}
                    if started is not None
                    else {"base_model_name_or_path": base_model}
                ),
            )
            title = "win rate" if step["stage_type"] == "rlaif" else "answer accuracy"
            task.set_display_name(f"{step['name']}: {title}")
            kubernetes.mount_pvc(task, pvc_name=workspace_pvc, mount_path=common.WORKSPACE_MOUNT)
            judge = None
            if step["stage_type"] == "rlaif":
                judge = step["options"].get("win_rate_judge") or step["options"]["judge"]
            return answering(task, judge)

        def answering(task: Any, judge: dict[str, Any] | None) -> Any:
            """A step where a model answers prompts outside a TrainJob: on the trainer image (a GPU build of
            torch) with ``sample_gpu`` GPUs, retried; with a ``judge``, its key from the judge's Secret and no
            caching (the judge's verdicts are not reused)."""
            task.set_retry(**common.NETWORK_RETRIES)
            task.set_container_image(trainer_image)
            task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(sample_gpu)
            common.give_fetch_secrets(task)
            if judge is not None:
                task.set_caching_options(False)
                with_secret(task, judge.get("token_env", ""), judge.get("token_secret", ""))
            return task

        def train(step: dict[str, Any], data: Any, title: str, stage: str, **extra: Any) -> Any:
            task = train_model(
                train_dataset=data,
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
                stage_name=stage,
                **step["arguments"],
                **extra,
            )
            task.set_display_name(title)
            return on_workspace(task)

        for step in steps:
            if step["kind"] == "custom":
                model_input: dict[str, Any] = (
                    {"base_model": previous.outputs["model"]}
                    if previous is not None
                    else {"model_name_or_path": base_model}
                )
                if previous is not None:
                    model_input["previous_stage"] = previous_name
                    if started_from is not None:
                        model_input["previous_input_model"] = started_from.outputs["model"]
                    else:
                        model_input["previous_input_name"] = base_model
                task = run_custom_stage(
                    stage_name=step["name"],
                    stage_class=step["stage_class"],
                    stage_options=step["options"],
                    plugin_name=step["plugin_name"],
                    plugin_source=step["plugin_source"],
                    backend=backend,
                    workspace_pvc=workspace_pvc,
                    workspace_path=common.WORKSPACE_MOUNT,
                    run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                    **model_input,
                )
                task.set_display_name(f"{step['name']} (custom stage)")
                task.set_container_image(trainer_image)  # the package and a GPU build of torch
                on_workspace(task)
                started_from, previous, previous_name = previous, task, step["name"]
                if eval_every_stage and eval_tasks and step is not steps[-1]:
                    evaluate(task, f"evaluate: {step['name']} vs base")
                continue
            train_data = dataset_input(step["dataset_from"], step["dataset"])
            if step["synthesis"] is not None:
                arguments = dict(step["synthesis"])
                token_secret = arguments.pop("token_secret")
                synthesis = synthesize_reasoning_data(problems=train_data, **arguments)
                synthesis.set_display_name(f"{step['name']}: teacher traces")
                synthesis.set_retry(**common.NETWORK_RETRIES)
                with_secret(synthesis, arguments["teacher_token_env"], token_secret)
                train_data = synthesis.outputs["dataset"]
            if step["step_by_step"] is not None:
                shaping = step_by_step_targets(traces=train_data, **step["step_by_step"])
                shaping.set_display_name(f"{step['name']}: step-by-step targets")
                train_data = shaping.outputs["dataset"]
            if step["labelling"] is not None:
                arguments = dict(step["labelling"])
                judge = arguments["judge"]
                model_input = (
                    {"model": previous.outputs["model"]}
                    if previous is not None
                    else {"model_name_or_path": base_model}
                )
                labelling = label_preference_pairs(prompts=train_data, **arguments, **model_input)
                labelling.set_display_name(f"{step['name']}: judged pairs")
                train_data = answering(labelling, judge).outputs["preferences"]
            written[step["name"]] = train_data  # what a later stage:<name> dataset reads
            if step["kind"] == "preference_data":
                continue  # the model passes on unchanged
            extra: dict[str, Any] = {}
            if step["eval_dataset_from"] or step["eval_dataset"] is not None:
                extra["eval_dataset"] = dataset_input(step["eval_dataset_from"], step["eval_dataset"])
            if previous is not None:
                extra["base_model"] = previous.outputs["model"]
            if step["reward_model_step"] is not None:  # rlaif distilled: a reward model on the judged pairs
                rm_step = step["reward_model_step"]
                reward_model = train(
                    rm_step,
                    train_data,
                    f"{step['name']}: reward model (reward_model)",
                    f"stage-{step['name']}-reward-model",
                    **({"base_model": extra["base_model"]} if previous is not None else {}),
                )
                extra["reward_model"] = reward_model.outputs["model"]
                train_data = download(step["dataset"]).outputs["train_dataset"]  # the policy's prompts
            if step["reward_model_from"]:
                extra["reward_model"] = reward_models[step["reward_model_from"]].outputs["model"]
            task = train(
                step, train_data, f"{step['name']} ({step['algorithm']})", f"stage-{step['name']}", **extra
            )
            if step["algorithm"] == "reward_model":
                reward_models[step["name"]] = task  # the policy goes on from this stage's input model
                continue
            if step["held_out_from"] or step["held_out"] is not None:
                evaluate_stage(step, task, previous, dataset_input(step["held_out_from"], step["held_out"]))
            started_from, previous, previous_name = previous, task, step["name"]
            if eval_every_stage and eval_tasks and step is not steps[-1]:
                evaluate(task, f"evaluate: {step['name']} vs base")
        assert previous is not None
        evaluation = evaluate(previous, "evaluate: final vs base") if eval_tasks else None
        if register_as:
            registration = register_model(
                model=previous.outputs["model"],
                base_model_name_or_path=base_model,
                dataset_name_or_path=str(downloads[0]["dataset_name_or_path"]) if downloads else "",
                dataset_sha256=first_data.outputs["train_sha256"] if first_data is not None else "",
                registry_address=registry_address,
                registry_port=registry_port,
                algorithm=" -> ".join(f"{s['name']}:{s['algorithm']}" for s in steps),
                model_name=register_as,
                hyperparameters={
                    "stages": [s["name"] for s in steps],
                    **{s["name"]: s["options"] for s in steps},
                },
                training_metrics=previous.outputs["metrics"],
                # an artifact input is left out when there is none (KFP takes no None argument)
                **({"eval_metrics": evaluation.outputs["metrics"]} if evaluation is not None else {}),
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
