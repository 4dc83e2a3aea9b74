"""Tests for ``kfp_components.trainer.batching``: token-budget step plans and padding-free packing."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from kfp_components.trainer.batching import (
    IGNORE_INDEX,
    MicroBatch,
    StepPlan,
    TokenBudgetSampler,
    collate,
    dummy_micro_batch,
    packing_efficiency,
    shifted_label_count,
)


@dataclass
class Sample:
    """Stands in for the tokenizer stage's ``TokenizedSample``: the collator only needs these two fields."""

    input_ids: list[int]
    labels: list[int]


def make_sample(rng: random.Random, length: int, vocab_size: int = 1000) -> Sample:
    """Random tokens; the labels mask a random prompt prefix and a few scattered tokens."""
    input_ids = [rng.randrange(vocab_size) for _ in range(length)]
    prompt = rng.randrange(length)
    labels = [
        IGNORE_INDEX if position < prompt or rng.random() < 0.2 else token
        for position, token in enumerate(input_ids)
    ]
    return Sample(input_ids, labels)


def long_tailed_lengths(count: int, seed: int = 0, longest: int = 500) -> list[int]:
    rng = random.Random(seed)
    return [min(longest, max(1, int(rng.lognormvariate(3.5, 1.0)))) for _ in range(count)]


def rank_plans(lengths: list[int], label_counts: list[int], epoch: int = 0, **kwargs) -> list[list[StepPlan]]:
    """The plan of every rank for one epoch."""
    world_size = kwargs.pop("world_size", 1)
    return [
        TokenBudgetSampler(lengths, label_counts, world_size=world_size, rank=rank, **kwargs).epoch_plan(
            epoch
        )
        for rank in range(world_size)
    ]


