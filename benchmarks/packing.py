"""Packing efficiency: token-budget, padding-free micro-batches against a padding collator.

Plans one epoch of a long-tailed dataset with :class:`~kfp_components.trainer.batching.TokenBudgetSampler`
for every rank and compares it with what a plain padding collator does with the same steps: each rank
takes its share of a step (round robin, as ``DistributedSampler``), cuts it into micro-batches of a fixed
number of samples (as many as fit the budget when every sample is as long as the longest allowed) and
pads each micro-batch to its longest sample. Pure planning on the CPU: no model runs.
"""

from __future__ import annotations

import math
import random
import statistics
import time

from kfp_components.trainer.batching import PackingStats, StepPlan, TokenBudgetSampler, packing_efficiency

NAME = "packing"
SAMPLES = 20_000
MIN_LENGTH, MAX_LENGTH = 16, 4096
# (effective_batch_size, max_tokens_per_gpu, world_size)
CONFIGS = [
    (128, 16_384, 1),
    (128, 16_384, 8),
    (128, 64_000, 1),
    (128, 64_000, 8),
    (1024, 16_384, 1),
    (1024, 16_384, 8),
]


def _lengths() -> list[int]:
    """Lognormal token counts (median 400, sigma 1), clipped to [16, 4096]: a long-tailed chat mix."""
    rng = random.Random(0)
    return [
        min(MAX_LENGTH, max(MIN_LENGTH, round(rng.lognormvariate(math.log(400), 1.0))))
        for _ in range(SAMPLES)
    ]


def _padded(lengths: list[int], steps: list[list[int]], budget: int, world_size: int) -> dict:
    """A padding collator: fixed-size micro-batches, each padded to its longest sample."""
    micro_batch_size = max(1, budget // MAX_LENGTH)  # Must fit the budget even when every sample is longest.
    micro_batches = padded_tokens = real_tokens = 0
    for step in steps:
        shares = [step[rank::world_size] for rank in range(world_size)]
        # Ranks run in lockstep: all of them run as many micro-batches as the busiest one.
        micro_batches += world_size * max(math.ceil(len(share) / micro_batch_size) for share in shares)
        for share in shares:
            for start in range(0, len(share), micro_batch_size):
                chunk = [lengths[i] for i in share[start : start + micro_batch_size]]
                padded_tokens += len(chunk) * max(chunk)
                real_tokens += sum(chunk)
    return {
        "micro_batch_size": micro_batch_size,
        "micro_batches_per_rank_step": round(micro_batches / world_size / len(steps), 2),
        "non_pad_share": round(real_tokens / padded_tokens, 3),
        "budget_fill": round(real_tokens / (micro_batches * budget), 3),
    }


def _packed(lengths: list[int], batch: int, budget: int, world_size: int) -> tuple[dict, list[list[int]]]:
    label_counts = [0] * len(lengths)  # Label counts do not affect the plan.
    stats: PackingStats | None = None
    plans: list[list[StepPlan]] = []
    plan_seconds = math.inf
    for rank in range(world_size):
        sampler = TokenBudgetSampler(
            lengths,
            label_counts,
            effective_batch_size=batch,
            max_tokens_per_gpu=budget,
            world_size=world_size,
            rank=rank,
        )
        started = time.perf_counter()
        plan = sampler.epoch_plan(0)
        plan_seconds = min(plan_seconds, time.perf_counter() - started)
        plans.append(plan)
        rank_stats = packing_efficiency(plan, lengths, budget)
        stats = rank_stats if stats is None else stats + rank_stats
    assert stats is not None
    # No packing can use fewer forward passes than ceil(step tokens / (ranks * budget)) per rank.
    lower_bound = sum(math.ceil(step.global_tokens / (world_size * budget)) for step in plans[0])
    # The samples of each step over all ranks, in dataset order (random with respect to length).
    steps = [
        sorted(i for plan in plans for indices in plan[k].micro_batches for i in indices)
        for k in range(len(plans[0]))
    ]
    packed = {
        "micro_batches_per_rank_step": round(stats.micro_batches / world_size / stats.steps, 2),
        "lower_bound_per_rank_step": round(lower_bound / stats.steps, 2),
        "budget_fill": round(stats.budget_fill, 3),
        "non_pad_share": 1.0,  # Padding-free: every computed token is a real one.
        "dummy_share": round(stats.dummy_micro_batches / stats.micro_batches, 4),
        "epoch_plan_ms": round(plan_seconds * 1000, 1),
    }
    return packed, steps


def run() -> dict:
    lengths = _lengths()
    configs = []
    for batch, budget, world_size in CONFIGS:
        packed, steps = _packed(lengths, batch, budget, world_size)
        configs.append(
            {
                "effective_batch_size": batch,
                "max_tokens_per_gpu": budget,
                "world_size": world_size,
                "steps": len(steps),
                "tokens_per_rank_step": round(sum(lengths) / len(steps) / world_size),
                "packed": packed,
                "padded": _padded(lengths, steps, budget, world_size),
            }
        )
    return {
        "samples": SAMPLES,
        "length_median": statistics.median(lengths),
        "length_mean": round(statistics.fmean(lengths)),
        "length_p99": sorted(lengths)[int(0.99 * len(lengths))],
        "length_max": max(lengths),
        "configs": configs,
    }


def render(result: dict) -> str:
    lines = [
        "## Packing efficiency",
        "",
        f"One epoch of {result['samples']:,} samples with long-tailed lengths (lognormal, clipped to "
        f"{MIN_LENGTH}..{MAX_LENGTH} tokens: median {result['length_median']:g}, mean {result['length_mean']}, "
        f"p99 {result['length_p99']}) planned by `TokenBudgetSampler`: a step's samples are balanced over the "
        "ranks by tokens, then packed first-fit decreasing into padding-free micro-batches of at most "
        "`max_tokens_per_gpu` tokens. Packed micro-batches hold no pad token at all (non-pad share 1.0). "
        "*Fill* is real tokens / (micro-batches x budget), the non-pad share of a collator that pads every "
        "micro-batch to the budget; it is bounded by how many budgets a rank's share of a step spans "
        "(*tokens/rank/step*), since the last micro-batch of a step is partly empty. *Forward passes* are "
        "micro-batches per rank and step, against the lower bound ceil(step tokens / (ranks x budget)). "
        "The padded baseline cuts each rank's round-robin share into micro-batches of budget // "
        f"{MAX_LENGTH} samples and pads each to its longest sample.",
        "",
        "| batch | budget | ranks | tokens/rank/step | packed: forward passes (bound) | packed: fill | "
        "padded: samples/mb | padded: forward passes | padded: non-pad share | padded: fill | plan (ms/epoch) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for config in result["configs"]:
        packed, padded = config["packed"], config["padded"]
        lines.append(
            f"| {config['effective_batch_size']} | {config['max_tokens_per_gpu']:,} | {config['world_size']} | "
            f"{config['tokens_per_rank_step']:,} | {packed['micro_batches_per_rank_step']} "
            f"({packed['lower_bound_per_rank_step']}) | {packed['budget_fill']} | {padded['micro_batch_size']} | "
            f"{padded['micro_batches_per_rank_step']} | {padded['non_pad_share']} | {padded['budget_fill']} | "
            f"{packed['epoch_plan_ms']} |"
        )
    return "\n".join(lines)
