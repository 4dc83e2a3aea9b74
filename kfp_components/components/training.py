"""The ``train_model`` component: stage 2 of the training pipelines (OSFT, SFT or DPO).

No ``from __future__ import annotations`` here: KFP reads the real annotation objects.
"""

from kfp import dsl

from kfp_components.components.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def train_model(
    train_dataset: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    model_name_or_path: str,
    algorithm: str = "osft",
    backend: str = "trainjob",
    effective_batch_size: int = 128,
    num_train_epochs: int = 1,
    learning_rate: float = 5e-6,
    lr_scheduler: str = "cosine",
    warmup_steps: int = 0,
    max_seq_len: int = 4096,
    max_tokens_per_gpu: int = 64000,
    seed: int = 42,
    torch_dtype: str = "bfloat16",
    use_liger: bool = True,
    unfreeze_rank_ratio: float = 0.25,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    num_nodes: int = 1,
    gpus_per_node: int = 1,
    cpu: str = "",
    memory: str = "",
    timeout_seconds: int = 0,
    trainer_image: str = "",
    runtime_name: str = "torch-distributed",
    trainer_api_version: str = "auto",
    node_selector: dict = {},  # noqa: B006 (KFP needs a literal default)
    tolerations: list = [],  # noqa: B006
    workspace_pvc: str = "",
    workspace_path: str = "/workspace",
    hf_token_secret: str = "",
    run_id: str = "",
) -> str:
    """Fine-tune a model with OSFT, SFT or DPO, locally or as a Kubeflow Trainer TrainJob.

    Args:
        train_dataset: JSONL from dataset_download (messages rows; preference rows for dpo).
        model_name_or_path: Hugging Face model id or path to start from.
        algorithm: osft, sft or dpo.
        backend: trainjob (a TrainJob on the cluster; data and model go through the workspace volume) or
            local (a torchrun subprocess of this step: kfp.local runs and single machines).
        effective_batch_size: Samples (dpo: pairs) per optimizer step.
        num_train_epochs: Passes over the data.
        learning_rate: Peak AdamW learning rate.
        lr_scheduler: constant, linear or cosine.
        warmup_steps: Linear warmup steps.
        max_seq_len: Longest sample in tokens; longer samples are dropped.
        max_tokens_per_gpu: Token budget of one micro-batch on one GPU.
        seed: Seed of data order and initialisation.
        torch_dtype: bfloat16 (GPU), float16 (GPU, with loss scaling) or float32.
        use_liger: Liger kernels (GPU only).
        unfreeze_rank_ratio: OSFT: share of singular directions that train, in (0, 1].
        beta: DPO: KL strength.
        loss_type: DPO: sigmoid, ipo or hinge.
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
        workspace_pvc: PVC (ReadWriteMany) mounted in this step and in the workers at workspace_path.
        workspace_path: Where the workspace is mounted.
        hf_token_secret: Secret with key 'token' given to the workers as HF_TOKEN (gated models).
        run_id: Pipeline run id, for the TrainJob's name.

    Returns:
        model: The trained model, a standard Hugging Face checkpoint folder (safetensors, tokenizer).
        metrics: Final and mean loss, tokens/s, steps, duration (and DPO rewards).
        Output: The TrainJob's name; empty with the local backend.
    """
    from kfp_components.environment import ensure_writable_caches
    from kfp_components.logs import configure_logging

    configure_logging()
    ensure_writable_caches()  # before launch.step imports huggingface_hub, which reads HF_HOME once

    import tempfile
    from pathlib import Path

    from kfp_components.launch.manifest import SecretEnv, Toleration, TrainJobConfig
    from kfp_components.launch.step import run_training_step, summary_metrics
    from kfp_components.trainer.config import TrainingConfig

    stage = f"train-{algorithm}"
    if backend == "trainjob":
        work = Path(workspace_path) / "runs" / (run_id or "run") / stage
        data_path = work / "data" / "train.jsonl"
        data_path.parent.mkdir(parents=True, exist_ok=True)
        data_path.write_bytes(Path(train_dataset.path).read_bytes())
    else:
        work = Path(tempfile.mkdtemp(prefix="train-"))
        data_path = Path(train_dataset.path)
    options = {
        "osft": {"unfreeze_rank_ratio": unfreeze_rank_ratio},
        "dpo": {"beta": beta, "loss_type": loss_type},
    }.get(algorithm, {})
    config = TrainingConfig(
        model_name_or_path=model_name_or_path,
        data_path=str(data_path),
        output_dir=str(work),
        algorithm=algorithm,
        effective_batch_size=effective_batch_size,
        num_train_epochs=num_train_epochs,
        learning_rate=learning_rate,
        lr_scheduler=lr_scheduler,
        warmup_steps=warmup_steps,
        max_seq_len=max_seq_len,
        max_tokens_per_gpu=max_tokens_per_gpu,
        seed=seed,
        torch_dtype=torch_dtype,
        use_liger=use_liger,
        **options,
    )
    trainjob = TrainJobConfig(
        trainer_image=trainer_image,
        run_id=run_id or "run",
        stage=stage,
        runtime_name=runtime_name,
        trainer_api_version=trainer_api_version,
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        cpu=cpu,
        memory=memory,
        node_selector=dict(node_selector),
        tolerations=[Toleration(**t) for t in tolerations],
        workspace_pvc=workspace_pvc,
        workspace_path=workspace_path,
        secret_env=[SecretEnv("HF_TOKEN", hf_token_secret, "token")] if hf_token_secret else [],
    )
    result = run_training_step(
        config,
        model.path,
        backend=backend,
        nproc_per_node=gpus_per_node if backend == "local" else 1,
        timeout_seconds=timeout_seconds,
        trainjob=trainjob,
    )
    model.metadata.update(
        {
            "algorithm": algorithm,
            "base_model": model_name_or_path,
            "framework": "transformers",
            "format": "safetensors",
        }
    )
    if backend == "trainjob":  # the copy the TrainJob wrote stays on the workspace volume too
        model.metadata["workspace_uri"] = f"pvc://{workspace_pvc}/runs/{run_id or 'run'}/{stage}/final"
        model.metadata["trainjob"] = result.trainjob_name
    for name, value in summary_metrics(result.summary).items():
        metrics.log_metric(name, value)
    return result.trainjob_name