# --------------------------------------------------------------------------------------------------------
# Plan invariants
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("world_size", "budget", "batch", "drop_last"),
    [(1, 600, 32, False), (3, 500, 50, False), (8, 1024, 64, True), (4, 500, 7, False)],
)
def test_plan_invariants(world_size: int, budget: int, batch: int, drop_last: bool) -> None:
    lengths = long_tailed_lengths(1000)
    label_counts = [length // 2 for length in lengths]
    plans = rank_plans(
        lengths,
        label_counts,
        effective_batch_size=batch,
        max_tokens_per_gpu=budget,
        world_size=world_size,
        drop_last=drop_last,
    )
    steps = len(plans[0])
    assert steps == (len(lengths) // batch if drop_last else -(-len(lengths) // batch))
    seen: Counter[int] = Counter()
    for step in range(steps):
        per_rank = [plans[rank][step] for rank in range(world_size)]
        # Every rank agrees on the global figures and runs the same number of micro-batches (at least one).
        assert len({(p.global_samples, p.global_tokens, p.global_label_tokens) for p in per_rank}) == 1
        assert len({len(p.micro_batches) for p in per_rank}) == 1
        assert len(per_rank[0].micro_batches) >= 1
        step_samples = [i for p in per_rank for indices in p.micro_batches for i in indices]
        seen.update(step_samples)
        last = step == steps - 1 and not drop_last
        assert len(step_samples) == per_rank[0].global_samples
        assert len(step_samples) == batch or (last and len(step_samples) == len(lengths) - step * batch)
        assert per_rank[0].global_tokens == sum(lengths[i] for i in step_samples)
        assert per_rank[0].global_label_tokens == sum(label_counts[i] for i in step_samples)
        for p in per_rank:
            for indices in p.micro_batches:
                assert sum(lengths[i] for i in indices) <= budget
        # Greedy longest-first balancing: the ranks' token loads differ by at most one sample's length.
        loads = [sum(lengths[i] for indices in p.micro_batches for i in indices) for p in per_rank]
        assert max(loads) - min(loads) <= max(lengths[i] for i in step_samples)
    assert max(seen.values()) == 1
    if drop_last:
        assert len(seen) == steps * batch
    else:
        assert sorted(seen) == list(range(len(lengths)))


def test_global_label_tokens_match_collated_targets() -> None:
    rng = random.Random(3)
    samples = [make_sample(rng, rng.randint(1, 60)) for _ in range(40)]
    plans = [
        TokenBudgetSampler.from_samples(
            samples, effective_batch_size=16, max_tokens_per_gpu=128, world_size=2, rank=rank
        ).epoch_plan(0)
        for rank in (0, 1)
    ]
    for step in zip(*plans, strict=True):
        collated = [collate(samples, mb) for plan in step for mb in plan.micro_batches if mb]
        assert step[0].global_label_tokens == sum(mb.num_label_tokens for mb in collated)
        assert step[0].global_label_tokens == sum(int((mb.targets != IGNORE_INDEX).sum()) for mb in collated)
        assert step[0].global_tokens == sum(mb.num_tokens for mb in collated)


def test_plan_is_deterministic_per_seed_and_epoch() -> None:
    lengths = long_tailed_lengths(300)
    counts = [0] * len(lengths)
    kwargs = {"effective_batch_size": 16, "max_tokens_per_gpu": 512, "world_size": 2, "rank": 1}

    def order(epoch: int, **overrides) -> list[int]:
        plan = TokenBudgetSampler(lengths, counts, **{**kwargs, **overrides}).epoch_plan(epoch)
        return [i for step in plan for indices in step.micro_batches for i in indices]

    assert order(0) == order(0)
    assert order(1) == order(1)
    assert order(0) != order(1)
    assert order(0) != order(0, seed=1)
    # Without shuffling, step k holds samples k*B .. (k+1)*B - 1, and every epoch is the same.
    unshuffled = TokenBudgetSampler(lengths, counts, **kwargs, shuffle=False)
    for step, plan in enumerate(unshuffled.epoch_plan(5)):
        rank_samples = {i for indices in plan.micro_batches for i in indices}
        assert rank_samples <= set(range(step * 16, (step + 1) * 16))
    assert order(0, shuffle=False) == order(3, shuffle=False)


def test_state_dict_round_trip_resumes_exactly() -> None:
    lengths = long_tailed_lengths(100)
    counts = [1] * len(lengths)
    kwargs = {"effective_batch_size": 16, "max_tokens_per_gpu": 512, "seed": 7}
    reference = TokenBudgetSampler(lengths, counts, **kwargs)
    expected = [(epoch, step) for epoch in range(3) for step in reference.epoch_plan(epoch)]

    sampler = TokenBudgetSampler(lengths, counts, **kwargs)
    taken: list[tuple[int, StepPlan]] = []
    while sampler.epoch < 3:
        for step in sampler:
            taken.append((sampler.epoch, step))
            if len(taken) in (5, 7, 14):  # Mid-epoch, at the end of an epoch (7 steps each) and at the start.
                state = sampler.state_dict()
                sampler = TokenBudgetSampler(lengths, counts, **kwargs)
                sampler.load_state_dict(state)
                break
    assert taken == expected
    assert sampler.state_dict()["epoch"] == 3 and sampler.state_dict()["step"] == 0

    # A saved position after the last step of an epoch points at the next epoch.
    sampler = TokenBudgetSampler(lengths, counts, **kwargs)
    for _ in zip(range(7), sampler, strict=False):
        pass
    assert (sampler.state_dict()["epoch"], sampler.state_dict()["step"]) == (1, 0)

    # Another world size or budget may resume the same data order; another seed or dataset may not.
    state = TokenBudgetSampler(lengths, counts, **kwargs).state_dict()
    TokenBudgetSampler(
        lengths, counts, **{**kwargs, "max_tokens_per_gpu": 1024}, world_size=4
    ).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        TokenBudgetSampler(lengths, counts, **{**kwargs, "seed": 8}).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset_digest"):
        TokenBudgetSampler([n + 1 for n in lengths], counts, **kwargs).load_state_dict(state)


def test_over_long_sample_is_an_error_naming_it() -> None:
    lengths = [10, 20, 700, 30, 900]
    with pytest.raises(ValueError, match=r"sample 2 has 700 tokens.*max_tokens_per_gpu=512.*1 more"):
        TokenBudgetSampler(lengths, [0] * 5, effective_batch_size=2, max_tokens_per_gpu=512)
    # A sample exactly at the budget is fine and fills a micro-batch alone.
    plan = TokenBudgetSampler([512, 1], [0, 0], effective_batch_size=2, max_tokens_per_gpu=512).epoch_plan(0)
    assert sorted(map(sorted, plan[0].micro_batches)) == [[0], [1]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"effective_batch_size": 0}, "effective_batch_size"),
        ({"max_tokens_per_gpu": 0}, "max_tokens_per_gpu"),
        ({"world_size": 2, "rank": 2}, "rank"),
        ({"label_counts": [0]}, "label counts"),
        ({"label_counts": [3, 0]}, "sample 0 has 3 label tokens"),
        ({"lengths": [0, 1]}, "sample 0 is empty"),
    ],
)
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    arguments = {
        "lengths": [3, 4],
        "label_counts": [0, 0],
        "effective_batch_size": 2,
        "max_tokens_per_gpu": 8,
    }
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        TokenBudgetSampler(arguments.pop("lengths"), arguments.pop("label_counts"), **arguments)


