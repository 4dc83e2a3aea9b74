"""OSFT core: decomposition, target choice, projections under AdamW, merge to a plain HF checkpoint, and two
gloo processes (SVDs spread over the ranks; FSDP2 ``fully_shard`` training on CPU)."""

from __future__ import annotations

import contextlib
import logging
import math
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from kfp_components.testing.tensor_bytes import LiveTensorBytes
from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer import osft
from kfp_components.trainer.osft import (
    OSFTLinear,
    apply_osft,
    default_target_patterns,
    dense_state_dict,
    find_osft_targets,
    merge_osft,
    num_frozen_directions,
    osft_modules,
    osft_orthogonality_error,
    project_osft_gradients,
    project_osft_parameters,
)

PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
FACTORS = ("U_h", "S_h", "V_h", "U_l", "S_l", "V_l")
FROZEN = ("U_h", "S_h", "V_h")
# The distributed test: an odd intermediate size gives uneven FSDP2 shards of U_l (rows 97 -> 49 + 48) and
# ratio 0.33 an odd number of trainable directions for k_proj/v_proj (r 32 -> 11): uneven shards of V_l.
DIST_MODEL = {"intermediate_size": 97}
DIST_RATIO, DIST_STEPS, DIST_LR = 0.33, 4, 1e-3


def load(arch: str = "qwen2", **overrides) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path(arch, **overrides), dtype=torch.float32)
    model.eval()
    return model


