"""Trust Region Policy Optimization for language models: one natural-gradient step of the policy.

Method (Schulman et al. 2015, "Trust Region Policy Optimization", arXiv:1502.05477)
-----------------------------------------------------------------------------------
With ``theta_old`` the policy that generated the step's completions, TRPO maximises the surrogate

    L(theta) = mean over the step's loss tokens of  A_t * exp(logp_theta(y_t) - logp_old(y_t))

subject to ``KL_bar(theta) = mean over the same tokens of KL(pi_old(.|t) || pi_theta(.|t)) <= max_kl``, the
KL computed exactly from full logits (every token of the vocabulary), not estimated from the sampled token.
Both means are normalised by the step's loss tokens over all ranks (``normaliser``), as the engine's policy
loss is. One step:

1. ``g = grad L(theta_old)`` over the trainable parameters (full fine-tuning, LoRA adapters, or OSFT's
   ``U_l, S_l, V_l``), summed over micro-batches and ranks, projected by ``project`` (OSFT: off the frozen
   singular subspaces, as :func:`~kfp_components.trainer.osft.project_osft_gradients` projects gradients).
2. ``s ~ (F + cg_damping I)^-1 g`` by ``cg_iterations`` of conjugate gradient, where ``F`` is the Fisher
   of the policy at ``theta_old``: the Hessian of ``KL_bar`` there. A Fisher-vector product is a double
   backward: with ``p_old = softmax(logits).detach()`` from the same forward, ``KL(p_old || softmax(logits))``
   is 0 with gradient 0 at ``theta_old`` and Hessian ``F``, so ``F v = grad((grad KL_bar) . v)``. Summed over
   micro-batches and ranks, projected, plus ``cg_damping * v``.
3. The step ``s * sqrt(2 max_kl / s^T F s)`` reaches the trust region's border in the quadratic model of
   the KL (``F`` without the damping: the damping steers the direction, the KL's own curvature sets the
   length; scaled by the damped curvature, a step of the tiny test model reached 1/30 of max_kl).
4. Backtracking line search: fractions ``1, shrink, shrink^2, ...`` (``line_search_steps`` of them) of the
   step; the first whose exact ``KL_bar`` is at most ``max_kl`` and whose surrogate is above
   ``L(theta_old)`` is kept. When none is, every parameter is copied back from the saved ``theta_old``:
   bit-identical to before the step.

The old distribution in the line search
---------------------------------------
``KL(pi_old || pi_candidate)`` needs the old distribution of every loss token over the whole vocabulary.
Keeping it costs tokens x vocabulary x 4 bytes (a step of 64 completions of 512 tokens over Qwen2.5's
151,936 tokens: 20 GB), so it is not kept: for each candidate and each micro-batch the saved ``theta_old``
is copied into the parameters for one forward without gradients (the old logits), the candidate
``theta_old + fraction * step`` for a second one, and the two give that micro-batch's KL and surrogate.
Cost per tried candidate: 2 forwards per micro-batch (no backward) and 2 copies of the trainable
parameters per micro-batch; memory: the log-softmax rows of one micro-batch's loss tokens, twice (the
prompt's rows are dropped before the softmax). The candidate is rebuilt from the saved parameters and the
step each time, so every rank and every micro-batch sees the same bits.

Cost of a step
--------------
Time, per micro-batch: the gradient (1 forward + backward), ``cg_iterations + 1`` Fisher-vector products
(each a forward, a backward with ``create_graph`` and a second backward: about 3x a training step; with a
single micro-batch the first backward's graph is kept and reused, so each further product is one second
backward), and 2 forwards per tried line-search candidate. With the defaults (10 CG iterations, usually 1
or 2 candidates) a TRPO step costs about 25 to 35 training steps' worth of compute on its micro-batches.

Memory: the vectors below, each the size of the trainable parameters in float32 (float64 when the
parameters are): the saved ``theta_old``, ``g``, CG's ``s``, ``r``, ``p`` and ``F p``, and inside a
Fisher-vector product the first gradients (with their graph), the second ones and their flat copy:
:data:`VECTORS` in all. On top of that, the double backward's activations: about twice those of a training
step on one micro-batch (lower ``max_tokens_per_gpu`` if it runs out). :func:`check_memory` compares the
vectors with the device's free memory before training: full fine-tuning of a 0.5B model takes 9 x 2 GB =
18 GB; a LoRA adapter of a few million parameters a few hundred MB.

Distributed training
--------------------
Every rank holds the whole trainable set (one process, or DDP). ``reduce`` sums a tensor over the ranks
(``distributed.all_reduce_sum``): the gradient, each Fisher-vector product and each candidate's KL and
surrogate are per-rank sums over the rank's own micro-batches, reduced once each, so every rank then holds
the same vectors and the dot products of CG need no communication; 2 ranks take the step of 1 process. The
micro-batch ``forward`` closures must call the unwrapped module (``distributed.unwrap``): DDP's hooks do not
fire for ``torch.autograd.grad``, and a forward through the DDP wrapper would wait for a backward that never
comes. Every rank makes the same number of ``reduce`` calls (one for the gradient, one per Fisher-vector
product, one per candidate), whatever its number of micro-batches (none included).

FSDP2 is not supported: its parameters are sharded DTensors that the forward replaces by all-gathered
copies, and ``torch.autograd.grad`` with respect to the shards does not reach them (with two gloo ranks and
torch 2.13: "The differentiated Tensor at index 1 appears to not have been used in the graph"; the gradient
arrives only through FSDP2's post-backward hooks, which ``autograd.grad`` skips). Training refuses
``algorithm: trpo`` with ``distributed: fsdp`` on several processes (one process ignores ``distributed``) and
the step refuses DTensor parameters; use ``ddp`` (with LoRA for models whose full trainable set does not fit
one device).

Attention: the fused scaled-dot-product kernels have no double backward, so the Fisher-vector products run
the model's sdpa attention on PyTorch's math kernel (:func:`twice_differentiable_attention`: it keeps each
head's attention matrix for backward, per sample with ``sdpa_per_sample``, which ``auto`` runs for trpo, and
T x T over the packed row with ``sdpa``); ``flash_attention_2``/``3`` and ``flex_attention`` have no double
backward at all and the config refuses them with trpo. Activation checkpointing (non-reentrant, as the trainer enables it)
works with the double backward and gives the same products.

The forwards must be deterministic (no dropout): the line search compares separate forwards of the old and
the candidate parameters, and the Fisher's ``p_old`` comes from the forward it differentiates.

In the online step (``OnlineSteps.trpo_update``, after the advantages, instead of the policy's optimizer
updates; ``train`` calls :func:`check_memory` once the policy is loaded)::

    policy = unwrap(model)                              # eval mode for the step: no dropout
    params = [p for p in policy.parameters() if p.requires_grad]
    batches = [packed_micro_batch(policy, mb, ids, adv, old, temperature=..., device=..., autocast=...)
               for (mb, ids), adv, old in zip(micro_batches, advantages, old_logps)]
    result = natural_gradient_step(params, batches, normaliser=global_loss_tokens, max_kl=..., ...,
                                   reduce=all_reduce_sum, project=osft_projection(policy, params) if osft
                                   else None)
    metrics.update(result.metrics())                    # then the critic's value_epochs passes
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from kfp_components.trainer.batching import IGNORE_INDEX, MicroBatch
from kfp_components.typed_config import ConfigError

__all__ = [
    "VECTORS",
    "FisherVectorProduct",
    "PolicyMicroBatch",
    "TRPOStepResult",
    "available_memory_bytes",
    "check_memory",
    "conjugate_gradient",
    "memory_bytes",
    "natural_gradient_step",
    "osft_projection",
    "packed_micro_batch",
]

#: Parameter-sized vectors a TRPO step holds at once (see the module docstring).
VECTORS = 9
#: CG stops when ``|r|^2`` falls below this share of ``|g|^2`` (a residual of 1e-5 of the gradient).
CG_RELATIVE_TOLERANCE = 1e-10

Reduce = Callable[[Tensor], Tensor]
Project = Callable[[list[Tensor]], None]


@dataclass(frozen=True)
class PolicyMicroBatch:
    """One micro-batch of this rank's completions.

    Attributes:
        forward: The policy's logits at the current parameters, ``(T, V)``: one row per position of the
            micro-batch. Called with and without gradients; must call the unwrapped module and be
            deterministic (no dropout).
        targets: ``(T,)`` the token each position predicts (any valid id where ``mask`` is False).
        mask: ``(T,)`` bool, the loss tokens (completion tokens that train).
        advantages: ``(T,)`` the advantage of each token (0 where ``mask`` is False).
        old_logps: ``(T,)`` the log-probability of each target under the policy that generated it.
        temperature: The sampling temperature: the distribution is ``softmax(logits / temperature)`` (the
            division is applied to the loss tokens' rows only).
    """

    forward: Callable[[], Tensor]
    targets: Tensor
    mask: Tensor
    advantages: Tensor
    old_logps: Tensor
    temperature: float = 1.0


@dataclass(frozen=True)
class TRPOStepResult:
    """What one natural-gradient step did (see :meth:`metrics`).

    Attributes:
        accepted: Whether a candidate passed the line search (otherwise the parameters are unchanged).
        step_fraction: The fraction of the trust-region step taken (0 when rejected).
        backtracks: Candidates rejected by the line search (all of them when none was accepted).
        kl: KL(old || new) per loss token after the step (0 when rejected).
        expected_improvement: ``g . step`` at the fraction taken: the surrogate's gain in the linear model
            (at the full step when rejected).
        actual_improvement: ``L(new) - L(old)`` (0 when rejected).
        surrogate: ``L(old)``.
        gradient_norm: ``|g|`` (after the projection).
        cg_iterations: Conjugate-gradient iterations run (fewer than asked when the residual vanished).
        cg_residual: ``|g - (F + damping I) s| / |g|`` at the end of CG.
        seconds: Wall time of the step.
    """

    accepted: bool
    step_fraction: float
    backtracks: int
    kl: float
    expected_improvement: float
    actual_improvement: float
    surrogate: float
    gradient_norm: float
    cg_iterations: int
    cg_residual: float
    seconds: float

    def metrics(self) -> dict[str, float]:
        """The result as ``trpo_<field>`` numbers for the step's metrics line."""
        return {f"trpo_{name}": float(value) for name, value in asdict(self).items()}


# --------------------------------------------------------------------------------------------------------
# Per micro-batch: the surrogate and the exact KL
# --------------------------------------------------------------------------------------------------------


def _loss_logprobs(batch: PolicyMicroBatch) -> Tensor:
    """The log-softmax rows of the micro-batch's loss tokens, ``(R, V)`` in float32 (float64 when the
    logits are): the rows without loss (prompt tokens) are dropped before the softmax."""
    logits = batch.forward()
    rows = torch.nonzero(batch.mask.to(logits.device)).squeeze(1)
    chosen = logits.index_select(0, rows)
    chosen = chosen if chosen.dtype == torch.float64 else chosen.float()
    if batch.temperature != 1.0:
        chosen = chosen / batch.temperature
    return F.log_softmax(chosen, -1)


def _surrogate_sum(logprobs: Tensor, batch: PolicyMicroBatch) -> Tensor:
    """``sum over loss tokens of A * exp(logp - logp_old)`` (not normalised); ``logprobs`` from
    :func:`_loss_logprobs`."""
    mask = batch.mask.to(logprobs.device)
    targets = batch.targets.to(logprobs.device)[mask].long()
    logp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    old = batch.old_logps.to(logprobs.device, logprobs.dtype)[mask]
    advantages = batch.advantages.to(logprobs.device, logprobs.dtype)[mask]
    return (advantages * torch.exp(logp - old)).sum()


def _kl_sum(old_logprobs: Tensor, new_logprobs: Tensor) -> Tensor:
    """``sum over loss tokens of KL(old || new)`` from their full log-softmax rows."""
    return (old_logprobs.exp() * (old_logprobs - new_logprobs)).sum()


def packed_micro_batch(
    module: nn.Module,
    batch: MicroBatch,
    sequence_ids: Tensor,
    advantages: Tensor,
    old_logps: Tensor,
    *,
    temperature: float,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> PolicyMicroBatch:
    """One of the online engine's packed micro-batches as a TRPO micro-batch.

    Args:
        module: The policy, unwrapped (``distributed.unwrap``), without dropout.
        batch: The packed, padding-free micro-batch (``OnlineSteps.batch``; a dummy one has no loss tokens).
        sequence_ids: ``(T,)`` the completion of each token, -1 where there is no loss
            (``policy_gradient.packed_sequence_ids``).
        advantages: ``(T,)`` each token's advantage.
        old_logps: ``(T,)`` each token's log-prob under the generating policy (at the same temperature).
        temperature: The sampling temperature.
        device: Where the model runs.
        autocast: The trainer's ``Precision.autocast``.
    """
    input_ids = batch.input_ids.to(device)
    position_ids = batch.position_ids.to(device)
    targets = batch.targets.reshape(-1).to(device)
    mask = (sequence_ids.reshape(-1).to(device) >= 0) & (targets != IGNORE_INDEX)

    def forward() -> Tensor:
        with autocast():
            logits = module(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        return logits.reshape(-1, logits.shape[-1])

    return PolicyMicroBatch(
        forward=forward,
        targets=targets.clamp(min=0),
        mask=mask,
        advantages=advantages.reshape(-1).to(device),
        old_logps=old_logps.reshape(-1).to(device),
        temperature=temperature,
    )


# --------------------------------------------------------------------------------------------------------
# Flat vectors over the trainable parameters
# --------------------------------------------------------------------------------------------------------


class _Space:
    """Flat vectors over ``params``: one contiguous tensor, with per-parameter views."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        if not params:
            raise ValueError("natural_gradient_step needs at least one trainable parameter")
        if any(isinstance(p, DTensor) for p in params):
            # torch.autograd.grad does not reach FSDP2's shards ("appears to not have been used in the
            # graph"); with allow_unused their gradients would silently be zero.
            raise ValueError(
                "natural_gradient_step got FSDP2-sharded (DTensor) parameters: TRPO needs every rank to hold "
                "the whole trainable set (one process or DDP)"
            )
        self.params = list(params)
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.device = self.params[0].device
        self.dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32

    def views(self, flat: Tensor) -> list[Tensor]:
        return [
            part.view(shape) for part, shape in zip(torch.split(flat, self.sizes), self.shapes, strict=True)
        ]

    def flatten(self, tensors: Sequence[Tensor | None]) -> Tensor:
        return torch.cat(
            [
                (torch.zeros(size, device=self.device, dtype=self.dtype) if t is None else t.reshape(-1)).to(
                    self.device, self.dtype
                )
                for t, size in zip(tensors, self.sizes, strict=True)
            ]
        )

    def zeros(self) -> Tensor:
        return torch.zeros(sum(self.sizes), device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def saved(self) -> list[Tensor]:
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def set(self, saved: Sequence[Tensor], step: Tensor | None = None, fraction: float = 0.0) -> None:
        """The parameters become ``saved`` (bit for bit), plus ``fraction * step`` when a step is given."""
        for param, value in zip(self.params, saved, strict=True):
            param.copy_(value)
        if step is not None:
            for param, part in zip(self.params, self.views(step), strict=True):
                param.add_(part.to(param.dtype), alpha=fraction)


def _grad(
    output: Tensor, params: Sequence[nn.Parameter], *, create_graph: bool = False, retain_graph: bool = False
) -> tuple[Tensor, ...]:
    return torch.autograd.grad(
        output,
        list(params),
        create_graph=create_graph,
        retain_graph=retain_graph or create_graph,
        allow_unused=True,
        materialize_grads=True,
    )


def twice_differentiable_attention() -> AbstractContextManager[None]:
    """PyTorch's scaled-dot-product attention restricted to its math kernel: the fused kernels (flash,
    memory-efficient, cuDNN) have no double backward ("derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"). The math kernel holds
    each head's T x T attention matrix of a micro-batch for backward."""
    return sdpa_kernel([SDPBackend.MATH])


def _identity(values: Tensor) -> Tensor:
    return values


# --------------------------------------------------------------------------------------------------------
# Conjugate gradient and the Fisher-vector product
# --------------------------------------------------------------------------------------------------------


def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor], b: Tensor, iterations: int
) -> tuple[Tensor, Tensor, int]:
    """Solve ``A x = b`` for a symmetric positive definite ``A`` given as ``matvec``, from ``x = 0``.

    Returns ``(x, the residual b - A x as CG tracks it, iterations run)``; stops early when the squared
    residual falls below :data:`CG_RELATIVE_TOLERANCE` times ``|b|^2``.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = torch.dot(r, r)
    stop = float(rr) * CG_RELATIVE_TOLERANCE
    done = 0
    for _ in range(iterations):
        if float(rr) <= stop:
            break
        ap = matvec(p)
        curvature = torch.dot(p, ap)
        if not float(curvature) > 0:  # not positive definite along p (or NaN): keep what we have
            break
        alpha = float(rr / curvature)
        x.add_(p, alpha=alpha)  # in place, without a temporary vector
        r.add_(ap, alpha=-alpha)
        del ap
        rr_new = torch.dot(r, r)
        p.mul_(rr_new / rr).add_(r)
        rr = rr_new
        done += 1
    return x, r, done


class FisherVectorProduct:
    """``v -> (F + damping I) v`` over this rank's micro-batches, reduced over the ranks and projected.

    ``v`` and the result are flat vectors over ``params``: their flattened tensors one after the other, in
    the order of ``params``, in float32 (float64 when a parameter is). ``F`` is the Hessian, at the current
    parameters, of the mean KL(current || theta) per loss token (``normaliser`` tokens over all ranks).
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter] | _Space,
        batches: Sequence[PolicyMicroBatch],
        *,
        normaliser: float,
        damping: float,
        reduce: Reduce | None = None,
        project: Project | None = None,
    ) -> None:
        space = params if isinstance(params, _Space) else _Space(params)
        reduce = reduce or _identity
        self.space = space
        self.batches = batches
        self.normaliser = normaliser
        self.damping = damping
        self.reduce = reduce
        self.project = project
        # One micro-batch: its first backward (with graph) is kept for every product.
        self.kept = self._kl_gradients(batches[0]) if len(batches) == 1 else None

    def _kl_gradients(self, batch: PolicyMicroBatch) -> tuple[Tensor, ...]:
        with twice_differentiable_attention():
            logprobs = _loss_logprobs(batch)
            kl = _kl_sum(logprobs.detach(), logprobs) / self.normaliser
            return _grad(kl, self.space.params, create_graph=True)

    def __call__(self, v: Tensor) -> Tensor:
        total = self.space.zeros()
        parts = self.space.views(v)
        for batch in self.batches:
            grads = self.kept if self.kept is not None else self._kl_gradients(batch)
            dot = sum((g * part.to(g.dtype)).sum() for g, part in zip(grads, parts, strict=True))
            assert isinstance(dot, Tensor)
            with twice_differentiable_attention():
                second = _grad(dot, self.space.params, retain_graph=self.kept is not None)
            total.add_(self.space.flatten(second))
        total = self.reduce(total)
        if self.project is not None:
            self.project(self.space.views(total))
        return total.add_(v, alpha=self.damping)


