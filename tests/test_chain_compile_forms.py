"""The stage forms a compiled chain runs with steps of their own: rlaif's preference_data and distilled modes (a
pair-labelling step before the training steps), cot_distillation's step_by_step mode and given traces,
``stage:<name>`` datasets (the producing step's Dataset feeds the consumer) and custom stages (their code in a
step of its own). Each is checked in the compiled YAML, and run end to end under kfp.local with tiny models and
a scripted judge endpoint on 127.0.0.1."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from kfp import local

from kfp_components.orchestration.cli import load_plugin
from kfp_components.orchestration.kfp_compile import chain_pipeline, compile_chain
from kfp_components.stages import BaseStage, StageConfig, StageResult, register_stage, unregister_stage
from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.typed_config import ConfigError

from conftest import SAMPLES

ROOT = Path(__file__).resolve().parents[1]
JUDGE_KEY = "judge-key-not-in-any-artifact"
SMALL = {
    "max_steps": 1,
    "effective_batch_size": 4,
    "max_tokens_per_gpu": 512,
    "max_seq_len": 256,
    "use_liger": False,
}


def judge(base_url: str = "http://judge.models.svc:8000/v1") -> dict:
    return {
        "base_url": base_url,
        "model": "judge",
        "token_env": "JUDGE_API_KEY",
        "token_secret": "judge-credentials/api_key",
    }


def write_chain(tmp_path: Path, stages: dict[str, dict], name: str = "chain.yaml") -> Path:
    config = {
        "model_name_or_path": str(tiny_model_path("qwen2", 0)),
        "torch_dtype": "float32",
        "output_dir": str(tmp_path / "unused"),
        "stages": list(stages),
        "stage_configs": stages,
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def write_prompts(folder: Path) -> Path:
    path = folder / "prompts.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(8))
    )
    return path


def write_traces(folder: Path) -> Path:
    path = folder / "traces.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + 2?"},
                {"role": "assistant", "content": f"{i} plus 2 is {i + 2}.\n#### {i + 2}"},
            ],
            "answer": str(i + 2),
        }
        for i in range(6)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def compiled(path: Path, tmp_path: Path) -> tuple[dict, dict[str, tuple[str, dict]], str]:
    out = compile_chain(path, tmp_path / "out.yaml")
    documents = list(yaml.safe_load_all(out.read_text()))
    tasks = documents[0]["root"]["dag"]["tasks"]
    by_name = {task["taskInfo"]["name"]: (key, task) for key, task in tasks.items()}
    return documents[0], by_name, json.dumps(documents[1:])


def source(task: dict, name: str) -> tuple[str, str]:
    artifact = task["inputs"]["artifacts"][name]["taskOutputArtifact"]
    return artifact["producerTask"], artifact["outputArtifactKey"]


def constant(task: dict, name: str):
    return task["inputs"]["parameters"][name]["runtimeValue"]["constant"]


def rlaif_chain(tmp_path: Path, base_url: str | None = None) -> dict[str, dict]:
    prompts = str(write_prompts(tmp_path))
    sampling = {"num_generations": 2, "max_new_tokens": 8, "temperature": 1.0}
    return {
        "sft": {"dataset_name_or_path": str(SAMPLES / "chat.jsonl"), **SMALL},
        "pairs": {
            "type": "rlaif",
            "mode": "preference_data",
            "dataset_name_or_path": prompts,
            "judge": judge(base_url) if base_url else judge(),
            "max_seq_len": 256,
            **{k: v for k, v in sampling.items() if k != "num_generations"},
        },
        "dpo": {"dataset_name_or_path": "stage:pairs", **SMALL},
        "distilled": {
            "type": "rlaif",
            "mode": "distilled",
            "algorithm": "grpo",
            "dataset_name_or_path": prompts,
            "judge": judge(base_url) if base_url else judge(),
            "reward_model_training": {"max_steps": 1, "effective_batch_size": 4, "use_liger": False},
            **sampling,
            **SMALL,
        },
    }


def test_rlaif_preference_data_and_distilled_compile_to_a_pair_labelling_step(tmp_path):
    """preference_data: the judged pairs feed the dpo stage that names stage:<rlaif stage>, which goes on
    from the SFT model; distilled: the pairs train a reward model (from the SFT... here the DPO model) that
    the rl step gets as its reward_model. The judge's key reaches the labelling steps from its Secret."""
    document, by_name, platform = compiled(write_chain(tmp_path, rlaif_chain(tmp_path)), tmp_path)
    sft_key, _ = by_name["sft (sft)"]
    pairs_key, pairs = by_name["pairs: judged pairs"]
    assert source(pairs, "model") == (sft_key, "model")  # the SFT model answers
    assert constant(pairs, "judge")["model"] == "judge" and constant(pairs, "min_margin") == 0.5
    dpo_key, dpo = by_name["dpo (dpo)"]
    assert source(dpo, "train_dataset") == (pairs_key, "preferences")
    assert source(dpo, "base_model") == (sft_key, "model")  # preference_data passes the model on
    distilled_key, distilled_pairs = by_name["distilled: judged pairs"]
    assert source(distilled_pairs, "model") == (dpo_key, "model")
    rm_key, reward_model = by_name["distilled: reward model (reward_model)"]
    assert constant(reward_model, "algorithm") == "reward_model"
    assert source(reward_model, "train_dataset") == (distilled_key, "preferences")
    assert source(reward_model, "base_model") == (dpo_key, "model")
    _, rl = by_name["distilled (grpo)"]
    assert source(rl, "reward_model") == (rm_key, "model")
    assert source(rl, "base_model") == (dpo_key, "model")
    assert source(rl, "train_dataset")[1] == "train_dataset"  # the prompts, not the pairs
    assert "reward_model_path" not in constant(rl, "training_options")
    executors = json.loads(platform)[0]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    labelling = next(v for k, v in executors.items() if k.startswith("exec-label-preference-pairs"))
    assert {
        "secretName": "judge-credentials",
        "keyToEnv": [{"secretKey": "api_key", "envVar": "JUDGE_API_KEY"}],
    }.items() <= {
        **next(s for s in labelling["secretAsEnv"] if s["secretName"] == "judge-credentials")
    }.items()
    image = document["deploymentSpec"]["executors"]
    assert any(
        "label-preference-pairs" in k
        and "{{$.inputs.parameters['pipelinechannel--trainer_image']}}" in json.dumps(v)
        for k, v in image.items()
    )


