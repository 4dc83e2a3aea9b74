"""One training step of a pipeline: stage the data, train with the chosen backend, hand back the model.

``run_training_step`` is what the KFP training component calls. With ``backend="local"`` the training
command runs as a subprocess of the step (``kfp.local`` runs, the demo, a single machine); with
``backend="trainjob"`` it runs as a Kubeflow Trainer TrainJob whose pods mount the same workspace volume,
so the data goes in and the model comes out through that volume. Either way the final model (a plain HF
checkpoint) ends up in ``model_dir``, the step's Model artifact, and the summary is returned.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from kfp_components.launch.local import run_local_training, write_run_config
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.train import FINAL_MODEL_DIR

log = logging.getLogger(__name__)

BACKENDS = ("local", "trainjob")


@dataclass
class TrainingStepResult:
    model_dir: Path
    summary: dict
    trainjob_name: str = ""


def run_training_step(
    config: TrainingConfig,
    model_dir: str | Path,
    *,
    backend: str = "local",
    nproc_per_node: int = 1,
    timeout_seconds: float = 0,
    trainjob=None,
) -> TrainingStepResult:
    """Train ``config`` with ``backend`` and copy the final model to ``model_dir``.

    ``config.output_dir`` must be on storage the backend can reach: any folder for ``local``; for
    ``trainjob``, a folder on the workspace volume that ``trainjob`` (a
    :class:`~kfp_components.launch.manifest.TrainJobConfig`) mounts at the same path.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    config = replace(config, save_final_model=True)
    config.validate()
    output_dir = Path(config.output_dir)
    trainjob_name = ""
    if backend == "local":
        summary = run_local_training(config, nproc_per_node=nproc_per_node, timeout_s=timeout_seconds or None)
    else:
        from kfp_components.launch.trainjob import launch_trainjob

        if trainjob is None:
            raise ValueError("backend trainjob needs a TrainJobConfig")
        run_yaml = write_run_config(config, output_dir / "run.yaml")
        trainjob = replace(trainjob, config_path=str(run_yaml), timeout_seconds=timeout_seconds)
        result = launch_trainjob(trainjob)
        trainjob_name = result.name
        summary = json.loads((output_dir / "summary.json").read_text())
    model_dir = Path(model_dir)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(output_dir / FINAL_MODEL_DIR, model_dir)
    log.info("model: %s (%d steps, final loss %.4f)", model_dir, summary["steps"], summary["final_loss"])
    return TrainingStepResult(model_dir=model_dir, summary=summary, trainjob_name=trainjob_name)


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
