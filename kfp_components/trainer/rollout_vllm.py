"""The ``vllm`` rollout backend: a vLLM engine colocated in each trainer process, weights synced after each
update (the GPU image's optional ``vllm`` extra: ``pip install 'kfp-components[vllm]'``).

Written against the vLLM API that TRL's colocate mode uses (vLLM 0.17 to 0.25):

* ``vllm.LLM(model=..., distributed_executor_backend="external_launcher", tensor_parallel_size=1, ...)``:
  the engine runs inside this process (each torchrun rank holds its own engine and generates for its own
  prompts); a single process gets the rendezvous variables torch.distributed needs set here.
* ``LLM.generate(prompts, sampling_params=[...], use_tqdm=False)`` with each prompt as token ids
  (``TokensPrompt(prompt_token_ids=...)``) and one ``SamplingParams(n=num_generations, temperature, top_p,
  top_k (-1: off), max_tokens, stop, include_stop_str_in_output=True, seed)`` per prompt, with the prompt's
  own seed (as the ``hf`` backend, which draws each completion from the prompt's seed): the step and the
  prompt decide the samples, however the prompts were batched or split over the ranks.
* Finish reasons: vLLM's ``"length"`` is ``"length"``; its ``"stop"`` is ``"stop"`` when ``stop_reason``
  is a stop string and ``"eos"`` when it is None (the EOS token) or a token id (an EOS of the generation
  config). The stop string stays in the text, as in the ``hf`` backend.
* ``sync_weights``: the policy's weights as a transformers state dict, one tensor at a time (an FSDP2 shard
  is gathered when its turn comes, so a rank holds one full tensor at a time beyond its shards; every rank
  calls it; OSFT factors rebuilt dense; a LoRA adapter merged, then unmerged), each loaded with
  ``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, tensor)])``, then
  ``llm.reset_prefix_cache()`` (cached prefixes were computed with the old weights).

vLLM cannot be installed on the development machines, so ``tests/test_trainer_rollout.py`` runs this module
against a stand-in ``vllm`` module that checks every argument's name and type against the API above; the
engine itself is not exercised here.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from kfp_components.trainer.rollout import Completion, SamplingOptions, check_prompts, check_seeds

#: Per-prompt seeds are taken modulo this bound (vLLM takes any int; this keeps them within a signed
#: 32-bit range every engine version accepts).
_SEED_BOUND = 2**31 - 1


def import_vllm() -> Any:
    """The ``vllm`` module, or an ImportError that names the extra to install."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            "rollout_backend 'vllm' needs the vllm package: install the 'vllm' extra "
            "(pip install 'kfp-components[vllm]'; GPU only), or use rollout_backend 'hf'"
        ) from error
    return vllm


class VLLMRollouts:
    """A colocated vLLM engine loaded from ``model_path`` (the policy's starting checkpoint)."""

    name = "vllm"

    def __init__(
        self,
        model_path: str | Path,
        *,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
    ):
        vllm = import_vllm()
        from vllm.inputs import TokensPrompt

        self._sampling_params = vllm.SamplingParams
        self._tokens_prompt = TokensPrompt
        _ensure_rendezvous_environment()
        self.llm = vllm.LLM(
            model=str(model_path),
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            tensor_parallel_size=1,
            distributed_executor_backend="external_launcher",
        )

    def generate(
        self, prompts: Sequence[list[int]], options: SamplingOptions, seeds: Sequence[int]
    ) -> list[Completion]:
        check_prompts(prompts)
        check_seeds(seeds, prompts)
        params = [
            self._sampling_params(
                n=options.num_generations,
                temperature=float(options.temperature),
                top_p=float(options.top_p),
                top_k=options.top_k if options.top_k > 0 else -1,
                max_tokens=options.max_new_tokens,
                stop=list(options.stop_strings) or None,
                include_stop_str_in_output=True,
                skip_special_tokens=True,
                seed=int(seed) % _SEED_BOUND,
            )
            for seed in seeds
        ]
        inputs = [self._tokens_prompt(prompt_token_ids=list(prompt)) for prompt in prompts]
        outputs = self.llm.generate(inputs, sampling_params=params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vllm returned {len(outputs)} results for {len(prompts)} prompts")
        completions = []
        for index, (prompt, output) in enumerate(zip(prompts, outputs, strict=True)):
            samples = sorted(output.outputs, key=lambda sample: sample.index)
            if len(samples) != options.num_generations:
                raise RuntimeError(
                    f"vllm returned {len(samples)} completions of prompt {index}, "
                    f"expected num_generations={options.num_generations}"
                )
            completions += [
                Completion(
                    prompt_index=index,
                    prompt_ids=list(prompt),
                    completion_ids=list(sample.token_ids),
                    text=sample.text,
                    finish_reason=finish_reason(sample.finish_reason, sample.stop_reason),
                )
                for sample in samples
            ]
        return completions

    def sync_weights(self, model: nn.Module) -> None:
        """Load the policy's current weights into the engine (every rank calls it: a collective under FSDP2)."""
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        for name, tensor in inference_weights(model):
            engine_model.load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()


def finish_reason(reason: str | None, stop_reason: int | str | None) -> str:
    """vLLM's finish reason and stop reason as ours ("eos" | "stop" | "length")."""
    if reason == "length":
        return "length"
    if reason == "stop":
        return "stop" if isinstance(stop_reason, str) else "eos"
    raise RuntimeError(f"vllm finished a completion with reason {reason!r} (stop_reason {stop_reason!r})")


def inference_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy as transformers checkpoint entries, one module at a time: full tensors (an FSDP2 shard is
    gathered when its turn comes: every rank must iterate to the end), OSFT factors rebuilt as a dense
    ``weight``, a peft LoRA adapter merged into its base weights (names without peft's prefixes)."""
    from kfp_components.trainer import osft
    from kfp_components.trainer.distributed import unwrap
    from kfp_components.trainer.rollout import fsdp_modules

    inner = unwrap(model)
    lora = callable(getattr(inner, "merge_adapter", None))  # a peft PeftModel
    if lora and fsdp_modules(inner):
        raise ValueError(
            "rollout_backend 'vllm' cannot merge a LoRA adapter sharded by FSDP2; use distributed 'ddp'"
        )

    def plain(entries: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in osft.dense_state_dict(entries).items():
            if lora and ".lora_" in name:
                continue
            yield (
                (name.removeprefix("base_model.model.").replace(".base_layer", "") if lora else name),
                tensor,
            )

    if lora:
        inner.merge_adapter()  # type: ignore[operator]
    try:
        module: str | None = None
        entries: dict[str, torch.Tensor] = {}
        for name, value in inner.state_dict().items():
            tensor = value.full_tensor() if isinstance(value, DTensor) else value
            prefix = name.rpartition(".")[0]
            if prefix != module and entries:  # one module's entries at a time (OSFT needs all its factors)
                yield from plain(entries)
                entries = {}
            module, entries[name] = prefix, tensor.detach()
        yield from plain(entries)
    finally:
        if lora:
            inner.unmerge_adapter()  # type: ignore[operator]


def _ensure_rendezvous_environment() -> None:
    """The variables vLLM's in-process executor reads; torchrun sets them, a single process gets them here."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
