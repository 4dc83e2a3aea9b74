"""The cot_distillation stage on tiny models: the seed's full reasoning pipeline (sft -> cot_distillation -> dpo)
from one YAML against a scripted OpenAI-compatible teacher (only its right traces are kept); a student that
learns a local tiny teacher's verified traces answers held-out problems it could not answer before; the
step-by-step mode's two weighted targets; and bad input stopped before anything trains."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kfp_components.orchestration import Pipeline
from kfp_components.orchestration.config import load_pipeline_config
from kfp_components.testing.openai_server import ScriptedChatServer
from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.testing.word_problems import NAMES, copy_problems, word_problems
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.train import train
from kfp_components.typed_config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "multistage" / "sft_cot_distillation_dpo.yaml"
KEY = "sk-test-teacher-0123456789abcdef"
PROBLEMS = word_problems(24, seed=5)
SOLUTIONS = {row["prompt"]: row["solution"] for row in PROBLEMS}
#: the scripted teacher is wrong on every fourth problem
WRONG = {row["prompt"] for i, row in enumerate(PROBLEMS) if i % 4 == 0}


def scripted_teacher(messages, body) -> str:
    """The generator's worked solution, with the final answer off by one on the WRONG problems."""
    problem = messages[-1]["content"]
    solution = SOLUTIONS[problem]
    if problem in WRONG:
        answer = int(solution.rsplit("#### ", 1)[1])
        solution = solution.rsplit("#### ", 1)[0] + f"#### {answer + 1}"
    return solution


def write_rows(path: Path, rows: list[dict], keys: tuple[str, ...] = ("prompt", "answer")) -> Path:
    path.write_text("".join(json.dumps({k: r[k] for k in keys}) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def teacher_server(monkeypatch):
    monkeypatch.setenv("TEACHER_API_KEY", KEY)
    with ScriptedChatServer(scripted_teacher, models=("gpt-4",), api_key=KEY) as server:
        yield server


def small(out: Path, **extra: object) -> dict[str, object]:
    values: dict[str, object] = {
        "model_name_or_path": str(tiny_model_path("qwen2", 0)),
        "output_dir": str(out),
        "torch_dtype": "float32",
    }
    for stage in ("sft", "cot_distillation", "dpo"):
        values.update(
            {
                f"stage_configs.{stage}.max_steps": 2,
                f"stage_configs.{stage}.effective_batch_size": 4,
                f"stage_configs.{stage}.max_tokens_per_gpu": 1024,
                f"stage_configs.{stage}.max_seq_len": 256,
                f"stage_configs.{stage}.num_train_epochs": 1,
            }
        )
    values["stage_configs.sft.dataset_subset_size"] = 16
    values["stage_configs.dpo.dataset_subset_size"] = 16
    values.update(extra)
    return values


def test_the_seeds_reasoning_pipeline_runs_end_to_end(teacher_server, tmp_path):
    problems = write_rows(tmp_path / "problems.jsonl", PROBLEMS[:16])
    held_out = write_rows(tmp_path / "held_out.jsonl", PROBLEMS[16:])
    out = tmp_path / "run"
    options = small(
        out,
        **{
            "stage_configs.cot_distillation.reasoning_dataset_path": str(problems),
            "stage_configs.cot_distillation.eval_dataset_name_or_path": str(held_out),
            "stage_configs.cot_distillation.teacher": {
                "base_url": teacher_server.base_url,
                "token_env": "TEACHER_API_KEY",
                "num_samples": 2,
                "max_tokens": 64,
                "max_concurrency": 4,
            },
            "stage_configs.cot_distillation.eval_max_new_tokens": 16,
        },
    )
    pipeline = Pipeline(load_pipeline_config(EXAMPLE, options))
    plan = pipeline.dry_run()
    details = plan.stages[1].details
    assert details["teacher"].startswith("gpt-4 (api)") and details["distillation_mode"] == "traces"
    sft, cot, dpo = pipeline.run()
    assert cot.input_model == sft.model_path and dpo.input_model == cot.model_path
    stage_dir = out / "stages" / "02_cot_distillation"
    traces = [
        json.loads(line) for line in (stage_dir / "synthetic" / "traces.jsonl").read_text().splitlines()
    ]
    kept = {row["messages"][0]["content"] for row in traces}
    assert kept == {row["prompt"] for row in PROBLEMS[:16]} - WRONG  # exactly the right ones
    assert all(row["verified"] and row["teacher"] == "gpt-4" for row in traces)
    assert cot.metrics["synthesis/traces_kept"] == len(traces) and cot.metrics["synthesis/problems"] == 16
    assert cot.metrics["dataset.train_rows"] == len(traces)
    for role in ("base", "tuned"):
        assert cot.metrics[f"reasoning/{role}/problems"] == 8
    report = (stage_dir / "reasoning_eval.md").read_text()
    assert "| base student |" in report and "| tuned student |" in report
    assert all(r.headers.get("authorization") == f"Bearer {KEY}" for r in teacher_server.chat_requests)
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".log", ".md"):
            assert KEY not in path.read_text(errors="replace"), path


@pytest.fixture(scope="module")
def copy_teacher(tmp_path_factory) -> Path:
    """A tiny teacher warmed up by SFT on worked copy problems (names A-H): it answers them all."""
    folder = tmp_path_factory.mktemp("teacher")
    rows = copy_problems(256, seed=1, names=NAMES[:8])
    data = folder / "sft.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": r["prompt"]},
                        {"role": "assistant", "content": r["solution"]},
                    ]
                }
            )
            + "\n"
            for r in rows
        )
    )
    config = TrainingConfig(
        model_name_or_path=str(tiny_model_path("qwen2", 0)),
        data_path=str(data),
        output_dir=str(folder / "out"),
        algorithm="sft",
        effective_batch_size=16,
        max_seq_len=128,
        max_tokens_per_gpu=2048,
        learning_rate=5e-3,
        lr_scheduler="constant",
        max_steps=200,
        torch_dtype="float32",
        checkpoint_every_steps=0,
    )
    config.validate()
    train(config)
    return folder / "out" / "final"