def test_more_ranks_than_samples_pads_with_dummy_micro_batches() -> None:
    plans = rank_plans([5, 6, 7], [1, 1, 1], effective_batch_size=3, max_tokens_per_gpu=8, world_size=4)
    assert [len(plan) for plan in plans] == [1, 1, 1, 1]
    assert sorted(len(plan[0].micro_batches[0]) for plan in plans) == [0, 1, 1, 1]


def test_packing_efficiency() -> None:
    lengths = [6, 5, 4, 3, 2]
    sampler = TokenBudgetSampler(
        lengths, [0] * 5, effective_batch_size=5, max_tokens_per_gpu=10, shuffle=False
    )
    plan = sampler.epoch_plan(0)
    assert plan[0].micro_batches == [[0, 2], [1, 3, 4]]  # First-fit decreasing: 6+4, 5+3+2.
    stats = packing_efficiency(plan, lengths, 10)
    assert (stats.steps, stats.micro_batches, stats.dummy_micro_batches, stats.tokens) == (1, 2, 0, 20)
    assert stats.budget_fill == 1.0
    both = stats + packing_efficiency([StepPlan([[0], []], 0, 1, 6)], lengths, 10)
    assert (both.micro_batches, both.dummy_micro_batches, both.tokens) == (4, 1, 26)


# --------------------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------------------


def test_shifted_label_count() -> None:
    assert shifted_label_count([5, 6, 7]) == 2  # The first token is never predicted.
    assert shifted_label_count([IGNORE_INDEX, 6, IGNORE_INDEX, 8]) == 2
    assert shifted_label_count([5]) == 0
    assert shifted_label_count([]) == 0


def test_collate_shifts_targets_within_each_sample() -> None:
    samples = [
        Sample([10, 11, 12, 13], [-100, -100, 12, 13]),
        Sample([20], [20]),
        Sample([30, 31, 32], [30, 31, 32]),
        Sample([40, 41], [-100, -100]),
    ]
    mb = collate(samples, [2, 0, 1, 3])
    assert mb.input_ids.tolist() == [[30, 31, 32, 10, 11, 12, 13, 20, 40, 41]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 0, 1]]
    assert mb.targets.tolist() == [[31, 32, -100, -100, 12, 13, -100, -100, -100, -100]]
    assert (mb.num_samples, mb.num_tokens, mb.num_label_tokens) == (4, 10, 4)
    assert mb.num_label_tokens == sum(shifted_label_count(samples[i].labels) for i in (2, 0, 1, 3))
    assert mb.sample_indices == [2, 0, 1, 3]
    assert all(
        t.dtype == torch.long and t.shape == (1, 10) for t in (mb.input_ids, mb.position_ids, mb.targets)
    )
    assert not mb.is_dummy


def test_collate_never_targets_across_a_boundary() -> None:
    rng = random.Random(0)
    samples = [make_sample(rng, rng.randint(1, 30)) for _ in range(50)]
    indices = list(range(50))
    rng.shuffle(indices)
    mb = collate(samples, indices)
    targets, positions = mb.targets[0].tolist(), mb.position_ids[0].tolist()
    offset = 0
    for index in indices:
        sample = samples[index]
        n = len(sample.input_ids)
        assert positions[offset : offset + n] == list(range(n))
        assert targets[offset : offset + n] == [*sample.labels[1:], IGNORE_INDEX]
        offset += n
    assert offset == mb.num_tokens


def test_collate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="dummy_micro_batch"):
        collate([Sample([1], [1])], [])
    with pytest.raises(ValueError, match="sample 0 has 2 input_ids but 1 labels"):
        collate([Sample([1, 2], [1])], [0])
    with pytest.raises(ValueError, match="sample 0 is empty"):
        collate([Sample([], [])], [0])


def test_dummy_micro_batch() -> None:
    mb = dummy_micro_batch(pad_token_id=7)
    assert (
        mb.input_ids.tolist() == [[7]]
        and mb.position_ids.tolist() == [[0]]
        and mb.targets.tolist() == [[-100]]
    )
    assert (mb.num_samples, mb.num_tokens, mb.num_label_tokens, mb.sample_indices) == (0, 0, 0, [])
    assert mb.is_dummy
    assert mb.to("cpu").input_ids.tolist() == [[7]]


