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


def test_token_accuracy_counts_partial_answers(tmp_path):
    from kfp_components.testing.tiny_model import build_tiny_model

    path = build_tiny_model(tmp_path / "m", arch="qwen2", seed=0)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    question = "What is the code of baba?"
    ids = continual._prompt_ids(tokenizer, question)
    with torch.no_grad():
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)[
            0, len(ids) :
        ].tolist()
    # the last token wrong (one that survives decoding and encoding again): teacher-forced, 2 of 3 right
    half = next(
        candidate
        for shift in range(1, 256)
        for candidate in [[*greedy[:2], (greedy[2] + shift) % 256]]
        if tokenizer(tokenizer.decode(candidate), add_special_tokens=False)["input_ids"] == candidate
    )
    text = tokenizer.decode(half)
    assert continual.exact_match(tokenizer, model, [(question, text)]) == 0.0
    assert continual.token_accuracy(tokenizer, model, [(question, text)]) == pytest.approx(2 / 3)


def test_greedy_answers_match_generate_and_are_classified_by_kind(tmp_path):
    from kfp_components.testing.tiny_model import build_tiny_model

    path = build_tiny_model(tmp_path / "m", arch="qwen2", seed=0)
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    questions = ["What is the code of baba?", "Which city rules kapuze?", "What is the code of lo?"]
    answers = continual.greedy_answers(tokenizer, model, questions, max_new_tokens=4)
    end = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id}
    for question, answer in zip(questions, answers, strict=True):  # batched by length == one at a time
        ids = continual._prompt_ids(tokenizer, question)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)[
                0, len(ids) :
            ].tolist()
        stop = next((i for i, token in enumerate(out) if token in end), len(out))
        assert answer == tokenizer.decode(out[:stop]).strip()
    assert [continual.answer_kind(a) for a in ("417", "Lima", "purple", "41", "4170", "lima", "")] == [
        "code",
        "capital",
        "flag",
        "other",
        "other",
        "other",
        "other",
    ]
    kinds = continual.answer_kinds(tokenizer, model, [(q, "x") for q in questions])
    assert set(kinds) == {"code", "capital", "flag", "other"} and sum(kinds.values()) == pytest.approx(1.0)


def test_protected_fraction_separates_the_frozen_block_from_the_trainable_one():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(16, 16))
    v, _ = torch.linalg.qr(torch.randn(8, 8))
    weight = u[:, :8] @ torch.diag(torch.arange(8.0, 0.0, -1.0)) @ v.T  # 16 x 8, singular values 8..1
    # ratio 0.25 of rank 8: the top 6 directions are frozen, the last 2 train
    top = 0.01 * u[:, :1] @ v[:, :1].T  # a change along the top direction: the next task cannot touch it
    low = 0.01 * u[:, 7:8] @ v[:, 7:8].T  # along the smallest direction: the next task trains exactly there
    assert continual.protected_fraction(weight, weight + top, 0.25) == pytest.approx(1.0, abs=1e-4)
    assert continual.protected_fraction(weight, weight + low, 0.25) == pytest.approx(0.0, abs=1e-4)
    mixed = continual.protected_fraction(weight, weight + top + low, 0.25)
    assert mixed == pytest.approx(0.5, abs=1e-3)


def test_method_ratio_per_task():
    grow = dataclasses.replace(continual.METHODS[2], unfreeze_rank_ratio_per_task=(0.25, 0.125, 0.0625))
    assert [grow.ratio(t) for t in range(3)] == [0.25, 0.125, 0.0625]
    assert [continual.METHODS[2].ratio(t) for t in range(3)] == [0.25] * 3
    assert "0.25, 0.125, 0.0625" in grow.describe() and "ratio 0.25" in continual.METHODS[2].describe()


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
    assert set(result["runs"]) == {"full", "lora", "osft", "osft_grow"}
    for name, runs in result["runs"].items():
        assert [r["seed"] for r in runs] == [0, 1]
        for r in runs:
            assert len(r["after"]) == 2 and all(len(a["tasks"]) == 2 for a in r["after"])
            assert 0.0 <= r["acc"] <= 1.0 and -1.0 <= r["bwt"] <= 1.0
            assert set(r["after"][-1]["families"]) == set(continual_corpus.FAMILIES)
            assert all(len(a["token_accuracy"]) == 2 and len(a["answer_kinds"]) == 2 for a in r["after"])
            [[protected, isotropic]] = r["protected"]  # one transition between two tasks
            assert 0.0 <= protected <= 1.0 and 0.0 < isotropic < 1.0
            # exact match implies every token right: token accuracy is never below it
            assert all(
                t >= e for a in r["after"] for t, e in zip(a["token_accuracy"], a["tasks"], strict=True)
            )
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
    assert methods == json.loads(json.dumps([dataclasses.asdict(m) for m in continual.METHODS]))


def test_performance_page_is_generated_from_the_stored_results():
    from benchmarks import run

    assert run.report() == run.REPORT.read_text(), (
        "docs/performance.md is stale: run `make bench` or --render-only"
    )
