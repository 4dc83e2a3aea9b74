"""RLAIF on tiny models with a judge behind a scripted OpenAI-compatible server (the real openai client): direct
RLAIF raises the judge's score, sft -> rlaif(preference_data) -> dpo and distilled RLAIF run end to end from
one YAML (with the win rate), and bad judges stop the pipeline before any stage trains."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from test_trainer_online import online_config, rise
from test_trainer_ppo import rows_of, write_prompts

from kfp_components.orchestration import Pipeline
from kfp_components.orchestration.config import load_pipeline_config
from kfp_components.testing.openai_server import ScriptedChatServer
from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer.train import train
from kfp_components.typed_config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "multistage" / "sft_rlaif_dpo.yaml"
DIRECT_EXAMPLE = ROOT / "examples" / "multistage" / "sft_rlaif.yaml"
KEY = "sk-test-judge-0123456789abcdef"


def share_of_a(text: str) -> float:
    return text.count("a") / max(len(text), 1)


def scripted_judge(messages, body) -> str:
    """Pointwise: 1 + 9 x the share of "a" in the response; pairwise: the response with more "a" wins (a tie
    goes to the first position, a bias the order averaging cancels)."""
    text = messages[-1]["content"]
    pair = re.search(
        r"\[(?:Response|Answer) A\]\n(.*?)\n\n\[(?:Response|Answer) B\]\n(.*?)\n\nBetter", text, re.S
    )
    if pair:
        return "A" if share_of_a(pair.group(1)) >= share_of_a(pair.group(2)) else "B"
    response = re.search(r"\[(?:Response|Answer)\]\n(.*?)\n\nScore:", text, re.S).group(1)
    return f"{1 + 9 * share_of_a(response):.3f}"


@pytest.fixture
def judge_server(monkeypatch):
    monkeypatch.setenv("JUDGE_API_KEY", KEY)
    with ScriptedChatServer(scripted_judge, models=("Qwen/Qwen2.5-7B-Instruct",), api_key=KEY) as server:
        yield server


def test_direct_rlaif_raises_the_judges_score(judge_server, tmp_path, caplog):
    """PPO with the judge's score as the only reward: its mean over the last three steps is more than 0.9
    above that of the first three (the judge's scale is 9x the share of "a" that the rule-reward tests raise
    by 0.1)."""
    (tmp_path / "data").mkdir()
    prompts = write_prompts(tmp_path / "data")
    judge = {
        "function": "judge",
        "base_url": judge_server.base_url,
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "token_env": "JUDGE_API_KEY",
        "max_concurrency": 16,
    }
    config = online_config(
        prompts,
        tmp_path / "out",
        algorithm="ppo",
        reward_functions=[judge],
        value_learning_rate=1e-2,
        num_iterations=2,
        num_mini_batches=2,
        kl_coef=0.01,
    )
    caplog.set_level("DEBUG")
    train(config)
    rows = rows_of(tmp_path / "out")
    scores = [r["reward/judge/mean"] for r in rows]
    assert rise(scores) > 0.9, scores
    last = rows[-1]
    assert last["reward/judge/requests"] <= 16 * 10 and last["reward/judge/judged"] == 16 * 10
    assert last["reward/judge/requests"] + last["reward/judge/cache_hits"] == 16 * 10
    assert last["reward/judge/unscored"] == 0 and last["reward_seconds"] > 0
    assert all(r.headers.get("authorization") == f"Bearer {KEY}" for r in judge_server.chat_requests)
    written = "".join(
        p.read_text()
        for p in (tmp_path / "out").rglob("*")
        if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml", ".log")
    )
    assert KEY not in written and KEY not in caplog.text


def small(out: Path, stages: tuple[str, ...], **extra: object) -> dict[str, object]:
    values: dict[str, object] = {
        "model_name_or_path": str(tiny_model_path("qwen2", 0)),
        "output_dir": str(out),
        "torch_dtype": "float32",
    }
    for stage in stages:
        values.update(
            {
                f"stage_configs.{stage}.max_steps": 2,
                f"stage_configs.{stage}.effective_batch_size": 4,
                f"stage_configs.{stage}.max_tokens_per_gpu": 512,
                f"stage_configs.{stage}.max_seq_len": 256,
                f"stage_configs.{stage}.dataset_subset_size": 16,
            }
        )
    values.update(extra)
    return values


def test_sft_then_rlaif_preference_data_then_dpo_end_to_end(judge_server, tmp_path):
    out = tmp_path / "run"
    options = small(
        out,
        ("sft", "rlaif", "dpo"),
        **{
            "stage_configs.rlaif.judge.base_url": judge_server.base_url,
            "stage_configs.rlaif.max_new_tokens": 8,
            "stage_configs.rlaif.preference_min_margin": 0.5,
        },
    )
    pipeline = Pipeline(load_pipeline_config(EXAMPLE, options))
    plan = pipeline.dry_run()
    rlaif_dir = out / "stages" / "02_rlaif"
    details = plan.stages[1].details
    assert details["mode"] == "preference_data" and details["judge"].startswith(
        "Qwen/Qwen2.5-7B-Instruct at http"
    )
    assert "written by stage 'rlaif' first" in plan.stages[2].details["dataset"]
    sft, rlaif, dpo = pipeline.run()
    assert rlaif.model_path == sft.model_path == dpo.input_model  # rlaif passes the SFT model on
    pairs = [json.loads(line) for line in (rlaif_dir / "preferences.jsonl").read_text().splitlines()]
    assert pairs and len(pairs) == rlaif.metrics["pairs/kept"] <= 16
    for row in pairs:
        assert share_of_a(row["chosen"]) > share_of_a(row["rejected"])  # both orders agreed
        assert {"prompt", "answer", "judge_preference"} <= row.keys()
    assert rlaif.metrics["judge/requests"] >= 2 * len(pairs)
    assert dpo.metrics["dataset.train_rows"] == len(pairs)
    # the judge saw the answer column through the template, and its key never reached the run's records
    assert "The right answer is" in judge_server.chat_requests[-1].body["messages"][-1]["content"]
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".log", ".md"):
            assert KEY not in path.read_text(errors="replace"), path


@pytest.mark.slow
def test_distilled_rlaif_trains_a_reward_model_from_the_judge_then_rl_and_reports_the_win_rate(
    judge_server, tmp_path
):
    out = tmp_path / "run"
    options = small(
        out,
        ("rlaif",),
        **{
            "stage_configs.rlaif.mode": "distilled",
            "stage_configs.rlaif.judge.base_url": judge_server.base_url,
            "stage_configs.rlaif.max_new_tokens": 8,
            "stage_configs.rlaif.num_generations": 2,
            "stage_configs.rlaif.preference_min_margin": 0.5,
            "stage_configs.rlaif.eval_dataset_name_or_path": str(
                ROOT / "examples" / "arithmetic_prompts_eval.jsonl"
            ),
            "stage_configs.rlaif.win_rate_prompts": 8,
            "stage_configs.rlaif.reward_model_training": {
                "max_steps": 2,
                "effective_batch_size": 4,
                "max_tokens_per_gpu": 512,
                "max_seq_len": 256,
                "learning_rate": 1e-3,
            },
        },
    )
    example = yaml.safe_load(DIRECT_EXAMPLE.read_text())
    example["stages"] = ["rlaif"]
    del example["stage_configs"]["sft"]
    (tmp_path / "rlaif.yaml").write_text(yaml.safe_dump(example))
    (rlaif,) = Pipeline(load_pipeline_config(tmp_path / "rlaif.yaml", options)).run()
    stage_dir = out / "stages" / "01_rlaif"
    assert rlaif.artifacts["reward_model"] == str(stage_dir / "reward_model" / "final")
    assert (stage_dir / "reward_model" / "final" / "config.json").is_file()
    used = json.loads((stage_dir / "training_config.json").read_text())
    assert (
        used["reward_model_path"] == str(stage_dir / "reward_model" / "final") and used["algorithm"] == "ppo"
    )
    rl_rows = rows_of(stage_dir)
    assert len(rl_rows) == 2 and all("reward/reward_model/mean" in r for r in rl_rows)
    assert rlaif.metrics["pairs/kept"] > 0 and "reward_model/steps" in rlaif.metrics
    assert rlaif.metrics["win_rate/judged"] == 8
    assert 0.0 <= rlaif.metrics["win_rate"] <= 1.0
    wins, ties, losses = (rlaif.metrics[f"win_rate/{k}"] for k in ("wins", "ties", "losses"))
    assert wins + ties + losses == 8


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"stage_configs.rlaif.judge.pairwise_template": "Which is better? {response_a}"},
            r"stage_configs\.rlaif\.judge\.pairwise_template: must contain \{response_b\}",
        ),
        (
            {"stage_configs.rlaif.judge.base_url": "http://127.0.0.1:9/v1"},
            r"stage_configs\.rlaif\.judge: .*127\.0\.0\.1:9",
        ),
        ({"stage_configs.rlaif.judge.token_env": "UNSET_JUDGE_KEY"}, r"UNSET_JUDGE_KEY"),
        ({"stage_configs.rlaif.judge.model": "gpt-4"}, r"gpt-4"),
        (
            {"stage_configs.rlaif.judge.pairwise_template": "{response_a} or {response_b}: {rationale}?"},
            r"placeholder \{rationale\}",
        ),
        (
            {"stage_configs.rlaif.mode": "dpo"},
            r"stage_configs\.rlaif\.mode: .*direct, distilled, preference_data",
        ),
        ({"stage_configs.dpo.dataset_name_or_path": "stage:sft"}, r"'sft' writes no dataset"),
        (
            {"stage_configs.sft.dataset_name_or_path": "stage:rlaif"},
            r"'rlaif' is not a stage listed before this one \(no stage before it writes one\)",
        ),
        (
            {"stage_configs.rlaif.reward_model_path": "./rm"},
            r"stage_configs\.rlaif\.reward_model_path: the rlaif stage's reward is the judge",
        ),
    ],
    ids=[
        "template",
        "unreachable",
        "missing-key",
        "model-not-served",
        "unknown-placeholder",
        "mode",
        "reference",
        "reference-later",
        "reward-model",
    ],
)
def test_bad_judges_stop_the_pipeline_before_any_stage_trains(judge_server, tmp_path, change, message):
    out = tmp_path / "run"
    options = small(
        out,
        ("sft", "rlaif", "dpo"),
        **{
            "stage_configs.rlaif.judge.base_url": judge_server.base_url,
            "stage_configs.rlaif.judge.retries": 0,
            "stage_configs.rlaif.judge.timeout_seconds": 2.0,
        },
    )
    options.update(change)
    with pytest.raises(ConfigError, match=message):
        Pipeline(load_pipeline_config(EXAMPLE, options)).run()
    assert not (out / "stages" / "01_sft" / "final").exists()


def test_direct_judge_that_never_returns_a_number_stops_before_any_update(tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_API_KEY", KEY)
    with ScriptedChatServer(
        lambda m, b: "A fine answer.", models=("Qwen/Qwen2.5-7B-Instruct",), api_key=KEY
    ) as server:
        options = small(
            tmp_path / "run",
            ("sft", "rlaif"),
            **{
                "stage_configs.rlaif.judge.base_url": server.base_url,
                "stage_configs.rlaif.eval_dataset_name_or_path": "",
            },
        )
        with pytest.raises(ConfigError, match=r"gave no score to any of the 1 completion.*A fine answer"):
            Pipeline(load_pipeline_config(DIRECT_EXAMPLE, options)).run()
    assert not (tmp_path / "run" / "stages" / "01_sft" / "final").exists()


def test_reward_weights_count_the_judge_last(judge_server, tmp_path):
    """direct: one weight per reward function and the judge's last; the count is checked with the judge."""
    base = small(
        tmp_path / "run", ("sft", "rlaif"), **{"stage_configs.rlaif.judge.base_url": judge_server.base_url}
    )
    rule = {"function": "format_regex", "pattern": "^[0-9]+$"}
    options = {
        **base,
        "stage_configs.rlaif.reward_functions": [rule],
        "stage_configs.rlaif.reward_weights": [0.5, 2.0],
    }
    stage = Pipeline(load_pipeline_config(DIRECT_EXAMPLE, options)).stages["rlaif"]
    config = stage.training_config("<model>", "<data>")
    assert [f["function"] for f in config.reward_functions] == ["format_regex", "judge"]
    assert config.reward_weights == [0.5, 2.0]
    wrong = {**options, "stage_configs.rlaif.reward_weights": [0.5]}
    with pytest.raises(ConfigError, match=r"stage_configs\.rlaif\.reward_weights: 1 weight\(s\)"):
        Pipeline(load_pipeline_config(DIRECT_EXAMPLE, wrong))


