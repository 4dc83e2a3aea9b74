"""Continual learning: does OSFT keep an earlier task better than full fine-tuning?

A tiny Qwen2 model first learns task A (synthetic facts: "What is the code of <word>?" -> a 3-digit code)
with full SFT. From that model, task B (different words, "What is the number of <word>?" -> a 3-digit
number) is trained twice with the same budget (steps, constant learning rate, batch): full fine-tuning
(``algorithm="sft"``) and OSFT (``algorithm="osft"``). Training runs in chunks of ``eval_every`` steps, each
continuing from the previous chunk's final model (each chunk starts a fresh AdamW state; both methods are
treated alike), and after every chunk both tasks are scored: teacher-forced greedy exact match (every answer
token must be the model's argmax) and, for task A, the mean negative log-likelihood of the answer tokens (a
graded measure of how much of A is left). The final models are also scored with lm-eval (``generate_until``
custom tasks written to a temporary ``include_path``).

Two diagnostics explain what OSFT can protect in a given model: the share of task A's weight change that
lies outside the subspace OSFT trains, and the share of task A's input activations that the trainable
(smallest) singular directions see. ``--sweep`` repeats the experiment over learning rates, rank ratios,
model sizes and with the parameters OSFT does not decompose frozen.

python -m benchmarks.continual           # make continual-demo: results/continual.json, docs/continual.png
python -m benchmarks.continual --sweep   # also results/continual_sweep.json
# both rewrite docs/continual-learning.md from the stored results
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kfp_components.testing.tiny_model import build_tiny_model
from kfp_components.trainer import osft
from kfp_components.trainer import train as train_module
from kfp_components.trainer.config import TrainingConfig

NAME = "continual"
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PLOT = ROOT / "docs" / "continual.png"
REPORT = ROOT / "docs" / "continual-learning.md"

N_FACTS = 40
STEPS_A = 150
LR_A = 3e-3
#: Task B trains until both methods have learned it (exact match 1.0) so "A at comparable B" can be read off.
MATCHED_B = 0.9
Fact = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class Setting:
    """One task-B experiment: the model, and the budget both methods get."""

    name: str = "main"
    hidden_size: int = 128
    num_layers: int = 2
    intermediate_size: int = 256
    unfreeze_rank_ratio: float = 0.25
    lr_b: float = 1e-3
    steps_b: int = 120
    eval_every: int = 20
    #: none, embeddings (input embeddings and lm_head) or non_decomposed (everything OSFT does not decompose:
    #: embeddings, lm_head, norms; biases stay trainable) are frozen in both methods. A diagnostic only.
    freeze: str = "none"

    @property
    def model(self) -> dict[str, int]:
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "intermediate_size": self.intermediate_size,
        }

    def describe(self) -> str:
        return f"qwen2, hidden {self.hidden_size}, {self.num_layers} layers"


MAIN = Setting()
SWEEP = (
    MAIN,
    dataclasses.replace(MAIN, name="rank ratio 0.1", unfreeze_rank_ratio=0.1),
    dataclasses.replace(MAIN, name="rank ratio 0.5", unfreeze_rank_ratio=0.5),
    dataclasses.replace(MAIN, name="lr 3e-3, 60 steps", lr_b=3e-3, steps_b=60, eval_every=10),
    dataclasses.replace(MAIN, name="lr 3e-4, 200 steps", lr_b=3e-4, steps_b=200),
    dataclasses.replace(
        MAIN, name="hidden 256, 4 layers", hidden_size=256, num_layers=4, intermediate_size=512
    ),
    dataclasses.replace(
        MAIN, name="embeddings and lm_head frozen", freeze="embeddings", lr_b=3e-3, steps_b=60
    ),
    dataclasses.replace(
        MAIN, name="only decomposed weights train", freeze="non_decomposed", lr_b=3e-3, steps_b=60
    ),
)


# ------------------------------------------------------------------------------------------------ data
def _words(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    """Distinct pronounceable pseudo-words that are not in ``taken``."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: list[str] = []
    while len(words) < count:
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(3))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def make_tasks(seed: int = 0) -> tuple[list[Fact], list[Fact]]:
    """Task A and task B: ``N_FACTS`` (question, answer) pairs each, over disjoint words."""
    rng = random.Random(seed)
    taken: set[str] = set()
    task_a = [
        (f"What is the code of {w}?", f"{rng.randrange(100, 1000)}") for w in _words(rng, N_FACTS, taken)
    ]
    task_b = [
        (f"What is the number of {w}?", f"{rng.randrange(100, 1000)}") for w in _words(rng, N_FACTS, taken)
    ]
    return task_a, task_b


