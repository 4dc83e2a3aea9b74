"""Which attention kernel the engine runs, and ``sdpa_per_sample``: sdpa run sample by sample over a packed row.

A packed micro-batch (:mod:`kfp_components.trainer.batching`) is one row whose ``position_ids`` restart at
every sample. Plain ``sdpa`` attends over the whole row with a block-diagonal mask, so its cost grows with
the square of the micro-batch, not with the squares of its samples (``benchmarks/attention.py``: a packed
16,384-token row of 512-token samples costs about 20x its samples batched on a CPU). The per-sample kernels:

* ``flash_attention_2``: variable-length flash attention; transformers derives the samples' boundaries
  (``cu_seqlens``) from the restarting ``position_ids``. Needs the ``flash-attn`` package, a CUDA GPU of
  compute capability 8.0 or more and 16-bit compute (it has no float32 kernel).
* ``flex_attention``: torch's FlexAttention with a document block mask (transformers builds it from the
  restarting ``position_ids``), compiled with Triton on a GPU. It has no backward on a CPU.
* ``sdpa_per_sample`` (this module): PyTorch's scaled-dot-product attention called once per sample of the
  row, each causal over its own tokens. Registered with transformers under that name by
  :func:`register_sdpa_per_sample`. With a padding mask or a KV cache (generation) it is plain ``sdpa``.
  It differentiates twice under :func:`~kfp_components.trainer.trpo.twice_differentiable_attention`.

``attn_implementation: auto`` (the default) resolves, by :func:`choose`:

1. trpo (its Fisher-vector products need double backward, which neither flash nor flex attention has):
   ``sdpa_per_sample``;
2. no CUDA device: ``sdpa_per_sample`` (measured on a CPU: a packed row costs about what its samples cost
   batched; flex attention cannot train on a CPU);
3. a CUDA GPU with ``flash_attn`` importable, compute capability >= 8.0 and ``torch_dtype`` bfloat16 or
   float16: ``flash_attention_2``;
4. any other CUDA GPU: ``sdpa_per_sample`` (PyTorch's flash or memory-efficient sdpa kernels, per sample).
   ``flex_attention`` is not chosen by itself: it is compiled (Triton) at the first steps and, as the
   transformers integration compiles it, again when a run switches between training and generation; it
   has not been measured on a GPU against sdpa per sample. Name it to use it.

The engine logs the choice and its reason once per run (``attention: ...``). A named kernel is used as
named; :func:`choose` only adds what it costs on packed rows to the log line.
"""

from __future__ import annotations

import importlib.util
import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "AUTO",
    "SDPA_PER_SAMPLE",
    "AttentionChoice",
    "choose",
    "choose_for",
    "flash_attn_installed",
    "gpu_capability",
    "implementation",
    "per_sample_sdpa_forward",
    "register_sdpa_per_sample",
    "sample_bounds",
]

AUTO = "auto"
SDPA_PER_SAMPLE = "sdpa_per_sample"
#: Kernels whose backward is itself differentiable (trpo's Fisher-vector products).
TWICE_DIFFERENTIABLE = ("sdpa", "eager", SDPA_PER_SAMPLE)
#: The lowest compute capability flash-attn 2 runs on (Ampere).
FLASH_ATTENTION_2_MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class AttentionChoice:
    """The kernel transformers loads the model with (``name``) and why (``reason``, for the log)."""

    name: str
    reason: str

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


def flash_attn_installed() -> bool:
    """Whether the ``flash_attn`` package (flash-attn 2) can be imported."""
    return importlib.util.find_spec("flash_attn") is not None


def gpu_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability of ``device``; None for a device that is not a CUDA GPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return int(major), int(minor)


def choose(
    requested: str, *, device: torch.device, torch_dtype: str, double_backward: bool = False
) -> AttentionChoice:
    """The kernel for ``attn_implementation: requested`` on ``device`` (see the module's rules).

    ``double_backward``: the run differentiates through the attention's backward (trpo).
    """
    if requested != AUTO:
        return AttentionChoice(requested, _named_reason(requested))
    if double_backward:
        return AttentionChoice(
            SDPA_PER_SAMPLE,
            "auto: trpo's Fisher-vector products need double backward, which flash and flex attention lack",
        )
    capability = gpu_capability(device)
    if capability is None:
        return AttentionChoice(
            SDPA_PER_SAMPLE,
            "auto without a CUDA GPU: sdpa once per sample of a packed micro-batch costs about what the samples "
            "cost batched; flex_attention has no backward on a CPU",
        )
    gpu = f"a CUDA GPU of compute capability {capability[0]}.{capability[1]}"
    if not flash_attn_installed():
        why = "flash-attn is not installed"
    elif capability < FLASH_ATTENTION_2_MIN_CAPABILITY:
        why = "flash-attn 2 needs compute capability 8.0 or more"
    elif torch_dtype not in ("bfloat16", "float16"):
        why = f"flash-attn has no {torch_dtype} kernel"
    else:
        return AttentionChoice(
            "flash_attention_2", f"auto on {gpu} with flash-attn: variable-length attention per sample"
        )
    return AttentionChoice(
        SDPA_PER_SAMPLE,
        f"auto on {gpu}: {why}; PyTorch's sdpa kernels once per sample of a packed micro-batch "
        "(flex_attention only when named: it compiles, and is not measured here)",
    )