def batch(rows: int = 4, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (rows, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


@contextlib.contextmanager
def transformers_warnings() -> Iterator[list[str]]:
    """Collect the warnings transformers logs (its logger does not propagate to pytest's caplog)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def train(
    model: nn.Module, ids: torch.Tensor, steps: int, lr: float, *, reproject: bool = True
) -> list[float]:
    """AdamW steps on a fixed batch with the gradient projection (and the parameter one if ``reproject``)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        project_osft_gradients(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if reproject:
            project_osft_parameters(model)
        losses.append(loss.item())
    model.eval()
    return losses


# --------------------------------------------------------------------------------------------------------
# Decomposition and targets
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_factors_rebuild_each_weight_and_the_logits(arch):
    model = load(arch)
    ids = batch()
    before = logits(model, ids)
    weights = {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }

    names = apply_osft(model, unfreeze_rank_ratio=0.25)

    assert names and set(names) == set(osft_modules(model))
    for name, module in osft_modules(model).items():
        torch.testing.assert_close(module.dense_weight(), weights[name], atol=2e-6, rtol=0)
        assert module.num_frozen == math.floor(module.rank * 0.75)
        assert module.U_l.shape == (module.out_features, module.rank - module.num_frozen)
        assert module.V_h.shape == (module.num_frozen, module.in_features)
    assert osft_orthogonality_error(model) < 1e-5
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_targets_follow_model_type(arch):
    model = load(arch)
    layers = model.config.num_hidden_layers
    expected = {f"model.layers.{i}.{p}" for i in range(layers) for p in PROJECTIONS}

    assert set(find_osft_targets(model)) == expected
    assert set(apply_osft(model, unfreeze_rank_ratio=0.5)) == expected
    # Embeddings, lm_head and norms stay dense and trainable; biases (Qwen2's q/k/v) stay trainable too.
    assert type(model.model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= trainable
    assert "model.layers.0.input_layernorm.weight" in trainable
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in trainable
    assert not any(name.endswith(FROZEN) for name in trainable)
    assert all(re.search(r"\.(U_l|S_l|V_l)$", n) for n in trainable if ".self_attn." in n and "bias" not in n)


def test_target_patterns_override_the_default():
    model = load()
    names = apply_osft(
        model, unfreeze_rank_ratio=0.5, target_patterns=[r"mlp\.down_proj$", r"layers\.1\.self_attn\.o_proj"]
    )
    assert names == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
    ]
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear


class _Unknown(nn.Module):
    def __init__(self, model_type: str, names: tuple[str, ...]) -> None:
        super().__init__()
        self.config = type("Config", (), {"model_type": model_type})()
        self.blocks = nn.ModuleList(nn.ModuleDict({n: nn.Linear(8, 8) for n in names}) for _ in range(2))
        self.head = nn.Linear(8, 4)


def test_unknown_model_type_uses_the_generic_fallback_or_fails_clearly():
    generic = _Unknown("mystery", ("q_proj", "fc1", "scorer"))
    assert find_osft_targets(generic) == [
        "blocks.0.q_proj",
        "blocks.0.fc1",
        "blocks.1.q_proj",
        "blocks.1.fc1",
    ]

    with pytest.raises(ValueError, match=r"model_type 'mystery'.*patterns \[.*q_proj") as error:
        find_osft_targets(_Unknown("mystery", ("scorer", "mixer")))
    assert "blocks.0.scorer" in str(error.value)  # names the linear layers it saw, to help write patterns
    with pytest.raises(ValueError, match=r"no target modules.*'nothing_matches'"):
        find_osft_targets(load(), ["nothing_matches"])
    with pytest.raises(ValueError, match="not a valid regex"):
        find_osft_targets(load(), ["(unclosed"])


def test_ratio_one_trains_every_direction_and_out_of_range_ratios_are_rejected():
    model = load()
    ids = batch()
    before = logits(model, ids)
    apply_osft(model, unfreeze_rank_ratio=1.0)
    for module in osft_modules(model).values():
        assert module.num_frozen == 0 and module.U_h.numel() == 0 and module.W_h is None
        assert module.S_l.shape == (module.rank,)
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=0)
    train(model, ids, steps=2, lr=1e-3)  # nothing to project; must not fail
    assert osft_orthogonality_error(model) == 0.0

    for bad in (0, 0.0, 1.5, -0.25, float("nan")):
        with pytest.raises(ValueError, match="unfreeze_rank_ratio"):
            apply_osft(load(), unfreeze_rank_ratio=bad)
    assert num_frozen_directions(10, 0.3) == 7  # 10 * (1 - 0.3) is 6.999... in floating point
    assert num_frozen_directions(64, 0.25) == 48
    assert num_frozen_directions(64, 1e-12) == 63  # at least one direction trains
    with pytest.raises(ValueError, match="already applied"):
        apply_osft(model, unfreeze_rank_ratio=0.5)


# Per model type: the module-name suffixes decomposed in every decoder block (models built on the meta
# device, so nothing is allocated).
TABLE_CASES = {
    "llama": PROJECTIONS,
    "qwen3": PROJECTIONS,
    "gemma2": PROJECTIONS,
    "gemma3": PROJECTIONS,  # multimodal: the language model only, not the vision tower
    "phi3": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    "gpt_neox": ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "falcon": (
        "self_attention.query_key_value",
        "self_attention.dense",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    ),
    "opt": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    "mixtral": PROJECTIONS[:4],  # routed experts are fused 3-D tensors: attention only
    "qwen2_moe": (
        *PROJECTIONS[:4],
        "mlp.shared_expert.gate_proj",
        "mlp.shared_expert.up_proj",
        "mlp.shared_expert.down_proj",
    ),
}


@pytest.mark.parametrize("model_type", sorted(TABLE_CASES))
def test_default_targets_per_model_type(model_type):
    config = AutoConfig.for_model(model_type)
    for holder in (config, getattr(config, "text_config", None)):
        for attr in ("num_hidden_layers", "n_layer"):
            if holder is not None and hasattr(holder, attr):
                setattr(holder, attr, 2)
    with torch.device("meta"):
        if model_type == "gemma3":
            from transformers import Gemma3ForConditionalGeneration

            model = Gemma3ForConditionalGeneration(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    names = find_osft_targets(model)
    suffixes = TABLE_CASES[model_type]
    assert len(names) == 2 * len(suffixes)
    for suffix in suffixes:
        assert sum(name.endswith("." + suffix) for name in names) == 2, suffix
    assert not any("vision" in name or "lm_head" in name for name in names)
    assert default_target_patterns(model_type) == list(osft.TARGETS_BY_MODEL_TYPE[model_type])


# --------------------------------------------------------------------------------------------------------
# Training: projections keep the subspaces orthogonal
# --------------------------------------------------------------------------------------------------------


def test_projected_adamw_keeps_the_subspaces_orthogonal_and_the_frozen_factors_untouched():
    model = load()
    apply_osft(model, unfreeze_rank_ratio=0.25)
    frozen = {f"{n}.{f}": getattr(m, f).clone() for n, m in osft_modules(model).items() for f in FROZEN}
    low = {n: m.U_l.detach().clone() for n, m in osft_modules(model).items()}
    ids = batch()

    # One backward: the projected gradients have no component in the frozen subspaces.
    model(input_ids=ids, labels=ids).loss.backward()
    project_osft_gradients(model)
    for module in osft_modules(model).values():
        assert (module.U_h.T @ module.U_l.grad).abs().max() < 1e-6
        assert (module.V_l.grad @ module.V_h.T).abs().max() < 1e-6
    model.zero_grad(set_to_none=True)

    losses = train(model, ids, steps=200, lr=1e-2)

    assert osft_orthogonality_error(model) < 1e-4
    for name, module in osft_modules(model).items():
        for factor in FROZEN:
            assert torch.equal(getattr(module, factor), frozen[f"{name}.{factor}"]), f"{name}.{factor}"
        assert not torch.allclose(module.U_l, low[name])  # the trainable part did move
    assert losses[-1] < 0.5 * losses[0]


def test_without_the_post_step_reprojection_adamw_leaks_into_the_frozen_subspace():
    model = load()
    apply_osft(model, unfreeze_rank_ratio=0.25)
    train(model, batch(), steps=200, lr=1e-2, reproject=False)
    assert osft_orthogonality_error(model) > 1e-4


def test_bf16_autocast_forward_and_backward():
    model = load()
    apply_osft(model, unfreeze_rank_ratio=0.25)
    ids = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    q = model.model.layers[0].self_attn.q_proj
    assert out.logits.dtype == torch.bfloat16
    assert q.U_l.grad.dtype == q.S_l.grad.dtype == q.V_l.grad.dtype == q.bias.grad.dtype == torch.float32
    assert torch.isfinite(q.U_l.grad).all() and q.S_l.grad.abs().sum() > 0


def test_layer_gradients_match_a_dense_linear():
    linear = nn.Linear(24, 40, dtype=torch.float64)
    layer = OSFTLinear.from_module(linear, 0.5)
    layer.double()
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, u, s, v, b: osft._OSFTLinearFunction.apply(x, layer.W_h, u, s, v, b, False),
        (x, layer.U_l, layer.S_l, layer.V_l, layer.bias),
    )


# --------------------------------------------------------------------------------------------------------
# Back to a plain checkpoint
# --------------------------------------------------------------------------------------------------------


def test_merge_and_save_pretrained_loads_in_plain_transformers(tmp_path):
    model = load()
    apply_osft(model, unfreeze_rank_ratio=0.25)
    ids = batch()
    train(model, ids, steps=5, lr=1e-2)
    expected = logits(model, ids)
    from_state_dict = dense_state_dict(model.state_dict())
    # Control: saved without merging, transformers reports the factors as unexpected, the weights missing.
    model.save_pretrained(tmp_path / "unmerged")
    with transformers_warnings() as warnings:
        AutoModelForCausalLM.from_pretrained(tmp_path / "unmerged")
    assert any("LOAD REPORT" in w and "MISSING" in w and "UNEXPECTED" in w for w in warnings)

    merge_osft(model)

    assert not osft_modules(model)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    merged = model.state_dict()
    assert from_state_dict.keys() == merged.keys()
    for key, value in merged.items():
        torch.testing.assert_close(from_state_dict[key], value, atol=0, rtol=0)
    model.save_pretrained(tmp_path / "merged")
    with transformers_warnings() as warnings:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not warnings
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(logits(reloaded.eval(), ids), expected, atol=1e-5, rtol=0)


def test_a_layer_waiting_for_its_shards_refuses_to_run_and_to_place_them_before_wrapping():
    """A layer built from a share (apply_osft with frozen_mesh) keeps its trainable factors on the meta
    device until place_factor_shards runs after fully_shard: running it, or placing the shares on
    parameters FSDP2 has not sharded, says what to do instead of failing inside a matmul."""
    model = load()
    apply_osft(model, unfreeze_rank_ratio=0.25)
    layer = model.model.layers[0].self_attn.q_proj
    layer._pending_shards = {"U_l": (layer.U_l.detach().clone(), 0)}
    with pytest.raises(RuntimeError, match="place_factor_shards"):
        model(input_ids=batch())
    with pytest.raises(RuntimeError, match=r"q_proj\.U_l is not sharded yet: call place_factor_shards after"):
        osft.place_factor_shards(model)
    assert "U_l" in layer._pending_shards  # left as it was


def test_load_state_dict_takes_the_stored_frozen_weight_or_rebuilds_it():
    """Resuming: W_h (a frozen parameter, so FSDP2 shards it) is loaded; a state dict written before it was
    one (no W_h) still loads strictly, and W_h then follows the loaded U_h, S_h, V_h."""
    source = load(seed=1)
    apply_osft(source, unfreeze_rank_ratio=0.25)
    ids = batch()
    expected = logits(source, ids)
    state = source.state_dict()
    dense_keys = [key for key in state if key.endswith(".W_h")]
    assert len(dense_keys) == len(osft_modules(source))
    assert not any(p.requires_grad for n, p in source.named_parameters() if n.endswith(".W_h"))

    target = load(seed=0)
    apply_osft(target, unfreeze_rank_ratio=0.25)
    target.load_state_dict(state)
    torch.testing.assert_close(logits(target, ids), expected, atol=0, rtol=0)

    older = load(seed=0)
    apply_osft(older, unfreeze_rank_ratio=0.25)
    info = older.load_state_dict({k: v for k, v in state.items() if k not in dense_keys}, strict=True)
    assert not info.missing_keys and not info.unexpected_keys
    torch.testing.assert_close(logits(older, ids), expected, atol=0, rtol=0)
    # a later load with W_h does not rebuild it: the stored one is taken as it is
    module = next(iter(osft_modules(older).values()))
    marked = {k: v.clone() for k, v in state.items()}
    marked[f"{next(iter(osft_modules(older)))}.W_h"].fill_(7.0)
    older.load_state_dict(marked)
    assert torch.all(module.W_h == 7.0)


def test_gpt2_conv1d_layers_are_decomposed_and_merged_back():
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32)
    model = GPT2LMHeadModel(config).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 100, (2, 12))
    before = logits(model, ids)

    names = apply_osft(model, unfreeze_rank_ratio=0.5)

    assert names == [
        f"transformer.h.{i}.{p}"
        for i in range(2)
        for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert osft_modules(model)["transformer.h.0.mlp.c_fc"].transposed
    torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=0)
    train(model, ids, steps=3, lr=1e-2)
    assert osft_orthogonality_error(model) < 1e-5
    expected = logits(model, ids)
    state = dense_state_dict(model.state_dict())
    merge_osft(model)
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in original.items()}
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rows", [0, 1, 5, 7, 10])
@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_shard_row_ranges_follow_torch_chunk(rows, parts):
    chunks = torch.arange(rows).chunk(parts) if rows else ()
    for index in range(parts):
        start, stop = osft._chunk_range(0, rows, parts, index)
        expected = chunks[index].tolist() if index < len(chunks) else []
        assert list(range(start, stop)) == expected


