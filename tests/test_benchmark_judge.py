"""The judge benchmark: a tiny run has the shape the report reads, and the report states the goal."""

from __future__ import annotations

import pytest

from benchmarks import judge


def test_a_tiny_run_measures_every_concurrency_against_the_sequential_one():
    result = judge.run(requests=8, latency_seconds=0.01, concurrencies=(1, 4), step_concurrencies=())
    assert "step" not in result
    throughput = result["throughput"]
    assert (throughput["requests"], throughput["latency_seconds"]) == (8, 0.01)
    first, second = throughput["runs"]
    assert (first["max_concurrency"], first["speed_up"], first["server_max_in_flight"]) == (1, 1.0, 1)
    assert second["max_concurrency"] == 4 and 1 < second["server_max_in_flight"] <= 4
    assert first["server_requests"] == second["server_requests"] == 8  # the warm-up check() is a GET
    assert second["speed_up"] == round(first["seconds"] / second["seconds"], 2)
    for entry in (first, second):
        assert entry["mean_latency_ms"] >= 10 and entry["client_cpu_ms_per_request"] > 0
    assert throughput["goal"] == {"max_concurrency": 16, "speed_up": 8.0, "met": None}  # 16 not measured
    text = judge.render(result)
    assert text.startswith("## Judge endpoint client")
    assert "Goal: at least 8x the sequential rate at concurrency 16: not measured." in text
    assert f"| 1 | {first['requests_per_second']:,} | 1x |" in text


def test_the_report_says_whether_the_goal_is_met():
    runs = [
        {
            "max_concurrency": c,
            "requests_per_second": r,
            "speed_up": s,
            "seconds": 1.0,
            "mean_latency_ms": 50.0,
            "max_latency_ms": 60.0,
            "client_cpu_ms_per_request": 2.0,
            "server_max_in_flight": c,
        }
        for c, r, s in [(1, 18.0, 1.0), (16, 144.0, 8.0)]
    ]
    result = {
        "requests": 256,
        "latency_seconds": 0.05,
        "max_tokens": 8,
        "runs": runs,
        "goal": {"max_concurrency": 16, "speed_up": 8.0, "met": True},
    }
    assert "concurrency 16: met (8x)." in judge.render_throughput(result)
    result["goal"]["met"] = False
    assert "concurrency 16: not met (8x)." in judge.render_throughput(result)


def test_a_short_training_run_measures_the_judges_share_of_a_step(tmp_path):
    entry = judge.measure_steps(4, latency_seconds=0.01, steps=2, workdir=tmp_path)
    assert entry["max_concurrency"] == 4 and 1 <= entry["server_max_in_flight"] <= 4
    assert entry["requests"] + entry["cache_hits"] == 2 * entry["completions_per_step"]
    assert 0 < entry["judge_seconds"] < entry["step_seconds"]
    # The share is computed from the unrounded times; the rounded ones reproduce it to within their rounding.
    assert 0 < entry["judge_share"] < 1
    # Each time is off by at most 0.0005 after rounding, the share by at most 0.0005 itself.
    bound = 0.0005 + 0.001 / entry["step_seconds"]
    assert entry["judge_share"] == pytest.approx(entry["judge_seconds"] / entry["step_seconds"], abs=bound)
    text = judge.render_steps({"latency_seconds": 0.01, "steps": 2, "max_new_tokens": 32, "runs": [entry]})
    assert (
        f"| 4 | {entry['step_seconds']} | {entry['judge_seconds']} | {entry['judge_share'] * 100:.0f}% |"
        in text
    )


def test_the_sequential_baseline_is_required():
    with pytest.raises(ValueError, match="must include 1"):
        judge.run(requests=2, concurrencies=(4,))


def test_performance_page_has_a_judge_section_once_a_result_is_stored():
    from benchmarks import run

    assert "judge" in run.BENCHMARKS
    if not (run.RESULTS / "judge.json").exists():
        pytest.skip("no stored judge result")
    assert "## Judge endpoint client" in run.report()
