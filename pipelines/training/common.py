"""The stages every training pipeline shares, and how each pipeline compiles.

The three pipelines (osft, sft, dpo) differ only in their algorithm and its options; their parameters keep
the same names for the same things (``phase_NN_<stage>_{man,opt}_<name>``: man = main, opt = optional), and
:data:`PARAMETERS` maps each onto the one component argument it sets, named as the option is named in the
trainer, the stage YAML and the docs. Secrets reach the steps as environment variables from Kubernetes
secrets (optional ones, so a pipeline runs without them): ``hf-token`` (key ``HF_TOKEN``), ``minio-secret``
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, and ``AWS_S3_ENDPOINT`` where set),
``kubernetes-credentials`` (``server_url``, ``auth_token``; without it the training step uses its service
account) and ``model-registry-token`` (``token``).

The dataset step's eval split is not dropped: the training step computes its loss every epoch (and every
``phase_02_train_opt_eval_steps``) and logs it as ``eval_loss``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from kfp_components.components.dataset import dataset_download
from kfp_components.components.evaluation import evaluate_model
from kfp_components.components.gate import online_training_options, promotion_gate
from kfp_components.components.reference import arg_docs
from kfp_components.components.registry import register_model
from kfp_components.components.synthesis import synthesize_reasoning_data
from kfp_components.components.training import train_model
from kfp_components.typed_config import ConfigError

WORKSPACE_MOUNT = "/workspace"
HF_SECRET = "hf-token"
HF_KEYS = {"HF_TOKEN": "HF_TOKEN"}
S3_SECRET = "minio-secret"
S3_KEYS = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
    "AWS_S3_ENDPOINT": "AWS_S3_ENDPOINT",
}
KUBE_SECRET = "kubernetes-credentials"
#: The Secret (key ``api_key``) holding a cot_distillation teacher endpoint's API key; optional.
TEACHER_SECRET = "teacher-credentials"
TEACHER_KEYS = {"api_key": "TEACHER_API_KEY"}
#: Retries of the steps that fetch over the network (hub, S3, registry, endpoints): a transient outage of a
#: service does not fail the run. Training and evaluation of the tuned model are not retried by KFP (the
#: training step resumes its own TrainJob; its checkpoints make a rerun continue).
NETWORK_RETRIES = {
    "num_retries": 3,
    "backoff_duration": "30s",
    "backoff_factor": 2.0,
    "backoff_max_duration": "600s",
}


#: Pipeline parameter -> (stage, component argument). The same name means the same thing in every pipeline.
PARAMETERS = {
    "phase_01_dataset_man_data_uri": ("dataset", "dataset_name_or_path"),
    "phase_01_dataset_opt_split": ("dataset", "dataset_split"),
    "phase_01_dataset_opt_on_invalid": ("dataset", "dataset_on_invalid"),
    "phase_01_dataset_opt_train_split_ratio": ("dataset", "train_split_ratio"),
    "phase_01_dataset_opt_subset_size": ("dataset", "dataset_subset_size"),
    "phase_01_synthesis_man_teacher_url": ("synthesis", "teacher_base_url"),
    "phase_01_synthesis_man_teacher_model": ("synthesis", "teacher_model"),
    "phase_01_synthesis_opt_num_samples": ("synthesis", "num_samples"),
    "phase_01_synthesis_opt_temperature": ("synthesis", "temperature"),
    "phase_01_synthesis_opt_max_tokens": ("synthesis", "max_tokens"),
    "phase_01_synthesis_opt_max_concurrency": ("synthesis", "max_concurrency"),
    "phase_01_synthesis_opt_max_requests": ("synthesis", "max_requests"),
    "phase_01_synthesis_opt_answer_column": ("synthesis", "answer_column"),
    "phase_01_synthesis_opt_answer_tolerance": ("synthesis", "answer_tolerance"),
    "phase_01_synthesis_opt_max_traces_per_problem": ("synthesis", "max_traces_per_problem"),
    "phase_02_train_man_train_model": ("train", "model_name_or_path"),
    "phase_02_train_man_train_algorithm": ("train", "algorithm"),
    "phase_02_train_man_train_rewards": ("rewards", "reward_functions"),
    "phase_02_train_opt_reward_model": ("rewards", "reward_model_path"),
    "phase_02_train_man_judge_url": ("rewards", "judge_base_url"),
    "phase_02_train_man_judge_model": ("rewards", "judge_model"),
    "phase_02_train_opt_judge_secret": ("rewards", "judge_token_secret"),
    "phase_02_train_man_train_batch": ("train", "effective_batch_size"),
    "phase_02_train_man_train_epochs": ("train", "num_train_epochs"),
    "phase_02_train_man_train_unfreeze": ("train", "unfreeze_rank_ratio"),
    "phase_02_train_man_train_tokens": ("train", "max_tokens_per_gpu"),
    "phase_02_train_man_train_workers": ("train", "num_nodes"),
    "phase_02_train_man_train_gpu": ("train", "gpus_per_node"),
    "phase_02_train_opt_use_liger": ("train", "use_liger"),
    "phase_02_train_opt_learning_rate": ("train", "learning_rate"),
    "phase_02_train_opt_lr_scheduler": ("train", "lr_scheduler"),
    "phase_02_train_opt_warmup_steps": ("train", "warmup_steps"),
    "phase_02_train_opt_weight_decay": ("train", "weight_decay"),
    "phase_02_train_opt_max_steps": ("train", "max_steps"),
    "phase_02_train_opt_max_seq_len": ("train", "max_seq_len"),
    "phase_02_train_opt_seed": ("train", "seed"),
    "phase_02_train_opt_torch_dtype": ("train", "torch_dtype"),
    "phase_02_train_opt_activation_checkpointing": ("train", "activation_checkpointing"),
    "phase_02_train_opt_eval_steps": ("train", "eval_steps"),
    "phase_02_train_opt_checkpoint_every_steps": ("train", "checkpoint_every_steps"),
    "phase_02_train_opt_lora_r": ("train", "lora_r"),
    "phase_02_train_opt_lora_alpha": ("train", "lora_alpha"),
    "phase_02_train_opt_lora_dropout": ("train", "lora_dropout"),
    "phase_02_train_opt_lora_target_modules": ("train", "lora_target_modules"),
    "phase_02_train_opt_beta": ("train", "beta"),
    "phase_02_train_opt_loss_type": ("train", "loss_type"),
    "phase_02_train_opt_training_options": ("train", "training_options"),
    "phase_02_train_opt_backend": ("train", "backend"),
    "phase_02_train_opt_timeout_seconds": ("train", "timeout_seconds"),
    "phase_02_train_opt_image": ("train", "trainer_image"),
    "phase_02_train_opt_runtime": ("train", "runtime_name"),
    "phase_02_train_opt_trainer_api_version": ("train", "trainer_api_version"),
    "phase_02_train_opt_cpu": ("train", "cpu"),
    "phase_02_train_opt_memory": ("train", "memory"),
    "phase_02_train_opt_node_selector": ("train", "node_selector"),
    "phase_02_train_opt_tolerations": ("train", "tolerations"),
    "phase_02_train_opt_workspace_pvc": ("train", "workspace_pvc"),
    "phase_02_train_opt_queue_name": ("train", "queue_name"),
    "phase_02_train_opt_labels": ("train", "labels"),
    "phase_02_train_opt_annotations": ("train", "annotations"),
    "phase_02_train_opt_env": ("train", "env"),
    "phase_02_train_opt_image_pull_secrets": ("train", "image_pull_secrets"),
    "phase_02_train_opt_shm_size": ("train", "shm_size"),
    "phase_03_eval_man_eval_tasks": ("eval", "tasks"),
    "phase_03_eval_opt_num_fewshot": ("eval", "num_fewshot"),
    "phase_03_eval_opt_limit": ("eval", "limit"),
    "phase_03_eval_opt_batch_size": ("eval", "batch_size"),
    "phase_03_eval_opt_apply_chat_template": ("eval", "apply_chat_template"),
    "phase_03_eval_opt_include_path": ("eval", "include_path"),
    "phase_03_eval_opt_compare_base": ("eval_step", "compare_base"),
    "phase_03_eval_opt_gpu": ("eval_step", "gpu"),
    "phase_03_eval_opt_memory": ("eval_step", "memory"),
    "phase_03_eval_opt_node_selector": ("eval_step", "node_selector"),
    "phase_03_eval_opt_tolerations": ("eval_step", "tolerations"),
    "phase_03_eval_opt_gate": ("gate", "enabled"),
    "phase_03_eval_opt_gate_min_task_gain": ("gate", "min_task_gain"),
    "phase_03_eval_opt_gate_min_retention": ("gate", "min_retention"),
    "phase_04_registry_man_address": ("registry", "registry_address"),
    "phase_04_registry_man_model_name": ("registry", "model_name"),
    "phase_04_registry_opt_port": ("registry", "registry_port"),
    "phase_04_registry_opt_is_secure": ("registry", "registry_is_secure"),
    "phase_04_registry_opt_allow_insecure_token": ("registry", "registry_allow_insecure_token"),
    "phase_04_registry_opt_author": ("registry", "author"),
    "phase_04_registry_opt_version_name": ("registry", "version_name"),
    "phase_04_registry_opt_on_existing_version": ("registry", "on_existing_version"),
    "phase_04_registry_opt_storage_uri": ("registry", "storage_uri"),
    "phase_04_registry_opt_storage_endpoint": ("registry", "storage_endpoint"),
    "phase_04_registry_opt_storage_key": ("registry", "storage_key"),
}
REGISTRY_SECRET = "model-registry-token"
#: The training step's scalar arguments that shape the model: recorded as hyperparameters in the provenance
#: (the list and mapping ones travel badly inside a dict of pipeline parameters; the complete resolved
#: trainer config is in the Model artifact's metadata, which the provenance records too).
HYPERPARAMETERS = frozenset(
    {
        "model_name_or_path",
        "effective_batch_size",
        "num_train_epochs",
        "max_steps",
        "learning_rate",
        "lr_scheduler",
        "warmup_steps",
        "weight_decay",
        "max_seq_len",
        "max_tokens_per_gpu",
        "seed",
        "torch_dtype",
        "use_liger",
        "activation_checkpointing",
        "unfreeze_rank_ratio",
        "beta",
        "loss_type",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "num_nodes",
        "gpus_per_node",
    }
)
#: The training step's arguments that are TrainJobConfig fields of the same name.
TRAINJOB_ARGUMENTS = frozenset(
    {
        "runtime_name",
        "trainer_api_version",
        "num_nodes",
        "gpus_per_node",
        "cpu",
        "memory",
        "queue_name",
        "labels",
        "annotations",
        "env",
        "image_pull_secrets",
        "shm_size",
        "workspace_pvc",
    }
)
#: The format each pipeline's data must be in (cot_distillation: problems with their answers).
DATA_FORMATS = {
    "osft": "messages",
    "sft": "messages",
    "dpo": "preference",
    "rl": "prompt",
    "rlaif": "prompt",
    "cot_distillation": "prompt",
}
#: The pipelines whose training learns online (its own generations, scored by rewards): no eval split.
ONLINE = frozenset({"rl", "rlaif"})
#: The evaluation step's own settings (not arguments of the component).
EVAL_STEP = {
    "compare_base": "Also score the base model on the same tasks: per-task deltas (tuned - base) and retention.",
    "gpu": "GPUs of the evaluation step (nvidia.com/gpu).",
    "memory": "Memory limit of the evaluation step.",
    "node_selector": "Node labels the evaluation step must run on.",
    "tolerations": "Kubernetes tolerations of the evaluation step.",
}
#: What the pipeline sets itself where a component's description says otherwise.
OWN_DESCRIPTIONS = {
    ("train", "algorithm"): "The online algorithm: grpo (default), rloo, reinforce_pp, ppo, a2c or trpo.",
    ("synthesis", "teacher_base_url"): "The teacher's OpenAI-compatible endpoint, http(s)://host:port/v1, "
    "without credentials; its API key comes from the teacher-credentials secret (key api_key), if any.",
}


def descriptions() -> dict[str, dict[str, str]]:
    """Stage -> component argument -> its meaning (from the components' docstrings)."""
    return {
        "dataset": arg_docs(dataset_download),
        "synthesis": arg_docs(synthesize_reasoning_data),
        "train": arg_docs(train_model),
        "rewards": arg_docs(online_training_options),
        "eval": arg_docs(evaluate_model),
        "eval_step": EVAL_STEP,
        "gate": arg_docs(promotion_gate),
        "registry": arg_docs(register_model),
    }


def parameter_description(name: str, described: dict[str, dict[str, str]] | None = None) -> str:
    """The meaning of pipeline parameter ``name``: the one of the component argument it sets."""
    stage, argument = PARAMETERS[name]
    if (stage, argument) in OWN_DESCRIPTIONS:
        return OWN_DESCRIPTIONS[stage, argument]
    return " ".join((described or descriptions())[stage].get(argument, "").split())


def with_parameter_docs(func):
    """Give a pipeline function an ``Args:`` docstring describing each parameter, which KFP compiles into
    ``root.inputDefinitions.parameters.<name>.description`` (the run form shows it). Apply it below
    ``@dsl.pipeline``."""
    described = descriptions()
    lines = [(func.__doc__ or "").strip() or func.__name__, "", "Args:"]
    for name in inspect.signature(func).parameters:
        text = parameter_description(name, described)
        if not text:
            raise ValueError(f"{func.__name__}: no description for parameter {name}")
        lines.append(f"    {name}: {text}")
    func.__doc__ = "\n".join(lines) + "\n"
    return func


def give_fetch_secrets(task) -> None:
    """The optional Hub and S3 Secrets of a step that downloads (datasets, models to evaluate)."""
    kubernetes.use_secret_as_env(task, secret_name=HF_SECRET, secret_key_to_env=HF_KEYS, optional=True)
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_KEYS, optional=True)


