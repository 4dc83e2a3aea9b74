"""Evaluation with lm-eval: the bundled offline tasks on tiny models, flat metrics, files, errors, component."""

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from kfp_components.evaluation import (
    EvalConfig,
    ModelNotFoundError,
    TaskDataError,
    UnknownTaskError,
    flatten_results,
    run_evaluation,
    runner,
    to_jsonable,
)
from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.typed_config import ConfigError, from_dict

TASKS = ["kfp_capitals", "kfp_arithmetic"]


def config(tmp_path: Path, **overrides: Any) -> EvalConfig:
    data = {
        "model_path": str(tiny_model_path("qwen2", 0)),
        "tasks": TASKS,
        "limit": 3,
        "batch_size": 4,
        "device": "cpu",
        "torch_dtype": "float32",
        "bootstrap_iters": 100,
        "output_dir": str(tmp_path / "out"),
    }
    return from_dict(EvalConfig, {**data, **overrides})


@pytest.fixture
def spy(monkeypatch):
    """Replace lm_eval.simple_evaluate and the data check; record the call and return canned results."""
    import lm_eval

    calls: list[dict[str, Any]] = []

    def fake(**kwargs: Any) -> dict[str, Any]:
        calls.append(kwargs)
        task = kwargs["tasks"][0]
        return {
            "results": {
                task: {"alias": task, "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25}
            },
            "higher_is_better": {task: {"acc": True, "acc_norm": True}},
        }

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake)
    monkeypatch.setattr(runner, "check_task_data", lambda manager, tasks: None)
    return calls


def test_bundled_tasks_end_to_end(tmp_path):
    result = run_evaluation(config(tmp_path, log_samples=True))

    expected = {
        "kfp_capitals_acc",
        "kfp_capitals_acc_stderr",
        "kfp_capitals_acc_norm",
        "kfp_capitals_acc_norm_stderr",
        "kfp_arithmetic_exact_match_strip",
        "kfp_arithmetic_exact_match_strip_stderr",
        "chat_template_applied",
    }
    assert set(result.metrics) == expected
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
    # The tiny qwen2 tokenizer has a chat template, so the automatic choice applies it, and says so.
    assert result.apply_chat_template is True and result.metrics["chat_template_applied"] == 1.0
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved["evaluation"]["apply_chat_template"] is True
    assert saved["evaluation"]["chat_template_choice"] == "automatic"
    assert saved["results"]["kfp_capitals"]["acc,none"] == result.metrics["kfp_capitals_acc"]
    assert "samples" not in saved
    samples = (out / "samples_kfp_capitals.jsonl").read_text().splitlines()
    assert len(samples) == 3 and "doc" in json.loads(samples[0])
    assert (out / "samples_kfp_arithmetic.jsonl").exists()
    markdown = (out / "summary.md").read_text()
    assert "| kfp_capitals | acc_norm |" in markdown and "exact_match (strip)" in markdown
    html = (out / "summary.html").read_text()
    assert "<table>" in html and '<td class="t">kfp_arithmetic</td>' in html


def test_base_model_deltas_and_retention(tmp_path):
    result = run_evaluation(
        config(
            tmp_path,
            tasks=["kfp_capitals"],
            limit=4,
            base_model_name_or_path=str(tiny_model_path("qwen2", 1)),
            apply_chat_template=False,
        )
    )
    m = result.metrics
    assert result.apply_chat_template is False and m["chat_template_applied"] == 0.0
    for name in ("kfp_capitals_acc", "kfp_capitals_acc_norm"):
        assert m[f"{name}_delta"] == pytest.approx(m[name] - m[f"base_{name}"])
        if m[f"base_{name}"]:
            assert m[f"{name}_retention"] == pytest.approx(m[name] / m[f"base_{name}"])
    assert "| Base | Delta | Retention |" in result.summary_markdown
    assert (tmp_path / "out" / "summary.html").read_text().count("<th>") == 7
    assert json.loads(result.results_path.read_text())["base_results"]["results"]["kfp_capitals"]


def test_retention_on_canned_results():
    from kfp_components.evaluation import compare

    tuned = {"results": {"t": {"acc,none": 0.6, "ppl,none": 12.0}}, "higher_is_better": {"t": {"ppl": False}}}
    base = {"results": {"t": {"acc,none": 0.8, "ppl,none": 10.0}}, "higher_is_better": {"t": {"ppl": False}}}
    flat = compare(tuned, base)
    assert flat["t_acc_delta"] == pytest.approx(-0.2)
    assert flat["t_acc_retention"] == pytest.approx(0.75)
    assert flat["t_ppl_retention"] == pytest.approx(10 / 12)  # lower is better: inverted
    assert flat["mean_retention"] == pytest.approx((0.75 + 10 / 12) / 2)


