"""Rollouts: the ``hf`` decode loop on a real tiny model (sampling, stopping, the KV cache against full
forward passes, left padding, DDP and FSDP2 under torchrun) and the ``vllm`` adapter against a stand-in
``vllm`` module that checks the documented API.

Run as a script under torchrun (``--worker OUT``) this file is the 2-process side of the distributed test.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any, ClassVar, TypedDict

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer.rollout import (
    Completion,
    HFRollouts,
    SamplingOptions,
    eos_token_ids,
    sample_next_tokens,
)

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
PROMPTS = ["What is 2 + 3?", "Tell me a story about a small cat that", "Hi"]


def load(arch: str = "qwen2") -> tuple[Any, Any]:
    # weights 10 times the default's scale: attention sharp enough that a wrong position id or a wrong
    # cache entry changes the argmax (with the default's near-uniform attention it rarely does)
    path = tiny_model_path(arch, initializer_range=0.2)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return load()


def encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [tokenizer(text)["input_ids"] for text in texts]


def generate(model: Any, tokenizer: Any, prompts: list[list[int]], seed: int = 0, **options: Any) -> list:
    rollouts = HFRollouts(model, tokenizer, CPU, eos_ids=options.pop("eos_ids", None))
    return rollouts.generate(prompts, SamplingOptions(**options), seeds_for(prompts, seed))


def seeds_for(prompts: list, seed: int = 0) -> list[int]:
    """One seed per prompt, derived from ``seed``."""
    return [seed * 1000 + i for i in range(len(prompts))]


def greedy(model: Any, prompt: list[int], steps: int) -> list[int]:
    """Argmax decoding with a full forward pass over the whole sequence at every step (no cache, no padding)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


# The hf loop ----------------------------------------------------------------------------------------------


def test_completions_are_grouped_per_prompt_with_finish_reasons(tiny):
    model, tokenizer = tiny
    prompts = encode(tokenizer, PROMPTS)
    completions = generate(model, tokenizer, prompts, num_generations=4, max_new_tokens=6)
    assert [c.prompt_index for c in completions] == [0] * 4 + [1] * 4 + [2] * 4
    for completion in completions:
        assert completion.prompt_ids == prompts[completion.prompt_index]
        assert 1 <= len(completion.completion_ids) <= 6
        assert completion.finish_reason in ("eos", "stop", "length")
        assert completion.truncated == (completion.finish_reason == "length")
        if completion.truncated:
            assert len(completion.completion_ids) == 6
        assert completion.text == tokenizer.decode(completion.completion_ids, skip_special_tokens=True)
    assert len({tuple(c.completion_ids) for c in completions}) > 1, "samples differ within a group"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_top_k_1_is_argmax_decoding_through_the_cache_with_left_padding(arch):
    """Prompts of different lengths in one batch (left padding), decoded with the KV cache, give exactly
    the argmax continuation computed independently with full forward passes."""
    model, tokenizer = load(arch)
    prompts = encode(tokenizer, PROMPTS)
    completions = generate(
        model, tokenizer, prompts, num_generations=2, max_new_tokens=12, top_k=1, eos_ids=()
    )
    for completion in completions:
        assert completion.completion_ids == greedy(model, completion.prompt_ids, 12)
        assert completion.finish_reason == "length"


def test_left_padding_does_not_change_a_rows_output(tiny):
    model, tokenizer = tiny
    short, long = encode(tokenizer, ["Hi", "Tell me a long story about a small cat that lived in a house"])
    alone = generate(model, tokenizer, [short], num_generations=1, max_new_tokens=10, top_k=1, eos_ids=())
    batched = generate(
        model, tokenizer, [long, short], num_generations=1, max_new_tokens=10, top_k=1, eos_ids=()
    )
    assert len(long) > len(short) + 5
    assert batched[1].completion_ids == alone[0].completion_ids


