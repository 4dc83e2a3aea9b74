"""The modular fine-tuning guide's configurations run as written: its YAML examples (shown verbatim in
docs/multistage.md, compared with the guide itself where it is at hand), its CLI flags, its custom stage and
its import paths, on a tiny model and the bundled data. Also: every problem of a config at once, a stage type
run twice, and the checks a run makes before its first stage starts."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
import yaml

from kfp_components.orchestration import DryRunError, Pipeline, pipeline_config_from_dict
from kfp_components.orchestration.cli import main
from kfp_components.stages import unregister_stage
from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.typed_config import ConfigError

from conftest import SAMPLES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "multistage.md"
SEED = ROOT.parent / "shared" / "seeds" / "modular-fine-tuning-guide.md"
CHAT = str(SAMPLES / "chat.jsonl")
PREFERENCE = str(SAMPLES / "preference.jsonl")


def docs_example(name: str) -> str:
    """The code block under ``<!-- seed-example: name -->`` in docs/multistage.md."""
    match = re.search(rf"<!-- seed-example: {name} -->\n```\w+\n(.*?)```", DOCS.read_text(), re.S)
    assert match, f"docs/multistage.md has no seed example {name!r}"
    return match.group(1)


def seed_block(after: str, language: str) -> str:
    """The first ``language`` code block after the line ``after`` in the guide."""
    text = SEED.read_text()
    start = text.index(after)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    assert match
    return match.group(1)


@pytest.fixture(scope="module")
def tiny() -> str:
    return str(tiny_model_path("qwen2", 0))


def write_example(name: str, folder: Path) -> Path:
    path = folder / f"{name}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(docs_example(name))
    return path


@pytest.mark.skipif(not SEED.exists(), reason="the guide itself is not at hand (../shared/seeds)")
def test_docs_show_the_guides_examples_verbatim():
    assert docs_example("basic") == seed_block("### Basic Configuration Structure", "yaml")
    assert docs_example("example-1") == seed_block("### Example 1: SFT", "yaml")
    assert docs_example("example-2") == seed_block("### Example 2: Full Reasoning Pipeline", "yaml")
    assert docs_example("custom-stage") == seed_block("1. **Create Stage Implementation**", "python")
    assert docs_example("register") == seed_block("2. **Register the Stage**", "python")


def test_basic_configuration_dry_runs_and_float16_reaches_every_stage(tiny, tmp_path, capsys):
    config = write_example("basic", tmp_path)
    out = tmp_path / "run"
    flags = [
        "--config", str(config),
        "--model_name_or_path", tiny,
        "--output_dir", str(out),
        "--set", f"stage_configs.sft.dataset_name_or_path={CHAT}",
        f"stage_configs.dpo.preference_dataset_path={PREFERENCE}",
    ]  # fmt: skip
    assert main([*flags, "--dry_run"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "1. sft: run" in printed and "2. dpo: run" in printed and "(preference, 15 rows)" in printed
    pipeline = Pipeline.from_yaml(config, {"model_name_or_path": tiny, "output_dir": str(out)})
    assert {name: stage.config.torch_dtype for name, stage in pipeline.stages.items()} == {
        "sft": "float16",
        "dpo": "float16",
    }
    assert pipeline.stages["sft"].config.num_train_epochs == 3
    assert pipeline.stages["dpo"].config.dataset_name_or_path == "path/to/preference_data.jsonl"
    assert not out.exists()


@pytest.mark.slow
def test_example_1_trains_sft_then_dpo_with_the_guides_flags(tiny, tmp_path, monkeypatch, capsys):
    """Run from the repository root, so `examples/sample_data.jsonl` is found as the guide writes it; only
    the model, the output folder and DPO's placeholder data path are replaced."""
    config = write_example("example-1", tmp_path)
    out = tmp_path / "run"
    monkeypatch.chdir(ROOT)
    code = main(
        [
            "--config",
            str(config),
            "--model_name_or_path",
            tiny,
            "--output_dir",
            str(out),
            "--set",
            f"stage_configs.dpo.preference_dataset_path={PREFERENCE}",
            "--log_level",
            "DEBUG",
            "--save_final_model",
            "--cleanup_intermediate",
        ]
    )
    assert code == 0, capsys.readouterr().err
    state = json.loads((out / "pipeline_state.json").read_text())["stages"]
    sft, dpo = state["sft"], state["dpo"]
    assert sft["status"] == dpo["status"] == "finished"
    sft_config = json.loads(Path(sft["artifacts"]["training_config"]).read_text())
    dpo_config = json.loads(Path(dpo["artifacts"]["training_config"]).read_text())
    assert (sft_config["num_train_epochs"], sft_config["learning_rate"]) == (3, 2e-4)
    assert (dpo_config["beta"], dpo_config["learning_rate"], dpo_config["algorithm"]) == (0.1, 5e-7, "dpo")
    assert sft["metrics"]["steps"] == 3, "40 rows in one step per epoch, three epochs"
    assert dpo_config["model_name_or_path"] == sft["model_path"], "dpo starts from the SFT model"
    assert (out / "final_model" / "model.safetensors").is_file()
    assert not Path(sft["model_path"]).exists(), "--cleanup_intermediate deleted the SFT model"


