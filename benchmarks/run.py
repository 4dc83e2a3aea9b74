"""Run benchmarks and render docs/performance.md from every stored result.

python -m benchmarks.run                 # all benchmarks
python -m benchmarks.run dataset_validation
python -m benchmarks.run --render-only   # re-render docs/performance.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
from pathlib import Path

from benchmarks.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
REPORT = ROOT / "docs" / "performance.md"
BENCHMARKS = [
    "dataset_validation",
    "tokenization",
    "packing",
    "osft_step",
    "continual",
    "kill_resume",
    "grpo",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})"
    )
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    unknown = set(args.names) - set(BENCHMARKS)
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
    if not any(
        json.loads(p.read_text())["machine"].get("gpu", "none") != "none" for p in RESULTS.glob("*.json")
    ):
        sections += [
            "## On a GPU",
            "",
            "Not measured: every figure above comes from a CPU, and no GPU was available for these measurements. "
            "Training throughput (tokens/s) and MFU on a ~0.5B model with and without Liger kernels remain to be "
            "recorded on a CUDA GPU.",
            "",
        ]
    return "\n".join(sections)


if __name__ == "__main__":
    main()