# --------------------------------------------------------------------------------------------------------
# Two gloo processes: SVDs spread over the ranks, then FSDP2 training
# --------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Run this file as a 2-process torchrun worker (see ``_worker``); return its output folder."""
    model_dir = tiny_model_path("qwen2", **DIST_MODEL)
    out = tmp_path_factory.mktemp("osft_dist")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        __file__,
        str(model_dir),
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out


def test_svd_spread_over_ranks_matches_a_single_process_decomposition(two_ranks):
    rank0 = torch.load(two_ranks / "factors_rank0.pt")
    rank1 = torch.load(two_ranks / "factors_rank1.pt")
    single = load(**DIST_MODEL)
    apply_osft(single, unfreeze_rank_ratio=DIST_RATIO)
    expected = {f"{n}.{f}": getattr(m, f).detach() for n, m in osft_modules(single).items() for f in FACTORS}

    assert rank0.keys() == rank1.keys() == expected.keys()
    for key in expected:
        assert torch.equal(rank0[key], rank1[key]), key
        # The same LAPACK routine on another thread count: equal up to rounding.
        torch.testing.assert_close(rank0[key], expected[key], atol=1e-5, rtol=0)


def test_fsdp2_training_keeps_orthogonality_and_matches_one_process(two_ranks):
    result = torch.load(two_ranks / "fsdp.pt")
    assert result["sharded"] and result["uneven_u"] and result["uneven_v"]
    assert max(result["errors"]) < 1e-5

    single = load(**DIST_MODEL)
    apply_osft(single, unfreeze_rank_ratio=DIST_RATIO)
    # Each rank of the worker loaded its own SVD: use the broadcast factors so only training is compared.
    single.load_state_dict(result["initial"])
    train(single, batch(), steps=DIST_STEPS, lr=DIST_LR)
    params = dict(single.named_parameters())
    assert params.keys() == result["params"].keys()
    for name, value in result["params"].items():
        torch.testing.assert_close(value, params[name].detach(), atol=2e-5, rtol=1e-4, msg=name)
    # The final save's path: a full state dict gathered from the shards, rebuilt dense.
    dense = dense_state_dict(single.state_dict())
    assert dense.keys() == result["dense"].keys()
    for name, value in result["dense"].items():
        torch.testing.assert_close(value, dense[name], atol=2e-5, rtol=1e-4, msg=name)


