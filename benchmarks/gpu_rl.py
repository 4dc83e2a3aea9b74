"""Online RL on one GPU (``python -m benchmarks.gpu --suite rl``): a step of grpo, ppo, a2c and trpo.

The model of the standing GPU checks (:mod:`benchmarks.gpu`: random weights with Qwen2.5-0.5B's shapes, bf16,
sdpa) and the prompt data of its GRPO run, with ``rollout_backend: hf``, the ``overlong_penalty`` rule reward
and a KL penalty (``kl_coef`` 0.05, so the reference model is loaded and in every step). Runs, in priority
order (:func:`plan_jobs`):

1. ``grpo``: the baseline, the standing checks' GRPO run plus the KL penalty;
2. ``ppo``: the value model started from the policy, ``num_iterations`` 2, ``num_mini_batches`` 2;
3. ``a2c``;
4. ``trpo-lora``: trpo with LoRA adapters (``lora_r`` 16; ``distributed: ddp``, which one process ignores);
5. ``trpo-full``: trpo with full fine-tuning (``distributed: ddp``); its memory check may refuse it.

Per run, over the steps after the warm-up step: the step's seconds (median), the generation share, the
training seconds, rollout tokens/s, peak memory, the value model's metrics, trpo's ``trpo_*`` metrics
(backtracks, accepted share, KL, the natural-gradient step's seconds), and each step time over ppo's.

A run the config refuses (``algorithm: trpo`` before the online loop takes it) is recorded as ``not
available``; one that a check refuses once the model is loaded (trpo's memory check) as ``refused``; both
with the message. Like the standing checks, the suite keeps to a time budget (default 215 s, so that the
whole call ends within 4 minutes), skips a run that would not fit (the JSON says why) and writes its JSON
after every run, atomically. ``--tiny`` runs it on the CPU with tiny shapes and without ``trpo-full``.

On a GPU machine, from the repository root::

    PYTHONPATH=. python3 -m benchmarks.gpu --suite rl --out /path/gpu_rl.json

then here: copy that file to ``benchmarks/results/gpu_rl.json`` and run ``python -m benchmarks.run
--render-only`` (the subsection "Online RL on a GPU" of docs/performance.md).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import gpu
from benchmarks.gpu_worker import read_rows

RESULT_FILE = gpu.ROOT / "benchmarks" / "results" / "gpu_rl.json"
KL_COEF = 0.05
LORA_R = 16


@dataclass(frozen=True)
class RLProfile:
    """Sizes of one mode of the suite (``gpu`` on a CUDA device, ``tiny`` on the CPU)."""

    name: str
    needs_cuda: bool
    budget_seconds: float
    model: str
    model_dtype: str
    max_new_tokens: int
    num_generations: int
    prompts_per_step: int
    warmup_steps: int
    measured_steps: int
    max_tokens_per_gpu: int
    #: trpo's micro-batches (see plan_jobs)
    trpo_tokens_per_gpu: int
    with_trpo_full: bool
    #: first guesses, replaced by the grpo run's measured ones: seconds outside the steps (loading the
    #: policy, the reference model and the value model), the first step's extra seconds, a grpo step's
    load_seconds: float
    first_step_extra_seconds: float
    grpo_step_seconds: float
    #: guesses of each algorithm's step over grpo's (trpo: the natural-gradient step's forwards and double
    #: backwards on top of the rollouts)
    step_cost: dict[str, float] = field(default_factory=dict)


COSTS = {"grpo": 1.0, "ppo": 1.3, "a2c": 1.15, "trpo-lora": 1.5, "trpo-full": 2.0}

GPU = RLProfile(
    name="gpu",
    needs_cuda=True,
    budget_seconds=215,
    model="qwen2.5-0.5b",
    model_dtype="bfloat16",
    # half the standing GRPO run's 256, so that the five runs fit in 4 minutes: generation is most of a step
    max_new_tokens=128,
    num_generations=8,
    prompts_per_step=4,
    warmup_steps=1,
    measured_steps=2,
    max_tokens_per_gpu=16384,
    trpo_tokens_per_gpu=2048,
    with_trpo_full=True,
    load_seconds=12.0,
    first_step_extra_seconds=15.0,
    grpo_step_seconds=5.0,
    step_cost=COSTS,
)
TINY = RLProfile(
    name="tiny",
    needs_cuda=False,
    budget_seconds=600,
    model="tiny-a",
    model_dtype="float32",
    max_new_tokens=8,
    num_generations=2,
    prompts_per_step=2,
    warmup_steps=1,
    measured_steps=1,
    max_tokens_per_gpu=1024,
    trpo_tokens_per_gpu=512,
    with_trpo_full=False,
    load_seconds=2.0,
    first_step_extra_seconds=1.0,
    grpo_step_seconds=1.0,
    step_cost=COSTS,
)


@dataclass(frozen=True)
class RLJob:
    """One run: its name, algorithm and the options it adds to the common ones."""

    name: str
    algorithm: str
    options: dict[str, Any]

    @property
    def trainable(self) -> str:
        return f"LoRA r{self.options['lora_r']}" if self.options.get("lora_r") else "full"


def _trpo_tokens(result: dict[str, Any]) -> str:
    """The micro-batch size of the stored trpo runs (``?`` when none ran)."""
    sizes = {
        run.get("config", {}).get("max_tokens_per_gpu")
        for run in result.get("runs", [])
        if str(run.get("name", "")).startswith("trpo")
    }
    sizes.discard(None)
    return ", ".join(f"{size:,}" for size in sorted(sizes)) or "?"


def plan_jobs(profile: RLProfile) -> list[RLJob]:
    """The runs in priority order. TRPO's Fisher-vector products keep the double-backward graph of a whole
    micro-batch (full-vocabulary logits, attention on the math kernel), so its runs take micro-batches of
    ``trpo_tokens_per_gpu`` tokens (the sum over micro-batches is the same product)."""
    trpo = {
        "value_model_init": "policy",
        "distributed": "ddp",
        "max_tokens_per_gpu": profile.trpo_tokens_per_gpu,
    }
    jobs = [
        RLJob("grpo", "grpo", {}),
        RLJob("ppo", "ppo", {"value_model_init": "policy", "num_iterations": 2, "num_mini_batches": 2}),
        RLJob("a2c", "a2c", {"value_model_init": "policy"}),
        RLJob("trpo-lora", "trpo", {**trpo, "lora_r": LORA_R}),
    ]
    if profile.with_trpo_full:
        jobs.append(RLJob("trpo-full", "trpo", trpo))
    return jobs


def run_options(profile: RLProfile, job: RLJob, model_dir: str, data: str, output_dir: str) -> dict[str, Any]:
    """The ``TrainingConfig`` mapping of ``job``: the standing checks' GRPO run with the KL penalty."""
    new_tokens = profile.max_new_tokens
    return {
        "model_name_or_path": model_dir,
        "data_path": data,
        "output_dir": output_dir,
        "algorithm": job.algorithm,
        "rollout_backend": "hf",
        "reward_functions": [
            {"function": "overlong_penalty", "max_length": new_tokens, "buffer": new_tokens // 4}
        ],
        "kl_coef": KL_COEF,
        "num_generations": profile.num_generations,
        "effective_batch_size": profile.num_generations * profile.prompts_per_step,
        "max_new_tokens": new_tokens,
        "max_seq_len": 128 + new_tokens,
        "max_tokens_per_gpu": profile.max_tokens_per_gpu,
        "temperature": 1.0,
        "torch_dtype": "bfloat16",
        "attn_implementation": "sdpa",
        "max_steps": profile.warmup_steps + profile.measured_steps,
        "learning_rate": 1e-6,
        "lr_scheduler": "constant",
        "seed": 0,
        "save_final_model": False,
        "log_every_steps": 1,
        **job.options,
    }


# ----------------------------------------------------------------------------------------------- figures
VALUE_METRICS = ("value_loss", "explained_variance", "value_grad_norm", "value_mean", "returns_mean")


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if isinstance(row.get(key), int | float)]
    return statistics.fmean(values) if values else None


