"""Resume, for real on a tiny model: only a checkpoint of the same run is resumed (its fingerprint), a damaged
newest checkpoint falls back to the one before, nothing in a checkpoint folder is unpickled beyond tensors
and numbers, the summary covers every attempt, and the final model is saved before the final evaluation."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer import train as train_module
from kfp_components.trainer.checkpoint import (
    MANIFEST,
    SafeLoadPlanner,
    TrainerState,
    find_resumable_checkpoint,
    load_checkpoint_tensors,
)
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.train import train
from kfp_components.typed_config import ConfigError

from conftest import SAMPLES, chat, write_jsonl

STEP = "step-{:08d}"


def config(tmp_path: Path, **overrides) -> TrainingConfig:
    options = {
        "model_name_or_path": str(tiny_model_path("qwen2", 0)),
        "data_path": str(SAMPLES / "chat.jsonl"),
        "output_dir": str(tmp_path / "run"),
        "torch_dtype": "float32",
        "max_seq_len": 256,
        "effective_batch_size": 8,
        "max_tokens_per_gpu": 256,
        "learning_rate": 3e-3,
        "lr_scheduler": "cosine",
        "warmup_steps": 2,
        "max_steps": 8,
        "checkpoint_every_steps": 2,
        "keep_checkpoints": 10,
        "seed": 0,
    }
    options.update(overrides)
    return TrainingConfig(**options)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / STEP.format(step)


def drop_checkpoints_after(run: Path, step: int) -> None:
    """Pretend the run died after ``step``: its later checkpoints are gone."""
    for path in (run / "checkpoints").iterdir():
        if int(path.name.removeprefix("step-")) > step:
            shutil.rmtree(path)


def no_model_loads(monkeypatch) -> None:
    """Fail the test if a model loads: a refused resume must be refused before any expensive work."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(train_module, "load_model", refuse)
    monkeypatch.setattr(train_module, "load_tokenizer", refuse)


# ------------------------------------------------------------------------------------------------------------
# Only a checkpoint of the same run is resumed
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"learning_rate": 1e-4}, "learning_rate: 0.003 in the checkpoint, 0.0001 now"),
        ({"algorithm": "osft"}, "algorithm: 'sft' in the checkpoint, 'osft' now"),
        ({"data": "other"}, "data_path: the file's contents differ (sha256 "),
        ({"model_name_or_path": "llama"}, "model_name_or_path: '"),
    ],
)
def test_resuming_a_checkpoint_of_another_run_is_refused_naming_what_differs(
    tmp_path, monkeypatch, change, named
):
    """Before: a changed learning rate was silently continued; sft -> osft failed deep in loading with
    ``Missing key in checkpoint state_dict: ...U_l``."""
    data = write_jsonl(
        tmp_path / "data.jsonl", [json.loads(line) for line in (SAMPLES / "chat.jsonl").open()]
    )
    train(config(tmp_path, data_path=str(data), max_steps=4))
    run = tmp_path / "run"
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    if change == {"data": "other"}:
        write_jsonl(data, [chat(f"question {i}?", f"answer {i}.") for i in range(40)])
        change = {}
    elif "model_name_or_path" in change:
        change = {"model_name_or_path": str(tiny_model_path("llama", 0))}
    no_model_loads(monkeypatch)
    with pytest.raises(ConfigError) as caught:
        train(config(tmp_path, data_path=str(data), max_steps=4, resume=True, **change))
    message = str(caught.value)
    assert caught.value.path == "resume" and named in message, message
    assert f"{checkpoint(run, 4)} belongs to another run" in message
    assert "set resume: false to start over" in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing touched


def test_what_may_change_on_resume_does_not_block_it(tmp_path):
    """Logging and checkpoint cadence, the memory settings that keep the maths and the attention kernel
    may change. Before: a run started with attn_implementation sdpa could not resume under auto."""
    first = train(config(tmp_path, attn_implementation="sdpa"))
    uninterrupted = records(tmp_path / "run")
    drop_checkpoints_after(tmp_path / "run", 4)
    resumed = train(
        config(
            tmp_path,
            resume=True,
            log_every_steps=3,
            checkpoint_every_steps=3,
            keep_checkpoints=1,
            max_tokens_per_gpu=512,
            activation_checkpointing=True,
        )
    )
    assert resumed.steps == first.steps == 8 and resumed.attempts == 2
    for before, after in zip(uninterrupted, records(tmp_path / "run"), strict=True):
        assert after["step"] == before["step"]
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-5)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [STEP.format(8)]


def test_a_fresh_run_removes_the_checkpoints_an_earlier_run_left(tmp_path, caplog):
    """Before: the fresh run's pruning deleted its own checkpoints and kept the earlier run's, which a
    later ``resume`` then continued."""
    train(config(tmp_path, max_steps=10, checkpoint_every_steps=3, keep_checkpoints=2))
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [STEP.format(9), STEP.format(10)]
    with caplog.at_level(logging.WARNING, logger="kfp_components"):
        train(config(tmp_path, max_steps=4, checkpoint_every_steps=3, keep_checkpoints=2, learning_rate=1e-3))
    assert "removed the 2 checkpoint(s) an earlier run left" in caplog.text
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [STEP.format(3), STEP.format(4)]


