"""Per-sample loss weights and logit distillation in the SFT/OSFT objective (tiny models on the CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from test_trainer_loop import config, step_records, torchrun_two_processes

from kfp_components.data import DatasetConfig, DatasetValidationError, prepare_dataset
from kfp_components.data.formats import MESSAGES, check_row
from kfp_components.testing.tiny_model import tiny_model_path
from kfp_components.trainer import train as train_module
from kfp_components.trainer.batching import collate, shifted_label_count
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.fingerprint import run_fingerprint
from kfp_components.trainer.objectives import Distillation, LanguageModelling
from kfp_components.trainer.preflight import preflight_problems
from kfp_components.trainer.tokenize import SampleError, TokenizedDataset, TokenizedSample, tokenize_jsonl
from kfp_components.trainer.train import train
from kfp_components.typed_config import ConfigError

from conftest import SAMPLES, write_jsonl


def chat_rows(count: int) -> list[dict]:
    return [json.loads(line) for line in (SAMPLES / "chat.jsonl").read_text().splitlines()[:count]]


# ----------------------------------------------------------------------------------------- the weight column


@pytest.mark.parametrize(
    ("weight", "problem"),
    [
        ("2", "weight: expected a number above 0, got a string"),
        (True, "weight: expected a number above 0, got a boolean"),
        (None, "weight: expected a number above 0, got null"),
        (0, "weight: expected a finite number above 0, got 0"),
        (-1.5, "weight: expected a finite number above 0, got -1.5"),
        (math.nan, "weight: expected a finite number above 0, got nan"),
        (math.inf, "weight: expected a finite number above 0, got inf"),
    ],
)
def test_a_bad_weight_is_a_row_problem(weight, problem):
    row = {**chat_rows(1)[0], "weight": weight}
    assert check_row(row, MESSAGES) == [problem]


def test_good_weights_and_no_weight_pass():
    row = chat_rows(1)[0]
    for weight in (1, 2, 0.25, 1e-6):
        assert check_row({**row, "weight": weight}, MESSAGES) == []
    assert check_row(row, MESSAGES) == []
    # a bad weight is reported beside the conversation's own problems
    bad = {"messages": [{"role": "user", "content": "q"}], "weight": 0}
    assert len(check_row(bad, MESSAGES)) == 2


def test_bad_weights_in_data_are_errors_naming_file_and_line(tmp_path):
    """The dataset stage, the trainer's preflight and its tokenizer each name the file and line (NaN and
    Infinity are what Python's JSON writer emits for non-finite floats; the trainer's reader accepts them,
    so the weight check must catch them)."""
    from transformers import AutoTokenizer

    rows = chat_rows(4)
    rows[1]["weight"] = 2
    rows[2]["weight"] = math.nan
    rows[3]["weight"] = "heavy"
    path = write_jsonl(tmp_path / "weighted.jsonl", rows)

    with pytest.raises(DatasetValidationError) as raised:
        prepare_dataset(DatasetConfig(str(path)), tmp_path / "t.jsonl", tmp_path / "e.jsonl")
    text = str(raised.value)
    assert "weighted.jsonl:3: " in text and "NaN is not a JSON value" in text  # the stage's reader refuses it
    assert "weighted.jsonl:4: weight: expected a number above 0, got a string" in text
    assert "weighted.jsonl:2" not in text
    assert not (tmp_path / "t.jsonl").exists()

    problems = preflight_problems(config(tmp_path, data_path=str(path)), check_model=False)
    assert ("data_path", f"{path}:3: weight: expected a finite number above 0, got nan") in problems
    assert ("data_path", f"{path}:4: weight: expected a number above 0, got a string") in problems

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path("qwen2", 0))
    with pytest.raises(SampleError, match=rf"{path}:3: weight: expected a finite number above 0, got nan"):
        tokenize_jsonl(path, tokenizer, max_seq_len=256)
    data = tokenize_jsonl(write_jsonl(tmp_path / "ok.jsonl", rows[:2]), tokenizer, max_seq_len=256)
    assert [s.weight for s in data.samples] == [1.0, 2.0]
    limit = max(data.lengths) - 1
    truncated = tokenize_jsonl(tmp_path / "ok.jsonl", tokenizer, max_seq_len=limit, overlong="truncate")
    assert truncated.stats["truncated"] == 1
    assert [s.weight for s in truncated.samples] == [1.0, 2.0]


def test_collate_carries_weights_only_when_a_weight_is_not_one():
    a = TokenizedSample([1, 2, 3], [-100, 2, 3])
    b = TokenizedSample([4, 5], [-100, 5], weight=2.5)
    assert collate([a, a], [0, 1]).weights is None
    packed = collate([a, b], [0, 1])
    assert packed.weights is not None
    assert packed.weights.tolist() == [[1.0, 1.0, 1.0, 2.5, 2.5]]
    assert packed.to("cpu").weights.tolist() == packed.weights.tolist()


def _gradients(model: torch.nn.Module, objective: LanguageModelling, num_items: float) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    batch = objective.batch(list(range(len(objective.samples))))
    loss, _ = objective.loss(model, batch, torch.tensor(num_items), torch.device("cpu"))
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_weight_two_gives_the_gradient_of_the_sample_written_twice():
    """Loss = sum(w * token loss) / label tokens: with s1 weighing 2 the sum equals that of [s1, s1, s2],
    only the normaliser differs (n1 + n2 label tokens instead of 2 n1 + n2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_path("qwen2", 0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    s1, s2 = (TokenizedSample(**_sample(tokenizer, row)) for row in chat_rows(2))
    n1, n2 = shifted_label_count(s1.labels), shifted_label_count(s2.labels)

    def objective(samples: list[TokenizedSample]) -> LanguageModelling:
        return LanguageModelling(TokenizedDataset(samples, {}), pad_token_id=0)

    weighted = _gradients(model, objective([TokenizedSample(s1.input_ids, s1.labels, 2.0), s2]), n1 + n2)
    twice = _gradients(model, objective([s1, s1, s2]), 2 * n1 + n2)
    expected = twice * (2 * n1 + n2)
    # float32 round-off of two differently packed rows: relative to the largest gradient element
    torch.testing.assert_close(
        weighted * (n1 + n2), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max())
    )
    assert not torch.allclose(weighted, twice, rtol=1e-3)  # the normalisers do differ

    # The weighted path computes the loss from the logits; with weight 1 it is the model's own loss.
    plain = objective([s1, s2])
    batch = plain.batch([0, 1])
    assert batch.weights is None
    with torch.no_grad():
        own_loss, _ = plain.loss(model, batch, torch.tensor(float(n1 + n2)), torch.device("cpu"))
        batch.weights = torch.ones_like(batch.targets, dtype=torch.float32)
        manual, _ = plain.loss(model, batch, torch.tensor(float(n1 + n2)), torch.device("cpu"))
    assert float(manual) == pytest.approx(float(own_loss), rel=1e-6)


def _sample(tokenizer, row: dict) -> dict:
    from kfp_components.trainer.tokenize import tokenize_messages

    sample = tokenize_messages(row["messages"], tokenizer)
    return {"input_ids": sample.input_ids, "labels": sample.labels}


def test_a_weighted_row_trains_like_the_row_written_twice(tmp_path):
    """End to end: the first step on [r0 (weight 2), r1..r7] against [r0, r0, r1..r7], the whole file one
    step; loss and gradient norm differ by exactly the ratio of the label-token normalisers."""
    from transformers import AutoTokenizer

    rows = chat_rows(8)
    weighted = write_jsonl(tmp_path / "weighted.jsonl", [{**rows[0], "weight": 2}, *rows[1:]])
    doubled = write_jsonl(tmp_path / "doubled.jsonl", [rows[0], *rows])
    runs = {}
    for name, path, batch in (("weighted", weighted, 8), ("doubled", doubled, 9)):
        options = config(tmp_path / name, data_path=str(path), effective_batch_size=batch)
        train(TrainingConfig(**{**options.__dict__, "max_steps": 1, "save_final_model": False}))
        runs[name] = step_records(tmp_path / name / "run")[0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path("qwen2", 0))
    data = tokenize_jsonl(weighted, tokenizer, max_seq_len=256)
    counts = [shifted_label_count(s.labels) for s in data.samples]
    ratio = (sum(counts) + counts[0]) / sum(counts)
    assert runs["weighted"]["loss_units"] == sum(counts)
    assert runs["weighted"]["loss"] == pytest.approx(runs["doubled"]["loss"] * ratio, rel=1e-5)
    assert runs["weighted"]["grad_norm"] == pytest.approx(runs["doubled"]["grad_norm"] * ratio, rel=1e-4)


# ------------------------------------------------------------------------------------------- distillation


def test_distillation_options_are_checked(tmp_path):
    teacher = str(tiny_model_path("qwen2", 0))
    cases = {
        "distill_teacher_path": {"distill_teacher_path": teacher, "algorithm": "dpo"},
        "use_liger": {"distill_teacher_path": teacher, "use_liger": True},
        "distill_coef": {"distill_coef": 1.5},
        "distill_temperature": {"distill_temperature": 0.0},
    }
    for key, overrides in cases.items():
        with pytest.raises(ConfigError) as raised:
            config(tmp_path, **overrides).validate()
        assert key in [k for k, _ in raised.value.problems], (key, raised.value.problems)
    config(tmp_path, distill_teacher_path=teacher, algorithm="osft", distill_coef=1.0).validate()
    # the teacher is part of what a resume must match, as an absolute path
    assert run_fingerprint(config(tmp_path, distill_teacher_path=teacher))["distill_teacher_path"] == teacher


def test_a_teacher_with_another_vocabulary_fails_before_the_student_loads(tmp_path, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("a model's weights were loaded before the vocabulary check")

    monkeypatch.setattr(train_module, "load_model", must_not_load)
    monkeypatch.setattr(train_module, "_load_plain_model", must_not_load)
    other = tiny_model_path("qwen2", 0, vocab_size=1100)
    with pytest.raises(ConfigError) as raised:
        train(config(tmp_path, distill_teacher_path=str(other)))
    messages = dict(raised.value.problems)
    assert set(messages) == {"distill_teacher_path"}, raised.value.problems
    text = "\n".join(m for k, m in raised.value.problems)
    assert "1100 logits per token" in text and "1024" in text
    assert "the teacher's tokenizer differs from the student's" in text and "only in the teacher's" in text
    llama = tiny_model_path("llama", 0)
    with pytest.raises(ConfigError, match=r"tokenizer differs from the student's.*with other ids"):
        train(config(tmp_path, distill_teacher_path=str(llama)))
    with pytest.raises(ConfigError, match="distill_teacher_path: no such folder"):
        train(config(tmp_path, distill_teacher_path=str(tmp_path / "missing")))


def test_the_student_as_its_own_teacher_has_zero_kl_and_the_plain_sft_loss(tmp_path):
    student = str(tiny_model_path("qwen2", 0))
    common = {"max_steps": 2, "save_final_model": False, "eval_data_path": str(SAMPLES / "chat.jsonl")}
    train(config(tmp_path / "plain", **common))
    train(config(tmp_path / "kd", distill_teacher_path=student, distill_coef=0.5, **common))
    plain = step_records(tmp_path / "plain" / "run")
    kd = step_records(tmp_path / "kd" / "run")
    first = kd[0]
    assert first["distill_kl"] == pytest.approx(0.0, abs=1e-7)
    assert first["sft_loss"] == pytest.approx(plain[0]["loss"], rel=1e-5)
    for record in kd:  # loss = (1 - c) * sft_loss + c * distill_kl, step by step
        assert record["loss"] == pytest.approx(
            0.5 * record["sft_loss"] + 0.5 * record["distill_kl"], rel=1e-6
        )
    assert kd[1]["distill_kl"] > 0  # the student has moved away from the teacher
    evaluation = [r for r in json.loads(f"[{_lines(tmp_path / 'kd' / 'run')}]") if "eval_loss" in r][-1]
    assert set(evaluation) >= {"eval_loss", "eval_sft_loss", "eval_distill_kl"}
    assert evaluation["eval_loss"] == pytest.approx(
        0.5 * evaluation["eval_sft_loss"] + 0.5 * evaluation["eval_distill_kl"], rel=1e-6
    )


def _lines(run_dir: Path) -> str:
    return ",".join((run_dir / "metrics.jsonl").read_text().splitlines())


def test_pure_distillation_brings_the_student_closer_to_the_teacher(tmp_path):
    teacher = str(tiny_model_path("qwen2", 1))
    cfg = config(
        tmp_path,
        distill_teacher_path=teacher,
        distill_coef=1.0,
        distill_temperature=2.0,
        max_steps=8,
        save_final_model=False,
    )
    summary = train(cfg)
    records = step_records(tmp_path / "run")
    kl = [r["distill_kl"] for r in records]
    assert kl[0] > 0.01, kl  # two random tiny models: nearly uniform distributions
    assert kl[-1] < 0.6 * kl[0], kl
    assert all(r["loss"] == pytest.approx(r["distill_kl"], rel=1e-6) for r in records)
    assert set(summary.metrics) == {"sft_loss", "distill_kl"}


def test_distillation_with_weights_in_one_objective():
    """The KD term of a sample is weighted like its cross-entropy: weight 2 doubles both sums."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_path("qwen2", 0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    student = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_path("qwen2", 1), dtype=torch.float32).eval()
    sample = TokenizedSample(**_sample(tokenizer, chat_rows(1)[0]))
    sums = []
    for weight in (1.0, 2.0):
        objective = LanguageModelling(
            TokenizedDataset([TokenizedSample(sample.input_ids, sample.labels, weight)], {}),
            pad_token_id=0,
            distillation=Distillation(teacher, coef=0.3, temperature=1.5),
        )
        with torch.no_grad():
            loss, metric_sums = objective.loss(
                student, objective.batch([0]), torch.tensor(1.0), torch.device("cpu")
            )
        sums.append(metric_sums)
        assert float(loss) == pytest.approx(
            0.7 * float(metric_sums[0]) + 0.3 * float(metric_sums[1]), rel=1e-6
        )
    torch.testing.assert_close(sums[1], 2 * sums[0])
    # a dummy micro-batch still runs the teacher (FSDP2 collectives) and adds nothing
    with torch.no_grad():
        loss, metric_sums = objective.loss(
            student, objective.batch([]), torch.tensor(1.0), torch.device("cpu")
        )
    assert float(loss) == 0 and metric_sums.tolist() == [0.0, 0.0]


@pytest.mark.slow
def test_two_processes_match_one_with_weights_and_distillation(tmp_path):
    """FSDP2 on two gloo processes (the teacher sharded like the student) matches one process."""
    rows = chat_rows(40)
    weighted = [{**row, "weight": 0.5 + (i % 3)} for i, row in enumerate(rows)]
    data = write_jsonl(tmp_path / "weighted.jsonl", weighted)
    one = config(
        tmp_path / "one",
        data_path=str(data),
        num_train_epochs=1,
        distill_teacher_path=str(tiny_model_path("qwen2", 1)),
        distill_coef=0.5,
        distill_temperature=2.0,
    )
    train(one)
    two_dir = tmp_path / "two" / "run"
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({**one.__dict__, "output_dir": str(two_dir), "distributed": "fsdp"}))
    torchrun_two_processes(run_yaml)
    single, double = step_records(tmp_path / "one" / "run"), step_records(two_dir)
    assert len(single) == len(double) == 5
    for a, b in zip(single, double, strict=True):
        for key in ("loss", "sft_loss", "distill_kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
