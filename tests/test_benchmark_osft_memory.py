"""The OSFT memory benchmark's projection from shapes (meta-device models) and its report."""

from __future__ import annotations

import math

from benchmarks import osft_memory

SMALL = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
}


def _numel(shapes: dict[str, int]) -> int:
    from torch import device
    from transformers import LlamaConfig, LlamaForCausalLM

    with device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shapes, tie_word_embeddings=False))
    return sum(p.numel() for p in model.parameters())


def test_full_fine_tuning_costs_sixteen_bytes_per_parameter_split_over_the_ranks():
    world = 4
    projected = osft_memory.project(SMALL, world, variant="full", frozen_sharded=True, dense_bytes=4)
    params = _numel(SMALL)
    # every dimension of SMALL divides by 4: exact shards; plus the rotary tables (inv_freq and
    # original_inv_freq: fp32, whole on each rank)
    rotary = 2 * (SMALL["hidden_size"] // SMALL["num_attention_heads"]) // 2 * 4
    assert projected == params * 16 // world + rotary


def test_sharded_frozen_factors_fall_with_the_world_size_and_replicated_ones_do_not():
    def osft(world: int, sharded: bool) -> int:
        return osft_memory.project(SMALL, world, variant="osft", frozen_sharded=sharded, dense_bytes=2)

    assert osft(1, True) == osft(1, False)
    # replicated frozen factors: only the trainable part shrinks, the frozen part stays on every rank
    assert osft(4, False) > osft(1, False) / 2
    # sharded: everything splits (the rotary table and S_h, a few KiB, stay whole)
    assert math.isclose(osft(4, True), osft(1, True) / 4, rel_tol=0.01)
    full = osft_memory.project(SMALL, 4, variant="full", frozen_sharded=True, dense_bytes=4)
    assert osft(4, True) < full < osft(4, False)


def test_report_renders_measured_projected_and_dtype_rows():
    measured = {
        "param_bytes": 2**20,
        "buffer_bytes": 0,
        "grad_bytes": 2**20,
        "optimizer_bytes": 2**21,
        "state_bytes": 2**22,
        "start_peak_rss_bytes": 2**28,
        "peak_rss_bytes": 2**29,
        "baseline_rss_bytes": 2**27,
        "orthogonality_error": 1e-7,
        "step_seconds": 1.0,
        "state_vs_full": 1.0,
        "step_vs_full": 1.0,
    }
    result = {
        "model": osft_memory.MODEL,
        "unfreeze_rank_ratio": 0.25,
        "tokens_per_rank": 2048,
        "steps": 3,
        "measured": [
            {**measured, "variant": "full", "world": 1},
            {**measured, "variant": "osft", "world": 1},
        ],
        "projected": [
            {
                "model": "Llama 8B",
                "world": 8,
                "full_bytes": 2**30,
                **{
                    f"osft_{kind}_{dtype}_bytes": 2**30
                    for kind in ("sharded", "replicated")
                    for dtype in ("bf16", "fp32")
                },
            }
        ],
        "dtypes": [
            {"variant": v, "final_loss": 1.0, "max_loss_difference": 0.0, "orthogonality_error": 0.0}
            for v in osft_memory.DTYPE_VARIANTS
        ],
        "dtype_steps": 8,
        "dtype_tokens": 256,
        "start": [
            {
                "world": 2,
                "apply_peak_bytes": 3 * 2**20,
                "share_bytes": 2**21,
                "largest_layer_bytes": 2**20,
                "loaded_rss_bytes": 2**28,
                "peak_rss_bytes": 2**29,
            }
        ],
    }
    text = osft_memory.render(result)
    assert "| 2 | now | 3.0 MiB | 2.0 MiB | 1.0 MiB | 1.0 layers | 256.0 MiB | 512.0 MiB |" in text
    assert "| 1 | osft | 1.0 MiB |" in text
    assert "| Llama 8B | 1.0 GiB | 1.0 GiB (1.00x)" in text
    assert text.count("| W_h bf16") == 2
