"""Resumable checkpoints and the final Hugging Face checkpoint.

A resumable checkpoint is ``<output_dir>/checkpoints/step-<N>/`` holding the model and optimizer state
(``torch.distributed.checkpoint``: each rank writes its own shards, so FSDP2 never gathers a full model),
the scheduler, the fp16 loss scaler, the trainer state (epoch, step, data position, eval history and the
running totals of the summary), every rank's RNG state, the fingerprint of the run (what decides its
training, see ``fingerprint.py``) and, written last, ``manifest.json``: the size of every file.

It is written to ``step-<N>.partial`` and renamed when complete, so a crash mid-save never leaves a
checkpoint that looks whole; a checkpoint that is replaced or pruned is first renamed to
``step-<N>.deleting``. :func:`find_resumable_checkpoint` takes the newest checkpoint whose files match its
manifest and whose state reads back, and names the damaged ones it passed over.

Loading runs no code from the folder: every file is read with ``torch.load(..., weights_only=True)`` (the
scheduler, loss scaler and RNG states are saved as numbers and tensors for it), and the pickled index of
``torch.distributed.checkpoint`` (``.metadata``) is first read by an unpickler that admits only the index's
own classes. The final model is a standard HF checkpoint (safetensors, config, tokenizer, chat template)
that ``AutoModelForCausalLM.from_pretrained`` loads with no project code.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import logging
import os
import pickle
import random
import re
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
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem
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
_COMPLETE = re.compile(r"step-\d{8}")
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
FINGERPRINT = "fingerprint.json"
MODEL_OPTIMIZER = "model_optimizer"
SCHEDULER = "scheduler.pt"
GRAD_SCALER = "grad_scaler.pt"


class CheckpointError(ValueError):
    """A checkpoint does not read back (a missing or truncated file, a state that does not parse)."""


@dataclass
class TrainerState:
    """Where training is, and what the run has done so far: enough to continue exactly where it stopped
    and to report the whole run (every attempt) when it ends."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    #: optimizer steps skipped because fp16 gradients overflowed
    skipped_steps: int = 0
    #: every evaluation so far: ``{"step", "epoch", "eval_loss", "eval_<metric>"...}``
    eval_history: list[dict[str, float]] = field(default_factory=list)
    #: the sum of every step's loss (for the summary's mean loss); the last step's loss and metrics
    loss_sum: float = 0.0
    last_loss: float | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    #: seconds spent in optimizer steps, and wall-clock seconds of the run up to this checkpoint
    step_seconds: float = 0.0
    elapsed_seconds: float = 0.0
    #: the processes that have trained this run so far (1 + resumes); the highest memory peak among them
    attempts: int = 1
    peak_memory_mib: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        """Parse ``trainer_state.json``; :class:`CheckpointError` when it is not a trainer state."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise CheckpointError(f"{TRAINER_STATE} is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{TRAINER_STATE} is not a JSON object")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise CheckpointError(f"{TRAINER_STATE} has unknown fields: {', '.join(unknown)}")
        for name in ("global_step", "epoch", "step_in_epoch"):
            value = data.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CheckpointError(f"{TRAINER_STATE}: {name} is not a count ({value!r})")
        return cls(**data)


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINTS / f"{_PREFIX}{step:08d}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The checkpoint folders of ``output_dir`` with a complete name (not ``.partial``, not ``.deleting``),
    oldest first; whether their files are intact is :func:`verify_checkpoint`'s business."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _COMPLETE.fullmatch(p.name) and p.is_dir())


def verify_checkpoint(path: Path) -> TrainerState:
    """The trainer state of checkpoint ``path`` once its files are checked against its manifest (each
    present, with the size it was written with); :class:`CheckpointError` names what is wrong."""
    try:
        files = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
    except FileNotFoundError:
        raise CheckpointError(f"no {MANIFEST} (damaged, or written by an older version)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{MANIFEST} does not read back ({type(exc).__name__}: {exc})") from None
    for required in (TRAINER_STATE, FINGERPRINT, SCHEDULER, f"{MODEL_OPTIMIZER}/.metadata"):
        if required not in files:
            raise CheckpointError(f"{MANIFEST} does not list {required}")
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{name} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"{name} has {file.stat().st_size} bytes; {size} were written")
    state = TrainerState.from_json(_read_text(path / TRAINER_STATE))
    read_fingerprint(path)
    # the small pickles read back as tensors and numbers only, and the index as the index (the shards'
    # tensors are read with weights_only by torch.distributed.checkpoint itself)
    for name in files:
        if name.endswith(".pt"):
            try:
                torch.load(path / name, weights_only=True)
            except Exception as exc:  # any failure to read it back makes the checkpoint unusable
                raise CheckpointError(
                    f"{name} does not load with weights_only=True ({_first_line(exc)})"
                ) from None
    try:
        with open(path / MODEL_OPTIMIZER / ".metadata", "rb") as index:
            _IndexUnpickler(index).load()
    except Exception as exc:
        raise CheckpointError(
            f"{MODEL_OPTIMIZER}/.metadata does not read back ({_first_line(exc)})"
        ) from None
    return state


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def find_resumable_checkpoint(output_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact checkpoint of ``output_dir`` (None when there is none) and the newer ones passed
    over as damaged, each with what is wrong with it."""
    damaged: list[tuple[Path, str]] = []
    for path in reversed(complete_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            damaged.append((path, str(exc)))
            continue
        return path, damaged
    return None, damaged


def read_fingerprint(path: Path) -> dict[str, Any]:
    """The fingerprint of the run that wrote checkpoint ``path``."""
    try:
        fingerprint = json.loads(_read_text(path / FINGERPRINT))
    except ValueError as exc:
        raise CheckpointError(f"{FINGERPRINT} is not JSON ({exc})") from None
    if not isinstance(fingerprint, dict):
        raise CheckpointError(f"{FINGERPRINT} is not a JSON object")
    return fingerprint


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path.name} does not read back ({exc})") from None


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
    fingerprint: dict[str, Any],
    value_model: tuple[nn.Module, torch.optim.Optimizer] | None = None,
) -> Path:
    """Write a resumable checkpoint of the current step (every rank calls it), then keep the newest
    ``keep``. ``value_model``: the critic of ppo and a2c and its optimizer, saved beside the policy's
    (``value_model`` and ``value_optimizer`` in the same sharded checkpoint)."""
    final = checkpoint_dir(output_dir, state.global_step)
    partial = final.with_name(final.name + ".partial")
    if info.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    states: dict[str, Any] = {"model": model_state, "optimizer": optim_state}
    if value_model is not None:
        states["value_model"], states["value_optimizer"] = get_state_dict(*value_model)
    with silence_single_process_warning():
        dcp.save(states, checkpoint_id=str(partial / MODEL_OPTIMIZER))
    torch.save(_rng_state(), partial / f"rng_rank{info.rank}.pt")
    if info.is_main:
        torch.save(scheduler.state_dict(), partial / SCHEDULER)
        if precision is not None and precision.state_dict() is not None:
            torch.save(precision.state_dict(), partial / GRAD_SCALER)
        (partial / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=2))
        (partial / FINGERPRINT).write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
    barrier()  # every rank's files are written
    if info.is_main:
        files = {
            p.relative_to(partial).as_posix(): p.stat().st_size
            for p in sorted(partial.rglob("*"))
            if p.is_file()
        }
        (partial / MANIFEST).write_text(json.dumps({"files": files}, indent=2))
        if final.exists():
            _discard(final)
        partial.rename(final)
        prune_checkpoints(output_dir, keep)
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
    value_model: tuple[nn.Module, torch.optim.Optimizer] | None = None,
) -> TrainerState:
    """Load checkpoint ``path`` into the model, optimizer, scheduler, loss scaler and RNGs (and the value
    model and its optimizer, when given); return its state."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state_dict: dict[str, Any] = {"model": model_state, "optimizer": optim_state}
    if value_model is not None:
        state_dict["value_model"], state_dict["value_optimizer"] = get_state_dict(*value_model)
    with silence_single_process_warning():
        dcp.load(
            state_dict,
            storage_reader=SafeFileSystemReader(path / MODEL_OPTIMIZER),
            planner=SafeLoadPlanner(),
        )
    set_state_dict(
        model, optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optimizer"]
    )
    if value_model is not None:
        set_state_dict(
            value_model[0],
            value_model[1],
            model_state_dict=state_dict["value_model"],
            optim_state_dict=state_dict["value_optimizer"],
        )
    scheduler.load_state_dict(torch.load(path / SCHEDULER, weights_only=True))
    if precision is not None and (path / GRAD_SCALER).exists():
        precision.load_state_dict(torch.load(path / GRAD_SCALER, weights_only=True))
    rng_file = path / f"rng_rank{info.rank}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    state = TrainerState.from_json(_read_text(path / TRAINER_STATE))
    log.info("resumed from %s (step %d, epoch %d)", path, state.global_step, state.epoch)
    return state


def load_checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of checkpoint ``path``'s model and optimizer state by its flattened key
    (``model.<name>``, ``optimizer.state.<name>.exp_avg``, ...), read as :func:`load_checkpoint` reads
    them: for comparing checkpoints without building a model (single process)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = SafeFileSystemReader(path / MODEL_OPTIMIZER).read_metadata()
    tensors = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }
    with silence_single_process_warning():
        dcp.load(
            tensors, storage_reader=SafeFileSystemReader(path / MODEL_OPTIMIZER), planner=SafeLoadPlanner()
        )
    return tensors


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles the index ``torch.distributed.checkpoint`` writes (``.metadata``) and nothing else: the
    classes defined in its metadata module, its ``_StorageInfo``, paths, ``torch.Size``, torch's dtypes and
    the layout lookup. Any other global is an error, so a planted pickle cannot run code."""

    _METADATA = "torch.distributed.checkpoint.metadata"
    _ALLOWED = frozenset(
        {
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
            ("torch.serialization", "_get_layout"),  # a layout by its name
            ("torch", "Size"),
            ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"),
            ("pathlib", "Path"),
            ("collections", "OrderedDict"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return getattr(importlib.import_module(module), name)
        if module == self._METADATA and not name.startswith("__"):
            found = getattr(importlib.import_module(module), name, None)
            if isinstance(found, type) and found.__module__ == module:
                return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` that lets the checkpoint index through :class:`_IndexUnpickler` first."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        with open(Path(self.path) / name, "rb") as index:
            _IndexUnpickler(index).load()  # raises on anything but the index's own classes
        return super().read_metadata(*args, **kwargs)


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that admits among a checkpoint's non-tensor values (the optimizer's
    hyperparameters) only what ``torch.load(weights_only=True)`` reads."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)  # raises on anything but tensors, numbers, strings, containers
        value.seek(0)
        super().load_bytes(read_item, value)


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


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove the older ones and what interrupted saves and
    removals left (``.partial``, ``.deleting``). A checkpoint is renamed to ``.deleting`` before it is
    removed, so a crash mid-removal never leaves a damaged folder that looks like a checkpoint."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return
    for old in complete_checkpoints(output_dir)[:-keep]:
        _discard(old)
    for leftover in root.iterdir():
        if leftover.name.endswith((".partial", ".deleting")):
            shutil.rmtree(leftover, ignore_errors=True)


def remove_checkpoints(output_dir: Path) -> int:
    """Remove every checkpoint of ``output_dir`` and the leftovers of interrupted saves; return how many
    checkpoints there were."""
    found = complete_checkpoints(output_dir)
    for old in found:
        _discard(old)
    prune_checkpoints(output_dir, keep=1)
    return len(found)


def _discard(path: Path) -> None:
    doomed = path.with_name(path.name + ".deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain numbers, which ``torch.load(weights_only=True)`` reads."""
    import numpy as np

    version, python_state, gauss = random.getstate()
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(python_state, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy["keys"].numpy().astype(np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
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