def test_same_seed_same_completions_other_seed_differs_and_the_batch_does_not_matter(tiny):
    """A prompt's completions depend on its seed only: not on the other prompts of the batch or its place in
    it (so one process and several ranks, and a resumed run, sample the same)."""
    model, tokenizer = tiny
    prompts = encode(tokenizer, PROMPTS)
    options = SamplingOptions(num_generations=3, max_new_tokens=8)
    rollouts = HFRollouts(model, tokenizer, CPU)
    ids = lambda completions: [c.completion_ids for c in completions]  # noqa: E731
    seeds = seeds_for(prompts, 7)
    first = ids(rollouts.generate(prompts, options, seeds))
    assert first == ids(rollouts.generate(prompts, options, seeds))
    assert first != ids(rollouts.generate(prompts, options, seeds_for(prompts, 8)))
    # the last prompt alone, then first in a reversed batch: the same completions as in the first batch
    alone = ids(rollouts.generate(prompts[-1:], options, seeds[-1:]))
    assert alone == first[-3:]
    reversed_batch = ids(rollouts.generate(prompts[::-1], options, seeds[::-1]))
    assert reversed_batch[:3] == first[-3:]
    # the rows of one group differ from each other (each row has its own draws)
    assert len({tuple(c) for c in first[:3]}) > 1


def test_eos_of_the_generation_config_ends_a_row(tiny):
    """A row stops at an EOS id of the model's generation_config list; the EOS is its last id."""
    model, tokenizer = tiny
    prompt = encode(tokenizer, ["Tell me a story"])[0]
    continuation = greedy(model, prompt, 8)
    stop_token = continuation[3]
    first = continuation.index(stop_token)
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop_token]
    try:
        assert eos_token_ids(tokenizer, model) == {tokenizer.eos_token_id, stop_token}
        completions = generate(model, tokenizer, [prompt], num_generations=2, max_new_tokens=8, top_k=1)
    finally:
        model.generation_config.eos_token_id = saved
    for completion in completions:
        assert completion.completion_ids == continuation[: first + 1]
        assert completion.finish_reason == "eos" and not completion.truncated


def test_the_shipped_eos_ids_are_the_tokenizers_and_the_generation_configs(tiny):
    model, tokenizer = tiny
    expected = {
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    }
    assert eos_token_ids(tokenizer, model) == expected
    assert HFRollouts(model, tokenizer, CPU).eos_ids == expected


def test_a_stop_string_ends_a_row_and_cuts_the_text_after_it(tiny):
    model, tokenizer = tiny
    prompt = encode(tokenizer, ["Tell me a story"])[0]
    continuation = greedy(model, prompt, 12)
    text = tokenizer.decode(continuation, skip_special_tokens=True)
    # a stop string that ends inside a token's text, well after the first token
    stop = text[len(tokenizer.decode(continuation[:4])) - 1 :][:3]
    assert stop and stop in text and text.index(stop) > 0
    # the first prefix whose decoded text holds the stop string ends the completion
    end = next(
        n for n in range(1, 13) if stop in tokenizer.decode(continuation[:n], skip_special_tokens=True)
    )
    completions = generate(
        model,
        tokenizer,
        [prompt],
        num_generations=1,
        max_new_tokens=12,
        top_k=1,
        stop_strings=("@@never", stop),
    )
    completion = completions[0]
    assert completion.finish_reason == "stop"
    assert completion.completion_ids == continuation[:end]
    assert completion.text == text[: text.index(stop) + len(stop)]
    assert completion.text.endswith(stop)


