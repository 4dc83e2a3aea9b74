"""What the online-RL benchmarks against TRL (:mod:`benchmarks.grpo`, :mod:`benchmarks.ppo`) share: the tiny
model and prompts, running each side in a fresh process (ours through the project's trainer, TRL's through a
runner script in TRL's own interpreter), the sides taking turns seed by seed, the time summary of a side's
runs and of its curve, the plot of per-seed curves and step times, and the command line.

Each benchmark keeps what differs: its options and how they map to each side, what it reads from a step, its
goals and its section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROMPTS = ROOT / "examples" / "arithmetic_prompts.jsonl"
#: The seed of the model's random weights (the same model for every run).
MODEL_SEED = 0
#: The model every side trains: Qwen2-shaped, random weights, a tokenizer trained locally.
MODEL: dict[str, int] = {"hidden_size": 64, "num_layers": 2, "intermediate_size": 128, "vocab_size": 1024}
#: Steps averaged for the "first" and "last" value of a curve.
CURVE_ENDS = 3


# ------------------------------------------------------------------------------------------------ running
def trl_python(variable: str, default: Path, recipe: str) -> Path:
    """The interpreter of TRL's virtual environment (``$variable``, else ``default``), checked to exist;
    ``recipe`` names the module whose docstring says how to make it."""
    path = Path(os.environ.get(variable) or default)
    if not path.exists():
        raise SystemExit(
            f"TRL's virtual environment is missing: {path} does not exist; make it as the docstring of "
            f"{recipe} says, or point {variable} at a Python that has trl"
        )
    return path


def thread_env(torch_threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(torch_threads), "TOKENIZERS_PARALLELISM": "false"}


def _set_threads(torch_threads: int) -> None:
    import torch

    torch.set_num_threads(torch_threads)


def fresh_process(torch_threads: int) -> ProcessPoolExecutor:
    """One worker process, started fresh, running torch with ``torch_threads`` threads."""
    return ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_set_threads,
        initargs=(torch_threads,),
    )


def train_ours(options: dict[str, Any]) -> dict[str, Any]:
    """Run the project's trainer with ``options`` (in a fresh process) and read its metrics."""
    import logging

    import torch

    from kfp_components.trainer.config import TrainingConfig
    from kfp_components.trainer.train import train
    from kfp_components.typed_config import from_dict

    logging.getLogger("kfp_components").setLevel(logging.WARNING)
    config = from_dict(TrainingConfig, options)
    started, cpu_started = time.perf_counter(), time.process_time()
    train(config)
    run_seconds, run_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    metrics = Path(options["output_dir"]) / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {
        "run_seconds": run_seconds,
        "run_cpu_seconds": run_cpu_seconds,
        "rows": rows,
        "torch_threads": torch.get_num_threads(),
    }


def train_ours_fresh(options: dict[str, Any], torch_threads: int) -> dict[str, Any]:
    """:func:`train_ours` in a fresh process."""
    with fresh_process(torch_threads) as pool:
        return pool.submit(train_ours, options).result()


