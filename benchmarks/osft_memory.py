"""OSFT memory per rank under FSDP2: measured with 1, 2 and 4 gloo processes, projected for Llama 8B and 70B.

Measured: the Qwen2-shaped model of ``benchmarks/osft_step.py`` (hidden 512, 4 layers, intermediate 1408),
fp32, trained for two optimizer steps (forward, backward, projections, AdamW) by 1, 2 and 4 gloo
processes on the CPU, each process wrapped as the trainer wraps it (``wrap_model(..., "fsdp")``; one
process trains unwrapped). After the second step each rank counts the tensors it holds: parameters and
buffers (the local shard of a DTensor), gradients and AdamW state; and reads its peak resident set
(``ru_maxrss``: coarse; it includes the ~0.3-0.4 GiB of the Python process and torch itself, given as
"process baseline").

Start: the same model decomposed by 2 and 4 gloo processes as the trainer does under FSDP2
(``apply_osft(..., frozen_mesh=...)`` then ``wrap_model``): per rank, the peak bytes of the tensors
``apply_osft`` creates and holds at once (counted with :class:`~kfp_components.testing.tensor_bytes.
LiveTensorBytes`: the SVDs, the factors received, the layers' shares), against one whole layer's factors
and the rank's share of all of them; and the peak RSS after loading and after decomposing and wrapping.

Projected: Llama-3 8B and 70B shapes built on the meta device (no weights; OSFT applied with
``decompose=False``), counted for 8 ranks from their shapes with the same rules: an FSDP2-managed
parameter holds ``1/8`` of its numbers per rank (``torch.chunk`` rounding), an OSFT frozen factor as
:func:`~kfp_components.trainer.osft.frozen_factor_sharding` says (``replicated`` when counting the code as
it was), fp32 master weights, fp32 gradients and two fp32 AdamW moments for trainable parameters, and
``W_h`` in bf16 (the trainer's ``dense_dtype`` under bf16 autocast) or fp32.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import resource
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import osft_step
from kfp_components.testing.tiny_model import build_tiny_model

NAME = "osft_memory"
MODEL = osft_step.MODEL  # the model of the step-time benchmark
RATIO = 0.25
WORLDS = (1, 2, 4)
TOKENS_PER_RANK = 2048
STEPS = 3
PROJECTED_WORLD = 8
LLAMA_SHAPES = {
    "Llama 8B": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    },
    "Llama 70B": {
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    },
}
# The same measurement on the code before the frozen factors were sharded (commit cbf3b61: U_h, V_h and W_h
# replicated buffers): "variant@processes": (model state bytes per rank, peak RSS after set-up, peak RSS).
BEFORE = {
    "full@1": (197255424, 477040640, 1137762304),
    "osft@1": (178590976, 594448384, 1202044928),
    "full@2": (98627840, 477040640, 1189220352),
    "osft@2": (136826112, 577712128, 1170059264),
    "full@4": (49314048, 477040640, 1131458560),
    "osft@4": (115943680, 562688000, 1154146304),
}
# The start (below) on the code before the decompositions were scattered (commit 4435126: each layer
# broadcast whole, U_l, S_l, V_l and W_h whole until fully_shard): "processes": (peak tensor bytes during
# apply_osft, RSS after loading, peak RSS after decomposing and wrapping), the rank with the largest peak.
BEFORE_START = {
    "2": (92944384, 477827072, 567226368),
    "4": (81901568, 477827072, 553709568),
}
# Step time side by side (below), on the code as it was: seconds per step of full fine-tuning and OSFT.
BEFORE_TIMING = {"full_seconds": 15.077, "osft_seconds": 15.036}
GIB = 2**30
MIB = 2**20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_ranks(
    target: Any, world: int, args: tuple[Any, ...], what: str, timeout: float = 900
) -> list[dict[str, Any]]:
    """``target(rank, world, port, *args, queue)`` in ``world`` spawned processes; the row each puts."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    processes = [
        context.Process(target=target, args=(rank, world, port, *args, queue)) for rank in range(world)
    ]
    for process in processes:
        process.start()
    rows = [queue.get(timeout=timeout) for _ in processes]
    for process in processes:
        process.join(timeout=120)
        if process.exitcode != 0:
            raise RuntimeError(f"{what}: a rank exited with {process.exitcode}")
    return rows


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def _bytes(tensors: Any) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def _rank(rank: int, world: int, port: int, variant: str, model_dir: str, queue: Any) -> None:
    """One rank: load, (OSFT), wrap as the trainer does, train ``STEPS`` steps, report what it holds."""
    torch.set_num_threads(1)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from kfp_components.trainer.distributed import DistInfo, wrap_model
    from kfp_components.trainer.osft import (
        apply_osft,
        osft_orthogonality_error,
        project_osft_gradients,
        project_osft_parameters,
    )

    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if variant == "osft":
        apply_osft(model, unfreeze_rank_ratio=RATIO)
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    model = wrap_model(model, info, "fsdp", bf16=False)
    start_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    generator = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, MODEL["vocab_size"], (1, TOKENS_PER_RANK), generator=generator)
    model.train()
    grad_bytes = 0
    step_seconds = []
    for step in range(STEPS):
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        if variant == "osft":
            project_osft_gradients(model)
        if step == STEPS - 1:
            grad_bytes = _bytes(p.grad for p in params if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if variant == "osft":
            project_osft_parameters(model)
        step_seconds.append(time.perf_counter() - started)
    error = osft_orthogonality_error(model) if variant == "osft" else 0.0
    optimizer_tensors = [t for state in optimizer.state.values() for t in state.values() if t.dim() > 0]
    row = {
        "variant": variant,
        "world": world,
        "rank": rank,
        "param_bytes": _bytes(model.parameters()),
        "buffer_bytes": _bytes(model.buffers()),
        "grad_bytes": grad_bytes,
        "optimizer_bytes": _bytes(optimizer_tensors),
        "start_peak_rss_bytes": start_peak,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "baseline_rss_bytes": baseline,
        "orthogonality_error": error,
        "step_seconds": min(step_seconds[1:]),  # the first step warms up
    }
    row["state_bytes"] = row["param_bytes"] + row["buffer_bytes"] + row["grad_bytes"] + row["optimizer_bytes"]
    queue.put(row)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _measure(variant: str, world: int, model_dir: str) -> dict[str, Any]:
    """Run ``world`` ranks of ``variant``; the figures of the rank holding the most (rank 0 with uneven
    shards)."""
    rows = _run_ranks(_rank, world, (variant, model_dir), f"{variant} with {world} processes")
    worst = max(rows, key=lambda row: row["state_bytes"])
    return {
        **worst,
        "peak_rss_bytes": max(row["peak_rss_bytes"] for row in rows),
        "step_seconds": max(row["step_seconds"] for row in rows),
    }


# --------------------------------------------------------------------------------------------------------
# The start: what decomposing holds per rank
# --------------------------------------------------------------------------------------------------------

START_WORLDS = (2, 4)


def _start_rank(rank: int, world: int, port: int, model_dir: str, queue: Any) -> None:
    """One rank: load, decompose as the trainer does under FSDP2 (counting the tensors), wrap."""
    torch.set_num_threads(1)
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from kfp_components.testing.tensor_bytes import LiveTensorBytes
    from kfp_components.trainer.distributed import DistInfo, fsdp_mesh, wrap_model
    from kfp_components.trainer.osft import apply_osft, osft_modules

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mesh = fsdp_mesh(info)
    with LiveTensorBytes(exclude=[*model.parameters(), *model.buffers()]) as counter:
        apply_osft(model, unfreeze_rank_ratio=RATIO, frozen_mesh=mesh)
    model = wrap_model(model, info, "fsdp", bf16=False)
    factors = ("U_h", "S_h", "V_h", "U_l", "S_l", "V_l", "W_h")
    modules = osft_modules(model).values()
    shapes = [(m.U_h.shape[0], m.V_h.shape[1]) for m in modules]
    queue.put(
        {
            "world": world,
            "rank": rank,
            "apply_peak_bytes": counter.peak,
            "share_bytes": _bytes(
                t for m in modules for name in factors if (t := getattr(m, name)) is not None
            ),
            # one layer whole: U (N x r), S (r), V (r x M) and W_h (N x M), fp32
            "largest_layer_bytes": max(
                4 * (n * min(n, c) + min(n, c) + min(n, c) * c + n * c) for n, c in shapes
            ),
            "loaded_rss_bytes": loaded_rss,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
    )
    dist.barrier()
    dist.destroy_process_group()


def _start(world: int, model_dir: str) -> dict[str, Any]:
    """The start on ``world`` ranks: the rank with the largest peak of tensor bytes."""
    rows = _run_ranks(_start_rank, world, (model_dir,), f"the start with {world} processes")
    worst = max(rows, key=lambda row: row["apply_peak_bytes"])
    return {**worst, "peak_rss_bytes": max(row["peak_rss_bytes"] for row in rows)}


def start_study(model_dir: str) -> list[dict[str, Any]]:
    return [_start(world, model_dir) for world in START_WORLDS]


# --------------------------------------------------------------------------------------------------------
# Step time side by side under FSDP2
# --------------------------------------------------------------------------------------------------------

TIMING_WORLD, TIMING_TOKENS, TIMING_ROUNDS = 2, 4096, 4


def _timing_rank(rank: int, world: int, port: int, model_dir: str, queue: Any) -> None:
    """Both models on every rank, FSDP2-wrapped; their steps alternate so both see the same machine load."""
    torch.set_num_threads(1)
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from kfp_components.trainer.distributed import DistInfo, wrap_model
    from kfp_components.trainer.osft import apply_osft, project_osft_gradients, project_osft_parameters

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    models = {}
    for variant in ("full", "osft"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if variant == "osft":
            apply_osft(model, unfreeze_rank_ratio=RATIO)
        model = wrap_model(model, info, "fsdp", bf16=False)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        models[variant] = (model, optimizer)
    ids = torch.randint(
        0, MODEL["vocab_size"], (TIMING_TOKENS // 1024, 1024), generator=torch.Generator().manual_seed(rank)
    )
    seconds: dict[str, list[float]] = {"full": [], "osft": []}
    for _ in range(TIMING_ROUNDS):
        for variant, (model, optimizer) in models.items():
            dist.barrier()
            started = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            if variant == "osft":
                project_osft_gradients(model)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if variant == "osft":
                project_osft_parameters(model)
            dist.barrier()
            seconds[variant].append(time.perf_counter() - started)
    queue.put({variant: min(values[1:]) for variant, values in seconds.items()})  # the first warms up
    dist.destroy_process_group()


def _timing(model_dir: str) -> dict[str, Any]:
    rows = _run_ranks(_timing_rank, TIMING_WORLD, (model_dir,), "the step timing", timeout=1800)
    full = max(row["full"] for row in rows)
    osft = max(row["osft"] for row in rows)
    return {"full_seconds": full, "osft_seconds": osft, "ratio": round(osft / full, 3)}


# --------------------------------------------------------------------------------------------------------
# Frozen factors in the training dtype: what bf16 costs in accuracy
# --------------------------------------------------------------------------------------------------------

DTYPE_STEPS, DTYPE_TOKENS, DTYPE_LR = 8, 256, 1e-4
DTYPE_VARIANTS = {
    "fp32": "U_h, V_h, W_h fp32",
    "w_bf16": "W_h bf16 (shipped under bf16 autocast); U_h, V_h fp32",
    "all_bf16": "W_h bf16 and U_h, V_h rounded to bf16",
}


def _dtype_run(variant: str, model_dir: str) -> dict[str, Any]:
    """``DTYPE_STEPS`` OSFT steps under bf16 autocast with the frozen factors in ``variant``'s dtypes."""
    from transformers import AutoModelForCausalLM

    from kfp_components.trainer.osft import (
        apply_osft,
        osft_modules,
        project_osft_gradients,
        project_osft_parameters,
    )

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dense_dtype = torch.float32 if variant == "fp32" else torch.bfloat16
    apply_osft(model, unfreeze_rank_ratio=RATIO, dense_dtype=dense_dtype)
    exact = {name: (m.U_h.clone(), m.V_h.clone()) for name, m in osft_modules(model).items()}
    if variant == "all_bf16":
        with torch.no_grad():
            for module in osft_modules(model).values():
                module.U_h.copy_(module.U_h.to(torch.bfloat16))
                module.V_h.copy_(module.V_h.to(torch.bfloat16))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=DTYPE_LR)
    ids = torch.randint(0, MODEL["vocab_size"], (1, DTYPE_TOKENS), generator=torch.Generator().manual_seed(0))
    losses = []
    model.train()
    for _ in range(DTYPE_STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        project_osft_gradients(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        project_osft_parameters(model)
        losses.append(float(loss))
    error = 0.0
    with torch.no_grad():
        for name, module in osft_modules(model).items():
            u_h, v_h = exact[name]
            error = max(error, float((u_h.T @ module.U_l.float()).abs().max()))
            error = max(error, float((module.V_l.float() @ v_h.T).abs().max()))
    return {"variant": variant, "losses": losses, "orthogonality_error": error}


def _dtype_study(model_dir: str) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    rows = [_dtype_run(variant, model_dir) for variant in DTYPE_VARIANTS]
    reference = rows[0]["losses"]
    for row in rows:
        row["max_loss_difference"] = max(abs(a - b) for a, b in zip(row["losses"], reference, strict=True))
        row["final_loss"] = row["losses"][-1]
    return rows


# --------------------------------------------------------------------------------------------------------
# Projection from shapes (meta device)
# --------------------------------------------------------------------------------------------------------


def _chunk(numel_rows: int, rest: int, world: int) -> int:
    """Numbers on rank 0 of a tensor of ``numel_rows`` rows split like ``torch.chunk`` (the largest)."""
    return -(-numel_rows // world) * rest if numel_rows else 0


def _sharded_numel(shape: torch.Size, dim: int, world: int) -> int:
    rest = math.prod(shape) // shape[dim] if shape[dim] else 0
    return _chunk(shape[dim], rest, world)


def project(
    shapes: dict[str, int], world: int, *, variant: str, frozen_sharded: bool, dense_bytes: int
) -> int:
    """Bytes per rank (rank 0, the largest shard) of ``variant`` on ``world`` FSDP2 ranks, from shapes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kfp_components.trainer.osft import apply_osft, frozen_factor_sharding, osft_modules

    config = LlamaConfig(**shapes, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if variant == "osft":
        apply_osft(model, unfreeze_rank_ratio=RATIO, decompose=False)
    frozen: dict[int, tuple[str, int | None]] = {}
    for module in osft_modules(model).values():
        for name, dim in frozen_factor_sharding(module, world).items():
            tensor = getattr(module, name)
            if tensor is not None:
                frozen[id(tensor)] = (name, dim if frozen_sharded else None)
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        # FSDP2 shards parameters on dim 0; other buffers (rotary tables) stay whole on every rank
        name, dim = frozen.get(id(tensor), ("", 0 if isinstance(tensor, nn.Parameter) else None))
        if tensor.dim() == 0:
            numel = 1
        elif dim is None:
            numel = tensor.numel()
        else:
            numel = _sharded_numel(tensor.shape, dim, world)
        if name == "W_h":
            total += numel * dense_bytes
        elif name:
            total += numel * 4
        elif isinstance(tensor, nn.Parameter) and tensor.requires_grad:
            total += numel * 4 * 4  # fp32 master weight, gradient and two AdamW moments
        elif tensor.is_floating_point():
            total += numel * 4
    return total


def _projections() -> list[dict[str, Any]]:
    rows = []
    for label, shapes in LLAMA_SHAPES.items():
        full = project(shapes, PROJECTED_WORLD, variant="full", frozen_sharded=True, dense_bytes=4)
        row: dict[str, Any] = {"model": label, "world": PROJECTED_WORLD, "full_bytes": full}
        for dense_bytes, dtype in ((2, "bf16"), (4, "fp32")):
            for sharded in (False, True):
                key = f"osft_{'sharded' if sharded else 'replicated'}_{dtype}_bytes"
                row[key] = project(
                    shapes, PROJECTED_WORLD, variant="osft", frozen_sharded=sharded, dense_bytes=dense_bytes
                )
        rows.append(row)
    return rows


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_tiny_model(Path(tmp) / "model", "qwen2", seed=0, **MODEL))
        measured = [_measure(variant, world, model_dir) for world in WORLDS for variant in ("full", "osft")]
        dtypes = _dtype_study(model_dir)
        timing = _timing(model_dir)
        start = start_study(model_dir)
    for row in measured:
        full = next(r for r in measured if r["variant"] == "full" and r["world"] == row["world"])
        row["state_vs_full"] = round(row["state_bytes"] / full["state_bytes"], 3)
        row["step_vs_full"] = round(row["step_seconds"] / full["step_seconds"], 3)
    return {
        "model": MODEL,
        "unfreeze_rank_ratio": RATIO,
        "tokens_per_rank": TOKENS_PER_RANK,
        "steps": STEPS,
        "measured": measured,
        "projected": _projections(),
        "dtypes": dtypes,
        "timing": timing,
        "start": start,
        "timing_world": TIMING_WORLD,
        "timing_tokens": TIMING_TOKENS,
        "timing_rounds": TIMING_ROUNDS,
        "dtype_steps": DTYPE_STEPS,
        "dtype_tokens": DTYPE_TOKENS,
        "cpu_count": os.cpu_count(),
    }


def _mib(value: float) -> str:
    return f"{value / MIB:.1f}"


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def _render_start(rows: list[dict[str, Any]]) -> list[str]:
    """The start: what decomposing holds per rank, now and on the code as it was (``BEFORE_START``)."""
    if not rows:
        return []
    lines = [
        "",
        "### The start: decomposing under FSDP2",
        "",
        "The model above decomposed by 2 and 4 gloo processes (`apply_osft(..., frozen_mesh=...)` then "
        "`wrap_model`, as the trainer does): "
        "*peak tensors* is the most bytes of the tensors `apply_osft` creates that a rank holds at once (the "
        "SVDs, the factors it receives, the layers' shares; counted per storage), against the rank's share of "
        "all the factors once wrapped and one whole layer's factors (`U`, `S`, `V`, `W_h`: the largest layer). "
        "Before: each decomposition broadcast whole to every rank, `U_l`, `S_l`, `V_l` and `W_h` whole until "
        "`fully_shard` split them. Now: the rank that decomposes a layer sends each other rank only its share, "
        "and the trainable factors and `W_h` reach FSDP2 already sharded. RSS: after loading the model, and "
        "the peak after decomposing and wrapping (whole process; the rank with the largest).",
        "",
        "| processes | code | peak tensors during apply_osft | share of all factors | one whole layer | "
        "peak - share | RSS after loading | peak RSS after set-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        share, layer = row["share_bytes"], row["largest_layer_bytes"]
        before = BEFORE_START.get(str(row["world"]))
        if before and before[0]:
            peak, loaded, rss = before
            lines.append(
                f"| {row['world']} | before | {_mib(peak)} MiB | {_mib(share)} MiB | {_mib(layer)} MiB | "
                f"{(peak - share) / layer:.1f} layers | {_mib(loaded)} MiB | {_mib(rss)} MiB |"
            )
        peak = row["apply_peak_bytes"]
        lines.append(
            f"| {row['world']} | now | {_mib(peak)} MiB | {_mib(share)} MiB | {_mib(layer)} MiB | "
            f"{(peak - share) / layer:.1f} layers | {_mib(row['loaded_rss_bytes'])} MiB | "
            f"{_mib(row['peak_rss_bytes'])} MiB |"
        )
    lines += [
        "",
        "Now a rank holds, beyond its share, exactly one whole layer at the peak (the one it decomposes, with "
        "its `W_h`), whatever the number of processes; before, the whole trainable factors and `W_h` of "
        "every layer waited for `fully_shard`, more the more processes share the model.",
    ]
    return lines


def render(result: dict[str, Any]) -> str:
    model = result["model"]
    lines = [
        "## OSFT memory per rank under FSDP2",
        "",
        f"Measured: Qwen2-shaped model (hidden {model['hidden_size']}, {model['num_layers']} layers, "
        f"intermediate {model['intermediate_size']}, vocab {model['vocab_size']}), fp32, unfreeze_rank_ratio "
        f"{result['unfreeze_rank_ratio']}, {result['steps']} optimizer steps of {result['tokens_per_rank']} "
        "tokens per rank, each process wrapped as the trainer wraps it (FSDP2 per decoder layer; one "
        "process unwrapped). *Model state* counts the tensors the rank holds after the last step (local "
        "shards of DTensors): parameters, buffers, gradients, AdamW state; the rank holding the most is "
        "shown. Peak RSS is the largest of the ranks' (whole process, torch included: the process baseline "
        "column is its RSS right after start-up). Step: the fastest of the last "
        f"{result['steps'] - 1} steps (forward, backward, projections, AdamW; the slowest rank), one torch "
        "thread per process on a shared 2-core machine: the ranks of 2 and 4 processes compete for the "
        "cores, so compare OSFT with full fine-tuning at the same process count only.",
        "",
        "| processes | variant | params | buffers | grads | optimizer | model state per rank | vs full | "
        "peak RSS after set-up | peak RSS | process baseline | step (s) | step vs full | orthogonality error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["measured"]:
        lines.append(
            f"| {row['world']} | {row['variant']} | {_mib(row['param_bytes'])} MiB | "
            f"{_mib(row['buffer_bytes'])} MiB | {_mib(row['grad_bytes'])} MiB | "
            f"{_mib(row['optimizer_bytes'])} MiB | {_mib(row['state_bytes'])} MiB | "
            f"{row['state_vs_full']:.2f}x | {_mib(row['start_peak_rss_bytes'])} MiB | "
            f"{_mib(row['peak_rss_bytes'])} MiB | {_mib(row['baseline_rss_bytes'])} MiB | "
            f"{row['step_seconds']:.2f} | {row['step_vs_full']:.2f}x | {row['orthogonality_error']:.1e} |"
        )
    by = {(row["variant"], row["world"]): row["state_bytes"] for row in result["measured"]}
    low, high = min(WORLDS), max(WORLDS)
    if all((v, w) in by for v in ("full", "osft") for w in (low, high)):
        lines += [
            "",
            f"OSFT's model state per rank at {high} processes is {by['osft', high] / by['full', high]:.2f}x "
            f"full fine-tuning's (before: {BEFORE[f'osft@{high}'][0] / BEFORE[f'full@{high}'][0]:.2f}x); "
            f"from {low} to {high} processes it falls {by['osft', low] / by['osft', high]:.2f}-fold (full "
            f"fine-tuning: {by['full', low] / by['full', high]:.2f}-fold; before: "
            f"{BEFORE[f'osft@{low}'][0] / BEFORE[f'osft@{high}'][0]:.2f}-fold). Peak RSS hardly moves at "
            "this size: it is the process (torch, transformers) plus loading the model, not the training "
            "state.",
        ]
    timing = result.get("timing")
    if timing:
        lines += [
            "",
            f"Step time side by side: {result['timing_world']} gloo processes, each holding both models "
            f"FSDP2-wrapped and alternating their steps ({result['timing_rounds']} each, the first a warm-up; "
            f"fastest step, slowest rank), {result['timing_tokens']:,} tokens per rank per micro-batch: full "
            f"fine-tuning {timing['full_seconds']:.2f} s, OSFT {timing['osft_seconds']:.2f} s "
            f"(**{timing['ratio']:.2f}x**).",
        ]
        full, osft = BEFORE_TIMING["full_seconds"], BEFORE_TIMING["osft_seconds"]
        lines[-1] += (
            f" On the code as it was (frozen factors replicated, `W_h` not gathered): {osft / full:.2f}x "
            f"({full:.2f} s, {osft:.2f} s). Sharding `W_h` costs its all-gather per layer, forward and "
            "backward, the same traffic as a dense weight of full fine-tuning."
        )
    lines += _render_start(result.get("start") or [])
    lines += [
        "",
        "Before (the same run on the code as it was, frozen factors replicated on every rank):",
        "",
        "| processes | variant | model state per rank | vs full | peak RSS after set-up | peak RSS |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, (state, start, peak) in BEFORE.items():
        variant, world = key.split("@")
        full = BEFORE[f"full@{world}"][0]
        lines.append(
            f"| {world} | {variant} | {_mib(state)} MiB | {state / full:.2f}x | {_mib(start)} MiB | "
            f"{_mib(peak)} MiB |"
        )
    lines += [
        "",
        f"Projected for {PROJECTED_WORLD} GPUs from the shapes (meta-device models; model state only: fp32 "
        "master weights, gradients and AdamW moments of what trains, OSFT's frozen factors in fp32, its "
        "`W_h` in bf16 or fp32; activations not counted). *Replicated* is OSFT with its frozen factors on "
        "every rank (before), *sharded* with them split like the trainable factors (now).",
        "",
        "| model | full fine-tuning | OSFT replicated, W_h bf16 | OSFT sharded, W_h bf16 | "
        "OSFT replicated, W_h fp32 | OSFT sharded, W_h fp32 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["projected"]:
        full = row["full_bytes"]
        cells = [
            f"{_gib(row[key])} GiB ({row[key] / full:.2f}x)"
            for key in (
                "osft_replicated_bf16_bytes",
                "osft_sharded_bf16_bytes",
                "osft_replicated_fp32_bytes",
                "osft_sharded_fp32_bytes",
            )
        ]
        lines.append(f"| {row['model']} | {_gib(full)} GiB | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Frozen factors in bf16: {result['dtype_steps']} OSFT steps of {result['dtype_tokens']} tokens under "
        "bf16 autocast on the measured model (one process). The orthogonality error is measured against "
        "the exact fp32 factors (how far the trainable factors have leaked into the true frozen subspace); "
        "the loss difference is the largest over the steps against the all-fp32 run.",
        "",
        "| frozen factors | final loss | max loss difference vs fp32 | orthogonality error |",
        "| --- | --- | --- | --- |",
    ]
    for row in result["dtypes"]:
        lines.append(
            f"| {DTYPE_VARIANTS[row['variant']]} | {row['final_loss']:.4f} | "
            f"{row['max_loss_difference']:.1e} | {row['orthogonality_error']:.1e} |"
        )
    return "\n".join(lines)
