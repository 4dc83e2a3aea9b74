"""GRPO against TRL's ``GRPOTrainer``: time per step (generation and update apart) and the reward curve.

Both trainers get the same tiny Qwen2-shaped model (built locally by :mod:`kfp_components.testing.tiny_model`
and saved to one folder both load), the same bundled prompts (``examples/arithmetic_prompts.jsonl``), the
same reward functions (:mod:`benchmarks.grpo_rewards`) and the same options (:class:`GRPOBenchmark`, mapped to
each side by :func:`ours_options` and :func:`trl_arguments`), on this machine's CPU in fp32 with one torch
thread, once per seed, the two sides taking turns, each run in a fresh process. Also: generation tokens/s of
the project's rollout loop against plain ``model.generate`` on the same batch.

TRL is not a dependency of this project: it runs in its own virtual environment, whose interpreter is
``$TRL_PYTHON`` (default ``../scratch-trl/bin/python`` next to the repository), made with::

    python3.11 -m venv ../scratch-trl
    ../scratch-trl/bin/pip install -c constraints.txt torch==2.13.0   # the CPU build, as `make setup`
    ../scratch-trl/bin/pip install -c constraints.txt trl

python -m benchmarks.run grpo              # both sides; results/grpo.json, docs/grpo.png, docs/performance.md
python -m benchmarks.grpo --sides trl      # one side only (the other stays "not measured")
python -m benchmarks.grpo --render-only    # plot and docs/performance.md from the stored result
python -m benchmarks.grpo --write-prompts  # rewrite examples/arithmetic_prompts.jsonl
"""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.online_bench import (
    CURVE_ENDS,
    MODEL,
    MODEL_SEED,
    PROMPTS,
    ROOT,
    argument_parser,
    curve_ends,
    fresh_process,
    goal_text,
    mean,
    number_text,
    ours_step_rows,
    plot_sides,
    plot_stored,
    ratios_text,
    render_performance,
    run_trl_job,
    seconds_text,
    side_results,
    step_times,
    store,
    summarise_side,
    take_turns,
    train_ours_fresh,
)
from benchmarks.online_bench import trl_python as _trl_python

NAME = "grpo"
PLOT = ROOT / "docs" / "grpo.png"
REWARDS_FILE = ROOT / "benchmarks" / "grpo_rewards.py"
TRL_RUNNER = ROOT / "benchmarks" / "grpo_trl.py"
DEFAULT_TRL_PYTHON = ROOT.parent / "scratch-trl" / "bin" / "python"
SIDES = ("trl", "ours")
#: Our ``loss_aggregation`` and the TRL ``loss_type`` that normalises the same way: token = every completion
#: token of the step (TRL: dapo, the global accumulated batch), sequence = mean over each completion's tokens,
#: then over completions (TRL: grpo), dr_grpo = a constant max_new_tokens x completions (TRL: dr_grpo).
LOSS_TYPES = {"token": "dapo", "sequence": "grpo", "dr_grpo": "dr_grpo"}


# ------------------------------------------------------------------------------------------------ prompts
def arithmetic_prompts(count: int = 200, seed: int = 13) -> list[dict[str, str]]:
    """``count`` distinct single-step arithmetic prompts with their answer (deterministic in ``seed``).

    Sums and differences of numbers up to 20 (differences never negative) and products of 2..12.
    """
    rng = random.Random(seed)
    seen: set[tuple[int, str, int]] = set()
    rows: list[dict[str, str]] = []
    while len(rows) < count:
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
        else:
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            if op == "-" and b > a:
                a, b = b, a
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        symbol = "x" if op == "*" else op
        rows.append({"prompt": f"What is {a} {symbol} {b}? Answer with the number.", "answer": str(answer)})
    return rows


def write_prompts(path: Path = PROMPTS) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in arithmetic_prompts()))
    return path


