"""The compiled training pipelines: up to date, consistent parameters, kfp-kubernetes settings in the YAML
(kfp.local ignores them), images and imports of every component, and real runs under kfp.local."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kfp import local

from kfp_components.images import RUNTIME_IMAGE, TRAINER_IMAGE
from kfp_components.testing.tiny_model import tiny_model_path

from conftest import SAMPLES

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("osft", "sft", "dpo", "rl", "rlaif", "cot_distillation")
NAME_RULE = re.compile(r"^phase_(\d\d)_(dataset|synthesis|train|eval|registry)_(man|opt)_[a-z0-9_]+$")


def module(name: str):
    return importlib.import_module(f"kfp_components.pipelines.training.{name}.pipeline")


def compiled(name: str) -> dict:
    """The pipeline spec, with the platform spec (the second YAML document) under ``platforms``."""
    spec, platform = yaml.safe_load_all(
        (ROOT / "pipelines" / "training" / name / "pipeline.yaml").read_text()
    )
    return {**spec, **platform}


@pytest.mark.parametrize("name", NAMES)
def test_committed_yaml_is_up_to_date(tmp_path, monkeypatch, name):
    for variable in ("KFP_COMPONENTS_RUNTIME_IMAGE", "KFP_COMPONENTS_TRAINER_IMAGE"):
        monkeypatch.delenv(variable, raising=False)
    fresh = module(name).compile_pipeline(tmp_path / "pipeline.yaml")
    committed = ROOT / "pipelines" / "training" / name / "pipeline.yaml"
    assert fresh.read_text() == committed.read_text(), f"{committed} is stale: run `make compile`"


def test_python_dash_m_compiles_from_the_repository_root():
    target = ROOT / "pipelines" / "training" / "osft" / "pipeline.yaml"
    before = target.read_text()
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.training.osft.pipeline"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == str(target) and target.read_text() == before


def test_parameters_follow_the_convention_and_mean_the_same_everywhere():
    specs = {name: compiled(name)["root"]["inputDefinitions"]["parameters"] for name in NAMES}
    for name, parameters in specs.items():
        for parameter in parameters:
            assert NAME_RULE.match(parameter), f"{name}: {parameter} breaks phase_NN_<stage>_(man|opt)_<name>"
    shared = set.intersection(*(set(p) for p in specs.values()))
    for parameter in shared:
        kinds = {str(specs[name][parameter].get("parameterType")) for name in NAMES}
        assert len(kinds) == 1, f"{parameter} has different types: {kinds}"
        meanings = {specs[name][parameter]["description"] for name in NAMES}
        assert len(meanings) == 1, f"{parameter} is described differently: {meanings}"
    osft = specs["osft"]
    assert "defaultValue" not in osft["phase_01_dataset_man_data_uri"]
    expected = {
        "phase_02_train_man_train_model": "Qwen/Qwen2.5-1.5B-Instruct",
        "phase_02_train_man_train_batch": 128,
        "phase_02_train_man_train_epochs": 1,
        "phase_02_train_man_train_unfreeze": 0.25,
        "phase_02_train_man_train_tokens": 64000,
        "phase_02_train_man_train_workers": 1,
        "phase_02_train_man_train_gpu": 1,
        "phase_02_train_opt_use_liger": True,
    }
    for parameter, value in expected.items():
        assert osft[parameter]["defaultValue"] == value, parameter
    assert "phase_02_train_man_train_unfreeze" not in specs["sft"]
    assert {"phase_02_train_opt_beta", "phase_02_train_opt_loss_type"} <= set(specs["dpo"])


@pytest.mark.parametrize("name", NAMES)
def test_kubernetes_settings_are_in_the_compiled_yaml(name):
    executors = compiled(name)["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    download = {s["secretName"]: s for s in executors["exec-dataset-download"]["secretAsEnv"]}
    assert download["hf-token"]["keyToEnv"] == [{"envVar": "HF_TOKEN", "secretKey": "HF_TOKEN"}]
    assert {e["envVar"] for e in download["minio-secret"]["keyToEnv"]} == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_S3_ENDPOINT",
    }
    assert all(s["optional"] for s in download.values())
    train = executors["exec-train-model"]
    (mount,) = train["pvcMount"]
    assert mount["mountPath"] == "/workspace"
    assert mount["pvcNameParameter"]["componentInputParameter"] == "phase_02_train_opt_workspace_pvc"
    (kube,) = train["secretAsEnv"]
    assert kube["secretName"] == "kubernetes-credentials" and kube["optional"] is True
    evaluate = executors["exec-evaluate-model"]
    assert {s["secretName"] for s in evaluate["secretAsEnv"]} == {"hf-token", "minio-secret"}
    (mount,) = evaluate["pvcMount"]  # a base model on the workspace volume
    assert mount["pvcNameParameter"]["componentInputParameter"] == "phase_02_train_opt_workspace_pvc"
    text = (ROOT / "pipelines" / "training" / name / "pipeline.yaml").read_text()
    assert "AWS_SECRET_ACCESS_KEY: " not in text.replace("secretKey: AWS_SECRET_ACCESS_KEY", "")


@pytest.mark.parametrize("name", NAMES)
def test_every_component_runs_in_our_image_and_imports_only_what_it_has(name):
    allowed = set(sys.stdlib_module_names) | {"kfp", "kfp_components", "typing_extensions"}
    for executor, spec in compiled(name)["deploymentSpec"]["executors"].items():
        container = spec["container"]
        # evaluation may use GPUs, so it runs in the trainer image (CUDA torch and lm-eval); the rest need no GPU
        expected = TRAINER_IMAGE if executor == "exec-evaluate-model" else RUNTIME_IMAGE
        assert container["image"] == expected, executor
        command = " ".join(container["command"])
        assert "pip install" not in command, f"{executor} installs packages at run time"
        source = container["command"][-1]
        imported = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert imported <= allowed, f"{executor} imports {imported - allowed}"


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_has_a_description_in_the_compiled_yaml(name):
    parameters = compiled(name)["root"]["inputDefinitions"]["parameters"]
    bare = sorted(p for p, spec in parameters.items() if not spec.get("description", "").strip())
    assert not bare, f"{name}: parameters without a description: {bare}"
    signature = inspect.signature(getattr(module(name), f"{name}_pipeline").pipeline_func)
    assert set(parameters) == set(signature.parameters)


@pytest.mark.parametrize("name", NAMES)
def test_network_steps_retry_and_only_training_and_registration_skip_the_cache(name):
    spec = compiled(name)
    tasks = dict(spec["root"]["dag"]["tasks"])
    for condition in [t for t in tasks if t.startswith("condition-")]:
        tasks.update(spec["components"][tasks.pop(condition)["componentRef"]["name"]]["dag"]["tasks"])
    retried = {task for task, body in tasks.items() if body.get("retryPolicy", {}).get("maxRetryCount")}
    expected = {"dataset-download", "evaluate-model", "register-model"}
    if name == "cot_distillation":
        expected.add("synthesize-reasoning-data")
    assert retried == expected
    for task in expected:
        policy = tasks[task]["retryPolicy"]
        assert policy["maxRetryCount"] == 3 and policy["backoffDuration"] == "30s", task
    uncached = {task for task, body in tasks.items() if not body["cachingOptions"].get("enableCache")}
    assert uncached == {"train-model", "register-model"}


@pytest.mark.parametrize("name", NAMES)
def test_registration_runs_only_when_the_promotion_gate_passes(name):
    spec = compiled(name)
    tasks = spec["root"]["dag"]["tasks"]
    assert "register-model" not in tasks, "registration must be inside the gate's condition"
    (condition,) = [body for task, body in tasks.items() if task.startswith("condition-")]
    assert "promotion-gate" in condition["dependentTasks"]
    assert condition["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--promotion-gate-Output'] == true"
    )
    inner = spec["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"register-model"}
    gate = tasks["promotion-gate"]
    assert (
        gate["inputs"]["artifacts"]["eval_metrics"]["taskOutputArtifact"]["producerTask"] == "evaluate-model"
    )
    assert {k: v["componentInputParameter"] for k, v in gate["inputs"]["parameters"].items()} == {
        "enabled": "phase_03_eval_opt_gate",
        "min_task_gain": "phase_03_eval_opt_gate_min_task_gain",
        "min_retention": "phase_03_eval_opt_gate_min_retention",
    }


def test_online_pipelines_get_their_rewards_through_training_options():
    rl = compiled("rl")
    tasks = rl["root"]["dag"]["tasks"]
    train = tasks["train-model"]["inputs"]
    assert train["parameters"]["training_options"]["taskOutputParameter"]["producerTask"] == (
        "online-training-options"
    )
    assert train["parameters"]["algorithm"]["componentInputParameter"] == "phase_02_train_man_train_algorithm"
    assert "eval_dataset" not in train.get("artifacts", {}), "online training reports rewards, no eval loss"
    parameters = rl["root"]["inputDefinitions"]["parameters"]
    assert parameters["phase_02_train_man_train_algorithm"]["defaultValue"] == "grpo"
    assert parameters["phase_02_train_man_train_rewards"]["defaultValue"] == [{"function": "exact_match"}]
    download = tasks["dataset-download"]["inputs"]["parameters"]
    assert download["data_format"]["runtimeValue"]["constant"] == "prompt"
    assert download["train_split_ratio"]["runtimeValue"]["constant"] == 1.0
    rlaif = compiled("rlaif")
    merged = rlaif["root"]["dag"]["tasks"]["online-training-options"]["inputs"]["parameters"]
    assert {k: v.get("componentInputParameter") for k, v in merged.items()} == {
        "training_options": "phase_02_train_opt_training_options",
        "judge_base_url": "phase_02_train_man_judge_url",
        "judge_model": "phase_02_train_man_judge_model",
        "judge_token_secret": "phase_02_train_opt_judge_secret",
    }
    required = {
        p for p, spec in rlaif["root"]["inputDefinitions"]["parameters"].items() if "defaultValue" not in spec
    }
    assert required == {
        "phase_01_dataset_man_data_uri",
        "phase_02_train_man_judge_url",
        "phase_02_train_man_judge_model",
    }


def test_cot_distillation_trains_on_the_teachers_traces_with_its_key_from_a_secret():
    spec = compiled("cot_distillation")
    tasks = spec["root"]["dag"]["tasks"]
    synthesis = tasks["synthesize-reasoning-data"]["inputs"]
    assert synthesis["artifacts"]["problems"]["taskOutputArtifact"]["producerTask"] == "dataset-download"
    assert synthesis["parameters"]["teacher_token_env"]["runtimeValue"]["constant"] == "TEACHER_API_KEY"
    assert synthesis["parameters"]["teacher_token_optional"]["runtimeValue"]["constant"] is True
    assert synthesis["parameters"]["teacher_base_url"]["componentInputParameter"] == (
        "phase_01_synthesis_man_teacher_url"
    )
    trained = tasks["train-model"]["inputs"]
    assert trained["artifacts"]["train_dataset"]["taskOutputArtifact"] == {
        "outputArtifactKey": "dataset",
        "producerTask": "synthesize-reasoning-data",
    }
    assert trained["parameters"]["algorithm"]["runtimeValue"]["constant"] == "sft"
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["phase_03_eval_man_eval_tasks"]["defaultValue"] == ["kfp_reasoning_arithmetic"]
    executors = spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    (secret,) = executors["exec-synthesize-reasoning-data"]["secretAsEnv"]
    assert secret["secretName"] == "teacher-credentials" and secret["optional"] is True
    assert secret["keyToEnv"] == [{"envVar": "TEACHER_API_KEY", "secretKey": "api_key"}]


def test_a_reward_set_twice_fails_at_compile_time_naming_both_parameters(tmp_path):
    from kfp_components.pipelines.training.common import compile_to
    from kfp_components.typed_config import ConfigError

    source = inspect.getsource(module("rl").rl_pipeline.pipeline_func)
    bad = source.replace(
        "phase_02_train_opt_training_options: dict = {}",
        'phase_02_train_opt_training_options: dict = {"reward_functions": ["exact_match"]}',
    ).replace("@with_parameter_docs\n", "")
    assert bad != source
    namespace: dict = {}
    exec(compile(bad, "bad_pipeline.py", "exec", dont_inherit=True), dict(vars(module("rl"))), namespace)
    with pytest.raises(ConfigError) as info:
        compile_to(namespace["rl_pipeline"], str(tmp_path / "rl" / "pipeline.py"))
    assert [path for path, _ in info.value.problems] == [
        "phase_02_train_opt_training_options.reward_functions"
    ]
    assert "phase_02_train_man_train_rewards" in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", ("osft", "sft", "dpo"))
def test_pipeline_runs_under_kfp_local_with_the_local_backend(tmp_path, name):
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    pipeline = getattr(
        importlib.import_module(f"kfp_components.pipelines.training.{name}"), f"{name}_pipeline"
    )
    data = SAMPLES / ("preference.jsonl" if name == "dpo" else "chat.jsonl")
    pipeline(
        phase_01_dataset_man_data_uri=str(data),
        phase_02_train_man_train_model=str(tiny_model_path("qwen2", 0)),
        phase_02_train_man_train_batch=8,
        phase_02_train_man_train_tokens=512,
        phase_02_train_opt_max_seq_len=256,
        phase_02_train_opt_torch_dtype="float32",
        phase_02_train_opt_backend="local",
        phase_02_train_opt_use_liger=False,
        phase_02_train_opt_learning_rate=1e-3,
        phase_03_eval_man_eval_tasks=["kfp_capitals"],
        phase_03_eval_opt_limit=4.0,
        phase_03_eval_opt_batch_size="4",
        # a gate that passes registers (the rl run below has one that fails)
        phase_03_eval_opt_gate=True,
        phase_03_eval_opt_gate_min_task_gain=-1000.0,
        phase_03_eval_opt_gate_min_retention=0.0,
    )
    (run_dir,) = (tmp_path / "root").iterdir()
    model_dir = run_dir / "train-model" / "model"
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer.json").exists()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(model_dir).config.model_type == "qwen2"
    training = json.loads((run_dir / "train-model" / "executor_output.json").read_text())["artifacts"]
    assert training["metrics"]["artifacts"][0]["metadata"]["eval_loss"] > 0, "the eval split is used"
    assert not [p for p in (run_dir / "train-model").iterdir() if p.name.startswith(".train-")], (
        "no copy left"
    )
    assert model_metadata(run_dir)["training_config"]["eval_data_path"], "the eval split reaches the trainer"
    curves = (run_dir / "train-model" / "curves").read_text()
    assert "<h2>Loss</h2>" in curves and "eval_loss" in curves and "<script" not in curves
    assert f"| algorithm | {name} |" in (run_dir / "train-model" / "summary").read_text()
    outputs = json.loads((run_dir / "evaluate-model" / "executor_output.json").read_text())["artifacts"]
    eval_metrics = outputs["metrics"]["artifacts"][0]["metadata"]
    assert {"kfp_capitals_acc", "kfp_capitals_acc_retention", "mean_retention"} <= set(eval_metrics)
    assert (run_dir / "evaluate-model" / "results" / "summary.html").exists()
    gate = gate_metrics(run_dir)
    assert (gate["gate_enabled"], gate["gate_passed"]) == (1.0, 1.0) and gate["gate_reason"].startswith(
        "passed"
    )
    provenance = json.loads((run_dir / "register-model" / "provenance" / "provenance.json").read_text())
    assert provenance["training"]["algorithm"] == name and len(provenance["dataset"]["sha256"]) == 64
    assert provenance["metrics"]["eval"]["mean_retention"] == eval_metrics["mean_retention"]


def gate_metrics(run_dir: Path) -> dict:
    gate = json.loads((run_dir / "promotion-gate" / "executor_output.json").read_text())
    return gate["artifacts"]["metrics"]["artifacts"][0]["metadata"]


def model_metadata(run_dir: Path) -> dict:
    outputs = json.loads((run_dir / "train-model" / "executor_output.json").read_text())["artifacts"]
    return outputs["model"]["artifacts"][0]["metadata"]


def test_parameter_docs_are_generated_from_the_pipelines(monkeypatch):
    from kfp_components.pipelines import docs

    monkeypatch.delenv("KFP_COMPONENTS_TRAINER_IMAGE", raising=False)
    text = (ROOT / "docs" / "pipelines.md").read_text()
    assert docs.updated(text) == text, "docs/pipelines.md is stale: run `make compile`"
    assert "| `phase_02_train_man_train_unfreeze` | float | `0.25` |" in text


def test_a_bad_default_fails_at_compile_time_naming_the_parameter(tmp_path):
    from kfp import dsl

    from kfp_components.pipelines.training.common import add_stages, compile_to
    from kfp_components.typed_config import ConfigError

    source = inspect.getsource(module("sft").sft_pipeline.pipeline_func)
    namespace: dict = {}
    bad = source.replace(
        'phase_02_train_opt_lr_scheduler: str = "cosine"', 'phase_02_train_opt_lr_scheduler: str = "cosin"'
    )
    bad = bad.replace(
        "phase_02_train_opt_training_options: dict = {}",
        'phase_02_train_opt_training_options: dict = {"adam_beta": 0.9}',
    )
    exec(
        compile(bad, "bad_pipeline.py", "exec", dont_inherit=True),
        {**vars(module("sft")), "dsl": dsl, "add_stages": add_stages},
        namespace,
    )
    with pytest.raises(ConfigError) as info:
        compile_to(namespace["sft_pipeline"], str(tmp_path / "pipeline.py"))
    assert [path for path, _ in info.value.problems] == [
        "phase_02_train_opt_training_options.adam_beta",
        "phase_02_train_opt_lr_scheduler",
    ]
    assert not (tmp_path / "pipeline.yaml").exists()


def tiny_cpu_run(**options: object) -> dict[str, object]:
    """A pipeline's training and evaluation arguments for the tiny model on this CPU, with ``options``."""
    return {
        "phase_02_train_man_train_model": str(tiny_model_path("qwen2", 0)),
        "phase_02_train_man_train_batch": 4,
        "phase_02_train_opt_torch_dtype": "float32",
        "phase_02_train_opt_backend": "local",
        "phase_02_train_opt_use_liger": False,
        "phase_03_eval_opt_limit": 2.0,
        "phase_03_eval_opt_batch_size": "2",
        **options,
    }