# --------------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------------


def _surrogate_and_gradient(
    space: _Space, batches: Sequence[PolicyMicroBatch], normaliser: float, reduce: Reduce
) -> tuple[float, Tensor]:
    gradient = space.zeros()
    surrogate = torch.zeros((), device=space.device, dtype=space.dtype)
    for batch in batches:
        value = _surrogate_sum(_loss_logprobs(batch), batch) / normaliser
        gradient.add_(space.flatten(_grad(value, space.params)))
        surrogate += value.detach().to(space.dtype)
    reduced = reduce(torch.cat([gradient, surrogate.reshape(1)]))
    return float(reduced[-1]), reduced[:-1]


@torch.no_grad()
def _evaluate(
    space: _Space,
    batches: Sequence[PolicyMicroBatch],
    saved: Sequence[Tensor],
    step: Tensor,
    fraction: float,
    normaliser: float,
    reduce: Reduce,
) -> tuple[float, float]:
    """``(KL_bar(old || candidate), L(candidate))`` with ``candidate = saved + fraction * step``; the
    parameters are left at the candidate."""
    sums = torch.zeros(2, device=space.device, dtype=torch.float64)
    for batch in batches:
        space.set(saved)
        old = _loss_logprobs(batch)
        space.set(saved, step, fraction)
        new = _loss_logprobs(batch)
        sums[0] += _kl_sum(old, new).double()
        sums[1] += _surrogate_sum(new, batch).double()
    if not batches:
        space.set(saved, step, fraction)
    sums = reduce(sums) / normaliser
    return float(sums[0]), float(sums[1])


