"""Kill -9 and resume: does a run that is killed at random moments and resumed each time end where an
uninterrupted run ends, bit for bit?

``python -m benchmarks.kill_resume [--kills N] [--steps S] [--seed K]`` trains a tiny model with the
training engine (``python -m kfp_components.trainer``, one process, a checkpoint every 2 steps, an eval
every 3) once without interruption, then again under ``resume: true`` while killing the process with
SIGKILL N times, starting it again after each kill. The kills take turns between three kinds of moment: a
random time in the attempt's expected life (mostly start-up and loading on a tiny model), a random time
within a training step (once a step record appears), and a random moment while a checkpoint is being
written (as soon as ``step-N.partial`` appears). After each kill it records where the kill landed (from
the files the process left and the last line of its log) and checks that the checkpoint the next attempt
resumes from is bit-identical to the uninterrupted run's at that step (every model and optimizer tensor
and the trainer state) and that every step record that attempt writes (loss, learning rate, gradient norm)
is the uninterrupted run's exactly. At the end it compares the final weights, every step's loss, the
evaluations and the summary. The result goes to ``benchmarks/results/kill_resume.json`` and its summary into
``docs/reliability.md`` (``--render-only`` rewrites that section from the stored result).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

NAME = "kill_resume"
ROOT = Path(__file__).resolve().parents[1]
RESULT_FILE = ROOT / "benchmarks" / "results" / f"{NAME}.json"
REPORT = ROOT / "docs" / "reliability.md"
BEGIN = "<!-- BEGIN GENERATED: python -m benchmarks.kill_resume --render-only -->"
END = "<!-- END GENERATED -->"
#: The figure the docs keep current (``make bench`` and the CLI's default).
DEFAULT_KILLS = 33
KINDS = ("random time", "within a step", "checkpoint write")
#: trainer-state fields that must match the uninterrupted run (timing and attempt counts may not)
STATE_FIELDS = (
    "global_step",
    "epoch",
    "step_in_epoch",
    "samples_seen",
    "tokens_seen",
    "skipped_steps",
    "eval_history",
    "loss_sum",
    "last_loss",
    "last_metrics",
)


def run(
    kills: int = DEFAULT_KILLS,
    steps: int = 16,
    seed: int = 0,
    work_dir: Path | None = None,
    checkpoint_every: int = 2,
) -> dict[str, Any]:
    """Run the experiment; return its result (see the module's description)."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kill-resume-") as scratch:
        work = Path(work_dir or scratch)
        reference_dir = work / "reference"
        options = _options(steps, checkpoint_every)
        seconds = _attempt(_write_config(work / "reference.yaml", reference_dir, options, keep=steps))
        if not (reference_dir / "summary.json").exists():
            raise RuntimeError(f"the uninterrupted run failed; see {work / 'reference.yaml.log'}")
        reference = _Reference(reference_dir)
        rng = random.Random(seed)
        details: list[dict[str, Any]] = []
        chains: list[dict[str, Any]] = []
        while len(details) < kills:
            chains.append(
                _chain(work / f"chain{len(chains)}", options, reference, rng, kills, details, seconds)
            )
    landed = Counter(d["landed"] for d in details)
    return {
        "kills": len(details),
        "resumed_bit_identical": sum(d["identical"] for d in details),
        "final_weights_identical": all(c["final_weights_identical"] for c in chains),
        "losses_identical": all(c["losses_identical"] for c in chains),
        "summaries_identical": all(c["summary_identical"] for c in chains),
        "damaged_checkpoints_seen": sum(len(d["damaged"]) for d in details),
        "landed": dict(sorted(landed.items())),
        "runs": len(chains),
        "steps": steps,
        "checkpoint_every_steps": checkpoint_every,
        "seed": seed,
        "seconds": round(time.monotonic() - started, 1),
        "details": details,
    }


def _options(steps: int, checkpoint_every: int) -> dict[str, Any]:
    from kfp_components.testing.tiny_model import tiny_model_path

    samples = ROOT / "kfp_components" / "data" / "samples" / "chat.jsonl"
    return {
        "model_name_or_path": str(tiny_model_path("qwen2", 0)),
        "data_path": str(samples),
        "eval_data_path": str(samples),
        "eval_steps": 3,
        "torch_dtype": "float32",
        "max_seq_len": 256,
        "effective_batch_size": 8,
        "max_tokens_per_gpu": 256,
        "learning_rate": 3e-3,
        "lr_scheduler": "cosine",
        "warmup_steps": 2,
        "max_steps": steps,
        "checkpoint_every_steps": checkpoint_every,
        "seed": 0,
        "resume": True,
    }


def _write_config(path: Path, output_dir: Path, options: dict[str, Any], *, keep: int) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({**options, "output_dir": str(output_dir), "keep_checkpoints": keep}))
    return path


