"""Resumable checkpoints and the final Hugging Face checkpoint.

A resumable checkpoint is ``<output_dir>/checkpoints/step-<N>/`` holding the model and optimizer state
(``torch.distributed.checkpoint``: each rank writes its own shards, so FSDP2 never gathers a full model),
the scheduler, the fp16 loss scaler, the trainer state (epoch, step, data position, eval history) and every
rank's RNG state. It is written to
``step-<N>.partial`` and renamed when complete, so a crash mid-save never leaves a checkpoint that looks
whole. The final model is a standard HF checkpoint (safetensors, config, tokenizer, chat template) that
``AutoModelForCausalLM.from_pretrained`` loads with no project code.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from kfp_components.trainer.distributed import DistInfo, barrier, unwrap
from kfp_components.trainer.precision import Precision
from kfp_components.trainer.progress import no_transformers_progress_bars

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
_PREFIX = "step-"


@dataclass
class TrainerState:
    """Where training is: enough to continue exactly where it stopped."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    #: optimizer steps skipped because fp16 gradients overflowed
    skipped_steps: int = 0
    #: every evaluation so far: ``{"step", "epoch", "eval_loss"}``
    eval_history: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINTS / f"{_PREFIX}{step:08d}"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir``, or None."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    complete = sorted(
        p
        for p in root.iterdir()
        if p.name.startswith(_PREFIX)
        and (p / "trainer_state.json").exists()
        and not p.name.endswith(".partial")
    )
    return complete[-1] if complete else None


def save_checkpoint(
    output_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainerState,
    info: DistInfo,
    precision: Precision | None = None,
    *,
    keep: int,
) -> Path:
    final = checkpoint_dir(output_dir, state.global_step)
    partial = final.with_name(final.name + ".partial")
    if info.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with silence_single_process_warning():
        dcp.save(
            {"model": model_state, "optimizer": optim_state}, checkpoint_id=str(partial / "model_optimizer")
        )
    torch.save(_rng_state(), partial / f"rng_rank{info.rank}.pt")
    if info.is_main:
        torch.save(scheduler.state_dict(), partial / "scheduler.pt")
        if precision is not None and precision.state_dict() is not None:
            torch.save(precision.state_dict(), partial / "grad_scaler.pt")
        (partial / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
    barrier()
    if info.is_main:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        _prune(output_dir / CHECKPOINTS, keep)
        log.info("saved checkpoint %s", final)
    barrier()
    return final


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    info: DistInfo,
    *,
    precision: Precision | None = None,
) -> TrainerState:
    model_state, optim_state = get_state_dict(model, optimizer)
    state_dict: dict[str, Any] = {"model": model_state, "optimizer": optim_state}
    with silence_single_process_warning():
        dcp.load(state_dict, checkpoint_id=str(path / "model_optimizer"))
    set_state_dict(
        model, optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optimizer"]
    )
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if precision is not None and (path / "grad_scaler.pt").exists():
        precision.load_state_dict(torch.load(path / "grad_scaler.pt", weights_only=False))
    rng_file = path / f"rng_rank{info.rank}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    state = TrainerState(**json.loads((path / "trainer_state.json").read_text()))
    log.info("resumed from %s (step %d, epoch %d)", path, state.global_step, state.epoch)
    return state


@contextmanager
def silence_single_process_warning() -> Iterator[None]:
    """Silence the one warning ``torch.distributed.checkpoint`` gives at every save and load in a single
    process ("torch.distributed is disabled ... assuming the intent is to save in a single process"): it is."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"torch\.distributed is disabled, unavailable or uninitialized",
            category=UserWarning,
        )
        yield


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a full CPU tensor (gathered from FSDP2 shards); all ranks must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options))


def _prune(root: Path, keep: int) -> None:
    complete = sorted(
        p for p in root.iterdir() if p.name.startswith(_PREFIX) and not p.name.endswith(".partial")
    )
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_hf_model(
    model: nn.Module, state_dict: dict[str, torch.Tensor], tokenizer: Any, out_dir: Path, dtype: torch.dtype
) -> Path:
    """Write a standard HF checkpoint from a full, dense state dict (main process only)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    hf_model: Any = unwrap(model)  # a transformers PreTrainedModel
    hf_model.config.dtype = dtype
    with no_transformers_progress_bars():
        hf_model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def use_default_permissions(root: Path) -> None:
    """Give ``root`` and everything under it the permissions a new file or folder gets under the process's
    umask. safetensors writes through a temporary file created with mode 0600 and renames it, so
    ``model.safetensors`` would otherwise be unreadable by other users and pods sharing the volume."""
    mask = os.umask(0o022)
    os.umask(mask)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
