"""One training step of a pipeline: check everything, stage the data, train with the chosen backend, hand
back the model.

:func:`run_train_model_step` is what the KFP ``train_model`` component calls. Before it writes anything it
builds and validates the trainer's :class:`TrainingConfig` and, for the ``trainjob`` backend, the
:class:`~kfp_components.launch.manifest.TrainJobConfig`, and runs the engine's preflight on the input data
(and the model where this step can see it), so a typo in the KFP UI fails here in seconds, listing every
problem, rather than inside the GPU pods.

With ``backend="local"`` the training command runs as a subprocess of the step (``kfp.local`` runs, the
demo, a single machine), in a scratch folder beside the Model artifact that is removed afterwards; with
``backend="trainjob"`` it runs as a Kubeflow Trainer TrainJob whose pods mount the same workspace volume, so
the data goes in and the model comes out through that volume (``<workspace>/runs/<run id>/<stage>``, where
checkpoints let a preempted or retried TrainJob resume). Either way the final model (a plain HF checkpoint)
ends up in the step's Model artifact folder.

Errors, and the config the step hands back to be recorded, name a model reference without its credentials
(see :mod:`kfp_components.redaction`); a reference that is neither a Hugging Face id nor a folder (nor a
``pvc://`` path on the workspace) is refused, so the Model artifact's ``base_model`` never holds one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kfp_components.data.uris import parse_pvc_uri
from kfp_components.images import TRAINER_IMAGE
from kfp_components.launch.local import run_local_training, write_run_config
from kfp_components.launch.manifest import TrainJobConfig
from kfp_components.redaction import redact_record, redact_text, redact_uris
from kfp_components.trainer.config import TrainingConfig
from kfp_components.typed_config import ConfigError, aliases_of, from_dict, to_dict, unknown_option_message

log = logging.getLogger(__name__)

BACKENDS = ("local", "trainjob")
#: Trainer options the step sets itself; ``training_options`` may not.
STEP_OWNED = (
    "model_name_or_path",
    "data_path",
    "eval_data_path",
    "output_dir",
    "algorithm",
    "save_final_model",
)
#: Trainer options the step defaults differently from the trainer: a TrainJob restarted after a preemption,
#: or a retried step of the same run, continues from its newest checkpoint on the workspace.
STEP_DEFAULTS: dict[str, Any] = {"resume": True}


@dataclass
class TrainingStepResult:
    """What a training step produced; ``config`` is the trainer's config as it may be recorded (the Model
    artifact's ``training_config``): plain data without credentials."""

    model_dir: Path
    summary: dict
    trainjob_name: str = ""
    config: dict = field(default_factory=dict)
    preemptions: int = 0
    suspended_seconds: float = 0.0
    #: the records of the run's ``metrics.jsonl`` (read before a local run's scratch folder goes)
    metrics: list[dict] = field(default_factory=list)