def test_a_chain_registers_without_an_evaluation_and_its_provenance_lists_every_stage(tmp_path):
    """--register_as without --eval_tasks: registration gets the training metrics only; the provenance names
    each stage with what it ran (an rlaif preference_data stage: its judged pairs) and its options, the
    unset ones (the algorithm's defaults) left out."""
    out = compile_chain(write_chain(tmp_path, rlaif_chain(tmp_path)), tmp_path / "out.yaml", register_as="m")
    tasks = next(yaml.safe_load_all(out.read_text()))["root"]["dag"]["tasks"]
    registration = next(t for t in tasks.values() if t["taskInfo"]["name"] == "register-model")
    assert "eval_metrics" not in registration["inputs"].get("artifacts", {})
    assert (
        constant(registration, "algorithm") == "sft:sft -> pairs:preference_data -> dpo:dpo -> distilled:grpo"
    )
    hyperparameters = constant(registration, "hyperparameters")
    assert hyperparameters["stages"] == ["sft", "pairs", "dpo", "distilled"]
    assert (
        hyperparameters["distilled"]["mode"] == "distilled"
        and "win_rate_judge" not in hyperparameters["distilled"]
    )


def test_held_out_data_of_rlaif_and_cot_distillation_compile_to_their_own_evaluation_steps(tmp_path):
    """An rlaif stage's win rate (against the model it started from, its judge's key from the win-rate
    judge's Secret) and a cot_distillation stage's answer accuracy follow their training steps, on their
    held-out rows downloaded as prompt rows."""
    prompts = str(write_prompts(tmp_path))
    stages = rlaif_chain(tmp_path)
    stages["distilled"]["eval_dataset_name_or_path"] = prompts
    stages["distilled"]["win_rate_judge"] = {
        **judge(),
        "model": "referee",
        "token_env": "REFEREE_API_KEY",
        "token_secret": "referee-credentials/key",
    }
    stages["cot"] = {
        "type": "cot_distillation",
        "dataset_name_or_path": str(write_traces(tmp_path)),
        "eval_dataset_name_or_path": prompts,
        "eval_problems": 4,
    }
    document, by_name, platform = compiled(write_chain(tmp_path, stages), tmp_path)
    dpo_key, _ = by_name["dpo (dpo)"]
    rl_key, _ = by_name["distilled (grpo)"]
    _, win_rate = by_name["distilled: win rate"]
    assert source(win_rate, "model") == (rl_key, "model")
    assert source(win_rate, "base_model") == (dpo_key, "model")  # the model the stage started from
    held_out_key, _ = source(win_rate, "held_out")
    held_out = document["root"]["dag"]["tasks"][held_out_key]
    assert (
        constant(held_out, "dataset_name_or_path") == prompts
        and constant(held_out, "data_format") == "prompt"
    )
    assert (constant(win_rate, "stage_type"), constant(win_rate, "stage_name")) == ("rlaif", "distilled")
    assert constant(win_rate, "stage_options")["win_rate_judge"]["model"] == "referee"
    cot_key, _ = by_name["cot (sft)"]
    _, accuracy = by_name["cot: answer accuracy"]
    assert source(accuracy, "model") == (cot_key, "model")
    assert source(accuracy, "base_model") == (rl_key, "model")
    assert constant(accuracy, "stage_options")["eval_problems"] == 4
    assert "eval_dataset" not in by_name["cot (sft)"][1]["inputs"].get("artifacts", {})  # not an eval loss
    executors = json.loads(platform)[0]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    evaluations = [v for k, v in executors.items() if k.startswith("exec-evaluate-held-out")]
    secrets = [{s["secretName"]: s["keyToEnv"] for s in e.get("secretAsEnv", [])} for e in evaluations]
    # the win rate's judge Secret on the rlaif step, not the labelling judge's; none on the cot step
    assert [found.get("referee-credentials") for found in secrets if "referee-credentials" in found] == [
        [{"secretKey": "key", "envVar": "REFEREE_API_KEY"}]
    ]
    assert len(evaluations) == 2 and not any("judge-credentials" in found for found in secrets)
    assert all(e["pvcMount"][0]["mountPath"] == "/workspace" for e in evaluations)


