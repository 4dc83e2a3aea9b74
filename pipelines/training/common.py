"""The stages every training pipeline shares, and how each pipeline compiles.

The three pipelines (osft, sft, dpo) differ only in their algorithm and its options; their parameters keep
the same names for the same things (``phase_NN_<stage>_{man,opt}_<name>``: man = main, opt = optional).
Secrets reach the steps as environment variables from Kubernetes secrets (optional ones, so a pipeline runs
without them): ``hf-token`` (key ``token``), ``s3-credentials`` (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_S3_ENDPOINT``) and ``kubernetes-credentials`` (``server_url``,
``auth_token``; without it the training step uses its service account).
"""

from __future__ import annotations

from pathlib import Path

from kfp import compiler, dsl, kubernetes

from kfp_components.components.dataset import dataset_download
from kfp_components.components.evaluation import evaluate_model
from kfp_components.components.registry import register_model
from kfp_components.components.training import train_model

WORKSPACE_MOUNT = "/workspace"
HF_SECRET = "hf-token"
S3_SECRET = "s3-credentials"
KUBE_SECRET = "kubernetes-credentials"
S3_KEYS = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
    "AWS_S3_ENDPOINT": "AWS_S3_ENDPOINT",
}


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
    "phase_02_train_opt_max_seq_len": ("train", "max_seq_len"),
    "phase_02_train_opt_seed": ("train", "seed"),
    "phase_02_train_opt_torch_dtype": ("train", "torch_dtype"),
    "phase_02_train_opt_beta": ("train", "beta"),
    "phase_02_train_opt_loss_type": ("train", "loss_type"),
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
    "phase_04_registry_opt_author": ("registry", "author"),
    "phase_04_registry_opt_version_name": ("registry", "version_name"),
    "phase_04_registry_opt_on_existing_version": ("registry", "on_existing_version"),
    "phase_04_registry_opt_storage_uri": ("registry", "storage_uri"),
}
REGISTRY_SECRET = "model-registry-token"
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
    kubernetes.use_secret_as_env(
        data, secret_name=HF_SECRET, secret_key_to_env={"token": "HF_TOKEN"}, optional=True
    )
    kubernetes.use_secret_as_env(data, secret_name=S3_SECRET, secret_key_to_env=S3_KEYS, optional=True)

    trained = train_model(
        train_dataset=data.outputs["train_dataset"],
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
        base_model_name_or_path=args["train"]["model_name_or_path"],
        compare_base=step["compare_base"],
        **args["eval"],
    )
    evaluated.set_display_name("3. evaluate")
    evaluated.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(step["gpu"])
    evaluated.set_memory_limit(step["memory"])
    kubernetes.add_node_selector_json(evaluated, node_selector_json=step["node_selector"])
    kubernetes.add_toleration_json(evaluated, toleration_json=step["tolerations"])
    kubernetes.use_secret_as_env(
        evaluated, secret_name=HF_SECRET, secret_key_to_env={"token": "HF_TOKEN"}, optional=True
    )
    eval_metrics = evaluated.outputs["metrics"]

    registered = register_model(
        model=trained.outputs["model"],
        training_metrics=trained.outputs["metrics"],
        eval_metrics=eval_metrics,
        base_model_name_or_path=args["train"]["model_name_or_path"],
        dataset_name_or_path=args["dataset"]["dataset_name_or_path"],
        dataset_sha256=data.outputs["train_sha256"],
        algorithm=algorithm,
        hyperparameters={k: v for k, v in args["train"].items() if k not in ("tolerations", "node_selector")},
        registry_token_env="MODEL_REGISTRY_TOKEN",
        **args["registry"],
    )
    registered.set_display_name("4. register")
    kubernetes.use_secret_as_env(
        registered,
        secret_name=REGISTRY_SECRET,
        optional=True,
        secret_key_to_env={"token": "MODEL_REGISTRY_TOKEN"},
    )
    return {"dataset": data, "train": trained, "register": registered}


def compile_to(pipeline_func, module_file: str, output_path: str | Path | None = None) -> Path:
    """Compile ``pipeline_func`` to ``pipeline.yaml`` beside its module (or ``output_path``)."""
    path = Path(output_path) if output_path else Path(module_file).with_name("pipeline.yaml")
    compiler.Compiler().compile(pipeline_func, str(path))
    return path