def give_cluster_credentials(task) -> None:
    """The optional Kubernetes credentials a training step submits its TrainJob with (else its service
    account)."""
    kubernetes.use_secret_as_env(
        task,
        secret_name=KUBE_SECRET,
        optional=True,
        secret_key_to_env={"server_url": "KUBERNETES_SERVER_URL", "auth_token": "KUBERNETES_AUTH_TOKEN"},
    )


def give_registry_token(task) -> None:
    """The optional Model Registry token of a registration step."""
    kubernetes.use_secret_as_env(
        task, secret_name=REGISTRY_SECRET, optional=True, secret_key_to_env={"token": "MODEL_REGISTRY_TOKEN"}
    )


def add_stages(kind: str, parameters: dict) -> dict:
    """Add download (and for cot_distillation synthesis), training, evaluation, the promotion gate and
    registration to the pipeline ``kind`` being defined, from its ``parameters`` (``locals()``)."""
    args = stage_arguments(parameters)
    workspace_pvc = args["train"]["workspace_pvc"]
    algorithm = args["train"].pop("algorithm", "sft" if kind == "cot_distillation" else kind)
    if kind in ONLINE:
        args["dataset"]["train_split_ratio"] = 1.0  # online training reports rewards, not an eval loss

    data = dataset_download(data_format=DATA_FORMATS[kind], **args["dataset"])
    data.set_display_name("1. dataset")
    data.set_retry(**NETWORK_RETRIES)
    give_fetch_secrets(data)
    steps = {"dataset": data}
    inputs = {"train_dataset": data.outputs["train_dataset"]}
    if kind not in ONLINE:
        inputs["eval_dataset"] = data.outputs["eval_dataset"]
    if kind == "cot_distillation":
        synthesis = synthesize_reasoning_data(
            problems=data.outputs["train_dataset"],
            teacher_token_env=TEACHER_KEYS["api_key"],
            teacher_token_optional=True,  # the Secret is optional: without it the teacher is asked keyless
            seed=args["train"]["seed"],
            **args["synthesis"],
        )
        synthesis.set_display_name("1b. synthesize reasoning")
        synthesis.set_retry(**NETWORK_RETRIES)
        kubernetes.use_secret_as_env(
            synthesis, secret_name=TEACHER_SECRET, secret_key_to_env=TEACHER_KEYS, optional=True
        )
        inputs = {"train_dataset": synthesis.outputs["dataset"]}  # the traces; evaluation measures the rest
        steps["synthesis"] = synthesis
    if args["rewards"]:
        options = online_training_options(
            training_options=args["train"].pop("training_options"), **args["rewards"]
        )
        options.set_display_name("2a. rewards")
        args["train"]["training_options"] = options.output
        steps["rewards"] = options

    trained = train_model(
        **inputs,
        algorithm=algorithm,
        workspace_path=WORKSPACE_MOUNT,
        hf_token_secret=HF_SECRET,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        **args["train"],
    )
    trained.set_display_name(f"2. train ({kind})")
    trained.set_caching_options(False)  # a rerun must adopt or resubmit its TrainJob, not reuse a stale model
    give_cluster_credentials(trained)
    kubernetes.mount_pvc(trained, pvc_name=workspace_pvc, mount_path=WORKSPACE_MOUNT)
    steps["train"] = trained

    step = args["eval_step"]
    evaluated = evaluate_model(
        model=trained.outputs["model"],
        workspace_pvc=workspace_pvc,
        workspace_path=WORKSPACE_MOUNT,
        base_model_name_or_path=args["train"]["model_name_or_path"],
        compare_base=step["compare_base"],
        **args["eval"],
    )
    evaluated.set_display_name("3. evaluate")
    evaluated.set_retry(**NETWORK_RETRIES)  # it fetches the base model (hub, S3) and lm-eval's data
    # a base model on the workspace volume (pvc://<workspace>/...) or in S3 is read from there
    kubernetes.mount_pvc(evaluated, pvc_name=workspace_pvc, mount_path=WORKSPACE_MOUNT)
    give_fetch_secrets(evaluated)
    evaluated.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(step["gpu"])
    evaluated.set_memory_limit(step["memory"])
    kubernetes.add_node_selector_json(evaluated, node_selector_json=step["node_selector"])
    kubernetes.add_toleration_json(evaluated, toleration_json=step["tolerations"])
    eval_metrics = evaluated.outputs["metrics"]
    steps["evaluate"] = evaluated

    gate = promotion_gate(eval_metrics=eval_metrics, **args["gate"])
    gate.set_display_name("3b. promotion gate")
    steps["gate"] = gate

    with dsl.If(gate.outputs["Output"] == True, name="promoted"):  # noqa: E712 (a KFP condition)
        registered = register_model(
            model=trained.outputs["model"],
            training_metrics=trained.outputs["metrics"],
            eval_metrics=eval_metrics,
            base_model_name_or_path=args["train"]["model_name_or_path"],
            dataset_name_or_path=args["dataset"]["dataset_name_or_path"],
            dataset_sha256=data.outputs["train_sha256"],
            algorithm=algorithm,
            hyperparameters={k: v for k, v in args["train"].items() if k in HYPERPARAMETERS},
            registry_token_env="MODEL_REGISTRY_TOKEN",
            **args["registry"],
        )
        registered.set_display_name("4. register")
        registered.set_retry(**NETWORK_RETRIES)
        registered.set_caching_options(False)  # a rerun must find the registry as it is now
        # only the S3 endpoint is read (recorded with an s3:// or minio:// storage URI), never the keys
        kubernetes.use_secret_as_env(
            registered,
            secret_name=S3_SECRET,
            secret_key_to_env={"AWS_S3_ENDPOINT": "AWS_S3_ENDPOINT"},
            optional=True,
        )
        give_registry_token(registered)
    steps["register"] = registered
    return steps


