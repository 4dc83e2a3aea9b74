"""OSFT step cost: one optimizer step of OSFT against full fine-tuning on the same model and micro-batch.

Rows, each measured in a fresh process (so its peak RSS is its own), on a Qwen2-shaped model built locally:

* ``full``: full fine-tuning (forward, backward, AdamW);
* ``osft``: OSFT as shipped (dense rebuild ``W = W_h + (U_l * S_l) @ V_l``, rebuilt again in backward),
  plus both projections;
* ``osft_saved_weight``: the same rebuild left to plain autograd, which keeps ``W`` for backward;
* ``osft_factorised``: the reference implementation's forward ``x V^T S U^T`` on the frozen and trainable
  factors (no ``W_h`` cache), plus both projections.

All four at 4,096 tokens per micro-batch; ``full`` and ``osft`` again at 16,384.

Memory: torch keeps no allocator statistics for CPU tensors. "Saved for backward" counts, with
saved-tensor hooks, the bytes autograd keeps from forward to backward besides parameters and buffers;
"peak growth" is the process's peak resident set (``ru_maxrss``) minus its resident set just before the
first step (coarse: the allocator keeps freed memory). Model and optimizer state are counted from their
tensors.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kfp_components.testing.tiny_model import build_tiny_model
from kfp_components.trainer.osft import (
    OSFTLinear,
    apply_osft,
    osft_modules,
    project_osft_gradients,
    project_osft_parameters,
)

NAME = "osft_step"
MODEL = {
    "vocab_size": 1024,
    "hidden_size": 512,
    "num_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 1408,
    "max_position_embeddings": 4096,
}
SEQ_LEN = 1024
RATIO = 0.25
WARMUP_STEPS, MEASURED_STEPS = 2, 5
# (variant, sequences of SEQ_LEN tokens per micro-batch): every formulation at 4,096 tokens; full and the
# shipped OSFT again at 16,384 tokens, where the per-micro-batch rebuild weighs less.
CASES = (
    ("full", 4),
    ("osft", 4),
    ("osft_saved_weight", 4),
    ("osft_factorised", 4),
    ("full", 16),
    ("osft", 16),
)


class _SavedWeightOSFTLinear(OSFTLinear):
    """The shipped rebuild, but through plain autograd: ``W`` stays alive from forward to backward."""

    def forward(self, x: Tensor) -> Tensor:
        weight = (self.U_l * self.S_l) @ self.V_l
        if self.W_h is not None:
            weight = weight + self.W_h
        return F.linear(x, weight, self.bias)


class _FactorisedOSFTLinear(OSFTLinear):
    """The reference implementation's forward: ``((x V_h^T) S_h) U_h^T + ((x V_l^T) S_l) U_l^T``."""

    def forward(self, x: Tensor) -> Tensor:
        out = ((x @ self.V_h.T) * self.S_h) @ self.U_h.T + ((x @ self.V_l.T) * self.S_l) @ self.U_l.T
        return out if self.bias is None else out + self.bias


def _rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _tensor_mib(tensors: Any) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _saved_for_backward_mib(model: torch.nn.Module, ids: Tensor) -> float:
    """Bytes autograd keeps from forward to backward, not counting parameters and buffers (one pass)."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values()) / 2**20


def _measure(variant: str, batch: int, model_dir: str) -> dict[str, Any]:
    """Time ``WARMUP_STEPS + MEASURED_STEPS`` optimizer steps of ``variant`` (run in a fresh process)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    is_osft = variant != "full"
    if is_osft:
        apply_osft(model, unfreeze_rank_ratio=RATIO)
        replacement = {"osft_saved_weight": _SavedWeightOSFTLinear, "osft_factorised": _FactorisedOSFTLinear}
        if variant in replacement:
            for module in osft_modules(model).values():
                module.__class__ = replacement[variant]
                if variant == "osft_factorised":
                    module.W_h = None  # the factorised forward does not use the cached dense part
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, MODEL["vocab_size"], (batch, SEQ_LEN), generator=torch.Generator().manual_seed(0))

    step_seconds: list[float] = []
    projection_seconds: list[float] = []
    rss_before = _rss_mib()
    for step in range(WARMUP_STEPS + MEASURED_STEPS):
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        projecting = time.perf_counter()
        if is_osft:
            project_osft_gradients(model)
        projection = time.perf_counter() - projecting
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        projecting = time.perf_counter()
        if is_osft:
            project_osft_parameters(model)
        projection += time.perf_counter() - projecting
        if step >= WARMUP_STEPS:
            step_seconds.append(time.perf_counter() - started)
            projection_seconds.append(projection)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    optimizer_tensors = [t for state in optimizer.state.values() for t in state.values() if t.dim() > 0]
    return {
        "variant": variant,
        "tokens": batch * SEQ_LEN,
        # The fastest step: other processes on the machine can only add time; the median is kept too.
        "step_seconds": round(min(step_seconds), 3),
        "step_seconds_median": round(statistics.median(step_seconds), 3),
        "projection_seconds": round(min(projection_seconds), 4),
        "trainable_params": sum(p.numel() for p in params),
        "model_state_mib": round(_tensor_mib([*model.parameters(), *model.buffers()]), 1),
        "optimizer_state_mib": round(_tensor_mib(optimizer_tensors), 1),
        "saved_for_backward_mib": round(_saved_for_backward_mib(model, ids), 1),
        "peak_rss_mib": round(peak_rss),
        "peak_rss_growth_mib": round(peak_rss - rss_before),
    }


