"""TRPO's natural-gradient step (``kfp_components.trainer.trpo``): Fisher-vector products and conjugate gradient
against a Fisher formed exactly, the trust region after the line search, the bit-identical restore of a
rejected step, LoRA and OSFT, two gloo DDP ranks against one process, learning on a fixed advantage signal,
the memory check and the options; then ``algorithm: trpo`` in the online step, trained for real on the tiny
model: the reward rises within the trust region, a rejected step keeps the policy, LoRA, OSFT, two DDP
processes against one, resume, and the errors before training."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer import trpo
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.osft import apply_osft, osft_modules, osft_orthogonality_error
from kfp_components.trainer.trpo import (
    FisherVectorProduct,
    PolicyMicroBatch,
    check_memory,
    conjugate_gradient,
    natural_gradient_step,
    osft_projection,
)
from kfp_components.typed_config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
STEP = {"cg_iterations": 6, "cg_damping": 0.1, "line_search_steps": 10, "line_search_shrink": 0.5}


# --------------------------------------------------------------------------------------------------------
# Policies and batches
# --------------------------------------------------------------------------------------------------------


def on_policy(
    forward: Callable[[], Tensor], targets: Tensor, mask: Tensor, advantages: Tensor
) -> PolicyMicroBatch:
    """A micro-batch whose old log-probs are the current policy's."""
    with torch.no_grad():
        old = torch.log_softmax(forward(), -1).gather(-1, targets[:, None]).squeeze(-1)
    return PolicyMicroBatch(forward=forward, targets=targets, mask=mask, advantages=advantages, old_logps=old)


def softmax_policy(
    tokens: int = 24, features: int = 5, vocab: int = 4
) -> tuple[nn.Linear, Tensor, PolicyMicroBatch]:
    """A linear softmax policy in float64 on random features, its features, and one sampled micro-batch."""
    generator = torch.Generator().manual_seed(0)
    policy = nn.Linear(features, vocab).double()
    with torch.no_grad():
        for p in policy.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))
    x = torch.randn(tokens, features, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        targets = torch.multinomial(torch.softmax(policy(x), -1), 1, generator=generator).squeeze(-1)
    mask = torch.ones(tokens, dtype=torch.bool)
    mask[-3:] = False  # tokens without loss count nowhere
    advantages = torch.randn(tokens, generator=generator, dtype=torch.float64)
    return policy, x, on_policy(lambda: policy(x), targets, mask, torch.where(mask, advantages, 0.0))


def load_lm(dtype: torch.dtype = torch.float32) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path("qwen2"), dtype=dtype)
    model.eval()  # no dropout: TRPO compares separate forwards
    return model


def lm_batches(
    model: nn.Module, micro_batches: int = 2, rows: int = 2, length: int = 12, prompt: int = 5, seed: int = 0
) -> list[PolicyMicroBatch]:
    """Micro-batches of ``rows`` rows of random tokens each (the first ``prompt`` tokens of a row are its
    prompt), advantages +1 and -1 by row."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(micro_batches):
        ids = torch.randint(0, 1000, (rows, length), generator=generator)
        targets = torch.cat([ids[:, 1:], torch.zeros(rows, 1, dtype=torch.long)], 1)
        mask = torch.zeros(rows, length, dtype=torch.bool)
        mask[:, prompt - 1 : length - 1] = True
        advantages = torch.where(mask, (torch.arange(rows) % 2 * -2 + 1)[:, None].float(), 0.0)

        def forward(ids: Tensor = ids) -> Tensor:
            return model(input_ids=ids).logits.flatten(0, 1)

        batches.append(on_policy(forward, targets.flatten(), mask.flatten(), advantages.flatten()))
    return batches


def loss_tokens(batches: list[PolicyMicroBatch]) -> int:
    return sum(int(b.mask.sum()) for b in batches)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def measured(batches: list[PolicyMicroBatch], old_logits: list[Tensor]) -> tuple[float, float]:
    """Mean KL(old || now) per loss token from full logits, and the surrogate mean(A * ratio), computed
    here without the module's code."""
    kl, surrogate = 0.0, 0.0
    for batch, old in zip(batches, old_logits, strict=True):
        old_lp, new_lp = torch.log_softmax(old.double(), -1), torch.log_softmax(batch.forward().double(), -1)
        per_token = (old_lp.exp() * (old_lp - new_lp)).sum(-1)
        kl += float(per_token[batch.mask].sum())
        logp = new_lp.gather(-1, batch.targets[:, None]).squeeze(-1)
        ratio = torch.exp(logp - batch.old_logps.double())
        surrogate += float((batch.advantages.double() * ratio)[batch.mask].sum())
    n = loss_tokens(batches)
    return kl / n, surrogate / n


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------------
# Fisher-vector products and CG against an exact Fisher
# --------------------------------------------------------------------------------------------------------