def summarize(rows: list[dict[str, Any]], warmup: int, peak_memory_mib: float | None) -> dict[str, Any]:
    """A run's figures over its measured steps (after ``warmup``); the value and trpo metrics where the rows
    have them."""
    measured = rows[warmup:]
    row_peak = max((row.get("memory_mib") or 0.0 for row in rows), default=0.0)
    figures: dict[str, Any] = {
        "steps_run": len(rows),
        "warmup_steps": warmup,
        "measured_steps": len(measured),
        "peak_memory_mib": max(row_peak, peak_memory_mib or 0.0) or None,
    }
    if not measured:
        return figures
    seconds = sum(row["seconds"] for row in measured)
    generation = sum(row["generation_seconds"] for row in measured)
    generated = sum(row["completion_length_mean"] * row["samples"] for row in measured)
    figures.update(
        step_seconds=[row["seconds"] for row in measured],
        step_seconds_median=statistics.median(row["seconds"] for row in measured),
        generation_share=generation / seconds,
        generation_seconds_median=statistics.median(row["generation_seconds"] for row in measured),
        training_seconds_median=statistics.median(row["training_seconds"] for row in measured),
        rollout_tokens_per_second=generated / generation if generation else None,
        kl=_mean(measured, "kl"),
        value={key: _mean(measured, key) for key in VALUE_METRICS if _mean(measured, key) is not None},
    )
    trpo_keys = sorted({key for row in measured for key in row if key.startswith("trpo_")})
    if trpo_keys:
        figures["trpo"] = {key: _mean(measured, key) for key in trpo_keys}
        figures["trpo"]["trpo_seconds_median"] = (
            statistics.median(row["trpo_seconds"] for row in measured if "trpo_seconds" in row)
            if "trpo_seconds" in trpo_keys
            else None
        )
    return figures