def natural_gradient_step(
    params: Sequence[nn.Parameter],
    batches: Sequence[PolicyMicroBatch],
    *,
    normaliser: float,
    max_kl: float,
    cg_iterations: int,
    cg_damping: float,
    line_search_steps: int,
    line_search_shrink: float,
    reduce: Reduce | None = None,
    project: Project | None = None,
) -> TRPOStepResult:
    """One TRPO step of ``params`` on this rank's ``batches`` (see the module docstring).

    Args:
        params: The trainable parameters (``requires_grad``), the same list in the same order on every rank.
        batches: This rank's micro-batches (may be empty on a rank without completions).
        normaliser: The step's loss tokens over all ranks: the surrogate and the KL are means over them.
        max_kl: The trust region: the mean KL(old || new) per loss token a step may reach (> 0).
        cg_iterations: Conjugate-gradient iterations for ``s ~ F^-1 g``.
        cg_damping: ``F + cg_damping I`` is inverted (keeps CG stable where the Fisher is singular).
        line_search_steps: Candidates tried: fractions ``1, shrink, shrink^2, ...`` of the full step.
        line_search_shrink: The factor between candidates, in (0, 1).
        reduce: Sums a tensor over the ranks in place and returns it (``distributed.all_reduce_sum``);
            None in a single process.
        project: Projects a list of tensors shaped like ``params`` in place onto the directions that may
            move (OSFT: :func:`osft_projection`); None when every direction may.

    Returns:
        What the step did. The parameters are at the accepted candidate, or bit-identical to before.
    """
    started = time.perf_counter()
    if not max_kl > 0:
        raise ValueError(f"max_kl must be positive, got {max_kl}")
    if not 0 < line_search_shrink < 1:
        raise ValueError(f"line_search_shrink must be in (0, 1), got {line_search_shrink}")
    if cg_iterations < 1 or line_search_steps < 1 or cg_damping < 0 or not normaliser > 0:
        raise ValueError(
            f"need cg_iterations >= 1 ({cg_iterations}), line_search_steps >= 1 ({line_search_steps}), "
            f"cg_damping >= 0 ({cg_damping}) and a positive normaliser ({normaliser})"
        )
    reduce = reduce or _identity
    space = _Space(params)
    saved = space.saved()

    surrogate, gradient = _surrogate_and_gradient(space, batches, normaliser, reduce)
    if project is not None:
        project(space.views(gradient))
    gradient_norm = float(gradient.norm())

    def rejected(expected: float, iterations: int, residual: float, backtracks: int) -> TRPOStepResult:
        space.set(saved)
        return TRPOStepResult(
            accepted=False,
            step_fraction=0.0,
            backtracks=backtracks,
            kl=0.0,
            expected_improvement=expected,
            actual_improvement=0.0,
            surrogate=surrogate,
            gradient_norm=gradient_norm,
            cg_iterations=iterations,
            cg_residual=residual,
            seconds=time.perf_counter() - started,
        )

    if not (gradient_norm > 0 and math.isfinite(gradient_norm)):
        return rejected(0.0, 0, 0.0, 0)  # nothing to climb (all advantages 0), or a NaN gradient
    fisher = FisherVectorProduct(
        space, batches, normaliser=normaliser, damping=cg_damping, reduce=reduce, project=project
    )
    direction, residual_vector, iterations = conjugate_gradient(fisher, gradient, cg_iterations)
    residual = float(residual_vector.norm()) / gradient_norm
    del residual_vector
    # s^T F s of the KL's quadratic model: the damping steers the direction, not the step's length.
    curvature = float(torch.dot(direction, fisher(direction))) - cg_damping * float(
        torch.dot(direction, direction)
    )
    fisher.kept = None  # free the kept graph before the line search
    if not (curvature > 0 and math.isfinite(curvature)):
        return rejected(0.0, iterations, residual, 0)
    step = direction.mul_(math.sqrt(2 * max_kl / curvature))
    if project is not None:  # CG keeps it in the allowed subspace; once more against rounding
        project(space.views(step))
    expected_full = float(torch.dot(gradient, step))
    del gradient

    fraction = 1.0
    for tried in range(line_search_steps):
        kl, candidate = _evaluate(space, batches, saved, step, fraction, normaliser, reduce)
        improvement = candidate - surrogate
        if math.isfinite(kl) and math.isfinite(candidate) and kl <= max_kl and improvement > 0:
            return TRPOStepResult(
                accepted=True,
                step_fraction=fraction,
                backtracks=tried,
                kl=kl,
                expected_improvement=expected_full * fraction,
                actual_improvement=improvement,
                surrogate=surrogate,
                gradient_norm=gradient_norm,
                cg_iterations=iterations,
                cg_residual=residual,
                seconds=time.perf_counter() - started,
            )
        fraction *= line_search_shrink
    return rejected(expected_full, iterations, residual, line_search_steps)