def test_rows_that_leave_the_batch_do_not_change_the_others(tiny):
    """Finished rows dropped from the batch (and its KV cache) or kept in it: the same completions."""
    model, tokenizer = tiny
    prompts = encode(tokenizer, [*PROMPTS, "A cat", "The weather today is"])
    stop_ids = [greedy(model, p, 6)[i % 5] for i, p in enumerate(prompts)]  # rows end at different steps
    results = []
    for share in (0.5, 1.0, 0.0):  # drop at half finished, drop at once, never drop
        rollouts = HFRollouts(model, tokenizer, CPU, eos_ids=stop_ids, compact_when_active_share=share)
        options = SamplingOptions(num_generations=2, max_new_tokens=10, top_k=1)
        results.append(
            [
                (c.completion_ids, c.finish_reason)
                for c in rollouts.generate(prompts, options, seeds_for(prompts))
            ]
        )
    assert results[0] == results[1] == results[2]
    assert {reason for _, reason in results[0]} == {"eos"}
    assert len({len(ids) for ids, _ in results[0]}) >= 4  # rows ended at different steps


def test_model_runs_in_eval_mode_without_grad_and_its_mode_comes_back(tiny):
    model, tokenizer = tiny
    seen = []
    handle = model.register_forward_hook(
        lambda module, args, out: seen.append((module.training, torch.is_grad_enabled()))
    )
    entered = []

    @contextlib.contextmanager
    def autocast():
        entered.append(1)
        yield

    model.train()
    try:
        rollouts = HFRollouts(model, tokenizer, CPU, autocast, eos_ids=())
        rollouts.generate(
            encode(tokenizer, ["Hi"]), SamplingOptions(num_generations=1, max_new_tokens=4), [0]
        )
    finally:
        handle.remove()
    assert model.training
    assert seen == [(False, False)] * 4  # the prefill, then one forward per further token
    assert len(entered) == 4  # every forward runs in the precision's autocast context
    model.eval()


def test_sampling_keeps_to_top_k_and_top_p():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    logits = probs.log().repeat(4000, 1)
    generator = torch.Generator().manual_seed(0)

    def draws(**options: Any) -> torch.Tensor:
        uniforms = torch.rand((logits.shape[0], 1), generator=generator)
        return sample_next_tokens(logits, SamplingOptions(**options), uniforms)

    counts = torch.bincount(draws(top_k=2), minlength=4)
    assert counts[2:].sum() == 0 and counts[0] > counts[1] > 0
    counts = torch.bincount(draws(top_p=0.5), minlength=4)  # 0.4 < 0.5: the second token is needed, no third
    assert counts[2:].sum() == 0
    assert counts[0] / 4000 == pytest.approx(0.4 / 0.7, abs=0.04)
    counts = torch.bincount(draws(top_p=0.4), minlength=4)  # the first token alone reaches 0.4
    assert counts.tolist() == [4000, 0, 0, 0]
    counts = torch.bincount(draws(temperature=100.0), minlength=4)  # nearly uniform
    assert counts.min() > 800
    counts = torch.bincount(draws(), minlength=4)  # no filter: the model's own probabilities
    assert counts[3] / 4000 == pytest.approx(0.1, abs=0.03)


@pytest.mark.parametrize("uniform", [0.0, 1 - 2**-24])
def test_a_token_of_zero_probability_is_never_drawn_even_at_the_ends_of_the_uniform_range(uniform):
    logits = torch.tensor(
        [[float("-inf"), 1.0, 2.0, float("-inf")], [0.5, 3.0, float("-inf"), float("-inf")]]
    )
    uniforms = torch.full((2, 1), uniform)
    drawn = sample_next_tokens(logits, SamplingOptions(), uniforms)
    assert drawn.tolist() == ([1, 0] if uniform == 0 else [2, 1])
    drawn = sample_next_tokens(logits, SamplingOptions(top_k=1), uniforms)
    assert drawn.tolist() == [2, 1]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"num_generations": 0}, "num_generations must be >= 1"),
        ({"stop_strings": ("ok", "")}, r"stop_strings\[1\] must be a non-empty string"),
    ],
)
def test_bad_sampling_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        SamplingOptions(**options)