def test_fsdp2_shards_the_frozen_factors_like_their_trainable_twins(two_ranks):
    """Each rank holds only its share of U_h (rows), V_h (columns) and W_h (rows); gathered, they are the
    unsharded factors bit for bit, before and after training (frozen: never touched)."""
    result = torch.load(two_ranks / "fsdp.pt")
    assert result["sharded_at_apply"]
    placements = result["placements"]
    down = "model.layers.0.mlp.down_proj"  # 97 input columns: V_h cannot split evenly over 2 ranks
    gate = "model.layers.0.mlp.gate_proj"
    assert placements[f"{gate}.U_h"] == placements[f"{gate}.U_l"] == placements[f"{gate}.W_h"] == "Shard(0)"
    assert placements[f"{gate}.V_h"] == placements[f"{gate}.V_l"] == "Shard(1)"
    assert placements[f"{down}.V_h"] == "whole" and placements[f"{down}.V_l"] == "Shard(0)"
    assert placements[f"{gate}.S_h"] == "whole"
    for key, value in result["frozen_before"].items():
        assert torch.equal(value, result["initial"][key]), key
        assert torch.equal(result["frozen_after"][key], value), key
    # Frozen bytes per rank: about half of the unsharded ones (S_h and down_proj's V_h stay whole).
    ratio = result["frozen_bytes_rank0"] / result["frozen_bytes_unsharded"]
    assert 0.5 <= ratio < 0.6, ratio


