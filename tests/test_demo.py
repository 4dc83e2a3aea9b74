"""`make demo` runs the real OSFT pipeline end to end and prints where everything went."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kfp_components.demo import main


@pytest.mark.slow
def test_demo_runs_the_osft_pipeline_end_to_end(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "Demo summary: osft_pipeline under kfp.local" in printed
    # The console shows the stages and the training steps; kfp.local's raw output went to the log file.
    for stage in (
        "[1/5] dataset-download",
        "[2/5] train-model",
        "[3/5] evaluate-model",
        "[4/5] promotion-gate",
        "[5/5] register-model",
    ):
        assert stage in printed
    assert "      step 15/15  loss " in printed and "executor_input" not in printed
    assert "Got executor_input" in (tmp_path / "pipeline.log").read_text()
    for key in ("dataset", "training", "evaluation", "model", "provenance", "registry", "full log"):
        assert f"\n{key} " in printed
    model_line = next(line for line in printed.splitlines() if line.startswith("model "))
    assert (Path(model_line.split(None, 1)[1]) / "model.safetensors").exists()
    provenance_line = next(line for line in printed.splitlines() if line.startswith("provenance "))
    provenance = json.loads(Path(provenance_line.split(None, 1)[1]).read_text())
    assert provenance["training"]["algorithm"] == "osft" and provenance["dataset"]["uri"].startswith(
        "http://"
    )


def test_a_missing_prerequisite_is_named_with_the_fix(monkeypatch, capsys, tmp_path):
    from kfp_components import demo

    def missing(_output_dir):
        raise ModuleNotFoundError("No module named 'lm_eval'", name="lm_eval")

    monkeypatch.setattr(demo, "run_demo", missing)
    assert main(["--output-dir", str(tmp_path)]) == 2
    assert "a prerequisite is missing (lm_eval); run `make setup` first" in capsys.readouterr().err


def test_a_failed_task_points_at_the_full_log(monkeypatch, capsys, tmp_path):
    from kfp_components import demo

    def failing(_output_dir):
        raise RuntimeError("Pipeline 'osft-fine-tuning' finished with status FAILURE")

    monkeypatch.setattr(demo, "run_demo", failing)
    assert main(["--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "finished with status FAILURE" in err and str(tmp_path / "pipeline.log") in err