def test_flatten_names_and_json_safety():
    import numpy as np

    results = {
        "results": {
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": np.float64(0.5),
                "exact_match_stderr,strict-match": 0.01,
                "exact_match,flexible-extract": 0.6,
                "exact_match_stderr,flexible-extract": "N/A",
                "sample_len": 10,
            }
        },
        "groups": {"mmlu": {"acc,none": 0.3, "acc_stderr,none": 0.02}},
    }
    assert flatten_results(results) == {
        "gsm8k_exact_match_strict_match": 0.5,
        "gsm8k_exact_match_strict_match_stderr": 0.01,
        "gsm8k_exact_match_flexible_extract": 0.6,
        "mmlu_acc": 0.3,
        "mmlu_acc_stderr": 0.02,
    }
    odd = {"a": np.int64(3), "b": np.array([1.5]), "c": {1, 2}, "d": np.float32, "e": float("nan"), "f": len}
    assert json.loads(json.dumps(to_jsonable(odd)))["a"] == 3


def test_task_names_and_gen_kwargs_reach_simple_evaluate(tmp_path, spy):
    result = run_evaluation(
        config(
            tmp_path, tasks=["arc_easy"], gen_kwargs={"max_gen_toks": 7, "temperature": 0.0}, num_fewshot=2
        )
    )
    (call,) = spy
    assert call["tasks"] == ["arc_easy"]
    assert call["gen_kwargs"] == {"max_gen_toks": 7, "temperature": 0.0}
    assert call["num_fewshot"] == 2 and call["limit"] == 3 and call["model"] == "hf"
    assert call["model_args"] == f"pretrained={tiny_model_path('qwen2', 0)},dtype=float32"
    assert call["apply_chat_template"] is True and call["fewshot_as_multiturn"] is True
    assert result.metrics == {
        "arc_easy_acc": 0.5,
        "arc_easy_acc_stderr": 0.1,
        "arc_easy_acc_norm": 0.25,
        "chat_template_applied": 1.0,
    }


def test_unknown_task_fails_before_the_model_loads(tmp_path, spy):
    with pytest.raises(UnknownTaskError, match=r"'arc_easyy': did you mean: arc_easy"):
        run_evaluation(config(tmp_path, tasks=["kfp_capitals", "arc_easyy"]))
    assert spy == []


def test_offline_hub_task_names_the_task(tmp_path, monkeypatch):
    import lm_eval

    monkeypatch.setattr(lm_eval, "simple_evaluate", pytest.fail)
    with pytest.raises(TaskDataError, match=r"task 'arc_easy': its data could not be downloaded"):
        run_evaluation(config(tmp_path, tasks=["arc_easy"]))


# ------------------------------------------------------------------------------------------------------
# Models as a cluster has them: pvc:// claims, the workspace volume, s3:// prefixes
# ------------------------------------------------------------------------------------------------------
BASE_SETTINGS = {"tasks": ["kfp_capitals"], "limit": 4, "apply_chat_template": False}


def copy_model(seed: int, target: Path) -> Path:
    shutil.copytree(tiny_model_path("qwen2", seed), target)
    return target


def upload_model(s3, seed: int, bucket: str, prefix: str) -> None:
    client = s3.client()
    client.create_bucket(Bucket=bucket)
    folder = tiny_model_path("qwen2", seed)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")


@pytest.fixture(scope="module")
def base_scores(tmp_path_factory) -> dict[str, float]:
    """The base model's scores when evaluated from its own folder, to compare the other sources with."""
    out = tmp_path_factory.mktemp("direct")
    metrics = run_evaluation(
        config(out, model_path=str(tiny_model_path("qwen2", 1)), **BASE_SETTINGS)
    ).metrics
    return {k: v for k, v in metrics.items() if k.startswith("kfp_capitals_") and not k.endswith("_stderr")}