def cot_yaml(tmp_path: Path, stage: dict) -> Path:
    config = {"model_name_or_path": str(tiny_model_path("qwen2", 0)), "output_dir": str(tmp_path / "run")}
    config |= {
        "torch_dtype": "float32",
        "stages": ["cot_distillation"],
        "stage_configs": {"cot_distillation": stage},
    }
    path = tmp_path / "cot.yaml"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.slow
def test_a_student_learns_a_local_teachers_verified_reasoning(copy_teacher, tmp_path):
    """The student (the teacher's untrained start) answers none of the held-out problems (other names) before,
    and most of them after learning the local teacher's sampled, verified traces."""
    problems = write_rows(tmp_path / "problems.jsonl", copy_problems(128, seed=3, names=NAMES[:8]))
    held_out = write_rows(tmp_path / "held_out.jsonl", copy_problems(24, seed=4, names=NAMES[8:]))
    stage = {
        "reasoning_dataset_path": str(problems),
        "eval_dataset_name_or_path": str(held_out),
        "teacher_model_path": str(copy_teacher),
        "teacher_model_type": "local",
        "teacher": {"num_samples": 2, "temperature": 0.7, "max_tokens": 24, "system_prompt": ""},
        "rejection": {"max_traces_per_problem": 1},
        "max_seq_len": 128,
        "effective_batch_size": 16,
        "max_tokens_per_gpu": 2048,
        "learning_rate": 5e-3,
        "lr_scheduler": "constant",
        "max_steps": 200,
        "eval_max_new_tokens": 16,
        "checkpoint_every_steps": 0,
    }
    (result,) = Pipeline(load_pipeline_config(cot_yaml(tmp_path, stage))).run()
    metrics = result.metrics
    assert metrics["reasoning/teacher/accuracy"] > 0.9, metrics
    assert metrics["synthesis/traces_kept"] >= 100, metrics
    assert metrics["reasoning/base/accuracy"] == 0.0
    assert metrics["reasoning/tuned/accuracy"] >= 0.75, metrics