# ------------------------------------------------------------------------------------------------ options
@dataclasses.dataclass(frozen=True)
class GRPOBenchmark:
    """The options both sides run with (names as the project's trainer spells them)."""

    num_generations: int = 8
    prompts_per_step: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    learning_rate: float = 1e-2
    max_steps: int = 20
    scale_rewards: str = "group"
    loss_aggregation: str = "token"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    num_iterations: int = 1
    kl_coef: float = 0.0
    reward_functions: tuple[str, ...] = ("digit_share", "exact_match")
    reward_weights: tuple[float, ...] = (1.0, 0.0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    #: Each side runs once per seed (sampling, data order); rewards are compared on their mean.
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    #: Torch (OpenMP) threads of both sides. One: on a small shared machine two threads spend most of a
    #: tiny model's step waiting for each other (measured: 40x slower sampling under load), which would
    #: measure the neighbours, not the trainers.
    torch_threads: int = 1
    #: Ours only: the packing budget of a training micro-batch and the longest prompt + completion. With
    #: sdpa (no variable-length kernel) attention over a packed row costs the square of its length, so on a
    #: CPU a few completions per micro-batch beat one row of all 32 (measured: update 0.23 s -> 0.11 s).
    #: TRL pads its 32 completions into one batch instead.
    max_tokens_per_gpu: int = 512
    max_seq_len: int = 256

    @property
    def effective_batch_size(self) -> int:
        """Completions per optimizer step."""
        return self.num_generations * self.prompts_per_step

    def __post_init__(self) -> None:
        if self.loss_aggregation not in LOSS_TYPES:
            raise ValueError(
                f"loss_aggregation must be one of {sorted(LOSS_TYPES)}, got {self.loss_aggregation!r}"
            )
        if len(self.reward_functions) != len(self.reward_weights):
            raise ValueError("reward_functions and reward_weights must have the same length")


def ours_options(bench: GRPOBenchmark, model: str, data: str, output_dir: str, seed: int) -> dict[str, Any]:
    """The project trainer's options (a ``TrainingConfig`` mapping) for ``bench``, run with ``seed``."""
    return {
        "model_name_or_path": model,
        "data_path": data,
        "output_dir": output_dir,
        "algorithm": "grpo",
        "num_generations": bench.num_generations,
        "effective_batch_size": bench.effective_batch_size,
        "max_new_tokens": bench.max_new_tokens,
        "max_seq_len": bench.max_seq_len,
        "max_tokens_per_gpu": bench.max_tokens_per_gpu,
        "temperature": bench.temperature,
        "top_p": bench.top_p,
        "top_k": bench.top_k,
        "scale_rewards": bench.scale_rewards,
        "loss_aggregation": bench.loss_aggregation,
        "epsilon_low": bench.epsilon_low,
        "epsilon_high": bench.epsilon_high,
        "num_iterations": bench.num_iterations,
        "kl_coef": bench.kl_coef,
        "reward_functions": [f"{REWARDS_FILE}:{name}" for name in bench.reward_functions],
        "reward_weights": list(bench.reward_weights),
        "learning_rate": bench.learning_rate,
        "max_steps": bench.max_steps,
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "adam_beta1": bench.adam_beta1,
        "adam_beta2": bench.adam_beta2,
        "adam_epsilon": bench.adam_epsilon,
        "weight_decay": bench.weight_decay,
        "max_grad_norm": bench.max_grad_norm,
        "seed": seed,
        "torch_dtype": "float32",
        "log_every_steps": 1,
        "save_final_model": False,
    }


def trl_arguments(bench: GRPOBenchmark, output_dir: str, seed: int) -> dict[str, Any]:
    """TRL ``GRPOConfig`` keyword arguments for ``bench``: one generation batch of ``effective_batch_size``
    completions, reused for ``num_iterations`` optimizer updates; no vLLM, CPU, fp32 (TRL's default is bf16).

    TRL's ``max_steps`` counts optimizer updates, ours counts steps of ``num_iterations`` updates each on one
    generation batch, so TRL gets ``max_steps * num_iterations`` (:func:`per_generation` groups them back).
    """
    return {
        "output_dir": output_dir,
        "num_generations": bench.num_generations,
        "per_device_train_batch_size": bench.effective_batch_size,
        "gradient_accumulation_steps": 1,
        "max_completion_length": bench.max_new_tokens,
        "temperature": bench.temperature,
        "top_p": bench.top_p,
        "top_k": bench.top_k,
        "scale_rewards": bench.scale_rewards,
        "loss_type": LOSS_TYPES[bench.loss_aggregation],
        "epsilon": bench.epsilon_low,
        "epsilon_high": bench.epsilon_high,
        "num_iterations": bench.num_iterations,
        "beta": bench.kl_coef,
        "reward_weights": list(bench.reward_weights),
        "mask_truncated_completions": False,
        "learning_rate": bench.learning_rate,
        "max_steps": bench.max_steps * bench.num_iterations,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "adam_beta1": bench.adam_beta1,
        "adam_beta2": bench.adam_beta2,
        "adam_epsilon": bench.adam_epsilon,
        "weight_decay": bench.weight_decay,
        "max_grad_norm": bench.max_grad_norm,
        "seed": seed,
        "use_vllm": False,
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


# ------------------------------------------------------------------------------------------------ running
def trl_python() -> Path:
    return _trl_python("TRL_PYTHON", DEFAULT_TRL_PYTHON, "benchmarks/grpo.py")


def run_trl(bench: GRPOBenchmark, model_dir: Path, work: Path, seed: int) -> dict[str, Any]:
    """One TRL run in its own interpreter; per-step timings and rewards (see ``benchmarks/grpo_trl.py``)."""
    work.mkdir(parents=True, exist_ok=True)
    job = {
        "model": str(model_dir),
        "prompts": str(PROMPTS),
        "rewards_file": str(REWARDS_FILE),
        "reward_functions": list(bench.reward_functions),
        "grpo_config": trl_arguments(bench, str(work / "output"), seed),
        "output": str(work / "result.json"),
        "torch_threads": bench.torch_threads,
    }
    result = run_trl_job(trl_python(), TRL_RUNNER, job, work, bench.torch_threads)
    result["updates"] = result.pop("steps")
    steps = per_generation(result["updates"], bench.num_iterations)
    return {"seed": seed, "config": job["grpo_config"], "steps": steps, **result}


def per_generation(updates: Sequence[dict[str, Any]], num_iterations: int) -> list[dict[str, Any]]:
    """TRL's per-update records grouped into our steps (one generation batch, ``num_iterations`` updates):
    times and tokens add up; the reward is the one logged with the group's generation (its first update)."""
    steps = []
    for start in range(0, len(updates), num_iterations):
        group = updates[start : start + num_iterations]
        seconds = sum(u["seconds"] for u in group)
        generation = sum(u["generation_seconds"] for u in group)
        tokens = sum(u["completion_tokens"] for u in group)
        steps.append(
            {
                "step": start // num_iterations + 1,
                "seconds": seconds,
                "generation_seconds": generation,
                "update_seconds": seconds - generation,
                "completion_tokens": tokens,
                "generation_tokens_per_second": tokens / generation if generation else None,
                "reward": group[0]["reward"],
                "rewards": group[0]["rewards"],
            }
        )
    return steps


#: What the benchmark reads from each step row of our ``metrics.jsonl``.
OURS_STEP_KEYS = ("step", "seconds", "generation_seconds", "generation_tokens_per_second", "reward")


def ours_steps(
    metrics_rows: Sequence[dict[str, Any]], reward_functions: Sequence[str]
) -> list[dict[str, Any]]:
    """Per-step records in the benchmark's shape from the rows of our ``metrics.jsonl`` (evaluation rows,
    which carry ``eval_loss``, are left out); a step row without what the benchmark reads is an error."""
    return [
        {
            **times,
            "generation_tokens_per_second": row["generation_tokens_per_second"],
            "reward": row["reward"],
            "rewards": {
                name: row[f"reward/{name}/mean"] for name in reward_functions if f"reward/{name}/mean" in row
            },
        }
        for row, times in ours_step_rows(metrics_rows, OURS_STEP_KEYS)
    ]


def run_ours(bench: GRPOBenchmark, model_dir: Path, work: Path, seed: int) -> dict[str, Any]:
    """One run of the project's GRPO trainer in a fresh process."""
    from kfp_components.trainer.config import ALGORITHMS

    if "grpo" not in ALGORITHMS:
        raise SystemExit(f"this trainer has no algorithm grpo yet (it has {', '.join(ALGORITHMS)})")
    options = ours_options(bench, str(model_dir), str(PROMPTS), str(work / "output"), seed)
    measured = train_ours_fresh(options, bench.torch_threads)
    return {
        "seed": seed,
        "config": options,
        "run_seconds": measured["run_seconds"],
        "run_cpu_seconds": measured["run_cpu_seconds"],
        "torch_threads": measured["torch_threads"],
        "steps": ours_steps(measured["rows"], bench.reward_functions),
    }


def _generation_speed(model_dir: str, bench: GRPOBenchmark, repeats: int) -> dict[str, Any]:
    """:func:`benchmarks.generation.generation_throughput` on the benchmark's model and step shape."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.generation import generation_throughput

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()[: bench.prompts_per_step]]
    rendered = tokenizer.apply_chat_template(
        [[{"role": "user", "content": row["prompt"]}] for row in rows],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompt_tokens = max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in rendered)
    measured = generation_throughput(
        model,
        tokenizer,
        batch_size=bench.effective_batch_size,
        prompt_tokens=prompt_tokens,
        max_new_tokens=bench.max_new_tokens,
        temperature=bench.temperature,
        top_p=bench.top_p,
        top_k=bench.top_k,
        repeats=repeats,
    )
    return {
        "batch": measured["batch_size"],
        "prompt_tokens": measured["prompt_tokens_max"],
        "max_new_tokens": measured["max_new_tokens"],
        "repeats": repeats,
        "rollout_tokens_per_second": round(measured["ours_tokens_per_second"], 1),
        "generate_tokens_per_second": round(measured["generate_tokens_per_second"], 1),
        "ratio": round(measured["ours_over_generate"], 3),
    }


def generation_speed(model_dir: Path, bench: GRPOBenchmark, repeats: int = 5) -> dict[str, Any]:
    """Our rollout loop against ``model.generate`` on a batch of one step's shape (``effective_batch_size``
    rows, prompts as long as the rendered prompts, ``max_new_tokens`` each: EOS off on both sides, so both
    generate the same tokens), in a fresh process."""
    with fresh_process(bench.torch_threads) as pool:
        return pool.submit(_generation_speed, str(model_dir), bench, repeats).result()


# ------------------------------------------------------------------------------------------------ summary
def summarise(steps: Sequence[dict[str, Any]], run_cpu_seconds: float | None = None) -> dict[str, Any]:
    """Median step, generation and update seconds and the fastest step; generation share of all step time;
    generation tokens/s; CPU seconds of the whole run per step; mean reward (and exact match) over the first
    and the last :data:`CURVE_ENDS` steps."""
    generation = sum(s["generation_seconds"] for s in steps)
    tokens = [s["completion_tokens"] for s in steps]
    rate = sum(tokens) / generation if generation and all(t is not None for t in tokens) else None
    return {
        **step_times(steps, run_cpu_seconds, {"generation_tokens_per_second": rate}),
        **curve_ends(steps, "reward"),
        "exact_match_last": mean([s["rewards"].get("exact_match") for s in steps[-CURVE_ENDS:]]),
    }


def summarise_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One side over its runs (one per seed), :func:`benchmarks.online_bench.summarise_side` on
    :func:`summarise` and the reward, with the mean exact match of each run's last steps."""
    return summarise_side(
        runs,
        summarise,
        "reward",
        lambda each: {"exact_match_last": mean([s["exact_match_last"] for s in each])},
    )


def compare(sides: dict[str, dict[str, Any] | None], speed: dict[str, Any] | None) -> dict[str, Any]:
    """The issue's goals: our step time at most 0.8x TRL's, an equal or better reward after the same steps,
    our rollout not slower than ``model.generate``. None where a side was not measured."""
    trl, ours = sides.get("trl"), sides.get("ours")
    both = trl is not None and ours is not None
    step_ratio = ours["summary"]["step_seconds"] / trl["summary"]["step_seconds"] if both else None
    cpu = [side["summary"]["cpu_seconds_per_step"] for side in (ours, trl) if side is not None]
    return {
        "step_ratio": step_ratio,
        "cpu_ratio": cpu[0] / cpu[1] if both and None not in cpu else None,
        "step_goal_met": step_ratio <= 0.8 if step_ratio is not None else None,
        "reward_goal_met": ours["summary"]["reward_last"] >= trl["summary"]["reward_last"] if both else None,
        "generation_goal_met": speed["ratio"] >= 1.0 if speed else None,
    }


# ------------------------------------------------------------------------------------------------ the run
def run(sides: Sequence[str] = SIDES, bench: GRPOBenchmark | None = None) -> dict[str, Any]:
    """Both sides (or ``sides``) on one freshly built tiny model; what ``benchmarks.run`` stores."""
    bench = bench or GRPOBenchmark()
    unknown = set(sides) - set(SIDES)
    if unknown:
        raise ValueError(f"unknown side(s) {sorted(unknown)}; choose from {SIDES}")
    if "trl" in sides:
        trl_python()  # before building anything
    from kfp_components.testing.tiny_model import build_tiny_model

    speed = None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_tiny_model(work / "model", "qwen2", seed=MODEL_SEED, **MODEL)
        runs = take_turns(
            NAME,
            [side for side in SIDES if side in sides],
            bench.seeds,
            lambda side, seed: (run_trl if side == "trl" else run_ours)(
                bench, model_dir, work / f"{side}-{seed}", seed
            ),
        )
        results = side_results(SIDES, runs, summarise_runs)
        if "ours" in sides:
            speed = generation_speed(model_dir, bench)
    return {
        "benchmark": dataclasses.asdict(bench),
        "model": {"arch": "qwen2", "seed": MODEL_SEED, **MODEL},
        "prompts": str(PROMPTS.relative_to(ROOT)),
        "sides": results,
        "generation": speed,
        "goals": compare(results, speed),
    }


# ------------------------------------------------------------------------------------------------ report
def render(result: dict[str, Any]) -> str:
    """The section of docs/performance.md."""
    bench, model = result["benchmark"], result["model"]
    trl = result["sides"].get("trl")
    versions = trl["versions"] if trl else {}
    lines = [
        "## GRPO against TRL",
        "",
        f"GRPO on a tiny Qwen2-shaped model (hidden {model['hidden_size']}, {model['num_layers']} layers, "
        f"intermediate {model['intermediate_size']}, vocab {model['vocab_size']}; random weights) with the "
        f"bundled arithmetic prompts (`{result['prompts']}`), fp32 on the CPU with {bench['torch_threads']} torch "
        f"thread(s), the two sides taking turns, each run in a fresh process, one run per seed "
        f"({', '.join(map(str, bench['seeds']))}): {bench['max_steps']} steps of {bench['prompts_per_step']} prompts x "
        f"{bench['num_generations']} completions of at most {bench['max_new_tokens']} tokens, temperature "
        f"{bench['temperature']}, learning rate {bench['learning_rate']:g} (constant), loss aggregation "
        f"{bench['loss_aggregation']} (TRL `loss_type={LOSS_TYPES[bench['loss_aggregation']]}`), scale_rewards "
        f"{bench['scale_rewards']}, kl_coef {bench['kl_coef']:g}, num_iterations {bench['num_iterations']}. "
        "Reward: the share of digits among the completion's non-space characters (graded; an answer is a "
        "number); exact match of the last number against the answer is recorded with weight 0. "
        "Generation is the sampling call alone (TRL: `_generate_single_turn`, its `model.generate`); update "
        "is the rest of the step (rewards, log-probs, loss, backward, optimizer). Step, generation and update "
        "times are medians over every step of every run; the machine is shared, so other load only adds "
        "time: the fastest step and the CPU seconds of the whole runs (loading the model included) per step "
        "are less sensitive to it. *Outside the steps*: the wall-clock seconds of a run, from loading the "
        "model to the end of training, not spent in its steps (loading, start-up, the end; mean of the runs). "
        "Reward and exact match: the mean over the runs of each run's first and "
        "last steps.",
        "",
        "| trainer | step (s) | fastest step (s) | generation (s) | update (s) | generation share | "
        f"generation tokens/s | CPU s per step | outside the steps (s) | reward, first {CURVE_ENDS} steps | reward, last {CURVE_ENDS} "
        f"steps | exact match, last {CURVE_ENDS} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    labels = {"trl": f"TRL {versions.get('trl', '')} `GRPOTrainer`".replace("  ", " "), "ours": "this engine"}
    for side in SIDES:
        measured = result["sides"].get(side)
        if measured is None:
            lines.append(f"| {labels[side]} | not measured | | | | | | | | | | |")
            continue
        s = measured["summary"]
        lines.append(
            f"| {labels[side]} | {seconds_text(s['step_seconds'])} | {seconds_text(s['fastest_step_seconds'])} | "
            f"{seconds_text(s['generation_seconds'])} | {seconds_text(s['update_seconds'])} | "
            f"{s['generation_share']:.0%} | {number_text(s['generation_tokens_per_second'], 0)} | "
            f"{number_text(s['cpu_seconds_per_step'], 2)} | {number_text(s['outside_steps_seconds'], 2)} | "
            f"{number_text(s['reward_first'])} | "
            f"{number_text(s['reward_last'])} | {number_text(s['exact_match_last'], 2)} |"
        )
    by_seed = [
        f"{labels[side]} "
        + ", ".join(f"{value:.3f}" for _, value in result["sides"][side]["summary"]["reward_last_by_seed"])
        for side in SIDES
        if result["sides"].get(side) is not None
    ]
    goals, speed = result["goals"], result.get("generation")
    ratio = goals["step_ratio"]
    lines += [
        "",
        f"Reward over the last {CURVE_ENDS} steps, run by run (seeds {', '.join(map(str, bench['seeds']))}): "
        + "; ".join(by_seed)
        + ".",
        "",
        "![Reward per step and step time, TRL and this engine](grpo.png)",
        "",
        f"Goals: step time at most 0.8x TRL's: {goal_text(goals['step_goal_met'])}"
        + ratios_text(ratio, goals["cpu_ratio"])
        + f"; equal or better reward after the same steps: {goal_text(goals['reward_goal_met'])}; generation "
        f"not slower than `model.generate`: {goal_text(goals['generation_goal_met'])}"
        + (
            f" ({speed['rollout_tokens_per_second']:,.0f} vs {speed['generate_tokens_per_second']:,.0f} "
            f"tokens/s: `benchmarks.generation.generation_throughput`, {speed['batch']} rows of up to "
            f"{speed['prompt_tokens']} prompt tokens, {speed['max_new_tokens']} new tokens each with EOS off, "
            f"median of {speed['repeats']})"
            if speed
            else ""
        )
        + ".",
    ]
    if versions:
        lines += [
            "",
            "TRL side: "
            + ", ".join(f"{name} {version}" for name, version in versions.items())
            + " in its own "
            "virtual environment (not a dependency).",
        ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path = PLOT) -> None:
    """Reward per step (left) and step time split into generation and update (right), both sides."""
    plot_sides(
        result,
        path,
        sides=SIDES,
        colours={"trl": "tab:orange", "ours": "tab:blue"},
        names={"trl": "TRL GRPOTrainer", "ours": "this engine"},
        key="reward",
        curve_ylabel="reward (digit share)",
        curve_title="Reward per step: each seed (faint) and their mean",
        xlabel="optimizer step",
        title="GRPO on a tiny model, CPU: TRL vs this engine",
        faint_alpha=0.25,
        legend_fontsize=8,
    )


def write_report() -> None:
    """The plot from the stored result (``benchmarks.run`` renders docs/performance.md)."""
    plot_stored(NAME, plot)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argument_parser(__doc__, SIDES)
    parser.add_argument("--write-prompts", action="store_true", help=f"rewrite {PROMPTS.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    if args.write_prompts:
        print(f"grpo: wrote {write_prompts().relative_to(ROOT)}")
        return
    if not args.render_only:
        result = run(args.sides)
        store(NAME, result)
        print(render(result))
    write_report()
    render_performance(NAME, PLOT)


if __name__ == "__main__":
    main()