def test_apply_osft_sends_each_rank_only_its_share_of_every_layer(two_ranks):
    """With frozen_mesh, the rank decomposing a layer sends the others only their shares, and the trainable
    factors and W_h reach FSDP2 already sharded: counted over the tensors apply_osft creates, a rank never
    holds more than one whole layer (the one it decomposes, with its W_h) plus its shares of all layers,
    where handing every layer out whole holds far more. The shares are the whole factors bit for bit."""
    result = torch.load(two_ranks / "fsdp.pt")
    bound = result["largest_layer_bytes"] + result["share_bytes"]
    assert result["apply_peak_bytes"] <= bound, (result["apply_peak_bytes"], bound)
    assert result["apply_whole_peak_bytes"] > 1.5 * bound, (result["apply_whole_peak_bytes"], bound)
    for key, value in result["initial_trainable"].items():
        assert torch.equal(value, result["initial"][key]), key


def test_a_resumed_fsdp2_run_builds_only_its_shares_of_the_factors(two_ranks):
    """On resume (no SVD; the checkpoint fills the factors next) each rank creates zero shares shaped and
    placed like the decomposing path's, and never a whole layer's factors."""
    result = torch.load(two_ranks / "fsdp.pt")
    assert result["resumed_placements"] == result["placements"]
    assert result["resumed_share_bytes"] == result["share_bytes"]
    # Beyond the shares, at most a few scalars (a whole layer's factors are tens of KiB here).
    extra = result["resume_peak_bytes"] - result["share_bytes"]
    assert extra < 1024 < result["largest_layer_bytes"] / 8, (extra, result["largest_layer_bytes"])


