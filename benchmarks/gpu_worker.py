"""What the GPU benchmark (:mod:`benchmarks.gpu`) runs in its worker processes: everything that touches torch.

A worker is a process started with ``spawn`` that answers task requests over a pipe, one at a time
(:func:`serve`). The benchmark keeps two: one for the plain runs and one for the Liger runs, because
liger-kernel patches transformers' Qwen2 module (its RoPE function, RMSNorm and MLP classes) for the whole
process, which would turn every later run of that process into a Liger run.

Tasks (:data:`TASKS`), each returning plain JSON-able values:

* ``probe``: versions, device, Liger's availability;
* ``matmul_peak``: the chip's measured matmul rate (the MFU denominator);
* ``build_model``: a random-weight Qwen2 model of the given shapes with the tiny tokenizer of
  :mod:`kfp_components.testing.tiny_model`, saved locally (nothing is downloaded);
* ``train``: one run of the engine's ``train()`` with the given options, read back from ``metrics.jsonl``,
  with the per-step attention work of its plan (from the same tokenisation and token-budget sampler the
  engine uses).

A failed task answers with its error; an out-of-memory error is reported as such (``oom``), a refused
config with its problems (key path, message) and whether the config itself refused it (``config``) or a check
of the run once the model was loaded (``training``: trpo's memory check), and the worker frees what it can
before the next task.
"""

from __future__ import annotations

import gc
import importlib.metadata
import importlib.util
import json
import logging
import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any


def serve(conn: Connection) -> None:
    """Answer ``(task, kwargs)`` requests with ``("ok", value)`` or ``("error", details)`` until ``None``."""
    from transformers.utils import logging as transformers_logging

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kfp_components").setLevel(logging.WARNING)
    transformers_logging.disable_progress_bar()
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        if request is None:
            return
        task, kwargs = request
        try:
            answer: tuple[str, Any] = ("ok", TASKS[task](**kwargs))
        except BaseException as exc:  # reported to the parent, which decides; the worker lives on
            answer = ("error", describe_error(exc))
        free_memory()
        conn.send(answer)


def describe_error(exc: BaseException) -> dict[str, Any]:
    """The error's kind (``oom`` or ``error``), message and traceback tail, plus the peak memory reached."""
    import torch

    from kfp_components.typed_config import ConfigError

    text = f"{type(exc).__name__}: {exc}"
    oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
    details: dict[str, Any] = {
        "status": "oom" if oom else "error",
        "message": text.splitlines()[0][:500] if text.strip() else type(exc).__name__,
        "traceback": traceback.format_exc()[-3000:],
    }
    if isinstance(exc, ConfigError):
        details["config_problems"] = [list(problem) for problem in exc.problems]
        # "config": the options were refused when the config was built; "training": a check of the run
        # refused them once the model was loaded (trpo's memory check)
        details["config_phase"] = getattr(exc, "config_phase", "training")
    if torch.cuda.is_available():
        details["peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return details


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------ probe
def probe() -> dict[str, Any]:
    """Versions of what the runs use, the device, and whether Liger's kernels import."""
    import torch
    import transformers

    from benchmarks.machine import describe_machine

    liger_error = None
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as exc:  # recorded: the Liger runs then say why they did not apply
        liger_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    environment: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": transformers.__version__,
        "tokenizers": _version("tokenizers"),
        "peft": _version("peft"),
        "triton": _version("triton"),
        "liger_kernel": _version("liger-kernel"),
        "liger_importable": liger_error is None,
        "liger_error": liger_error,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        environment.update(
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
        )
    return {"environment": environment, "machine": describe_machine()}


# ------------------------------------------------------------------------------------------ matmul peak
def matmul_peak(size: int, dtype: str, repeats: int, warmup: int) -> dict[str, Any]:
    """The median rate of ``repeats`` products of two random ``size x size`` matrices after ``warmup``."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=torch_dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=torch_dtype, generator=generator)
    flops = 2 * size**3
    for _ in range(warmup):
        a @ b
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1000)
        else:
            started = time.perf_counter()
            a @ b
            seconds.append(time.perf_counter() - started)
    rates = [flops / s / 1e12 for s in seconds]
    return {
        "shape": [size, size, size],
        "dtype": dtype,
        "device": device.type,
        "warmup": warmup,
        "repeats": repeats,
        "tflops": statistics.median(rates),
        "tflops_min": min(rates),
        "tflops_max": max(rates),
    }


# ------------------------------------------------------------------------------------------------ model
def build_model(out_dir: str, shape: dict[str, int], dtype: str, calibration_text: str) -> dict[str, Any]:
    """A random-weight Qwen2 model of ``shape`` (tied embeddings) with the tiny tokenizer, saved to ``out_dir``.

    Built on the GPU when there is one (seconds, where the CPU takes a minute at 1.5B) and saved in
    ``dtype``. Returns its parameter count (tied weights once: what the matrix products multiply by) and the
    tokenizer's tokens per word of ``calibration_text`` (the data generator sizes its samples with it).
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from kfp_components.testing.tiny_model import build_tokenizer

    started = time.monotonic()
    tokenizer = build_tokenizer("qwen2", vocab_size=1024)
    if len(tokenizer) > shape["vocab_size"]:
        raise ValueError(f"the tokenizer's {len(tokenizer)} tokens exceed the model's vocabulary")
    eos = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))  # type: ignore[arg-type]
    pad = int(tokenizer.convert_tokens_to_ids("<|endoftext|>"))  # type: ignore[arg-type]
    config = Qwen2Config(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        intermediate_size=shape["intermediate_size"],
        max_position_embeddings=shape["max_position_embeddings"],
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
        dtype=dtype,
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad)
    parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    words = len(calibration_text.split())
    tokens = len(tokenizer(calibration_text, add_special_tokens=False)["input_ids"])
    del model
    return {
        "path": str(path),
        "parameters": parameters,
        "tokenizer_tokens": len(tokenizer),
        "tokens_per_word": tokens / max(words, 1),
        "build_seconds": round(time.monotonic() - started, 2),
    }


