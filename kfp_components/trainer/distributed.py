"""Process-group set-up and model wrapping for torchrun: DDP or FSDP2 on GPUs (nccl), or CPUs (gloo).

Run with one process (``python -m kfp_components.trainer``) or many (``torchrun --nproc_per_node N``); on
a Kubeflow Trainer TrainJob the runtime sets the torchrun rendezvous for every node.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import resource
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes (or run alone) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        log.info("joined process group: rank %d of %d (%s)", rank, world_size, backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def leave_process_group(timeout: datetime.timedelta = datetime.timedelta(seconds=60)) -> None:
    """Wait (up to ``timeout``) for every rank to get here, then leave the process group: for the end of a
    run every rank ends the same way (done, an input error, a stop on a signal). A rank that exits with the
    group open can take a peer that is still leaving down with SIGABRT (gloo), and torchrun stops the other
    workers as soon as one exits, before they have said why."""
    if not dist.is_initialized():
        return
    try:
        dist.barrier(async_op=True).wait(timeout=timeout)
    except RuntimeError:  # a rank that never came: leave anyway
        log.warning("leaving the process group without the other ranks after %s", timeout)
    dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, strategy: str, *, bf16: bool) -> nn.Module:
    """DDP, or FSDP2 with each decoder layer its own shard group; unchanged in a single process."""
    if not info.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [info.local_rank] if info.device.type == "cuda" else None
        # broadcast_buffers=False: buffers (rotary tables, OSFT frozen factors) are identical on every rank
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from kfp_components.trainer import osft

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    mesh = fsdp_mesh(info)
    kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": policy} if policy else {"mesh": mesh}
    if osft.osft_modules(model):
        # OSFT's frozen factors split like their trainable twins (U_h by rows, V_h by columns), W_h by FSDP2
        osft.shard_frozen_factors(model, mesh)
        kwargs["shard_placement_fn"] = osft.fsdp_shard_placement(model)
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    # OSFT decomposed with frozen_mesh: each rank's shares of the trainable factors and W_h take their place
    osft.place_factor_shards(model)
    return model


def fsdp_mesh(info: DistInfo) -> DeviceMesh:
    """The 1-D device mesh over every rank that FSDP2 shards on (the default process group)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(info.device.type, (info.world_size,))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (``model.model.layers`` and its variants)."""
    for candidate in (
        "model.layers",
        "model.model.layers",
        "base_model.model.model.layers",
        "transformer.h",
        "gpt_neox.layers",
        "model.decoder.layers",
    ):
        module: object = model
        for part in candidate.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return list(module)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place, so there is nothing to unwrap)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation step."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    set_sync = getattr(model, "set_requires_gradient_sync", None)  # FSDP2
    if set_sync is not None:
        set_sync(enabled)
    yield


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def broadcast_object(value: T, info: DistInfo) -> T:
    """Rank 0's ``value`` on every rank (picklable objects); ``value`` itself in a single process."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=info.device if info.device.type == "cuda" else None)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory so far: GPU memory allocated by torch, or the CPU process's peak RSS."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