def test_cot_step_by_step_and_given_traces_compile(tmp_path):
    """step_by_step: a shaping step between the teacher's traces and the student; given traces: the traces
    are downloaded as messages rows, shaped, and learned (no synthesis step)."""
    teacher = {
        "base_url": "https://api.example.com/v1",
        "token_env": "TEACHER_API_KEY",
        "token_secret": "teacher-credentials",
    }
    stages = {
        "synthesized": {
            "type": "cot_distillation",
            "reasoning_dataset_path": str(ROOT / "examples" / "reasoning_problems.jsonl"),
            "teacher_model_path": "gpt-4",
            "teacher": teacher,
            "distillation_mode": "step_by_step",
            "label_prefix": "[answer] ",
        },
        "given": {
            "type": "cot_distillation",
            "dataset_name_or_path": str(write_traces(tmp_path)),
            "distillation_mode": "step_by_step",
        },
        "plain": {"type": "cot_distillation", "dataset_name_or_path": str(write_traces(tmp_path))},
    }
    _, by_name, _ = compiled(write_chain(tmp_path, stages), tmp_path)
    synthesis_key, _ = by_name["synthesized: teacher traces"]
    shaping_key, shaping = by_name["synthesized: step-by-step targets"]
    assert source(shaping, "traces") == (synthesis_key, "dataset")
    assert constant(shaping, "label_prefix") == "[answer] "
    assert source(by_name["synthesized (sft)"][1], "train_dataset") == (shaping_key, "dataset")
    assert "given: teacher traces" not in by_name
    given_key, given = by_name["given: step-by-step targets"]
    assert source(given, "traces")[1] == "train_dataset"
    assert source(by_name["given (sft)"][1], "train_dataset") == (given_key, "dataset")
    assert source(by_name["plain (sft)"][1], "train_dataset")[1] == "train_dataset"  # as given


def test_a_stage_dataset_of_a_cot_stage_feeds_a_later_stage(tmp_path):
    """stage:<name> in general: the training data a cot_distillation stage learns (its output dataset) is the
    data of a later sft stage."""
    stages = {
        "cot": {
            "type": "cot_distillation",
            "dataset_name_or_path": str(write_traces(tmp_path)),
            "distillation_mode": "step_by_step",
        },
        "sft": {"dataset_name_or_path": "stage:cot"},
    }
    _, by_name, _ = compiled(write_chain(tmp_path, stages), tmp_path)
    shaping_key, _ = by_name["cot: step-by-step targets"]
    assert source(by_name["sft (sft)"][1], "train_dataset") == (shaping_key, "dataset")


@pytest.fixture
def wise_ft():
    load_plugin(str(ROOT / "examples" / "multistage" / "custom_stage.py"))
    return sys.modules["kfp_components_plugin_custom_stage"]