# ------------------------------------------------------------------------------------------------ train
_PLANS: dict[tuple[str, int, int, int, int], list[dict[str, int]]] = {}


def step_shapes(options: dict[str, Any]) -> list[dict[str, int]]:
    """Per planned step of an sft/osft run: its tokens, the sum of its samples' squared lengths (the causal
    attention work), its micro-batches and its largest micro-batch, from the engine's own tokenisation and
    token-budget sampler with the run's options (so the plan is the one the run trains on)."""
    from kfp_components.trainer.batching import TokenBudgetSampler, shifted_label_count
    from kfp_components.trainer.tokenize import tokenize_jsonl
    from kfp_components.trainer.train import load_tokenizer

    key = (
        options["data_path"],
        options["max_seq_len"],
        options["effective_batch_size"],
        options["max_tokens_per_gpu"],
        options["seed"],
    )
    if key not in _PLANS:
        tokenizer = load_tokenizer(options["model_name_or_path"])
        data = tokenize_jsonl(
            options["data_path"], tokenizer, max_seq_len=options["max_seq_len"], overlong=options["overlong"]
        )
        lengths = [len(s.input_ids) for s in data.samples]
        sampler = TokenBudgetSampler(
            lengths,
            [shifted_label_count(s.labels) for s in data.samples],
            effective_batch_size=options["effective_batch_size"],
            max_tokens_per_gpu=options["max_tokens_per_gpu"],
            seed=options["seed"],
        )
        shapes = []
        for epoch in range(2):
            for plan in sampler.epoch_plan(epoch):
                batches = [[lengths[i] for i in mb] for mb in plan.micro_batches]
                shapes.append(
                    {
                        "tokens": plan.global_tokens,
                        "sum_squared_lengths": sum(n * n for mb in batches for n in mb),
                        "micro_batches": len(batches),
                        "largest_micro_batch": max((sum(mb) for mb in batches), default=0),
                    }
                )
        _PLANS[key] = shapes
    return _PLANS[key]


def train(options: dict[str, Any], plan_attention: bool) -> dict[str, Any]:
    """One run of the engine with ``options`` (a ``TrainingConfig`` mapping); its step rows and peak memory.

    The peak memory statistics are reset first, so ``memory_mib`` in the rows and ``peak_memory_mib`` are this
    run's alone. An error (an OOM too) propagates to :func:`serve`, which reports it with the rows written so
    far left in ``output_dir``.
    """
    import torch

    from kfp_components.trainer.config import TrainingConfig
    from kfp_components.trainer.train import train as run_training
    from kfp_components.typed_config import ConfigError, from_dict

    shapes = step_shapes(options) if plan_attention else []
    liger_applied = bool(
        options.get("use_liger")
        and torch.cuda.is_available()
        and importlib.util.find_spec("liger_kernel") is not None
    )
    try:
        config = from_dict(TrainingConfig, options)
    except ConfigError as exc:
        exc.config_phase = "config"  # type: ignore[attr-defined]  # read by describe_error
        raise
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    run_training(config)
    run_seconds = time.monotonic() - started
    return {
        "rows": read_rows(options["output_dir"]),
        "run_seconds": round(run_seconds, 3),
        "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if torch.cuda.is_available()
        else None,
        "liger_applied": liger_applied,
        "step_shapes": shapes[: options["max_steps"]],
    }


def read_rows(output_dir: str) -> list[dict[str, Any]]:
    """The step rows of ``<output_dir>/metrics.jsonl`` (none when the run stopped before its first step)."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if "eval_loss" not in row]


def rows_of(output_dir: str) -> dict[str, Any]:
    """The rows a failed run left (the parent asks after an error)."""
    return {"rows": read_rows(output_dir)}


TASKS: dict[str, Callable[..., Any]] = {
    "probe": probe,
    "matmul_peak": matmul_peak,
    "build_model": build_model,
    "train": train,
    "rows_of": rows_of,
}

# Workers inherit the parent's environment; these keep them offline and quiet whatever it holds.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