@pytest.mark.parametrize("where", ["pvc", "s3"])
def test_base_model_from_a_claim_or_s3_scores_like_its_folder(
    where, tmp_path, monkeypatch, request, base_scores
):
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    if where == "pvc":
        monkeypatch.setenv("KFP_COMPONENTS_PVC_ROOT", str(tmp_path / "mnt"))
        copy_model(1, tmp_path / "mnt" / "base-models" / "qwen2-tiny")
        base = "pvc://base-models/qwen2-tiny"
    else:
        upload_model(request.getfixturevalue("s3_env"), 1, "models", "base/qwen2-tiny")
        base = "s3://models/base/qwen2-tiny"
    result = run_evaluation(config(tmp_path, base_model_name_or_path=base, **BASE_SETTINGS))
    assert {name: result.metrics[f"base_{name}"] for name in base_scores} == base_scores
    saved = json.loads(result.results_path.read_text())
    assert saved["evaluation"]["config"]["base_model_name_or_path"] == base
    assert list(scratch.iterdir()) == [], "the downloaded checkpoint is removed afterwards"


def test_workspace_claim_is_read_where_it_is_mounted(tmp_path, spy, monkeypatch):
    workspace = tmp_path / "workspace"
    final = copy_model(0, workspace / "runs" / "r1" / "train-sft" / "final")
    monkeypatch.setenv("KFP_COMPONENTS_PVC_ROOT", str(tmp_path / "mnt"))
    base = copy_model(1, tmp_path / "mnt" / "models" / "base")
    run_evaluation(
        config(
            tmp_path,
            model_path="pvc://workspace-pvc/runs/r1/train-sft/final",
            base_model_name_or_path="pvc://models/base",
            workspace_pvc="workspace-pvc",
            workspace_path=str(workspace),
        )
    )
    assert [call["model_args"].split(",")[0] for call in spy] == [f"pretrained={final}", f"pretrained={base}"]


@pytest.mark.parametrize(
    ("base", "message"),
    [
        (
            "pvc://not-mounted/base",
            r"base_model_name_or_path 'pvc://not-mounted/base': claim 'not-mounted' is not mounted at",
        ),
        ("pvc://Bad_Claim/base", r"'Bad_Claim' is not a valid PersistentVolumeClaim name"),
        ("pvc://models/../etc", r"'\.\.' is not allowed"),
        ("/no/such/model", r"base_model_name_or_path '/no/such/model': no such folder"),
        ("hf://Qwen/Qwen2.5-0.5B", r"unsupported scheme 'hf://'.*Hugging Face id \(org/name\)"),
        (
            "no-such-org/no-such-model",
            r"'no-such-org/no-such-model' is not a folder here, and the Hugging Face Hub",
        ),
        ("s3://Bad_Bucket/base", r"'Bad_Bucket' is not a valid S3 bucket name"),
    ],
)
def test_missing_base_model_fails_naming_the_option_before_lm_eval(tmp_path, spy, monkeypatch, base, message):
    monkeypatch.setenv("KFP_COMPONENTS_PVC_ROOT", str(tmp_path / "mnt"))
    (tmp_path / "mnt" / "models").mkdir(parents=True)
    with pytest.raises(ModelNotFoundError, match=message):
        run_evaluation(config(tmp_path, base_model_name_or_path=base))
    assert spy == []
    assert not (tmp_path / "out").exists(), "nothing is written before the models are found"


def test_folder_that_is_not_a_checkpoint_is_refused(tmp_path, spy):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"")
    with pytest.raises(
        ModelNotFoundError,
        match=r"model_path .* is not a Hugging Face checkpoint folder: it has no config.json",
    ):
        run_evaluation(config(tmp_path, model_path=str(tmp_path / "weights")))
    assert spy == []