def run_trl_job(
    python: Path, runner: Path, job: dict[str, Any], work: Path, torch_threads: int
) -> dict[str, Any]:
    """Run TRL's ``runner`` in ``python`` on ``job`` (written to ``<work>/job.json``; the runner writes
    ``job["output"]``) offline, with nothing of this project's environment; the runner's result."""
    (work / "job.json").write_text(json.dumps(job, indent=2))
    env = {**os.environ, **thread_env(torch_threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # nothing of this project's environment leaks into TRL's
    completed = subprocess.run(
        [str(python), str(runner), str(work / "job.json")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode:
        raise RuntimeError(f"the TRL run failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(Path(job["output"]).read_text())


def take_turns(
    name: str,
    sides: Sequence[str],
    seeds: Sequence[int],
    run_one: Callable[[str, int], dict[str, Any]],
) -> dict[str, list[dict[str, Any]]]:
    """``run_one(side, seed)`` for every side and seed, the sides taking turns within each seed, so load from
    elsewhere on the machine hits them alike; the runs of each side."""
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for seed in seeds:
        for side, done in runs.items():
            print(f"{name}: {side}, seed {seed} ...", flush=True)
            done.append(run_one(side, seed))
    return runs


def side_results(
    all_sides: Sequence[str],
    runs: dict[str, list[dict[str, Any]]],
    summarise_runs: Callable[[Sequence[dict[str, Any]]], dict[str, Any]],
) -> dict[str, dict[str, Any] | None]:
    """Each side's runs, their summary and TRL's versions; None for a side that did not run."""
    results: dict[str, dict[str, Any] | None] = {}
    for side in all_sides:
        done = runs.get(side, [])
        results[side] = (
            {"runs": done, "summary": summarise_runs(done), "versions": done[0].get("versions")}
            if done
            else None
        )
    return results


def ours_step_rows(
    metrics_rows: Sequence[dict[str, Any]], required: Sequence[str]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each step row of our ``metrics.jsonl`` (evaluation rows, which carry ``eval_loss``, left out) with its
    times in the benchmark's shape; a step row without a ``required`` key is an error."""
    steps = []
    for row in metrics_rows:
        if "eval_loss" in row:
            continue
        missing = [key for key in required if key not in row]
        if missing:
            raise ValueError(f"metrics.jsonl: step {row.get('step', '?')} has no {', '.join(missing)}")
        generation = row["generation_seconds"]
        times = {
            "step": row["step"],
            "seconds": row["seconds"],
            "generation_seconds": generation,
            "update_seconds": row["seconds"] - generation,
            "completion_tokens": row["generation_tokens_per_second"] * generation,
        }
        steps.append((row, times))
    return steps


# ------------------------------------------------------------------------------------------------ summary
def mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def step_times(
    steps: Sequence[dict[str, Any]], run_cpu_seconds: float | None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Median step, generation and update seconds and the fastest step; generation share of all step time;
    ``extra``; CPU seconds of the whole run per step."""
    seconds = sum(s["seconds"] for s in steps)
    generation = sum(s["generation_seconds"] for s in steps)
    return {
        "steps": len(steps),
        "step_seconds": statistics.median(s["seconds"] for s in steps),
        "fastest_step_seconds": min(s["seconds"] for s in steps),
        "generation_seconds": statistics.median(s["generation_seconds"] for s in steps),
        "update_seconds": statistics.median(s["update_seconds"] for s in steps),
        "generation_share": generation / seconds,
        **(extra or {}),
        "cpu_seconds_per_step": run_cpu_seconds / len(steps) if run_cpu_seconds is not None else None,
    }


def curve_ends(steps: Sequence[dict[str, Any]], key: str) -> dict[str, float | None]:
    """``<key>_first`` and ``<key>_last``: the mean of ``key`` over the first and last :data:`CURVE_ENDS`
    steps."""
    return {
        f"{key}_first": mean([s[key] for s in steps[:CURVE_ENDS]]),
        f"{key}_last": mean([s[key] for s in steps[-CURVE_ENDS:]]),
    }


def summarise_side(
    runs: Sequence[dict[str, Any]],
    summarise: Callable[..., dict[str, Any]],
    key: str,
    extra: Callable[[list[dict[str, Any]]], dict[str, Any]],
) -> dict[str, Any]:
    """One side over its runs (one per seed): ``summarise`` on every step of every run with the CPU seconds
    of all runs; ``outside_steps_seconds``, the mean wall-clock time of a run spent outside its steps
    (loading, start-up, the end); ``<key>_first``/``_last`` the mean over the runs of each run's own, then
    ``extra(each run's summary)``, each run's last value by seed and ``<key>_curve``, the mean per step."""
    cpu = [run.get("run_cpu_seconds") for run in runs]
    pooled = [step for run in runs for step in run["steps"]]
    summary = summarise(pooled, sum(c for c in cpu if c is not None) if None not in cpu else None)
    each = [summarise(run["steps"]) for run in runs]
    outside = [run["run_seconds"] - sum(step["seconds"] for step in run["steps"]) for run in runs]
    summary.update(
        {
            "runs": len(runs),
            "outside_steps_seconds": statistics.mean(outside),
            f"{key}_first": statistics.mean(s[f"{key}_first"] for s in each),
            f"{key}_last": statistics.mean(s[f"{key}_last"] for s in each),
            **extra(each),
            f"{key}_last_by_seed": [
                [run["seed"], s[f"{key}_last"]] for run, s in zip(runs, each, strict=True)
            ],
            f"{key}_curve": [
                statistics.mean(run["steps"][i][key] for run in runs)
                for i in range(min(len(run["steps"]) for run in runs))
            ],
        }
    )
    return summary


# ------------------------------------------------------------------------------------------------ report
def seconds_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def number_text(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def goal_text(value: bool | None) -> str:
    return "not measured" if value is None else ("met" if value else "not met")


def ratios_text(step_ratio: float | None, cpu_ratio: float | None) -> str:
    """`` (<step ratio>x; CPU seconds per step <cpu ratio>x)``, empty when not measured."""
    if step_ratio is None:
        return ""
    cpu = f"; CPU seconds per step {cpu_ratio:.2f}x" if cpu_ratio is not None else ""
    return f" ({step_ratio:.2f}x{cpu})"


def plot_sides(
    result: dict[str, Any],
    path: Path,
    *,
    sides: Sequence[str],
    colours: dict[str, str],
    names: dict[str, str],
    key: str,
    curve_ylabel: str,
    curve_title: str,
    xlabel: str,
    title: str,
    faint_alpha: float,
    legend_fontsize: int,
) -> None:
    """``key`` per step (left: each seed faint, their mean) and step time with its generation part (right,
    first seed), every measured side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (curves, timing) = plt.subplots(1, 2, figsize=(11, 4))
    for side in sides:
        measured = result["sides"].get(side)
        if measured is None:
            continue
        colour, name = colours[side], names[side]
        for run in measured["runs"]:
            steps = run["steps"]
            curves.plot(
                [s["step"] for s in steps], [s[key] for s in steps], "-", color=colour, alpha=faint_alpha
            )
        curve = measured["summary"][f"{key}_curve"]
        curves.plot(range(1, len(curve) + 1), curve, "-o", color=colour, markersize=3, label=f"{name}: mean")
        steps = measured["runs"][0]["steps"]
        x = [s["step"] for s in steps]
        timing.plot(x, [s["seconds"] for s in steps], "-", color=colour, label=f"{name}: step")
        timing.plot(
            x, [s["generation_seconds"] for s in steps], "--", color=colour, label=f"{name}: generation"
        )
    curves.set_ylabel(curve_ylabel)
    curves.set_title(curve_title)
    timing.set_ylabel("seconds")
    timing.set_title("Step time and its generation part (first seed)")
    timing.set_ylim(bottom=0)
    for ax in (curves, timing):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_fontsize)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ command line
def argument_parser(doc: str | None, sides: Sequence[str]) -> argparse.ArgumentParser:
    """``--sides`` (default: all) and ``--render-only``; a benchmark adds its own."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--sides", nargs="+", choices=sides, default=list(sides), help="trainers to run")
    parser.add_argument("--render-only", action="store_true", help="plot and render from the stored result")
    return parser


def store(name: str, result: dict[str, Any]) -> None:
    """``result`` with the machine and the date, as ``benchmarks/results/<name>.json``."""
    from benchmarks.machine import describe_machine

    record = {"result": result, "machine": describe_machine(), "date": datetime.date.today().isoformat()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")


def plot_stored(name: str, plot: Callable[[dict[str, Any]], None]) -> None:
    """The plot from the stored result ``benchmarks/results/<name>.json``."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"no results yet: run `python -m benchmarks.{name}` first ({path})")
    plot(json.loads(path.read_text())["result"])


def render_performance(name: str, plot_path: Path) -> None:
    """docs/performance.md from every stored result (``benchmarks.run``)."""
    from benchmarks.run import render

    render()
    print(f"{name}: wrote {plot_path.relative_to(ROOT)} and docs/performance.md")