def ratios_to_ppo(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Each measured run's median step seconds over ppo's (none without a measured ppo run)."""
    done = {run["name"]: run for run in runs if run.get("measured_steps")}
    if "ppo" not in done:
        return {}
    ppo = done["ppo"]["step_seconds_median"]
    return {name: run["step_seconds_median"] / ppo for name, run in done.items()}


def failure_status(job: RLJob, answer: dict[str, Any]) -> str:
    """``not available`` when the config refuses trpo itself (the option ``algorithm``; the online loop does
    not take it yet), ``refused`` when a check refuses the run once the model is loaded (trpo's memory
    check), otherwise the worker's status (``error``, ``oom``, ``stopped``)."""
    problems = answer.get("config_problems")
    if not problems:
        return str(answer["status"])
    if answer.get("config_phase") == "training":
        return "refused"
    if job.algorithm == "trpo" and [path for path, _ in problems] == ["algorithm"]:
        return "not available"
    return "config error"


# ------------------------------------------------------------------------------------------------- runner
class RLBenchmark(gpu.Benchmark):
    """Runs :func:`plan_jobs` within the budget in one worker, writing the JSON after every run."""

    def __init__(self, profile: RLProfile, out: Path, budget: float, work: Path):
        self.rl = profile
        shapes_profile = gpu.TINY if profile.name == "tiny" else gpu.GPU
        super().__init__(shapes_profile, out, budget, work)
        self.result = {
            "schema": gpu.SCHEMA,
            "suite": "rl",
            "mode": profile.name,
            "complete": False,
            "budget_seconds": budget,
            "elapsed_seconds": 0.0,
            "environment": {},
            "models": {},
            "runs": [],
            "step_time_over_ppo": {},
            "skipped": [],
        }
        self.load_seconds = profile.load_seconds
        self.first_step_extra = profile.first_step_extra_seconds
        self.grpo_step = profile.grpo_step_seconds

    def write(self) -> None:
        self.result["step_time_over_ppo"] = ratios_to_ppo(self.result["runs"])
        for run in self.result["runs"]:
            if run["name"] in self.result["step_time_over_ppo"]:
                run["step_time_over_ppo"] = self.result["step_time_over_ppo"][run["name"]]
        elapsed = round(self.elapsed(), 1)
        self.result["elapsed_seconds"] = elapsed
        record = {"result": self.result, "machine": self.machine, "date": datetime.date.today().isoformat()}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        partial = self.out.with_name(self.out.name + ".partial")
        partial.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(partial, self.out)

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
        status, probe = self.ask("plain", "probe", self.left() + gpu.GRACE_SECONDS)
        if status != "ok":
            raise SystemExit(f"the worker could not start: {probe.get('message')}")
        self.machine = probe["machine"]
        self.result["environment"] = probe["environment"]
        if self.rl.needs_cuda and probe["environment"]["device"] == "cpu":
            raise SystemExit("benchmarks.gpu needs a CUDA GPU (torch sees none); --tiny runs the CPU check")
        self.write()
        self.say(f"device {probe['environment']['device']}, torch {probe['environment']['torch']}")
        if not self.build(self.rl.model):
            return
        for job in plan_jobs(self.rl):
            estimate = self.estimate_rl(job)
            if self.elapsed() + estimate > self.budget:
                reason = f"time budget: about {estimate:.0f} s needed, {max(self.left(), 0):.0f} s left"
                self.result["skipped"].append({"name": job.name, "reason": reason})
                self.say(f"{job.name}: skipped ({reason})")
                self.write()
            else:
                self.run_rl(job)

    def estimate_rl(self, job: RLJob) -> float:
        """Seconds ``job`` should take: loading, the first step's extra, and its steps at the grpo step's
        seconds times the algorithm's cost guess (the grpo run's measured figures once it ran)."""
        steps = self.rl.warmup_steps + self.rl.measured_steps
        cost = self.rl.step_cost.get(job.name, 1.0)
        return self.load_seconds + self.first_step_extra + steps * self.grpo_step * cost

    def run_rl(self, job: RLJob) -> None:
        model = self.models[self.rl.model]
        output_dir = str(self.work / "runs" / job.name)
        shutil.rmtree(output_dir, ignore_errors=True)
        data = gpu.write_prompt_data(self.work / "prompts.jsonl", 64, model["tokens_per_word"], 0)
        options = run_options(self.rl, job, model["path"], str(data), output_dir)
        self.say(f"{job.name}: running (about {self.estimate_rl(job):.0f} s)")
        started = time.monotonic()
        status, answer = self.ask(
            "plain", "train", self.left() + gpu.GRACE_SECONDS, options=options, plan_attention=False
        )
        run: dict[str, Any] = {
            "name": job.name,
            "algorithm": job.algorithm,
            "trainable": job.trainable,
            "model": self.rl.model,
            "config": {
                k: v for k, v in options.items() if k not in ("model_name_or_path", "data_path", "output_dir")
            },
            "wall_seconds": round(time.monotonic() - started, 2),
        }
        if status == "ok":
            rows, peak = answer["rows"], answer["peak_memory_mib"]
            run.update(status="ok", run_seconds=answer["run_seconds"])
        else:
            run.update(status=failure_status(job, answer), message=answer["message"])
            if answer.get("traceback") and run["status"] not in ("not available", "refused"):
                run["traceback"] = answer["traceback"]
            rows, peak = read_rows(output_dir), answer.get("peak_memory_mib")
        run.update(summarize(rows, self.rl.warmup_steps, peak))
        run["steps"] = rows
        if job.name == "grpo" and status == "ok" and run.get("measured_steps"):
            self.grpo_step = run["step_seconds_median"]
            self.first_step_extra = max(rows[0]["seconds"] - self.grpo_step, 0.0)
            self.load_seconds = max(answer["run_seconds"] - sum(row["seconds"] for row in rows), 0.0)
        self.result["runs"].append(run)
        self.write()
        self.say(describe_run(run))


def describe_run(run: dict[str, Any]) -> str:
    if not run.get("measured_steps"):
        return f"{run['name']}: {run['status']}: {run.get('message', '')}"
    return (
        f"{run['name']}: step {run['step_seconds_median']:.2f} s, generation {run['generation_share']:.0%}, "
        f"training {run['training_seconds_median']:.2f} s, {gpu._num(run['rollout_tokens_per_second'])} "
        f"rollout tokens/s, {gpu._gib(run['peak_memory_mib'])} GiB"
    )


# ------------------------------------------------------------------------------------------------- output
RUN_HEADER = [
    "run",
    "trainable",
    "step s (median)",
    "step / ppo's",
    "generation share",
    "training s",
    "rollout tokens/s",
    "KL per token",
    "peak GiB",
    "status",
]
VALUE_HEADER = ["run", "value loss", "explained variance", "value grad norm", "value mean", "returns mean"]
TRPO_HEADER = [
    "run",
    "backtracks",
    "accepted share",
    "KL after the step",
    "step fraction",
    "CG iterations",
    "natural-gradient step s (median)",
]


def _fixed(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for run in result["runs"]:
        ratio = run.get("step_time_over_ppo")
        rows.append(
            [
                run["name"],
                run["trainable"],
                _fixed(run.get("step_seconds_median"), 2),
                "-" if ratio is None else f"{ratio:.2f}x",
                gpu._pct(run.get("generation_share")),
                _fixed(run.get("training_seconds_median"), 2),
                gpu._num(run.get("rollout_tokens_per_second")),
                _fixed(run.get("kl"), 4),
                gpu._gib(run.get("peak_memory_mib")),
                run["status"],
            ]
        )
    return rows


def failure_notes(result: dict[str, Any]) -> list[str]:
    """One line per run that did not measure: its status and message."""
    return [
        f"{run['name']}: {run['status']}: {run.get('message', '')}".replace("\n", " ")
        for run in result["runs"]
        if not run.get("measured_steps")
    ]


def value_rows(result: dict[str, Any]) -> list[list[str]]:
    return [
        [run["name"], *(_fixed(run["value"].get(key), 4) for key in VALUE_METRICS)]
        for run in result["runs"]
        if run.get("value")
    ]


def trpo_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for run in result["runs"]:
        trpo = run.get("trpo")
        if not trpo:
            continue
        rows.append(
            [
                run["name"],
                _fixed(trpo.get("trpo_backtracks"), 1),
                gpu._pct(trpo.get("trpo_accepted")),
                _fixed(trpo.get("trpo_kl"), 5),
                _fixed(trpo.get("trpo_step_fraction"), 3),
                _fixed(trpo.get("trpo_cg_iterations"), 1),
                _fixed(trpo.get("trpo_seconds_median"), 2),
            ]
        )
    return rows


def table(result: dict[str, Any]) -> str:
    """The short summary printed last."""
    lines = [
        "",
        f"== {result['environment'].get('device', '?')}: online RL, {result['elapsed_seconds']:.0f} s of "
        f"{result['budget_seconds']:.0f} ==",
        *gpu._plain(RUN_HEADER, run_rows(result)),
        *failure_notes(result),
    ]
    for header, rows in ((VALUE_HEADER, value_rows(result)), (TRPO_HEADER, trpo_rows(result))):
        if rows:
            lines += ["", *gpu._plain(header, rows)]
    lines += [f"skipped {s['name']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines)


TITLE = "### Online RL on a GPU"


def render(result: dict[str, Any]) -> str:
    """The subsection "Online RL on a GPU" of docs/performance.md from a stored result."""
    env = result["environment"]
    runs = result["runs"]
    config = runs[0]["config"] if runs else {}
    lines = [
        f"{TITLE}: {env.get('device', '?')}",
        "",
        f"`benchmarks/gpu.py --suite rl` ({result['mode']} mode, {result['elapsed_seconds']:.0f} s of a "
        f"{result['budget_seconds']:.0f} s budget): torch {env.get('torch')}, CUDA {env.get('cuda')}, "
        f"transformers {env.get('transformers')}. The random-weight model of the standing checks, bf16, sdpa, "
        f"the GRPO run's prompt data, `rollout_backend: hf`, the overlong_penalty reward, kl_coef {KL_COEF} "
        f"(the reference model in every step); {config.get('effective_batch_size', '?')} completions of "
        f"{config.get('max_new_tokens', '?')} new tokens per step. ppo: value model from the policy, "
        f"num_iterations 2, num_mini_batches 2; trpo: distributed ddp, its defaults (max_kl 0.01, 10 CG "
        "iterations), micro-batches of at most "
        f"{_trpo_tokens(result)} tokens (its Fisher-vector products keep a micro-batch's double-backward graph: "
        "full-vocabulary logits and attention on the math kernel; a whole rollout batch in one micro-batch ran "
        "out of memory). Figures are medians over the steps after the warm-up step; the value and trpo metrics "
        "are means over the same steps.",
        "",
        *gpu._markdown(RUN_HEADER, run_rows(result)),
    ]
    if failure_notes(result):
        lines += ["", *(f"- {note}" for note in failure_notes(result))]
    if value_rows(result):
        lines += ["", "The value model:", "", *gpu._markdown(VALUE_HEADER, value_rows(result))]
    if trpo_rows(result):
        lines += ["", "TRPO's natural-gradient step:", "", *gpu._markdown(TRPO_HEADER, trpo_rows(result))]
    if result["skipped"]:
        lines += [
            "",
            "Skipped to keep within the budget: "
            + "; ".join(f"{s['name']} ({s['reason']})" for s in result["skipped"])
            + ".",
        ]
    return "\n".join(lines)


NOT_MEASURED = f"""{TITLE}

Not measured yet: `benchmarks/results/gpu_rl.json` does not exist. `python -m benchmarks.gpu --suite rl --out
gpu_rl.json` on a CUDA GPU measures a step of grpo, ppo, a2c and trpo (LoRA and full fine-tuning); copy the
file to `benchmarks/results/gpu_rl.json` and run `python -m benchmarks.run --render-only`."""


def render_stored(path: Path = RESULT_FILE) -> str:
    """The subsection from ``path``, or the not-measured-yet subsection when it does not exist."""
    if not path.exists():
        return NOT_MEASURED
    record = json.loads(path.read_text())
    machine = ", ".join(f"{k} {v}" for k, v in record["machine"].items())
    return f"{render(record['result'])}\n\nMachine: {machine}. Date: {record['date']}."