def _named_reason(name: str) -> str:
    if name in ("sdpa", "eager"):
        return (
            "attn_implementation: over a packed micro-batch it computes the whole masked square of the row; "
            "auto runs attention per sample"
        )
    return "attn_implementation"


# --------------------------------------------------------------------------------------------------------
# sdpa_per_sample
# --------------------------------------------------------------------------------------------------------


def sample_bounds(position_ids: torch.Tensor) -> list[list[int]]:
    """For each row of ``position_ids`` (``(B, T)``), the start of every sample and then ``T``.

    A sample starts where a position is not the previous one plus 1 (transformers' rule for packed rows).
    """
    positions = position_ids.reshape(-1, position_ids.shape[-1])
    starts = torch.diff(positions, dim=-1) != 1
    length = positions.shape[-1]
    bounds = []
    for row in starts.cpu():
        bounds.append([0, *(row.nonzero().view(-1) + 1).tolist(), length])
    return bounds


def per_sample_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: ``query`` ``(B, heads, T, dim)``, ``key``/``value`` ``(B, kv heads,
    S, dim)``; returns ``(B, T, heads, dim)``. With a mask or ``T != S`` (a cache) it is sdpa as transformers
    runs it; else one sdpa call per sample of each row, as ``position_ids`` delimit them."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward, use_gqa_in_sdpa

    if attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
            **kwargs,
        )  # fmt: skip
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{SDPA_PER_SAMPLE} has no softcap; use eager or flex_attention")
    if position_ids is None:
        raise ValueError(
            f"{SDPA_PER_SAMPLE}: {type(module).__name__} passes no position_ids to its attention, so the samples "
            "of a packed row cannot be told apart; use sdpa, flash_attention_2 or flex_attention"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    enable_gqa = False
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        if use_gqa_in_sdpa(None, key, value):
            enable_gqa = True
        else:
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    dropout_p = dropout if module.training else 0.0

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=dropout_p,
            is_causal=causal and q.shape[2] > 1,
            scale=scaling,
            enable_gqa=enable_gqa,
        )

    rows = sample_bounds(position_ids.expand(query.shape[0], -1))
    if all(bounds == rows[0] for bounds in rows):  # the same samples in every row (one row when packed)
        output = _attend_samples(attend, query, key, value, rows[0])
    else:
        output = torch.cat(
            [
                _attend_samples(attend, query[r : r + 1], key[r : r + 1], value[r : r + 1], bounds)
                for r, bounds in enumerate(rows)
            ],
            dim=0,
        )
    return output.transpose(1, 2).contiguous(), None


def _attend_samples(
    attend: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int]
) -> torch.Tensor:
    """``attend`` on each sample's span of the sequence dimension, concatenated. ``split`` (not slicing)
    so that backward concatenates the samples' gradients instead of adding one row-sized tensor per sample."""
    if len(bounds) == 2:
        return attend(query, key, value)
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    pieces = zip(*(t.split(lengths, dim=2) for t in (query, key, value)), strict=True)
    return torch.cat([attend(q, k, v) for q, k, v in pieces], dim=2)


def _per_sample_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers' mask interface for ``sdpa_per_sample``: no mask (the kernel splits the row at the
    samples) when nothing is padded, there is no cache and the mask is the plain (packed) causal one; else
    sdpa's mask. Overlays (``use_vmap``) and sliding windows (``local_size``) get sdpa's mask too."""
    from transformers.masking_utils import sdpa_mask

    plain = (
        q_length == kv_length
        and q_offset == 0
        and kv_offset == 0
        and not kwargs.get("use_vmap")
        and kwargs.get("local_size") is None
        and (attention_mask is None or bool(attention_mask.all()))
    )
    if plain:
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


def register_sdpa_per_sample() -> None:
    """Make ``attn_implementation="sdpa_per_sample"`` loadable by transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(SDPA_PER_SAMPLE, per_sample_sdpa_forward)
    AttentionMaskInterface.register(SDPA_PER_SAMPLE, _per_sample_mask)


def choose_for(config: Any, device: torch.device) -> AttentionChoice:
    """:func:`choose` for a :class:`~kfp_components.trainer.config.TrainingConfig` on ``device``."""
    return choose(
        config.attn_implementation,
        device=device,
        torch_dtype=config.torch_dtype,
        double_backward=config.algorithm == "trpo",
    )


def implementation(config: Any, device: torch.device) -> str:
    """The name to load ``config``'s models with on ``device`` (``attn_implementation`` resolved; the
    per-sample kernel registered with transformers when it is the one)."""
    name = choose_for(config, device).name
    if name == SDPA_PER_SAMPLE:
        register_sdpa_per_sample()
    return name