def test_a_custom_stage_compiles_to_a_step_that_carries_its_code(wise_ft, tmp_path):
    """The plugin file's source travels in the pipeline; the step starts from the previous stage's model and
    knows what that stage started from (WiSE-FT interpolates with it); the next stage goes on from it."""
    stages = {
        "sft": {"dataset_name_or_path": str(SAMPLES / "chat.jsonl")},
        "wise_ft": {"alpha": 0.25},
        "dpo": {"dataset_name_or_path": str(SAMPLES / "preference.jsonl")},
    }
    _, by_name, _ = compiled(write_chain(tmp_path, stages), tmp_path)
    sft_key, _ = by_name["sft (sft)"]
    custom_key, custom = by_name["wise_ft (custom stage)"]
    assert source(custom, "base_model") == (sft_key, "model")
    assert constant(custom, "previous_stage") == "sft"
    assert constant(custom, "previous_input_name") == str(tiny_model_path("qwen2", 0))
    assert constant(custom, "stage_class") == "kfp_components_plugin_custom_stage:WiseFTStage"
    assert (
        constant(custom, "plugin_source")
        == (ROOT / "examples" / "multistage" / "custom_stage.py").read_text()
    )
    assert constant(custom, "stage_options")["alpha"] == 0.25
    assert source(by_name["dpo (dpo)"][1], "base_model") == (custom_key, "model")


@dataclass(kw_only=True)
class _LocalConfig(StageConfig):
    pass


def test_a_custom_stage_a_step_cannot_load_is_refused_with_what_to_do(tmp_path):
    class Inline(BaseStage):
        stage_name = "inline"
        config_class = _LocalConfig

        def execute(self, model: str, tokenizer: str, previous_result: StageResult | None) -> StageResult:
            return StageResult(stage_name=self.name, model_path=model)

    register_stage("inline", Inline)
    try:
        path = write_chain(
            tmp_path, {"sft": {"dataset_name_or_path": str(SAMPLES / "chat.jsonl")}, "inline": {}}
        )
        with pytest.raises(ConfigError, match=r"stage_configs\.inline: the custom stage .*--plugin"):
            chain_pipeline(path)
    finally:
        unregister_stage("inline")


def run_chain(tmp_path: Path, path: Path) -> Path:
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    chain_pipeline(path)(backend="local")
    (run_dir,) = (tmp_path / "root").iterdir()
    return run_dir


def outputs_of(run_dir: Path, task: str) -> dict:
    return json.loads((run_dir / task / "executor_output.json").read_text())


def training_config_of(run_dir: Path, task: str) -> dict:
    return outputs_of(run_dir, task)["artifacts"]["model"]["artifacts"][0]["metadata"]["training_config"]