# --------------------------------------------------------------------------------------------------------
# OSFT: the allowed subspace
# --------------------------------------------------------------------------------------------------------


def osft_projection(model: nn.Module, params: Sequence[nn.Parameter]) -> Project:
    """A ``project`` for :func:`natural_gradient_step` under OSFT's constraint: each ``U_l`` and ``V_l``
    tensor of the list is projected off its layer's frozen subspace exactly as
    :func:`~kfp_components.trainer.osft.project_osft_gradients` projects their gradients; the other
    tensors (``S_l``, dense layers) are left alone."""
    from kfp_components.trainer.osft import _ColumnSpaceRemover, _local_rows, _remove_row_space, osft_modules

    index = {id(p): i for i, p in enumerate(params)}
    layers = [
        (index.get(id(m.U_l)), index.get(id(m.V_l)), m) for m in osft_modules(model).values() if m.num_frozen
    ]

    @torch.no_grad()
    def project(tensors: list[Tensor]) -> None:
        remover = _ColumnSpaceRemover()
        for u, v, module in layers:
            if u is not None:
                local, start, stop, groups = _local_rows(tensors[u])
                remover.add(local, module.U_h[start:stop], groups)
            if v is not None:
                _remove_row_space(_local_rows(tensors[v])[0], module.V_h)
        remover.flush()

    return project


# --------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------


def memory_bytes(num_trainable: int, element_size: int = 4) -> int:
    """Bytes of the :data:`VECTORS` parameter-sized vectors a step holds (activations not included)."""
    return VECTORS * num_trainable * element_size


def available_memory_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device, or the RAM the system can still give (``MemAvailable``) for a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB"


def check_memory(params: Sequence[nn.Parameter], device: torch.device, available: int | None = None) -> int:
    """Raise a :class:`ConfigError` when the TRPO vectors of ``params`` do not fit the memory ``device``
    has free (``available`` bytes when given); return their bytes otherwise. Call once the model is loaded
    and before training."""
    count = sum(p.numel() for p in params)
    element = 8 if any(p.dtype == torch.float64 for p in params) else 4
    needed = memory_bytes(count, element)
    free = available_memory_bytes(device) if available is None else available
    if needed > free:
        raise ConfigError(
            "lora_r",
            f"trpo holds {VECTORS} vectors the size of the {count:,} trainable parameters "
            f"({_gib(needed)} in {'float64' if element == 8 else 'float32'}) plus the double backward's "
            f"activations, but {device} has {_gib(free)} free: train LoRA adapters (lora_r > 0) instead of "
            "every weight, or use a device with more memory",
        )
    return needed
