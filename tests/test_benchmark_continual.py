"""The continual-learning benchmark: its tasks, its diagnostics, its freezing and its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from benchmarks import continual
from kfp_components.testing.tiny_model import build_tiny_model
from kfp_components.trainer.osft import num_frozen_directions

TARGET = "model.layers.0.self_attn.q_proj.weight"


def test_tasks_are_deterministic_and_use_disjoint_words():
    task_a, task_b = continual.make_tasks()
    assert (task_a, task_b) == continual.make_tasks()
    assert len(task_a) == len(task_b) == continual.N_FACTS
    words = [question.rsplit(" ", 1)[1] for question, _ in task_a + task_b]
    assert len(set(words)) == len(words)
    assert all(answer.isdigit() and len(answer) == 3 for _, answer in task_a + task_b)


def test_matched_point_is_the_first_evaluation_reaching_the_threshold():
    curve = {
        "step": [0, 10, 20, 30],
        "a": [1.0, 0.5, 0.3, 0.1],
        "b": [0.0, 0.5, 0.95, 1.0],
        "nll_a": [0, 1, 2, 3],
    }
    assert continual.at_matched_b(curve) == {"step": 20, "a": 0.3, "b": 0.95, "nll_a": 2}
    assert continual.at_matched_b(curve, threshold=1.01) is None


def _changed_copy(base: Path, out: Path, change) -> str:
    """A copy of ``base`` whose q_proj of layer 0 is changed by ``change(weight)``."""
    out.mkdir()
    for item in base.iterdir():
        (out / item.name).write_bytes(item.read_bytes())
    weights = load_file(out / "model.safetensors")
    weights[TARGET] = weights[TARGET] + change(weights[TARGET])
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return str(out)


def test_weight_change_diagnostic_separates_frozen_and_trainable_directions(tmp_path):
    base = build_tiny_model(tmp_path / "base", arch="qwen2", seed=0)
    ratio = 0.25

    def top_direction(weight):  # grows the largest singular value: entirely in the frozen subspace
        u, s, vh = torch.linalg.svd(weight)
        return 0.5 * s[0] * torch.outer(u[:, 0], vh[0])

    def bottom_direction(weight):  # grows the smallest: entirely in the subspace OSFT trains
        u, s, vh = torch.linalg.svd(weight)
        k = num_frozen_directions(s.numel(), ratio)
        assert k < s.numel() - 1
        return 0.5 * s[-1] * torch.outer(u[:, -1], vh[-1])

    frozen = _changed_copy(base, tmp_path / "top", top_direction)
    trainable = _changed_copy(base, tmp_path / "bottom", bottom_direction)
    assert continual.weight_change_outside_trainable(str(base), frozen, ratio) == pytest.approx(1.0, abs=1e-4)
    assert continual.weight_change_outside_trainable(str(base), trainable, ratio) == pytest.approx(
        0.0, abs=1e-4
    )


def test_activation_share_is_a_share_and_isotropic_share_follows_the_ratio(tmp_path):
    model = str(build_tiny_model(tmp_path / "m", arch="qwen2", seed=0))
    task_a, _ = continual.make_tasks()
    measured, isotropic = continual.activation_share(model, task_a[:4], 0.25)
    assert 0.0 < measured < 1.0
    # hidden 64: square projections keep 16 of 64 directions, the rest likewise a quarter or less
    assert 0.1 < isotropic <= 0.25
    # every singular direction trainable: all of a weight's row space (narrow projections have a smaller one)
    all_measured, all_isotropic = continual.activation_share(model, task_a[:4], 1.0)
    assert all_measured > measured and all_isotropic > isotropic and all_isotropic <= 1.0


def test_frozen_diagnostic_freezes_what_it_says(tmp_path):
    base = build_tiny_model(tmp_path / "base", arch="qwen2", seed=0)
    task_a, _ = continual.make_tasks()
    data = continual._write_chat(tmp_path / "a.jsonl", task_a[:8])
    before = load_file(base / "model.safetensors")
    with continual._frozen("embeddings"):
        trained = continual._train(str(base), data, tmp_path / "run", 2, 1e-2, "osft", "constant")
    after = load_file(Path(trained) / "model.safetensors")
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert not torch.equal(after[TARGET], before[TARGET])
    assert not torch.equal(after["model.norm.weight"], before["model.norm.weight"])
    with continual._frozen("non_decomposed"):
        trained = continual._train(str(base), data, tmp_path / "run2", 2, 1e-2, "sft", "constant")
    after = load_file(Path(trained) / "model.safetensors")
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"])
    assert not torch.equal(after[TARGET], before[TARGET])


def test_report_in_docs_is_generated_from_the_stored_results():
    stored = continual._read(continual.NAME)
    assert stored is not None, "benchmarks/results/continual.json is missing: run `make continual-demo`"
    text = continual.REPORT.read_text()
    assert continual.report(stored, continual._read(f"{continual.NAME}_sweep")) == text, (
        "docs/continual-learning.md is stale: run `python -m benchmarks.continual --render-only`"
    )
    assert continual.PLOT.exists()
    settings = json.loads((continual.RESULTS / "continual.json").read_text())["result"]["setting"]
    assert settings["unfreeze_rank_ratio"] == continual.MAIN.unfreeze_rank_ratio


def test_experiment_runs_both_methods_and_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(continual, "STEPS_A", 4)
    task_a, task_b = (facts[:8] for facts in continual.make_tasks())
    setting = continual.Setting(name="tiny", hidden_size=64, intermediate_size=128, steps_b=4, eval_every=2)
    models = continual._TaskAModels(tmp_path, continual._write_chat(tmp_path / "a.jsonl", task_a))
    data_b = continual._write_chat(tmp_path / "b.jsonl", task_b)
    result = continual.experiment(setting, models, data_b, tmp_path / "run", (task_a, task_b))
    for label in ("full", "osft"):
        curve = result["curves"][label]
        assert curve["step"] == [0, 2, 4] and len(curve["a"]) == len(curve["b"]) == len(curve["nll_a"]) == 3
        assert Path(curve.pop("final_model"), "model.safetensors").exists()
        assert curve["nll_a"][0] == result["curves"]["full"]["nll_a"][0]  # both start from the same model
    # the two methods train differently from the same start
    assert result["curves"]["full"]["nll_a"][1:] != result["curves"]["osft"]["nll_a"][1:]
    assert 0.0 < result["diagnostics"]["weight_change_outside_trainable"] <= 1.0
    record = {
        "result": {
            **result,
            "task": {"facts_per_task": 8, "steps_a": 4, "lr_a": 3e-3, "batch": 8},
            "lm_eval": {k: {"a": 0.0, "b": 0.0} for k in ("before", "full", "osft")},
            "seconds": 1.0,
        },
        "machine": {"cpu": "test"},
        "date": "2026-01-01",
    }
    sweep = {"result": {"rows": [result], "seconds": 1.0}, "date": "2026-01-01"}
    text = continual.report(record, sweep)
    assert "| tiny (4 steps at lr 0.001, ratio 0.25) |" in text and "### What this shows" in text
    continual.plot(record["result"], tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_performance_page_is_generated_from_the_stored_results():
    from benchmarks import run

    assert run.report() == run.REPORT.read_text(), (
        "docs/performance.md is stale: run `make bench` or --render-only"
    )