def whole_numbers(value: Any) -> Any:
    """``value`` with every whole float an int, in lists and mappings too. KFP carries a dict parameter (and a
    dict output) as a protobuf Struct, whose numbers are all floats: ``{"num_generations": 4}`` arrives as
    ``4.0``, which an integer option refuses; the trainer's float options take integers, so this is lossless."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {key: whole_numbers(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [whole_numbers(item) for item in value]
    return value


def step_training_config(
    options: Mapping[str, Any],
    training_options: Mapping[str, Any],
    defaults: Mapping[str, Any] | None = None,
    **paths: Any,
) -> TrainingConfig:
    """The trainer's config of a step: its explicit ``options`` (component arguments named as trainer
    options), then ``training_options`` (any other trainer option, by its name or an alias), then the
    ``paths`` the step decides; ``defaults`` (and :data:`STEP_DEFAULTS`) where neither sets an option. An
    option may come from one place only; every problem is reported at once."""
    aliases = aliases_of(TrainingConfig)
    fields = {f.name for f in dataclasses.fields(TrainingConfig)}
    problems, usable = [], {}
    for key, value in training_options.items():
        name = aliases.get(key, key)
        if name not in fields:
            problems.append((f"training_options.{key}", unknown_option_message(key, TrainingConfig)))
        elif name in STEP_OWNED:
            problems.append((f"training_options.{key}", "is set by the training step; remove it"))
        elif name in options:
            problems.append(
                (f"training_options.{key}", f"has its own argument, {name}; set it there and remove it here")
            )
        else:
            usable[key] = whole_numbers(value)
    try:
        given = {aliases.get(key, key) for key in usable}
        step_defaults = {k: v for k, v in {**STEP_DEFAULTS, **(defaults or {})}.items() if k not in given}
        config = from_dict(TrainingConfig, {**step_defaults, **options, **usable, **paths})
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems:
        raise ConfigError.of(problems)
    return config


def run_train_model_step(
    *,
    train_data: str | Path,
    eval_data: str | Path | None,
    model_dir: str | Path,
    backend: str,
    options: Mapping[str, Any],
    training_options: Mapping[str, Any],
    trainjob_options: Mapping[str, Any],
    stage: str,
    run_id: str = "",
    nproc_per_node: int = 1,
    timeout_seconds: float = 0,
) -> TrainingStepResult:
    """Check, stage, train and hand back the model (see the module docstring).

    Args:
        train_data: The step's input train JSONL (the dataset step's output).
        eval_data: The eval JSONL, or None; an empty file (no eval split) means no eval loss.
        model_dir: The step's Model artifact folder.
        backend: local or trainjob.
        options: Trainer options given as the step's own arguments (``learning_rate``, ...).
        training_options: Further trainer options by name (``training_options`` of the component).
        trainjob_options: :class:`~kfp_components.launch.manifest.TrainJobConfig` fields (trainjob only; an
            empty ``trainer_image`` is this package's trainer image).
        stage: Stage name, for the TrainJob's name and the workspace folder.
        run_id: Pipeline run id, for the same.
        nproc_per_node: Processes of the local backend.
        timeout_seconds: Give up after this long (0: no limit).
    """
    train_data, model_dir = Path(train_data), Path(model_dir)
    eval_path = (
        Path(eval_data)
        if eval_data and Path(eval_data).is_file() and Path(eval_data).stat().st_size
        else None
    )
    run_name = run_id or "run"
    if backend not in BACKENDS:
        raise ConfigError("backend", f"expected one of {', '.join(BACKENDS)}, got {backend!r}")
    # 1. Everything is checked before anything is written.
    workspace = Path(trainjob_options.get("workspace_path", "/workspace"))
    work = workspace / "runs" / run_name / stage if backend == "trainjob" else Path("<scratch>")
    problems: list[tuple[str, str]] = []
    config = trainjob = None
    try:
        options = {
            **options,
            "model_name_or_path": workers_model_reference(
                options.get("model_name_or_path", ""),
                trainjob_options.get("workspace_pvc", ""),
                str(workspace),
                backend,
            ),
        }
    except ConfigError as exc:
        problems.extend(exc.problems)
    try:
        config = step_training_config(
            options,
            training_options,
            data_path=str(work / "data" / "train.jsonl") if backend == "trainjob" else str(train_data),
            eval_data_path=(str(work / "data" / "eval.jsonl") if backend == "trainjob" else str(eval_path))
            if eval_path
            else "",
            defaults={"run_name": f"{run_id}-{stage}" if run_id else stage},
            output_dir=str(work),
            save_final_model=True,
        )
    except ConfigError as exc:
        problems.extend(exc.problems)
    if backend == "trainjob":
        try:
            trainjob = from_dict(
                TrainJobConfig,
                {
                    **trainjob_options,
                    "trainer_image": trainjob_options.get("trainer_image") or TRAINER_IMAGE,
                    "run_id": run_name,
                    "stage": stage,
                    "config_path": str(work / "run.yaml"),
                    "timeout_seconds": float(timeout_seconds),
                },
            )
        except ConfigError as exc:
            problems.extend(exc.problems)
    if config is not None:
        problems.extend(_preflight_problems(config, train_data, eval_path, backend))
    if problems or config is None:
        raise ConfigError.of([(path, redact_text(message)) for path, message in problems])

    # 2. Stage the data, 3. train, 4. hand back the model.
    if backend == "trainjob":
        (work / "data").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(train_data, work / "data" / "train.jsonl")
        if eval_path:
            shutil.copyfile(eval_path, work / "data" / "eval.jsonl")
        return run_training_step(config, model_dir, backend="trainjob", trainjob=trainjob)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".train-", dir=model_dir.parent))
    try:
        return run_training_step(
            replace(config, output_dir=str(scratch)),
            model_dir,
            backend="local",
            nproc_per_node=nproc_per_node,
            timeout_seconds=timeout_seconds,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def workspace_path_of(reference: str, workspace_pvc: str, workspace_path: str) -> str | None:
    """``pvc://<workspace_pvc>/<path>`` as the path where the workspace is mounted, else None."""
    if not (workspace_pvc and reference.startswith("pvc://")):
        return None
    claim, path = parse_pvc_uri(reference, "model_name_or_path", functools.partial(ConfigError, ""))
    return str(Path(workspace_path) / path) if claim == workspace_pvc else None


def workers_model_reference(reference: str, workspace_pvc: str, workspace_path: str, backend: str) -> str:
    """The model reference the trainer gets: a Hugging Face id or a folder as it is; ``pvc://<workspace>/...``
    as the folder on the workspace volume, which the step and the TrainJob's workers mount at the same path.
    Other URIs (another claim, ``s3://``, ...) are an error naming the option: the workers can read neither."""
    on_workspace = workspace_path_of(reference, workspace_pvc, workspace_path)
    if on_workspace is not None:
        return on_workspace
    if "://" in reference:
        where = (
            f"the workspace volume (pvc://{workspace_pvc}/...)"
            if backend == "trainjob" and workspace_pvc
            else "a folder"
        )
        raise ConfigError(
            "model_name_or_path",
            f"{redact_uris(reference)!r}: training starts from a Hugging Face id or a model folder; put the "
            f"model on {where}",
        )
    return reference


def _preflight_problems(
    config: TrainingConfig, train_data: Path, eval_data: Path | None, backend: str
) -> list[tuple[str, str]]:
    """The engine's preflight on the step's own input files; the model is checked where this step sees what
    the training will (always locally; with a TrainJob, a model folder on the workspace: a Hub id is checked
    by the workers first thing, before any weight loads), the machine only when it is the one that trains."""
    from kfp_components.trainer import preflight

    local_files = replace(
        config, data_path=str(train_data), eval_data_path=str(eval_data) if eval_data else ""
    )
    check_model = backend == "local" or preflight.is_local_reference(config.model_name_or_path)
    if not check_model:
        log.info(
            "model_name_or_path %s is a Hugging Face Hub id: the TrainJob's workers check it before loading it",
            config.model_name_or_path,
        )
    workers_only = keys_only_on_workers(config) if backend == "trainjob" else []
    if workers_only:
        log.info(
            "the reward functions are checked by the TrainJob's workers: %s come from Secrets there",
            ", ".join(f"${name}" for name in workers_only),
        )
    return preflight.preflight_problems(
        local_files,
        check_model=check_model,
        check_environment=backend == "local",
        check_rewards=not workers_only,
    )


def keys_only_on_workers(config: TrainingConfig) -> list[str]:
    """The variables of reward keys that come from a ``token_secret`` and are not set in this process."""
    if not config.is_online:
        return []
    from kfp_components.rewards.loading import reward_secret_env

    return [
        e["name"] for e in reward_secret_env(config.all_reward_functions) if not os.environ.get(e["name"])
    ]


def with_reward_secrets(given: list[Any], config: TrainingConfig) -> list[Any]:
    """``given`` (the TrainJob's ``secret_env``) plus the Secrets the reward functions name (a judge's or an
    endpoint's ``token_secret``), each given to the workers as its ``token_env`` variable."""
    from kfp_components.launch.manifest import SecretEnv

    if not config.is_online:
        return list(given)
    from kfp_components.rewards.loading import reward_secret_env

    named = {entry.name: entry for entry in given}
    extra = [
        SecretEnv(name=entry["name"], secret=entry["secret"], key=entry["key"])
        for entry in reward_secret_env(config.all_reward_functions)
    ]
    for entry in extra:
        if entry.name in named and (named[entry.name].secret, named[entry.name].key) != (
            entry.secret,
            entry.key,
        ):
            log.warning(
                "secret_env gives %s from Secret %s; the reward's token_secret %s is not used",
                entry.name,
                named[entry.name].secret,
                entry.secret,
            )
    return [*given, *(entry for entry in extra if entry.name not in named)]


def run_training_step(
    config: TrainingConfig,
    model_dir: str | Path,
    *,
    backend: str = "local",
    nproc_per_node: int = 1,
    timeout_seconds: float = 0,
    trainjob=None,
) -> TrainingStepResult:
    """Train ``config`` with ``backend`` and put the final model in ``model_dir``: moved from a local run's
    output folder, copied from a TrainJob's (which stays on the workspace).

    ``config.output_dir`` must be on storage the backend can reach: any folder for ``local``; for
    ``trainjob``, a folder on the workspace volume that ``trainjob`` (a
    :class:`~kfp_components.launch.manifest.TrainJobConfig`) mounts at the same path.
    """
    if backend not in BACKENDS:
        raise ConfigError("backend", f"expected one of {', '.join(BACKENDS)}, got {backend!r}")
    config = replace(config, save_final_model=True)
    config.validate()
    output_dir = Path(config.output_dir)
    result = TrainingStepResult(model_dir=Path(model_dir), summary={}, config=redact_record(to_dict(config)))
    if backend == "local":
        result.summary = run_local_training(
            config, nproc_per_node=nproc_per_node, timeout_s=timeout_seconds or None
        )
    else:
        from kfp_components.launch.trainjob import launch_trainjob

        if trainjob is None:
            raise ValueError("backend trainjob needs a TrainJobConfig")
        run_yaml = write_run_config(config, output_dir / "run.yaml")
        trainjob = replace(
            trainjob,
            config_path=str(run_yaml),
            timeout_seconds=timeout_seconds,
            secret_env=with_reward_secrets(trainjob.secret_env, config),
        )
        launched = launch_trainjob(trainjob)
        result.trainjob_name = launched.name
        result.preemptions, result.suspended_seconds = launched.preemptions, launched.suspended_seconds
        result.summary = json.loads((output_dir / "summary.json").read_text())
    from kfp_components.launch.report import read_metrics
    from kfp_components.trainer.train import FINAL_MODEL_DIR

    if (output_dir / "metrics.jsonl").is_file():
        result.metrics = read_metrics(output_dir / "metrics.jsonl")
    if result.model_dir.exists():
        shutil.rmtree(result.model_dir)
    final = output_dir / FINAL_MODEL_DIR
    if backend == "local":
        shutil.move(final, result.model_dir)
    else:
        shutil.copytree(final, result.model_dir)
    log.info(
        "model: %s (%d steps, final loss %.4f)",
        result.model_dir,
        result.summary["steps"],
        result.summary["final_loss"],
    )
    return result


def summary_metrics(summary: dict) -> dict[str, float]:
    """The numbers of a training summary under flat, KFP-safe names."""
    flat = {
        "final_loss": summary["final_loss"],
        "mean_loss": summary["mean_loss"],
        "tokens_per_second": summary["tokens_per_second"],
        "steps": summary["steps"],
        "duration_seconds": summary["duration_seconds"],
        "samples_seen": summary["samples_seen"],
        "tokens_seen": summary["tokens_seen"],
    }
    if summary.get("eval_loss") is not None:
        flat["eval_loss"] = summary["eval_loss"]
    flat.update({k: v for k, v in summary.get("metrics", {}).items() if isinstance(v, int | float)})
    return {k: float(v) for k, v in flat.items()}
