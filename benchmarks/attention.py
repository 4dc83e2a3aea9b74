"""Attention over packed micro-batches: what a packed row costs against its samples batched, before and after.

One micro-batch of 512-token samples (the tiny Qwen2 of ``kfp_components.testing.tiny_model``, float32 on
the CPU, one thread) at 4,096, 16,384 and 65,536 tokens, forward and backward of the summed next-token loss:

* ``batched``: the samples as a ``(n, 512)`` batch (no mask, causal sdpa): what per-sample attention costs;
* ``packed_sdpa`` (before: the engine's default was ``sdpa``): the samples as one packed row, positions
  restarting per sample; transformers gives sdpa a block-diagonal mask over the whole row;
* ``packed_auto`` (after: ``attn_implementation: auto``, which resolves on a CPU to ``sdpa_per_sample``).

The variants run interleaved in one process, best of ``REPEATS`` after a warm-up pass. ``packed_sdpa`` at
65,536 tokens is not run (minutes and a 4 GiB mask per pass on this CPU): it is projected from 16,384 tokens,
its excess over ``batched`` growing with the square of the row. Every packed row's loss is checked against
the batched loss.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer import attention

NAME = "attention"
SAMPLE_TOKENS = 512
TOKENS = (4_096, 16_384, 65_536)
#: Rows above this many tokens do not run packed_sdpa (projected instead).
SDPA_MEASURED_UP_TO = 16_384
REPEATS = 2


def _load(name: str) -> Any:
    from transformers import AutoModelForCausalLM

    from kfp_components.trainer.progress import no_transformers_progress_bars

    if name == attention.SDPA_PER_SAMPLE:
        attention.register_sdpa_per_sample()
    with no_transformers_progress_bars():
        return AutoModelForCausalLM.from_pretrained(
            tiny_model_path("qwen2", 0), dtype=torch.float32, attn_implementation=name
        )


def _pass(model: Any, ids: torch.Tensor, positions: torch.Tensor) -> tuple[float, float]:
    """Seconds of one forward and backward, and the mean token loss."""
    model.zero_grad(set_to_none=True)
    started = time.perf_counter()
    logits = model(input_ids=ids, position_ids=positions, attention_mask=None, use_cache=False).logits
    targets = ids.clone()
    targets[..., :-1] = ids[..., 1:]
    targets.view(-1, SAMPLE_TOKENS)[:, -1] = -100  # no target across a sample's end
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    loss.backward()
    return time.perf_counter() - started, loss.item()


def run() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run()
    finally:
        torch.set_num_threads(threads)


def _run() -> dict:
    choice = attention.choose("auto", device=torch.device("cpu"), torch_dtype="float32")
    models = {"batched": _load("sdpa"), "packed_sdpa": _load("sdpa"), "packed_auto": _load(choice.name)}
    rows = []
    for tokens in TOKENS:
        samples = tokens // SAMPLE_TOKENS
        ids = torch.randint(3, 1000, (samples, SAMPLE_TOKENS), generator=torch.Generator().manual_seed(0))
        inputs = {
            "batched": (ids, torch.arange(SAMPLE_TOKENS).expand(samples, -1)),
            "packed_sdpa": (ids.reshape(1, -1), torch.arange(SAMPLE_TOKENS).repeat(samples)[None]),
        }
        inputs["packed_auto"] = inputs["packed_sdpa"]
        variants = [v for v in models if v != "packed_sdpa" or tokens <= SDPA_MEASURED_UP_TO]
        seconds: dict[str, list[float]] = {v: [] for v in variants}
        losses: dict[str, float] = {}
        for repeat in range(REPEATS + 1):
            for variant in variants:
                took, losses[variant] = _pass(models[variant], *inputs[variant])
                if repeat:  # the first pass warms up
                    seconds[variant].append(took)
        best = {variant: round(min(times), 3) for variant, times in seconds.items()}
        for variant, loss in losses.items():
            if abs(loss - losses["batched"]) > 1e-4 * abs(losses["batched"]):
                raise AssertionError(f"{variant} at {tokens} tokens: loss {loss} against {losses['batched']}")
        rows.append(
            {"tokens": tokens, "samples": samples, "seconds": best, "loss": round(losses["batched"], 5)}
        )
    _project_packed_sdpa(rows)
    return {"kernel": choice.name, "reason": choice.reason, "sample_tokens": SAMPLE_TOKENS, "rows": rows}


def _project_packed_sdpa(rows: list[dict]) -> None:
    """packed_sdpa where it was not run: its excess over batched at the largest measured row, scaled by the
    square of the row length."""
    measured = [row for row in rows if "packed_sdpa" in row["seconds"]]
    if not measured:
        return
    base = measured[-1]
    excess = base["seconds"]["packed_sdpa"] - base["seconds"]["batched"]
    for row in rows:
        if "packed_sdpa" not in row["seconds"]:
            scale = (row["tokens"] / base["tokens"]) ** 2
            row["packed_sdpa_projected"] = round(row["seconds"]["batched"] + excess * scale, 1)


def render(result: dict) -> str:
    lines = [
        "## Attention over packed micro-batches",
        "",
        f"`benchmarks/attention.py`: one micro-batch of {result['sample_tokens']}-token samples through the tiny "
        "Qwen2 of `kfp_components.testing.tiny_model` (float32, CPU, one thread), forward and backward, best of "
        f"{REPEATS} after a warm-up, the variants interleaved. *Batched*: the samples as a batch (causal sdpa, "
        "no mask). *Packed, sdpa* (before: the engine's default was `sdpa`): one packed row, positions "
        "restarting per sample, so sdpa attends over the whole row with a block-diagonal mask. *Packed, auto* "
        f"(after: `attn_implementation: auto`, the default): on this CPU it runs `{result['kernel']}` "
        f"({result['reason']}). Every packed row's loss equals the batched loss.",
        "",
        "| tokens/micro-batch | samples | batched (s) | packed, sdpa (s) | packed, auto (s) | "
        "sdpa / batched | auto / batched |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        seconds = row["seconds"]
        batched, auto = seconds["batched"], seconds["packed_auto"]
        if "packed_sdpa" in seconds:
            sdpa, sdpa_text = seconds["packed_sdpa"], f"{seconds['packed_sdpa']:.3f}"
        else:
            sdpa = row["packed_sdpa_projected"]
            sdpa_text = f"~{sdpa:.0f} (projected)"
        lines.append(
            f"| {row['tokens']:,} | {row['samples']} | {batched:.3f} | {sdpa_text} | {auto:.3f} | "
            f"{sdpa / batched:.1f}x | {auto / batched:.2f}x |"
        )
    lines += [
        "",
        "The projected packed-sdpa figure is not run (minutes and a 4 GiB mask per pass here): the excess over "
        "batched at the largest measured row, times the square of the length ratio. On a CUDA GPU `auto` runs "
        "`flash_attention_2` (flash-attn installed, compute capability 8.0+, 16-bit `torch_dtype`) or else "
        "`sdpa_per_sample` (PyTorch's GPU sdpa kernels per sample); neither is measured here (no GPU). "
        "`flex_attention` runs only when named, and has no backward on a CPU, so it cannot train there.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
