"""A multi-stage YAML compiled into a Kubeflow pipeline: the steps and their wiring in the compiled YAML, the
stage options checked at compile time with the CLI's key paths, stages that cannot be compiled named, and
chains that run end to end under kfp.local with the local backend (sft -> dpo; sft -> reward_model -> rl, an online stage)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kfp import local

from kfp_components.orchestration.cli import main
from kfp_components.orchestration.kfp_compile import chain_pipeline, compile_chain
from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.typed_config import ConfigError

from conftest import SAMPLES

ROOT = Path(__file__).resolve().parents[1]
SFT_DPO = ROOT / "examples" / "multistage" / "sft_dpo.yaml"
SMALL = {
    "max_steps": 2,
    "effective_batch_size": 4,
    "max_tokens_per_gpu": 512,
    "max_seq_len": 256,
    "use_liger": False,
}


def overrides(names: tuple[str, ...], **extra: object) -> dict[str, object]:
    values: dict[str, object] = {
        "model_name_or_path": str(tiny_model_path("qwen2", 0)),
        "torch_dtype": "float32",
    }
    for stage in names:
        values.update({f"stage_configs.{stage}.{k}": v for k, v in SMALL.items()})
    values.update(extra)
    return values


RLAIF = {
    "dataset_name_or_path": str(ROOT / "examples" / "arithmetic_prompts.jsonl"),
    "judge": {
        "base_url": "http://judge.models.svc:8000/v1",
        "model": "judge",
        "token_env": "JUDGE_API_KEY",
        "token_secret": "judge-credentials",
    },
    "num_generations": 2,
}
COT = {
    "reasoning_dataset_path": str(ROOT / "examples" / "reasoning_problems.jsonl"),
    "teacher_model_path": "gpt-4",
    "teacher": {
        "base_url": "https://api.example.com/v1",
        "token_env": "TEACHER_API_KEY",
        "token_secret": "teacher-credentials/api_key",
        "num_samples": 2,
    },
}
LOCAL_DATA = {
    "stage_configs.sft.dataset_name_or_path": str(SAMPLES / "chat.jsonl"),
    "stage_configs.sft.dataset_split": "",
    "stage_configs.sft.dataset_subset_size": 0,
    "stage_configs.dpo.dataset_name_or_path": str(SAMPLES / "preference.jsonl"),
}


def tasks_of(compiled: dict) -> dict:
    return compiled["root"]["dag"]["tasks"]


def test_the_compiled_chain_has_a_step_per_dataset_and_stage_wired_model_to_model(tmp_path):
    out = compile_chain(SFT_DPO, tmp_path / "chain.yaml", overrides(("sft", "dpo")), eval_tasks=["arc_easy"])
    compiled = next(yaml.safe_load_all(out.read_text()))
    tasks = tasks_of(compiled)
    names = {task["taskInfo"]["name"] for task in tasks.values()}
    assert names == {
        "dataset: ultrachat_200k",
        "dataset: truthy-dpo-v0.1",
        "sft (sft)",
        "dpo (dpo)",
        "evaluate: final vs base",
    }
    dpo = next(t for t in tasks.values() if t["taskInfo"]["name"] == "dpo (dpo)")
    sft_key = next(k for k, t in tasks.items() if t["taskInfo"]["name"] == "sft (sft)")
    base = dpo["inputs"]["artifacts"]["base_model"]["taskOutputArtifact"]
    assert (base["producerTask"], base["outputArtifactKey"]) == (sft_key, "model")
    parameters = dpo["inputs"]["parameters"]
    assert parameters["algorithm"]["runtimeValue"]["constant"] == "dpo"
    assert parameters["beta"]["runtimeValue"]["constant"] == 0.1
    assert parameters["learning_rate"]["runtimeValue"]["constant"] == 5e-7
    assert parameters["stage_name"]["runtimeValue"]["constant"] == "stage-dpo"
    assert parameters["lr_scheduler"]["runtimeValue"]["constant"] == "linear"
    assert parameters["training_options"]["runtimeValue"]["constant"] == {}  # every other option: the default
    for parameter in compiled["root"]["inputDefinitions"]["parameters"].values():
        assert parameter["description"]
    assert tasks[sft_key]["cachingOptions"] == {}  # caching off: a rerun trains again


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stage_configs.dpo.beta": "high"}, r"stage_configs\.dpo\.beta: expected a float"),
        (
            {
                "stages": ["sft", "dpo", "rlaif"],
                "stage_configs.sft.enabled": False,
                "stage_configs.dpo.enabled": False,
                "stage_configs.rlaif": {**RLAIF, "mode": "preference_data"},
            },
            r"stages: every stage is an rlaif stage in mode preference_data: the chain would train nothing",
        ),
    ],
)
def test_bad_chains_are_refused_at_compile_time_with_the_key_path(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        chain_pipeline(SFT_DPO, overrides(("sft", "dpo"), **change))


def test_the_cli_compiles(tmp_path, capsys):
    out = tmp_path / "chain.yaml"
    flags = [
        "--config",
        str(SFT_DPO),
        "--compile",
        str(out),
        "--model_name_or_path",
        str(tiny_model_path("qwen2", 0)),
    ]
    assert main(flags) == 0 and "compiled:" in capsys.readouterr().out
    assert next(yaml.safe_load_all(out.read_text()))["pipelineInfo"]["name"] == "chain-sft-dpo"
    assert main(["--config", str(SFT_DPO), "--eval_tasks", "arc_easy"]) == 2


def run_chain(tmp_path: Path, config: Path, values: dict) -> Path:
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    chain_pipeline(config, values)(backend="local")
    (run_dir,) = (tmp_path / "root").iterdir()
    return run_dir


def training_config_of(run_dir: Path, task: str) -> dict:
    outputs = json.loads((run_dir / task / "executor_output.json").read_text())["artifacts"]
    return outputs["model"]["artifacts"][0]["metadata"]["training_config"]


@pytest.mark.slow
def test_sft_then_dpo_runs_under_kfp_local(tmp_path):
    run_dir = run_chain(tmp_path, SFT_DPO, overrides(("sft", "dpo"), **LOCAL_DATA))
    sft, dpo = training_config_of(run_dir, "train-model"), training_config_of(run_dir, "train-model-2")
    assert (sft["algorithm"], dpo["algorithm"], dpo["beta"]) == ("sft", "dpo", 0.1)
    assert dpo["model_name_or_path"] == str(run_dir / "train-model" / "model")  # the SFT model
    assert (run_dir / "train-model-2" / "model" / "model.safetensors").is_file()


def test_the_committed_chain_example_is_current(tmp_path):
    from kfp_components.pipelines.compile_all import CHAINS

    for source, target in CHAINS.items():
        fresh = compile_chain(ROOT / source, tmp_path / "fresh.yaml")
        committed = ROOT / "pipelines" / target
        assert committed.read_text() == fresh.read_text(), f"{committed} is stale: run make compile"


def test_cot_distillation_and_rlaif_compile_to_their_steps(tmp_path):
    """cot_distillation: a synthesis step (the teacher's key from its Secret) feeds the student's training
    step; rlaif direct: the judge is the training step's last reward, its key the workers' Secret."""
    config = {
        "model_name_or_path": str(tiny_model_path("qwen2", 0)),
        "output_dir": str(tmp_path / "unused"),
        "stages": ["sft", "cot_distillation", "rlaif"],
        "stage_configs": {
            "sft": {"dataset_name_or_path": str(SAMPLES / "chat.jsonl")},
            "cot_distillation": COT,
            "rlaif": RLAIF,
        },
    }
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(config))
    out = compile_chain(path, tmp_path / "out.yaml")
    documents = list(yaml.safe_load_all(out.read_text()))
    tasks = tasks_of(documents[0])
    by_name = {task["taskInfo"]["name"]: (key, task) for key, task in tasks.items()}
    synthesis_key, synthesis = by_name["cot_distillation: teacher traces"]
    assert synthesis["inputs"]["parameters"]["teacher_model"]["runtimeValue"]["constant"] == "gpt-4"
    _, student = by_name["cot_distillation (sft)"]
    source = student["inputs"]["artifacts"]["train_dataset"]["taskOutputArtifact"]
    assert (source["producerTask"], source["outputArtifactKey"]) == (synthesis_key, "dataset")
    _, rlaif = by_name["rlaif (ppo)"]
    judge = rlaif["inputs"]["parameters"]["training_options"]["runtimeValue"]["constant"]["reward_functions"][
        -1
    ]
    assert (judge["function"], judge["token_secret"]) == ("judge", "judge-credentials")
    platform = json.dumps(documents[1:])  # kfp-kubernetes' platform spec: the teacher's Secret as env
    assert "teacher-credentials" in platform and "TEACHER_API_KEY" in platform and "api_key" in platform


def test_the_chain_runs_on_the_workspace_with_its_secrets_and_only_enabled_stages(tmp_path):
    """On a cluster every training step mounts the workspace volume (the data, the models handed on, the
    TrainJobs' outputs) and may read the Kubernetes credentials; the dataset and evaluation steps get the
    HF and S3 secrets, registration the registry token; a disabled stage is not compiled; nproc_per_node
    sets the GPUs per worker."""
    values = overrides(
        ("sft", "dpo"), **{"stage_configs.dpo.enabled": False, "stage_configs.sft.nproc_per_node": 4}
    )
    out = compile_chain(SFT_DPO, tmp_path / "chain.yaml", values, eval_tasks=["arc_easy"], register_as="m")
    documents = list(yaml.safe_load_all(out.read_text()))
    names = {t["taskInfo"]["name"] for t in tasks_of(documents[0]).values()}
    assert "dpo (dpo)" not in names and "sft (sft)" in names
    (sft,) = [t for t in tasks_of(documents[0]).values() if t["taskInfo"]["name"] == "sft (sft)"]
    assert sft["inputs"]["parameters"]["gpus_per_node"]["runtimeValue"]["constant"] == 4
    executors = documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    train = next(v for k, v in executors.items() if k.startswith("exec-train-model"))
    assert train["pvcMount"][0]["mountPath"] == "/workspace"
    assert {s["secretName"] for s in train["secretAsEnv"]} == {"kubernetes-credentials"}
    dataset = next(v for k, v in executors.items() if k.startswith("exec-dataset-download"))
    assert {s["secretName"] for s in dataset["secretAsEnv"]} == {"hf-token", "minio-secret"}
    evaluation = next(v for k, v in executors.items() if k.startswith("exec-evaluate-model"))
    assert evaluation["pvcMount"][0]["mountPath"] == "/workspace"
    registration = next(v for k, v in executors.items() if k.startswith("exec-register-model"))
    assert {s["secretName"] for s in registration["secretAsEnv"]} == {"model-registry-token"}


def test_what_a_chain_cannot_honour_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match="tokenizer_name_or_path"):
        chain_pipeline(
            SFT_DPO, overrides(("sft", "dpo"), tokenizer_name_or_path=str(tiny_model_path("qwen2", 0)))
        )
    flags = ["--config", str(SFT_DPO), "--compile", str(tmp_path / "c.yaml"), "--stages", "dpo"]
    assert main(flags) == 2 and "--stages" in capsys.readouterr().err


REWARD_MODEL_CHAIN = ROOT / "examples" / "multistage" / "sft_reward_model_rl.yaml"


def test_a_reward_model_stage_hands_its_reward_model_to_the_rl_stage(tmp_path):
    """The reward_model step's artifact is the rl step's reward_model; the policy goes on from the SFT
    model; --eval_every_stage adds an evaluation of every stage's model."""
    values = overrides(("sft", "reward_model", "rl"))
    out = compile_chain(
        REWARD_MODEL_CHAIN, tmp_path / "c.yaml", values, eval_tasks=["arc_easy"], eval_every_stage=True
    )
    tasks = tasks_of(next(yaml.safe_load_all(out.read_text())))
    key = {t["taskInfo"]["name"]: k for k, t in tasks.items()}
    rl = tasks[key["rl (ppo)"]]["inputs"]["artifacts"]
    assert rl["reward_model"]["taskOutputArtifact"]["producerTask"] == key["reward_model (reward_model)"]
    assert rl["base_model"]["taskOutputArtifact"]["producerTask"] == key["sft (sft)"]
    assert (
        "reward_model_path"
        not in tasks[key["rl (ppo)"]]["inputs"]["parameters"]["training_options"]["runtimeValue"]["constant"]
    )
    assert {"evaluate: sft vs base", "evaluate: final vs base"} <= set(key)


@pytest.mark.slow
def test_a_chain_with_an_online_stage_runs_under_kfp_local(tmp_path):
    """sft -> reward_model -> rl (PPO, generating from the SFT policy, scored by the reward model step's
    artifact)."""
    values = overrides(
        ("sft", "reward_model", "rl"),
        **{
            "stage_configs.sft.dataset_name_or_path": str(SAMPLES / "chat.jsonl"),
            "stage_configs.reward_model.dataset_name_or_path": str(SAMPLES / "preference.jsonl"),
            "stage_configs.reward_model.eval_dataset_name_or_path": str(SAMPLES / "preference.jsonl"),
            "stage_configs.rl.num_generations": 2,
            "stage_configs.rl.max_new_tokens": 8,
            "stage_configs.rl.ppo_epochs": 1,
        },
    )
    run_dir = run_chain(tmp_path, REWARD_MODEL_CHAIN, values)
    rl = training_config_of(run_dir, "train-model-3")
    assert rl["algorithm"] == "ppo" and rl["reward_model_path"] == str(run_dir / "train-model-2" / "model")
    assert (rl["num_generations"], rl["max_new_tokens"]) == (2, 8)
    assert rl["model_name_or_path"] == str(run_dir / "train-model" / "model")  # the SFT policy, not the RM


def test_the_dataset_step_gets_the_stage_s_source_format_and_column_mapping(tmp_path):
    changes = {
        **overrides(("sft", "dpo")),
        "stage_configs.sft.dataset_source_format": "sharegpt",
        "stage_configs.sft.dataset_field_map": {"dialogue": "conversations"},
    }
    out = compile_chain(SFT_DPO, tmp_path / "chain.yaml", changes)
    tasks = tasks_of(next(yaml.safe_load_all(out.read_text())))
    sft_data = next(t for t in tasks.values() if t["taskInfo"]["name"] == "dataset: ultrachat_200k")
    parameters = sft_data["inputs"]["parameters"]
    assert parameters["dataset_source_format"]["runtimeValue"]["constant"] == "sharegpt"
    assert json.loads(parameters["dataset_field_map"]["runtimeValue"]["constant"]) == {
        "dialogue": "conversations"
    }
    dpo_data = next(t for t in tasks.values() if t["taskInfo"]["name"] == "dataset: truthy-dpo-v0.1")
    assert dpo_data["inputs"]["parameters"]["dataset_source_format"]["runtimeValue"]["constant"] == "auto"