# --------------------------------------------------------------------------------------------------------
# Packed loss and gradients equal unpacked ones
# --------------------------------------------------------------------------------------------------------

# Distinct lengths, so the plan does not depend on the shuffle. Under a budget of 64 tokens, one rank
# packs 5 samples into 4 micro-batches (two hold several samples); two ranks get 3 micro-batches each,
# one of them a dummy.
LENGTHS = [61, 3, 28, 55, 37, 43, 8, 13]
BUDGET = 64


def _loss_and_grads(
    model: torch.nn.Module, samples: list[Sample], micro_batches: list[list[int]], scale: float, pad: int
) -> tuple[float, dict[str, torch.Tensor]]:
    """Accumulate the gradients of every micro-batch of one rank, each loss scaled as the contract says."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for indices in micro_batches:
        mb: MicroBatch = collate(samples, indices) if indices else dummy_micro_batch(pad)
        logits = model(
            input_ids=mb.input_ids, position_ids=mb.position_ids, attention_mask=None, use_cache=False
        ).logits
        loss = F.cross_entropy(
            logits.view(-1, logits.shape[-1]), mb.targets.view(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        if not indices:
            assert loss.item() == 0.0
        (loss * scale).backward()
        total += loss.item() * scale
    grads = {name: param.grad.detach().clone() for name, param in model.named_parameters()}
    return total, grads


@pytest.fixture(scope="module")
def qwen2_path():
    from kfp_components.testing.tiny_model import tiny_model_path

    return tiny_model_path(arch="qwen2", seed=0)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_loss_and_gradients_match_unpacked(qwen2_path, attn_implementation: str) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        qwen2_path, dtype=torch.float32, attn_implementation=attn_implementation
    )
    model.eval()  # No dropout: the three runs must see the same function.
    pad = model.config.pad_token_id or 0
    rng = random.Random(0)
    samples = [make_sample(rng, length, vocab_size=model.config.vocab_size) for length in LENGTHS]
    samples[1].labels = [IGNORE_INDEX] * len(samples[1].labels)  # A sample without any label token.
    global_label_tokens = sum(shifted_label_count(sample.labels) for sample in samples)
    assert global_label_tokens > 0

    def plan(world_size: int, rank: int) -> StepPlan:
        sampler = TokenBudgetSampler.from_samples(
            samples,
            effective_batch_size=len(samples),
            max_tokens_per_gpu=BUDGET,
            world_size=world_size,
            rank=rank,
        )
        (step,) = sampler.epoch_plan(0)
        assert step.global_label_tokens == global_label_tokens
        return step

    # (a) Unpacked: one sample per forward pass.
    loss_a, grads_a = _loss_and_grads(
        model, samples, [[i] for i in range(len(samples))], 1 / global_label_tokens, pad
    )

    # (b) Packed on one rank.
    step = plan(world_size=1, rank=0)
    assert 1 < len(step.micro_batches) < len(samples)
    assert sum(len(indices) > 1 for indices in step.micro_batches) >= 2
    loss_b, grads_b = _loss_and_grads(model, samples, step.micro_batches, step.loss_scale(1), pad)

    # (c) Packed on two simulated ranks; DDP averages the ranks' gradients.
    ranks = [plan(world_size=2, rank=rank) for rank in (0, 1)]
    assert any([] in step.micro_batches for step in ranks), "the plan should exercise a dummy micro-batch"
    results = [_loss_and_grads(model, samples, step.micro_batches, step.loss_scale(2), pad) for step in ranks]
    loss_c = sum(loss for loss, _ in results) / 2
    grads_c = {name: sum(grads[name] for _, grads in results) / 2 for name in grads_a}

    # The loss is the mean token loss of the global batch, around ln(vocab) for a random model.
    assert loss_a == pytest.approx(6.93, abs=0.5)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert loss_c == pytest.approx(loss_a, rel=1e-5)
    scale = max(grad.abs().max().item() for grad in grads_a.values())
    assert scale > 0
    for name, expected in grads_a.items():
        assert expected.abs().max() > 0, f"{name} has no gradient"
        for label, grads in (("packed", grads_b), ("packed on 2 ranks", grads_c)):
            error = (grads[name] - expected).abs().max().item() / scale
            assert error < 1e-5, f"{name}: {label} gradient differs by {error:.2e} of the largest gradient"