def test_example_2_runs_its_keys_as_written_once_the_teacher_endpoint_is_given(tiny, tmp_path, capsys):
    """The guide's keys (reasoning_dataset_path, teacher_model_path: gpt-4, teacher_model_type: api) are the
    stage's own; the one thing the guide leaves out, where the API is, is the first error; with an endpoint
    serving gpt-4 and the problems at hand the whole chain checks out."""
    from kfp_components.testing.openai_server import ScriptedChatServer

    config = write_example("example-2", tmp_path)
    flags = [
        "--config", str(config),
        "--model_name_or_path", tiny,
        "--output_dir", str(tmp_path / "run"),
        "--set", f"stage_configs.sft.dataset_name_or_path={CHAT}",
        f"stage_configs.dpo.preference_dataset_path={PREFERENCE}",
        "--dry_run",
    ]  # fmt: skip
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: stage_configs.cot_distillation.teacher.base_url: required"), err
    assert len(err.strip().splitlines()) == 1, "the other keys check out"

    problems = Path(__file__).resolve().parents[1] / "examples" / "reasoning_problems.jsonl"
    with ScriptedChatServer(lambda messages, body: "#### 1", models=("gpt-4",)) as server:
        flags += [
            "--set",
            f"stage_configs.cot_distillation.teacher.base_url={server.base_url}",
            f"stage_configs.cot_distillation.reasoning_dataset_path={problems}",
        ]
        assert main(flags) == 0, capsys.readouterr().err
    # a typo in the same stage is reported with everything else, in one go
    flags += ["--set", "stage_configs.cot_distillation.teacher_model_typ=api", "stage_configs.dpo.beta=high"]
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert (
        "stage_configs.cot_distillation.teacher_model_typ: unknown option; did you mean teacher_model_type"
        in err
    )
    assert "stage_configs.dpo.beta: expected a float, got 'high'" in err


@pytest.fixture
def seed_stage():
    """The guide's custom stage, executed as written (with the standard import the snippet leaves out) in a
    module of its own, then registered as the guide registers it."""
    module = types.ModuleType("guide_custom_stage")
    sys.modules[module.__name__] = module
    code = (
        "from dataclasses import dataclass, field\n" + docs_example("custom-stage") + docs_example("register")
    )
    exec(compile(code, "modular-fine-tuning-guide.md", "exec"), module.__dict__)
    yield module
    unregister_stage("my_stage")
    del sys.modules[module.__name__]


def custom_chain(tiny: str, out: Path, my_stage: dict) -> dict:
    return {
        "model_name_or_path": tiny,
        "output_dir": str(out),
        "torch_dtype": "float32",
        "stages": ["sft", "my_stage"],
        "stage_configs": {
            "sft": {
                "dataset_name_or_path": CHAT,
                "max_steps": 1,
                "max_seq_len": 256,
                "max_tokens_per_gpu": 512,
            },
            "my_stage": my_stage,
        },
    }