def _start(config: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    log = open(f"{config}.log", "a", encoding="utf-8")  # noqa: SIM115  (closed with the process)
    log.write(f"--- attempt at {time.strftime('%H:%M:%S')}\n")
    log.flush()
    command = [sys.executable, "-m", "kfp_components.trainer", "--config", str(config)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    process.log = log  # type: ignore[attr-defined]
    return process


def _attempt(config: Path) -> float:
    """Run one attempt to its end; return how long it took."""
    began = time.monotonic()
    process = _start(config)
    process.wait()
    process.log.close()  # type: ignore[attr-defined]
    return time.monotonic() - began


def _chain(
    work: Path,
    options: dict[str, Any],
    reference: _Reference,
    rng: random.Random,
    kills: int,
    details: list[dict[str, Any]],
    full_seconds: float,
) -> dict[str, Any]:
    """Kill and resume one run until ``kills`` kills have landed or the run finished, then let it finish."""
    from kfp_components.trainer.checkpoint import find_resumable_checkpoint

    output_dir = work / "run"
    config = _write_config(work / "run.yaml", output_dir, options, keep=2)
    pending: dict[str, Any] | None = None  # the last kill, until the next attempt has shown how it resumed
    finished = False
    while not finished:
        resume_from, damaged = find_resumable_checkpoint(output_dir)
        resumed_at = _step_of(resume_from)
        if pending is not None:
            pending.update(_resume_check(reference, resume_from, resumed_at, damaged))
        kind = KINDS[len(details) % len(KINDS)] if len(details) < kills else None
        before = _leftovers(output_dir)
        process = _start(config)
        began = time.monotonic()
        killed = _kill_when(process, kind, output_dir, rng, full_seconds, before) if kind else False
        process.wait()
        process.log.close()  # type: ignore[attr-defined]
        if pending is not None:
            pending["next_attempt_steps_identical"] = reference.steps_match(output_dir, after=resumed_at)
            pending["identical"] = pending["checkpoint_identical"] and pending["next_attempt_steps_identical"]
            pending = None
        if killed:
            pending = {
                "kind": kind,
                "after_seconds": round(time.monotonic() - began, 3),
                "landed": _landed(output_dir, Path(f"{config}.log"), before),
            }
            details.append(pending)
        else:
            finished = process.returncode == 0 and (output_dir / "summary.json").exists()
            if not finished:
                raise RuntimeError(f"attempt failed (exit code {process.returncode}); see {config}.log")
    return reference.compare_final(output_dir)


def _kill_when(
    process: subprocess.Popen,
    kind: str,
    output_dir: Path,
    rng: random.Random,
    full_seconds: float,
    before: set[tuple[str, int, int]],
) -> bool:
    """SIGKILL ``process`` at a moment of ``kind``; False when it finished first."""
    metrics = output_dir / "metrics.jsonl"
    if kind == "random time":
        deadline = time.monotonic() + rng.uniform(0.0, full_seconds)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            time.sleep(0.005)
    elif kind == "within a step":
        lines = _line_count(metrics)
        while _line_count(metrics) <= lines or _line_count(metrics) == 0:
            if process.poll() is not None:
                return False
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.3))
    else:  # a checkpoint write
        while not any(name.endswith(".partial") for name, *_ in _leftovers(output_dir) - before):
            if process.poll() is not None:
                return False
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.03))
    if process.poll() is not None:
        return False
    process.kill()
    return True