def test_a_stage_dataset_written_again_is_read_again(judge_server, tmp_path, monkeypatch):
    """dpo reads the pairs rlaif wrote in this run, not a copy of an earlier run's taken at the start; a
    pair file that no stage of the run writes is an error naming it."""
    out = tmp_path / "run"
    options = small(
        out, ("sft", "rlaif", "dpo"), **{"stage_configs.rlaif.judge.base_url": judge_server.base_url}
    )
    pipeline = Pipeline(load_pipeline_config(EXAMPLE, options))
    dpo = pipeline.stages["dpo"]
    pairs = pipeline.stages["rlaif"].preferences_path
    pairs.parent.mkdir(parents=True)
    old = {"prompt": "2 + 2?", "chosen": "4", "rejected": "5"}
    pairs.write_text(json.dumps(old) + "\n")
    model = str(tiny_model_path("qwen2", 0))
    dpo.check_inputs(model, model)  # an earlier run's file: checked now
    new = {"prompt": "3 + 3?", "chosen": "6", "rejected": "7"}
    pairs.write_text(json.dumps(new) + "\n")  # the rlaif stage of this run writes its pairs
    seen = []

    def fake_train(config):
        seen.append([json.loads(line) for line in Path(config.data_path).read_text().splitlines()])
        output = Path(config.output_dir)
        (output / "final").mkdir(parents=True)
        (output / "summary.json").write_text(json.dumps({"steps": 1, "final_loss": 0.1}))

    monkeypatch.setattr("kfp_components.trainer.train.train", fake_train)
    dpo.execute(model, model, None)
    assert [row["prompt"] for row in seen[0]] == ["3 + 3?"]
    pairs.unlink()
    with pytest.raises(
        ConfigError, match=r"dataset_name_or_path: stage 'rlaif' has not written .*preferences\.jsonl"
    ):
        dpo.execute(model, model, None)


def test_a_judged_pair_is_two_answers_per_prompt(tmp_path):
    from kfp_components.feedback.comparisons import label_preferences
    from kfp_components.feedback.judges import JudgeOptions
    from kfp_components.trainer.rollout import SamplingOptions

    output = tmp_path / "pairs.jsonl"
    with pytest.raises(ValueError, match="two answers per prompt, not 3"):
        label_preferences(
            "no-model-is-loaded",
            tmp_path / "prompts.jsonl",
            output,
            JudgeOptions(backend="openai", model="judge", base_url="http://127.0.0.1:9/v1"),
            SamplingOptions(num_generations=3),
            min_margin=0.5,
            max_seq_len=64,
        )
    assert not output.exists()