def _write_chat(path: Path, facts: list[Fact]) -> str:
    with path.open("w", encoding="utf-8") as out:
        for question, answer in facts:
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            out.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


# ------------------------------------------------------------------------------------------- training
@contextlib.contextmanager
def _frozen(kind: str) -> Iterator[None]:
    """Freeze parameters of the loaded model in the trainer (a diagnostic; ``none`` changes nothing)."""
    if kind == "none":
        yield
        return
    load_model = train_module.load_model

    def load_and_freeze(config: TrainingConfig, info: Any, **kwargs: Any) -> Any:
        model, save_dtype = load_model(config, info, **kwargs)
        if kind == "embeddings":
            frozen = [*model.get_input_embeddings().parameters(), *model.get_output_embeddings().parameters()]
        else:  # non_decomposed: only the target projections train (the decomposed factors, or the dense weights)
            targets = list(osft.osft_modules(model).values()) or [
                model.get_submodule(name) for name in osft.find_osft_targets(model)
            ]
            keep = {id(p) for module in targets for p in module.parameters()}
            frozen = [p for p in model.parameters() if id(p) not in keep]
        for parameter in frozen:
            parameter.requires_grad_(False)
        return model, save_dtype

    with mock.patch.object(train_module, "load_model", load_and_freeze):
        yield


def _train(
    model: str,
    data: str,
    out: Path,
    steps: int,
    lr: float,
    algorithm: str,
    scheduler: str,
    ratio: float = 0.25,
) -> str:
    """Train ``steps`` full-batch steps from ``model``; return the final HF model folder."""
    config = TrainingConfig(
        model_name_or_path=model,
        data_path=data,
        output_dir=str(out),
        algorithm=algorithm,  # type: ignore[arg-type]
        unfreeze_rank_ratio=ratio,
        torch_dtype="float32",
        max_seq_len=128,
        max_tokens_per_gpu=8192,
        effective_batch_size=N_FACTS,
        num_train_epochs=10_000,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler=scheduler,  # type: ignore[arg-type]
        warmup_steps=0,
        weight_decay=0.0,
        seed=0,
        log_every_steps=1_000_000,
    )
    return train_module.train(config).model_path


# ------------------------------------------------------------------------------------------- scoring
def _model(model_path: str) -> Any:
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def _load(model_path: str) -> tuple[Any, Any]:
    return AutoTokenizer.from_pretrained(model_path), _model(model_path)


@torch.no_grad()
def _answer_scores(tokenizer: Any, model: Any, facts: list[Fact]) -> tuple[float, float]:
    """(exact match, mean answer-token NLL): teacher-forced, after the chat-formatted question."""
    correct, nll, tokens = 0, 0.0, 0
    for question, answer in facts:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0, len(prompt_ids) - 1 : -1]
        correct += int(logits.argmax(-1).tolist() == answer_ids)
        log_probs = logits.log_softmax(-1)[torch.arange(len(answer_ids)), torch.tensor(answer_ids)]
        nll -= float(log_probs.sum())
        tokens += len(answer_ids)
    return correct / len(facts), nll / tokens


def scores(model_path: str, task_a: list[Fact], task_b: list[Fact]) -> dict[str, float]:
    """Exact match on both tasks and task A's answer NLL."""
    tokenizer, model = _load(model_path)
    a, nll_a = _answer_scores(tokenizer, model, task_a)
    b, _ = _answer_scores(tokenizer, model, task_b)
    return {"a": a, "b": b, "nll_a": round(nll_a, 3)}


