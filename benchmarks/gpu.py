"""The training engine on one GPU: throughput, MFU and memory of SFT and OSFT, with and without Liger, the
OSFT/SFT step-time ratio by micro-batch size, a GRPO step, and OSFT vs SFT memory at 1.5B.

Everything runs in one process call that keeps to a time budget (``--budget-seconds``, default 270: the
standing GPU checks must finish within 5 minutes of an H200) and writes its JSON after every measurement
(atomically), so a run killed from outside still leaves what it measured:

1. the chip's bf16 matmul rate (8192^3, random data, median of 10 after warm-up): the MFU denominator;
2. a random-weight model with Qwen2.5-0.5B's shapes (tied embeddings), built and saved locally with the
   tiny tokenizer of :mod:`kfp_components.testing.tiny_model` (throughput depends on token counts, not text;
   its ids are far below the vocabulary), and synthetic chat data of lognormal lengths (median 600 tokens,
   up to about 3,800);
3. SFT and OSFT (``unfreeze_rank_ratio`` 0.25) through the engine's ``train()`` in bf16, at 8k to 64k tokens
   per micro-batch, with and without Liger: tokens/s, MFU and peak memory from ``metrics.jsonl``, warm-up
   steps left out; an out-of-memory error is recorded as such;
4. one GRPO run (``rollout_backend: hf``, the ``overlong_penalty`` reward): the generation share of a step
   and the rollout tokens/s;
5. the peak memory of OSFT vs SFT at Qwen2.5-1.5B's shapes.

Runs go in priority order; one that would not fit in the time left is skipped, and the JSON says why.
MFU counts the model's useful work: ``6 x parameters x tokens`` (tied embeddings once: the LM head's
product) plus causal attention, ``6 x layers x hidden x sum of squared sample lengths`` per step, over the
measured matmul rate. The work is done in worker processes (:mod:`benchmarks.gpu_worker`), one for the plain
runs and one for the Liger runs (Liger patches transformers for the whole process).

On a GPU machine, from the repository root (liger-kernel installed or carried as a wheel)::

    PYTHONPATH=. python3 -m benchmarks.gpu --out /path/gpu.json

then here: copy that file to ``benchmarks/results/gpu.json`` and run ``python -m benchmarks.run
--render-only`` (``make bench`` renders the stored file too; it never runs this benchmark). ``--tiny`` runs
the same code paths on the CPU with tiny shapes in well under a minute (the tests do).

``--suite rl`` runs the online RL suite of :mod:`benchmarks.gpu_rl` instead (grpo, ppo, a2c, trpo steps),
written to its own JSON (stored as ``benchmarks/results/gpu_rl.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import multiprocessing
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STARTED = time.monotonic()
NAME = "gpu"
ROOT = Path(__file__).resolve().parents[1]
RESULT_FILE = ROOT / "benchmarks" / "results" / "gpu.json"
SCHEMA = 1
RATIO = 0.25
#: How far past the budget a started run may go before its worker is stopped.
GRACE_SECONDS = 15.0

#: Qwen2.5's shapes (random weights; no download).
SHAPES: dict[str, dict[str, int]] = {
    "qwen2.5-0.5b": {
        "hidden_size": 896,
        "num_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
    },
    "qwen2.5-1.5b": {
        "hidden_size": 1536,
        "num_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "intermediate_size": 8960,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
    },
    # --tiny: the same code paths on a CPU; the vocabulary is larger than the tokenizer's, as Qwen2.5's is.
    "tiny-a": {
        "hidden_size": 64,
        "num_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 2048,
        "max_position_embeddings": 2048,
    },
    "tiny-b": {
        "hidden_size": 96,
        "num_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 192,
        "vocab_size": 2048,
        "max_position_embeddings": 2048,
    },
}


@dataclass(frozen=True)
class Profile:
    """Sizes and grid of one mode (``gpu`` on a CUDA device, ``tiny`` on the CPU)."""

    name: str
    needs_cuda: bool
    budget_seconds: float
    matmul_size: int
    matmul_dtype: str
    model_dtype: str
    model: str
    large_model: str
    #: tokens per micro-batch (max_tokens_per_gpu) of the SFT/OSFT grid, plain runs
    micro_batch_tokens: tuple[int, ...]
    #: the Liger runs, in priority order: first before GRPO, the rest later
    liger_tokens: tuple[int, ...]
    large_model_tokens: int
    max_seq_len: int
    median_length: int
    length_sigma: float
    max_length: int
    grpo_max_new_tokens: int
    grpo_num_generations: int
    grpo_prompts_per_step: int
    grpo_steps: int
    #: first guesses of the seconds a run spends outside its steps (load; OSFT adds its SVDs), and of the
    #: share of the matmul rate a step reaches; measured values replace them as runs finish
    load_seconds: dict[str, float] = field(default_factory=dict)
    osft_seconds: dict[str, float] = field(default_factory=dict)
    efficiency: float = 0.25


GPU = Profile(
    name="gpu",
    needs_cuda=True,
    budget_seconds=270,
    matmul_size=8192,
    matmul_dtype="bfloat16",
    model_dtype="bfloat16",
    model="qwen2.5-0.5b",
    large_model="qwen2.5-1.5b",
    micro_batch_tokens=(16384, 8192, 32768, 65536),
    liger_tokens=(16384, 65536, 32768, 8192),
    large_model_tokens=16384,
    max_seq_len=4096,
    median_length=600,
    length_sigma=0.9,
    max_length=3800,
    grpo_max_new_tokens=256,
    grpo_num_generations=8,
    grpo_prompts_per_step=4,
    grpo_steps=3,
    load_seconds={"qwen2.5-0.5b": 10, "qwen2.5-1.5b": 25},
    osft_seconds={"qwen2.5-0.5b": 15, "qwen2.5-1.5b": 45},
)
TINY = Profile(
    name="tiny",
    needs_cuda=False,
    budget_seconds=600,
    matmul_size=256,
    matmul_dtype="float32",
    model_dtype="float32",
    model="tiny-a",
    large_model="tiny-b",
    micro_batch_tokens=(512, 1024),
    liger_tokens=(512,),
    large_model_tokens=256,
    max_seq_len=256,
    median_length=60,
    length_sigma=0.9,
    max_length=240,
    grpo_max_new_tokens=8,
    grpo_num_generations=2,
    grpo_prompts_per_step=2,
    grpo_steps=2,
    load_seconds={"tiny-a": 2, "tiny-b": 2},
    osft_seconds={"tiny-a": 1, "tiny-b": 1},
    efficiency=0.05,
)


def warmup_and_measured(tokens: int) -> tuple[int, int]:
    """Warm-up and measured steps of a run: fewer of both where one step is long (and in --tiny)."""
    if tokens <= 2048:
        return 1, 2
    return (2, 3) if tokens <= 16384 else (1, 2)


# ------------------------------------------------------------------------------------------------- data
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or has had "
    "not but one all their they there been more when who will would can if no out so said what up its about "
    "into than them only other new some could time these two may then do first any my now such like our over "
    "man me even most made after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world still own see men work "
    "long get here between both life being under never day same another know while last might us great old "
    "year off come since against go came right used take three river mountain library teacher engineer "
    "village window journey problem computer kitchen garden market station bridge forest student doctor "
    "keyboard question picture planet harbour festival language machine quiet bright ancient curious gentle "
    "heavy narrow rapid simple strange famous hungry patient wooden golden frozen careful distant friendly"
)
WORDS = tuple(_WORD_TEXT.split(" "))


def sample_lengths(count: int, profile: Profile, rng: random.Random) -> list[int]:
    """``count`` token lengths, lognormal around ``median_length``, at least 16 and at most ``max_length``."""
    mu = math.log(profile.median_length)
    return [
        min(profile.max_length, max(16, round(rng.lognormvariate(mu, profile.length_sigma))))
        for _ in range(count)
    ]


def _text(tokens: int, tokens_per_word: float, rng: random.Random) -> str:
    return " ".join(rng.choices(WORDS, k=max(1, round(tokens / tokens_per_word))))


def write_chat_data(path: Path, lengths: list[int], tokens_per_word: float, seed: int) -> Path:
    """One ``messages`` row per length: a user turn of a fifth of it, an assistant turn of the rest (the
    chat template's dozen tokens come on top)."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as out:
        for n in lengths:
            user = max(4, n // 5)
            row = {
                "messages": [
                    {"role": "user", "content": _text(user, tokens_per_word, rng)},
                    {"role": "assistant", "content": _text(max(4, n - user - 12), tokens_per_word, rng)},
                ]
            }
            out.write(json.dumps(row) + "\n")
    return path


def write_prompt_data(path: Path, count: int, tokens_per_word: float, seed: int) -> Path:
    """``prompt`` rows of 20 to 60 tokens for the online run."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as out:
        for i in range(count):
            row = {"prompt": _text(rng.randint(20, 60), tokens_per_word, rng), "answer": str(i)}
            out.write(json.dumps(row) + "\n")
    return path


def mean_length(profile: Profile) -> float:
    """The mean of :func:`sample_lengths` (estimated from a large sample; sizes the steps)."""
    return statistics.fmean(sample_lengths(20000, profile, random.Random(12345)))


# ---------------------------------------------------------------------------------------------- workers
class WorkerGone(RuntimeError):
    """The worker process died or was stopped (its exit code in the message)."""


class Worker:
    """A spawned process running :func:`benchmarks.gpu_worker.serve`; one task at a time."""

    def __init__(self, name: str):
        from benchmarks import gpu_worker

        self.name = name
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=gpu_worker.serve, args=(child,), name=f"gpu-bench-{name}")
        self.process.start()
        child.close()
        self.pending = False

    def submit(self, task: str, **kwargs: Any) -> None:
        self.conn.send((task, kwargs))
        self.pending = True

    def result(self, timeout: float) -> tuple[str, Any]:
        """``("ok", value)`` or ``("error", details)``; :class:`WorkerGone` when it died or ran past
        ``timeout`` seconds (it is then killed)."""
        if not self.conn.poll(max(timeout, 0.0)):
            self.kill()
            raise WorkerGone(f"the {self.name} worker ran past {timeout:.0f} s and was stopped")
        try:
            answer: tuple[str, Any] = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            raise WorkerGone(f"the {self.name} worker died (exit code {self.process.exitcode})") from None
        self.pending = False
        return answer

    def call(self, task: str, timeout: float, **kwargs: Any) -> tuple[str, Any]:
        """Run ``task``; first take the answer of a task submitted earlier (it is not this one's)."""
        if self.pending:
            self.result(timeout)
        self.submit(task, **kwargs)
        return self.result(timeout)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)

    def close(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send(None)
            self.process.join(10)
        self.kill()


# ------------------------------------------------------------------------------------------------- jobs
@dataclass
class Job:
    """One entry of the plan: what to run, on which worker, and a guess of its seconds."""

    name: str
    kind: str  # "train", "grpo" or "build"
    worker: str  # "plain" or "liger"
    model: str
    algorithm: str = ""
    use_liger: bool = False
    tokens: int = 0


def plan_jobs(profile: Profile) -> list[Job]:
    """Every job after the matmul rate and the first model, in priority order."""
    model, large = profile.model, profile.large_model

    def pair(tokens: int, liger: bool, model_name: str = model) -> list[Job]:
        suffix = "-liger" if liger else ""
        size = f"{tokens // 1024}k" if tokens >= 1024 else str(tokens)
        prefix = "" if model_name == model else f"{model_name}-"
        return [
            Job(
                f"{prefix}{algorithm}-{size}{suffix}",
                "train",
                "liger" if liger else "plain",
                model_name,
                algorithm,
                liger,
                tokens,
            )
            for algorithm in ("sft", "osft")
        ]

    first, *rest = profile.micro_batch_tokens
    liger_first, *liger_rest = profile.liger_tokens
    jobs = [*pair(first, False), *pair(liger_first, True), Job("grpo", "grpo", "plain", model, "grpo")]
    for tokens in rest:
        jobs += pair(tokens, False)
    jobs += pair(liger_rest[0], True) if liger_rest else []
    jobs += [Job(f"build-{large}", "build", "plain", large)]
    jobs += pair(profile.large_model_tokens, True, large)
    for tokens in liger_rest[1:]:
        jobs += pair(tokens, True)
    return jobs


def train_options(
    profile: Profile, job: Job, model_dir: str, data: str, output_dir: str, samples_per_step: int, steps: int
) -> dict[str, Any]:
    """The ``TrainingConfig`` mapping of an sft/osft job."""
    return {
        "model_name_or_path": model_dir,
        "data_path": data,
        "output_dir": output_dir,
        "algorithm": job.algorithm,
        "unfreeze_rank_ratio": RATIO,
        "torch_dtype": "bfloat16",
        "max_seq_len": profile.max_seq_len,
        "overlong": "truncate",
        "effective_batch_size": samples_per_step,
        "max_tokens_per_gpu": job.tokens,
        "max_steps": steps,
        "learning_rate": 1e-5,
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "seed": 0,
        "use_liger": job.use_liger,
        "attn_implementation": "sdpa",
        "save_final_model": False,
        "log_every_steps": 1,
    }


def grpo_options(profile: Profile, model_dir: str, data: str, output_dir: str) -> dict[str, Any]:
    """The ``TrainingConfig`` mapping of the GRPO job."""
    new_tokens = profile.grpo_max_new_tokens
    return {
        "model_name_or_path": model_dir,
        "data_path": data,
        "output_dir": output_dir,
        "algorithm": "grpo",
        "rollout_backend": "hf",
        "reward_functions": [
            {"function": "overlong_penalty", "max_length": new_tokens, "buffer": new_tokens // 4}
        ],
        "num_generations": profile.grpo_num_generations,
        "effective_batch_size": profile.grpo_num_generations * profile.grpo_prompts_per_step,
        "max_new_tokens": new_tokens,
        "max_seq_len": 128 + new_tokens,
        "max_tokens_per_gpu": profile.max_seq_len * 4,
        "temperature": 1.0,
        "torch_dtype": "bfloat16",
        "max_steps": profile.grpo_steps,
        "learning_rate": 1e-6,
        "lr_scheduler": "constant",
        "seed": 0,
        "save_final_model": False,
        "log_every_steps": 1,
    }


# ----------------------------------------------------------------------------------------------- figures
def step_flops(parameters: int, shape: dict[str, int], tokens: int, sum_squared_lengths: int) -> float:
    """The useful work of one training step: ``6 N T`` plus causal attention over each sample."""
    return 6.0 * parameters * tokens + 6.0 * shape["num_layers"] * shape["hidden_size"] * sum_squared_lengths


def summarize_train(
    rows: list[dict[str, Any]],
    step_shapes: list[dict[str, int]],
    warmup: int,
    parameters: int,
    shape: dict[str, int],
    peak_tflops: float | None,
) -> dict[str, Any]:
    """The run's figures over its measured steps (the steps after ``warmup``)."""
    measured = rows[warmup:]
    figures: dict[str, Any] = {
        "steps_run": len(rows),
        "warmup_steps": warmup,
        "measured_steps": len(measured),
        "peak_memory_mib": max((row.get("memory_mib") or 0.0 for row in rows), default=None),
    }
    if not measured:
        return figures
    seconds = sum(row["seconds"] for row in measured)
    tokens = sum(row["tokens"] for row in measured)
    micro_batches = sum(row["micro_batches"] for row in measured)
    figures.update(
        tokens_per_second=tokens / seconds,
        step_seconds=[row["seconds"] for row in measured],
        step_seconds_median=statistics.median(row["seconds"] for row in measured),
        tokens_per_step=tokens / len(measured),
        tokens_per_micro_batch=tokens / micro_batches,
    )
    shapes = step_shapes[warmup : len(rows)]
    plan_matches = len(shapes) == len(measured) and all(
        s["tokens"] == row["tokens"] for s, row in zip(shapes, measured, strict=False)
    )
    figures["plan_matches"] = plan_matches
    if plan_matches:
        flops = sum(step_flops(parameters, shape, s["tokens"], s["sum_squared_lengths"]) for s in shapes)
        figures["model_tflops_per_second"] = flops / seconds / 1e12
        figures["attention_share_of_flops"] = 1 - 6.0 * parameters * tokens / flops
        figures["largest_micro_batch"] = max(s["largest_micro_batch"] for s in shapes)
        if peak_tflops:
            figures["mfu"] = figures["model_tflops_per_second"] / peak_tflops
    return figures


def summarize_grpo(rows: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Generation share of the step time and rollout tokens/s over the measured steps."""
    measured = rows[warmup:]
    figures: dict[str, Any] = {
        "steps_run": len(rows),
        "warmup_steps": warmup,
        "measured_steps": len(measured),
        "peak_memory_mib": max((row.get("memory_mib") or 0.0 for row in rows), default=None),
    }
    if not measured:
        return figures
    generation = sum(row["generation_seconds"] for row in measured)
    seconds = sum(row["seconds"] for row in measured)
    generated = sum(row["completion_length_mean"] * row["samples"] for row in measured)
    figures.update(
        step_seconds_median=statistics.median(row["seconds"] for row in measured),
        generation_share=generation / seconds,
        generation_seconds=generation,
        generated_tokens=generated,
        generation_tokens_per_second=generated / generation if generation else None,
        training_tokens_per_second=statistics.fmean(row["training_tokens_per_second"] for row in measured),
        completion_length_mean=statistics.fmean(row["completion_length_mean"] for row in measured),
    )
    return figures


def comparisons(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OSFT against SFT for every (model, tokens per micro-batch, Liger) where both measured steps: the
    step-time ratio (medians; the plans are identical) and the peak-memory ratio."""
    done = {
        (r["model"], r["max_tokens_per_gpu"], r["use_liger"], r["algorithm"]): r
        for r in runs
        if r.get("kind") == "train" and r.get("measured_steps")
    }
    rows = []
    for (model, tokens, liger, algorithm), osft in sorted(
        done.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])
    ):
        sft = done.get((model, tokens, liger, "sft"))
        if algorithm != "osft" or sft is None:
            continue
        rows.append(
            {
                "model": model,
                "max_tokens_per_gpu": tokens,
                "use_liger": liger,
                "liger_applied": bool(sft.get("liger_applied") and osft.get("liger_applied")),
                "sft_step_seconds": sft["step_seconds_median"],
                "osft_step_seconds": osft["step_seconds_median"],
                "step_time_ratio": osft["step_seconds_median"] / sft["step_seconds_median"],
                "sft_peak_memory_mib": sft["peak_memory_mib"],
                "osft_peak_memory_mib": osft["peak_memory_mib"],
                "memory_ratio": (osft["peak_memory_mib"] or 0) / sft["peak_memory_mib"]
                if sft["peak_memory_mib"]
                else None,
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------- runner
class Benchmark:
    """Runs the plan within the budget, writing the JSON after every measurement."""

    def __init__(self, profile: Profile, out: Path, budget: float, work: Path):
        self.profile = profile
        self.out = out
        self.budget = budget
        self.work = work
        self.workers: dict[str, Worker] = {}
        self.machine: dict[str, Any] = {}
        self.models: dict[str, dict[str, Any]] = {}
        self.data: dict[int, dict[str, Any]] = {}
        self.mean_length = mean_length(profile)
        self.measured_overhead: dict[tuple[str, str, bool], float] = {}
        self.efficiencies: list[float] = []
        self.result: dict[str, Any] = {
            "schema": SCHEMA,
            "mode": profile.name,
            "complete": False,
            "budget_seconds": budget,
            "elapsed_seconds": 0.0,
            "environment": {},
            "matmul_peak": None,
            "models": {},
            "data": {},
            "runs": [],
            "osft_vs_sft": [],
            "skipped": [],
        }

    # -- time
    def elapsed(self) -> float:
        return time.monotonic() - STARTED

    def left(self) -> float:
        return self.budget - self.elapsed()

    # -- output
    def write(self) -> None:
        self.result["elapsed_seconds"] = round(self.elapsed(), 1)
        self.result["osft_vs_sft"] = comparisons(self.result["runs"])
        record = {"result": self.result, "machine": self.machine, "date": datetime.date.today().isoformat()}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        partial = self.out.with_name(self.out.name + ".partial")
        partial.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(partial, self.out)

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():5.0f} s] {text}", flush=True)

    def skip(self, job: Job, reason: str) -> None:
        self.result["skipped"].append({"name": job.name, "reason": reason})
        self.say(f"{job.name}: skipped ({reason})")
        self.write()

    # -- workers
    def worker(self, name: str) -> Worker:
        if name not in self.workers or not self.workers[name].process.is_alive():
            self.workers[name] = Worker(name)
        return self.workers[name]

    def ask(self, worker: str, task: str, timeout: float, **kwargs: Any) -> tuple[str, Any]:
        try:
            return self.worker(worker).call(task, timeout, **kwargs)
        except WorkerGone as exc:
            self.workers.pop(worker, None)
            return "error", {"status": "stopped", "message": str(exc)}

    # -- plan
    def run(self) -> None:
        try:
            self._run()
        finally:
            self.result["complete"] = True
            self.write()
            for worker in self.workers.values():
                worker.close()
            print(table(self.result), flush=True)

    def _run(self) -> None:
        profile = self.profile
        self.worker("liger").submit("probe")  # the Liger worker starts (imports) while the other works
        status, probe = self.ask("plain", "probe", self.left() + GRACE_SECONDS)
        if status != "ok":
            raise SystemExit(f"the worker could not start: {probe.get('message')}")
        self.machine = probe["machine"]
        self.result["environment"] = probe["environment"]
        if profile.needs_cuda and probe["environment"]["device"] == "cpu":
            raise SystemExit("benchmarks.gpu needs a CUDA GPU (torch sees none); --tiny runs the CPU check")
        self.write()
        self.say(f"device {probe['environment']['device']}, torch {probe['environment']['torch']}")

        status, peak = self.ask(
            "plain",
            "matmul_peak",
            self.left() + GRACE_SECONDS,
            size=profile.matmul_size,
            dtype=profile.matmul_dtype,
            repeats=10,
            warmup=3,
        )
        if status == "ok":
            self.result["matmul_peak"] = peak
            self.say(f"matmul {profile.matmul_dtype} {profile.matmul_size}^3: {peak['tflops']:.1f} TFLOP/s")
        else:
            self.result["matmul_peak"] = {"status": peak["status"], "message": peak["message"]}
        self.write()
        if not self.build(profile.model):
            return
        for job in plan_jobs(profile):
            reason = self.skip_reason(job)
            if reason:
                self.skip(job, reason)
            elif job.kind == "build":
                self.build(job.model)
            else:
                self.run_job(job)

    def skip_reason(self, job: Job) -> str | None:
        """Why ``job`` does not run now (no model, or it would end after the budget); None when it runs."""
        if job.kind == "build":
            # worth it only when the model's first run fits after it too
            estimate = (10.0 if self.profile.needs_cuda else 3.0) + self.profile.load_seconds.get(
                job.model, 10.0
            )
            estimate += 10.0 if self.profile.needs_cuda else 1.0
        elif job.model not in self.models:
            return f"no model {job.model}"
        else:
            estimate = self.estimate(job)
        if self.elapsed() + estimate > self.budget:
            return f"time budget: about {estimate:.0f} s needed, {max(self.left(), 0):.0f} s left"
        return None

    def build(self, model: str) -> bool:
        path = self.work / "models" / model
        calibration = _text(2000, 1.0, random.Random(7))
        status, built = self.ask(
            "plain",
            "build_model",
            self.left() + GRACE_SECONDS,
            out_dir=str(path),
            shape=SHAPES[model],
            dtype=self.profile.model_dtype,
            calibration_text=calibration,
        )
        if status != "ok":
            self.result["models"][model] = {"shape": SHAPES[model], **built}
            self.say(f"build {model}: {built['status']}: {built['message']}")
            self.write()
            return False
        self.models[model] = built
        self.result["models"][model] = {
            "shape": SHAPES[model],
            "tie_word_embeddings": True,
            "dtype": self.profile.model_dtype,
            **{k: v for k, v in built.items() if k != "path"},
        }
        self.say(
            f"built {model}: {built['parameters'] / 1e6:.0f} M parameters in {built['build_seconds']:.1f} s"
        )
        self.write()
        return True

    def dataset(self, job: Job) -> tuple[str, int, int, int]:
        """The data file of ``job``'s tokens per micro-batch (shared by sft/osft/Liger: identical plans),
        its samples per step, warm-up and measured steps."""
        warmup, measured = warmup_and_measured(job.tokens)
        samples_per_step = max(1, int(0.85 * job.tokens / self.mean_length))
        key = job.tokens
        if key not in self.data:
            steps = warmup + measured
            lengths = sample_lengths((steps + 1) * samples_per_step, self.profile, random.Random(job.tokens))
            tokens_per_word = self.models[self.profile.model]["tokens_per_word"]
            path = write_chat_data(
                self.work / f"chat-{job.tokens}.jsonl", lengths, tokens_per_word, job.tokens
            )
            self.data[key] = {"path": str(path), "samples": len(lengths), "target_tokens": sum(lengths)}
            self.result["data"][str(job.tokens)] = {
                "samples": len(lengths),
                "target_tokens": sum(lengths),
                "length_distribution": {
                    "kind": "lognormal",
                    "median": self.profile.median_length,
                    "sigma": self.profile.length_sigma,
                    "min": 16,
                    "max": self.profile.max_length,
                },
                "samples_per_step": samples_per_step,
            }
        return self.data[key]["path"], samples_per_step, warmup, measured

    def estimate(self, job: Job) -> float:
        """Seconds ``job`` should take: its overhead (measured once a like run finished) plus its steps
        (their work at the measured or first-guess share of the matmul rate)."""
        profile = self.profile
        peak = (self.result["matmul_peak"] or {}).get("tflops") or 100.0
        efficiency = statistics.median(self.efficiencies) if self.efficiencies else profile.efficiency
        overhead = self.measured_overhead.get((job.model, job.algorithm, job.use_liger))
        if overhead is None:
            overhead = self.measured_overhead.get((job.model, job.algorithm, False))
        if overhead is None:
            overhead = profile.load_seconds.get(job.model, 10.0)
            overhead += profile.osft_seconds.get(job.model, 10.0) if job.algorithm == "osft" else 0.0
            overhead += 5.0 if job.use_liger and profile.needs_cuda else 0.0
        if job.kind == "grpo":
            return overhead + (30.0 if profile.needs_cuda else 5.0)
        shape = SHAPES[job.model]
        parameters = self.models[job.model]["parameters"]
        warmup, measured = warmup_and_measured(job.tokens)
        tokens = 0.85 * job.tokens
        # sdpa over a packed micro-batch computes the whole (masked) square: count it in the guess
        work = 6.0 * parameters * tokens + 12.0 * shape["num_layers"] * shape["hidden_size"] * tokens**2
        return overhead + (warmup + measured) * work / (efficiency * peak * 1e12)

    def run_job(self, job: Job) -> None:
        model = self.models[job.model]
        output_dir = str(self.work / "runs" / job.name)
        shutil.rmtree(output_dir, ignore_errors=True)
        if job.kind == "grpo":
            warmup = 1
            data = write_prompt_data(self.work / "prompts.jsonl", 64, model["tokens_per_word"], 0)
            options = grpo_options(self.profile, model["path"], str(data), output_dir)
        else:
            data_path, samples_per_step, warmup, measured = self.dataset(job)
            options = train_options(
                self.profile, job, model["path"], data_path, output_dir, samples_per_step, warmup + measured
            )
        self.say(f"{job.name}: running (about {self.estimate(job):.0f} s)")
        started = time.monotonic()
        status, answer = self.ask(
            job.worker,
            "train",
            self.left() + GRACE_SECONDS,
            options=options,
            plan_attention=job.kind == "train",
        )
        run: dict[str, Any] = {
            "name": job.name,
            "kind": job.kind,
            "model": job.model,
            "algorithm": job.algorithm,
            "use_liger": job.use_liger,
            "max_tokens_per_gpu": options["max_tokens_per_gpu"],
            "config": {
                k: v for k, v in options.items() if k not in ("model_name_or_path", "data_path", "output_dir")
            },
            "wall_seconds": round(time.monotonic() - started, 2),
        }
        if status == "ok":
            rows, shapes = answer["rows"], answer["step_shapes"]
            run.update(status="ok", run_seconds=answer["run_seconds"], liger_applied=answer["liger_applied"])
        else:
            run.update(status=answer["status"], message=answer["message"], traceback=answer.get("traceback"))
            if answer.get("peak_memory_mib") is not None:
                run["peak_memory_mib_at_failure"] = answer["peak_memory_mib"]
            rows, shapes = self.rows_after_failure(job, output_dir), []
        peak = (self.result["matmul_peak"] or {}).get("tflops")
        if job.kind == "grpo":
            run.update(summarize_grpo(rows, warmup))
        else:
            run.update(summarize_train(rows, shapes, warmup, model["parameters"], SHAPES[job.model], peak))
        run["steps"] = rows
        if status == "ok":
            self.learn(job, run, answer)
        self.result["runs"].append(run)
        self.write()
        self.say(describe_run(run))

    def rows_after_failure(self, job: Job, output_dir: str) -> list[dict[str, Any]]:
        from benchmarks.gpu_worker import read_rows

        return read_rows(output_dir)

    def learn(self, job: Job, run: dict[str, Any], answer: dict[str, Any]) -> None:
        """Better guesses for the next jobs: this run's overhead and the share of the matmul rate it reached
        (against the guess's own count of the work)."""
        steps = sum(row["seconds"] for row in run["steps"])
        self.measured_overhead[(job.model, job.algorithm, job.use_liger)] = max(
            answer["run_seconds"] - steps, 0.0
        )
        if job.kind != "train" or not run.get("measured_steps"):
            return
        peak = (self.result["matmul_peak"] or {}).get("tflops")
        if not peak:
            return
        shape = SHAPES[job.model]
        tokens = run["tokens_per_micro_batch"]
        work = (
            6.0 * self.models[job.model]["parameters"] * tokens
            + 12.0 * shape["num_layers"] * shape["hidden_size"] * tokens**2
        )
        micro_batches = run["tokens_per_step"] / tokens
        self.efficiencies.append(work * micro_batches / (run["step_seconds_median"] * peak * 1e12))


def describe_run(run: dict[str, Any]) -> str:
    if run["status"] != "ok" and not run.get("measured_steps"):
        return f"{run['name']}: {run['status']}: {run.get('message', '')}"
    if run["kind"] == "grpo":
        return (
            f"{run['name']}: generation {run['generation_share']:.0%} of the step, "
            f"{run['generation_tokens_per_second']:,.0f} rollout tokens/s, {(run['peak_memory_mib'] or 0) / 1024:.1f} GiB"
        )
    mfu = f"MFU {run['mfu']:.1%}, " if run.get("mfu") is not None else ""
    return (
        f"{run['name']}: {run['status']}, {run['tokens_per_second']:,.0f} tokens/s, {mfu}"
        f"{(run['peak_memory_mib'] or 0) / 1024:.1f} GiB, step {run['step_seconds_median']:.3f} s"
    )


# ------------------------------------------------------------------------------------------------- output
def _gib(mib: float | None) -> str:
    return "-" if mib is None else f"{mib / 1024:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _liger(asked: bool, applied: bool | None) -> str:
    if not asked:
        return "no"
    return "yes" if applied else "asked, not applied"


def run_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for run in result["runs"]:
        if run["kind"] != "train":
            continue
        status = run["status"]
        if status != "ok" and run.get("peak_memory_mib_at_failure") is not None:
            status += f" (at {_gib(run['peak_memory_mib_at_failure'])} GiB)"
        liger = _liger(run["use_liger"], run.get("liger_applied"))
        rows.append(
            [
                run["model"],
                run["algorithm"],
                liger,
                f"{run['max_tokens_per_gpu']:,}",
                _num(run.get("tokens_per_micro_batch")),
                _num(run.get("tokens_per_second")),
                _pct(run.get("mfu")),
                _pct(run.get("attention_share_of_flops")),
                _gib(run.get("peak_memory_mib")),
                _num(run.get("step_seconds_median"), 3),
                status,
            ]
        )
    return rows


RUN_HEADER = [
    "model",
    "method",
    "Liger",
    "max tokens per micro-batch",
    "tokens per micro-batch",
    "tokens/s",
    "MFU",
    "attention share of FLOPs",
    "peak GiB",
    "step s (median)",
    "status",
]
RATIO_HEADER = [
    "model",
    "Liger",
    "max tokens per micro-batch",
    "SFT step s",
    "OSFT step s",
    "OSFT/SFT time",
    "SFT GiB",
    "OSFT GiB",
    "OSFT/SFT memory",
]


def ratio_rows(result: dict[str, Any]) -> list[list[str]]:
    return [
        [
            c["model"],
            _liger(c["use_liger"], c["liger_applied"]),
            f"{c['max_tokens_per_gpu']:,}",
            _num(c["sft_step_seconds"], 3),
            _num(c["osft_step_seconds"], 3),
            f"{c['step_time_ratio']:.2f}x",
            _gib(c["sft_peak_memory_mib"]),
            _gib(c["osft_peak_memory_mib"]),
            "-" if c["memory_ratio"] is None else f"{c['memory_ratio']:.2f}x",
        ]
        for c in comparisons(result["runs"])
    ]


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _plain(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in [header, *rows]]


def table(result: dict[str, Any]) -> str:
    """The short summary printed last."""
    peak = result.get("matmul_peak") or {}
    lines = [
        "",
        f"== {result['environment'].get('device', '?')}: matmul {peak.get('dtype', '?')} "
        f"{_num(peak.get('tflops'), 1)} TFLOP/s; {result['elapsed_seconds']:.0f} s of {result['budget_seconds']:.0f} ==",
        *_plain(RUN_HEADER, run_rows(result)),
        "",
        *_plain(RATIO_HEADER, ratio_rows(result)),
    ]
    for run in result["runs"]:
        if run["kind"] == "grpo":
            lines += ["", describe_run(run)]
    for skipped in result["skipped"]:
        lines.append(f"skipped {skipped['name']}: {skipped['reason']}")
    return "\n".join(lines)


def render(result: dict[str, Any]) -> str:
    """The GPU section of docs/performance.md from a stored result."""
    env = result["environment"]
    peak = result.get("matmul_peak") or {}
    lines = [
        f"## On a GPU: {env.get('device', '?')}",
        "",
        f"`benchmarks/gpu.py` ({result['mode']} mode, {result['elapsed_seconds']:.0f} s of a "
        f"{result['budget_seconds']:.0f} s budget): torch {env.get('torch')}, CUDA {env.get('cuda')}, "
        f"transformers {env.get('transformers')}, liger-kernel {env.get('liger_kernel') or 'not installed'}. "
        f"Random-weight models with Qwen2.5's shapes (tied embeddings), synthetic chat data of lognormal "
        f"lengths, bf16 autocast over fp32 master weights, sdpa attention, OSFT at unfreeze_rank_ratio "
        f"{RATIO}. Figures are over the steps after the warm-up steps.",
        "",
        f"Measured matmul rate ({peak.get('dtype', '?')}, {'x'.join(map(str, peak.get('shape', [])))}, "
        f"median of {peak.get('repeats', '?')}): **{_num(peak.get('tflops'), 1)} TFLOP/s**, the MFU "
        "denominator. MFU counts 6 x parameters x tokens plus causal attention within each sample "
        "(6 x layers x hidden x the sum of squared sample lengths); sdpa over a packed micro-batch computes "
        "the whole masked square, which the attention share shows as lost work at large micro-batches.",
        "",
        *_markdown(RUN_HEADER, run_rows(result)),
        "",
        "OSFT against SFT on the same plan (same data, seed and micro-batches):",
        "",
        *_markdown(RATIO_HEADER, ratio_rows(result)),
    ]
    for run in result["runs"]:
        if run["kind"] != "grpo":
            continue
        lines += [
            "",
            "GRPO (`rollout_backend: hf`, overlong_penalty reward, "
            f"{run['config']['effective_batch_size']} completions of {run['config']['max_new_tokens']} new tokens per step):",
        ]
        if run.get("measured_steps"):
            lines.append(
                f"generation takes {run['generation_share']:.0%} of the step ({run['step_seconds_median']:.2f} s), "
                f"{_num(run['generation_tokens_per_second'])} rollout tokens/s, peak {_gib(run['peak_memory_mib'])} GiB."
            )
        else:
            lines.append(f"{run['status']}: {run.get('message', '')}")
    if result["skipped"]:
        lines += [
            "",
            "Skipped to keep within the budget: "
            + "; ".join(f"{s['name']} ({s['reason']})" for s in result["skipped"])
            + ".",
        ]
    return "\n".join(lines)


NOT_MEASURED = """## On a GPU

Not measured yet: `benchmarks/results/gpu.json` does not exist. Every figure above comes from a CPU.
`python -m benchmarks.gpu --out gpu.json` on a CUDA GPU measures training throughput, MFU and peak memory
of SFT and OSFT on a model with Qwen2.5-0.5B's shapes, with and without Liger, and a GRPO step; copy the file
to `benchmarks/results/gpu.json` and run `python -m benchmarks.run --render-only`."""


def render_stored(path: Path = RESULT_FILE) -> str:
    """The GPU section from ``path``, or the not-measured-yet section when it does not exist."""
    if not path.exists():
        return NOT_MEASURED
    record = json.loads(path.read_text())
    machine = ", ".join(f"{k} {v}" for k, v in record["machine"].items())
    return f"{render(record['result'])}\n\nMachine: {machine}. Date: {record['date']}."


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="the JSON to write (rewritten after every measurement)"
    )
    parser.add_argument(
        "--suite",
        choices=("standard", "rl"),
        default="standard",
        help="standard: the standing checks (SFT/OSFT/GRPO); rl: online RL steps (benchmarks.gpu_rl)",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (checks the code paths)")
    parser.add_argument(
        "--budget-seconds",
        type=float,
        help="stop starting runs that would end later (default: 270, rl 215; tiny 600)",
    )
    parser.add_argument("--keep-work", action="store_true", help="keep the models, data and run folders")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(tempfile.mkdtemp(prefix="kfp-gpu-bench-"))
    try:
        if args.suite == "rl":
            from benchmarks import gpu_rl

            rl = gpu_rl.TINY if args.tiny else gpu_rl.GPU
            gpu_rl.RLBenchmark(rl, args.out, args.budget_seconds or rl.budget_seconds, work).run()
        else:
            profile = TINY if args.tiny else GPU
            Benchmark(profile, args.out, args.budget_seconds or profile.budget_seconds, work).run()
    finally:
        if args.keep_work:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
