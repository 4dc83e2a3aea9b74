"""Attention over packed micro-batches: every kernel gives a packed row the losses of its samples batched,
``auto`` picks the per-sample kernel the machine has (CPU, CUDA with and without flash-attn), and the
per-sample sdpa kernel is plain sdpa under padding and a KV cache and differentiates twice."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer import attention
from kfp_components.trainer.attention import SDPA_PER_SAMPLE, choose, sample_bounds
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.preflight import environment_problems
from kfp_components.trainer.train import train
from kfp_components.typed_config import ConfigError

LENGTHS = (7, 31, 12, 20)
CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)


@pytest.fixture(scope="module")
def qwen2_path() -> Path:
    return tiny_model_path("qwen2", 0)


def load(path: Path, name: str):
    from transformers import AutoModelForCausalLM

    if name == SDPA_PER_SAMPLE:
        attention.register_sdpa_per_sample()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=name)
    return model.eval()


def samples(vocab_size: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab_size, (length,), generator=generator) for length in LENGTHS]


def packed_losses(model, ids: list[torch.Tensor]) -> torch.Tensor:
    """Each sample's summed next-token loss, from one packed row (positions restarting per sample)."""
    row = torch.cat(ids)[None]
    positions = torch.cat([torch.arange(len(sample)) for sample in ids])[None]
    logits = model(input_ids=row, position_ids=positions, attention_mask=None, use_cache=False).logits[0]
    losses, start = [], 0
    for sample in ids:
        end = start + len(sample)
        losses.append(F.cross_entropy(logits[start : end - 1], sample[1:], reduction="sum"))
        start = end
    return torch.stack(losses)


def batched_losses(model, ids: list[torch.Tensor], pad: int) -> torch.Tensor:
    """The same samples as one right-padded batch with an attention mask."""
    longest = max(len(sample) for sample in ids)
    batch = torch.full((len(ids), longest), pad)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for row, sample in enumerate(ids):
        batch[row, : len(sample)] = sample
        mask[row, : len(sample)] = 1
    logits = model(input_ids=batch, attention_mask=mask, use_cache=False).logits
    return torch.stack(
        [
            F.cross_entropy(logits[row, : len(sample) - 1], sample[1:], reduction="sum")
            for row, sample in enumerate(ids)
        ]
    )


def gradients(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["sdpa", "eager", SDPA_PER_SAMPLE])
def test_a_packed_row_has_the_losses_and_gradients_of_its_samples_batched(qwen2_path, name):
    model = load(qwen2_path, name)
    ids = samples(model.config.vocab_size)
    packed = packed_losses(model, ids)
    batched = batched_losses(model, ids, pad=model.config.pad_token_id or 0)
    assert packed.shape == (len(LENGTHS),)
    assert packed.mean().item() / (sum(LENGTHS) / len(LENGTHS)) == pytest.approx(6.93, abs=0.5)  # ~ln(1024)
    torch.testing.assert_close(packed, batched, rtol=1e-5, atol=1e-5)
    packed_grads = gradients(model, packed.sum())
    batched_grads = gradients(model, batched_losses(model, ids, pad=model.config.pad_token_id or 0).sum())
    for key, expected in batched_grads.items():
        assert expected.abs().max() > 0, key
        torch.testing.assert_close(packed_grads[key], expected, rtol=1e-4, atol=1e-6)