def _line_count(path: Path) -> int:
    try:
        return len(path.read_bytes().splitlines())
    except FileNotFoundError:
        return 0


def _leftovers(output_dir: Path) -> set[tuple[str, int, int]]:
    """The folders of interrupted writes and removals now (name, inode, mtime), to tell new ones from old."""
    found = set()
    candidates = [output_dir / "final.partial"]
    if (output_dir / "checkpoints").is_dir():
        candidates += list((output_dir / "checkpoints").iterdir())
    for path in candidates:
        if path.name.endswith((".partial", ".deleting")):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            found.add((path.name, stat.st_ino, stat.st_mtime_ns))
    return found


def _landed(output_dir: Path, log: Path, before: set[tuple[str, int, int]]) -> str:
    """Where a kill landed, from what the killed process left behind (new leftovers, its log)."""
    new = {name for name, *_ in _leftovers(output_dir) - before}
    if "final.partial" in new:
        return "final model export"
    partial = [name for name in new if name.endswith(".partial")]
    if partial:
        files = {f.name for f in (output_dir / "checkpoints" / partial[0]).rglob("*") if f.is_file()}
        if "manifest.json" in files:
            return "checkpoint write: complete, before the rename"
        if "trainer_state.json" in files:
            return "checkpoint write: trainer state written"
        if any(name.startswith("rng_rank") for name in files):
            return "checkpoint write: RNG and scheduler states"
        return "checkpoint write: model and optimizer shards"
    if any(name.endswith(".deleting") for name in new):
        return "checkpoint removal (pruning)"
    text = log.read_text(encoding="utf-8", errors="replace")
    attempt = text[text.rfind("--- attempt") :]
    if "training sft:" not in attempt:
        return "start-up (imports, tokenising, loading, resume)"
    if "saved the model to" in attempt:
        return "final evaluation and summary"
    return "training step"


def _step_of(checkpoint: Path | None) -> int:
    return int(checkpoint.name.removeprefix("step-")) if checkpoint else 0


def _resume_check(
    reference: _Reference, checkpoint: Path | None, step: int, damaged: list[tuple[Path, str]]
) -> dict[str, Any]:
    return {
        "resumes_from_step": step,
        "checkpoint_identical": checkpoint is None or reference.checkpoint_matches(checkpoint),
        "damaged": [f"{path.name}: {why}" for path, why in damaged],
    }