def test_the_guides_custom_stage_registers_validates_and_runs(seed_stage, tiny, tmp_path):
    config = pipeline_config_from_dict(custom_chain(tiny, tmp_path / "run", {"my_parameter": "value"}))
    pipeline = Pipeline(config)
    assert isinstance(config.stage_configs["my_stage"], seed_stage.MyStageConfig)
    assert pipeline.stages["my_stage"].config.my_parameter == "value"
    assert "2. my_stage: run" in pipeline.dry_run().format()
    assert "My custom parameter" in options_markdown_for(seed_stage.MyStageConfig)

    with pytest.raises(
        ConfigError, match=r"stage_configs\.my_stage\.my_parameter: required option is missing"
    ):
        pipeline_config_from_dict(custom_chain(tiny, tmp_path / "run", {}))

    # The guide's execute is a placeholder returning None: the run says so and names the stage.
    with pytest.raises(
        Exception, match=r"stage 'my_stage' \(2 of 2\) failed: TypeError: execute\(\) returned"
    ):
        pipeline.run()

    class Working(seed_stage.MyStage):  # its options are MyStage's: found through the class it extends
        def execute(self, model, tokenizer, previous_result=None):
            return seed_stage.StageResult(
                stage_name=self.name, model_path=model, metrics={"chars": len(self.config.my_parameter)}
            )

    Pipeline.register_stage("my_stage", Working, replace=True)
    sft, mine = Pipeline(
        pipeline_config_from_dict(custom_chain(tiny, tmp_path / "run", {"my_parameter": "v"}))
    ).run()
    assert mine.model_path == sft.model_path and mine.metrics == {"chars": 1.0}


def options_markdown_for(config_class: type) -> str:
    from kfp_components.orchestration.options_doc import _table

    return _table(config_class)


def test_a_stage_type_runs_twice_under_two_names(tiny, tmp_path):
    out = tmp_path / "run"
    small = {"max_steps": 1, "max_seq_len": 256, "max_tokens_per_gpu": 512, "effective_batch_size": 4}
    data = {
        "model_name_or_path": tiny,
        "output_dir": str(out),
        "torch_dtype": "float32",
        "stages": ["sft_general", "sft_domain"],
        "stage_configs": {
            "sft_general": {"type": "sft", "dataset_name_or_path": CHAT, **small},
            "sft_domain": {"stage_type": "sft", "dataset_name_or_path": CHAT, "learning_rate": 1e-3, **small},
        },
    }
    general, domain = Pipeline(pipeline_config_from_dict(data)).run()
    assert domain.input_model == general.model_path
    assert general.model_path == str(out / "stages" / "01_sft_general" / "final")
    assert (
        json.loads((out / "stages" / "02_sft_domain" / "training_config.json").read_text())["learning_rate"]
        == 1e-3
    )
    with pytest.raises(ConfigError, match=r"stage_configs\.sft_general\.type: expected a stage name, got 3"):
        pipeline_config_from_dict(
            {**data, "stage_configs": {**data["stage_configs"], "sft_general": {"type": 3}}}
        )


def test_every_problem_of_a_chain_is_reported_at_once(tiny, tmp_path, capsys):
    """A stage listed without options no longer hides the bad option of the next one; the ranges and
    combinations that used to fail later, with tracebacks, are found when the config is built."""
    data = {
        "model_name_or_path": tiny,
        "output_dir": str(tmp_path / "run"),
        "stages": ["sft", "osft", "dpo"],
        "stage_configs": {
            "osft": {
                "dataset_name_or_path": CHAT,
                "attn_implementation": "flash",
                "max_seq_len": 8192,
                "max_tokens_per_gpu": 4096,
                "lr_scheduler": "cosin",
            },
            "dpo": {"dataset_name_or_path": PREFERENCE, "beta": "high", "lora_dropout": 1.5},
        },
    }
    with pytest.raises(ConfigError) as info:
        Pipeline(pipeline_config_from_dict(data))
    assert [path for path, _ in info.value.problems] == [
        "stage_configs.sft",
        "stage_configs.osft.lr_scheduler",
        "stage_configs.osft.attn_implementation",
        "stage_configs.dpo.lora_dropout",  # dpo has no LoRA options
        "stage_configs.dpo.beta",
    ]
    text = str(info.value)
    assert (
        "lr_scheduler: expected one of constant, linear, cosine, got 'cosin' (did you mean cosine?)" in text
    )
    assert "attn_implementation: expected one of sdpa, eager, flash_attention_2" in text
    # with those fixed, the value ranges and cross-option rules of the engine are reported, all of them
    data["stage_configs"].update(sft={"dataset_name_or_path": CHAT, "lora_r": 8, "lora_dropout": 1.5})
    data["stage_configs"]["osft"].update(attn_implementation="sdpa", lr_scheduler="cosine")
    data["stage_configs"]["dpo"] = {"dataset_name_or_path": PREFERENCE, "beta": 0.1}
    with pytest.raises(ConfigError) as info:
        Pipeline(pipeline_config_from_dict(data))
    assert [(path, text.split(",")[0]) for path, text in info.value.problems] == [
        ("stage_configs.sft.lora_dropout", "must be in [0"),
        (
            "stage_configs.osft.max_tokens_per_gpu",
            "4096 is smaller than max_seq_len 8192: a sample of max_seq_len tokens would not fit in one micro-batch; raise max_tokens_per_gpu or lower max_seq_len",
        ),
    ]