def test_sampling_options_are_read_from_a_config_under_the_same_names():
    from kfp_components.trainer.config import RLOptions

    config = RLOptions(
        temperature=0.7,
        top_p=0.9,
        top_k=5,
        max_new_tokens=12,
        stop_strings=["\n\n"],
        num_generations=4,
    )
    assert SamplingOptions.of(config) == SamplingOptions(
        temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=12, stop_strings=("\n\n",), num_generations=4
    )
    assert SamplingOptions.of(config, num_generations=2).num_generations == 2
    with pytest.raises(AttributeError, match="temperature"):
        SamplingOptions.of(types.SimpleNamespace(max_new_tokens=3))
    greedy = SamplingOptions.greedy(7, ["END"])
    assert (greedy.top_k, greedy.num_generations, greedy.max_new_tokens, greedy.stop_strings) == (
        1,
        1,
        7,
        ("END",),
    )


def test_bad_prompts_are_refused(tiny):
    model, tokenizer = tiny
    rollouts = HFRollouts(model, tokenizer, CPU)
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        rollouts.generate([[1, 2], []], SamplingOptions(), [0, 1])
    with pytest.raises(ValueError, match="prompt 0 must be a list of int token ids"):
        rollouts.generate([["a"]], SamplingOptions(), [0])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="no prompts"):
        rollouts.generate([], SamplingOptions(), [])
    with pytest.raises(ValueError, match="1 seeds for 2 prompts"):
        rollouts.generate([[1], [2]], SamplingOptions(), [0])


# DDP and FSDP2 (2 processes, gloo) -----------------------------------------------------------------------

DIST_OPTIONS = {"num_generations": 2, "max_new_tokens": 6, "temperature": 0.9, "top_p": 0.95}
# rank 1's prompts end early (an EOS set that makes some rows stop), so the ranks decode for different
# numbers of steps: under FSDP2 that only works when decoding needs no collective
DIST_PROMPTS = [["What is 2 + 3?", "Hi"], ["Tell me a story about a small cat that", "A cat"]]


def rank_eos_ids(rank: int) -> list[int] | None:
    return None if rank == 0 else list(range(300, 1000))


def _worker(out: Path) -> None:
    import torch.distributed as dist

    from kfp_components.trainer.distributed import init_distributed, wrap_model
    from kfp_components.trainer.rollout import fsdp_modules

    info = init_distributed()
    _, tokenizer = load()
    prompts = encode(tokenizer, DIST_PROMPTS[info.rank])
    report: dict[str, Any] = {}
    real_all_gather = dist.all_gather_single
    gathers = [0]

    def counting_all_gather(*args: Any, **kwargs: Any) -> Any:
        gathers[0] += 1
        return real_all_gather(*args, **kwargs)

    dist.all_gather_single = counting_all_gather  # FSDP2's parameter all-gather (torch 2.13)
    for strategy in ("ddp", "fsdp"):
        model, _ = load()
        wrapped = wrap_model(model, info, strategy, bf16=False)
        wrapped.train()
        rollouts = HFRollouts(wrapped, tokenizer, CPU, eos_ids=rank_eos_ids(info.rank))
        modules = fsdp_modules(wrapped)
        gathers[0] = 0
        completions = rollouts.generate(prompts, SamplingOptions(**DIST_OPTIONS), seeds_for(prompts, 3))
        entry: dict[str, Any] = {
            "completions": [[c.completion_ids, c.finish_reason] for c in completions],
            "all_gathers": gathers[0],
            "fsdp_modules": len(modules),
            "training": wrapped.training,
        }
        if modules:
            # the settings a model has after an ordinary (training) forward
            reference = wrap_model(load()[0], info, strategy, bf16=False)
            reference(input_ids=torch.tensor([prompts[0]]))
            entry["settings"] = [_reshard_state(m) for m in modules]
            entry["settings_after_a_training_forward"] = [_reshard_state(m) for m in fsdp_modules(reference)]
            entry["resharded"] = all(
                p.to_local().numel() < p.full_tensor().numel() for p in wrapped.parameters() if p.dim() == 2
            )
            gathers[0] = 0
            loss = wrapped(input_ids=torch.tensor([prompts[0]]), labels=torch.tensor([prompts[0]])).loss
            loss.backward()
            entry["training_step_all_gathers"] = gathers[0]
        report[strategy] = entry
    everything: list[Any] = [None] * info.world_size
    dist.all_gather_object(everything, report)
    if info.rank == 0:
        out.write_text(json.dumps(everything))
    dist.barrier()
    dist.destroy_process_group()