#: One online step (two 8-token generations per prompt), evaluated on kfp_capitals.
ONE_ONLINE_STEP: dict[str, object] = {
    "phase_02_train_man_train_tokens": 256,
    "phase_02_train_opt_max_steps": 1,
    "phase_02_train_opt_max_seq_len": 128,
    "phase_02_train_opt_training_options": {"num_generations": 2, "max_new_tokens": 8},
    "phase_03_eval_man_eval_tasks": ["kfp_capitals"],
}


@pytest.mark.slow
def test_rl_pipeline_runs_under_kfp_local_and_a_gate_that_fails_skips_registration(tmp_path):
    """GRPO on a tiny model with the exact_match reward; a gate that cannot pass skips registration and says
    why in its metrics (a gate that passes registers: the osft, sft and dpo runs above)."""
    from kfp_components.pipelines.training.rl import rl_pipeline

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    rl_pipeline(
        phase_01_dataset_man_data_uri=str(SAMPLES / "prompts.jsonl"),
        phase_01_dataset_opt_subset_size=8,
        **tiny_cpu_run(
            **ONE_ONLINE_STEP,
            phase_03_eval_opt_gate=True,
            phase_03_eval_opt_gate_min_task_gain=-1000.0,
            phase_03_eval_opt_gate_min_retention=1000.0,
        ),
    )
    (run_dir,) = (tmp_path / "root").iterdir()
    model = model_metadata(run_dir)["training_config"]
    assert model["algorithm"] == "grpo" and model["reward_functions"] == [{"function": "exact_match"}]
    metrics = gate_metrics(run_dir)
    assert metrics["gate_passed"] == 0.0 and metrics["gate_reason"].startswith("failed: mean retention")
    assert not (run_dir / "register-model").exists()


