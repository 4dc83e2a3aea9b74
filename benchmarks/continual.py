"""Continual learning: a pre-trained model learns three new tasks in sequence with full fine-tuning, LoRA and OSFT.

OSFT's premise (Nayak et al. 2025, arXiv:2504.07097) is a model whose weights already hold general
knowledge in their top singular directions; fine-tuning only the other directions should learn a new task
while keeping that knowledge and the earlier tasks. The experiment therefore starts from a model
pre-trained here (:mod:`benchmarks.continual_pretrain`, cached by its hash) on a broad synthetic corpus
(:mod:`benchmarks.continual_corpus`: a language-like corpus stating a small world's facts, and nine task
families as chat conversations). From it, three new tasks (invented words with a code, a city and a flag
colour each; facts the corpus never states) are learned one after the other, each from the model the
previous one left, with the project's training engine (:func:`kfp_components.trainer.train.train`): full
fine-tuning (``algorithm="sft"``), LoRA (``lora_r``; merged after each task, the next task adds a fresh
adapter), OSFT (``algorithm="osft"``; the model each task leaves is decomposed again) and OSFT as the paper
runs a sequence, with a frozen share that grows from task to task. Each task is one engine run of a fixed
budget per method (:data:`METHODS`: the same steps for every method, each at the smallest learning rate
that learns the first task).

After pre-training and after each task the model is scored on every new task (teacher-forced greedy exact
match over the task's facts: every answer token must be the model's top choice), on fresh instances of the
pre-training task families (the same exact match) and by its perplexity on held-out pre-training text; the
answer-token accuracy and the kind of the model's own answer show what is left of a forgotten task, and
:func:`protected_share` how much of each task's weight change the next OSFT run freezes. From
the accuracy matrix ``a[t][i]`` (task ``i`` after learning task ``t``) come the paper's average accuracy
``ACC = mean_i a[T][i]`` and backward transfer ``BWT = mean_{i<T} (a[T][i] - a[i][i])``. Three seeds (the new
tasks' facts and the engine's seed; one pre-trained model) give mean and spread.

python -m benchmarks.continual                # make continual-demo: results/continual.json, docs/continual.png
python -m benchmarks.continual --render-only  # rewrite docs/continual-learning.md and the plot from results
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks import continual_corpus
from benchmarks.continual_pretrain import PretrainConfig, heldout_rows, perplexity, pretrained_model
from kfp_components.trainer import osft
from kfp_components.trainer import train as train_module
from kfp_components.trainer.config import TrainingConfig

NAME = "continual"
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PLOT = ROOT / "docs" / "continual.png"
REPORT = ROOT / "docs" / "continual-learning.md"
Fact = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class Method:
    """One way of learning a task: the engine's algorithm and the budget of every task."""

    name: str
    label: str
    algorithm: str
    lr: float
    steps: int
    lora_r: int = 0
    lora_alpha: int = 16
    unfreeze_rank_ratio: float = 0.25
    #: OSFT in a sequence as the paper runs it: task i trains at ``unfreeze_rank_ratio_per_task[i]`` (a
    #: shrinking ratio: the frozen share grows with every task); empty: every task at ``unfreeze_rank_ratio``.
    unfreeze_rank_ratio_per_task: tuple[float, ...] = ()

    def ratio(self, task: int) -> float:
        """The unfreeze rank ratio of the ``task``-th task of the sequence (from 0)."""
        if self.unfreeze_rank_ratio_per_task:
            return self.unfreeze_rank_ratio_per_task[task]
        return self.unfreeze_rank_ratio

    def describe(self) -> str:
        extra = ""
        if self.lora_r:
            extra = f", rank {self.lora_r}, alpha {self.lora_alpha}, all linear layers"
        elif self.algorithm == "osft" and self.unfreeze_rank_ratio_per_task:
            ratios = ", ".join(f"{r:g}" for r in self.unfreeze_rank_ratio_per_task)
            extra = f", unfreeze rank ratio {ratios} for tasks 1, 2, 3 (the frozen share grows)"
        elif self.algorithm == "osft":
            extra = f", unfreeze rank ratio {self.unfreeze_rank_ratio:g}"
        return f"{self.steps} steps at constant lr {self.lr:g}{extra}"


#: Budgets from a pilot on seed 0 (see docs/continual-learning.md, "How the methods were matched"): the same
#: 60 steps for every method, each at the smallest learning rate of the grid that learns task 1.
METHODS = (
    Method("full", "full fine-tuning", "sft", lr=3e-4, steps=60),
    Method("lora", "LoRA", "sft", lr=3e-3, steps=60, lora_r=8),
    Method("osft", "OSFT", "osft", lr=1e-3, steps=60),
    Method(
        "osft_grow",
        "OSFT, growing frozen share",
        "osft",
        lr=1e-3,
        steps=60,
        unfreeze_rank_ratio_per_task=(0.25, 0.125, 0.0625),
    ),
)


