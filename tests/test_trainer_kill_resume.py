"""kill -9 at random moments, start-up, steps and checkpoint writes included, never costs more than the steps
since the last checkpoint: ``benchmarks/kill_resume.py`` on a few kills."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_kill_9_at_random_moments_resumes_to_identical_weights(tmp_path):
    """``benchmarks/kill_resume.py`` with 3 kills: one at a random time, one within a step, one while a
    checkpoint is written; each resume continues bit for bit."""
    from benchmarks.kill_resume import run

    result = run(kills=3, steps=8, seed=1, work_dir=tmp_path)
    assert result["kills"] == 3
    assert result["resumed_bit_identical"] == 3, result["details"]
    assert result["final_weights_identical"] and result["losses_identical"] and result["summaries_identical"]
    assert result["damaged_checkpoints_seen"] == 0
    assert [d["kind"] for d in result["details"]] == ["random time", "within a step", "checkpoint write"]


def test_reliability_page_shows_the_stored_kill_figures():
    from benchmarks.kill_resume import REPORT, report_text

    assert report_text(REPORT.read_text()) == REPORT.read_text(), (
        "docs/reliability.md is stale: run `python -m benchmarks.kill_resume --render-only`"
    )