@pytest.mark.slow
def test_rlaif_preference_data_then_dpo_and_distilled_run_under_kfp_local(tmp_path, monkeypatch, capfd):
    """The SFT model's answers are judged (the key sent with every request, in no artifact); DPO learns the
    kept pairs; distilled trains a reward model on its own pairs and GRPO runs against it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_rlaif import scripted_judge

    from kfp_components.testing.openai_server import ScriptedChatServer

    monkeypatch.setenv("JUDGE_API_KEY", JUDGE_KEY)  # kfp.local ignores the Secret; the steps inherit this
    with ScriptedChatServer(scripted_judge, models=("judge",), api_key=JUDGE_KEY) as server:
        stages = rlaif_chain(tmp_path, server.base_url)
        del stages["sft"]  # the base model answers: one training step less
        stages["distilled"].update(eval_dataset_name_or_path=str(write_prompts(tmp_path)), win_rate_prompts=4)
        path = write_chain(tmp_path, stages)
        run_dir = run_chain(tmp_path, path)
        assert server.chat_requests and all(
            r.headers["authorization"] == f"Bearer {JUDGE_KEY}" for r in server.chat_requests
        )
    pairs = (run_dir / "label-preference-pairs" / "preferences").read_text().splitlines()
    rows = [json.loads(line) for line in pairs]
    assert rows and all({"prompt", "chosen", "rejected", "judge_preference"} <= set(row) for row in rows)
    metrics = outputs_of(run_dir, "label-preference-pairs")["artifacts"]["metrics"]["artifacts"][0][
        "metadata"
    ]
    assert metrics["pairs_kept"] == len(rows)
    dpo = training_config_of(run_dir, "train-model")
    assert dpo["algorithm"] == "dpo" and dpo["model_name_or_path"] == str(tiny_model_path("qwen2", 0))
    assert dpo["data_path"] == str(run_dir / "label-preference-pairs" / "preferences")
    reward_model = training_config_of(run_dir, "train-model-2")
    assert reward_model["algorithm"] == "reward_model"
    assert reward_model["data_path"] == str(run_dir / "label-preference-pairs-2" / "preferences")
    assert reward_model["model_name_or_path"] == str(run_dir / "train-model" / "model")  # the DPO model
    rl = training_config_of(run_dir, "train-model-3")
    assert rl["algorithm"] == "grpo" and rl["reward_model_path"] == str(run_dir / "train-model-2" / "model")
    assert rl["model_name_or_path"] == str(run_dir / "train-model" / "model")
    # the win rate of the GRPO model against the DPO model it started from, judged both ways round
    win_rate = outputs_of(run_dir, "evaluate-held-out")["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert (
        win_rate["win_rate_judged"] + win_rate["win_rate_unjudged"] == 4 and win_rate["win_rate_judged"] >= 1
    )
    assert 0.0 <= win_rate["win_rate"] <= 1.0
    table = (run_dir / "evaluate-held-out" / "report").read_text()
    assert str(run_dir / "train-model" / "model") in table and "| win rate | wins |" in table
    assert JUDGE_KEY not in "".join(p.read_text(errors="ignore") for p in run_dir.rglob("*") if p.is_file())
    assert JUDGE_KEY not in "".join(capfd.readouterr())


@pytest.mark.slow
def test_cot_step_by_step_and_a_custom_stage_run_under_kfp_local(wise_ft, tmp_path):
    """Given traces shaped into both targets train the student; the custom WiSE-FT stage runs its plugin code
    in its step and interpolates with the model the cot stage started from."""
    stages = {
        "cot": {
            "type": "cot_distillation",
            "dataset_name_or_path": str(write_traces(tmp_path)),
            "distillation_mode": "step_by_step",
            "eval_dataset_name_or_path": str(write_prompts(tmp_path)),
            "eval_problems": 3,
            "eval_max_new_tokens": 8,
            **SMALL,
        },
        "wise_ft": {"alpha": 0.5},
    }
    run_dir = run_chain(tmp_path, write_chain(tmp_path, stages))
    targets = [
        json.loads(line) for line in (run_dir / "step-by-step-targets" / "dataset").read_text().splitlines()
    ]
    assert len(targets) == 12 and {row["weight"] for row in targets} == {1.0}
    assert sum(row["messages"][0]["content"].startswith("[label] ") for row in targets) == 6
    cot = training_config_of(run_dir, "train-model")
    assert cot["data_path"]
    # the student's answer accuracy before and after, on the held-out problems
    accuracy = outputs_of(run_dir, "evaluate-held-out")["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert accuracy["reasoning_base_problems"] == accuracy["reasoning_tuned_problems"] == 3
    assert 0.0 <= accuracy["reasoning_tuned_accuracy"] <= 1.0
    assert "| tuned student |" in (run_dir / "evaluate-held-out" / "report").read_text()
    custom = outputs_of(run_dir, "run-custom-stage")["artifacts"]
    assert (run_dir / "run-custom-stage" / "model" / "model.safetensors").is_file()
    metrics = custom["metrics"]["artifacts"][0]["metadata"]
    assert metrics["alpha"] == 0.5 and metrics["relative_distance_to_base"] > 0  # the tuned vs the base


def test_a_stage_without_a_held_out_evaluation_is_refused_by_the_step(tmp_path):
    from kfp_components.orchestration.held_out_step import evaluate_held_out

    with pytest.raises(ValueError, match=r"stage_type: 'dpo' has no held-out evaluation; one of"):
        evaluate_held_out("dpo", "dpo", {}, "tuned", "base", tmp_path / "rows.jsonl", tmp_path / "report.md")
    assert not (tmp_path / "report.md").exists()


def test_the_held_out_step_names_a_bad_option_by_its_yaml_key_path(tmp_path):
    from kfp_components.orchestration.held_out_step import evaluate_held_out

    options = {"judge": judge(), "dataset_name_or_path": "p.jsonl", "win_rate_prompts": -1}
    with pytest.raises(ConfigError) as caught:
        evaluate_held_out(
            "rlaif", "distilled", options, "tuned", "base", tmp_path / "p.jsonl", tmp_path / "r.md"
        )
    assert caught.value.problems == [
        ("stage_configs.distilled.win_rate_prompts", "must be 0 (all) or positive, got -1")
    ]
    assert not (tmp_path / "r.md").exists()