# ------------------------------------------------------------------------------------------------------------
# The summary covers the whole run
# ------------------------------------------------------------------------------------------------------------


def test_the_summary_after_a_resume_describes_the_whole_run(tmp_path):
    """Before: mean_loss, tokens_per_second and duration_seconds covered only the last attempt."""
    eval_data = str(SAMPLES / "chat.jsonl")
    train(config(tmp_path, eval_data_path=eval_data, eval_steps=3))
    run = tmp_path / "run"
    uninterrupted = summary_of(run)
    earlier = TrainerState.from_json((checkpoint(run, 4) / "trainer_state.json").read_text())
    drop_checkpoints_after(run, 4)
    train(config(tmp_path, eval_data_path=eval_data, eval_steps=3, resume=True))
    resumed = summary_of(run)
    for key in ("steps", "epochs", "samples_seen", "tokens_seen", "final_loss", "mean_loss", "eval_history"):
        assert resumed[key] == uninterrupted[key], key
    losses = [r["loss"] for r in records(run) if "loss" in r]
    assert resumed["mean_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-12)
    assert [e["step"] for e in resumed["eval_history"]] == [3, 5, 6, 8]
    assert uninterrupted["attempts"] == 1 and resumed["attempts"] == 2
    assert resumed["duration_seconds"] > earlier.elapsed_seconds > 0  # the earlier attempt counts
    assert resumed["tokens_per_second"] > 0


def test_resuming_a_finished_run_reports_it_instead_of_nan(tmp_path):
    """Before: ``final_loss: NaN``, ``mean_loss: NaN`` and 0 tokens/s (no step ran in the last attempt)."""
    train(config(tmp_path, max_steps=4))
    first = summary_of(tmp_path / "run")
    train(config(tmp_path, max_steps=4, resume=True))
    again = summary_of(tmp_path / "run")
    for key in ("steps", "samples_seen", "tokens_seen", "final_loss", "mean_loss"):
        assert again[key] == first[key], key
    assert again["tokens_per_second"] == first["tokens_per_second"] > 0


# ------------------------------------------------------------------------------------------------------------
# Damaged checkpoints, a torn metrics line, planted pickles
# ------------------------------------------------------------------------------------------------------------


def truncate_shard(path: Path) -> str:
    shard = next((path / "model_optimizer").glob("*.distcp"))
    with shard.open("r+b") as stream:
        stream.truncate(1000)
    return f"model_optimizer/{shard.name} has 1000 bytes"


def remove_shard(path: Path) -> str:
    shard = next((path / "model_optimizer").glob("*.distcp"))
    shard.unlink()
    return f"model_optimizer/{shard.name} is missing"


def garbage_state(path: Path) -> str:
    text = (path / "trainer_state.json").read_text()
    (path / "trainer_state.json").write_text("x" * len(text))  # same size: only parsing finds it
    return "trainer_state.json is not JSON"


def no_manifest(path: Path) -> str:
    (path / MANIFEST).unlink()
    return "no manifest.json"


@pytest.mark.parametrize("damage", [truncate_shard, remove_shard, garbage_state, no_manifest])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog, damage):
    """Before: EOFError, FileNotFoundError or JSONDecodeError from deep inside the load, every time."""
    train(config(tmp_path))
    run = tmp_path / "run"
    uninterrupted = records(run)
    drop_checkpoints_after(run, 6)
    why = damage(checkpoint(run, 6))
    with caplog.at_level(logging.WARNING, logger="kfp_components"):
        train(config(tmp_path, resume=True))
    assert f"checkpoint {STEP.format(6)} is damaged ({why}" in caplog.text
    assert f"resuming from {checkpoint(run, 4)}" in caplog.text
    assert (run / "checkpoints" / f"{STEP.format(6)}.damaged").is_dir()  # kept aside for a look
    resumed = records(run)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for before, after in zip(uninterrupted, resumed, strict=True):
        assert after["loss"] == before["loss"]  # bit for bit


def test_with_no_intact_checkpoint_resume_is_an_error_naming_each(tmp_path, monkeypatch):
    train(config(tmp_path, max_steps=4))
    run = tmp_path / "run"
    truncate_shard(checkpoint(run, 4))
    garbage_state(checkpoint(run, 2))
    no_model_loads(monkeypatch)
    with pytest.raises(ConfigError) as caught:
        train(config(tmp_path, max_steps=4, resume=True))
    message = str(caught.value)
    assert f"resume: no intact checkpoint in {run / 'checkpoints'}" in message
    assert STEP.format(4) in message and STEP.format(2) in message