JUDGE_KEY = "sk-test-judge-0123456789abcdef"
TEACHER_KEY = "sk-test-teacher-0123456789abcdef"
REASONING_PROBLEMS = ROOT / "examples" / "reasoning_problems.jsonl"
ANSWERS = {
    row["prompt"]: row["answer"]
    for row in map(json.loads, REASONING_PROBLEMS.read_text(encoding="utf-8").splitlines())
}


def scripted_judge(messages, body) -> str:
    """A score from 1 to 10: 1 + the words of the response."""
    response = re.search(r"\[(?:Response|Answer)\]\n(.*?)\n\nScore:", messages[-1]["content"], re.S)
    assert response, "a pointwise judge request"
    return f"{min(10, 1 + len(response.group(1).split()))}"


def scripted_teacher(messages, body) -> str:
    """A step-by-step solution of a bundled problem, ending "#### <its answer>"."""
    return f"Read the problem.\nWork through each step.\n#### {ANSWERS[messages[-1]['content']]}"


@pytest.mark.slow
def test_rlaif_pipeline_runs_under_kfp_local_against_a_judge_endpoint(tmp_path, monkeypatch, capfd):
    """GRPO on a tiny model whose only reward is an endpoint judge's score: the training step sends the key
    from its environment with every request, the judge's scores are the training reward, the key is in no
    artifact or log, and the model is evaluated and registered."""
    from kfp_components.pipelines.training.rlaif import rlaif_pipeline
    from kfp_components.testing.openai_server import ScriptedChatServer

    monkeypatch.setenv("JUDGE_API_KEY", JUDGE_KEY)  # kfp.local ignores the Secret; the steps inherit this
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    with ScriptedChatServer(scripted_judge, models=("judge",), api_key=JUDGE_KEY) as judge:
        rlaif_pipeline(
            phase_01_dataset_man_data_uri=str(SAMPLES / "prompts.jsonl"),
            phase_01_dataset_opt_subset_size=8,
            phase_02_train_man_judge_url=judge.base_url,
            phase_02_train_man_judge_model="judge",
            **tiny_cpu_run(**ONE_ONLINE_STEP),
        )
        requests = judge.chat_requests
    assert requests and {r.headers["authorization"] for r in requests} == {f"Bearer {JUDGE_KEY}"}
    (run_dir,) = (tmp_path / "root").iterdir()
    (judged,) = model_metadata(run_dir)["training_config"]["reward_functions"]
    assert judged["function"] == "judge" and judged["base_url"] == judge.base_url
    assert judged["token_env"] == "JUDGE_API_KEY"
    training = json.loads((run_dir / "train-model" / "executor_output.json").read_text())["artifacts"]
    metrics = training["metrics"]["artifacts"][0]["metadata"]
    assert 1.0 <= metrics["reward/judge/mean"] <= 10.0 and metrics["reward"] == metrics["reward/judge/mean"]
    assert "reward" in (run_dir / "train-model" / "curves").read_text()
    provenance = json.loads((run_dir / "register-model" / "provenance" / "provenance.json").read_text())
    assert provenance["training"]["algorithm"] == "grpo"
    written = "".join(p.read_text(errors="replace") for p in run_dir.rglob("*") if p.is_file())
    captured = capfd.readouterr()
    assert JUDGE_KEY not in written + captured.out + captured.err


