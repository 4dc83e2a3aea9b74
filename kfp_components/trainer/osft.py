"""Orthogonal Subspace Fine-Tuning (OSFT): full-rank fine-tuning that leaves a model's main directions alone.

Method (Nayak et al. 2025, "Sculpting Subspaces", arXiv:2504.07097)
--------------------------------------------------------------------
Every target weight ``W`` (the ``N x M`` weight of an attention or MLP projection) is decomposed once, in
fp32, as ``W = U diag(S) V`` (``torch.linalg.svd(W, full_matrices=False)``; ``V`` holds the right singular
vectors as rows, like ``Vh``), ``r = min(N, M)``. The top ``k = floor(r * (1 - unfreeze_rank_ratio))``
singular directions carry what the model already knows and are frozen::

    W = U_h diag(S_h) V_h  +  U_l diag(S_l) V_l
        (k directions, frozen buffers)   (r - k directions, trainable parameters)

Only ``U_l (N x r-k)``, ``S_l (r-k)`` and ``V_l (r-k x M)`` train. To keep every update out of the frozen
subspace, the gradients of ``U_l`` and ``V_l`` are projected off it after backward and before the optimizer::

    G_U <- G_U - U_h (U_h^T G_U)          G_V <- G_V - (G_V V_h^T) V_h

and, because AdamW rescales each element separately (which rotates a projected step back into the frozen
subspace), the parameters ``U_l`` and ``V_l`` are projected the same way again after the optimizer step.
``unfreeze_rank_ratio`` is in ``(0, 1]``; ``1.0`` means ``k = 0``: every direction trains and OSFT is a
reparametrised full fine-tuning. Embeddings, ``lm_head``, norms and biases are not decomposed: they stay
dense and train normally.

Targets are chosen from ``model.config.model_type`` (:data:`TARGETS_BY_MODEL_TYPE`: the q/k/v/o and
gate/up/down projections and their fused or differently named variants), with a generic fallback on linear
layers inside the repeated blocks whose names are those of projections; ``target_patterns`` (regexes
searched in module names) overrides both. In transformers 5 the routed experts of MoE models (Mixtral,
Qwen3-MoE, GPT-OSS, Granite-MoE) are fused 3-D parameter tensors, not linear layers: only their attention
(and shared-expert MLPs) are decomposed; the experts train dense.

Formulation (measured: ``benchmarks/osft_step.py``)
---------------------------------------------------
Two ways to run the forward of a decomposed layer:

* factorised, as the reference implementation does: ``y = ((x V_h^T) S_h) U_h^T + ((x V_l^T) S_l) U_l^T``:
  ``2 T r (N + M)`` FLOPs instead of ``2 T N M`` (2x for a square weight, 1.36x for a Llama MLP weight);
* dense rebuild (shipped): keep ``W_h = U_h S_h V_h`` cached as a buffer and, once per forward,
  ``W = W_h + (U_l * S_l) @ V_l`` then ``F.linear(x, W, bias)``. The linear costs what a dense layer
  costs; the overhead is ``O(N M (r - k))`` per micro-batch, independent of the token count ``T``.

The rebuild runs inside a custom autograd function that does not keep ``W`` for backward: it rebuilds it
there (``2 N M (r - k)`` FLOPs) instead of holding an unsharded copy of every target weight for the
whole forward, which under FSDP2 would cost one full model copy per GPU. Per micro-batch a target then
costs ``6 T N M + 8 N M (r - k)`` FLOPs against ``6 T N M`` for full fine-tuning, i.e. ``1 + 1.33 (r-k)/T``
on the linear layers; the projections add ``8 (N + M) k (r - k)`` per optimizer step.

Measured with ``benchmarks/osft_step.py`` on 2 CPU cores (fp32; Qwen2-shaped model: hidden 512, 4 layers,
intermediate 1408, 8/2 heads, vocab 1024; ``unfreeze_rank_ratio`` 0.25; one optimizer step = forward +
backward + AdamW, plus both projections for OSFT; fastest of 5 steps; "saved" = what autograd keeps from
forward to backward besides parameters and buffers):

=======================================  ==========  ==========  ===========  =================
formulation                              tokens per  step time   of which     saved for
                                         micro-batch vs full     projections  backward vs full
=======================================  ==========  ==========  ===========  =================
dense rebuild, W rebuilt in backward     4,096       1.05x       3.4%         1.00x
dense rebuild, W saved by autograd       4,096       1.05x       3.6%         1.08x
factorised (reference)                   4,096       1.16x       3.2%         1.13x
dense rebuild, W rebuilt in backward     16,384      0.97x       0.6%         1.00x
=======================================  ==========  ==========  ===========  =================

Recomputing ``W`` costs nothing measurable (1.05x either way) and keeps autograd's memory at that of full
fine-tuning, so it is the one code path shipped; the factorised forward lives only in the benchmark, as
the comparison point. At 16k tokens the smaller optimizer (AdamW over 42% of the parameters) more than
pays for the rebuild. The projections cost the same per optimizer step whatever the micro-batch size and
number of micro-batches, so gradient accumulation and larger micro-batches dilute them further.

Memory: each target holds ``U_h``, ``S_h``, ``V_h`` (fp32 buffers), ``W_h`` (a frozen ``dense_dtype``
parameter, by default the weight's dtype) and the trainable ``U_l``, ``S_l``, ``V_l``. ``U`` and ``V``
together hold ``r (N + M)`` numbers, 2x the weight for a square matrix and about 1.3x for an MLP weight, so
with ``W_h`` the decomposed layers take 2.3x to 3x the memory of their dense weights (2.4x in the benchmark;
less with ``dense_dtype=torch.bfloat16`` under bf16 autocast). Gradients and AdamW moments cover only the
trainable ``(r - k)(N + M)`` numbers (0.4x of the optimizer state of full fine-tuning in the benchmark).
Under FSDP2 every one of these tensors is split over the ranks (below), so OSFT's model state per rank
falls as ``1 / world_size`` like full fine-tuning's, and is below it (``benchmarks/osft_memory.py``).

Dtypes (measured in ``benchmarks/osft_memory.py``, 8 steps under bf16 autocast): ``W_h`` in the autocast
dtype (bf16, what the trainer passes as ``dense_dtype``) is safe: it only enters the forward, which casts
it to bf16 anyway, so the losses are those of an fp32 ``W_h`` bit for bit, at half its memory. ``U_h`` and
``V_h`` stay fp32: they define the subspace the projections keep the updates out of; rounded to bf16 they
let the trainable factors leak into the true frozen subspace (orthogonality error 6e-4 against 1.5e-7 in
fp32, 4,000x) and move the loss by 7e-4.

Distributed training
--------------------
* :func:`apply_osft` runs before DDP/FSDP wrapping, when every rank holds the full model. With
  ``torch.distributed`` initialised, the targets are decomposed in rounds: in each, rank ``i`` decomposes
  one target and broadcasts it, so all ranks hold bit-identical factors while no rank ever holds more than
  its current decomposition and the one it receives. Each layer is replaced (its dense weight freed) as its
  decomposition arrives. With ``frozen_mesh`` (the trainer passes it under FSDP2) nothing is broadcast:
  the owner of a decomposition sends each rank only its share (the rows, columns and chunks FSDP2 and
  :func:`frozen_factor_sharding` give it, ``W_h``'s rows built by the owner), ``U_h`` and ``V_h`` become
  DTensors at once, and the trainable factors and ``W_h`` wait as meta parameters until
  :func:`place_factor_shards` hands the shares to the DTensors ``fully_shard`` made of them. A rank so
  never holds more of the factors than its share plus the one layer it decomposes (counted in the tests).
* DDP: gradients are already all-reduced when :func:`project_osft_gradients` runs; every rank projects
  its (identical) copy. Wrap with ``DistributedDataParallel(..., broadcast_buffers=False)``: the frozen
  buffers are identical on every rank and re-broadcasting them each forward is pure waste.
* FSDP2 (``fully_shard`` after :func:`shard_frozen_factors`, with
  ``shard_placement_fn=fsdp_shard_placement(model)``, then :func:`place_factor_shards`;
  ``distributed.wrap_model`` does all three): everything is
  sharded (``torch.chunk`` sizes, uneven shards allowed). ``U_l``, ``W_h`` and ``U_h`` by rows, the rows of
  the stored weight: each rank computes ``U_h[rows]^T G_local``, the small ``k x (r-k)`` products are
  summed with an all-reduce, and each rank subtracts its rows. ``V_l`` and ``V_h`` by columns (FSDP2 shards
  a dimension other than 0 only evenly: a target whose column count does not divide by the world size
  keeps ``V_h`` whole and ``V_l`` sharded by rows, each row projected on its own without communication):
  the same all-reduced projection, transposed. ``W_h`` is gathered with the layer's other parameters for
  its forward and backward, exactly as a dense weight is; ``U_h`` and ``V_h`` are never gathered.
  Gathered, the sharded frozen factors are the unsharded ones bit for bit (tests).

In the training loop::

    names = apply_osft(model, unfreeze_rank_ratio=0.25)   # before wrapping
    ...  loss.backward() (gradients all-reduced / reduce-scattered)
    project_osft_gradients(model)
    clip_grad_norm_(...); optimizer.step()
    project_osft_parameters(model)
    ...
    merge_osft(model); model.save_pretrained(out)         # or dense_state_dict(full_state_dict)
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Shard
from transformers.pytorch_utils import Conv1D

__all__ = [
    "TARGETS_BY_MODEL_TYPE",
    "OSFTLinear",
    "apply_osft",
    "default_target_patterns",
    "dense_state_dict",
    "find_osft_targets",
    "frozen_factor_sharding",
    "fsdp_shard_placement",
    "merge_osft",
    "num_frozen_directions",
    "osft_modules",
    "osft_orthogonality_error",
    "place_factor_shards",
    "project_osft_gradients",
    "project_osft_parameters",
    "shard_frozen_factors",
]

# --------------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------------

_LAYERS = r"(?:^|\.)layers\.\d+\."  # model.layers.3. / gpt_neox.layers.3. / model.decoder.layers.3.
_H = r"(?:^|\.)h\.\d+\."  # transformer.h.3. (GPT-2, GPT-J, Falcon)
_LANGUAGE_LAYERS = r"(?:^|\.)language_model\.layers\.\d+\."  # multimodal: leave the vision tower alone
_QKVO = r"self_attn\.(?:q|k|v|o)_proj"
_MLP = r"mlp\.(?:gate|up|down)_proj"


def _in(block: str, *modules: str) -> tuple[str, ...]:
    return tuple(f"{block}{module}$" for module in modules)


_LLAMA_LIKE = _in(_LAYERS, _QKVO, _MLP)

TARGETS_BY_MODEL_TYPE: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "granite", "smollm3", "stablelm"), _LLAMA_LIKE),
    **dict.fromkeys(("gemma", "gemma2", "gemma3_text", "cohere", "cohere2", "exaone4"), _LLAMA_LIKE),
    **dict.fromkeys(("olmo", "olmo2", "olmo3", "seed_oss", "apertus", "arcee"), _LLAMA_LIKE),
    **dict.fromkeys(("gemma3", "mistral3"), _in(_LANGUAGE_LAYERS, _QKVO, _MLP)),
    "glm4": _in(_LAYERS, _QKVO, r"mlp\.(?:gate_up|down)_proj"),
    "phi3": _in(_LAYERS, r"self_attn\.(?:qkv|o)_proj", r"mlp\.(?:gate_up|down)_proj"),
    "phi": _in(_LAYERS, r"self_attn\.(?:q_proj|k_proj|v_proj|dense)", r"mlp\.fc[12]"),
    "starcoder2": _in(_LAYERS, _QKVO, r"mlp\.c_(?:fc|proj)"),
    "gpt2": _in(_H, r"attn\.c_(?:attn|proj)", r"mlp\.c_(?:fc|proj)"),
    "gptj": _in(_H, r"attn\.(?:q|k|v|out)_proj", r"mlp\.fc_(?:in|out)"),
    "falcon": _in(_H, r"self_attention\.(?:query_key_value|dense)", r"mlp\.dense_(?:h_to_4h|4h_to_h)"),
    "gpt_neox": _in(_LAYERS, r"attention\.(?:query_key_value|dense)", r"mlp\.dense_(?:h_to_4h|4h_to_h)"),
    "opt": _in(_LAYERS, r"self_attn\.(?:q|k|v|out)_proj", r"fc[12]"),
    # MoE: routed experts are fused 3-D tensors in transformers 5; attention and shared experts only.
    **dict.fromkeys(("mixtral", "qwen3_moe", "gpt_oss", "granitemoe"), _in(_LAYERS, _QKVO)),
    "qwen2_moe": _in(_LAYERS, _QKVO, r"mlp\.(?:shared_expert\.)?(?:gate|up|down)_proj"),
    "llama4_text": _in(_LAYERS, _QKVO, r"feed_forward\.(?:shared_expert\.)?(?:gate|up|down)_proj"),
}
"""Default target regexes (searched in module names) per ``config.model_type``."""

_PROJECTION_NAMES = (
    "q_proj|k_proj|v_proj|o_proj|qkv_proj|out_proj|gate_proj|up_proj|down_proj|gate_up_proj|c_attn|c_proj|"
    "c_fc|query_key_value|dense_h_to_4h|dense_4h_to_h|fc_in|fc_out|fc1|fc2|w1|w2|w3|wq|wk|wv|wo|wqkv"
)
_GENERIC_TARGETS = (rf"\.\d+\.(?:\w+\.)*(?:{_PROJECTION_NAMES})$",)
"""Fallback: a linear layer inside a numbered block whose own name is that of a projection."""


def default_target_patterns(model_type: str) -> list[str]:
    """The target regexes for ``model_type``, or the generic projection-name fallback for unknown types."""
    return list(TARGETS_BY_MODEL_TYPE.get(model_type, _GENERIC_TARGETS))


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def _is_projection(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(module, (nn.Linear, Conv1D)) and isinstance(weight, Tensor) and weight.dim() == 2


def _embedding_modules(model: nn.Module) -> set[int]:
    """ids of the input and output embedding modules, which are never decomposed (they may be tied)."""
    found: set[int] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        if module is not None:
            found.add(id(module))
    return found


def find_osft_targets(model: nn.Module, target_patterns: Sequence[str] | None = None) -> list[str]:
    """Names of the modules OSFT decomposes, in ``model.named_modules()`` order.

    A target is an ``nn.Linear`` (or transformers' ``Conv1D``) with a 2-D weight whose name matches
    (``re.search``) one of ``target_patterns``, by default :func:`default_target_patterns` of
    ``model.config.model_type``. The input and output embeddings are never targets. An empty
    ``target_patterns`` means the default.

    Raises:
        ValueError: a pattern is not a valid regex, or no module matches.
    """
    model_type = _model_type(model)
    patterns = list(target_patterns) if target_patterns else default_target_patterns(model_type)
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(f"OSFT target pattern {pattern!r} is not a valid regex: {error}") from error
    embeddings = _embedding_modules(model)
    candidates = [
        name
        for name, module in model.named_modules()
        if _is_projection(module) and id(module) not in embeddings
    ]
    names = [name for name in candidates if any(p.search(name) for p in compiled)]
    if not names:
        examples = ", ".join(candidates[:6]) or "none"
        raise ValueError(
            f"OSFT found no target modules in {type(model).__name__} (model_type {model_type!r}) with "
            f"patterns {patterns}; pass target_patterns: regexes searched in the names of its linear "
            f"layers (for example: {examples})"
        )
    return names


def num_frozen_directions(rank: int, unfreeze_rank_ratio: float) -> int:
    """``k = floor(rank * (1 - unfreeze_rank_ratio))``, leaving at least one trainable direction.

    The floor tolerates float noise (``10 * (1 - 0.3)`` is 6.999...: 7 directions are frozen, not 6).
    """
    _check_ratio(unfreeze_rank_ratio)
    frozen = math.floor(rank * (1.0 - unfreeze_rank_ratio) + 1e-9)
    return max(0, min(frozen, rank - 1))


def _check_ratio(unfreeze_rank_ratio: float) -> None:
    if isinstance(unfreeze_rank_ratio, bool) or not isinstance(unfreeze_rank_ratio, numbers.Real):
        raise ValueError(f"unfreeze_rank_ratio must be a number in (0, 1], got {unfreeze_rank_ratio!r}")
    if not 0.0 < unfreeze_rank_ratio <= 1.0:  # also rejects NaN
        raise ValueError(
            f"unfreeze_rank_ratio must be in (0, 1] (1.0 trains every singular direction), "
            f"got {unfreeze_rank_ratio}"
        )


# --------------------------------------------------------------------------------------------------------
# The decomposed layer
# --------------------------------------------------------------------------------------------------------


def _no_autocast(device_type: str) -> AbstractContextManager[object]:
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def _compute_dtype(x: Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _rebuild(
    dense_high: Tensor | None, u_low: Tensor, s_low: Tensor, v_low: Tensor, dtype: torch.dtype
) -> Tensor:
    """``W_h + (U_l * S_l) @ V_l`` in ``dtype``: the stored weight matrix."""
    weight = (u_low * s_low).to(dtype) @ v_low.to(dtype)
    return weight if dense_high is None else weight.add_(dense_high.to(dtype))


class _OSFTLinearFunction(torch.autograd.Function):
    """``F.linear(x, W_h + (U_l * S_l) @ V_l, bias)`` that rebuilds ``W`` in backward instead of saving it.

    Autocast is honoured by hand: inputs are cast to the autocast dtype (or run in ``x``'s dtype), and
    backward computes in the same dtype, returning each gradient in its input's dtype.
    """

    @staticmethod
    def forward(
        ctx: Any,  # torch's FunctionCtx, carrying what backward needs as attributes
        x: Tensor,
        dense_high: Tensor | None,
        u_low: Tensor,
        s_low: Tensor,
        v_low: Tensor,
        bias: Tensor | None,
        transposed: bool,
    ) -> Tensor:
        dtype = _compute_dtype(x)
        with _no_autocast(x.device.type):
            x_c = x.to(dtype)
            weight = _rebuild(dense_high, u_low, s_low, v_low, dtype)
            out = F.linear(x_c, weight.T if transposed else weight, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x_c, dense_high, u_low, s_low, v_low)
        ctx.dtype, ctx.transposed, ctx.x_dtype = dtype, transposed, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x_c, dense_high, u_low, s_low, v_low = ctx.saved_tensors
        dtype, transposed = ctx.dtype, ctx.transposed
        need_x, _, need_u, need_s, need_v, need_bias, _ = ctx.needs_input_grad
        grad_x = grad_u = grad_s = grad_v = grad_bias = None
        with _no_autocast(grad_out.device.type):
            grad = grad_out.to(dtype)
            if need_x:
                weight = _rebuild(dense_high, u_low, s_low, v_low, dtype)
                grad_x = (grad @ (weight.T if transposed else weight)).to(ctx.x_dtype)
            grad_2d = grad.reshape(-1, grad.shape[-1])
            if need_u or need_s or need_v:
                x_2d = x_c.reshape(-1, x_c.shape[-1])
                # Gradient of the stored weight matrix (out x in for nn.Linear, in x out for Conv1D).
                grad_w = x_2d.T @ grad_2d if transposed else grad_2d.T @ x_2d
                scaled_u = (u_low * s_low).to(dtype)
                if need_v:
                    grad_v = (scaled_u.T @ grad_w).to(v_low.dtype)
                if need_u or need_s:
                    grad_scaled_u = (grad_w @ v_low.to(dtype).T).to(u_low.dtype)
                    if need_u:
                        grad_u = grad_scaled_u * s_low
                    if need_s:
                        grad_s = (grad_scaled_u * u_low).sum(0).to(s_low.dtype)
            if need_bias:
                grad_bias = grad_2d.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_u, grad_s, grad_v, grad_bias, None


class OSFTLinear(nn.Module):
    """A linear layer whose weight is ``U_h diag(S_h) V_h`` (frozen) + ``U_l diag(S_l) V_l`` (trainable).

    The factors decompose the weight *as stored*: ``out x in`` for ``nn.Linear``, ``in x out`` for
    transformers' ``Conv1D`` (``transposed``), so :func:`dense_state_dict` needs no model to rebuild a
    checkpoint. Buffers: ``U_h``, ``S_h``, ``V_h`` (fp32, persistent). Parameters: ``U_l``, ``S_l``,
    ``V_l`` (the weight's dtype), ``bias`` (the original one, unchanged) and the frozen
    ``W_h = U_h diag(S_h) V_h`` (``dense_dtype``, ``requires_grad=False``; ``None`` when ``k = 0``): a
    parameter so that FSDP2 shards it and gathers it for the forward like any weight. A state dict
    without ``W_h`` (written before it was a parameter) loads too: ``W_h`` is then rebuilt from the loaded
    factors. :meth:`shard_frozen` keeps only this rank's share of ``U_h`` and ``V_h`` (see
    :func:`shard_frozen_factors`).
    """

    U_h: Tensor
    S_h: Tensor
    V_h: Tensor
    W_h: nn.Parameter | None

    def __init__(
        self,
        factors: tuple[Tensor, Tensor, Tensor],
        num_frozen: int,
        bias: Tensor | None = None,
        *,
        transposed: bool = False,
        dtype: torch.dtype | None = None,
        dense_dtype: torch.dtype | None = None,
    ) -> None:
        """Build from the fp32 SVD ``factors = (U, S, Vh)`` of the stored weight, freezing ``num_frozen``.

        ``dtype`` is the trainable factors' dtype (default: the factors'); ``dense_dtype`` that of the
        cached ``W_h`` (default: ``dtype``).
        """
        super().__init__()
        u, s, vh = factors
        rank = s.shape[0]
        if not 0 <= num_frozen < rank:
            raise ValueError(f"num_frozen must be in [0, {rank}), got {num_frozen}")
        dtype = dtype or u.dtype
        self.transposed = transposed
        rows, cols = u.shape[0], vh.shape[1]
        self.out_features, self.in_features = (cols, rows) if transposed else (rows, cols)
        self.num_frozen = num_frozen
        self.dense_dtype = dense_dtype or dtype
        k = num_frozen
        self.register_buffer("U_h", _own(u[:, :k], torch.float32))
        self.register_buffer("S_h", _own(s[:k], torch.float32))
        self.register_buffer("V_h", _own(vh[:k], torch.float32))
        self.register_parameter("W_h", None)
        self.U_l = nn.Parameter(_own(u[:, k:], dtype))
        self.S_l = nn.Parameter(_own(s[k:], dtype))
        self.V_l = nn.Parameter(_own(vh[k:], dtype))
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        self._dense_missing_key: str | None = None
        # this rank's shares of meta-device parameters, for place_factor_shards: name -> (local, shard dim)
        self._pending_shards: dict[str, tuple[Tensor, int]] = {}
        self.refresh_dense()
        self.register_load_state_dict_pre_hook(_note_missing_dense)
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        unfreeze_rank_ratio: float,
        *,
        factors: tuple[Tensor, Tensor, Tensor] | None = None,
        dense_dtype: torch.dtype | None = None,
    ) -> OSFTLinear:
        """Decompose an ``nn.Linear`` or ``Conv1D`` (or use its precomputed fp32 SVD ``factors``)."""
        if not _is_projection(module):
            raise TypeError(f"OSFT decomposes nn.Linear or Conv1D modules, not {type(module).__name__}")
        weight = _weight(module)
        if factors is None:
            factors = _svd(weight, weight.device)
        k = num_frozen_directions(min(weight.shape), unfreeze_rank_ratio)
        factors = tuple(f.to(weight.device) for f in factors)  # type: ignore[assignment]
        return cls(
            factors,
            k,
            getattr(module, "bias", None),
            transposed=isinstance(module, Conv1D),
            dtype=weight.dtype,
            dense_dtype=dense_dtype,
        )

    @classmethod
    def from_share(
        cls,
        module: nn.Module,
        unfreeze_rank_ratio: float,
        share: Mapping[str, Tensor],
        mesh: DeviceMesh,
        *,
        dense_dtype: torch.dtype | None = None,
    ) -> OSFTLinear:
        """Build from this rank's ``share`` of the decomposition of ``module``'s weight
        (:func:`_scattered_decompositions`): ``U_h`` and ``V_h`` as DTensors on ``mesh`` (``V_h`` whole when
        its columns do not split evenly), ``S_h`` whole, and ``U_l``, ``S_l``, ``V_l``, ``W_h`` as
        full-shaped meta parameters whose local shares :func:`place_factor_shards` puts in place once
        ``fully_shard`` has made them DTensors."""
        if not _is_projection(module):
            raise TypeError(f"OSFT decomposes nn.Linear or Conv1D modules, not {type(module).__name__}")
        weight = _weight(module)
        rows, cols = weight.shape
        rank = min(rows, cols)
        k = num_frozen_directions(rank, unfreeze_rank_ratio)
        meta = functools.partial(torch.empty, dtype=torch.float32, device="meta")
        layer = cls(
            (meta(rows, rank), meta(rank), meta(rank, cols)),
            k,
            getattr(module, "bias", None),
            transposed=isinstance(module, Conv1D),
            dtype=weight.dtype,
            dense_dtype=dense_dtype,
        )
        device = weight.device
        layer._buffers["S_h"] = _kept(share["S_h"], torch.float32, device)
        for name, dim in (("U_h", 0), ("V_h", _share_v_dim(cols, mesh.size()))):
            local = _kept(share[name], torch.float32, device)
            full = layer._buffers[name]
            assert full is not None
            layer._buffers[name] = (
                local
                if dim is None
                else DTensor.from_local(
                    local, mesh, [Shard(dim)], run_check=False, shape=full.shape, stride=full.stride()
                )
            )
        trainable_v_dim = 0 if _share_v_dim(cols, mesh.size()) is None else 1
        dims = {"U_l": 0, "S_l": 0, "V_l": trainable_v_dim, "W_h": 0}
        for name, dim in dims.items():
            parameter = layer._parameters.get(name)
            if parameter is None:  # W_h when k = 0
                continue
            layer._pending_shards[name] = (_kept(share[name], parameter.dtype, device), dim)
        return layer

    @property
    def rank(self) -> int:
        """``r = min(N, M)``: the number of singular directions."""
        return self.num_frozen + self.S_l.shape[0]

    @torch.no_grad()
    def refresh_dense(self) -> None:
        """Rebuild the frozen part ``W_h = U_h diag(S_h) V_h`` from the buffers.

        With sharded factors (:meth:`shard_frozen`, FSDP2) each rank rebuilds its own rows of ``W_h``
        from its rows of ``U_h`` and the whole ``V_h`` (gathered for the call): a collective.
        """
        if self.num_frozen == 0:
            self.W_h = None
            return
        if self.W_h is not None:  # follow ``module.to(dtype)``
            self.dense_dtype = self.W_h.dtype
        if isinstance(self.W_h, DTensor) or isinstance(self.U_h, DTensor):
            local, start, stop, _ = _local_range(self.W_h, 0)  # type: ignore[arg-type]
            rows = _frozen_slice(self.U_h, 0, start, stop)
            v_h = self.V_h.full_tensor() if isinstance(self.V_h, DTensor) else self.V_h
            local.copy_((rows * self.S_h) @ v_h)
            return
        dense = ((self.U_h * self.S_h) @ self.V_h).to(self.dense_dtype)
        self.W_h = nn.Parameter(dense, requires_grad=False)

    @torch.no_grad()
    def shard_frozen(self, mesh: DeviceMesh) -> None:
        """Keep only this rank's share of ``U_h`` and ``V_h`` (DTensors on the 1-D ``mesh``).

        ``U_h`` is split by rows (``Shard(0)``, ``torch.chunk`` sizes), the rows FSDP2 gives this rank of
        ``U_l`` and ``W_h``; ``V_h`` by columns (``Shard(1)``), the columns of ``V_l`` under
        :func:`fsdp_shard_placement`, when the column count divides by the mesh size (FSDP2 shards a
        dimension other than 0 only evenly); otherwise ``V_h`` stays whole on every rank and ``V_l`` is
        sharded by rows. Idempotent.
        """
        if mesh.ndim != 1:
            raise ValueError(f"OSFT shards its frozen factors over a 1-D device mesh, got {mesh.ndim}-D")
        for name, dim in frozen_factor_sharding(self, mesh.size()).items():
            tensor = getattr(self, name)
            if dim is None or name == "W_h" or tensor is None or isinstance(tensor, DTensor):
                continue
            self._buffers[name] = _shard_tensor(tensor, mesh, dim)

    def forward(self, x: Tensor) -> Tensor:
        if self._pending_shards:
            raise RuntimeError(
                "this OSFT layer's trainable factors and W_h wait on the meta device for FSDP2: wrap the model "
                "with fully_shard(..., shard_placement_fn=fsdp_shard_placement(model)) and call "
                "place_factor_shards(model) (distributed.wrap_model does both) before running it"
            )
        return _OSFTLinearFunction.apply(
            x, self.W_h, self.U_l, self.S_l, self.V_l, self.bias, self.transposed
        )

    @torch.no_grad()
    def dense_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """``U_h S_h V_h + U_l S_l V_l`` computed in fp32 and cast to ``dtype`` (default: the weight's)."""
        for tensor in (self.U_h, self.V_h, self.U_l, self.S_l, self.V_l):
            if isinstance(tensor, DTensor):
                raise TypeError(
                    "OSFT factors are sharded (FSDP2): gather a full state dict and use dense_state_dict"
                )
        weight = _dense_from_factors(self.U_h, self.S_h, self.V_h, self.U_l, self.S_l, self.V_l)
        return weight.to(dtype or self.U_l.dtype)

    def to_dense_module(self, dtype: torch.dtype | None = None) -> nn.Linear | Conv1D:
        """A plain ``nn.Linear`` (or ``Conv1D``) with the rebuilt weight and this layer's bias."""
        weight = self.dense_weight(dtype)
        with torch.device("meta"):
            module: nn.Linear | Conv1D = (
                Conv1D(self.out_features, self.in_features)
                if self.transposed
                else nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
            )
        module.weight = nn.Parameter(weight)
        if self.bias is None:
            module.bias = None  # Conv1D always has a bias; a bias-free Conv1D never reaches here
        elif self.bias.dtype == weight.dtype:
            module.bias = self.bias
        else:
            module.bias = nn.Parameter(self.bias.detach().to(weight.dtype))
        return module

    def extra_repr(self) -> str:
        kind = ", conv1d" if self.transposed else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"frozen={self.num_frozen}, trainable={self.rank - self.num_frozen}, "
            f"bias={self.bias is not None}{kind}"
        )


def _note_missing_dense(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *_: object) -> None:
    """``load_state_dict`` pre-hook: remember whether the state dict lacks ``W_h`` (older checkpoints)."""
    assert isinstance(module, OSFTLinear)
    key = f"{prefix}W_h"
    module._dense_missing_key = key if module.W_h is not None and key not in state_dict else None


def _refresh_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook: without a stored ``W_h``, rebuild it from the loaded frozen factors."""
    assert isinstance(module, OSFTLinear)
    key, module._dense_missing_key = module._dense_missing_key, None
    if key is None:
        return
    if key in incompatible_keys.missing_keys:
        incompatible_keys.missing_keys.remove(key)
    module.refresh_dense()


def frozen_factor_sharding(module: OSFTLinear, world_size: int) -> dict[str, int | None]:
    """The dimension each frozen tensor of ``module`` is split on over ``world_size`` FSDP2 ranks.

    ``U_h`` and ``W_h`` by rows (dim 0, like FSDP2 splits ``U_l``); ``V_h`` by columns (dim 1, like
    :func:`fsdp_shard_placement` splits ``V_l``) when its column count divides by ``world_size``, else
    ``None`` (whole on every rank); ``S_h`` (``k`` numbers) ``None``.
    """
    columns = module.V_h.shape[1]
    return {"U_h": 0, "S_h": None, "V_h": 1 if columns % world_size == 0 else None, "W_h": 0}


def _shard_tensor(tensor: Tensor, mesh: DeviceMesh, dim: int) -> DTensor:
    """This rank's ``torch.chunk`` share of ``tensor`` along ``dim`` as a DTensor (no communication)."""
    parts = mesh.size()
    coordinate = (mesh.get_coordinate() or [0])[0]
    start, stop = _chunk_range(0, tensor.shape[dim], parts, coordinate)
    local = tensor.narrow(dim, start, stop - start).clone(memory_format=torch.contiguous_format)
    return DTensor.from_local(
        local, mesh, [Shard(dim)], run_check=False, shape=tensor.shape, stride=tensor.stride()
    )


def _own(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """A contiguous copy that shares no storage with the full SVD factors (safe to save and shard)."""
    return tensor.to(dtype).clone(memory_format=torch.contiguous_format)


def _kept(tensor: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``tensor`` itself when it is contiguous, alone on its storage and of ``dtype`` on ``device`` (a
    received share), else a copy of it that is (:func:`_own`)."""
    alone = tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.nbytes
    if alone and tensor.is_contiguous() and tensor.dtype == dtype and tensor.device == device:
        return tensor
    return _own(tensor, dtype).to(device)


def _dense_from_factors(
    u_h: Tensor, s_h: Tensor, v_h: Tensor, u_l: Tensor, s_l: Tensor, v_l: Tensor
) -> Tensor:
    weight = (u_l.float() * s_l.float()) @ v_l.float()
    if s_h.numel():
        weight.addmm_(u_h.float() * s_h.float(), v_h.float())
    return weight


# --------------------------------------------------------------------------------------------------------
# Applying OSFT (with the SVDs spread over the ranks)
# --------------------------------------------------------------------------------------------------------


def _svd(weight: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 thin SVD of ``weight`` computed on ``device``."""
    matrix = weight.detach().to(device=device, dtype=torch.float32)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u, s, vh


def _svd_device(weight: Tensor) -> torch.device:
    """Where to decompose (and broadcast) ``weight``: its own device, or the accelerator when it is on
    the CPU and one is in use (faster; and NCCL cannot broadcast CPU tensors). The gloo backend keeps
    CPU weights on the CPU."""
    if weight.device.type != "cpu":
        return weight.device
    if dist.is_available() and dist.is_initialized():
        backend = str(dist.get_backend()).lower()
        if "gloo" in backend or "mpi" in backend:
            return weight.device
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is None:
        return weight.device
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def _decompositions(modules: Sequence[nn.Module]) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """The fp32 SVD of each module's stored weight, in order; spread over the ranks when distributed.

    The weights go in rounds of ``world_size``: in round ``t`` rank ``i`` decomposes weight
    ``t * world_size + i``, then each result of the round is broadcast from its owner as one flat buffer,
    in order, and yielded (so the caller can replace the module, keep its share and free the weight
    before the next one arrives). A rank so holds at most one decomposition of its own and the one being
    handed out, never all of its share at once.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    weights = [_weight(module) for module in modules]
    if world == 1:
        for weight in weights:
            yield _svd(weight, _svd_device(weight))
        return
    rank = dist.get_rank()
    for first in range(0, len(weights), world):
        round_ = range(first, min(first + world, len(weights)))
        mine = None
        if first + rank in round_:
            weight = weights[first + rank]
            mine = torch.cat([t.reshape(-1) for t in _svd(weight, _svd_device(weight))])
        for j in round_:
            rows, cols = weights[j].shape
            r = min(rows, cols)
            sizes = (rows * r, r, r * cols)
            if j == first + rank and mine is not None:
                flat, mine = mine, None
            else:
                flat = torch.empty(sum(sizes), dtype=torch.float32, device=_svd_device(weights[j]))
            dist.broadcast(flat, src=j - first)
            u, s, vh = flat.split(sizes)
            yield u.view(rows, r), s, vh.view(r, cols)


def _scatters_over(mesh: DeviceMesh) -> bool:
    """Whether :func:`apply_osft` scatters the decompositions over ``mesh``: distributed, and ``mesh`` is the
    1-D mesh over every rank (what FSDP2 shards on).

    Raises:
        ValueError: a mesh that is not 1-D or does not cover every rank.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return False
    if mesh.ndim != 1 or mesh.size() != dist.get_world_size():
        raise ValueError(
            f"OSFT scatters its factors over a 1-D mesh of all {dist.get_world_size()} ranks, got a "
            f"{mesh.ndim}-D mesh of {mesh.size()}"
        )
    return True


def _mesh_ranks(mesh: DeviceMesh) -> list[int]:
    """The global rank at each coordinate of a 1-D mesh (the share index of each rank)."""
    return [int(r) for r in mesh.mesh.flatten().tolist()]


def _share_v_dim(columns: int, parts: int) -> int | None:
    """The dimension ``V_h`` is split on over ``parts`` ranks (as :func:`frozen_factor_sharding`)."""
    return 1 if columns % parts == 0 else None


def _share_of(
    u: Tensor, s: Tensor, vh: Tensor, w_h: Tensor, k: int, index: int, parts: int
) -> dict[str, Tensor]:
    """Views of the share of rank ``index`` (of ``parts``) of a decomposition, as FSDP2 and
    :func:`frozen_factor_sharding` split it: rows of ``U_h``, ``U_l`` and ``W_h``; ``S_h`` whole and
    ``S_l``'s chunk; columns of ``V_h`` and ``V_l`` when they split evenly, else ``V_h`` whole and rows of
    ``V_l`` (``torch.chunk`` ranges everywhere). Works on meta tensors (for the shapes)."""
    rows, rank = u.shape
    cols = vh.shape[1]
    low, high = _chunk_range(0, rows, parts, index)
    s_low, s_high = _chunk_range(k, rank, parts, index)
    share = {
        "U_h": u[low:high, :k],
        "U_l": u[low:high, k:],
        "S_h": s[:k],
        "S_l": s[s_low:s_high],
        "W_h": w_h[low:high],
    }
    if _share_v_dim(cols, parts) == 1:
        c_low, c_high = _chunk_range(0, cols, parts, index)
        share["V_h"], share["V_l"] = vh[:k, c_low:c_high], vh[k:, c_low:c_high]
    else:
        share["V_h"], share["V_l"] = vh[:k], vh[s_low:s_high]
    return share


_SHARE_ORDER = ("U_h", "S_h", "V_h", "U_l", "S_l", "V_l", "W_h")


def _share_dtypes(weight: Tensor, dense_dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """The dtype each piece of a share is sent and kept in (that of :class:`OSFTLinear`'s tensor)."""
    trainable, dense = weight.dtype, dense_dtype or weight.dtype
    return {"U_h": torch.float32, "S_h": torch.float32, "V_h": torch.float32, "W_h": dense} | dict.fromkeys(
        ("U_l", "S_l", "V_l"), trainable
    )


def _scattered_decompositions(
    modules: Sequence[nn.Module],
    mesh: DeviceMesh,
    unfreeze_rank_ratio: float,
    dense_dtype: torch.dtype | None,
) -> Iterator[dict[str, Tensor]]:
    """This rank's share (:func:`_share_of`, each piece a contiguous tensor of its own in its final dtype,
    :func:`_share_dtypes`) of the fp32 SVD of each module's stored weight, in order.

    Rounds as in :func:`_decompositions`: in round ``t`` rank ``i`` decomposes weight ``t * world + i``;
    then, weight by weight, its owner builds ``W_h = (U_h * S_h) @ V_h`` as the unsharded path does and
    sends each other rank only the pieces of its share (point to point, straight into the tensors that
    rank keeps), then keeps its own. A rank so holds at most its own current decomposition (with its
    ``W_h``) besides shares. The caller must drop each share once used (the generator keeps none).
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    parts = mesh.size()
    ranks = _mesh_ranks(mesh)
    me = ranks.index(rank)
    weights = [_weight(module) for module in modules]
    for first in range(0, len(weights), world):
        round_ = range(first, min(first + world, len(weights)))
        mine = None
        if first + rank in round_:
            weight = weights[first + rank]
            mine = _svd(weight, _svd_device(weight))
        for j in round_:
            k = num_frozen_directions(min(weights[j].shape), unfreeze_rank_ratio)
            dtypes = _share_dtypes(weights[j], dense_dtype)
            if j == first + rank and mine is not None:
                u, s, vh = mine
                mine = None
                w_h = ((u[:, :k] * s[:k]) @ vh[:k]).to(dtypes["W_h"])
                # the others first: this rank's own share is only made once theirs have gone
                for index in [*range(me + 1, parts), *range(me)]:
                    share = _share_of(u, s, vh, w_h, k, index, parts)
                    for name in _SHARE_ORDER:
                        dist.send(_own(share[name], dtypes[name]), dst=ranks[index])
                    del share
                share = {
                    name: _own(t, dtypes[name]) for name, t in _share_of(u, s, vh, w_h, k, me, parts).items()
                }
                del u, s, vh, w_h
            else:
                share = _empty_share(weights[j], k, me, parts, dtypes, torch.empty)
                for name in _SHARE_ORDER:
                    dist.recv(share[name], src=j - first)
            yield share
            del share


def _empty_share(
    weight: Tensor,
    k: int,
    index: int,
    parts: int,
    dtypes: Mapping[str, torch.dtype],
    factory: Callable[..., Tensor],
) -> dict[str, Tensor]:
    """New tensors (``factory``: ``torch.empty`` or ``torch.zeros``) shaped like share ``index`` of the
    decomposition of ``weight`` (:func:`_share_of`), in their final dtypes, on the device its SVD runs on."""
    rows, cols = weight.shape
    r = min(rows, cols)
    on_meta = functools.partial(torch.empty, device="meta")
    shapes = _share_of(on_meta(rows, r), on_meta(r), on_meta(r, cols), on_meta(rows, cols), k, index, parts)
    device = _svd_device(weight)
    return {name: factory(shapes[name].shape, dtype=dtypes[name], device=device) for name in _SHARE_ORDER}


def _placeholder_shares(
    modules: Sequence[nn.Module],
    mesh: DeviceMesh,
    unfreeze_rank_ratio: float,
    dense_dtype: torch.dtype | None,
) -> Iterator[dict[str, Tensor]]:
    """Zero shares (:func:`_empty_share`) of this rank for each module, to be overwritten by a load: the
    resume path's counterpart of :func:`_scattered_decompositions` (no SVD, nothing sent, no whole layer)."""
    me = _mesh_ranks(mesh).index(dist.get_rank())
    for module in modules:
        weight = _weight(module)
        k = num_frozen_directions(min(weight.shape), unfreeze_rank_ratio)
        yield _empty_share(weight, k, me, mesh.size(), _share_dtypes(weight, dense_dtype), torch.zeros)


def _weight(module: nn.Module) -> Tensor:
    """The stored weight of a projection (``nn.Linear`` or ``Conv1D``)."""
    weight = module.weight
    if not isinstance(weight, Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor to decompose")
    return weight


def _placeholder_factors(module: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """Zero ``(U, S, Vh)`` shaped like the thin SVD of ``module.weight``, to be overwritten by a load."""
    weight = _weight(module)
    rows, cols = weight.shape
    rank = min(rows, cols)
    zeros = functools.partial(torch.zeros, dtype=torch.float32, device=weight.device)
    return zeros(rows, rank), zeros(rank), zeros(rank, cols)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_osft(
    model: nn.Module,
    *,
    unfreeze_rank_ratio: float,
    target_patterns: Sequence[str] | None = None,
    dense_dtype: torch.dtype | None = None,
    decompose: bool = True,
    frozen_mesh: DeviceMesh | None = None,
) -> list[str]:
    """Replace each target of :func:`find_osft_targets` by an :class:`OSFTLinear`; return their names.

    Call it before wrapping the model in DDP or FSDP2, with the full model on every rank: when
    ``torch.distributed`` is initialised the SVDs are spread over the ranks and broadcast, or scattered
    with ``frozen_mesh`` (a collective: every rank must call it). ``dense_dtype`` is the dtype of the cached frozen weight ``W_h`` (default:
    the weight's dtype; ``torch.bfloat16`` halves its memory under bf16 autocast).

    ``decompose=False`` skips the SVDs and builds every module with zero factors of the right shapes: for
    a model whose OSFT state (frozen and trainable factors) is loaded from a checkpoint next, as on resume.

    ``frozen_mesh`` (the 1-D mesh over every rank that FSDP2 will shard over; distributed): the rank that
    decomposes a layer sends every other rank only its share (rows of ``U`` and ``W_h``, columns of ``V``
    as :func:`frozen_factor_sharding` says, the small ``S``), never the whole decomposition. ``U_h`` and
    ``V_h`` become DTensors right away; the trainable factors and ``W_h`` are left on the meta device
    (full shapes) with this rank's shares set aside, and :func:`place_factor_shards` hands those to the
    DTensors ``fully_shard`` creates (``distributed.wrap_model`` does both): so no rank ever holds more of
    the OSFT factors than its share plus the one layer it is decomposing. Gathered, the shares are the
    factors of the path without ``frozen_mesh`` bit for bit. With ``decompose=False`` (resume) each rank
    builds zero shares of the same shapes instead, so a resumed run never holds a whole layer's factors.

    Raises:
        ValueError: ``unfreeze_rank_ratio`` outside ``(0, 1]``, OSFT already applied, or no target found.
    """
    _check_ratio(unfreeze_rank_ratio)
    if osft_modules(model):
        raise ValueError("OSFT is already applied to this model")
    names = find_osft_targets(model, target_patterns)
    modules = [model.get_submodule(name) for name in names]
    if frozen_mesh is not None and _scatters_over(frozen_mesh):
        ratio = unfreeze_rank_ratio
        if decompose:
            shares = _scattered_decompositions(modules, frozen_mesh, ratio, dense_dtype)
        else:
            shares = _placeholder_shares(modules, frozen_mesh, ratio, dense_dtype)
        for name, module, share in zip(names, modules, shares, strict=True):
            replacement = OSFTLinear.from_share(module, ratio, share, frozen_mesh, dense_dtype=dense_dtype)
            replacement.train(module.training)
            _set_submodule(model, name, replacement)
            module.weight = None  # type: ignore[assignment]  # free the dense weight now, not at the end
            del share  # the layer keeps the pieces it needs; nothing else may
        return names
    decompositions = _decompositions(modules) if decompose else map(_placeholder_factors, modules)
    for name, module, factors in zip(names, modules, decompositions, strict=True):
        replacement = OSFTLinear.from_module(
            module, unfreeze_rank_ratio, factors=factors, dense_dtype=dense_dtype
        )
        replacement.train(module.training)
        if frozen_mesh is not None:
            replacement.shard_frozen(frozen_mesh)
        _set_submodule(model, name, replacement)
        module.weight = None  # type: ignore[assignment]  # free the dense weight now, not at the end
    return names


def osft_modules(model: nn.Module) -> dict[str, OSFTLinear]:
    """The decomposed layers by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, OSFTLinear)}


def shard_frozen_factors(model: nn.Module, mesh: DeviceMesh) -> None:
    """Split every OSFT layer's ``U_h`` (rows) and ``V_h`` (columns) over ``mesh``; before FSDP2 wrapping.

    Call with the mesh given to ``fully_shard`` (and its ``shard_placement_fn=fsdp_shard_placement(model)``)
    so each rank's share of a frozen factor covers the rows or columns of the trainable factor FSDP2
    gives it: the projections then stay local plus one small all-reduce per factor. ``W_h`` is a
    parameter and FSDP2 shards it itself. Modules already sharded are left as they are.
    """
    for module in osft_modules(model).values():
        module.shard_frozen(mesh)


@torch.no_grad()
def place_factor_shards(model: nn.Module) -> None:
    """Hand each OSFT layer's set-aside shares (:func:`apply_osft` with ``frozen_mesh``) to the DTensors
    ``fully_shard`` made of its meta-device ``U_l``, ``S_l``, ``V_l`` and ``W_h``; call right after
    ``fully_shard`` (``distributed.wrap_model`` does). Each parameter is replaced by a DTensor on FSDP2's
    mesh and placement holding this rank's share; FSDP2 adopts it (and pads an uneven last shard) at its
    lazy initialisation, as after ``load_state_dict(..., assign=True)``. Layers with nothing set aside are
    left as they are.

    Raises:
        RuntimeError: a parameter is not yet a DTensor (not wrapped), or FSDP2 splits it on another
            dimension or into other sizes than the share (a ``shard_placement_fn`` other than
            :func:`fsdp_shard_placement`).
    """
    for layer_name, module in osft_modules(model).items():
        pending, module._pending_shards = module._pending_shards, {}
        for name, (local, dim) in pending.items():
            parameter = module._parameters[name]
            where = f"{layer_name}.{name}"
            if not isinstance(parameter, DTensor):
                module._pending_shards = pending
                raise RuntimeError(f"{where} is not sharded yet: call place_factor_shards after fully_shard")
            mesh = parameter.device_mesh
            coordinate = (mesh.get_coordinate() or [0])[0]
            low, high = _chunk_range(0, parameter.shape[dim], mesh.size(), coordinate)
            if _shard_dim(parameter) != dim or local.shape[dim] != high - low:
                module._pending_shards = pending
                raise RuntimeError(
                    f"FSDP2 split {where} as {parameter.placements}, its share is rows {low}:{high} of dim "
                    f"{dim}: shard with fully_shard(..., shard_placement_fn=fsdp_shard_placement(model))"
                )
            sharded = DTensor.from_local(
                local,
                mesh,
                parameter.placements,
                run_check=False,
                shape=parameter.shape,
                stride=parameter.stride(),
            )
            setattr(module, name, nn.Parameter(sharded, requires_grad=parameter.requires_grad))


def fsdp_shard_placement(model: nn.Module) -> Any:
    """A ``shard_placement_fn`` for ``fully_shard``: ``Shard(1)`` for each ``V_l`` whose ``V_h`` is split by
    columns (:func:`shard_frozen_factors`), FSDP2's default ``Shard(0)`` for everything else."""
    by_columns = {
        id(module.V_l)
        for module in osft_modules(model).values()
        if isinstance(module.V_h, DTensor) and _shard_dim(module.V_h) == 1
    }

    def placement(param: nn.Parameter) -> Placement | None:
        return Shard(1) if id(param) in by_columns else None

    return placement


# --------------------------------------------------------------------------------------------------------
# Projections (plain tensors, DDP, FSDP2 DTensor shards)
# --------------------------------------------------------------------------------------------------------


def _chunk_range(start: int, stop: int, parts: int, index: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` split like ``torch.chunk(rows, parts)``: the range of chunk ``index``."""
    length = stop - start
    size = -(-length // parts) if length else 0
    low = min(index * size, length)
    return start + low, start + min(low + size, length)


def _shard_dim(tensor: Tensor) -> int | None:
    """The tensor dimension a DTensor is split on (``None``: a plain or replicated tensor)."""
    if not isinstance(tensor, DTensor):
        return None
    dims = {placement.dim for placement in tensor.placements if type(placement) is Shard}
    if len(dims) > 1:
        raise NotImplementedError(f"OSFT supports a tensor sharded on one dimension, not {tensor.placements}")
    return dims.pop() if dims else None


def _local_range(tensor: Tensor, dim: int) -> tuple[Tensor, int, int, list[dist.ProcessGroup]]:
    """``(local tensor, start, stop, groups splitting it)`` along ``dim`` of a plain or ``Shard(dim)``
    tensor: the local tensor holds indices ``[start, stop)`` of ``dim``.

    Raises:
        NotImplementedError: a DTensor placement other than ``Replicate`` or ``Shard(dim)``.
    """
    if not isinstance(tensor, DTensor):
        return tensor, 0, tensor.shape[dim], []
    start, stop = 0, tensor.shape[dim]
    groups: list[dist.ProcessGroup] = []
    mesh = tensor.device_mesh
    coordinate = mesh.get_coordinate() or [0] * mesh.ndim
    for mesh_dim, placement in enumerate(tensor.placements):
        if placement.is_replicate():
            continue
        if type(placement) is Shard and placement.dim == dim:
            start, stop = _chunk_range(start, stop, mesh.size(mesh_dim), coordinate[mesh_dim])
            groups.append(mesh.get_group(mesh_dim))
            continue
        raise NotImplementedError(f"OSFT expects Replicate or Shard({dim}) placements here, not {placement}")
    local = tensor.to_local()
    if local.shape[dim] != stop - start:
        raise RuntimeError(
            f"local shard has {local.shape[dim]} entries on dim {dim}, expected {stop - start} "
            f"({start}:{stop})"
        )
    return local, start, stop, groups


def _local_rows(tensor: Tensor) -> tuple[Tensor, int, int, list[dist.ProcessGroup]]:
    """:func:`_local_range` on dim 0."""
    return _local_range(tensor, 0)


def _frozen_slice(frozen: Tensor, dim: int, start: int, stop: int) -> Tensor:
    """Indices ``[start, stop)`` along ``dim`` of a frozen factor: a slice of a whole one, or this rank's
    share of a sharded one (which must cover exactly that range)."""
    if not isinstance(frozen, DTensor):
        return frozen.narrow(dim, start, stop - start)
    local, low, high, _ = _local_range(frozen, dim)
    if (low, high) != (start, stop):
        raise RuntimeError(
            f"the frozen factor's shard covers {low}:{high} on dim {dim}, its trainable twin's {start}:{stop}: "
            "shard with shard_frozen_factors and fully_shard(..., shard_placement_fn=fsdp_shard_placement)"
        )
    return local


def _whole(frozen: Tensor) -> Tensor:
    """A frozen factor in full (gathered when sharded: a collective)."""
    return frozen.full_tensor() if isinstance(frozen, DTensor) else frozen


class _ColumnSpaceRemover:
    """``G <- G - B (B^T G)`` for row-sharded ``G`` and matching rows of ``B``: all-reduces ``B^T G``.

    The small products are all-reduced asynchronously and applied in batches, so the communication of
    one target overlaps the matmuls of the next ones.
    """

    def __init__(self, max_pending_bytes: int = 256 << 20) -> None:
        self.max_pending_bytes = max_pending_bytes
        self.pending: list[tuple[Tensor, Tensor, Tensor, Tensor, dist.Work | None]] = []
        self.pending_bytes = 0

    def add(self, local: Tensor, basis_rows: Tensor, groups: Sequence[dist.ProcessGroup]) -> None:
        work = local if local.dtype == basis_rows.dtype else local.to(basis_rows.dtype)
        coefficients = basis_rows.T @ work
        handle = None
        if groups:
            for group in groups[:-1]:
                dist.all_reduce(coefficients, group=group)
            handle = dist.all_reduce(coefficients, group=groups[-1], async_op=True)
        self.pending.append((local, work, basis_rows, coefficients, handle))
        self.pending_bytes += coefficients.numel() * coefficients.element_size()
        if self.pending_bytes >= self.max_pending_bytes:
            self.flush()

    def flush(self) -> None:
        for local, work, basis_rows, coefficients, handle in self.pending:
            if handle is not None:
                handle.wait()
            work.addmm_(basis_rows, coefficients, alpha=-1.0)
            if work is not local:
                local.copy_(work)
        self.pending.clear()
        self.pending_bytes = 0


def _remove_row_space(local: Tensor, basis: Tensor) -> None:
    """``G <- G - (G B^T) B`` for the rows of ``G`` (each row on its own: no communication)."""
    if local.numel() == 0:
        return
    work = local if local.dtype == basis.dtype else local.to(basis.dtype)
    work.addmm_(work @ basis.T, basis, alpha=-1.0)
    if work is not local:
        local.copy_(work)


@torch.no_grad()
def _project(model: nn.Module, *, gradients: bool) -> None:
    remover = _ColumnSpaceRemover()
    for module in osft_modules(model).values():
        if module.num_frozen == 0:
            continue
        u = module.U_l.grad if gradients else module.U_l
        if u is not None:
            local, start, stop, groups = _local_rows(u)
            remover.add(local, _frozen_slice(module.U_h, 0, start, stop), groups)
        v = module.V_l.grad if gradients else module.V_l
        if v is not None:
            if _shard_dim(v) == 1:  # columns of V_l and V_h: G^T <- G^T - V_h^T (V_h G^T), all-reduced
                local, start, stop, groups = _local_range(v, 1)
                remover.add(local.T, _frozen_slice(module.V_h, 1, start, stop).T, groups)
            else:
                _remove_row_space(_local_rows(v)[0], _whole(module.V_h))
    remover.flush()


def project_osft_gradients(model: nn.Module) -> None:
    """Project the gradients of every ``U_l`` and ``V_l`` off the frozen subspaces.

    Call after backward (and after DDP's all-reduce / FSDP2's reduce-scatter), before clipping and
    ``optimizer.step()``. Under FSDP2 it is a collective (one small all-reduce per target).
    """
    _project(model, gradients=True)


@torch.no_grad()
def project_osft_parameters(model: nn.Module) -> None:
    """Project every ``U_l`` and ``V_l`` off the frozen subspaces; call after ``optimizer.step()``.

    AdamW rescales each gradient element separately, which moves a projected step partly back into the
    frozen subspace; without this the leak accumulates (see the tests). Under FSDP2 it is a collective.
    """
    _project(model, gradients=False)


@torch.no_grad()
def osft_orthogonality_error(model: nn.Module) -> float:
    """``max`` over targets of ``max|U_h^T U_l|`` and ``max|V_l V_h^T|`` (0 for a fresh decomposition).

    A collective when the factors are sharded (every rank must call it; all get the same value).
    """
    worst = torch.zeros((), dtype=torch.float32)
    sharded = False
    for module in osft_modules(model).values():
        if module.num_frozen == 0:
            continue
        local, start, stop, groups = _local_rows(module.U_l)
        overlap = _frozen_slice(module.U_h, 0, start, stop).T @ local.to(torch.float32)
        for group in groups:
            dist.all_reduce(overlap, group=group)
        worst = torch.maximum(worst, overlap.abs().max().cpu())
        if _shard_dim(module.V_l) == 1:
            v_local, start, stop, groups = _local_range(module.V_l, 1)
            overlap = v_local.to(torch.float32) @ _frozen_slice(module.V_h, 1, start, stop).T
            for group in groups:
                dist.all_reduce(overlap, group=group)
            worst = torch.maximum(worst, overlap.abs().max().cpu())
        else:
            v_h = _whole(module.V_h)
            v_local = _local_rows(module.V_l)[0]
            if v_local.numel():
                worst = torch.maximum(worst, (v_local.to(torch.float32) @ v_h.T).abs().max().cpu())
        sharded = sharded or isinstance(module.U_l, DTensor) or isinstance(module.V_l, DTensor)
    if sharded:
        device = next(iter(osft_modules(model).values())).U_h.device
        on_device = worst.to(device)
        dist.all_reduce(on_device, op=dist.ReduceOp.MAX)
        worst = on_device.cpu()
    return float(worst)


# --------------------------------------------------------------------------------------------------------
# Back to dense
# --------------------------------------------------------------------------------------------------------

_FACTOR_NAMES = ("U_h", "S_h", "V_h", "U_l", "S_l", "V_l")


@torch.no_grad()
def merge_osft(model: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Put plain ``nn.Linear`` (or ``Conv1D``) layers back, with ``W = U_h S_h V_h + U_l S_l V_l``.

    The weight is rebuilt in fp32 and cast to ``dtype`` (default: the weight's original dtype), so
    ``model.save_pretrained`` then writes a standard checkpoint that plain transformers loads. For a
    model sharded by FSDP2, gather a full state dict and use :func:`dense_state_dict` instead.
    """
    for name, module in osft_modules(model).items():
        dense = module.to_dense_module(dtype)
        dense.train(module.training)
        _set_submodule(model, name, dense)


@torch.no_grad()
def dense_state_dict(state_dict: Mapping[str, Tensor], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """A copy of a full (unsharded) state dict with each OSFT layer's factors replaced by its ``weight``.

    For every ``<prefix>.U_h``, ``S_h``, ``V_h``, ``U_l``, ``S_l``, ``V_l`` group the result has
    ``<prefix>.weight`` (rebuilt in fp32, cast to ``dtype``, by default ``U_l``'s dtype) in the stored
    layout of the original module; biases and every other entry are kept as they are.
    """
    prefixes = [key[: -len(".U_l")] for key in state_dict if key.endswith(".U_l")]
    out = dict(state_dict)
    for prefix in prefixes:
        factors = [out.pop(f"{prefix}.{name}") for name in _FACTOR_NAMES]
        out.pop(f"{prefix}.W_h", None)
        out[f"{prefix}.weight"] = _dense_from_factors(*factors).to(dtype or factors[3].dtype)
    return out