# ---------------------------------------------------------------------------------------- diagnostics
@torch.no_grad()
def weight_change_outside_trainable(base_path: str, model_a_path: str, ratio: float) -> float:
    """Share of task A's weight change (W_A - W_init, squared Frobenius) outside what OSFT on W_A trains.

    OSFT's updates of a target ``W`` lie in ``(I - U_h U_h^T) . (I - V_h V_h^T)`` (the complement of the
    top singular directions on both sides); a share near 1 means task A was written into the directions
    OSFT then freezes.
    """
    base, tuned = _model(base_path), _model(model_a_path)
    total = outside = 0.0
    for name in osft.find_osft_targets(tuned):
        weight = tuned.get_submodule(name).weight.detach()
        change = weight - base.get_submodule(name).weight.detach()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        k = osft.num_frozen_directions(s.numel(), ratio)
        trainable = change - u[:, :k] @ (u[:, :k].T @ change)
        trainable = trainable - (trainable @ vh[:k].T) @ vh[:k]
        total += float(change.pow(2).sum())
        outside += float(change.pow(2).sum() - trainable.pow(2).sum())
    return outside / total


@torch.no_grad()
def activation_share(model_path: str, facts: list[Fact], ratio: float) -> tuple[float, float]:
    """(share of task A's input activations in the trainable singular directions, the isotropic share).

    Averaged over the targets. OSFT's update changes a layer's output only through the part of its input
    that lies in the trainable right-singular directions; with isotropic activations that part would be
    ``(r - k) / d_in``. The lower the measured share against it, the less an OSFT update touches task A.
    """
    tokenizer, model = _load(model_path)
    names = osft.find_osft_targets(model)
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda _module, args, _out, name=name: inputs[name].append(args[0][0])
        )
        for name in names
    ]
    for question, answer in facts:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
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
    return sum(measured) / len(measured), sum(isotropic) / len(isotropic)


# ---------------------------------------------------------------------------------------------- lm-eval
_UTILS = '''"""Loaders for the continual-learning benchmark's tasks."""
import json
from pathlib import Path

import datasets

_HERE = Path(__file__).resolve().parent


def _load(name):
    rows = [json.loads(line) for line in (_HERE / name).read_text(encoding="utf-8").splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def task_a(**_):
    return _load("task_a.jsonl")


def task_b(**_):
    return _load("task_b.jsonl")
'''

_YAML = """task: kfp_continual_{name}
custom_dataset: !function utils.task_{name}
output_type: generate_until
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n", "<|im_end|>"]
  max_gen_toks: 6
  do_sample: false
filter_list:
  - name: strip
    filter:
      - function: regex
        regex_pattern: "(\\\\d+)"
        group_select: 0
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_tasks(folder: Path, task_a: list[Fact], task_b: list[Fact]) -> None:
    """Write the two lm-eval task YAMLs, their loader module and their data into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "utils.py").write_text(_UTILS)
    for name, facts in (("a", task_a), ("b", task_b)):
        rows = "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in facts)
        (folder / f"task_{name}.jsonl").write_text(rows)
        (folder / f"kfp_continual_{name}.yaml").write_text(_YAML.format(name=name))


def lm_eval_scores(model_path: str, include_path: Path, output_dir: Path) -> dict[str, float]:
    """lm-eval exact match (greedy generation, chat template) of ``model_path`` on both tasks."""
    from kfp_components.evaluation.runner import EvalConfig, run_evaluation

    result = run_evaluation(
        EvalConfig(
            model_path=model_path,
            tasks=["kfp_continual_a", "kfp_continual_b"],
            output_dir=str(output_dir),
            batch_size=16,
            device="cpu",
            torch_dtype="float32",
            apply_chat_template=True,
            include_path=str(include_path),
            bootstrap_iters=0,
        )
    )
    metrics = result.metrics
    return {name: round(metrics[f"kfp_continual_{name}_exact_match_strip"], 3) for name in ("a", "b")}