def test_fisher_vector_product_and_cg_solution_match_the_exact_fisher_of_a_softmax_policy():
    policy, x, batch = softmax_policy()
    params = list(policy.parameters())  # weight (4 x 5), bias (4): 24 numbers
    n = loss_tokens([batch])
    damping = 0.05

    # The Fisher by hand: F = sum over loss tokens of J^T (diag p - p p^T) J / n, J = d logits / d theta.
    probs = torch.softmax(policy(x), -1).detach()
    fisher = torch.zeros(24, 24, dtype=torch.float64)
    gradient = torch.zeros(24, dtype=torch.float64)
    for t in torch.nonzero(batch.mask).flatten().tolist():
        jacobian = torch.cat([torch.kron(torch.eye(4, dtype=torch.float64), x[t][None]), torch.eye(4)], 1)
        p = probs[t]
        fisher += jacobian.T @ (torch.diag(p) - torch.outer(p, p)) @ jacobian / n
        # d/dtheta of A ratio = A * ratio * d logp(y)/d theta, ratio 1 at theta_old
        gradient += (
            batch.advantages[t] * jacobian.T @ (torch.eye(4, dtype=torch.float64)[batch.targets[t]] - p) / n
        )
    damped = fisher + damping * torch.eye(24, dtype=torch.float64)

    product = FisherVectorProduct(params, [batch], normaliser=n, damping=damping)
    v = torch.randn(24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(product(v), damped @ v, rtol=1e-10, atol=1e-12)

    # The same product over two micro-batches (each forward recomputed per product) and reduced by a hook.
    halves = [
        PolicyMicroBatch(lambda part=part: policy(x[part]), *(t[part] for t in fields))
        for part in (slice(0, 10), slice(10, None))
        for fields in [(batch.targets, batch.mask, batch.advantages, batch.old_logps)]
    ]
    calls = []
    split = FisherVectorProduct(
        params, halves, normaliser=n, damping=damping, reduce=lambda t: calls.append(1) or t
    )
    torch.testing.assert_close(split(v), damped @ v, rtol=1e-10, atol=1e-12)
    assert len(calls) == 1  # one reduce per product, whatever the number of micro-batches

    solution, residual, iterations = conjugate_gradient(product, gradient, iterations=24)
    # CG stops once its residual is below 1e-5 of |g| (CG_RELATIVE_TOLERANCE is the square of that).
    true_residual = gradient - damped @ solution
    assert float(true_residual.norm()) <= 1e-5 * float(gradient.norm())
    torch.testing.assert_close(residual, true_residual, rtol=0, atol=1e-12)
    exact = torch.linalg.solve(damped, gradient)
    assert float((solution - exact).norm()) <= 1e-3 * float(exact.norm())
    assert iterations < 24
    # Fewer iterations leave a larger residual: the tolerance, not the iteration count, ended the solve.
    _, early, _ = conjugate_gradient(product, gradient, iterations=3)
    assert float(early.norm()) > 1e-3 * float(gradient.norm())


def test_fisher_vector_product_equals_the_hessian_of_the_kl_on_lora_parameters_of_a_causal_lm():
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=1, target_modules=["q_proj"], layers_to_transform=[0], init_lora_weights=False)
    model = get_peft_model(load_lm(torch.float64), lora)
    model.eval()
    params = trainable(model)
    sizes = [p.numel() for p in params]
    assert sum(sizes) == 128  # A (1 x 64) and B (64 x 1) of one layer's q_proj
    batches = lm_batches(model, micro_batches=1, rows=2)
    n = loss_tokens(batches)

    # H: the Hessian of the mean KL(old || theta) over the LoRA numbers, by torch.autograd.functional.
    old = [torch.log_softmax(b.forward(), -1).detach() for b in batches]
    names = [name for name, p in model.named_parameters() if p.requires_grad]

    def mean_kl(flat: Tensor) -> Tensor:
        parts = [part.view(p.shape) for part, p in zip(flat.split(sizes), params, strict=True)]
        values = dict(zip(names, parts, strict=True))
        total = flat.new_zeros(())
        for batch, old_lp in zip(batches, old, strict=True):
            ids = batch.forward.__defaults__[0]  # type: ignore[attr-defined]
            logits = torch.func.functional_call(model, values, (), {"input_ids": ids}).logits.flatten(0, 1)
            per_token = (old_lp.exp() * (old_lp - torch.log_softmax(logits, -1))).sum(-1)
            total = total + per_token[batch.mask].sum()
        return total / n

    theta = torch.cat([p.detach().reshape(-1) for p in params])
    with trpo.twice_differentiable_attention():
        hessian = torch.autograd.functional.hessian(mean_kl, theta)
    damping = 0.01
    product = FisherVectorProduct(params, batches, normaliser=n, damping=damping)
    v = torch.randn(128, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = hessian @ v + damping * v
    # Equal up to rounding (Qwen2's RMSNorm computes in float32 even in a float64 model: ~1e-8 here).
    assert float((product(v) - expected).norm()) < 1e-6 * float(expected.norm())

    g = torch.randn(128, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    solution, _, _ = conjugate_gradient(product, g, iterations=60)
    damped = hessian + damping * torch.eye(128, dtype=torch.float64)
    assert float((damped @ solution - g).norm()) <= 2e-5 * float(g.norm())  # CG's tolerance: 1e-5 of |g|


# --------------------------------------------------------------------------------------------------------
# The step: trust region, line search, restore
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_kl", [0.01, 0.001])
def test_a_step_keeps_the_measured_kl_within_max_kl_and_improves_the_surrogate(max_kl):
    model = load_lm()
    batches = lm_batches(model)
    with torch.no_grad():
        old_logits = [b.forward().clone() for b in batches]
    kl_before, surrogate_before = measured(batches, old_logits)
    assert kl_before == pytest.approx(0, abs=1e-9)

    result = natural_gradient_step(
        trainable(model), batches, normaliser=loss_tokens(batches), max_kl=max_kl, **STEP
    )

    kl_after, surrogate_after = measured(batches, old_logits)
    assert result.accepted
    assert 0 < kl_after <= max_kl
    # The step is scaled to the trust region by the KL's curvature (not the damped one, which left this
    # model's step at 1/30 of max_kl): the accepted step uses a good part of it.
    assert kl_after > 0.25 * max_kl
    assert result.kl == pytest.approx(kl_after, rel=1e-3)
    assert surrogate_after > surrogate_before
    assert result.actual_improvement == pytest.approx(surrogate_after - surrogate_before, rel=1e-3)
    assert result.expected_improvement > 0 and result.cg_iterations == 6
    # The full step reaches the border of the quadratic model; the accepted one is a fraction of it.
    assert result.step_fraction == 0.5**result.backtracks
    assert set(result.metrics()) >= {"trpo_accepted", "trpo_kl", "trpo_step_fraction", "trpo_cg_residual"}


def test_a_step_no_candidate_of_which_improves_leaves_every_parameter_bit_identical():
    # A policy whose surrogate peaks just past the current parameter: the full trust-region step jumps far
    # over the peak, and two candidates are all the line search may try.
    w = nn.Parameter(torch.tensor([0.9]))
    other = nn.Parameter(torch.tensor([0.3, -0.2]))
    targets = torch.zeros(4, dtype=torch.long)

    def forward() -> Tensor:
        first = -5 * (w - 1) ** 2 + 0 * other.sum()
        return torch.stack([first, other[:1], other[1:]], -1).expand(4, 3)

    batch = on_policy(forward, targets, torch.ones(4, dtype=torch.bool), torch.ones(4))
    before = [w.detach().clone(), other.detach().clone()]
    result = natural_gradient_step(
        [w, other],
        [batch],
        normaliser=4,
        max_kl=50.0,
        cg_iterations=5,
        cg_damping=0.0,
        line_search_steps=2,
        line_search_shrink=0.9,
    )
    assert not result.accepted and result.backtracks == 2 and result.step_fraction == 0
    assert torch.equal(w.detach(), before[0]) and torch.equal(other.detach(), before[1])
    # With a line search long enough to come back below the peak, the same step is accepted.
    accepted = natural_gradient_step(
        [w, other],
        [batch],
        normaliser=4,
        max_kl=50.0,
        cg_iterations=5,
        cg_damping=0.0,
        line_search_steps=40,
        line_search_shrink=0.7,
    )
    assert accepted.accepted and accepted.backtracks > 2


def test_a_rejected_step_of_a_causal_lm_restores_the_model_bit_identically():
    model = load_lm()
    batches = lm_batches(model)
    before = snapshot(model)
    # max_kl so small that no candidate's KL (float32 rounding included) is within it while also improving.
    result = natural_gradient_step(
        trainable(model),
        batches,
        normaliser=loss_tokens(batches),
        max_kl=1e-30,
        cg_iterations=3,
        cg_damping=0.1,
        line_search_steps=3,
        line_search_shrink=0.5,
    )
    assert not result.accepted
    after = snapshot(model)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_the_engines_packed_micro_batch_takes_the_step_of_separate_rows():
    from kfp_components.trainer.batching import collate
    from kfp_components.trainer.policy_gradient import packed_sequence_ids, token_logps_and_entropy
    from kfp_components.trainer.tokenize import IGNORE_INDEX, TokenizedSample

    generator = torch.Generator().manual_seed(4)
    rows = [torch.randint(0, 1000, (length,), generator=generator).tolist() for length in (9, 13)]
    prompts = (4, 6)
    samples = [
        TokenizedSample(input_ids=ids, labels=[IGNORE_INDEX] * p + ids[p:])
        for ids, p in zip(rows, prompts, strict=True)
    ]
    advantage = {0: 1.0, 1: -0.5}
    temperature = 0.7

    def step(packed: bool) -> dict[str, Tensor]:
        model = load_lm()
        micro = [collate(samples, [0, 1])] if packed else [collate(samples, [0]), collate(samples, [1])]
        indices = [[0, 1]] if packed else [[0], [1]]
        batches = []
        for mb, completions in zip(micro, indices, strict=True):
            ids = packed_sequence_ids(mb.position_ids, mb.targets, completions)
            with torch.no_grad():
                logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False).logits
                old = token_logps_and_entropy(
                    logits, mb.targets, temperature=temperature, with_entropy=False
                )[0]
            advantages = torch.tensor([advantage.get(int(i), 0.0) for i in ids])
            batches.append(
                trpo.packed_micro_batch(
                    model, mb, ids, advantages, old, temperature=temperature, device=torch.device("cpu")
                )
            )
        assert loss_tokens(batches) == 5 + 7
        result = natural_gradient_step(trainable(model), batches, normaliser=12, max_kl=0.01, **STEP)
        assert result.accepted
        return snapshot(model)

    packed, separate = step(packed=True), step(packed=False)
    for name, value in separate.items():
        torch.testing.assert_close(packed[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_zero_advantages_give_no_step():
    model = load_lm()
    batches = [
        PolicyMicroBatch(b.forward, b.targets, b.mask, torch.zeros_like(b.advantages), b.old_logps)
        for b in lm_batches(model, micro_batches=1)
    ]
    before = snapshot(model)
    result = natural_gradient_step(
        trainable(model), batches, normaliser=loss_tokens(batches), max_kl=0.01, **STEP
    )
    assert not result.accepted and result.gradient_norm == 0 and result.cg_iterations == 0
    assert all(torch.equal(value, snapshot(model)[name]) for name, value in before.items())


def test_bad_step_arguments_are_refused():
    policy, _, batch = softmax_policy()
    for bad in ({"max_kl": 0.0}, {"max_kl": -0.1}, {"line_search_shrink": 1.0}, {"cg_iterations": 0}):
        arguments = {"max_kl": 0.01, **STEP, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            natural_gradient_step(list(policy.parameters()), [batch], normaliser=21, **arguments)


# --------------------------------------------------------------------------------------------------------
# LoRA and OSFT
# --------------------------------------------------------------------------------------------------------


def test_lora_step_moves_only_the_adapters():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_lm(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.eval()
    batches = lm_batches(model)
    before = snapshot(model)
    result = natural_gradient_step(
        trainable(model), batches, normaliser=loss_tokens(batches), max_kl=0.01, **STEP
    )
    assert result.accepted
    after = snapshot(model)
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all("lora_" in name for name in moved)
    # B starts at 0, so A's gradient and Fisher block are 0 (up to rounding: A moves by float noise at most)
    change = {name: float((after[name] - before[name]).abs().max()) for name in moved}
    assert min(v for k, v in change.items() if "lora_B" in k) > 1e-4
    assert max((v for k, v in change.items() if "lora_A" in k), default=0.0) < 1e-6


@pytest.mark.parametrize("projected", [True, False])
def test_osft_step_stays_out_of_the_frozen_subspace(projected):
    model = load_lm()
    apply_osft(model, unfreeze_rank_ratio=0.25)
    frozen = {
        f"{n}.{f}": getattr(m, f).clone()
        for n, m in osft_modules(model).items()
        for f in ("U_h", "S_h", "V_h")
    }
    batches = lm_batches(model)
    params = trainable(model)
    result = natural_gradient_step(
        params,
        batches,
        normaliser=loss_tokens(batches),
        max_kl=0.05,
        project=osft_projection(model, params) if projected else None,
        **STEP,
    )
    assert result.accepted
    error = osft_orthogonality_error(model)
    if projected:
        assert error < 1e-5
        for name, module in osft_modules(model).items():
            for factor in ("U_h", "S_h", "V_h"):
                assert torch.equal(getattr(module, factor), frozen[f"{name}.{factor}"])
    else:  # the check can fail: without the projection the same step leaks into the frozen directions
        assert error > 1e-4


# --------------------------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------------------------


def test_repeated_steps_move_probability_to_the_positive_advantage_token():
    model = load_lm()
    prompt = torch.randint(0, 1000, (6,), generator=torch.Generator().manual_seed(5))
    good, bad = 5, 7
    completions = [good, bad, 9, 11]
    advantages = [1.0, -1.0, -0.5, 0.5]

    def probabilities() -> Tensor:
        with torch.no_grad():
            return torch.softmax(model(input_ids=prompt[None]).logits[0, -1], -1)

    start = probabilities()
    ids = torch.cat([prompt.expand(4, 6), torch.tensor(completions)[:, None]], 1)
    targets = torch.cat([ids[:, 1:], torch.zeros(4, 1, dtype=torch.long)], 1).flatten()
    mask = torch.zeros(4, 7, dtype=torch.bool)
    mask[:, 5] = True  # the completion token, predicted at the prompt's last position
    per_token = torch.where(mask, torch.tensor(advantages)[:, None], 0.0).flatten()
    results = []
    for _ in range(5):
        batch = on_policy(
            lambda: model(input_ids=ids).logits.flatten(0, 1), targets, mask.flatten(), per_token
        )
        results.append(natural_gradient_step(trainable(model), [batch], normaliser=4, max_kl=0.02, **STEP))
    end = probabilities()
    assert all(r.accepted and r.kl <= 0.02 for r in results)
    assert float(end[good]) > 3 * float(start[good])
    assert float(end[bad]) < float(start[bad])
    assert float(end[good]) > float(end[11]) > float(start[11])


# --------------------------------------------------------------------------------------------------------
# Two gloo DDP ranks
# --------------------------------------------------------------------------------------------------------

TWO_RANKS = """
import sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
sys.path.insert(0, {tests!r})
from test_trainer_trpo import STEP, load_lm, lm_batches, loss_tokens, trainable
from kfp_components.trainer.distributed import all_reduce_sum, unwrap
from kfp_components.trainer.trpo import PolicyMicroBatch, natural_gradient_step
dist.init_process_group("gloo")
rank = dist.get_rank()
model = DistributedDataParallel(load_lm(), broadcast_buffers=False)
batches = lm_batches(unwrap(model), micro_batches=3)  # the forwards call the module inside DDP
mine = batches[rank::2]  # rank 0: two micro-batches, rank 1: one
result = natural_gradient_step(
    trainable(model), mine, normaliser=loss_tokens(batches), max_kl=0.01, reduce=all_reduce_sum, **STEP
)
# Then a step where rank 1 has nothing to learn from: one micro-batch without loss tokens (a dummy).
other = DistributedDataParallel(load_lm(), broadcast_buffers=False)
every = lm_batches(unwrap(other), micro_batches=3)
empty = [PolicyMicroBatch(b.forward, b.targets, torch.zeros_like(b.mask), b.advantages, b.old_logps) for b in every[:1]]
alone = natural_gradient_step(
    trainable(other), every if rank == 0 else empty, normaliser=loss_tokens(every), max_kl=0.01,
    reduce=all_reduce_sum, **STEP
)
if rank == 0:
    torch.save({{"params": {{n: p.detach() for n, p in unwrap(model).named_parameters()}},
                "result": result.metrics(),
                "alone": {{n: p.detach() for n, p in unwrap(other).named_parameters()}}}}, {out!r})
dist.destroy_process_group()
"""


def test_two_gloo_ddp_ranks_take_the_step_of_one_process_also_with_an_empty_rank(tmp_path):
    out = tmp_path / "rank0.pt"
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS.format(tests=str(ROOT / "tests"), out=str(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run([*command, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    two = torch.load(out)

    model = load_lm()
    batches = lm_batches(model, micro_batches=3)
    one = natural_gradient_step(
        trainable(model), batches, normaliser=loss_tokens(batches), max_kl=0.01, **STEP
    )
    assert one.accepted and two["result"]["trpo_accepted"] == 1.0
    assert two["result"]["trpo_step_fraction"] == one.step_fraction
    assert two["result"]["trpo_kl"] == pytest.approx(one.kl, rel=1e-4)
    for name, value in model.named_parameters():
        torch.testing.assert_close(two["params"][name], value.detach(), rtol=1e-5, atol=1e-6, msg=name)
        # rank 0 with every micro-batch and rank 1 with an empty one: the same step again
        torch.testing.assert_close(two["alone"][name], value.detach(), rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------------------------------------
# Memory and options
# --------------------------------------------------------------------------------------------------------


def test_memory_check_counts_the_vectors_and_suggests_lora():
    model = load_lm()
    params = trainable(model)
    count = sum(p.numel() for p in params)
    assert check_memory(params, torch.device("cpu"), available=10**12) == trpo.VECTORS * count * 4
    with pytest.raises(ConfigError) as caught:
        check_memory(params, torch.device("cpu"), available=trpo.VECTORS * count * 4 - 1)
    message = str(caught.value)
    assert (
        caught.value.path == "lora_r" and f"{count:,} trainable parameters" in message and "LoRA" in message
    )
    assert trpo.available_memory_bytes(torch.device("cpu")) > 0


def config(**options: object) -> TrainingConfig:
    base: dict[str, object] = {
        "model_name_or_path": "m",
        "data_path": "d.jsonl",
        "output_dir": "o",
        "algorithm": "trpo",
        "reward_functions": ["exact_match"],
        "distributed": "ddp",
        "max_seq_len": 512,
        "max_tokens_per_gpu": 512,
        "max_new_tokens": 64,
    }
    return TrainingConfig(**{**base, **options})  # type: ignore[arg-type]


def problems(**options: object) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        config(**options).validate()
    return dict(caught.value.problems)


@pytest.mark.parametrize(
    ("options", "key", "text"),
    [
        ({"max_kl": 0.0}, "max_kl", "must be positive"),
        ({"max_kl": -0.5}, "max_kl", "must be positive"),
        ({"line_search_shrink": 1.0}, "line_search_shrink", "(0, 1)"),
        ({"line_search_shrink": 0.0}, "line_search_shrink", "(0, 1)"),
        ({"cg_iterations": 0}, "cg_iterations", "at least 1"),
        ({"line_search_steps": 0}, "line_search_steps", "at least 1"),
        ({"value_epochs": 0}, "value_epochs", "at least 1"),
        ({"cg_damping": -0.1}, "cg_damping", "negative"),
        ({"num_iterations": 2}, "num_iterations", "one natural-gradient step"),
        ({"attn_implementation": "flash_attention_2"}, "attn_implementation", "no double backward"),
        ({"kl_coef": 0.1, "kl_in": "loss"}, "kl_in", "kl_in: reward"),
        ({"entropy_coef": 0.01}, "entropy_coef", "set it to 0"),
        ({"early_stop_kl": 0.1}, "early_stop_kl", "set it to 0"),
    ],
)
def test_bad_trpo_options_are_errors_naming_the_key(options, key, text):
    found = problems(**options)
    assert key in found and text in found[key]


def test_trpo_options_are_checked_for_every_algorithm_and_trpo_runs_in_the_online_loop():
    assert "max_kl" in problems(algorithm="grpo", num_generations=2, effective_batch_size=4, max_kl=0.0)
    config(algorithm="grpo", num_generations=2, effective_batch_size=4).validate()
    trpo_config = config()
    trpo_config.validate()
    assert (trpo_config.num_iterations, trpo_config.kl_in, trpo_config.entropy_coef) == (1, "reward", 0.0)
    config(distributed="fsdp").validate()  # the default: one process ignores it (two are refused in train)


# --------------------------------------------------------------------------------------------------------
# trpo in the online step (real training on the tiny model)
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prompts and rule rewards of the ppo tests."""
    from test_trainer_ppo import write_prompts

    return write_prompts(tmp_path_factory.mktemp("trpo"))


def online_trpo(prompts: Path, output_dir: Path, **overrides: object) -> TrainingConfig:
    """The ppo tests' tiny setup with trpo: short steps, a small CG and critic budget."""
    from test_trainer_ppo import value_config

    options: dict[str, object] = dict(
        algorithm="trpo", max_kl=2.0, cg_iterations=5, value_epochs=2, max_steps=2, distributed="fsdp"
    )
    options.update(overrides)
    return value_config(prompts, output_dir, **options)


@pytest.mark.slow
def test_trpo_raises_the_reward_keeps_every_step_within_max_kl_and_the_value_loss_falls(prompts, tmp_path):
    from test_trainer_online import rise
    from test_trainer_ppo import rows_of

    from kfp_components.trainer.train import train

    summary = train(online_trpo(prompts, tmp_path, max_steps=12))  # 8 steps were too few to show a rise
    rows = rows_of(tmp_path)
    assert summary.steps == len(rows) == 12
    rewards = [r["reward"] for r in rows]
    assert rise(rewards) > 0.1, rewards
    value_losses = [r["value_loss"] for r in rows]
    assert sum(value_losses[-3:]) < sum(value_losses[:3]), value_losses
    for row in rows:
        assert row["trpo_kl"] <= 2.0 and row["passes"] == 1
        assert row["grad_norm"] == row["trpo_gradient_norm"] > 0
        for absent in ("entropy", "clip_fraction", "approx_kl"):  # no clipping, no entropy under trpo
            assert absent not in row
    assert sum(r["trpo_accepted"] for r in rows) >= 9 and any(r["trpo_kl"] > 0.01 for r in rows)
    for key in ("trpo_step_fraction", "trpo_surrogate", "trpo_cg_residual", "value_grad_norm", "score_mean"):
        assert isinstance(rows[-1][key], int | float), key
    assert summary.metrics["trpo_kl"] == rows[-1]["trpo_kl"]


def test_a_rejected_trpo_step_leaves_the_policy_bit_identical_and_the_critic_still_trains(prompts, tmp_path):
    """A trust region too small to move a float32 weight: no candidate improves the surrogate, so the saved
    policy is the starting checkpoint bit for bit, while the value model made its updates."""
    from test_trainer_ppo import rows_of

    from kfp_components.trainer.train import train

    train(
        online_trpo(
            prompts,
            tmp_path,
            max_kl=1e-30,
            line_search_steps=2,
            max_steps=1,
            value_epochs=1,
            save_final_model=True,
        )
    )
    (row,) = rows_of(tmp_path)
    assert row["trpo_accepted"] == 0 and row["trpo_backtracks"] == 2 and row["trpo_kl"] == 0
    assert row["trpo_step_fraction"] == 0 and row["trpo_gradient_norm"] > 0
    assert row["value_grad_norm"] > 0
    start = AutoModelForCausalLM.from_pretrained(tiny_model_path("qwen2", 0)).state_dict()
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    assert start.keys() == final.keys()
    for name, value in start.items():
        assert torch.equal(value, final[name]), name


def capture_trpo_steps(patch: pytest.MonkeyPatch) -> list[tuple[dict[str, Tensor], dict[str, Tensor], dict]]:
    """Patch ``OnlineSteps.trpo_update`` to record the policy's parameters before and after each step."""
    from kfp_components.trainer import online
    from kfp_components.trainer.distributed import unwrap

    steps: list[tuple[dict[str, Tensor], dict[str, Tensor], dict]] = []
    original = online.OnlineSteps.trpo_update

    def trpo_update(self, model, samples, whole, global_step, update):  # type: ignore[no-untyped-def]
        before = {n: p.detach().clone() for n, p in unwrap(model).named_parameters()}
        result = original(self, model, samples, whole, global_step, update)
        after = {n: p.detach().clone() for n, p in unwrap(model).named_parameters()}
        steps.append((before, after, result[2]))
        return result

    patch.setattr(online.OnlineSteps, "trpo_update", trpo_update)
    return steps


def test_lora_trpo_moves_only_the_adapters(prompts, tmp_path):
    from kfp_components.trainer.train import train

    with pytest.MonkeyPatch.context() as patch:
        steps = capture_trpo_steps(patch)
        train(online_trpo(prompts, tmp_path, lora_r=4, lora_alpha=8, max_steps=1, value_epochs=1))
    ((before, after, metrics),) = steps
    assert metrics["trpo_accepted"] == 1
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all("lora_" in n for n in changed), sorted(changed)


def test_trpo_inside_the_osft_constraint_keeps_the_frozen_subspace(prompts, tmp_path):
    """The decomposed weights train, and their change is orthogonal to the top singular directions on both
    sides (the step is projected as OSFT projects gradients)."""
    import math

    from kfp_components.trainer.train import train

    train(
        online_trpo(
            prompts,
            tmp_path,
            osft_constraint=True,
            unfreeze_rank_ratio=0.25,
            max_steps=1,
            value_epochs=1,
            save_final_model=True,
        )
    )
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    original = AutoModelForCausalLM.from_pretrained(tiny_model_path("qwen2", 0)).state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        w0, w1 = original[name].double(), tuned[name].double()
        u, _s, vh = torch.linalg.svd(w0, full_matrices=False)
        k = math.floor(min(w0.shape) * 0.75)
        delta = w1 - w0
        assert delta.abs().max() > 1e-5, f"{name} trained"
        assert (u[:, :k].T @ delta).abs().max() < 1e-4 and (delta @ vh[:k].T).abs().max() < 1e-4, name


@pytest.mark.slow
def test_two_gloo_ddp_processes_match_one(prompts, tmp_path):
    import yaml
    from test_trainer_loop import torchrun_two_processes
    from test_trainer_ppo import rows_of

    from kfp_components.trainer.train import train

    common: dict[str, object] = dict(max_steps=2, kl_coef=0.05, max_seq_len=64, max_tokens_per_gpu=64)
    train(online_trpo(prompts, tmp_path / "one", **common))
    two = online_trpo(prompts, tmp_path / "two", distributed="ddp", **common)
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(dict(two.__dict__)))
    torchrun_two_processes(run_yaml)
    single, double = rows_of(tmp_path / "one"), rows_of(tmp_path / "two")
    assert len(single) == len(double) == 2 and single[0]["micro_batches"] > 1
    assert single[1]["kl"] != 0  # the k1 KL penalty in the reward (trpo's default kl_in), after step 1
    for a, b in zip(single, double, strict=True):
        assert b["trpo_accepted"] == a["trpo_accepted"] and b["trpo_step_fraction"] == a["trpo_step_fraction"]
        for key in ("reward", "completion_length_mean", "kl", "value_mean", "returns_mean", "advantages_std"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        for key in (
            "trpo_kl",
            "trpo_surrogate",
            "trpo_gradient_norm",
            "trpo_expected_improvement",
            "value_loss",
        ):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), key


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(prompts, tmp_path):
    """Stopped after step 2 and resumed: the value model, the adaptive KL coefficient and the schedule (the
    critic's learning rate) come back, so the later steps match."""
    import shutil

    from test_trainer_online import resume_options
    from test_trainer_ppo import rows_of

    from kfp_components.trainer.train import train

    options = resume_options(max_steps=4, value_epochs=1)
    train(online_trpo(prompts, tmp_path, **options))
    first = rows_of(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000004")
    train(online_trpo(prompts, tmp_path, resume=True, **options))
    resumed = rows_of(tmp_path)
    assert [r["step"] for r in resumed] == [r["step"] for r in first] == [1, 2, 3, 4]
    for before, after in zip(first, resumed, strict=True):
        for key in (
            "reward",
            "loss",
            "kl",
            "kl_coef",
            "lr",
            "value_loss",
            "value_mean",
            "trpo_kl",
            "trpo_surrogate",
        ):
            assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-7), (key, before, after)
    assert len({r["kl_coef"] for r in first}) > 1 and len({r["lr"] for r in first}) > 1


def test_fsdp_on_two_processes_is_an_error_naming_distributed_before_any_model_loads(prompts, tmp_path):
    import yaml

    run = online_trpo(prompts, tmp_path / "run")
    assert run.distributed == "fsdp"
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(dict(run.__dict__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "kfp_components.trainer", "--config", str(run_yaml)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "distributed: trpo on 2 processes runs with distributed: ddp" in done.stderr, done.stderr[-3000:]
    assert "Loading" not in done.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_memory_check_stops_the_run_before_the_first_step(prompts, tmp_path):
    from kfp_components.trainer.train import train

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trpo, "available_memory_bytes", lambda device: 1_000_000)
        with pytest.raises(ConfigError) as caught:
            train(online_trpo(prompts, tmp_path))
    message = str(caught.value)
    assert "lora_r" in message and "trainable parameters" in message and "0.00 GiB free" in message, message
    assert not (tmp_path / "metrics.jsonl").exists()


def test_advantages_without_a_value_model_refuse_other_algorithms():
    """The value algorithms' advantages are value_advantages'; an algorithm the dispatch does not know is an
    error, not rloo's advantages."""
    from types import SimpleNamespace

    from kfp_components.trainer.online import OnlineSteps

    for algorithm in ("trpo", "ppo", "something"):
        steps = SimpleNamespace(
            config=SimpleNamespace(algorithm=algorithm), info=SimpleNamespace(device="cpu")
        )
        with pytest.raises(ValueError, match=f"grpo, rloo and reinforce_pp, not '{algorithm}'"):
            OnlineSteps.advantages(steps, [], [], None, None)  # type: ignore[arg-type]
