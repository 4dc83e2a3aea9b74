"""The synthesis benchmark: a tiny run has the shape the report reads, and the report states the goal."""

from __future__ import annotations

import pytest

from benchmarks import synthesis


def test_a_tiny_run_measures_every_concurrency_and_the_local_teacher():
    result = synthesis.run(
        problems=8, latency_seconds=0.01, concurrencies=(1, 4), local_problems=2, local_max_tokens=4
    )
    endpoint = result["endpoint"]
    assert (endpoint["problems"], endpoint["latency_seconds"], endpoint["num_samples"]) == (8, 0.01, 4)
    first, second = endpoint["runs"]
    assert (first["max_concurrency"], first["speed_up"], first["server_max_in_flight"]) == (1, 1.0, 1)
    assert second["max_concurrency"] == 4 and 1 < second["server_max_in_flight"] <= 4
    assert first["server_requests"] == second["server_requests"] == 8  # one request per problem
    assert second["speed_up"] == round(first["seconds"] / second["seconds"], 2)
    assert first["traces_per_second"] == pytest.approx(4 * first["problems_per_second"], rel=0.05)
    assert endpoint["goal"] == {"max_concurrency": 16, "speed_up": 8.0, "met": None}  # 16 not measured
    local = result["local"]
    assert (local["problems"], local["max_tokens"]) == (2, 4)
    assert local["teacher_tokens_per_second"] > 0 and local["generate_tokens_per_second"] > 0
    text = synthesis.render(result)
    assert text.startswith("## Reasoning data synthesis")
    assert "Goal: at least 8x the sequential rate at concurrency 16: not measured." in text
    assert f"| 1 | {first['problems_per_second']:,} |" in text
    assert f"| teacher (rollout code) | {local['teacher_tokens_per_second']:,} |" in text


def test_the_report_says_whether_the_goal_is_met():
    runs = [
        {
            "max_concurrency": c,
            "problems_per_second": p,
            "traces_per_second": 4 * p,
            "speed_up": s,
            "seconds": 1.0,
            "server_max_in_flight": c,
        }
        for c, p, s in [(1, 18.0, 1.0), (16, 144.0, 8.0)]
    ]
    result = {
        "problems": 128,
        "num_samples": 4,
        "chunk_size": 32,
        "latency_seconds": 0.05,
        "runs": runs,
        "goal": {"max_concurrency": 16, "speed_up": 8.0, "met": True},
    }
    assert "concurrency 16: met (8x)." in synthesis.render_endpoint(result)
    result["goal"]["met"] = False
    assert "concurrency 16: not met (8x)." in synthesis.render_endpoint(result)


def test_the_sequential_baseline_is_required():
    with pytest.raises(ValueError, match="must include 1"):
        synthesis.run(problems=2, concurrencies=(4,), local=False)


def test_performance_page_has_a_synthesis_section_once_a_result_is_stored():
    from benchmarks import run

    assert "synthesis" in run.BENCHMARKS
    if not (run.RESULTS / "synthesis.json").exists():
        pytest.skip("no stored synthesis result")
    assert "## Reasoning data synthesis" in run.report()