def _reshard_state(module: Any) -> list[Any]:
    state = module._get_fsdp_state()
    return [state._auto_reshard_after_forward] + [
        g.post_forward_mesh_info is None for g in state._fsdp_param_groups
    ]


def test_ddp_and_fsdp2_generate_what_one_process_generates_and_fsdp2_gathers_once(tmp_path):
    out = tmp_path / "ranks.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(Path(__file__)), "--worker", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = json.loads(out.read_text())
    model, tokenizer = load()
    for rank, report in enumerate(ranks):
        alone = HFRollouts(model, tokenizer, CPU, eos_ids=rank_eos_ids(rank)).generate(
            encode(tokenizer, DIST_PROMPTS[rank]),
            SamplingOptions(**DIST_OPTIONS),
            seeds_for(DIST_PROMPTS[rank], 3),
        )
        expected = [[c.completion_ids, c.finish_reason] for c in alone]
        for strategy in ("ddp", "fsdp"):
            assert report[strategy]["completions"] == expected, (rank, strategy)
            assert report[strategy]["training"] is True
        assert report["ddp"]["all_gathers"] == 0
        fsdp = report["fsdp"]
        assert fsdp["fsdp_modules"] == 3  # two decoder layers and the root
        assert fsdp["all_gathers"] == 3  # once per module for the whole rollout, not once per token
        assert fsdp["settings"] == fsdp["settings_after_a_training_forward"]
        assert fsdp["settings"] == [[True, True], [True, False], [True, False]]  # the root keeps its params
        assert fsdp["resharded"]
        assert fsdp["training_step_all_gathers"] >= 3  # training gathers as before
    # the ranks decoded for different numbers of steps (rank 1's rows all ended early)
    lengths = [[len(ids) for ids, _ in report["fsdp"]["completions"]] for report in ranks]
    assert max(lengths[1]) < max(lengths[0]) == DIST_OPTIONS["max_new_tokens"]


# vllm (a stand-in module that checks the documented API) -------------------------------------------------


class _TokensPrompt(TypedDict):
    prompt_token_ids: list[int]


# SamplingParams fields and types of the vLLM versions the adapter is written against (vllm/sampling_params.py)
_SAMPLING_FIELDS: dict[str, type | tuple[type, ...]] = {
    "n": int,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "max_tokens": int,
    "stop": (list, type(None)),
    "include_stop_str_in_output": bool,
    "skip_special_tokens": bool,
    "seed": (int, type(None)),
}
_LLM_ARGUMENTS = {
    "model": str,
    "dtype": str,
    "seed": int,
    "gpu_memory_utilization": float,
    "max_model_len": (int, type(None)),
    "tensor_parallel_size": int,
    "distributed_executor_backend": str,
}


def _check_types(what: str, given: dict[str, Any], documented: dict[str, Any]) -> None:
    unknown = set(given) - set(documented)
    assert not unknown, f"{what}: arguments not in the documented API: {unknown}"
    for name, value in given.items():
        assert isinstance(value, documented[name]), f"{what}: {name}={value!r} is not {documented[name]}"


class FakeSamplingParams:
    def __init__(self, **kwargs: Any):
        _check_types("SamplingParams", kwargs, _SAMPLING_FIELDS)
        if kwargs.get("stop"):
            assert all(isinstance(s, str) for s in kwargs["stop"])
        self.__dict__.update(kwargs)


