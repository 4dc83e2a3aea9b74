"""What decides a training run, recorded in every resumable checkpoint so that a resume continues only its
own run.

The fingerprint holds the model references (a local folder as its absolute path), the sha256 of the data
files (``data_sha256``, ``eval_data_sha256``) and every option of :class:`TrainingConfig` but those that may
change between a run and its resume (:data:`MAY_CHANGE_ON_RESUME`). Resuming a checkpoint whose fingerprint
differs is refused, naming each difference (:func:`fingerprint_differences`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.preflight import is_local_reference

#: Options a resume may change: where the run writes, how often it logs and checkpoints, resume itself,
#: whether it writes a final model, two memory settings that leave the training maths unchanged (the
#: token budget of a micro-batch, as the sampler allows, and recomputing activations in backward) and the
#: attention kernel (every kernel computes each sample's attention over its own tokens; ``auto`` resolves
#: by the machine, which a resume may change).
MAY_CHANGE_ON_RESUME = frozenset(
    {
        "output_dir",
        "resume",
        "log_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "save_final_model",
        "max_tokens_per_gpu",
        "activation_checkpointing",
        "attn_implementation",
    }
)
#: Fingerprint keys of file contents, and the option each stands for.
_FILE_DIGESTS = {"data_sha256": "data_path", "eval_data_sha256": "eval_data_path"}
_MODEL_REFERENCES = ("model_name_or_path", "ref_model_name_or_path", "distill_teacher_path")


def run_fingerprint(config: TrainingConfig) -> dict[str, Any]:
    """The fingerprint of ``config``'s run (reads the data files once to hash them)."""
    values: dict[str, Any] = {}
    for option in dataclasses.fields(TrainingConfig):
        name = option.name
        if name in MAY_CHANGE_ON_RESUME:
            continue
        value = getattr(config, name)
        if name == "data_path":
            values["data_sha256"] = file_sha256(Path(value))
        elif name == "eval_data_path":
            values["eval_data_sha256"] = file_sha256(Path(value)) if value else ""
        elif name in _MODEL_REFERENCES and value and is_local_reference(value):
            values[name] = str(Path(value).expanduser().resolve())
        else:
            values[name] = list(value) if isinstance(value, list | tuple) else value
    return values


def fingerprint_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, str]]:
    """``(option, what differs)`` for every difference between a checkpoint's fingerprint and this run's."""
    differences = []
    for key in sorted(set(recorded) | set(current)):
        there, here = recorded.get(key, "<not recorded>"), current.get(key, "<not set>")
        if there == here:
            continue
        if key in _FILE_DIGESTS:
            differences.append(
                (
                    _FILE_DIGESTS[key],
                    f"the file's contents differ (sha256 {_short(there)} in the checkpoint, {_short(here)} now)",
                )
            )
        else:
            differences.append((key, f"{there!r} in the checkpoint, {here!r} now"))
    return differences


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _short(digest: Any) -> str:
    return f"{digest[:12]}..." if isinstance(digest, str) and digest else "none"
