"""The synthesize_reasoning_data component runs for real under kfp.local against a scripted teacher endpoint.

No ``from __future__ import annotations`` here: KFP reads the pipeline's real annotation objects.
"""

import dataclasses
import inspect
from pathlib import Path
from typing import NamedTuple

import pytest
from kfp import dsl, local
from test_feedback_synthesis import KEY, ScriptedTeacher, expected_rows, problems, read_jsonl

from kfp_components.components.synthesis import synthesize_reasoning_data
from kfp_components.feedback.synthesis import RejectionOptions
from kfp_components.feedback.teacher import TeacherOptions
from kfp_components.testing.openai_server import ScriptedChatServer

from conftest import write_jsonl


@pytest.mark.parametrize("key", [KEY, None], ids=["with-key", "keyless"])
def test_the_component_writes_the_dataset_the_unsolved_list_and_the_metrics(
    tmp_path, monkeypatch, capfd, key
):
    """With its key from the (optional) Secret's variable, or keyless (a vLLM without --api-key: the Secret is
    absent, the step says so and asks without a key)."""
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "pipeline_root"))
    if key:
        monkeypatch.setenv("TEACHER_KEY", key)
    else:
        monkeypatch.delenv("TEACHER_KEY", raising=False)
    data = write_jsonl(tmp_path / "problems.jsonl", problems(5))

    class Outputs(NamedTuple):
        dataset: dsl.Dataset
        unsolved: dsl.Dataset
        metrics: dsl.Metrics

    @dsl.pipeline(name="synthesis")
    def pipeline(base_url: str) -> Outputs:
        imported = dsl.importer(artifact_uri=str(data), artifact_class=dsl.Dataset)
        task = synthesize_reasoning_data(
            problems=imported.output,
            teacher_model="teacher",
            teacher_base_url=base_url,
            teacher_token_env="TEACHER_KEY",
            teacher_token_optional=True,
            max_tokens=64,
            chunk_size=2,
            resume_dir=str(tmp_path / "work"),
        )
        return Outputs(task.outputs["dataset"], task.outputs["unsolved"], task.outputs["metrics"])

    with ScriptedChatServer(ScriptedTeacher(), models=("teacher",), api_key=key) as server:
        run = pipeline(base_url=server.base_url)
        sent = {r.headers["authorization"] for r in server.chat_requests}
    assert sent == {f"Bearer {key or 'EMPTY'}"}
    assert read_jsonl(Path(run.outputs["dataset"].path)) == expected_rows(5)
    assert [row["problem"] for row in read_jsonl(Path(run.outputs["unsolved"].path))] == [4]
    metrics = run.outputs["metrics"].metadata
    assert metrics["traces_kept"] == 8 and metrics["problems_without_trace"] == 1 and metrics["requests"] == 5
    assert run.outputs["dataset"].metadata["format"] == "messages"
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [
        "reasoning.jsonl",
        "reasoning.jsonl.done.json",  # a rerun of the step returns at once
        "unsolved.jsonl",
    ]
    captured = capfd.readouterr()
    assert KEY not in captured.out + captured.err
    assert ("TEACHER_KEY is not set (its optional Secret is absent)" in captured.out + captured.err) == (
        not key
    )


def test_the_component_arguments_are_the_options_by_name_and_default():
    """One name and one default per option: the component's arguments are the options' fields (the teacher's
    endpoint fields under teacher_)."""
    arguments = {
        name: parameter.default
        for name, parameter in inspect.signature(synthesize_reasoning_data.python_func).parameters.items()
    }
    renamed = {
        "backend": "teacher_backend",
        "model": "teacher_model",
        "base_url": "teacher_base_url",
        "token_env": "teacher_token_env",
    }
    for options in (TeacherOptions, RejectionOptions):
        for field in dataclasses.fields(options):
            name = renamed.get(field.name, field.name)
            if name not in arguments:
                assert (
                    field.name == "token_secret"
                )  # a TrainJob's: the component's pod gets its env from the task
                continue
            if name != "teacher_model":
                assert arguments[name] == field.default, name
