"""Resumable checkpoints and the final Hugging Face checkpoint.

A resumable checkpoint is ``<output_dir>/checkpoints/step-<N>/`` holding the model and optimizer state
(``torch.distributed.checkpoint``: each rank writes its own shards, so FSDP2 never gathers a full model),
the scheduler, the trainer state (epoch, step, data position) and every rank's RNG state. It is written to
``step-<N>.partial`` and renamed when complete, so a crash mid-save never leaves a checkpoint that looks
whole. The final model is a standard HF checkpoint (safetensors, config, tokenizer, chat template) that
``AutoModelForCausalLM.from_pretrained`` loads with no project code.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(partial / "model_optimizer"))
    torch.save(_rng_state(), partial / f"rng_rank{info.rank}.pt")
    if info.is_main:
        torch.save(scheduler.state_dict(), partial / "scheduler.pt")
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
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, info: DistInfo
) -> TrainerState:
    model_state, optim_state = get_state_dict(model, optimizer)
    state_dict = {"model": model_state, "optimizer": optim_state}
    dcp.load(state_dict, checkpoint_id=str(path / "model_optimizer"))
    set_state_dict(
        model, optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optimizer"]
    )
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng_rank{info.rank}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    state = TrainerState(**json.loads((path / "trainer_state.json").read_text()))
    log.info("resumed from %s (step %d, epoch %d)", path, state.global_step, state.epoch)
    return state


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a full CPU tensor (gathered from FSDP2 shards); all ranks must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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
    hf_model = unwrap(model)
    hf_model.config.torch_dtype = dtype
    hf_model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    log.info("saved the model to %s", out_dir)
    return out_dir