def stage_arguments(parameters: dict) -> dict[str, dict]:
    """Each stage's component arguments from the pipeline's parameters."""
    unknown = sorted(set(parameters) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"pipeline parameters without a stage argument: {', '.join(unknown)}")
    args: dict[str, dict] = {
        stage: {} for stage in ("dataset", "synthesis", "train", "rewards", "eval", "eval_step", "gate")
    }
    args["registry"] = {}
    for name, value in parameters.items():
        stage, argument = PARAMETERS[name]
        args[stage][argument] = value
    args["dataset"]["seed"] = args["train"]["seed"]
    return args


def compile_to(pipeline_func, module_file: str, output_path: str | Path | None = None) -> Path:
    """Compile ``pipeline_func`` to ``pipeline.yaml`` beside its module (or ``output_path``), after checking
    its parameters' defaults as the training step checks its arguments (see :func:`check_defaults`)."""
    check_defaults(pipeline_func)
    path = Path(output_path) if output_path else Path(module_file).with_name("pipeline.yaml")
    compiler.Compiler().compile(pipeline_func, str(path))
    return path


def check_defaults(pipeline_func) -> None:
    """The defaults of a pipeline's training parameters build a valid trainer config and TrainJob config
    (unknown values, ranges, ``training_options`` keys), so a bad default fails at compile time with the
    parameter's name, not in a run. Values typed into the KFP UI are checked by the training step before it
    submits anything."""
    from kfp_components.launch.manifest import TrainJobConfig
    from kfp_components.launch.reward_options import judge_reward, with_rewards
    from kfp_components.launch.step import step_training_config
    from kfp_components.trainer.config import TrainingConfig

    function = getattr(pipeline_func, "pipeline_func", pipeline_func)
    module = function.__module__.split(".")  # [kfp_components.]pipelines.training.<kind>.pipeline
    kind = module[-2] if len(module) >= 3 else Path(inspect.getfile(function)).parent.name
    signature = inspect.signature(function)
    defaults = {
        name: parameter.default
        for name, parameter in signature.parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    train = {PARAMETERS[name][1]: value for name, value in defaults.items() if PARAMETERS[name][0] == "train"}
    train.setdefault("algorithm", "sft" if kind == "cot_distillation" else kind)
    rewards = {PARAMETERS[name][1]: v for name, v in defaults.items() if PARAMETERS[name][0] == "rewards"}
    rewarded = {name for name in signature.parameters if PARAMETERS[name][0] == "rewards"}
    trainer_fields = {f.name for f in dataclasses.fields(TrainingConfig)}
    parameter_of = {argument: name for name, (stage, argument) in PARAMETERS.items() if stage == "train"}
    options = {k: v for k, v in train.items() if k in trainer_fields}
    problems: list[tuple[str, str]] = []
    training_options = train.get("training_options", {})
    if rewarded:
        judged = "phase_02_train_man_judge_url" in rewarded  # a required URL: a stand-in checks the rest
        judge = (
            judge_reward("http://judge.invalid/v1", rewards.get("judge_model", "judge"), "")
            if judged
            else None
        )
        try:
            training_options = with_rewards(
                training_options,
                reward_functions=rewards.get("reward_functions", []),
                reward_model_path=rewards.get("reward_model_path", ""),
                judge=judge,
                parameters={
                    "training_options": "phase_02_train_opt_training_options",
                    "reward_functions": "phase_02_train_man_train_rewards",
                    "reward_model_path": "phase_02_train_opt_reward_model",
                },
            )
        except ConfigError as exc:
            problems.extend(exc.problems)
    for check in (
        lambda: step_training_config(options, training_options, data_path="<data>", output_dir="<output>"),
        lambda: TrainJobConfig(
            trainer_image=train.get("trainer_image") or "<image>",
            config_path="<config>",
            run_id="<run>",
            stage="train",
            **{k: v for k, v in train.items() if k in TRAINJOB_ARGUMENTS},
        ).validate(),
    ):
        try:
            check()
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError.of([(_parameter_path(path, parameter_of), message) for path, message in problems])


def _parameter_path(path: str, parameter_of: dict[str, str]) -> str:
    """A component argument's key path with the argument replaced by its pipeline parameter."""
    head = re.match(r"[a-z0-9_]+", path)
    if head is None or head.group() not in parameter_of:
        return path
    return parameter_of[head.group()] + path[head.end() :]
