"""The ``dataset_download`` component: stage 1 of every training pipeline.

No ``from __future__ import annotations`` here: KFP reads the real annotation objects.
"""

from typing import NamedTuple

from kfp import dsl

from kfp_components.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def dataset_download(
    dataset_name_or_path: str,
    train_dataset: dsl.Output[dsl.Dataset],
    eval_dataset: dsl.Output[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
    dataset_split: str = "",
    data_format: str = "auto",
    dataset_source_format: str = "auto",
    dataset_field_map: str = "",
    dataset_on_invalid: str = "fail",
    train_split_ratio: float = 0.9,
    seed: int = 42,
    dataset_subset_size: int = 0,
    dataset_subset_mode: str = "first",
    dataset_download_timeout_seconds: float = 3600.0,
    dataset_stall_timeout_seconds: float = 60.0,
) -> NamedTuple(  # type: ignore[valid-type]  # the form KFP reads for named outputs
    "DatasetOutputs", [("train_sha256", str), ("data_format", str), ("train_rows", int), ("eval_rows", int)]
):
    """Download a dataset, validate every row, and split it into train and eval JSONL files.

    Credentials come from the environment only (HF_TOKEN; AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
    AWS_S3_ENDPOINT or AWS_ENDPOINT_URL for MinIO/ODF), set from Kubernetes secrets; they are never logged.

    Args:
        dataset_name_or_path: hf://org/name[:config][@revision], s3://bucket/key-or-prefix, https://...,
            pvc://claim/path or a local path. One JSONL, JSON-array or Parquet file, a folder of shards or a
            save_to_disk folder. Mix several: "uri_a:0.7,uri_b:0.3" (weights) or "uri_a:5000,uri_b:1000" (rows).
        dataset_split: Split to read (train, validation, test, ...) of an hf:// dataset or of a folder whose
            file names name their split; empty: an hf:// dataset's train split, every file of a folder.
        data_format: The format written: auto (that of the rows given), messages (SFT/OSFT chat),
            preference (DPO: prompt/chosen/rejected), prompt (RL) or text (continued pre-training).
        dataset_source_format: The format of the rows given: auto (detected), messages, conversations,
            sharegpt, alpaca, prompt_completion, text, preference, implicit_preference or prompt.
        dataset_field_map: Rename the file's columns first: "question:prompt,solution:answer" (or JSON).
        dataset_on_invalid: fail (stop, listing file:line and the problem for the first invalid rows) or drop.
        train_split_ratio: Share of rows for training, in (0, 1]; 1.0 means no eval split.
        seed: Seed for the split and for a sampled subset.
        dataset_subset_size: Keep only this many valid rows; 0 keeps all.
        dataset_subset_mode: first (first N rows) or sample (seeded random sample of N rows).
        dataset_download_timeout_seconds: Give up an http(s):// download that has not finished after this
            long, retries included (0: no limit).
        dataset_stall_timeout_seconds: Give up an http(s):// download attempt when less than 1 KiB arrives
            in this long (a stalled or trickling server); the attempt is retried like a dropped connection.

    Returns:
        train_dataset, eval_dataset: JSONL files, one row per line, in the written format; metadata: format,
            source_format, rows, source and sources (each source's uri, sha256 of its files, format, rows).
        metrics: rows read, valid, dropped, train and eval counts; rows_in_<source format>; for a mixture
            source_<i>_rows_valid and source_<i>_rows_used; turns and character length statistics.
        train_sha256: SHA-256 of the training file, for provenance.
        data_format: The format written (messages, preference, prompt or text), detected or as forced.
        train_rows, eval_rows: Rows written to train_dataset and eval_dataset.
    """
    from kfp_components.data import DatasetConfig, prepare_dataset
    from kfp_components.environment import ensure_writable_caches
    from kfp_components.logs import configure_logging
    from kfp_components.typed_config import from_dict

    configure_logging()
    ensure_writable_caches()
    config = from_dict(
        DatasetConfig,
        {
            "dataset_name_or_path": dataset_name_or_path,
            "dataset_split": dataset_split,
            "data_format": data_format,
            "dataset_source_format": dataset_source_format,
            "dataset_field_map": dataset_field_map,
            "dataset_on_invalid": dataset_on_invalid,
            "train_split_ratio": train_split_ratio,
            "seed": seed,
            "dataset_subset_size": dataset_subset_size,
            "dataset_subset_mode": dataset_subset_mode,
            "dataset_download_timeout_seconds": dataset_download_timeout_seconds,
            "dataset_stall_timeout_seconds": dataset_stall_timeout_seconds,
        },
    )
    result = prepare_dataset(config, train_dataset.path, eval_dataset.path)
    for artifact, rows in ((train_dataset, "train_rows"), (eval_dataset, "eval_rows")):
        artifact.metadata.update(
            {
                "format": result.data_format,
                "source_format": result.source_format,
                "rows": int(result.metrics[rows]),
                "source": result.source,
                "sources": result.sources,
            }
        )
    train_dataset.metadata["sha256"] = result.train_sha256
    for name, value in result.metrics.items():
        metrics.log_metric(name, value)
    return (
        result.train_sha256,
        result.data_format,
        int(result.metrics["train_rows"]),
        int(result.metrics["eval_rows"]),
    )
