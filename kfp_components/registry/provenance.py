"""Where a fine-tuned model came from: base model, data, algorithm, hyperparameters, metrics and the run.

:func:`build_provenance` gathers it into a plain dict, :func:`write_provenance` writes it beside the model as
``provenance.json`` and a human-readable ``model_card.md`` (so a run without a registry still records its
origin), and :func:`to_custom_properties` flattens it into the scalar custom properties the Model Registry
accepts (string, int32, double and bool ``MetadataValue`` shapes; nested values as JSON strings).

Secrets never get into any of them: each of the three passes the record through :func:`kfp_components.redaction.redact_record`, which
replaces the values of secret-looking keys and environment variables, the credentials in URIs (user info,
signed query strings: :func:`kfp_components.data.uris.redact_uri`) and strings shaped like tokens.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kfp_components.mappings import flatten
from kfp_components.redaction import redact_record

PROVENANCE_FILE = "provenance.json"
MODEL_CARD_FILE = "model_card.md"
SCHEMA_VERSION = 1
PACKAGES = ("kfp_components", "torch", "transformers", "kfp", "model-registry")
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_]+")
# MetadataIntValue.int_value is a string matching ^-?([1-9][0-9]{0,8}|0)$: at most nine digits.
_INT_RANGE = (-999_999_999, 999_999_999)


def utc_now() -> str:
    """The current UTC time as ISO 8601 with a ``Z`` suffix, to the second."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Installed versions of ``names``; a package that is not installed reads ``not installed``."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def current_namespace() -> str:
    """The pod's namespace (``POD_NAMESPACE``, ``KFP_NAMESPACE`` or the service-account file), or ``""``."""
    for name in ("POD_NAMESPACE", "KFP_NAMESPACE", "NAMESPACE"):
        if value := os.environ.get(name, "").strip():
            return value
    try:
        return Path(NAMESPACE_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def build_provenance(
    *,
    base_model: str,
    dataset_uri: str,
    dataset_sha256: str,
    algorithm: str,
    hyperparameters: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    pipeline_name: str = "",
    run_id: str = "",
    namespace: str | None = None,
    image: str = "",
    model_name: str = "",
    storage_uri: str = "",
    model_format: str = "",
    started_at: str = "",
    created_at: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to say where a model came from, as JSON-ready plain data.

    Args:
        base_model: The model fine-tuned (hf://org/name, a path or URI).
        dataset_uri: Where the training data came from (recorded without credentials: user info and signed
            query strings are redacted).
        dataset_sha256: SHA-256 of the training file actually trained on.
        algorithm: sft, osft, dpo, lora, ...
        hyperparameters: Every training option. Like everything in the record, it goes through
            :func:`kfp_components.redaction.redact_record`: secret-looking keys, env values, URI credentials and token-shaped values.
        metrics: Training and evaluation metrics, e.g. ``{"train": {...}, "eval": {...}}`` or flat.
        pipeline_name, run_id: The KFP pipeline and run that produced the model.
        namespace: Kubernetes namespace; None reads it from the pod.
        image: Container image the step ran in.
        model_name, storage_uri, model_format: The model itself, when known.
        started_at: When training started (UTC ISO), when known.
        created_at: When this record was made; None is now (UTC ISO).
        extra: Anything else worth keeping, under ``extra``.
    """
    if dataset_sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", dataset_sha256):
        raise ValueError(f"dataset_sha256 must be 64 hex digits, got {dataset_sha256!r}")
    provenance: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model": {"name": model_name, "storage_uri": storage_uri, "format": model_format},
        "base_model": base_model,
        "dataset": {"uri": dataset_uri, "sha256": dataset_sha256.lower()},
        "training": {"algorithm": algorithm, "hyperparameters": dict(hyperparameters or {})},
        "metrics": dict(metrics or {}),
        "pipeline": {
            "name": pipeline_name,
            "run_id": run_id,
            "namespace": current_namespace() if namespace is None else namespace,
            "image": image,
        },
        "packages": package_versions(),
        "timestamps": {"started_at": started_at, "created_at": created_at or utc_now()},
    }
    if extra:
        provenance["extra"] = dict(extra)
    redacted: dict[str, Any] = redact_record(provenance)
    return redacted


def write_provenance(provenance: Mapping[str, Any], folder: str | Path) -> tuple[Path, Path]:
    """Write ``provenance.json`` and ``model_card.md`` into ``folder`` (redacted again, in case the record
    was built or extended by hand); returns both paths."""
    provenance = redact_record(dict(provenance))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / PROVENANCE_FILE
    json_path.write_text(
        json.dumps(provenance, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
    )
    card_path = folder / MODEL_CARD_FILE
    card_path.write_text(model_card(provenance), encoding="utf-8")
    return json_path, card_path


def model_card(provenance: Mapping[str, Any]) -> str:
    """A short Markdown model card rendered from a provenance record."""
    model = provenance.get("model", {})
    dataset = provenance.get("dataset", {})
    training = provenance.get("training", {})
    pipeline = provenance.get("pipeline", {})
    registry = provenance.get("registry", {})
    title = model.get("name") or f"Fine-tuned {provenance.get('base_model', 'model')}"
    lines = [
        f"# {title}",
        "",
        f"Fine-tuned from `{provenance.get('base_model', '')}` with **{training.get('algorithm', '')}**.",
        "",
        "## Model",
        "",
        _row("Storage", model.get("storage_uri")),
        _row("Format", model.get("format")),
    ]
    if registry:
        lines += [
            _row("Registry model", f"{registry.get('model_name')} (id {registry.get('model_id')})"),
            _row("Registry version", f"{registry.get('version_name')} (id {registry.get('version_id')})"),
        ]
    lines += [
        "",
        "## Training data",
        "",
        _row("Dataset", dataset.get("uri")),
        _row("SHA-256", dataset.get("sha256")),
        "",
        "## Hyperparameters",
        "",
        *_table(training.get("hyperparameters", {})),
        "",
        "## Metrics",
        "",
        *_table(flatten(provenance.get("metrics", {}))),
        "",
        "## Run",
        "",
        _row("Pipeline", pipeline.get("name")),
        _row("Run id", pipeline.get("run_id")),
        _row("Namespace", pipeline.get("namespace")),
        _row("Image", pipeline.get("image")),
        _row("Started", provenance.get("timestamps", {}).get("started_at")),
        _row("Recorded", provenance.get("timestamps", {}).get("created_at")),
        "",
        "## Software",
        "",
        *_table(provenance.get("packages", {})),
        "",
        f"Full record: `{PROVENANCE_FILE}`.",
        "",
    ]
    return "\n".join(lines)


def _row(name: str, value: Any) -> str:
    return f"- **{name}:** {value if value not in (None, '') else '—'}"


def _table(values: Mapping[str, Any]) -> list[str]:
    if not values:
        return ["(none)"]
    rows = ["| Name | Value |", "| --- | --- |"]
    for key in sorted(values):
        value = values[key]
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        text = text.replace("|", "\\|")
        rows.append(f"| {key} | {text} |")
    return rows


def safe_key(key: str) -> str:
    """A registry- and KFP-safe property name: letters, digits and underscores, lower case."""
    return _UNSAFE_KEY_CHARS.sub("_", key).strip("_").lower() or "_"


def to_custom_properties(
    provenance: Mapping[str, Any], prefix: str = ""
) -> dict[str, str | int | float | bool]:
    """Flatten a provenance record into Model Registry custom properties.

    Nested mappings become ``section_key`` names (``training_hyperparameters_learning_rate``); lists become
    JSON strings; ints of more than nine digits (the API's ``MetadataIntValue`` pattern) and non-finite floats become
    strings; None is dropped. Secret-looking keys are redacted again, in case the record was built by hand.
    """
    props: dict[str, str | int | float | bool] = {}
    for key, value in flatten(redact_record(dict(provenance))).items():
        name = safe_key(f"{prefix}_{key}" if prefix else key)
        if value is None:
            continue
        if isinstance(value, bool):
            props[name] = value
        elif isinstance(value, int):
            props[name] = value if _INT_RANGE[0] <= value <= _INT_RANGE[1] else str(value)
        elif isinstance(value, float):
            props[name] = value if math.isfinite(value) else str(value)
        elif isinstance(value, str):
            props[name] = value
        else:
            props[name] = json.dumps(value, sort_keys=True, default=str)
    return props