def test_s3_prefix_without_a_checkpoint_or_credentials_is_refused(tmp_path, spy, s3_env, monkeypatch):
    client = s3_env.client()
    client.create_bucket(Bucket="empty-models")
    client.put_object(Bucket="empty-models", Key="base/README.md", Body=b"no weights here")
    with pytest.raises(
        ModelNotFoundError, match=r"'s3://empty-models/base': found 1 object\(s\) but no config.json"
    ):
        run_evaluation(config(tmp_path, base_model_name_or_path="s3://empty-models/base"))
    with pytest.raises(
        ModelNotFoundError, match=r"'s3://empty-models/other': found nothing under that prefix"
    ):
        run_evaluation(config(tmp_path, base_model_name_or_path="s3://empty-models/other"))
    with pytest.raises(ModelNotFoundError, match=r"'s3://no-such-bucket/base': S3 said NoSuchBucket"):
        run_evaluation(config(tmp_path, base_model_name_or_path="s3://no-such-bucket/base"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(
        ModelNotFoundError, match=r"base_model_name_or_path 's3://empty-models/base': no S3 credentials"
    ):
        run_evaluation(config(tmp_path, base_model_name_or_path="s3://empty-models/base"))
    assert spy == []


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        config(tmp_path, batch_size="big")
    with pytest.raises(ConfigError, match="backend"):
        config(tmp_path, backend="tgi")
    with pytest.raises(ConfigError, match="tasks"):
        config(tmp_path, tasks=[])
    try:
        import importlib.util

        import torch

        usable = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        usable = False
    if not usable:
        with pytest.raises(ConfigError, match="vllm"):
            run_evaluation(config(tmp_path, backend="vllm"))


def test_component_under_kfp_local(tmp_path):
    from kfp import dsl, local

    from kfp_components.components.evaluation import evaluate_model

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    model_dir = str(tiny_model_path("qwen2", 0))
    workspace = tmp_path / "workspace"
    copy_model(1, workspace / "models" / "base")

    @dsl.pipeline
    def eval_pipeline() -> dsl.Metrics:
        imported = dsl.importer(artifact_uri=model_dir, artifact_class=dsl.Model, reimport=False)
        task = evaluate_model(
            model=imported.output,
            tasks=["kfp_smoke"],
            limit=2.0,
            batch_size="2",
            device="cpu",
            torch_dtype="float32",
            base_model_name_or_path="pvc://workspace-pvc/models/base",
            workspace_pvc="workspace-pvc",
            workspace_path=str(workspace),
        )
        return task.outputs["metrics"]

    run = eval_pipeline()
    metrics = run.output.metadata
    assert {"kfp_capitals_acc", "kfp_arithmetic_exact_match_strip", "chat_template_applied"} <= set(metrics)
    assert {"base_kfp_capitals_acc", "kfp_capitals_acc_delta"} <= set(metrics)
    assert list((tmp_path / "root").rglob("results.json"))
    assert list((tmp_path / "root").rglob("summary.html"))


def test_the_reasoning_task_reads_answers_as_gsm8k_does(tmp_path):
    """kfp_reasoning_arithmetic runs offline on a tiny model; its filters score a worked solution ending in
    "#### N" as right (strict and flexible) and a wrong last number as wrong."""
    result = run_evaluation(config(tmp_path, tasks=["kfp_reasoning_arithmetic"], limit=2))
    assert {
        "kfp_reasoning_arithmetic_exact_match_strict_match",
        "kfp_reasoning_arithmetic_exact_match_flexible_extract",
    } <= set(result.metrics)
    from lm_eval.tasks import TaskManager

    from kfp_components.evaluation.tasks import TASKS_DIR

    task = TaskManager(include_path=str(TASKS_DIR)).load_task_or_group(["kfp_reasoning_arithmetic"])
    task = task["kfp_reasoning_arithmetic"]
    doc = next(iter(task.test_docs()))
    assert doc["solution"].endswith(f"#### {doc['answer']}")

    def filtered(ensemble: Any, text: str) -> Any:
        responses: Any = [[text]]
        for step in ensemble.filters:
            responses = list(step().apply(responses, [doc]))
        return responses[0]

    for ensemble in task._filters:
        right = filtered(ensemble, doc["solution"])
        assert right == doc["answer"], (ensemble.name, right)
        assert filtered(ensemble, "It is 999999.") != doc["answer"]


def test_summary_shows_tuned_against_base_with_retention():
    from kfp_components.evaluation.report import html_summary, markdown_summary, summary_rows

    tuned = {"results": {"t": {"acc,none": 0.6, "ppl,none": 8.0}}, "higher_is_better": {"t": {"ppl": False}}}
    base = {"results": {"t": {"acc,none": 0.8, "ppl,none": 10.0}}, "higher_is_better": {"t": {"ppl": False}}}
    rows = summary_rows(tuned, base)
    markdown = markdown_summary(rows, {"model": "m"}, mean_retention=(0.75 + 1.25) / 2)
    assert "| Task | Metric | Tuned | Stderr | Base | Delta | Retention |" in markdown
    assert "| t | acc | 0.6000 |  | 0.8000 | -0.2000 | 0.7500 |" in markdown
    assert "| t | ppl | 8.0000 |  | 10.0000 | -2.0000 | 1.2500 |" in markdown
    assert "- **mean retention**: 1.0000 (1 of 2 scores at or above the base model's)" in markdown
    assert "<b>mean retention</b>: 1.0000 (1 of 2 scores" in html_summary(rows, {}, 1.0)
    alone = markdown_summary(summary_rows(tuned), {})
    assert "| Task | Metric | Value | Stderr |" in alone and "retention" not in alone
