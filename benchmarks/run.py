"""Run benchmarks and render docs/performance.md from every stored result.

python -m benchmarks.run                 # all benchmarks
python -m benchmarks.run dataset_validation
python -m benchmarks.run --render-only   # re-render docs/performance.md

The GPU figures (``benchmarks/results/gpu.json``) are measured on a CUDA machine by ``python -m
benchmarks.gpu`` and only rendered here; without that file the GPU section says they are not measured yet.
The same holds for the online RL figures (``benchmarks/results/gpu_rl.json``, ``python -m benchmarks.gpu
--suite rl``), its subsection "Online RL on a GPU".
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
from pathlib import Path

from benchmarks import gpu, gpu_rl
from benchmarks.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REPORT = ROOT / "docs" / "performance.md"
BENCHMARKS = [
    "dataset_validation",
    "dataset_conversion",
    "tokenization",
    "packing",
    "osft_step",
    "osft_memory",
    "attention",
    "continual",
    "kill_resume",
    "grpo",
    "ppo",
    "judge",
    "synthesis",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})"
    )
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    unknown = set(args.names) - set(BENCHMARKS)
    if "gpu" in unknown:
        parser.error(
            "gpu runs on a CUDA machine (python -m benchmarks.gpu --out gpu.json; --suite rl --out "
            "gpu_rl.json); copy its JSON to benchmarks/results/, then --render-only"
        )
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    if not args.render_only:
        RESULTS.mkdir(parents=True, exist_ok=True)
        for name in args.names or BENCHMARKS:
            print(f"bench: running {name} ...", flush=True)
            result = importlib.import_module(f"benchmarks.{name}").run()
            record = {
                "result": result,
                "machine": describe_machine(),
                "date": datetime.date.today().isoformat(),
            }
            (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
            module = importlib.import_module(f"benchmarks.{name}")
            if hasattr(module, "write_report"):  # a benchmark with its own page and plot in docs/
                module.write_report()
            print(f"bench: {name}: {json.dumps(result)}")
    render()
    print(f"bench: wrote {REPORT.relative_to(ROOT)}")


def render() -> None:
    REPORT.write_text(report())


def report() -> str:
    """docs/performance.md from every stored result."""
    sections = [
        "# Performance",
        "",
        "Written by `make bench` from `benchmarks/results/*.json`; each section "
        "names the machine and date its figures come from.",
        "",
    ]
    for name in BENCHMARKS:
        path = RESULTS / f"{name}.json"
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        module = importlib.import_module(f"benchmarks.{name}")
        machine = ", ".join(f"{k} {v}" for k, v in record["machine"].items())
        sections += [module.render(record["result"]), "", f"Machine: {machine}. Date: {record['date']}.", ""]
    sections += [
        gpu.render_stored(RESULTS / "gpu.json"),
        "",
        gpu_rl.render_stored(RESULTS / "gpu_rl.json"),
        "",
    ]
    return "\n".join(sections)


if __name__ == "__main__":
    main()