def test_step_by_step_writes_two_weighted_targets_per_trace_and_logit_distillation_mixes_in(
    teacher_server, tmp_path
):
    """step_by_step: a rationale target (weighted) and an answer target per kept trace; with
    distill_teacher_path (a local model sharing the student's tokenizer) the engine adds the KL term."""
    problems = write_rows(tmp_path / "problems.jsonl", PROBLEMS[:8])
    stage = {
        "reasoning_dataset_path": str(problems),
        "teacher_model_path": "gpt-4",
        "teacher": {
            "base_url": teacher_server.base_url,
            "token_env": "TEACHER_API_KEY",
            "num_samples": 1,
            "max_tokens": 64,
        },
        "distillation_mode": "step_by_step",
        "rationale_weight": 0.5,
        "distill_teacher_path": str(tiny_model_path("qwen2", 0)),
        "distill_coef": 0.5,
        "max_seq_len": 256,
        "effective_batch_size": 4,
        "max_tokens_per_gpu": 1024,
        "max_steps": 1,
    }
    Pipeline(load_pipeline_config(cot_yaml(tmp_path, stage))).run()
    rows = [
        json.loads(line)
        for line in (tmp_path / "run" / "stages" / "01_cot_distillation" / "data" / "train.jsonl")
        .read_text()
        .splitlines()
    ]
    kept = [p for p in PROBLEMS[:8] if p["prompt"] not in WRONG]
    assert len(rows) == 2 * len(kept)
    rationale = [r for r in rows if r["messages"][0]["content"].startswith("[rationale] ")]
    label = [r for r in rows if r["messages"][0]["content"].startswith("[label] ")]
    assert len(rationale) == len(label) == len(kept)
    assert all(r["weight"] == 0.5 for r in rationale) and all(r["weight"] == 1.0 for r in label)
    assert {r["messages"][-1]["content"] for r in label} == {f"#### {p['answer']}" for p in kept}
    stage_dir = tmp_path / "run" / "stages" / "01_cot_distillation"
    used = json.loads((stage_dir / "training_config.json").read_text())
    assert (used["distill_teacher_path"], used["distill_coef"]) == (str(tiny_model_path("qwen2", 0)), 0.5)
    (row,) = [
        json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if "loss" in line
    ]
    assert row["distill_kl"] == pytest.approx(0.0, abs=1e-6)  # the teacher is the student's start


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"reasoning_dataset_path": "<no answers>"},
            r"reasoning_dataset_path: problem 1 .* has no reference answer in column 'answer'",
        ),
        (
            {
                "teacher": {
                    "base_url": "http://127.0.0.1:9/v1",
                    "token_env": "TEACHER_API_KEY",
                    "retries": 0,
                    "timeout_seconds": 2.0,
                }
            },
            r"teacher_model_path: .*127\.0\.0\.1:9",
        ),
        ({"teacher_model_path": "gpt-5"}, r"gpt-5"),
        ({"teacher": {"base_url": "<server>", "token_env": "UNSET_TEACHER_KEY"}}, r"UNSET_TEACHER_KEY"),
        (
            {"teacher": {"base_url": "<server>", "model": "other"}},
            r"teacher\.model: is set by teacher_model_path",
        ),
        ({"teacher_model_type": "remote"}, r"teacher_model_type: .*api, local"),
        ({"teacher": {"base_url": "<server>", "prompt_template": "Solve it."}}, r"teacher\.prompt_template"),
        ({"distill_teacher_path": "/nonexistent/teacher"}, r"distill_teacher_path: .*nonexistent"),
        ({"lora_r": 4, "lora_target_modules": ["no_such_proj"]}, r"lora_target_modules"),
    ],
    ids=[
        "no-answer",
        "unreachable",
        "model-not-served",
        "missing-key",
        "model-twice",
        "type",
        "template",
        "distill-teacher",
        "lora-targets",
    ],
)
def test_bad_input_stops_before_anything_trains(teacher_server, tmp_path, change, message):
    problems = write_rows(tmp_path / "problems.jsonl", PROBLEMS[:4])
    stage = {
        "reasoning_dataset_path": str(problems),
        "teacher_model_path": "gpt-4",
        "teacher": {"base_url": teacher_server.base_url, "token_env": "TEACHER_API_KEY"},
        "max_steps": 1,
    }
    stage.update(change)
    if stage["reasoning_dataset_path"] == "<no answers>":
        stage["reasoning_dataset_path"] = str(write_rows(tmp_path / "bare.jsonl", PROBLEMS[:4], ("prompt",)))
    if stage["teacher"].get("base_url") == "<server>":
        stage["teacher"]["base_url"] = teacher_server.base_url
    with pytest.raises(ConfigError, match=message):
        Pipeline(load_pipeline_config(cot_yaml(tmp_path, stage))).run()
    assert not (tmp_path / "run" / "stages" / "01_cot_distillation" / "synthetic").exists()
    assert not re.search(KEY, "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*.log")))


def test_a_finished_synthesis_is_not_asked_again(teacher_server, tmp_path):
    """A stage that failed after its synthesis finished (training, evaluation) runs again without a single
    new teacher request; other options start over."""
    from kfp_components.feedback.synthesis import RejectionOptions, synthesize
    from kfp_components.feedback.teacher import TeacherOptions

    problems = write_rows(tmp_path / "problems.jsonl", PROBLEMS[:8])
    options = TeacherOptions(
        model="gpt-4",
        base_url=teacher_server.base_url,
        token_env="TEACHER_API_KEY",
        num_samples=1,
        max_tokens=64,
    )
    first = synthesize(problems, tmp_path / "traces.jsonl", options, RejectionOptions(), progress=False)
    asked = len(teacher_server.chat_requests)
    again = synthesize(problems, tmp_path / "traces.jsonl", options, RejectionOptions(), progress=False)
    assert len(teacher_server.chat_requests) == asked
    assert (again.traces_kept, again.problems, again.resumed_problems) == (first.traces_kept, 8, 8)
    options.num_samples = 2
    synthesize(problems, tmp_path / "traces.jsonl", options, RejectionOptions(), progress=False)
    assert len(teacher_server.chat_requests) > asked


def test_step_by_step_targets_refuse_one_prefix_for_both_tasks(tmp_path):
    """Whoever calls it (the stage, whose options check this first, or the chain's step): nothing is written."""
    from kfp_components.feedback.step_by_step import step_by_step_targets

    row = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "#### 2"}]}
    traces = write_rows(tmp_path / "traces.jsonl", [{**row, "answer": "2"}], keys=("messages", "answer"))
    target = tmp_path / "targets.jsonl"
    with pytest.raises(ConfigError, match="label_prefix: must differ from rationale_prefix"):
        step_by_step_targets(traces, target, rationale_prefix="> ", label_prefix="> ", rationale_weight=1.0)
    assert not target.exists()