def _local_bytes(tensor: torch.Tensor | None) -> int:
    from torch.distributed.tensor import DTensor

    if tensor is None:
        return 0
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def _placement(tensor: torch.Tensor) -> str:
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return "whole"
    placement = tensor.placements[0]
    return f"Shard({placement.dim})" if placement.is_shard() else str(placement)


def _worker(model_dir: str, out_dir: str) -> None:
    """One rank of the 2-process test: apply OSFT (SVDs spread), save the factors, train under FSDP2 as the
    trainer wraps it (frozen factors sharded too)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from kfp_components.trainer.checkpoint import full_model_state_dict
    from kfp_components.trainer.distributed import DistInfo, fsdp_mesh, wrap_model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    out = Path(out_dir)
    unsharded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with LiveTensorBytes(exclude=[*unsharded.parameters(), *unsharded.buffers()]) as whole_counter:
        apply_osft(unsharded, unfreeze_rank_ratio=DIST_RATIO)  # every rank gets every layer whole
    largest_layer_bytes = max(
        sum(t.numel() * t.element_size() for t in (*m.buffers(), *m.parameters()) if t is not m.bias)
        for m in osft_modules(unsharded).values()
    )
    factors = {
        f"{n}.{f}": getattr(m, f).detach().clone()
        for n, m in osft_modules(unsharded).items()
        for f in FACTORS
    }
    torch.save(factors, out / f"factors_rank{rank}.pt")
    initial = {k: v.clone() for k, v in unsharded.state_dict().items()}
    frozen_bytes_unsharded = sum(
        getattr(m, f).numel() * 4 for m in osft_modules(unsharded).values() for f in (*FROZEN, "W_h")
    )
    del unsharded

    # The trainer's path: the frozen factors are split as each layer is decomposed, then FSDP2 wraps.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    mesh = fsdp_mesh(info)
    with LiveTensorBytes(exclude=[*model.parameters(), *model.buffers()]) as counter:
        apply_osft(model, unfreeze_rank_ratio=DIST_RATIO, frozen_mesh=mesh)
    # before any wrapping, each layer already holds only its share of U_h (and of V_h where it splits)
    sharded_at_apply = all(isinstance(m.U_h, DTensor) for m in osft_modules(model).values())
    model = wrap_model(model, info, "fsdp", bf16=False)
    modules = osft_modules(model)
    share_bytes = sum(_local_bytes(getattr(m, f)) for m in modules.values() for f in (*FACTORS, "W_h"))
    initial_trainable = {
        f"{n}.{f}": getattr(m, f).full_tensor().detach().clone()
        for n, m in modules.items()
        for f in ("U_l", "S_l", "V_l")
    }
    placements = {
        f"{n}.{f}": _placement(getattr(m, f)) for n, m in modules.items() for f in (*FACTORS, "W_h")
    }
    frozen_bytes = sum(
        (t.to_local() if isinstance(t, DTensor) else t).numel() * 4
        for m in modules.values()
        for t in (m.U_h, m.S_h, m.V_h, m.W_h)
    )

    def gathered_frozen() -> dict[str, torch.Tensor]:
        return {
            f"{n}.{f}": (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()
            for n, m in modules.items()
            for f in (*FROZEN, "W_h")
            for t in [getattr(m, f)]
        }

    frozen_before = gathered_frozen()
    # The resume path: zero shares to be filled by the checkpoint load, no SVD and no whole layer.
    resumed = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with LiveTensorBytes(exclude=[*resumed.parameters(), *resumed.buffers()]) as resume_counter:
        apply_osft(resumed, unfreeze_rank_ratio=DIST_RATIO, frozen_mesh=mesh, decompose=False)
    resumed = wrap_model(resumed, info, "fsdp", bf16=False)
    resumed_placements = {
        f"{n}.{f}": _placement(getattr(m, f))
        for n, m in osft_modules(resumed).items()
        for f in (*FACTORS, "W_h")
    }
    resumed_share_bytes = sum(
        _local_bytes(getattr(m, f)) for m in osft_modules(resumed).values() for f in (*FACTORS, "W_h")
    )
    del resumed
    module = model.model.layers[0].mlp.gate_proj
    sharded = isinstance(module.U_l, DTensor) and isinstance(module.U_h, DTensor)
    uneven_u = any(m.U_l.shape[0] % world for m in modules.values())
    uneven_v = any(m.V_l.shape[0] % world for m in modules.values())

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=DIST_LR)
    ids = batch()
    rows = ids.shape[0] // world
    local = ids[rank * rows : (rank + 1) * rows]
    model.train()
    errors = []
    for _ in range(DIST_STEPS):
        model(input_ids=local, labels=local).loss.backward()  # FSDP2 averages the gradients over ranks
        project_osft_gradients(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        project_osft_parameters(model)
        errors.append(osft_orthogonality_error(model))
    params = {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in model.named_parameters()
    }
    frozen_after = gathered_frozen()
    dense = dense_state_dict(full_model_state_dict(model))
    if rank == 0:
        torch.save(
            {
                "params": params,
                "errors": errors,
                "initial": initial,
                "sharded": sharded,
                "uneven_u": uneven_u,
                "uneven_v": uneven_v,
                "placements": placements,
                "sharded_at_apply": sharded_at_apply,
                "frozen_before": frozen_before,
                "frozen_after": frozen_after,
                "frozen_bytes_rank0": frozen_bytes,
                "frozen_bytes_unsharded": frozen_bytes_unsharded,
                "dense": dense,
                "initial_trainable": initial_trainable,
                "apply_peak_bytes": counter.peak,
                "apply_whole_peak_bytes": whole_counter.peak,
                "largest_layer_bytes": largest_layer_bytes,
                "share_bytes": share_bytes,
                "resume_peak_bytes": resume_counter.peak,
                "resumed_share_bytes": resumed_share_bytes,
                "resumed_placements": resumed_placements,
            },
            out / "fsdp.pt",
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