def test_a_dry_run_finds_an_unwritable_output_folder_with_the_other_problems(tiny, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    data = {
        "model_name_or_path": tiny,
        "output_dir": str(blocker / "run"),
        "stages": ["sft", "dpo"],
        "stage_configs": {"sft": {"dataset_name_or_path": CHAT}, "dpo": {"dataset_name_or_path": CHAT}},
    }
    with pytest.raises(DryRunError) as info:
        Pipeline(pipeline_config_from_dict(data)).dry_run()
    assert [path for path, _ in info.value.problems] == [
        "output_dir",
        "stage_configs.dpo.dataset_name_or_path",
    ]
    assert "a-file is a file, not a folder" in info.value.problems[0][1]


def test_runtime_input_errors_are_one_line(tiny, tmp_path, capsys):
    config = tmp_path / "chain.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": tiny,
                "output_dir": str(tmp_path / "run"),
                "stages": ["sft"],
                "stage_configs": {"sft": {"dataset_name_or_path": str(tmp_path / "missing.jsonl")}},
            }
        )
    )
    for extra in ([], ["--dry_run"]):
        assert main(["--config", str(config), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: stage_configs.sft.dataset_name_or_path: ")
        assert "missing.jsonl: no such file or folder" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "stages").exists(), "nothing trained"


def test_lora_and_osft_targets_that_match_no_module_are_found_before_training(tiny, tmp_path):
    data = {
        "model_name_or_path": tiny,
        "output_dir": str(tmp_path / "run"),
        "stages": ["sft", "osft"],
        "stage_configs": {
            "sft": {"dataset_name_or_path": CHAT, "lora_r": 4, "lora_target_modules": ["q_proj", "qkv_proj"]},
            "osft": {"dataset_name_or_path": CHAT, "target_patterns": [r"\.attention\.wqkv$"]},
        },
    }
    pipeline = Pipeline(pipeline_config_from_dict(data))
    with pytest.raises(DryRunError) as info:
        pipeline.dry_run()
    assert [path for path, _ in info.value.problems] == [
        "stage_configs.sft.lora_target_modules[1]",
        "stage_configs.osft.target_patterns[0]",
    ]
    assert "'qkv_proj' matches no module of Qwen2ForCausalLM" in info.value.problems[0][1]
    with pytest.raises(ConfigError) as info:
        pipeline.run()  # the run's own up-front check: nothing trains
    assert len(info.value.problems) == 2
    assert not (tmp_path / "run" / "pipeline_state.json").exists()


def test_sigterm_while_a_stage_trains_stops_cleanly_and_the_rerun_resumes(tiny, tmp_path):
    """Before: the stage's signal surfaced as a failed stage with a traceback and exit code 1."""
    import os
    import signal
    import subprocess
    import time

    out = tmp_path / "run"
    config = tmp_path / "chain.yaml"
    sft = {
        "dataset_name_or_path": CHAT,
        "max_steps": 40,
        "effective_batch_size": 8,
        "max_seq_len": 256,
        "max_tokens_per_gpu": 256,
        "checkpoint_every_steps": 100,
        "resume": True,
    }
    config.write_text(
        yaml.safe_dump(
            {"model_name_or_path": tiny, "output_dir": str(out), "torch_dtype": "float32", "stages": ["sft"]}
            | {"stage_configs": {"sft": sft}}
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "kfp_components.orchestration", "--config", str(config)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "stages" / "01_sft" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().count('"loss"') >= 2):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the stage did not start training in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "stopped: training stopped by SIGTERM after step" in err and "Traceback" not in err
    entry = json.loads((out / "pipeline_state.json").read_text())["stages"]["sft"]
    assert entry["status"] == "failed" and "SIGTERM" in entry["error"]
    assert list((out / "stages" / "01_sft" / "checkpoints").glob("step-*")), "the stop saved a checkpoint"
    assert main(["--config", str(config)]) == 0, "the rerun resumes the stage and finishes it"
    summary = json.loads((out / "stages" / "01_sft" / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["attempts"] == 2