class FakeCompletionOutput(types.SimpleNamespace):
    """vllm.outputs.CompletionOutput's fields."""


class FakeLLM:
    """Completion j of a prompt: j % 4 == 0 runs to max_tokens, 1 ends at EOS (stop_reason None), 2 at a
    stop string, 3 at a stop token id of the generation config."""

    instances: ClassVar[list[FakeLLM]] = []

    def __init__(self, **kwargs: Any):
        _check_types("LLM", kwargs, _LLM_ARGUMENTS)
        self.kwargs = kwargs
        self.calls: list[tuple[list, list]] = []
        self.loaded: list[tuple[str, torch.Tensor]] = []
        self.prefix_resets = 0
        engine_model = types.SimpleNamespace(load_weights=self._load_weights)
        runner = types.SimpleNamespace(model=engine_model)
        self.llm_engine = types.SimpleNamespace(
            model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner))
        )
        FakeLLM.instances.append(self)

    def _load_weights(self, weights: Any) -> set[str]:
        batch = list(weights)
        assert all(isinstance(name, str) and isinstance(t, torch.Tensor) for name, t in batch)
        self.loaded += [(name, tensor.clone()) for name, tensor in batch]  # vLLM copies into its own weights
        return {name for name, _ in batch}

    def reset_prefix_cache(self) -> bool:
        self.prefix_resets += 1
        return True

    def generate(self, prompts: Any, /, sampling_params: Any = None, *, use_tqdm: bool = True) -> list:
        assert isinstance(prompts, list) and isinstance(sampling_params, list)
        assert len(sampling_params) == len(prompts) and use_tqdm is False
        for prompt in prompts:
            assert set(prompt) == {"prompt_token_ids"}
            assert all(isinstance(t, int) for t in prompt["prompt_token_ids"])
        self.calls.append((prompts, sampling_params))
        outputs = []
        for prompt, params in zip(prompts, sampling_params, strict=True):
            samples = []
            for j in range(params.n):
                kind = j % 4
                ids = [params.seed % 97 + j, 5, 6][: (params.max_tokens if kind == 0 else 2)]
                finish, stop_reason, text = {
                    0: ("length", None, "abc"),
                    1: ("stop", None, "ab"),
                    2: ("stop", params.stop[0] if params.stop else None, "a</s>"),
                    3: ("stop", 1021, "ab"),
                }[kind]
                samples.append(
                    FakeCompletionOutput(
                        index=j,
                        text=text,
                        token_ids=ids,
                        cumulative_logprob=None,
                        logprobs=None,
                        finish_reason=finish,
                        stop_reason=stop_reason,
                    )
                )
            samples.reverse()  # the adapter orders by index
            outputs.append(
                types.SimpleNamespace(
                    prompt_token_ids=prompt["prompt_token_ids"], outputs=samples, finished=True
                )
            )
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = _TokensPrompt  # type: ignore[attr-defined]
    vllm.LLM = FakeLLM  # type: ignore[attr-defined]
    vllm.SamplingParams = FakeSamplingParams  # type: ignore[attr-defined]
    vllm.inputs = inputs  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):  # set by the adapter
        monkeypatch.delenv(name, raising=False)
    FakeLLM.instances.clear()
    return vllm


def test_vllm_missing_names_the_extra(monkeypatch):
    from kfp_components.trainer.rollout_vllm import VLLMRollouts

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ImportError, match=r"install the 'vllm' extra \(pip install 'kfp-components\[vllm\]'"):
        VLLMRollouts("/models/policy")