#: What the sweep shows, written from the stored results of 2026-11-21 (rendered into the report).
FINDINGS = [
    "### What this shows",
    "",
    "- **The direction of the paper's claim holds, the size does not.** With the same budget both methods "
    "learn task B completely; full fine-tuning then has no trace of task A left (answer NLL near that of a "
    "model that confidently says other numbers), OSFT keeps some (exact match 0.15, NLL about 3). At "
    "comparable task-B accuracy OSFT keeps at least as much of A, with a lower answer NLL, in every setting "
    "where both reach it. But OSFT loses "
    "most of A too, and full fine-tuning at a lower learning rate (lr 3e-4 row) reaches B >= 0.9 with about "
    "as much of A left as OSFT at lr 1e-3: on this model, OSFT's advantage is close to that of simply "
    "training more gently.",
    "- **Where task A lives is not the problem.** About 99% of the weight change that learning A made lies in "
    "the directions OSFT then freezes, and A's activations put about a third of the isotropic share of their "
    "energy into the directions OSFT trains: the premise of the method holds in the projections it decomposes.",
    "- **The forgetting goes through the parameters OSFT does not decompose.** Embeddings and the LM head "
    "are not decomposed and train normally under OSFT (see trainer.md), and in this model they are 47% of all "
    "parameters (at hidden 128 and a 1,024-token vocabulary), against about 15% in Qwen2.5-1.5B. With them "
    "frozen, OSFT learns nothing of B in 60 steps at lr 3e-3 (B 0.00, against 1.00 with them trainable): it had been learning B mostly through "
    "them, and overwriting A there, since both tasks answer with the same digit tokens. The trainable part of "
    "each projection is small: 32 of 128 directions at ratio 0.25, against 384 of 1,536 in Qwen2.5-1.5B. Even "
    "when only the decomposed weights train, A still degrades (exact match 0.40 after 60 steps) while B is "
    "not learned: the 6% of A's activation energy in the trainable directions is enough to disturb exact "
    "3-digit recall, an all-or-nothing score.",
    "- **Rank ratio, learning rate, steps and the size that fits here do not change the picture.** A smaller "
    "ratio (0.1) keeps about as much of A and learns B a little slower; 0.5 learns B sooner and ends with "
    "less of A; a "
    "4-layer model of hidden 256 forgets more. Models large enough for the paper's regime (billions of "
    "parameters, pretrained, with strongly anisotropic activations) cannot be trained on this machine; the "
    "same pipeline runs them on a GPU cluster (`phase_02_train_man_train_unfreeze`), and that is where the "
    "size of the effect should be judged.",
]


