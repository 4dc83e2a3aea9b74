"""The ``train_model`` component: stage 2 of the training pipelines (OSFT, SFT or DPO).

No ``from __future__ import annotations`` here: KFP reads the real annotation objects.
"""

from kfp import dsl

from kfp_components.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def train_model(
    train_dataset: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    curves: dsl.Output[dsl.HTML],
    summary: dsl.Output[dsl.Markdown],
    model_name_or_path: str,
    eval_dataset: dsl.Input[dsl.Dataset] = None,
    base_model: dsl.Input[dsl.Model] = None,
    reward_model: dsl.Input[dsl.Model] = None,
    algorithm: str = "osft",
    backend: str = "trainjob",
    effective_batch_size: int = 128,
    num_train_epochs: int = 1,
    max_steps: int = 0,
    learning_rate: float = 5e-6,
    lr_scheduler: str = "cosine",
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    max_seq_len: int = 4096,
    max_tokens_per_gpu: int = 64000,
    seed: int = 42,
    torch_dtype: str = "bfloat16",
    use_liger: bool = True,
    activation_checkpointing: bool = False,
    unfreeze_rank_ratio: float = 0.25,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    lora_r: int = 0,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    lora_target_modules: list = ["all-linear"],  # noqa: B006 (KFP needs a literal default)
    eval_steps: int = 0,
    checkpoint_every_steps: int = 0,
    training_options: dict = {},  # noqa: B006
    num_nodes: int = 1,
    gpus_per_node: int = 1,
    cpu: str = "",
    memory: str = "",
    timeout_seconds: int = 0,
    trainer_image: str = "",
    runtime_name: str = "torch-distributed",
    trainer_api_version: str = "auto",
    node_selector: dict = {},  # noqa: B006
    tolerations: list = [],  # noqa: B006
    queue_name: str = "",
    labels: dict = {},  # noqa: B006
    annotations: dict = {},  # noqa: B006
    env: dict = {},  # noqa: B006
    image_pull_secrets: list = [],  # noqa: B006
    shm_size: str = "unlimited",
    workspace_pvc: str = "",
    workspace_path: str = "/workspace",
    hf_token_secret: str = "",
    run_id: str = "",
    stage_name: str = "",
) -> str:
    """Fine-tune a model with OSFT, SFT (full or LoRA) or DPO, locally or as a Kubeflow Trainer TrainJob.

    Every option is checked before anything is written or submitted (unknown values, ranges, LoRA and OSFT
    targets, the first rows of the data), and every problem is reported at once.

    Args:
        train_dataset: JSONL from dataset_download (messages rows; preference rows for dpo).
        model_name_or_path: Hugging Face model id or path (on the workspace volume for a TrainJob) to start
            from.
        eval_dataset: JSONL in the same format (dataset_download's eval split); its loss is computed at the end
            of every epoch (and every eval_steps) and logged as eval_loss. Empty or absent: no eval loss.
        algorithm: osft, sft or dpo.
        backend: trainjob (a TrainJob on the cluster; data and model go through the workspace volume) or
            local (a torchrun subprocess of this step: kfp.local runs and single machines).
        effective_batch_size: Samples (dpo: pairs) per optimizer step.
        num_train_epochs: Passes over the data (ignored when max_steps is set).
        max_steps: Train exactly this many optimizer steps, going through the data again as needed; overrides
            num_train_epochs (0: num_train_epochs decides).
        learning_rate: Peak AdamW learning rate.
        lr_scheduler: constant, linear or cosine.
        warmup_steps: Linear warmup steps.
        weight_decay: AdamW decoupled weight decay.
        max_seq_len: Longest sample in tokens; longer samples are dropped.
        max_tokens_per_gpu: Token budget of one micro-batch on one GPU (at least max_seq_len).
        seed: Seed of data order and initialisation.
        torch_dtype: bfloat16, float16 (autocast with loss scaling, for GPUs without bf16) or float32.
        use_liger: Liger kernels (GPU only).
        activation_checkpointing: Recompute activations in backward to save GPU memory.
        unfreeze_rank_ratio: OSFT: share of singular directions that train, in (0, 1].
        beta: DPO: KL strength.
        loss_type: DPO: sigmoid, ipo or hinge.
        lora_r: SFT: LoRA rank; 0 trains every weight.
        lora_alpha: SFT: LoRA scaling numerator (the update is scaled by lora_alpha / lora_r).
        lora_dropout: SFT: dropout on the LoRA input, in [0, 1).
        lora_target_modules: SFT: module names to adapt, or ["all-linear"].
        eval_steps: With eval data, also compute the eval loss every N optimizer steps (0: per epoch only).
        checkpoint_every_steps: Save a resumable checkpoint every N steps on the workspace (0: none); a
            preempted or restarted TrainJob, or a retried step of the same run, continues from the newest.
        training_options: Any other option of the training engine by its name (docs/trainer.md), e.g.
            {"adam_beta2": 0.999, "max_grad_norm": 0.5, "keep_checkpoints": 3,
            "report_to": ["tensorboard", "mlflow"]}; checked like the rest.
        num_nodes: TrainJob workers.
        gpus_per_node: GPUs (torchrun processes) per worker.
        cpu: CPU request per worker (e.g. "16"); empty: the runtime's.
        memory: Memory request per worker (e.g. "128Gi"); empty: the runtime's.
        timeout_seconds: Give up (and delete the TrainJob) after this long; 0: no limit.
        trainer_image: The training image (empty: the one this package names for its version).
        runtime_name: ClusterTrainingRuntime to use.
        trainer_api_version: auto (read the served CRD), v2.1 or v2.3.
        node_selector: Node labels the workers must have.
        tolerations: Kubernetes tolerations of the workers.
        queue_name: Kueue LocalQueue of the TrainJob (the kueue.x-k8s.io/queue-name label); empty: none.
        labels: Labels of the TrainJob, its JobSet and pods.
        annotations: Annotations of the TrainJob, its JobSet and pods.
        env: Plain environment variables of the workers (names that look secret are refused: use secrets).
        image_pull_secrets: Secrets the workers pull the trainer image with.
        shm_size: /dev/shm of the workers as a memory volume: unlimited (bounded by the memory limit), a size
            such as "16Gi", or "" for the runtime's own.
        workspace_pvc: PVC (ReadWriteMany) mounted in this step and in the workers at workspace_path.
        workspace_path: Where the workspace is mounted.
        hf_token_secret: Secret with key HF_TOKEN given to the workers as HF_TOKEN (gated models).
        run_id: Pipeline run id, for the TrainJob's name, its workspace folder and the run's name in the
            experiment trackers (<run_id>-train-<algorithm>).
        base_model: A Model artifact to start from instead of model_name_or_path (the previous stage of a
            chain): its folder with the local backend, its copy on the workspace volume (the artifact's
            workspace_uri) with a TrainJob; model_name_or_path then only names the chain's base model.
        reward_model: A reward model artifact (an earlier reward_model step), one more reward of the online
            algorithms, read from its folder locally and from its copy on the workspace with a TrainJob (the
            trainer option reward_model_path, which training_options must then leave out).
        stage_name: The step's folder on the workspace and the TrainJob's stage (empty: train-<algorithm>);
            each stage of a chain has its own.

    Returns:
        model: The trained model, a standard Hugging Face checkpoint folder (safetensors, tokenizer).
        metrics: Final and mean loss, eval loss, tokens/s, steps, duration (and DPO rewards).
        curves: The training curves (loss and eval loss; reward, KL, accuracy where the algorithm has them;
            learning rate; tokens/s) as a self-contained HTML page.
        summary: The run's numbers as Markdown (algorithm, steps, losses, tokens/s, duration, final metrics).
        Output: The TrainJob's name; empty with the local backend.
    """
    from kfp_components.environment import ensure_writable_caches
    from kfp_components.logs import configure_logging

    configure_logging()
    ensure_writable_caches()  # before anything imports huggingface_hub, which reads HF_HOME once

    from kfp_components.launch.report import write_training_report
    from kfp_components.launch.step import run_train_model_step, summary_metrics

    stage = stage_name or f"train-{algorithm}"
    start_from = model_name_or_path
    if base_model is not None:
        start_from = base_model.path if backend == "local" else base_model.metadata.get("workspace_uri", "")
        if not start_from:
            raise ValueError(
                "base_model has no copy on the workspace volume (metadata workspace_uri): a TrainJob reads the "
                "previous stage's model from there; train that stage with backend trainjob too"
            )
    if reward_model is not None:
        if "reward_model_path" in training_options:
            raise ValueError(
                "give the reward model as reward_model or as training_options.reward_model_path, not both"
            )
        scorer = reward_model.path if backend == "local" else reward_model.metadata.get("workspace_uri", "")
        if not scorer:
            raise ValueError("reward_model has no copy on the workspace volume (metadata workspace_uri)")
        training_options = {**training_options, "reward_model_path": scorer}
    result = run_train_model_step(
        train_data=train_dataset.path,
        eval_data=eval_dataset.path if eval_dataset is not None else None,
        model_dir=model.path,
        backend=backend,
        stage=stage,
        run_id=run_id,
        nproc_per_node=gpus_per_node,
        timeout_seconds=timeout_seconds,
        options={
            "model_name_or_path": start_from,
            "algorithm": algorithm,
            "effective_batch_size": effective_batch_size,
            "num_train_epochs": num_train_epochs,
            "max_steps": max_steps,
            "learning_rate": learning_rate,
            "lr_scheduler": lr_scheduler,
            "warmup_steps": warmup_steps,
            "weight_decay": weight_decay,
            "max_seq_len": max_seq_len,
            "max_tokens_per_gpu": max_tokens_per_gpu,
            "seed": seed,
            "torch_dtype": torch_dtype,
            "use_liger": use_liger,
            "activation_checkpointing": activation_checkpointing,
            "unfreeze_rank_ratio": unfreeze_rank_ratio,
            "beta": beta,
            "loss_type": loss_type,
            "lora_r": lora_r,
            "lora_alpha": lora_alpha,
            "lora_dropout": lora_dropout,
            "lora_target_modules": list(lora_target_modules),
            "eval_steps": eval_steps,
            "checkpoint_every_steps": checkpoint_every_steps,
        },
        training_options=dict(training_options),
        trainjob_options={
            "trainer_image": trainer_image,
            "runtime_name": runtime_name,
            "trainer_api_version": trainer_api_version,
            "num_nodes": num_nodes,
            "gpus_per_node": gpus_per_node,
            "cpu": cpu,
            "memory": memory,
            "node_selector": dict(node_selector),
            "tolerations": list(tolerations),
            "queue_name": queue_name,
            "labels": dict(labels),
            "annotations": dict(annotations),
            "env": dict(env),
            "image_pull_secrets": list(image_pull_secrets),
            "shm_size": shm_size,
            "workspace_pvc": workspace_pvc,
            "workspace_path": workspace_path,
            "secret_env": [
                {"name": "HF_TOKEN", "secret": hf_token_secret, "key": "HF_TOKEN", "optional": True}
            ]
            if hf_token_secret
            else [],
        },
    )
    model.metadata.update(
        {
            "algorithm": algorithm,
            "base_model": model_name_or_path,
            "framework": "transformers",
            "format": "safetensors",
            "training_config": result.config,
        }
    )
    if backend == "trainjob":  # the copy the TrainJob wrote stays on the workspace volume too
        model.metadata["workspace_uri"] = f"pvc://{workspace_pvc}/runs/{run_id or 'run'}/{stage}/final"
        model.metadata["trainjob"] = result.trainjob_name
        metrics.log_metric("preemptions", result.preemptions)
        metrics.log_metric("suspended_seconds", result.suspended_seconds)
    for name, value in summary_metrics(result.summary).items():
        metrics.log_metric(name, value)
    write_training_report(
        result, curves_path=curves.path, summary_path=summary.path, model_name_or_path=model_name_or_path
    )
    if backend == "trainjob" and "tensorboard" in result.config.get("report_to", []):
        model.metadata["tensorboard_uri"] = (
            f"pvc://{workspace_pvc}/runs/{run_id or 'run'}/{stage}/tensorboard"
        )
    return result.trainjob_name