class _Reference:
    """The uninterrupted run: its checkpoints (all kept), step records, final weights and summary."""

    def __init__(self, output_dir: Path):
        self.output_dir = output_dir
        self.records = _records(output_dir)

    def checkpoint_matches(self, checkpoint: Path) -> bool:
        import torch

        from kfp_components.trainer.checkpoint import load_checkpoint_tensors, verify_checkpoint

        mine = self.output_dir / "checkpoints" / checkpoint.name
        if not mine.is_dir():
            return False
        theirs_state, ours_state = verify_checkpoint(checkpoint), verify_checkpoint(mine)
        if any(getattr(theirs_state, f) != getattr(ours_state, f) for f in STATE_FIELDS):
            return False
        theirs, ours = load_checkpoint_tensors(checkpoint), load_checkpoint_tensors(mine)
        if theirs.keys() != ours.keys() or not all(torch.equal(theirs[k], ours[k]) for k in ours):
            return False
        for name in ("scheduler.pt", "rng_rank0.pt"):
            if not _same(
                torch.load(checkpoint / name, weights_only=True), torch.load(mine / name, weights_only=True)
            ):
                return False
        return True

    def steps_match(self, output_dir: Path, *, after: int) -> bool:
        """Every record ``output_dir``'s last attempt wrote after step ``after`` is the reference's."""
        written = [r for r in _records(output_dir) if r["step"] > after]
        expected = {(r["step"], "eval_loss" in r): r for r in self.records}
        return all(_same_record(r, expected.get((r["step"], "eval_loss" in r))) for r in written)

    def compare_final(self, output_dir: Path) -> dict[str, Any]:
        import torch
        from safetensors.torch import load_file

        theirs = load_file(output_dir / "final" / "model.safetensors")
        ours = load_file(self.output_dir / "final" / "model.safetensors")
        weights = theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
        records = _records(output_dir)
        losses = len(records) == len(self.records) and all(
            _same_record(a, b) for a, b in zip(records, self.records, strict=True)
        )
        summary = json.loads((output_dir / "summary.json").read_text())
        expected = json.loads((self.output_dir / "summary.json").read_text())
        keys = ("steps", "epochs", "samples_seen", "tokens_seen", "final_loss", "mean_loss", "eval_history")
        return {
            "final_weights_identical": weights,
            "losses_identical": losses,
            "summary_identical": all(summary[k] == expected[k] for k in keys),
            "attempts": summary.get("attempts"),
        }


def _records(output_dir: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (a line a kill cut short is left out: the next attempt drops it)."""
    path = output_dir / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def _same_record(ours: dict[str, Any], theirs: dict[str, Any] | None) -> bool:
    if theirs is None:
        return False
    keys = ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "loss_units", "samples", "eval_loss")
    return all(ours.get(k) == theirs.get(k) for k in keys)


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return (
            isinstance(b, list | tuple)
            and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b, strict=True))
        )
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return bool(a == b)


def render(result: dict[str, Any]) -> str:
    """The result as a short Markdown section."""
    landed = ", ".join(f"{where}: {count}" for where, count in result["landed"].items())
    return "\n".join(
        [
            "## Kill -9 and resume",
            "",
            f"{result['kills']} SIGKILLs of a {result['steps']}-step run (a checkpoint every "
            f"{result['checkpoint_every_steps']} steps), each followed by a resume: "
            f"{result['resumed_bit_identical']} of {result['kills']} resumed bit-identically (checkpoint and "
            f"following steps); final weights identical: {result['final_weights_identical']}; every loss "
            f"identical: {result['losses_identical']}. Where the kills landed: {landed}.",
        ]
    )


def report_text(text: str) -> str:
    """``docs/reliability.md``'s ``text`` with the kill -9 section rewritten from the stored result."""
    record = json.loads(RESULT_FILE.read_text())
    machine = record["machine"]
    described = (
        ", ".join(f"{key} {value}" for key, value in machine.items())
        if isinstance(machine, dict)
        else machine
    )
    block = f"{render(record['result'])}\n\nMachine: {described}. Date: {record['date']}. Runtime: {record['result']['seconds']} s."
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def write_report() -> None:
    """Rewrite the kill -9 section of ``docs/reliability.md`` from the stored result."""
    REPORT.write_text(report_text(REPORT.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kill_resume", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--kills", type=int, default=DEFAULT_KILLS, help=f"how many SIGKILLs (default {DEFAULT_KILLS})"
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="rewrite docs/reliability.md's section from the stored result",
    )
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps of the run (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--out", type=Path, default=RESULT_FILE, help=f"result file (default {RESULT_FILE})")
    args = parser.parse_args(argv)
    if args.render_only:
        write_report()
        return 0
    from benchmarks.machine import describe_machine

    result = run(kills=args.kills, steps=args.steps, seed=args.seed)
    record = {"result": result, "machine": describe_machine(), "date": datetime.date.today().isoformat()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(render(result))
    print(f"wrote {args.out}")
    if args.out == RESULT_FILE:
        write_report()
    ok = result["resumed_bit_identical"] == result["kills"] and result["final_weights_identical"]
    return 0 if ok and result["losses_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