# ------------------------------------------------------------------------------------------------- run
def _curve(
    start: str,
    start_scores: dict[str, float],
    data_b: str,
    work: Path,
    setting: Setting,
    algorithm: str,
    tasks: tuple,
) -> dict[str, Any]:
    """Train task B in chunks from ``start`` (scored ``start_scores``) and score after each chunk; returns
    the curves and the final model."""
    curve: dict[str, Any] = {"step": [0], **{key: [value] for key, value in start_scores.items()}}
    model = start
    with _frozen(setting.freeze):
        for chunk in range(setting.steps_b // setting.eval_every):
            out = work / f"{algorithm}_{chunk}"
            model = _train(
                model,
                data_b,
                out,
                setting.eval_every,
                setting.lr_b,
                algorithm,
                "constant",
                setting.unfreeze_rank_ratio,
            )
            curve["step"].append((chunk + 1) * setting.eval_every)
            for key, value in scores(model, *tasks).items():
                curve[key].append(value)
    curve["final_model"] = model
    return curve


def at_matched_b(curve: dict[str, Any], threshold: float = MATCHED_B) -> dict[str, float] | None:
    """Scores at the first evaluation where task B reached ``threshold``; None when it never did."""
    for i, b in enumerate(curve["b"]):
        if b >= threshold:
            return {"step": curve["step"][i], "a": curve["a"][i], "b": b, "nll_a": curve["nll_a"][i]}
    return None


class _TaskAModels:
    """Task-A models (full SFT from a fresh tiny model), built once per model shape."""

    def __init__(self, work: Path, data_a: str) -> None:
        self.work, self.data_a, self.built = work, data_a, {}

    def get(self, setting: Setting) -> tuple[str, str]:
        key = "x".join(str(v) for v in setting.model.values())
        if key not in self.built:
            base = str(build_tiny_model(self.work / f"base_{key}", arch="qwen2", seed=0, **setting.model))
            self.built[key] = (
                base,
                _train(base, self.data_a, self.work / f"a_{key}", STEPS_A, LR_A, "sft", "cosine"),
            )
        return self.built[key]


def experiment(
    setting: Setting, models: _TaskAModels, data_b: str, work: Path, tasks: tuple
) -> dict[str, Any]:
    """Task B from the task-A model with full fine-tuning and OSFT; curves, matched scores, diagnostics."""
    base, model_a = models.get(setting)
    ratio = setting.unfreeze_rank_ratio
    measured, isotropic = activation_share(model_a, tasks[0], ratio)
    start_scores = scores(model_a, *tasks)  # both methods start from the same model
    curves = {
        label: _curve(model_a, start_scores, data_b, work / label, setting, algorithm, tasks)
        for label, algorithm in (("full", "sft"), ("osft", "osft"))
    }
    return {
        "setting": dataclasses.asdict(setting),
        "curves": curves,
        "matched": {label: at_matched_b(curve) for label, curve in curves.items()},
        "diagnostics": {
            "weight_change_outside_trainable": round(
                weight_change_outside_trainable(base, model_a, ratio), 4
            ),
            "activation_share_trainable": round(measured, 4),
            "activation_share_isotropic": round(isotropic, 4),
        },
    }


def _quiet() -> None:
    logging.getLogger("kfp_components").setLevel(logging.WARNING)


def run() -> dict[str, Any]:
    """The main experiment: curves, lm-eval scores of the final models, diagnostics and the settings."""
    _quiet()
    started = time.perf_counter()
    task_a, task_b = make_tasks()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = _TaskAModels(work, _write_chat(work / "a.jsonl", task_a))
        result = experiment(
            MAIN, models, _write_chat(work / "b.jsonl", task_b), work / "main", (task_a, task_b)
        )
        include = work / "tasks"
        write_tasks(include, task_a, task_b)
        lm_eval = {"before": lm_eval_scores(models.get(MAIN)[1], include, work / "eval_before")}
        for label, curve in result["curves"].items():
            lm_eval[label] = lm_eval_scores(curve.pop("final_model"), include, work / f"eval_{label}")
    result.update(
        {
            "task": {"facts_per_task": N_FACTS, "steps_a": STEPS_A, "lr_a": LR_A, "batch": N_FACTS},
            "lm_eval": lm_eval,
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    return result


def run_sweep() -> dict[str, Any]:
    """Every setting of :data:`SWEEP` (no lm-eval): final and matched scores and diagnostics."""
    _quiet()
    started = time.perf_counter()
    task_a, task_b = make_tasks()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = _TaskAModels(work, _write_chat(work / "a.jsonl", task_a))
        data_b = _write_chat(work / "b.jsonl", task_b)
        for i, setting in enumerate(SWEEP):
            print(f"continual: sweep {i + 1}/{len(SWEEP)}: {setting.name}", flush=True)
            result = experiment(setting, models, data_b, work / f"sweep_{i}", (task_a, task_b))
            for curve in result["curves"].values():
                curve.pop("final_model")
            rows.append(result)
    return {"rows": rows, "seconds": round(time.perf_counter() - started, 1)}


# ------------------------------------------------------------------------------------------- reporting
def plot(result: dict[str, Any], path: Path = PLOT) -> None:
    """Accuracy on A and B, and task A's answer NLL, over task-B steps for both methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, nll) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"full": "tab:red", "osft": "tab:blue"}
    names = {"full": "full fine-tuning", "osft": "OSFT"}
    for label, curve in result["curves"].items():
        colour, name = colours[label], names[label]
        acc.plot(curve["step"], curve["a"], "-o", color=colour, label=f"{name}: task A (old)")
        acc.plot(curve["step"], curve["b"], "--s", color=colour, label=f"{name}: task B (new)")
        nll.plot(curve["step"], curve["nll_a"], "-o", color=colour, label=name)
    acc.set_ylabel("exact-match accuracy")
    acc.set_ylim(-0.02, 1.02)
    acc.set_title("Accuracy on the old and the new task")
    nll.set_ylabel("task A answer NLL (nats/token, lower = kept)")
    nll.set_title("How much of task A is left")
    for ax in (acc, nll):
        ax.set_xlabel("task-B training steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Continual learning on a tiny model ({MAIN.describe()}): full fine-tuning vs OSFT")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _matched(result: dict[str, Any], label: str) -> str:
    point = result["matched"][label]
    if point is None:
        return "never"
    return f"step {point['step']}: A {point['a']:.2f}, A NLL {point['nll_a']:.2f}"


def _finding(result: dict[str, Any]) -> str:
    """One honest sentence on what the main experiment shows."""
    full, osft_ = result["curves"]["full"], result["curves"]["osft"]
    mf, mo = result["matched"]["full"], result["matched"]["osft"]
    kept = osft_["nll_a"][-1] < full["nll_a"][-1] and osft_["a"][-1] >= full["a"][-1]
    if mf and mo and mo["a"] > mf["a"] and mo["nll_a"] < mf["nll_a"]:
        verdict = "OSFT kept more of task A than full fine-tuning at comparable task-B accuracy"
    elif kept:
        verdict = "OSFT kept more of task A after the same budget, but not at comparable task-B accuracy"
    else:
        verdict = "OSFT did not keep task A better than full fine-tuning"
    return (
        f"{verdict} (after {full['step'][-1]} steps: A {osft_['a'][-1]:.2f} vs {full['a'][-1]:.2f}, "
        f"A NLL {osft_['nll_a'][-1]:.2f} vs {full['nll_a'][-1]:.2f}; B {osft_['b'][-1]:.2f} vs "
        f"{full['b'][-1]:.2f}); but most of task A is lost with both methods on this tiny model."
    )


def render(result: dict[str, Any]) -> str:
    """The short section of docs/performance.md (the full report is docs/continual-learning.md)."""
    ev = result["lm_eval"]
    return "\n".join(
        [
            "## Continual learning: OSFT vs full fine-tuning",
            "",
            f"Task A, then task B on a tiny {MAIN.describe()}; lm-eval exact match of the final models "
            "(the experiment, the curves, the sweep and what they show: [continual-learning.md](continual-learning.md)):",
            "",
            "| | task A (old) | task B (new) |",
            "| --- | --- | --- |",
            f"| after task A | {ev['before']['a']:.2f} | {ev['before']['b']:.2f} |",
            f"| after task B, full fine-tuning | {ev['full']['a']:.2f} | {ev['full']['b']:.2f} |",
            f"| after task B, OSFT | {ev['osft']['a']:.2f} | {ev['osft']['b']:.2f} |",
            "",
            _finding(result),
            "",
            f"Runtime: {result['seconds']} s (`make continual-demo`).",
        ]
    )


def _sweep_table(sweep: dict[str, Any]) -> list[str]:
    lines = [
        "| setting | full: A / B / A NLL | OSFT: A / B / A NLL | full at B >= 0.9 | OSFT at B >= 0.9 "
        "| A's change outside OSFT's subspace | A's activations in trainable directions (isotropic) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in sweep["rows"]:
        s, d = row["setting"], row["diagnostics"]
        final = {
            label: f"{c['a'][-1]:.2f} / {c['b'][-1]:.2f} / {c['nll_a'][-1]:.2f}"
            for label, c in row["curves"].items()
        }
        budget = f"{s['steps_b']} steps at lr {s['lr_b']:g}, ratio {s['unfreeze_rank_ratio']}"
        lines.append(
            f"| {s['name']} ({budget}) | {final['full']} | {final['osft']} | {_matched(row, 'full')} "
            f"| {_matched(row, 'osft')} | {d['weight_change_outside_trainable']:.3f} "
            f"| {d['activation_share_trainable']:.3f} ({d['activation_share_isotropic']:.3f}) |"
        )
    return lines


def report(record: dict[str, Any], sweep_record: dict[str, Any] | None) -> str:
    """docs/continual-learning.md from the stored main result and, when present, the sweep."""
    result = record["result"]
    ev, full, osft_, d = (
        result["lm_eval"],
        result["curves"]["full"],
        result["curves"]["osft"],
        result["diagnostics"],
    )
    s, task = result["setting"], result["task"]
    machine = ", ".join(f"{k} {v}" for k, v in record["machine"].items())
    lines = [
        "# Continual learning: OSFT vs full fine-tuning",
        "",
        "OSFT's claim (Nayak et al. 2025, arXiv:2504.07097) is that a model fine-tuned only in the directions "
        "orthogonal to each weight's top singular subspace learns a new task while keeping what it knew. This "
        "page tests that claim on a model small enough to train here, and explains what it shows.",
        "",
        "```bash",
        "make continual-demo                                # this experiment: about 1 minute on 2 CPU cores",
        ".venv/bin/python -m benchmarks.continual --sweep   # and the sweep below: about 5 more",
        "```",
        "",
        "## The experiment",
        "",
        f"A tiny model ({MAIN.describe()}; random weights, a tokenizer trained locally) learns **task A**: "
        f'{task["facts_per_task"]} synthetic facts, "What is the code of <word>?" -> a 3-digit code, with full '
        f"SFT ({task['steps_a']} steps, lr {task['lr_a']}). From that model **task B** ({task['facts_per_task']} "
        'other words, "What is the number of <word>?" -> a 3-digit number) is trained twice on the same budget: '
        f"{s['steps_b']} steps, constant lr {s['lr_b']:g}, batch {task['batch']}, once with full fine-tuning and "
        f"once with OSFT (unfreeze rank ratio {s['unfreeze_rank_ratio']}). Both are scored every "
        f"{s['eval_every']} steps: exact match on A and B (teacher-forced greedy: every answer token must be the "
        "model's top choice) and the mean negative log-likelihood of A's answer tokens, a graded measure of how "
        f"much of A is left (about 0 when A is known; {math.log(10):.1f} for a uniform guess among the ten digits; "
        "higher when the model confidently answers with other numbers). The final models are also scored with lm-eval (greedy generation, "
        "`generate_until` custom tasks).",
        "",
        "## Result",
        "",
        "| lm-eval exact match | task A (old) | task B (new) |",
        "| --- | --- | --- |",
        f"| after task A | {ev['before']['a']:.2f} | {ev['before']['b']:.2f} |",
        f"| after task B, full fine-tuning | {ev['full']['a']:.2f} | {ev['full']['b']:.2f} |",
        f"| after task B, OSFT | {ev['osft']['a']:.2f} | {ev['osft']['b']:.2f} |",
        "",
        f"At comparable task-B accuracy (the first evaluation with B >= {MATCHED_B}): full fine-tuning "
        f"{_matched(result, 'full')}; OSFT {_matched(result, 'osft')}.",
        "",
        "![Task A and task B accuracy and task A's answer NLL over task-B steps](continual.png)",
        "",
        "| step | full: A | full: B | full: A NLL | OSFT: A | OSFT: B | OSFT: A NLL |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, step in enumerate(full["step"]):
        lines.append(
            f"| {step} | {full['a'][i]:.2f} | {full['b'][i]:.2f} | {full['nll_a'][i]:.2f} "
            f"| {osft_['a'][i]:.2f} | {osft_['b'][i]:.2f} | {osft_['nll_a'][i]:.2f} |"
        )
    lines += [
        "",
        f"**{_finding(result)}**",
        "",
        f"Diagnostics of the task-A model: {d['weight_change_outside_trainable']:.1%} of task A's weight change "
        "lies outside the subspace OSFT trains (so A was written into the directions OSFT freezes), and task A's "
        f"input activations put {d['activation_share_trainable']:.1%} of their energy into the trainable "
        f"directions, against {d['activation_share_isotropic']:.1%} if they were isotropic.",
        "",
        f"Machine: {machine}. Date: {record['date']}. Runtime: {result['seconds']} s. One seed.",
    ]
    if sweep_record:
        sweep = sweep_record["result"]
        lines += [
            "",
            "## Why the effect is small here: the sweep",
            "",
            "The same experiment (no lm-eval) over the levers that could matter. Final scores after the budget, "
            f"then the first evaluation where task B reached {MATCHED_B}, then the two diagnostics.",
            "",
            *_sweep_table(sweep),
            "",
            f"Runtime: {sweep['seconds']} s. Date: {sweep_record['date']}.",
            "",
            *FINDINGS,
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
    REPORT.write_text(report(record, _read(f"{NAME}_sweep")))


def _store(name: str, result: dict[str, Any]) -> None:
    from benchmarks.machine import describe_machine

    record = {"result": result, "machine": describe_machine(), "date": datetime.date.today().isoformat()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also run the sweep of settings (about 5 min)")
    parser.add_argument("--render-only", action="store_true", help="rewrite the report and plot from results")
    args = parser.parse_args(argv)
    if not args.render_only:
        print("continual: task A, then task B with full fine-tuning and with OSFT ...", flush=True)
        result = run()
        _store(NAME, result)
        print(render(result))
        if args.sweep:
            _store(f"{NAME}_sweep", run_sweep())
    write_report()
    from benchmarks.run import render as render_performance  # its continual section reads the same results

    render_performance()
    print(f"continual: wrote {REPORT.relative_to(ROOT)}, {PLOT.relative_to(ROOT)} and docs/performance.md")


if __name__ == "__main__":
    main()
