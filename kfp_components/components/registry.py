"""The ``register_model`` component: record provenance and register the model in the Model Registry.

No ``from __future__ import annotations`` here: KFP reads the real annotation objects.
"""

from kfp import dsl

from kfp_components.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def register_model(
    model: dsl.Input[dsl.Model],
    provenance: dsl.Output[dsl.Artifact],
    base_model_name_or_path: str,
    dataset_name_or_path: str,
    dataset_sha256: str,
    algorithm: str,
    model_name: str,
    storage_uri: str = "",
    storage_endpoint: str = "",
    storage_key: str = "",
    hyperparameters: dict = {},  # noqa: B006 (KFP reads the default; it is never mutated)
    training_metrics: dsl.Input[dsl.Metrics] = None,
    eval_metrics: dsl.Input[dsl.Metrics] = None,
    registry_address: str = "",
    registry_port: int = 0,
    registry_is_secure: bool = True,
    registry_allow_insecure_token: bool = False,
    registry_custom_ca: str = "",
    registry_token_env: str = "MODEL_REGISTRY_TOKEN",
    author: str = "kfp-components",
    version_name: str = "",
    description: str = "",
    model_format: str = "safetensors",
    on_existing_version: str = "fail",
    max_attempts: int = 5,
    backoff_seconds: float = 1.0,
    pipeline_name: str = dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
    run_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    image: str = "",
) -> str:
    """Write provenance.json and model_card.md, then register the model version (when an address is set).

    The token comes from the environment variable named by ``registry_token_env`` (set it from a Kubernetes
    secret) or the pod's service-account token; it is never logged or written, and goes over TLS only unless
    ``registry_allow_insecure_token`` is set. Credentials in the dataset URI and secret-looking values are
    redacted from the record. A rerun of the same run completes a version an earlier attempt left
    half-registered instead of failing or registering a duplicate.

    Args:
        model: The trained model (its metadata is copied into the provenance record).
        base_model_name_or_path: The model that was fine-tuned (Hugging Face id or path).
        dataset_name_or_path: Where the training data came from (the URI given to dataset_download).
        dataset_sha256: SHA-256 of the file trained on.
        algorithm: sft, osft, dpo, lora, ...
        model_name: Registered model name.
        storage_uri: Where the model is stored for serving: s3://, minio://, gs://, pvc:// or oci://; empty: the
            Model artifact's URI (where KFP stored the model, e.g. minio://mlpipeline/v2/artifacts/...). S3 and
            MinIO URIs are registered as s3://bucket/path?endpoint=...; a path inside the container is refused.
        storage_endpoint: S3 endpoint of the store holding an s3:// or minio:// model; empty: $AWS_S3_ENDPOINT
            when set, else for minio:// a default Kubeflow install's http://minio-service.kubeflow:9000.
        storage_key: Name of the storage secret (data connection) serving reads the model with; empty for none.
        hyperparameters: Every training option.
        training_metrics: The metrics artifact of train_model (optional).
        eval_metrics: The metrics artifact of evaluate_model (optional).
        registry_address: Model Registry REST address; empty skips registration (and logs it).
        registry_port: Model Registry REST port; 0 infers it (443 when secure, else 8080); a port in the
            address wins.
        registry_is_secure: Use TLS.
        registry_allow_insecure_token: Send the bearer token over plain http too; off, registering over http
            with a token (the secret's or the pod's service-account token) fails before any request.
        registry_custom_ca: Path of a PEM bundle to verify the server with (e.g. the cluster's service CA); empty
            uses the system trust store.
        registry_token_env: Environment variable holding the bearer token (empty or unset: the pod's
            service-account token, when there is one).
        author: Version author and owner of a new registered model.
        version_name: Version name; empty derives ``run-<run id>``.
        description: Version description.
        model_format: Model format name on the artifact.
        on_existing_version: When the version exists from another run: fail, skip (keep the existing version) or
            next (register ``<version>-2``, ...). A version of this same run is completed, whatever the policy.
        max_attempts: Attempts when the registry is unreachable or answers 5xx.
        backoff_seconds: First wait between attempts; it doubles each time.
        pipeline_name, run_id: Filled in by KFP; recorded in the provenance.
        image: Image recorded in the provenance; empty records this package's runtime image name.

    Returns:
        provenance: A folder with provenance.json and model_card.md.
        Output: The registered (completed, or with ``skip`` existing) version id; "" when registration was
            skipped.
    """
    from kfp_components.environment import ensure_writable_caches
    from kfp_components.images import RUNTIME_IMAGE
    from kfp_components.logs import configure_logging
    from kfp_components.registry import RegistryConfig, build_provenance, register_model, write_provenance
    from kfp_components.typed_config import from_dict

    configure_logging()
    ensure_writable_caches()
    config = from_dict(
        RegistryConfig,
        {
            "address": registry_address,
            "port": registry_port,
            "is_secure": registry_is_secure,
            "allow_insecure_token": registry_allow_insecure_token,
            "custom_ca": registry_custom_ca,
            "token_env": registry_token_env,
            "author": author,
            "model_name": model_name,
            "version_name": version_name,
            "description": description,
            "model_format": model_format,
            "on_existing_version": on_existing_version,
            "storage_uri": storage_uri or model.uri,
            "storage_endpoint": storage_endpoint,
            "storage_key": storage_key,
            "max_attempts": max_attempts,
            "backoff_seconds": backoff_seconds,
        },
    )
    metrics = {}
    for key, artifact in (("train", training_metrics), ("eval", eval_metrics)):
        if artifact is not None:
            metrics[key] = dict(artifact.metadata)
    record = build_provenance(
        base_model=base_model_name_or_path,
        dataset_uri=dataset_name_or_path,
        dataset_sha256=dataset_sha256,
        algorithm=algorithm,
        hyperparameters=hyperparameters,
        metrics=metrics,
        pipeline_name=pipeline_name,
        run_id=run_id,
        image=image or RUNTIME_IMAGE,
        model_name=model_name,
        storage_uri=config.recorded_storage_uri(),
        model_format=model_format,
        extra={"model_artifact": {"uri": model.uri, "metadata": dict(model.metadata)}},
    )
    write_provenance(record, provenance.path)  # before registering: a failed registration keeps the record
    result = register_model(config, record)
    if result.status != "skipped":
        record["registry"] = {"address": config.display_url(), **result.as_dict()}
        write_provenance(record, provenance.path)
    provenance.metadata.update({"registry_status": result.status, "version_id": result.version_id})
    return result.version_id