def test_a_torn_last_line_of_metrics_does_not_break_resume(tmp_path, caplog):
    """Before: ``json.decoder.JSONDecodeError: Unterminated string`` when the resumed run read the file."""
    train(config(tmp_path))
    run = tmp_path / "run"
    uninterrupted = records(run)
    drop_checkpoints_after(run, 4)
    with (run / "metrics.jsonl").open("a") as out:
        out.write('{"step": 9, "lo')  # a kill in the middle of a write
    with caplog.at_level(logging.WARNING, logger="kfp_components"):
        train(config(tmp_path, resume=True))
    assert "metrics.jsonl:9: not a JSON record (an interrupted write); dropped" in caplog.text
    keys = ("step", "loss", "lr", "grad_norm")
    assert [[r[k] for k in keys] for r in records(run)] == [[r[k] for k in keys] for r in uninterrupted]


class Planted:
    """A pickle that runs code when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    """Replace ``path`` with a pickle that runs code, and update the manifest to match, as an attacker who
    can write the folder would."""
    path.write_bytes(pickle.dumps(Planted(marker)))
    checkpoint_root = next(p for p in path.parents if p.name.startswith("step-"))
    manifest = json.loads((checkpoint_root / MANIFEST).read_text())
    manifest["files"][path.relative_to(checkpoint_root).as_posix()] = path.stat().st_size
    (checkpoint_root / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("planted", ["scheduler.pt", "rng_rank0.pt", "model_optimizer/.metadata"])
def test_a_planted_pickle_in_a_checkpoint_never_runs(tmp_path, caplog, planted):
    """Before: ``torch.load(..., weights_only=False)`` of scheduler.pt ran the planted code."""
    train(config(tmp_path, max_steps=4))
    run = tmp_path / "run"
    marker = tmp_path / "code-ran"
    plant(checkpoint(run, 4) / planted, marker)
    with caplog.at_level(logging.WARNING, logger="kfp_components"):
        train(config(tmp_path, max_steps=4, resume=True))
    assert not marker.exists()
    assert f"checkpoint {STEP.format(4)} is damaged ({planted} " in caplog.text
    assert f"resuming from {checkpoint(run, 2)}" in caplog.text


def test_the_checkpoint_loader_itself_refuses_pickled_code(tmp_path):
    """What verification does not see (the optimizer's values inside the shards) is loaded with
    weights_only as well; and the shards' tensors read back through the same loader."""
    marker = tmp_path / "code-ran"
    with pytest.raises(pickle.UnpicklingError):
        SafeLoadPlanner().load_bytes(None, io.BytesIO(pickle.dumps(Planted(marker))))  # type: ignore[arg-type]
    assert not marker.exists()
    train(config(tmp_path, max_steps=2))
    tensors = load_checkpoint_tensors(checkpoint(tmp_path / "run", 2))
    assert any(key.startswith("model.") for key in tensors)
    assert any(key.endswith("exp_avg") for key in tensors)
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())


def test_leftovers_of_interrupted_saves_and_removals_are_never_resumed(tmp_path):
    train(config(tmp_path, max_steps=6))
    run = tmp_path / "run"
    drop_checkpoints_after(run, 4)
    shutil.copytree(checkpoint(run, 4), run / "checkpoints" / f"{STEP.format(6)}.partial")
    shutil.copytree(checkpoint(run, 4), run / "checkpoints" / f"{STEP.format(8)}.deleting")
    assert find_resumable_checkpoint(run) == (checkpoint(run, 4), [])
    train(config(tmp_path, max_steps=6, resume=True))  # its next save clears them away
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [STEP.format(n) for n in (2, 4, 6)]


# ------------------------------------------------------------------------------------------------------------
# The final model comes before the final evaluation
# ------------------------------------------------------------------------------------------------------------


def test_the_final_model_is_saved_before_the_final_evaluation(tmp_path, monkeypatch):
    """Before: the final evaluation ran first, so a crash there lost the final model and the last
    checkpoint."""
    eval_data = str(SAMPLES / "chat.jsonl")
    evaluate = train_module.Evaluator.__call__

    def crash_at_the_end(self, model):
        if train_module_state["in_final"]:
            raise RuntimeError("out of memory in the final evaluation")
        return evaluate(self, model)

    train_module_state = {"in_final": False}
    export = train_module.export_final_model

    def export_then_mark(*args, **kwargs):
        export(*args, **kwargs)
        train_module_state["in_final"] = True

    monkeypatch.setattr(train_module.Evaluator, "__call__", crash_at_the_end)
    monkeypatch.setattr(train_module, "export_final_model", export_then_mark)
    with pytest.raises(RuntimeError, match="final evaluation"):
        train(config(tmp_path, eval_data_path=eval_data, eval_steps=3))
    run = tmp_path / "run"
    assert (run / "final" / "model.safetensors").is_file()
    assert checkpoint(run, 8).is_dir()
    monkeypatch.undo()
    summary = train(config(tmp_path, eval_data_path=eval_data, eval_steps=3, resume=True))
    assert [e["step"] for e in summary.eval_history] == [3, 5, 6, 8] and summary.steps == 8
    evaluations = [r["step"] for r in records(run) if "eval_loss" in r]
    assert evaluations == [3, 5, 6, 8]  # each once