def test_vllm_engine_arguments_and_completions(fake_vllm, monkeypatch):
    from kfp_components.trainer.rollout_vllm import VLLMRollouts

    backend = VLLMRollouts("/models/policy", max_model_len=512)
    llm = FakeLLM.instances[0]
    assert llm.kwargs["model"] == "/models/policy"
    assert llm.kwargs["distributed_executor_backend"] == "external_launcher"
    assert os.environ["WORLD_SIZE"] == "1" and int(os.environ["MASTER_PORT"]) > 0
    options = SamplingOptions(
        temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=3, stop_strings=("</s>",), num_generations=4
    )
    prompts = [[1, 2, 3], [4, 5]]
    completions = backend.generate(prompts, options, [11, 2**40 + 5])
    ((sent, params),) = llm.calls
    assert sent == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4, 5]}]
    for p in params:
        assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens) == (4, 0.7, 0.9, -1, 3)
        assert p.stop == ["</s>"] and p.include_stop_str_in_output is True
    assert [p.seed for p in params] == [11, (2**40 + 5) % (2**31 - 1)]  # each prompt's own seed
    assert [c.prompt_index for c in completions] == [0] * 4 + [1] * 4
    assert [c.finish_reason for c in completions[:4]] == ["length", "eos", "stop", "eos"]
    assert completions[0].completion_ids == [params[0].seed % 97, 5, 6] and completions[0].truncated
    assert completions[2].text == "a</s>"
    assert all(isinstance(c, Completion) and c.prompt_ids == prompts[c.prompt_index] for c in completions)
    backend.generate(prompts, SamplingOptions(top_k=5, num_generations=1), [0, 1])
    assert llm.calls[1][1][0].top_k == 5 and llm.calls[1][1][0].stop is None


def test_vllm_refuses_an_unknown_finish_reason(fake_vllm):
    from kfp_components.trainer.rollout_vllm import finish_reason

    assert finish_reason("stop", "</s>") == "stop"
    with pytest.raises(RuntimeError, match="reason 'abort'"):
        finish_reason("abort", None)


def test_vllm_sync_weights_loads_the_policys_checkpoint_names(fake_vllm, tiny):
    from kfp_components.trainer.rollout_vllm import VLLMRollouts

    model, _ = tiny
    backend = VLLMRollouts("/models/policy")
    backend.sync_weights(model)
    llm = FakeLLM.instances[0]
    expected = model.state_dict()
    assert [name for name, _ in llm.loaded] == list(expected)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in llm.loaded)
    assert llm.prefix_resets == 1


def test_vllm_sync_weights_of_osft_and_lora_models_are_plain_dense_weights(fake_vllm):
    from peft import LoraConfig, get_peft_model

    from kfp_components.trainer.osft import apply_osft
    from kfp_components.trainer.rollout_vllm import VLLMRollouts

    reference, _ = load()
    names = list(reference.state_dict())
    backend = VLLMRollouts("/models/policy")
    llm = FakeLLM.instances[0]

    osft_model, _ = load()
    apply_osft(osft_model, unfreeze_rank_ratio=0.5)
    backend.sync_weights(osft_model)
    loaded = dict(llm.loaded)
    assert sorted(loaded) == sorted(names)
    for name in names:  # the factors rebuild the original weights
        torch.testing.assert_close(loaded[name], reference.state_dict()[name], atol=1e-4, rtol=1e-4)

    llm.loaded.clear()
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    lora_model = get_peft_model(load()[0], lora)
    before = {name: tensor.clone() for name, tensor in lora_model.state_dict().items()}
    backend.sync_weights(lora_model)
    after = lora_model.state_dict()
    for name, tensor in before.items():  # unmerged again
        torch.testing.assert_close(after[name], tensor)
    loaded = dict(llm.loaded)
    assert sorted(loaded) == sorted(names)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (loaded[q] - reference.state_dict()[q]).abs().max() > 1e-3  # the adapter is merged in
    merged = lora_model.merge_and_unload().state_dict()
    for name in names:
        torch.testing.assert_close(loaded[name], merged[name])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _worker(Path(sys.argv[2]))
