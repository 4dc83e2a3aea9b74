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
from kfp_components.components.registry import register_model
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


#: Pipeline parameter -> (stage, component argument). The same name means the same thing in every pipeline.
PARAMETERS = {
    "phase_01_dataset_man_data_uri": ("dataset", "dataset_name_or_path"),
    "phase_01_dataset_opt_split": ("dataset", "dataset_split"),
    "phase_01_dataset_opt_on_invalid": ("dataset", "dataset_on_invalid"),
    "phase_01_dataset_opt_train_split_ratio": ("dataset", "train_split_ratio"),
    "phase_01_dataset_opt_subset_size": ("dataset", "dataset_subset_size"),
    "phase_02_train_man_train_model": ("train", "model_name_or_path"),
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
#: The format each algorithm's data must be in.
DATA_FORMATS = {"osft": "messages", "sft": "messages", "dpo": "preference"}


def add_stages(algorithm: str, parameters: dict) -> dict:
    """Add download, training, evaluation and registration to the pipeline being defined, from its
    ``parameters`` (``locals()``)."""
    unknown = sorted(set(parameters) - set(PARAMETERS))
    if unknown:
        raise ValueError(f"pipeline parameters without a stage argument: {', '.join(unknown)}")
    args: dict[str, dict] = {"dataset": {}, "train": {}, "eval": {}, "eval_step": {}, "registry": {}}
    for name, value in parameters.items():
        stage, argument = PARAMETERS[name]
        args[stage][argument] = value
    args["dataset"]["seed"] = args["train"]["seed"]
    workspace_pvc = args["train"]["workspace_pvc"]

    data = dataset_download(data_format=DATA_FORMATS[algorithm], **args["dataset"])
    data.set_display_name("1. dataset")
    kubernetes.use_secret_as_env(data, secret_name=HF_SECRET, secret_key_to_env=HF_KEYS, optional=True)
    kubernetes.use_secret_as_env(data, secret_name=S3_SECRET, secret_key_to_env=S3_KEYS, optional=True)

    trained = train_model(
        train_dataset=data.outputs["train_dataset"],
        eval_dataset=data.outputs["eval_dataset"],
        algorithm=algorithm,
        workspace_path=WORKSPACE_MOUNT,
        hf_token_secret=HF_SECRET,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        **args["train"],
    )
    trained.set_display_name(f"2. train ({algorithm})")
    trained.set_caching_options(False)  # a rerun must adopt or resubmit its TrainJob, not reuse a stale model
    kubernetes.use_secret_as_env(
        trained,
        secret_name=KUBE_SECRET,
        optional=True,
        secret_key_to_env={"server_url": "KUBERNETES_SERVER_URL", "auth_token": "KUBERNETES_AUTH_TOKEN"},
    )
    kubernetes.mount_pvc(trained, pvc_name=workspace_pvc, mount_path=WORKSPACE_MOUNT)

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
    # a base model on the workspace volume (pvc://<workspace>/...) or in S3 is read from there
    kubernetes.mount_pvc(evaluated, pvc_name=workspace_pvc, mount_path=WORKSPACE_MOUNT)
    kubernetes.use_secret_as_env(evaluated, secret_name=S3_SECRET, secret_key_to_env=S3_KEYS, optional=True)
    evaluated.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(step["gpu"])
    evaluated.set_memory_limit(step["memory"])
    kubernetes.add_node_selector_json(evaluated, node_selector_json=step["node_selector"])
    kubernetes.add_toleration_json(evaluated, toleration_json=step["tolerations"])
    kubernetes.use_secret_as_env(evaluated, secret_name=HF_SECRET, secret_key_to_env=HF_KEYS, optional=True)
    eval_metrics = evaluated.outputs["metrics"]

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
    # only the S3 endpoint is read (recorded with an s3:// or minio:// storage URI), never the keys
    kubernetes.use_secret_as_env(
        registered,
        secret_name=S3_SECRET,
        secret_key_to_env={"AWS_S3_ENDPOINT": "AWS_S3_ENDPOINT"},
        optional=True,
    )
    kubernetes.use_secret_as_env(
        registered,
        secret_name=REGISTRY_SECRET,
        optional=True,
        secret_key_to_env={"token": "MODEL_REGISTRY_TOKEN"},
    )
    return {"dataset": data, "train": trained, "register": registered}


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
    from kfp_components.launch.step import step_training_config
    from kfp_components.trainer.config import TrainingConfig

    signature = inspect.signature(getattr(pipeline_func, "pipeline_func", pipeline_func))
    train = {
        PARAMETERS[name][1]: parameter.default
        for name, parameter in signature.parameters.items()
        if PARAMETERS.get(name, ("",))[0] == "train" and parameter.default is not inspect.Parameter.empty
    }
    trainer_fields = {f.name for f in dataclasses.fields(TrainingConfig)}
    parameter_of = {argument: name for name, (stage, argument) in PARAMETERS.items() if stage == "train"}
    options = {k: v for k, v in train.items() if k in trainer_fields}
    problems: list[tuple[str, str]] = []
    for check in (
        lambda: step_training_config(
            options, train.get("training_options", {}), data_path="<data>", output_dir="<output>"
        ),
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