def test_the_per_sample_kernel_gives_the_samples_the_logits_of_separate_passes(qwen2_path):
    """Not merely the same as sdpa over the packed row: each sample alone, as if nothing else were there."""
    model = load(qwen2_path, SDPA_PER_SAMPLE)
    ids = samples(model.config.vocab_size)
    row = torch.cat(ids)[None]
    positions = torch.cat([torch.arange(len(sample)) for sample in ids])[None]
    with torch.no_grad():
        packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=sample[None], use_cache=False).logits[0] for sample in ids])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_flex_attention_on_a_packed_row_has_the_losses_of_its_samples_batched(qwen2_path):
    """flex_attention runs forward only on a CPU (compiled, ~30 s here); training needs a GPU (preflight)."""
    flex = load(qwen2_path, "flex_attention")
    reference = load(qwen2_path, "eager")
    ids = samples(flex.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(
            packed_losses(flex, ids), batched_losses(reference, ids, pad=0), rtol=1e-5, atol=1e-5
        )


def test_sample_bounds_follow_the_restarting_positions():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert sample_bounds(positions) == [[0, 3, 5, 9]]
    assert sample_bounds(torch.arange(5)[None].expand(2, -1)) == [[0, 5], [0, 5]]
    assert sample_bounds(torch.tensor([[4, 5, 6]])) == [[0, 3]]  # a continuation is one sample


def test_per_sample_kernel_is_sdpa_under_padding_and_a_kv_cache(qwen2_path):
    """Generation: left padding, prefill and decoding with a cache give sdpa's tokens and logits."""
    ids = samples(1024)[:2]
    longest = max(len(sample) for sample in ids)
    batch = torch.zeros((2, longest), dtype=torch.long)
    mask = torch.zeros((2, longest), dtype=torch.long)
    for row, sample in enumerate(ids):
        batch[row, longest - len(sample) :] = sample
        mask[row, longest - len(sample) :] = 1
    outputs = {}
    for name in ("sdpa", SDPA_PER_SAMPLE):
        model = load(qwen2_path, name)
        outputs[name] = model.generate(
            input_ids=batch,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    assert torch.equal(outputs["sdpa"].sequences, outputs[SDPA_PER_SAMPLE].sequences)
    for ours, theirs in zip(outputs[SDPA_PER_SAMPLE].logits, outputs["sdpa"].logits, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_per_sample_kernel_differentiates_twice_like_eager(qwen2_path):
    """trpo's Fisher-vector products: a gradient of a gradient through the packed row, on the math kernel."""
    from kfp_components.trainer.trpo import twice_differentiable_attention

    results = {}
    for name in ("eager", SDPA_PER_SAMPLE):
        model = load(qwen2_path, name)
        params = [p for n, p in model.named_parameters() if "layers.0.self_attn.q_proj.weight" in n]
        with twice_differentiable_attention():
            loss = packed_losses(model, samples(model.config.vocab_size)).sum()
            (grad,) = torch.autograd.grad(loss, params, create_graph=True)
            (second,) = torch.autograd.grad((grad * grad).sum(), params)
        results[name] = second
    assert results["eager"].abs().max() > 0
    torch.testing.assert_close(results[SDPA_PER_SAMPLE], results["eager"], rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------- choice


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA machine as the availability checks see it: capability and flash-attn set by the test."""
    machine = {"capability": (9, 0), "flash_attn": True}
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "flash_attn":
            return object() if machine["flash_attn"] else None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: machine["capability"])
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return machine


def test_auto_on_a_cpu_runs_sdpa_per_sample():
    choice = choose("auto", device=CPU, torch_dtype="bfloat16")
    assert choice.name == SDPA_PER_SAMPLE
    assert (
        "without a CUDA GPU" in choice.reason and "flex_attention has no backward on a CPU" in choice.reason
    )


def test_auto_on_a_gpu_with_flash_attn_runs_flash_attention_2(gpu):
    for dtype in ("bfloat16", "float16"):
        choice = choose("auto", device=CUDA, torch_dtype=dtype)
        assert choice.name == "flash_attention_2", dtype
    assert "compute capability 9.0 with flash-attn" in choice.reason


@pytest.mark.parametrize(
    ("machine", "dtype", "why"),
    [
        ({"flash_attn": False}, "bfloat16", "flash-attn is not installed"),
        ({"capability": (7, 5)}, "bfloat16", "flash-attn 2 needs compute capability 8.0 or more"),
        ({}, "float32", "flash-attn has no float32 kernel"),
    ],
)
def test_auto_on_a_gpu_without_usable_flash_attn_runs_sdpa_per_sample(gpu, machine, dtype, why):
    gpu.update(machine)
    choice = choose("auto", device=CUDA, torch_dtype=dtype)
    assert choice.name == SDPA_PER_SAMPLE
    assert why in choice.reason and "once per sample" in choice.reason


def test_auto_with_trpo_runs_the_twice_differentiable_per_sample_kernel(gpu):
    assert choose("auto", device=CUDA, torch_dtype="bfloat16", double_backward=True).name == SDPA_PER_SAMPLE
    assert choose("auto", device=CPU, torch_dtype="bfloat16", double_backward=True).name == SDPA_PER_SAMPLE


def test_a_named_kernel_runs_as_named(gpu):
    for name in (
        "sdpa",
        "eager",
        "flash_attention_2",
        "flash_attention_3",
        "flex_attention",
        SDPA_PER_SAMPLE,
    ):
        assert choose(name, device=CPU, torch_dtype="float32").name == name
        assert choose(name, device=CUDA, torch_dtype="bfloat16").name == name
    assert "whole masked square" in choose("sdpa", device=CPU, torch_dtype="float32").reason


def training_config(tmp_path: Path, **overrides) -> TrainingConfig:
    """test_trainer_loop's tiny SFT run, cut to two steps with no saved model."""
    from test_trainer_loop import config

    options: dict[str, object] = {"max_tokens_per_gpu": 1024, "max_steps": 2, "save_final_model": False}
    options.update(overrides)
    return config(tmp_path, **options)


def test_auto_is_the_default_and_training_logs_the_choice(tmp_path, caplog):
    config = training_config(tmp_path)
    assert config.attn_implementation == "auto"
    with caplog.at_level(logging.INFO, logger="kfp_components.trainer"):
        train(config)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("attention: ")]
    assert lines == [f"attention: {choose('auto', device=CPU, torch_dtype='float32').describe()}"]
    assert lines[0].startswith("attention: sdpa_per_sample (auto without a CUDA GPU")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["micro_batches"] >= 1 for r in records)


def test_preflight_refuses_flex_attention_on_a_cpu_and_flash_attention_in_float32(tmp_path, gpu):
    problems = environment_problems(training_config(tmp_path, attn_implementation="flash_attention_2"))
    assert problems == [
        (
            "attn_implementation",
            "flash_attention_2 has no float32 kernel: set torch_dtype bfloat16 or float16, or use auto",
        )
    ]
    assert (
        environment_problems(
            training_config(tmp_path, attn_implementation="flash_attention_2", torch_dtype="bfloat16")
        )
        == []
    )
    assert environment_problems(training_config(tmp_path, attn_implementation="flex_attention")) == []


def test_preflight_refuses_flex_attention_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (problem,) = environment_problems(training_config(tmp_path, attn_implementation="flex_attention"))
    assert problem[0] == "attn_implementation" and "flex_attention has no backward on a CPU" in problem[1]
    assert environment_problems(training_config(tmp_path)) == []


def test_trpo_takes_auto_and_sdpa_per_sample_and_refuses_flex_attention():
    from test_trainer_trpo import config as trpo_config

    for name in ("auto", SDPA_PER_SAMPLE, "sdpa", "eager"):
        trpo_config(attn_implementation=name).validate()
    with pytest.raises(ConfigError, match="attn_implementation: flex_attention has no double backward"):
        trpo_config(attn_implementation="flex_attention").validate()
