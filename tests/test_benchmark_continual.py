"""The continual-learning benchmark: its corpus, its metrics, its cached pre-training and its report."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks import continual, continual_corpus
from benchmarks.continual_pretrain import PretrainConfig, pretrained_model

#: A pre-training small enough for a test: seconds on one thread, yet enough to learn the corpus's grammar.
TINY_PRETRAIN = PretrainConfig(
    hidden_size=64,
    num_layers=2,
    intermediate_size=128,
    corpus_samples=1500,
    row_tokens=128,
    rows_per_step=8,
    steps=80,
    warmup_steps=5,
    heldout_samples=60,
)


def test_corpus_and_tasks_are_deterministic_and_tasks_use_disjoint_new_words():
    world = continual_corpus.make_world(0)
    assert continual_corpus.corpus(1, 50, world) == continual_corpus.corpus(1, 50, world)
    assert continual_corpus.corpus(1, 50, world) != continual_corpus.corpus(2, 50, world)
    tasks = continual_corpus.new_tasks(7, 20)
    assert tasks == continual_corpus.new_tasks(7, 20)
    assert [name for name, _ in tasks] == ["code", "capital", "flag"]
    words = [question.rstrip("?").rsplit(" ", 1)[1] for _, facts in tasks for question, _ in facts]
    assert len(set(words)) == len(words) == 60
    assert all(answer in continual_corpus.CITIES for _, answer in tasks[1][1])
    with pytest.raises(ValueError, match="count must be in"):
        continual_corpus.new_tasks(0, 5, count=4)


def test_task_families_answer_correctly():
    world = continual_corpus.make_world(0)
    probe = continual_corpus.family_probe(5, 20, world)
    assert set(probe) == set(continual_corpus.FAMILIES)
    for question, answer in probe["addition"]:
        a, b = question.removeprefix("What is ").rstrip("?").split(" + ")
        assert int(answer) == int(a) + int(b)
    for question, answer in probe["reverse"]:
        assert answer == question.rstrip(".").rsplit(" ", 1)[1][::-1]
    for question, answer in probe["sort_digits"]:
        assert answer.split() == sorted(question.removeprefix("Sort ").rstrip(".").split())
    for question, answer in probe["world"]:
        name = next(n for n in world.people if f" {n} " in f" {question} ".replace("?", " "))
        assert answer in (world.city[name], world.colour[name], world.pet[name])
    # the world's facts are stated in the documents the model pre-trains on
    text = " ".join(continual_corpus.document(random.Random(i), world) for i in range(200))
    assert any(f"{name} lives in {world.city[name]}." in text for name in world.people)


def test_average_accuracy_and_backward_transfer_follow_the_definitions():
    matrix = [[0.9, 0.0, 0.0], [0.5, 1.0, 0.1], [0.3, 0.8, 1.0]]
    assert continual.average_accuracy(matrix) == pytest.approx((0.3 + 0.8 + 1.0) / 3)
    assert continual.backward_transfer(matrix) == pytest.approx(((0.3 - 0.9) + (0.8 - 1.0)) / 2)
    assert continual.backward_transfer([[0.7]]) == 0.0


def test_exact_match_needs_every_answer_token(tmp_path):
    from kfp_components.testing.tiny_model import build_tiny_model

    path = build_tiny_model(tmp_path / "m", arch="qwen2", seed=0)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    question = "What is the code of baba?"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # the model's own greedy continuation is right by definition
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)[0, len(ids) :]
    own = tokenizer.decode(greedy)
    if tokenizer(own, add_special_tokens=False)["input_ids"] != greedy.tolist():
        pytest.skip("the greedy tokens do not round-trip through text")
    wrong_ids = [(int(greedy[0]) + 1) % 256, *greedy[1:].tolist()]  # another first token, the same rest
    wrong = tokenizer.decode(wrong_ids)
    if tokenizer(wrong, add_special_tokens=False)["input_ids"] != wrong_ids:
        pytest.skip("the changed tokens do not round-trip through text")
    assert continual.exact_match(tokenizer, model, [(question, own)]) == 1.0
    assert continual.exact_match(tokenizer, model, [(question, wrong)]) == 0.0
    # rows of another length padded into the same batch do not change a row's score
    longer = ("Tell me, please, what is the code of the word baba?", "123")
    assert continual.exact_match(tokenizer, model, [(question, own), (question, wrong), longer]) in (
        1 / 3,
        2 / 3,
    )
    assert continual.exact_match(tokenizer, model, [longer, (question, own)]) in (0.5, 1.0)


def test_pretraining_learns_the_corpus_and_is_cached_by_its_hash(tmp_path):
    folder, record = pretrained_model(TINY_PRETRAIN, tmp_path)
    assert folder.name == TINY_PRETRAIN.cache_key() and (folder / "model.safetensors").exists()
    # far below uniform over the vocabulary (1,024) and far below the random initialisation
    assert record["heldout_perplexity"] < 40 < record["heldout_perplexity_initial"]
    assert record["heldout_perplexity"] < record["heldout_perplexity_initial"] / 10
    again, record_again = pretrained_model(TINY_PRETRAIN, tmp_path)  # cached: nothing is trained again
    assert again == folder and record_again == record
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no partial folders left behind
    other = dataclasses.replace(TINY_PRETRAIN, steps=81)
    assert other.cache_key() != TINY_PRETRAIN.cache_key()


def test_smoke_run_reports_every_method_task_and_seed(tmp_path):
    methods = tuple(dataclasses.replace(m, steps=3) for m in continual.METHODS)
    setting = continual.Setting(
        pretrain=TINY_PRETRAIN,
        facts_per_task=6,
        num_tasks=2,
        methods=methods,
        seeds=(0, 1),
        probe_per_family=2,
    )
    engine_log = logging.getLogger("kfp_components")
    level = engine_log.level
    result = continual.run(setting, cache=tmp_path / "cache")
    assert engine_log.level == level, "the run quiets the engine's log only while it runs"
    assert set(result["runs"]) == {"full", "lora", "osft"}
    for name, runs in result["runs"].items():
        assert [r["seed"] for r in runs] == [0, 1]
        for r in runs:
            assert len(r["after"]) == 2 and all(len(a["tasks"]) == 2 for a in r["after"])
            assert 0.0 <= r["acc"] <= 1.0 and -1.0 <= r["bwt"] <= 1.0
            assert set(r["after"][-1]["families"]) == set(continual_corpus.FAMILIES)
            # every method changed the model: the held-out perplexity moved from the pre-trained one
            assert r["after"][0]["heldout_perplexity"] != r["before"]["heldout_perplexity"], name
    before = result["runs"]["full"][0]["before"]["heldout_perplexity"]
    assert before < result["pretrain"]["heldout_perplexity_initial"] / 10
    assert math.isclose(before, result["pretrain"]["heldout_perplexity"], rel_tol=1e-3)
    record = {"result": result, "machine": {"cpu": "test"}, "date": "2026-01-01"}
    text = continual.report(record)
    assert "| full fine-tuning |" in text and "| OSFT |" in text and "| LoRA |" in text
    assert " ± " in text and "task 2 (capital)" in text
    assert "## Continual learning" in continual.render(result)
    continual.plot(result, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_report_in_docs_is_generated_from_the_stored_results():
    stored = continual._read(continual.NAME)
    assert stored is not None, "benchmarks/results/continual.json is missing: run `make continual-demo`"
    assert continual.report(stored) == continual.REPORT.read_text(), (
        "docs/continual-learning.md is stale: run `python -m benchmarks.continual --render-only`"
    )
    assert continual.PLOT.exists()
    methods = json.loads((continual.RESULTS / "continual.json").read_text())["result"]["setting"]["methods"]
    assert methods == [dataclasses.asdict(m) for m in continual.METHODS]


def test_performance_page_is_generated_from_the_stored_results():
    from benchmarks import run

    assert run.report() == run.REPORT.read_text(), (
        "docs/performance.md is stale: run `make bench` or --render-only"
    )