@dataclasses.dataclass(frozen=True)
class Setting:
    """The whole experiment: the pre-trained model, the tasks, the methods and the seeds."""

    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    facts_per_task: int = 40
    num_tasks: int = 3
    methods: tuple[Method, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    #: Fresh instances of every pre-training task family scored after each task.
    probe_per_family: int = 30
    probe_seed: int = 3


DEFAULT = Setting()


# ------------------------------------------------------------------------------------------- training
def _write_chat(path: Path, facts: list[Fact]) -> str:
    with path.open("w", encoding="utf-8") as out:
        for question, answer in facts:
            out.write(json.dumps({"messages": continual_corpus.chat(question, answer)}) + "\n")
    return str(path)


def learn(model: str, data: str, out: Path, method: Method, batch: int, seed: int, task: int = 0) -> str:
    """One engine run of ``method``'s budget on ``data`` from ``model``; returns the final HF model folder."""
    config = TrainingConfig(
        model_name_or_path=model,
        data_path=data,
        output_dir=str(out),
        algorithm=method.algorithm,  # type: ignore[arg-type]
        unfreeze_rank_ratio=method.ratio(task),
        lora_r=method.lora_r,
        lora_alpha=method.lora_alpha,
        torch_dtype="float32",
        max_seq_len=128,
        max_tokens_per_gpu=8192,
        effective_batch_size=batch,
        num_train_epochs=10_000,
        max_steps=method.steps,
        learning_rate=method.lr,
        lr_scheduler="constant",
        warmup_steps=0,
        weight_decay=0.0,
        seed=seed,
        log_every_steps=1_000_000,
    )
    return train_module.train(config).model_path


# ------------------------------------------------------------------------------------------- scoring
def _rows(tokenizer: Any, facts: list[Fact]) -> tuple[list[list[int]], list[tuple[int, list[int]]]]:
    """Each fact as chat-formatted question + answer tokens, and where its answer starts."""
    rows, spans = [], []
    for question, answer in facts:
        prompt_ids = _prompt_ids(tokenizer, question)
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        rows.append(prompt_ids + answer_ids)
        spans.append((len(prompt_ids), answer_ids))
    return rows, spans


def _prompt_ids(tokenizer: Any, question: str) -> list[int]:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def answer_predictions(tokenizer: Any, model: Any, facts: list[Fact]) -> list[tuple[list[int], list[int]]]:
    """Per fact: the model's teacher-forced argmax at every answer position, and the answer's tokens."""
    rows, spans = _rows(tokenizer, facts)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    return [
        (predicted[i, start - 1 : start - 1 + len(answer)].tolist(), answer)
        for i, (start, answer) in enumerate(spans)
    ]


def exact_match(tokenizer: Any, model: Any, facts: list[Fact]) -> float:
    """Share of facts whose every answer token is the model's argmax after the chat-formatted question."""
    pairs = answer_predictions(tokenizer, model, facts)
    return sum(int(predicted == answer) for predicted, answer in pairs) / len(facts)


def token_accuracy(tokenizer: Any, model: Any, facts: list[Fact]) -> float:
    """Share of answer tokens (over all facts) that are the model's argmax, teacher-forced: partial recall."""
    pairs = answer_predictions(tokenizer, model, facts)
    hits = sum(int(p == a) for predicted, answer in pairs for p, a in zip(predicted, answer, strict=True))
    return hits / sum(len(answer) for _, answer in pairs)


@torch.no_grad()
def greedy_answers(tokenizer: Any, model: Any, questions: list[str], max_new_tokens: int = 6) -> list[str]:
    """The model's own greedy answer to each chat-formatted question (up to its end-of-turn token).

    Questions whose prompts have the same length decode together as one batch (no padding needed).
    """
    stops = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id}
    prompts = [_prompt_ids(tokenizer, question) for question in questions]
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(index)
    answers = [""] * len(questions)
    for indices in by_length.values():
        batch = torch.tensor([prompts[i] for i in indices])
        for _ in range(max_new_tokens):
            batch = torch.cat([batch, model(batch).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        width = len(prompts[indices[0]])
        for row, index in zip(batch[:, width:].tolist(), indices, strict=True):
            end = next((i for i, token in enumerate(row) if token in stops), len(row))
            answers[index] = tokenizer.decode(row[:end]).strip()
    return answers


#: The kind of answer each new task asks for (:data:`benchmarks.continual_corpus.NEW_TASKS`).
ANSWER_KINDS: dict[str, Callable[[str], bool]] = {
    "code": lambda text: len(text) == 3 and text.isdigit(),
    "capital": lambda text: text in continual_corpus.CITIES,
    "flag": lambda text: text in continual_corpus.COLOURS,
}


def answer_kind(text: str) -> str:
    """Which new task's kind of answer ``text`` is: ``code``, ``capital``, ``flag``, or ``other``."""
    return next((kind for kind, test in ANSWER_KINDS.items() if test(text)), "other")


def answer_kinds(tokenizer: Any, model: Any, facts: list[Fact]) -> dict[str, float]:
    """Share of the questions the model answers with each new task's kind of answer (or another)."""
    counts = dict.fromkeys([*ANSWER_KINDS, "other"], 0)
    for answer in greedy_answers(tokenizer, model, [question for question, _ in facts]):
        counts[answer_kind(answer)] += 1
    return {kind: round(count / len(facts), 4) for kind, count in counts.items()}


class Scorer:
    """Scores a model on the new tasks, the pre-training families and the held-out corpus."""

    def __init__(self, base: Path, setting: Setting, tasks: list[tuple[str, list[Fact]]]) -> None:
        tokenizer = AutoTokenizer.from_pretrained(base)
        world = continual_corpus.make_world(setting.pretrain.world_seed)
        self.tokenizer, self.tasks = tokenizer, tasks
        self.probe = continual_corpus.family_probe(setting.probe_seed, setting.probe_per_family, world)
        self.heldout = heldout_rows(tokenizer, setting.pretrain)

    def __call__(self, model_path: str | Path) -> dict[str, Any]:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        families = {name: exact_match(self.tokenizer, model, facts) for name, facts in self.probe.items()}
        return {
            "tasks": [round(exact_match(self.tokenizer, model, facts), 4) for _, facts in self.tasks],
            "token_accuracy": [
                round(token_accuracy(self.tokenizer, model, facts), 4) for _, facts in self.tasks
            ],
            "answer_kinds": [answer_kinds(self.tokenizer, model, facts) for _, facts in self.tasks],
            "families": {name: round(value, 4) for name, value in families.items()},
            "pretraining_accuracy": round(statistics.mean(families.values()), 4),
            "heldout_perplexity": round(perplexity(model, self.heldout), 3),
        }


def average_accuracy(matrix: list[list[float]]) -> float:
    """ACC: the mean accuracy over all tasks after the last one (``matrix[t][i]``: task i after task t)."""
    return statistics.mean(matrix[-1])


def backward_transfer(matrix: list[list[float]]) -> float:
    """BWT: the mean change of each earlier task's accuracy from just after learning it to the end."""
    last = len(matrix) - 1
    if last == 0:
        return 0.0
    return statistics.mean(matrix[last][i] - matrix[i][i] for i in range(last))


@torch.no_grad()
def activation_share(model_path: str | Path, texts: list[str], ratio: float) -> tuple[float, float]:
    """(share of the inputs' energy in the directions OSFT trains, the share if inputs were isotropic).

    Averaged over the decomposed projections. OSFT's update changes a layer's output only through the part
    of its input in the trainable (smallest) right-singular directions; the lower the measured share
    against ``(r - k) / d_in``, the less an OSFT update touches what these inputs compute.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    names = osft.find_osft_targets(model)
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda _module, args, _out, name=name: inputs[name].append(args[0][0])
        )
        for name in names
    ]
    for text in texts:
        model(torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]]))
    for hook in hooks:
        hook.remove()
    measured, isotropic = [], []
    for name in names:
        x, weight = torch.cat(inputs[name]), model.get_submodule(name).weight
        _, s, vh = torch.linalg.svd(weight, full_matrices=False)
        k = osft.num_frozen_directions(s.numel(), ratio)
        measured.append(float((x @ vh[k:].T).pow(2).sum() / x.pow(2).sum()))
        isotropic.append((s.numel() - k) / weight.shape[1])
    return statistics.mean(measured), statistics.mean(isotropic)


def protected_fraction(before: torch.Tensor, after: torch.Tensor, ratio: float) -> float:
    """Share of the change ``after - before`` outside the block an OSFT run from ``after`` may train.

    OSFT decomposes ``after`` and trains only ``(I - U_k U_k^T) W (I - V_k V_k^T)``, outside its top ``k``
    singular directions; the part of the change in that block is what the next task may overwrite.
    """
    change = after - before
    u, s, vh = torch.linalg.svd(after, full_matrices=False)
    k = osft.num_frozen_directions(s.numel(), ratio)
    free = change - u[:, :k] @ (u[:, :k].T @ change)
    free = free - (free @ vh[:k].T) @ vh[:k]
    return 1.0 - float(free.pow(2).sum() / change.pow(2).sum())


@torch.no_grad()
def protected_share(before: str | Path, after: str | Path, ratio: float) -> tuple[float, float]:
    """(share of a task's weight change that the next OSFT task cannot alter, the share for a random change).

    Averaged over the decomposed projections (:func:`protected_fraction`); a random change of an ``m x n``
    weight keeps ``1 - (m - k)(n - k) / (m n)`` of its energy outside the trainable block.
    """
    old: Any = AutoModelForCausalLM.from_pretrained(before, dtype=torch.float32)
    new: Any = AutoModelForCausalLM.from_pretrained(after, dtype=torch.float32)
    measured, isotropic = [], []
    for name in osft.find_osft_targets(new):
        weight = new.get_submodule(name).weight
        measured.append(protected_fraction(old.get_submodule(name).weight, weight, ratio))
        rows, cols = weight.shape
        k = osft.num_frozen_directions(min(rows, cols), ratio)
        isotropic.append(1.0 - (rows - k) * (cols - k) / (rows * cols))
    return statistics.mean(measured), statistics.mean(isotropic)


# ------------------------------------------------------------------------------------------------- run
def sequence(
    base: Path, scorer: Scorer, before: dict[str, Any], method: Method, seed: int, work: Path
) -> dict[str, Any]:
    """Learn every task in turn with ``method``; the scores after each task and the summary metrics."""
    model, after, protected = str(base), [], []
    for index, (name, facts) in enumerate(scorer.tasks):
        data = _write_chat(work / f"{name}.jsonl", facts)
        previous, model = (
            model,
            learn(model, data, work / f"{method.name}_{index}", method, len(facts), seed, index),
        )
        after.append(scorer(model))
        if index + 1 < len(scorer.tasks):  # how much of this task's change the next OSFT task cannot alter
            shares = protected_share(previous, model, method.ratio(index + 1))
            protected.append([round(value, 4) for value in shares])
    matrix = [scores["tasks"] for scores in after]
    return {
        "after": after,
        "protected": protected,
        "acc": round(average_accuracy(matrix), 4),
        "bwt": round(backward_transfer(matrix), 4),
        "new_task": [matrix[i][i] for i in range(len(matrix))],
        "before": before,
    }


def run(setting: Setting = DEFAULT, cache: Path | None = None) -> dict[str, Any]:
    """The whole experiment (pre-training from the cache when there): every seed and method."""
    started = time.perf_counter()
    quiet = logging.getLogger("kfp_components")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the engine's step lines; restored after, for whoever runs us in-process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; every method runs alike
    try:
        base, pretrain_record = (
            pretrained_model(setting.pretrain) if cache is None else pretrained_model(setting.pretrain, cache)
        )
        world = continual_corpus.make_world(setting.pretrain.world_seed)
        texts = [continual_corpus.document(random.Random(i), world) for i in range(20)]
        measured, isotropic = activation_share(base, texts, 0.25)
        runs: dict[str, list[dict[str, Any]]] = {method.name: [] for method in setting.methods}
        with tempfile.TemporaryDirectory() as tmp:
            for seed in setting.seeds:
                tasks = continual_corpus.new_tasks(100 + seed, setting.facts_per_task, setting.num_tasks)
                scorer = Scorer(base, setting, tasks)
                before = scorer(base)
                for method in setting.methods:
                    print(f"continual: seed {seed}, {method.label} ...", flush=True)
                    work = Path(tmp) / f"seed{seed}_{method.name}"
                    work.mkdir()
                    run_ = sequence(base, scorer, before, method, seed, work)
                    run_["seed"] = seed
                    runs[method.name].append(run_)
    finally:
        torch.set_num_threads(threads)
        quiet.setLevel(level)
    return {
        "setting": {
            "pretrain": dataclasses.asdict(setting.pretrain),
            "facts_per_task": setting.facts_per_task,
            "tasks": [task[0] for task in continual_corpus.NEW_TASKS[: setting.num_tasks]],
            "seeds": list(setting.seeds),
            "probe_per_family": setting.probe_per_family,
            "methods": [dataclasses.asdict(method) for method in setting.methods],
        },
        "pretrain": {k: v for k, v in pretrain_record.items() if k != "config"},
        "diagnostics": {
            "activation_share_trainable": round(measured, 4),
            "activation_share_isotropic": round(isotropic, 4),
        },
        "runs": runs,
        "seconds": round(time.perf_counter() - started, 1),
    }


# ------------------------------------------------------------------------------------------- summaries
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pm(values: list[float], digits: int = 2) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def summary(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method: every metric as (mean, std) over seeds, per step of the sequence where it has one."""
    table: dict[str, dict[str, Any]] = {}
    for name, runs in result["runs"].items():
        steps = len(runs[0]["after"])
        table[name] = {
            "acc": _mean_std([r["acc"] for r in runs]),
            "bwt": _mean_std([r["bwt"] for r in runs]),
            "new_task": _mean_std([statistics.mean(r["new_task"]) for r in runs]),
            "perplexity": [_mean_std([r["before"]["heldout_perplexity"] for r in runs])]
            + [_mean_std([r["after"][t]["heldout_perplexity"] for r in runs]) for t in range(steps)],
            "pretraining_accuracy": [_mean_std([r["before"]["pretraining_accuracy"] for r in runs])]
            + [_mean_std([r["after"][t]["pretraining_accuracy"] for r in runs]) for t in range(steps)],
            "tasks": [
                [_mean_std([r["after"][t]["tasks"][i] for r in runs]) for i in range(steps)]
                for t in range(steps)
            ],
            "token_accuracy": [
                [_mean_std([r["after"][t]["token_accuracy"][i] for r in runs]) for i in range(steps)]
                for t in range(steps)
            ],
        }
    return table


# ------------------------------------------------------------------------------------------- reporting
_COLOURS = {"full": "tab:red", "lora": "tab:green", "osft": "tab:blue", "osft_grow": "tab:purple"}


def plot(result: dict[str, Any], path: Path = PLOT) -> None:
    """Earlier tasks' accuracy, pre-training family accuracy and held-out perplexity over the sequence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, tasks = summary(result), result["setting"]["tasks"]
    labels = {m["name"]: m["label"] for m in result["setting"]["methods"]}
    x = list(range(len(tasks) + 1))
    ticks = ["pre-trained", *[f"after {name}" for name in tasks]]
    fig, (old, general, ppl) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, row in table.items():
        colour = _COLOURS.get(name)
        # mean accuracy over the tasks learned so far, before the current one (none after the first)
        earlier = [
            (t, _mean_std([statistics.mean(r["after"][t]["tasks"][:t]) for r in result["runs"][name]]))
            for t in range(1, len(tasks))
        ]
        old.errorbar(
            [t + 1 for t, _ in earlier],
            [m for _, (m, _s) in earlier],
            yerr=[s for _, (_m, s) in earlier],
            fmt="-o",
            color=colour,
            capsize=3,
            label=labels[name],
        )
        for curve, ax in ((row["pretraining_accuracy"], general), (row["perplexity"], ppl)):
            ax.errorbar(
                x,
                [m for m, _ in curve],
                yerr=[s for _, s in curve],
                fmt="-o",
                color=colour,
                capsize=3,
                label=labels[name],
            )
    old.set_title("Accuracy on the earlier new tasks")
    old.set_ylabel("mean exact match of tasks learned before")
    old.set_ylim(-0.02, 1.02)
    general.set_title("Pre-training task families (fresh instances)")
    general.set_ylabel("mean exact match")
    general.set_ylim(-0.02, 1.02)
    ppl.set_title("Held-out pre-training corpus")
    ppl.set_ylabel("perplexity (lower = kept)")
    for ax in (old, general, ppl):
        ax.set_xticks(x, ticks, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    seeds = len(result["setting"]["seeds"])
    fig.suptitle(f"Three new tasks in sequence after pre-training: mean ± std over {seeds} seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cell(pair: tuple[float, float], digits: int = 2) -> str:
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def headline_table(result: dict[str, Any]) -> list[str]:
    """ACC, BWT, new-task accuracy, final perplexity and family accuracy per method."""
    table = summary(result)
    labels = {m["name"]: m["label"] for m in result["setting"]["methods"]}
    first = next(iter(table.values()))
    lines = [
        "| method | new-task accuracy (mean of a[i][i]) | ACC | BWT | pre-training families | held-out perplexity |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| pre-trained model | | | | {_cell(first['pretraining_accuracy'][0])} "
        f"| {_cell(first['perplexity'][0])} |",
    ]
    for name, row in table.items():
        lines.append(
            f"| {labels[name]} | {_cell(row['new_task'])} | {_cell(row['acc'])} | {_cell(row['bwt'])} "
            f"| {_cell(row['pretraining_accuracy'][-1])} | {_cell(row['perplexity'][-1])} |"
        )
    return lines


def matrix_table(result: dict[str, Any]) -> list[str]:
    """Every task's accuracy, the family accuracy and the perplexity after each step of the sequence."""
    table, tasks = summary(result), result["setting"]["tasks"]
    labels = {m["name"]: m["label"] for m in result["setting"]["methods"]}
    header = " | ".join(f"task {i + 1} ({name})" for i, name in enumerate(tasks))
    lines = [
        f"| method | after | {header} | pre-training families | held-out perplexity |",
        "| --- | --- |" + " --- |" * (len(tasks) + 2),
    ]
    for name, row in table.items():
        for t in range(len(tasks)):
            cells = " | ".join(_cell(row["tasks"][t][i]) if i <= t else "" for i in range(len(tasks)))
            lines.append(
                f"| {labels[name]} | task {t + 1} | {cells} | {_cell(row['pretraining_accuracy'][t + 1])} "
                f"| {_cell(row['perplexity'][t + 1])} |"
            )
    return lines


def family_table(result: dict[str, Any]) -> list[str]:
    """Per pre-training family: accuracy of the pre-trained model and after the last task (seed mean)."""
    labels = {m["name"]: m["label"] for m in result["setting"]["methods"]}
    runs = result["runs"]
    first = next(iter(runs.values()))
    families = sorted(first[0]["before"]["families"])
    lines = [
        "| family | pre-trained | " + " | ".join(f"after task 3, {labels[n]}" for n in runs) + " |",
        "| --- | --- |" + " --- |" * len(runs),
    ]
    for family in families:
        before = statistics.mean(r["before"]["families"][family] for r in first)
        after = [statistics.mean(r["after"][-1]["families"][family] for r in runs[n]) for n in runs]
        lines.append(f"| {family} | {before:.2f} | " + " | ".join(f"{v:.2f}" for v in after) + " |")
    return lines


def forgetting_table(result: dict[str, Any]) -> list[str]:
    """The earlier tasks after the last one: exact match, token accuracy, and what kind of answer they get."""
    labels = {m["name"]: m["label"] for m in result["setting"]["methods"]}
    tasks = result["setting"]["tasks"]
    last = tasks[-1]
    first = next(iter(result["runs"].values()))
    lines = [
        f"| method | task | exact match | answer-token accuracy | answered as {last} (task {len(tasks)}) "
        "| answered in its own kind |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for i, task in enumerate(tasks[:-1]):
        tokens = _cell(_mean_std([r["before"]["token_accuracy"][i] for r in first]))
        own = _cell(_mean_std([r["before"]["answer_kinds"][i][task] for r in first]))
        as_last = _cell(_mean_std([r["before"]["answer_kinds"][i][last] for r in first]))
        lines.append(f"| pre-trained model | {i + 1} ({task}) | 0.00 | {tokens} | {as_last} | {own} |")
    for name, runs in result["runs"].items():
        for i, task in enumerate(tasks[:-1]):
            exact = _cell(_mean_std([r["after"][-1]["tasks"][i] for r in runs]))
            tokens = _cell(_mean_std([r["after"][-1]["token_accuracy"][i] for r in runs]))
            as_last = _cell(_mean_std([r["after"][-1]["answer_kinds"][i][last] for r in runs]))
            own = _cell(_mean_std([r["after"][-1]["answer_kinds"][i][task] for r in runs]))
            lines.append(f"| {labels[name]} | {i + 1} ({task}) | {exact} | {tokens} | {as_last} | {own} |")
    return lines


def protected_table(result: dict[str, Any]) -> list[str]:
    """Per method and task: the share of its weight change that the next OSFT decomposition freezes."""
    labels = {m["name"]: m["label"] for m in result["setting"]["methods"]}
    methods = {m["name"]: Method(**m) for m in result["setting"]["methods"]}
    tasks = result["setting"]["tasks"]
    lines = [
        "| method | change of | next ratio | frozen share of the change | the same for a random change |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, runs in result["runs"].items():
        for t in range(len(tasks) - 1):
            measured = _cell(_mean_std([r["protected"][t][0] for r in runs]))
            isotropic = runs[0]["protected"][t][1]
            ratio = methods[name].ratio(t + 1)
            lines.append(f"| {labels[name]} | task {t + 1} | {ratio:g} | {measured} | {isotropic:.2f} |")
    return lines


def render(result: dict[str, Any]) -> str:
    """The short section of docs/performance.md (the full report is docs/continual-learning.md)."""
    return "\n".join(
        [
            "## Continual learning: full fine-tuning, LoRA and OSFT",
            "",
            "A model pre-trained here learns three new tasks in sequence, every method for the same steps at "
            "its smallest learning rate that learns the task; mean ± std over "
            f"{len(result['setting']['seeds'])} seeds (the experiment and what it shows: "
            "[continual-learning.md](continual-learning.md)):",
            "",
            *headline_table(result),
            "",
            f"Runtime: {result['seconds']} s (`make continual-demo`, the pre-trained model cached; pre-training "
            f"took {result['pretrain']['seconds']} s on one thread).",
        ]
    )


#: How the budgets of :data:`METHODS` were chosen: a pilot on seed 0, task 1, from the pre-trained model (the
#: measurements of 2026-11-28; rendered into the report).
MATCHING = [
    "## How the methods were matched",
    "",
    "Each method's learning rate was chosen in a pilot (seed 0, task 1 from the pre-trained model, one "
    "engine run per row): every method gets the same 60 steps (the same compute) at the smallest learning "
    "rate of the grid 1e-4, 3e-4, 1e-3, 3e-3 that learns the task to exact match >= 0.95; the same budget "
    "then serves every task and seed, and the achieved new-task accuracy (`a[i][i]`, first column of the "
    "result) shows how well the match holds.",
    "",
    "| method | lr | steps | task 1 exact match | pre-training families | held-out perplexity |",
    "| --- | --- | --- | --- | --- | --- |",
    "| full fine-tuning | 1e-4 | 60 | 0.75 | 0.16 | 2.42 |",
    "| full fine-tuning | 3e-4 | **60** | 1.00 | 0.09 | 2.58 |",
    "| full fine-tuning | 3e-4 | 40 | 0.90 | 0.10 | 2.51 |",
    "| full fine-tuning | 1e-4 | 120 | 1.00 | 0.13 | 2.46 |",
    "| full fine-tuning | 1e-3 | 30 (previous) | 1.00 | 0.03 | 3.86 |",
    "| LoRA | 1e-3 | 60 | 0.33 | 0.06 | 2.54 |",
    "| LoRA | 3e-3 | **60** (previous) | 1.00 | 0.06 | 3.61 |",
    "| OSFT | 3e-4 | 60 | 0.10 | 0.21 | 2.38 |",
    "| OSFT | 1e-3 | **60** | 1.00 | 0.17 | 2.68 |",
    "| OSFT | 3e-3 | 30 (previous) | 1.00 | 0.10 | 2.95 |",
    "",
    "The previous version of this page matched the methods by the fewest steps at a fixed, larger learning "
    "rate (full fine-tuning 30 steps at 1e-3, LoRA 60 at 3e-3, OSFT 30 at 3e-3). At the same new-task "
    "accuracy a gentler learning rate keeps much more of the pre-training, above all for full fine-tuning "
    "(held-out perplexity after task 1: 2.58 instead of 3.86, from 2.33), so that comparison was unfair to "
    "full fine-tuning. The grid is coarse (steps of about 3x): a method whose threshold falls between two "
    "grid points is somewhat over-trained, and full fine-tuning at 1e-4 for 120 steps (twice the compute) "
    "keeps more still (2.46). LoRA at 1e-3 does not learn the task in 60 steps, so it stays at 3e-3.",
]

#: What the stored results show (written from them; rendered into the report).
FINDINGS = [
    "## What this shows",
    "",
    "- **Matched fairly, full fine-tuning keeps the pre-training corpus best.** With the same 60 steps and "
    "each method at its smallest learning rate that learns the task, held-out perplexity after three tasks "
    "is 2.96 ± 0.03 for full fine-tuning, 3.87 ± 0.30 for OSFT, 4.17 ± 0.51 for OSFT with a growing frozen "
    "share and 9.08 ± 2.26 for LoRA (from 2.33); after one task full fine-tuning and OSFT are level (2.59 "
    "and 2.63). OSFT's lead on this measure in the previous version of this page (3.02 against 4.00 after "
    "task 1) came from full fine-tuning's three times larger learning rate, not from the method. LoRA, "
    "which needs lr 3e-3 to learn a task in 60 steps, loses the most.",
    "- **OSFT keeps a little of the earlier tasks; full fine-tuning and LoRA keep nothing.** BWT is "
    "-0.89 ± 0.03 for OSFT and -0.87 ± 0.06 with the growing frozen share, against -1.00 ± 0.01 for full "
    "fine-tuning and -0.99 ± 0.01 for LoRA (ACC 0.41-0.42 against 0.34). After task 3, OSFT still answers "
    "0.19 (growing: 0.24) of task 2's facts exactly and gets 0.19-0.20 of task 1's answer tokens right, "
    "where full fine-tuning and LoRA get none. The effect holds on every seed but it is small: most of "
    "every earlier task is lost with every method.",
    "- **How the earlier tasks are lost: the latest task takes over the answer.** After task 3, full "
    "fine-tuning and LoRA answer 0.97-0.98 of task 1's code questions with a colour, task 3's kind of answer "
    "(the pre-trained model: 0.02); OSFT does so for 0.73, with the growing frozen share 0.62. The three "
    "tasks share the chat format and a question about an invented word, and what was learned last decides "
    "the kind of answer. (For task 2 this column says less: the pre-trained model already answers 0.68 of "
    '"Which city rules X?" with a colour.)',
    "- **Growing the frozen share, as the paper runs a sequence, freezes more of the earlier change but "
    "barely helps.** OSFT writes each task preferentially into the directions that the next OSFT run, "
    "decomposing the merged model again, trains once more: only 0.71 (task 1) and 0.62 (task 2) of the "
    "change's energy is frozen at ratio 0.25, against 0.86 for a random change, while full fine-tuning's "
    "and LoRA's changes lie in the dominant directions (0.95 and 0.99). Halving the trainable share per task "
    "(0.25, 0.125, 0.0625) freezes 0.88 and 0.83 of it and moves BWT from -0.89 to -0.87 and task 2's "
    "retention from 0.19 to 0.24, within the seed spread, at a higher final perplexity (4.17 against 3.87).",
    "- **The pre-training task families collapse with every method** (mean exact match 0.30 -> 0.02-0.05), "
    "also with full fine-tuning, which keeps the corpus perplexity at 2.96: the model still predicts the "
    "corpus text, but its chat answers take the new tasks' format. The families were not learned robustly "
    "to begin with (0.30 before any new task).",
    "- **On the premise.** OSFT's constraint does protect something in a sequence: it is the only method "
    "that keeps any earlier task, and its answers are taken over least. At this scale the protection is "
    "small, growing the frozen share adds little, and on the general corpus a gently fine-tuned model keeps "
    "more than OSFT. Retention is not impossible with these tasks (OSFT keeps 0.19-0.24 of task 2), so "
    "they were kept unchanged, which keeps this result comparable with the previous one; the answer-kind "
    "measurement points at the next experiment worth running: tasks whose questions differ by more than a "
    "template, or skills scored on fresh instances. Models of the paper's size cannot be pre-trained here; "
    "the same engine and pipeline run them on a GPU cluster.",
    "",
    "The first version of this page trained a random model on one task and then another (no pre-training, "
    "one seed): OSFT kept 0.15 of the first task against 0.00 for full fine-tuning; the analysis of that "
    "result (no general-knowledge subspace to protect) is why the experiment starts from a pre-trained "
    "model. The second matched the methods by the fewest steps at fixed learning rates (see below); "
    "matching them at equal steps and their smallest working learning rate is what changed the comparison "
    "on the pre-training corpus.",
]


def report(record: dict[str, Any]) -> str:
    """docs/continual-learning.md from the stored result."""
    result = record["result"]
    setting, pre, diag = result["setting"], result["pretrain"], result["diagnostics"]
    config = PretrainConfig(**setting["pretrain"])
    machine = ", ".join(f"{k} {v}" for k, v in record["machine"].items())
    methods = "\n".join(f"- **{m['label']}**: {Method(**m).describe()}." for m in setting["methods"])
    lines = [
        "# Continual learning: full fine-tuning, LoRA and OSFT",
        "",
        "OSFT's claim (Nayak et al. 2025, arXiv:2504.07097) is that a pre-trained model fine-tuned only in the "
        "directions orthogonal to each weight's top singular subspace learns new tasks while keeping what it "
        "knew. This page tests the claim on the premise the method needs, a model whose weights already hold "
        "general knowledge, at a size that trains on a CPU.",
        "",
        "```bash",
        f"make continual-demo    # {result['seconds'] / 60:.0f} minutes here with the pre-trained model cached "
        f"(pre-training: {pre['seconds'] / 60:.0f} more)",
        "```",
        "",
        "## The experiment",
        "",
        f"**Pre-training.** A tiny model ({config.describe()}; {pre['parameters']:,} parameters, random "
        "initialisation and a tokenizer trained locally) is trained as a language model on a synthetic corpus "
        "generated in `benchmarks/continual_corpus.py` (seeded): short documents of grammar sentences with "
        "agreement and relative clauses mixed with statements of a small world's facts (40 people, their "
        "city, favourite colour and pet), and, as chat conversations, nine task families: addition, the larger "
        "of two numbers, the successor of a number, counting letters, reversing a word, the first letter of a "
        "word, sorting digits, plurals and questions about the world. "
        f"{config.steps} steps of {config.rows_per_step} rows of {config.row_tokens} tokens "
        f"({pre['train_tokens']:,} tokens, about {pre['train_tokens'] / pre['corpus_tokens']:.1f} passes over "
        f"the corpus), AdamW at lr {config.lr:g} with warmup and cosine decay, one thread: "
        f"{pre['seconds']:.0f} s. Held-out perplexity falls from {pre['heldout_perplexity_initial']:.0f} "
        f"(random weights; uniform over the vocabulary would be 1,024) to {pre['heldout_perplexity']:.2f}. "
        "The checkpoint is cached under `benchmarks/results/continual_pretrained/<hash>/` (hash of the "
        "generator's source, the settings and the library versions), so later runs skip this step.",
        "",
        f"**Three new tasks in sequence**, {setting['facts_per_task']} facts each over invented words the "
        'corpus never mentions: task 1 *code* ("What is the code of <word>?" -> a 3-digit number), task 2 '
        '*capital* ("Which city rules <word>?" -> one of the corpus\'s 12 cities), task 3 *flag* '
        '("What colour is the flag of <word>?" -> one of its 10 colours). Each task is learned from the model '
        "the previous task left, by one run of the project's training engine "
        "(`kfp_components.trainer.train`, full batch, float32, constant learning rate), every method for "
        "the same number of steps at the smallest learning rate that learns the task (see "
        '"How the methods were matched"):',
        "",
        methods,
        "",
        "OSFT re-decomposes the model the previous task left at the start of every task. *OSFT, growing frozen "
        "share* runs the sequence as the paper describes it (and as PEFT's OSF guide recommends): each task "
        "freezes a larger share of the singular directions than the one before, so that what the earlier "
        "tasks put into the weights, once it is among the dominant directions, stays frozen.",
        "",
        "After pre-training and after each task, the model is scored on every new task (teacher-forced greedy "
        "exact match over the task's facts: every answer token must be the model's top choice), on "
        f"{setting['probe_per_family']} fresh instances of each pre-training family (same exact match; what "
        "general skill is left) and by its perplexity on held-out pre-training text (a different seed of the "
        "same generator). From the accuracy matrix `a[t][i]` (task i after learning task t) come the paper's "
        "average accuracy ACC = mean of a[3][i] and backward transfer BWT = mean over i < 3 of "
        "(a[3][i] - a[i][i]). Two finer measures show what is left of a forgotten task: the answer-token "
        "accuracy (the share of answer tokens that are the model's top choice, teacher-forced: partial "
        "recall), and what kind of answer the model gives on its own (greedy decoding, classified as a code, "
        "a city, a colour or other: whether an earlier task's questions now get the later task's kind of "
        "answer). And for every task, the share of its weight change that the next OSFT run leaves frozen "
        "(outside the block it trains), against the share for a random change of the same weights. "
        f"Seeds {', '.join(map(str, setting['seeds']))} change the new tasks' facts and the engine's seed "
        "(data order, LoRA initialisation); the pre-trained model is the same.",
        "",
        "## Result",
        "",
        *headline_table(result),
        "",
        "![Earlier tasks, pre-training families and held-out perplexity over the sequence](continual.png)",
        "",
        "After each step of the sequence (mean ± std over seeds):",
        "",
        *matrix_table(result),
        "",
        "What the earlier tasks look like after the last task (mean ± std over seeds; answer-token accuracy "
        "counts each answer token that is the model's top choice, teacher-forced; the kind columns classify "
        "the model's own greedy answer as a code, a city or a colour):",
        "",
        *forgetting_table(result),
        "",
        "How much of each task's weight change the next task's OSFT decomposition freezes (share of the "
        "change's energy outside the block the next run trains; for full fine-tuning and LoRA, what an OSFT "
        "run at ratio 0.25 would freeze):",
        "",
        *protected_table(result),
        "",
        "Per pre-training family (mean over seeds):",
        "",
        *family_table(result),
        "",
        f"Diagnostic of the pre-trained model: the inputs of its decomposed projections (on corpus documents) "
        f"put {diag['activation_share_trainable']:.1%} of their energy into the directions OSFT trains at "
        f"ratio 0.25, against {diag['activation_share_isotropic']:.1%} if they "
        "were isotropic.",
        "",
        *FINDINGS,
        "",
        *MATCHING,
        "",
        f"Machine: {machine}. Date: {record['date']}. Runtime: {result['seconds']} s (pre-training not "
        "included).",
    ]
    return "\n".join(lines) + "\n"


def _read(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_report() -> None:
    record = _read(NAME)
    if record is None:
        raise SystemExit(f"no results yet: run `make continual-demo` first ({RESULTS / (NAME + '.json')})")
    plot(record["result"])
    REPORT.write_text(report(record))


def _store(name: str, result: dict[str, Any]) -> None:
    from benchmarks.machine import describe_machine

    record = {"result": result, "machine": describe_machine(), "date": datetime.date.today().isoformat()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render-only", action="store_true", help="rewrite the report and plot from results")
    args = parser.parse_args(argv)
    if not args.render_only:
        print("continual: pre-training (cached), then three tasks with each method and seed ...", flush=True)
        result = run()
        _store(NAME, result)
        print(render(result))
    write_report()
    from benchmarks.run import render as render_performance  # its continual section reads the same results

    render_performance()
    print(f"continual: wrote {REPORT.relative_to(ROOT)}, {PLOT.relative_to(ROOT)} and docs/performance.md")


if __name__ == "__main__":
    main()
