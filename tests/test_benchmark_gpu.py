"""The GPU benchmark (benchmarks/gpu.py): its --tiny run end to end on the CPU, a run killed midway, its
figures' arithmetic, its time budget, and the GPU section of docs/performance.md with and without results."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_tiny_run_measures_every_planned_job_and_renders(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--tiny", "--out", str(out)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert set(record) == {"result", "machine", "date"}
    result = record["result"]
    assert result["complete"] is True
    assert result["mode"] == "tiny"
    assert result["skipped"] == []
    for key in ("torch", "transformers", "cuda", "device", "liger_kernel"):
        assert key in result["environment"]
    assert _positive(result["matmul_peak"]["tflops"])
    for model in (gpu.TINY.model, gpu.TINY.large_model):
        assert _positive(result["models"][model]["parameters"])
        assert result["models"][model]["tokenizer_tokens"] < gpu.SHAPES[model]["vocab_size"]

    runs = {run["name"]: run for run in result["runs"]}
    planned = [job.name for job in gpu.plan_jobs(gpu.TINY) if job.kind != "build"]
    assert sorted(runs) == sorted(planned)
    for name, run in runs.items():
        assert run["status"] == "ok", (name, run.get("message"))
        assert run["measured_steps"] >= 1 and run["steps_run"] == run["warmup_steps"] + run["measured_steps"]
        assert _positive(run["peak_memory_mib"]), name
        assert run["config"]["max_steps"] == run["steps_run"]
        if run["kind"] == "train":
            assert run["plan_matches"] is True, name
            for key in ("tokens_per_second", "mfu", "model_tflops_per_second", "step_seconds_median"):
                assert _positive(run[key]), (name, key)
            assert 0 < run["attention_share_of_flops"] < 1
            assert run["tokens_per_micro_batch"] <= run["max_tokens_per_gpu"]
            assert run["liger_applied"] is False  # no Liger on a CPU, and the table says so
        else:
            assert 0 < run["generation_share"] < 1
            assert _positive(run["generation_tokens_per_second"])
    # OSFT and SFT ran on the same plan, so they saw the same tokens
    for ratio in result["osft_vs_sft"]:
        assert _positive(ratio["step_time_ratio"]) and _positive(ratio["memory_ratio"])
    assert len(result["osft_vs_sft"]) == len([n for n in planned if n.startswith(("osft", "tiny-b-osft"))])
    sft, osft = runs["sft-512"], runs["osft-512"]
    assert [row["tokens"] for row in sft["steps"]] == [row["tokens"] for row in osft["steps"]]

    tail = done.stdout.strip().splitlines()[-20:]  # the table comes last
    assert any(line.startswith("model") and "tokens/s" in line for line in tail)
    section = gpu.render_stored(out)
    assert section.startswith("## On a GPU: cpu")
    assert "| tiny-a | osft | no | 512 |" in section
    assert "asked, not applied" in section
    assert "GRPO" in section


@pytest.mark.slow
def test_a_run_killed_midway_leaves_valid_json_with_what_it_measured(tmp_path):
    out = tmp_path / "gpu.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.gpu", "--tiny", "--out", str(out)],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if out.exists() and json.loads(out.read_text())["result"]["runs"]:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no run was recorded in time")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    result = json.loads(out.read_text())["result"]
    assert result["complete"] is False
    assert result["runs"][0]["name"] == "sft-512"
    assert _positive(result["runs"][0]["tokens_per_second"])
    assert not list(tmp_path.glob("*.partial"))


SHAPE = gpu.SHAPES["tiny-a"]


def _rows(seconds: list[float], tokens: list[int]) -> list[dict]:
    return [
        {"step": i + 1, "seconds": s, "tokens": t, "micro_batches": 2, "memory_mib": 100.0 + i}
        for i, (s, t) in enumerate(zip(seconds, tokens, strict=True))
    ]


def test_figures_leave_out_the_warmup_steps_and_count_attention_per_sample():
    rows = _rows([9.0, 1.0, 3.0], [1000, 400, 600])
    shapes = [
        {"tokens": 1000, "sum_squared_lengths": 0, "micro_batches": 2, "largest_micro_batch": 600},
        {"tokens": 400, "sum_squared_lengths": 40000, "micro_batches": 2, "largest_micro_batch": 300},
        {"tokens": 600, "sum_squared_lengths": 90000, "micro_batches": 2, "largest_micro_batch": 500},
    ]
    figures = gpu.summarize_train(rows, shapes, warmup=1, parameters=1000, shape=SHAPE, peak_tflops=1e-6)
    assert figures["measured_steps"] == 2
    assert figures["tokens_per_second"] == pytest.approx(1000 / 4.0)
    assert figures["step_seconds_median"] == pytest.approx(2.0)
    assert figures["tokens_per_micro_batch"] == pytest.approx(1000 / 4)
    assert figures["peak_memory_mib"] == 102.0
    attention = 6 * SHAPE["num_layers"] * SHAPE["hidden_size"] * (40000 + 90000)
    flops = 6 * 1000 * 1000 + attention
    assert figures["model_tflops_per_second"] == pytest.approx(flops / 4.0 / 1e12)
    assert figures["mfu"] == pytest.approx(flops / 4.0 / 1e12 / 1e-6)
    assert figures["attention_share_of_flops"] == pytest.approx(attention / flops)
    assert figures["largest_micro_batch"] == 500


def test_no_mfu_when_the_plan_does_not_match_the_steps_run():
    rows = _rows([1.0, 1.0], [400, 600])
    shapes = [{"tokens": 400, "sum_squared_lengths": 1, "micro_batches": 1, "largest_micro_batch": 400}] * 2
    figures = gpu.summarize_train(rows, shapes, warmup=0, parameters=10, shape=SHAPE, peak_tflops=1.0)
    assert figures["plan_matches"] is False
    assert "mfu" not in figures
    assert _positive(figures["tokens_per_second"])


def test_a_run_that_failed_before_its_measured_steps_has_no_figures():
    figures = gpu.summarize_train(
        _rows([1.0], [400]), [], warmup=1, parameters=10, shape=SHAPE, peak_tflops=1.0
    )
    assert figures["measured_steps"] == 0
    assert "tokens_per_second" not in figures


def test_osft_is_compared_with_the_sft_run_of_the_same_model_size_and_liger():
    def run(algorithm: str, tokens: int, liger: bool, step: float, memory: float) -> dict:
        return {
            "kind": "train",
            "model": "m",
            "algorithm": algorithm,
            "max_tokens_per_gpu": tokens,
            "use_liger": liger,
            "liger_applied": liger,
            "measured_steps": 2,
            "step_seconds_median": step,
            "peak_memory_mib": memory,
        }

    runs = [
        run("sft", 8, False, 1.0, 100.0),
        run("osft", 8, False, 1.5, 150.0),
        run("osft", 8, True, 3.0, 50.0),  # no Liger SFT to compare with
        run("sft", 16, False, 2.0, 200.0),
        {**run("osft", 16, False, 0.0, 0.0), "measured_steps": 0, "status": "oom"},
    ]
    (only,) = gpu.comparisons(runs)
    assert (only["max_tokens_per_gpu"], only["use_liger"]) == (8, False)
    assert only["step_time_ratio"] == pytest.approx(1.5)
    assert only["memory_ratio"] == pytest.approx(1.5)


def test_a_job_that_would_end_after_the_budget_is_skipped_with_the_reason(tmp_path):
    bench = gpu.Benchmark(gpu.GPU, tmp_path / "gpu.json", budget=60.0, work=tmp_path)
    bench.models["qwen2.5-0.5b"] = {"parameters": 494_000_000, "tokens_per_word": 1.3, "path": "x"}
    bench.result["matmul_peak"] = {"tflops": 790.0}
    jobs = {job.name: job for job in gpu.plan_jobs(gpu.GPU)}
    needed = bench.estimate(jobs["osft-64k"])
    # the budget counts from the benchmark module's start: leave half, then twice, what the job needs
    bench.budget = bench.elapsed() + needed / 2
    reason = bench.skip_reason(jobs["osft-64k"])
    assert reason is not None and reason.startswith(f"time budget: about {needed:.0f} s needed, ")
    assert bench.skip_reason(jobs["qwen2.5-1.5b-sft-16k-liger"]) == "no model qwen2.5-1.5b"
    bench.budget = bench.elapsed() + 2 * needed
    assert bench.skip_reason(jobs["osft-64k"]) is None


def test_the_plan_puts_the_core_runs_first_and_every_micro_batch_size_in_it():
    names = [job.name for job in gpu.plan_jobs(gpu.GPU)]
    assert names[:5] == ["sft-16k", "osft-16k", "sft-16k-liger", "osft-16k-liger", "grpo"]
    for size in ("8k", "16k", "32k", "64k"):
        assert f"sft-{size}" in names and f"osft-{size}" in names
    assert names.index("build-qwen2.5-1.5b") < names.index("qwen2.5-1.5b-osft-16k-liger")


def test_the_chat_data_has_the_planned_rows_and_long_tailed_lengths(tmp_path):
    import random

    lengths = gpu.sample_lengths(2000, gpu.GPU, random.Random(0))
    assert min(lengths) >= 16 and max(lengths) <= gpu.GPU.max_length
    assert sorted(lengths)[len(lengths) // 2] == pytest.approx(gpu.GPU.median_length, rel=0.1)
    assert max(lengths) > 4 * gpu.GPU.median_length  # a long tail
    path = gpu.write_chat_data(tmp_path / "chat.jsonl", lengths[:5], tokens_per_word=1.0, seed=0)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [[m["role"] for m in row["messages"]] for row in rows] == [["user", "assistant"]] * 5
    words = [sum(len(m["content"].split()) for m in row["messages"]) for row in rows]
    assert all(abs(w - (n - 12)) <= 6 for w, n in zip(words, lengths[:5], strict=True))


def test_without_stored_results_the_gpu_section_says_not_measured_yet(tmp_path):
    section = gpu.render_stored(tmp_path / "missing.json")
    assert section.startswith("## On a GPU")
    assert "Not measured yet" in section


def test_the_report_renders_the_stored_gpu_section_with_the_device_name(tmp_path, monkeypatch):
    from benchmarks import run

    result = {
        "mode": "gpu",
        "elapsed_seconds": 250.0,
        "budget_seconds": 270.0,
        "environment": {"device": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0", "transformers": "5.17.0"},
        "matmul_peak": {"dtype": "bfloat16", "shape": [8192, 8192, 8192], "repeats": 10, "tflops": 790.0},
        "runs": [],
        "skipped": [{"name": "osft-8k-liger", "reason": "time budget: about 20 s needed, 5 s left"}],
    }
    (tmp_path / "gpu.json").write_text(
        json.dumps({"result": result, "machine": {"gpu": "NVIDIA H200"}, "date": "2026-01-01"})
    )
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    report = run.report()
    assert "## On a GPU: NVIDIA H200" in report
    assert "**790.0 TFLOP/s**" in report
    assert "osft-8k-liger (time budget" in report
    assert "Not measured yet: `benchmarks/results/gpu.json`" not in report


# ------------------------------------------------------------------------------------- the online RL suite
@pytest.mark.slow
def test_the_rl_suite_tiny_run_measures_every_run_or_says_trpo_is_not_available(tmp_path):
    from benchmarks import gpu_rl

    out = tmp_path / "rl.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--suite", "rl", "--tiny", "--out", str(out)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())["result"]
    assert (result["suite"], result["mode"], result["complete"], result["skipped"]) == (
        "rl",
        "tiny",
        True,
        [],
    )
    runs = {run["name"]: run for run in result["runs"]}
    assert list(runs) == [job.name for job in gpu_rl.plan_jobs(gpu_rl.TINY)]
    assert list(runs)[:4] == ["grpo", "ppo", "a2c", "trpo-lora"]
    for name, run in runs.items():
        assert run["config"]["kl_coef"] == 0.05 and run["config"]["reward_functions"], name
        if run["algorithm"] == "trpo" and run["status"] == "not available":
            assert "algorithm" in run["message"] and not run["steps"]
            continue
        assert run["status"] == "ok", (name, run.get("message"))
        assert run["measured_steps"] == 1 and run["steps_run"] == 2
        for key in ("step_seconds_median", "training_seconds_median", "rollout_tokens_per_second"):
            assert _positive(run[key]), (name, key)
        assert 0 < run["generation_share"] < 1
        assert _positive(run["step_time_over_ppo"])
        if run["algorithm"] != "grpo":
            assert math.isfinite(run["value"]["value_loss"]) and "explained_variance" in run["value"], name
        if run["algorithm"] == "trpo":
            assert {"trpo_backtracks", "trpo_accepted", "trpo_kl", "trpo_seconds"} <= set(run["trpo"]), name
    assert runs["ppo"]["config"]["num_iterations"] == 2 and runs["ppo"]["config"]["num_mini_batches"] == 2
    assert runs["trpo-lora"]["config"]["lora_r"] == 16
    assert runs["trpo-lora"]["config"]["distributed"] == "ddp"
    assert result["step_time_over_ppo"]["ppo"] == pytest.approx(1.0)
    section = gpu_rl.render_stored(out)
    assert section.startswith("### Online RL on a GPU: cpu")
    assert "| ppo | full |" in section and "| trpo-lora | LoRA r16 |" in section
    assert "The value model:" in section


def _config_answer(phase: str, paths: list[str]) -> dict:
    return {
        "status": "error",
        "message": "ConfigError: ...",
        "config_problems": [[path, "..."] for path in paths],
        "config_phase": phase,
    }


def test_a_trpo_run_the_config_refuses_is_not_available_and_only_trpo_gets_that_status():
    from benchmarks import gpu_rl

    trpo, ppo = gpu_rl.RLJob("trpo-full", "trpo", {}), gpu_rl.RLJob("ppo", "ppo", {})
    assert gpu_rl.failure_status(trpo, _config_answer("config", ["algorithm"])) == "not available"
    # any other refusal of the options is the benchmark's own mistake, and says so
    assert gpu_rl.failure_status(ppo, _config_answer("config", ["algorithm"])) == "config error"
    assert gpu_rl.failure_status(trpo, _config_answer("config", ["algorithm", "lora_r"])) == "config error"
    # trpo's memory check refuses full fine-tuning once the model is loaded
    assert gpu_rl.failure_status(trpo, _config_answer("training", ["lora_r"])) == "refused"
    assert gpu_rl.failure_status(trpo, {"status": "oom", "message": "CUDA out of memory"}) == "oom"


def test_the_worker_reports_where_a_config_error_came_from(tmp_path):
    from benchmarks import gpu_rl, gpu_worker

    job = gpu_rl.RLJob("trpo-lora", "trpo", {"lora_r": 16, "distributed": "ddp"})
    options = gpu_rl.run_options(gpu_rl.TINY, job, "model", str(tmp_path / "p.jsonl"), str(tmp_path / "o"))
    options["max_kl"] = 0.0  # refused by the config whatever the online loop takes
    try:
        gpu_worker.train(options, plan_attention=False)
    except Exception as exc:
        details = gpu_worker.describe_error(exc)
    else:
        pytest.fail("the config accepted max_kl 0")
    assert details["config_phase"] == "config"
    assert [path for path, _ in details["config_problems"] if path == "max_kl"] == ["max_kl"]
    assert gpu_rl.failure_status(job, details) == "config error"


def test_the_rl_plan_puts_grpo_first_and_trpo_full_last_and_skips_what_the_budget_leaves_no_room_for(
    tmp_path,
):
    from benchmarks import gpu_rl

    names = [job.name for job in gpu_rl.plan_jobs(gpu_rl.GPU)]
    assert names == ["grpo", "ppo", "a2c", "trpo-lora", "trpo-full"]
    assert "trpo-full" not in [job.name for job in gpu_rl.plan_jobs(gpu_rl.TINY)]
    bench = gpu_rl.RLBenchmark(gpu_rl.GPU, tmp_path / "rl.json", budget=30.0, work=tmp_path)
    jobs = {job.name: job for job in gpu_rl.plan_jobs(gpu_rl.GPU)}
    assert bench.estimate_rl(jobs["trpo-full"]) > bench.estimate_rl(jobs["grpo"]) > 0
    assert bench.elapsed() + bench.estimate_rl(jobs["grpo"]) > bench.budget


def test_rl_figures_leave_out_the_warmup_step_and_take_ratios_to_ppo():
    from benchmarks import gpu_rl

    def row(seconds: float, generation: float, **extra: float) -> dict:
        return {
            "seconds": seconds,
            "generation_seconds": generation,
            "training_seconds": seconds - generation,
            "completion_length_mean": 10.0,
            "samples": 4,
            "kl": 0.01,
            "memory_mib": 50.0,
            **extra,
        }

    rows = [
        row(9.0, 8.0, value_loss=9.0),
        row(2.0, 1.0, value_loss=1.0, trpo_backtracks=1, trpo_accepted=1, trpo_seconds=0.5),
        row(4.0, 1.0, value_loss=3.0, trpo_backtracks=2, trpo_accepted=0, trpo_seconds=1.5),
    ]
    figures = gpu_rl.summarize(rows, warmup=1, peak_memory_mib=80.0)
    assert figures["measured_steps"] == 2
    assert figures["step_seconds_median"] == pytest.approx(3.0)
    assert figures["generation_share"] == pytest.approx(2.0 / 6.0)
    assert figures["training_seconds_median"] == pytest.approx(2.0)
    assert figures["rollout_tokens_per_second"] == pytest.approx(80 / 2.0)
    assert figures["peak_memory_mib"] == 80.0
    assert figures["value"] == {"value_loss": pytest.approx(2.0)}
    assert figures["trpo"]["trpo_backtracks"] == pytest.approx(1.5)
    assert figures["trpo"]["trpo_accepted"] == pytest.approx(0.5)
    assert figures["trpo"]["trpo_seconds_median"] == pytest.approx(1.0)
    runs = [
        {"name": "grpo", "measured_steps": 2, "step_seconds_median": 2.0},
        {"name": "ppo", "measured_steps": 2, "step_seconds_median": 4.0},
        {"name": "trpo-full", "measured_steps": 0},
    ]
    assert gpu_rl.ratios_to_ppo(runs) == {"grpo": 0.5, "ppo": 1.0}
    assert gpu_rl.ratios_to_ppo(runs[:1]) == {}


def test_the_report_has_the_online_rl_subsection_not_measured_then_rendered(tmp_path, monkeypatch):
    from benchmarks import gpu_rl, run

    monkeypatch.setattr(run, "RESULTS", tmp_path)
    report = run.report()
    assert "### Online RL on a GPU\n\nNot measured yet" in report
    assert report.index("## On a GPU") < report.index("### Online RL on a GPU")
    result = {
        "suite": "rl",
        "mode": "gpu",
        "elapsed_seconds": 200.0,
        "budget_seconds": 215.0,
        "environment": {"device": "NVIDIA H200", "torch": "2.11.0", "cuda": "13.0", "transformers": "5.17.0"},
        "runs": [
            {
                "name": "trpo-full",
                "algorithm": "trpo",
                "trainable": "full",
                "config": {"effective_batch_size": 32, "max_new_tokens": 128},
                "status": "not available",
                "message": "ConfigError: algorithm: not part of the online loop yet",
                "measured_steps": 0,
            }
        ],
        "skipped": [],
    }
    (tmp_path / "gpu_rl.json").write_text(
        json.dumps({"result": result, "machine": {"gpu": "NVIDIA H200"}, "date": "2026-01-01"})
    )
    report = run.report()
    assert "### Online RL on a GPU: NVIDIA H200" in report
    assert "| trpo-full | full | - | - |" in report
    assert "- trpo-full: not available: ConfigError: algorithm" in report
    assert "gpu_rl.json` does not exist" not in report
    assert gpu_rl.NOT_MEASURED not in report
