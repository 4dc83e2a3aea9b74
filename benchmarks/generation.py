"""Generation throughput: the ``hf`` rollout loop against plain ``model.generate`` on the same batch.

Both sample (same temperature, top-p and top-k) the same number of tokens per row: EOS is off in our loop
(``eos_ids=()``) and ``min_new_tokens=max_new_tokens`` in ``generate``, so neither stops early and the
tokens/s compare like with like. Each side runs ``repeats`` times after one warm-up, the two taking turns;
the median counts.

``early_stop_throughput`` measures what finished rows cost: rows end at random lengths (a set of token ids
made to act as EOS), generated once with rows leaving the batch when at least half has finished (the
shipped setting) and once with finished rows kept in the batch (masking alone).

python -m benchmarks.generation       # prints both on the tiny Qwen2 model and a wider one
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

import torch
from torch import nn

from kfp_components.trainer.rollout import HFRollouts, SamplingOptions


def _prompts(batch_size: int, prompt_tokens: int, vocab: int, seed: int) -> list[list[int]]:
    """Prompts of varied length (half to full ``prompt_tokens``), so left padding is exercised."""
    rng = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, prompt_tokens // 2), prompt_tokens + 1, (batch_size,), generator=rng)
    return [torch.randint(0, vocab, (int(n),), generator=rng).tolist() for n in lengths]


def _median_seconds(runs: dict[str, Any], repeats: int) -> dict[str, float]:
    """The median wall time of each run, the runs taking turns (so a busy machine slows them alike)."""
    for run in runs.values():
        run()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def generation_throughput(
    model: nn.Module,
    tokenizer: Any,
    *,
    batch_size: int = 16,
    prompt_tokens: int = 32,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """Tokens/s of our loop and of ``model.generate``, sampling the same batch for the same length."""
    device = next(model.parameters()).device
    vocab = int(model.get_input_embeddings().weight.shape[0])
    prompts = _prompts(batch_size, prompt_tokens, vocab, seed)
    options = SamplingOptions(
        temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, num_generations=1
    )
    ours = HFRollouts(model, tokenizer, device, eos_ids=())

    def run_ours() -> None:
        completions = ours.generate(prompts, options, [seed + i for i in range(len(prompts))])
        assert all(len(c.completion_ids) == max_new_tokens for c in completions)

    width = max(len(p) for p in prompts)
    pad = ours.pad_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)

    def run_generate() -> None:
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(  # type: ignore[operator]
                input_ids=input_ids,
                attention_mask=attention,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                pad_token_id=pad,
            )
        assert out.shape[1] == width + max_new_tokens

    model.eval()
    tokens = batch_size * max_new_tokens
    seconds = _median_seconds({"ours": run_ours, "generate": run_generate}, repeats)
    ours_s, generate_s = seconds["ours"], seconds["generate"]
    return {
        "batch_size": batch_size,
        "prompt_tokens_max": width,
        "max_new_tokens": max_new_tokens,
        "ours_tokens_per_second": tokens / ours_s,
        "generate_tokens_per_second": tokens / generate_s,
        "ours_over_generate": generate_s / ours_s,
    }


def early_stop_throughput(
    model: nn.Module,
    tokenizer: Any,
    *,
    batch_size: int = 32,
    prompt_tokens: int = 32,
    max_new_tokens: int = 128,
    stop_share: float = 0.02,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """Our loop with rows ending at random lengths (``stop_share`` of the vocabulary acts as EOS): rows
    leaving the batch at half finished (shipped) against finished rows kept in the batch (masking)."""
    device = next(model.parameters()).device
    vocab = int(model.get_input_embeddings().weight.shape[0])
    prompts = _prompts(batch_size, prompt_tokens, vocab, seed)
    stops = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[: int(vocab * stop_share)]
    options = SamplingOptions(max_new_tokens=max_new_tokens, num_generations=1)
    result: dict[str, float] = {"batch_size": batch_size, "max_new_tokens": max_new_tokens}
    runs: dict[str, Any] = {}
    lengths: dict[str, list[int]] = {}
    for label, share in (("compact_at_half", 0.5), ("mask_only", 0.0)):
        rollouts = HFRollouts(
            model, tokenizer, device, eos_ids=stops.tolist(), compact_when_active_share=share
        )

        def run(rollouts: HFRollouts = rollouts, label: str = label) -> None:
            completions = rollouts.generate(prompts, options, [seed + i for i in range(len(prompts))])
            lengths[label] = [len(c.completion_ids) for c in completions]

        runs[label] = run
    seconds = _median_seconds(runs, repeats)
    for label, value in seconds.items():
        result[f"{label}_seconds"] = value
        result[f"{label}_mean_completion_tokens"] = statistics.mean(lengths[label])
        result[f"{label}_tokens_per_second"] = sum(lengths[label]) / value
    return result


#: A model large enough on a CPU for the batch size to weigh on a step (the tiny test model's step is mostly
#: fixed per-call cost).
WIDER_MODEL = {
    "hidden_size": 512,
    "num_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 1408,
}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kfp_components.testing.tiny_model import tiny_model_path

    for label, overrides in (("tiny", {}), ("wider", WIDER_MODEL)):
        path = tiny_model_path("qwen2", **overrides)
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        result = {
            "model": label,
            "generate": generation_throughput(model, tokenizer, repeats=5),
            "early_stop": early_stop_throughput(model, tokenizer, repeats=5),
        }
        print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