def run() -> dict:
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_tiny_model(Path(tmp) / "model", "qwen2", seed=0, **MODEL))
        rows = []
        for variant, batch in CASES:
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                rows.append(pool.submit(_measure, variant, batch, model_dir).result())
    for row in rows:
        full = next(r for r in rows if r["variant"] == "full" and r["tokens"] == row["tokens"])
        row["step_ratio"] = round(row["step_seconds"] / full["step_seconds"], 3)
        row["saved_ratio"] = round(row["saved_for_backward_mib"] / full["saved_for_backward_mib"], 3)
        row["peak_growth_ratio"] = round(row["peak_rss_growth_mib"] / full["peak_rss_growth_mib"], 3)
    return {
        "model": MODEL,
        "seq_len": SEQ_LEN,
        "unfreeze_rank_ratio": RATIO,
        "torch_dtype": "float32",
        "torch_threads": torch.get_num_threads(),
        "measured_steps": MEASURED_STEPS,
        "rows": rows,
    }


_LABELS = {
    "full": "full fine-tuning",
    "osft": "**OSFT, shipped** (dense rebuild, W rebuilt in backward)",
    "osft_saved_weight": "OSFT, dense rebuild, W saved by autograd",
    "osft_factorised": "OSFT, factorised forward (reference)",
}


def render(result: dict) -> str:
    model = result["model"]
    lines = [
        "## OSFT vs full fine-tuning step",
        "",
        f"One optimizer step (forward, backward, AdamW; for OSFT also both projections) with one "
        f"micro-batch of sequences of {result['seq_len']:,} tokens, on a Qwen2-shaped model (hidden "
        f"{model['hidden_size']}, {model['num_layers']} layers, intermediate {model['intermediate_size']}, "
        f"{model['num_attention_heads']} heads / {model['num_key_value_heads']} KV heads, vocab "
        f"{model['vocab_size']}), fp32 on the CPU with {result['torch_threads']} threads; "
        f"unfreeze_rank_ratio {result['unfreeze_rank_ratio']}. Fastest of {result['measured_steps']} steps "
        "after a warm-up (other load on the machine only adds time), each row in a fresh process. Memory "
        "(torch keeps no statistics for CPU tensors): *saved for backward* is what autograd holds from "
        "forward to backward besides parameters and buffers (saved-tensor hooks); *peak growth* is the "
        "process's peak RSS minus its RSS before the first step (activations, gradients, optimizer state, "
        "temporaries: coarse, the allocator keeps freed memory); model state (parameters and buffers) and "
        "optimizer state are counted from their tensors.",
        "",
        "| tokens | variant | step (s) | vs full | of which projections (s) | trainable params | "
        "model state | optimizer state | saved for backward | peak growth |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in result["rows"]:
        lines.append(
            f"| {v['tokens']:,} | {_LABELS[v['variant']]} | {v['step_seconds']} | {v['step_ratio']:.2f}x | "
            f"{v['projection_seconds']} | {v['trainable_params']:,} | {v['model_state_mib']} MiB | "
            f"{v['optimizer_state_mib']} MiB | {v['saved_for_backward_mib']} MiB ({v['saved_ratio']:.2f}x) | "
            f"{v['peak_rss_growth_mib']} MiB ({v['peak_growth_ratio']:.2f}x) |"
        )
    return "\n".join(lines)