@pytest.mark.slow
def test_cot_distillation_pipeline_runs_under_kfp_local_against_a_teacher_endpoint(
    tmp_path, monkeypatch, capfd
):
    """The teacher writes a solution for each bundled problem, every one reaches the reference answer, the
    student trains on them with sft and is evaluated on the reasoning task against the base model. (Without
    the optional Secret, a keyless vLLM: the synthesis component's own test.)"""
    from kfp_components.pipelines.training.cot_distillation import cot_distillation_pipeline
    from kfp_components.testing.openai_server import ScriptedChatServer

    teacher_key = TEACHER_KEY
    monkeypatch.setenv("TEACHER_API_KEY", teacher_key)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    with ScriptedChatServer(scripted_teacher, models=("teacher",), api_key=teacher_key) as teacher:
        cot_distillation_pipeline(
            phase_01_dataset_man_data_uri=str(REASONING_PROBLEMS),
            phase_01_dataset_opt_subset_size=8,
            phase_01_synthesis_man_teacher_url=teacher.base_url,
            phase_01_synthesis_man_teacher_model="teacher",
            phase_01_synthesis_opt_num_samples=2,
            **tiny_cpu_run(
                phase_02_train_man_train_tokens=512,
                phase_02_train_opt_max_steps=2,
                phase_02_train_opt_max_seq_len=256,
            ),
        )
        requests = teacher.chat_requests
    assert requests and {r.headers["authorization"] for r in requests} == {f"Bearer {teacher_key}"}
    (run_dir,) = (tmp_path / "root").iterdir()
    synthesis = json.loads((run_dir / "synthesize-reasoning-data" / "executor_output.json").read_text())
    counts = synthesis["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert counts["problems"] >= 6 and counts["traces_kept"] == counts["problems"] == len(requests)
    assert counts["verified_share"] == 1.0 and counts["problems_without_trace"] == 0
    traces = [json.loads(line) for line in (run_dir / "synthesize-reasoning-data" / "dataset").open()]
    for row in traces:
        user, assistant = (m["content"] for m in row["messages"][-2:])
        assert assistant.endswith(f"#### {ANSWERS[user]}")
    config = model_metadata(run_dir)["training_config"]
    assert config["algorithm"] == "sft" and config["data_path"].endswith("synthesize-reasoning-data/dataset")
    evaluated = json.loads((run_dir / "evaluate-model" / "executor_output.json").read_text())["artifacts"]
    scores = evaluated["metrics"]["artifacts"][0]["metadata"]
    assert any(k.startswith("kfp_reasoning_arithmetic") and k.endswith("_retention") for k in scores)
    provenance = json.loads((run_dir / "register-model" / "provenance" / "provenance.json").read_text())
    assert provenance["training"]["algorithm"] == "sft"
    captured = capfd.readouterr()
    assert teacher_key not in captured.out + captured.err
