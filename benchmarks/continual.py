"""Continual learning: does OSFT keep an earlier task better than full fine-tuning?

A tiny Qwen2 model first learns task A (synthetic facts: "What is the code of <word>?" -> a 3-digit code)
with full SFT. From that model, task B (different words, "What is the number of <word>?" -> a 3-digit
number) is trained twice with the same budget (steps, constant learning rate, batch): full fine-tuning
(``algorithm="sft"``) and OSFT (``algorithm="osft"``). Training runs in chunks of ``EVAL_EVERY`` steps, each
continuing from the previous chunk's final model, and after every chunk both tasks are scored by
teacher-forced greedy exact match (every answer token must be the model's argmax). Note that each chunk
starts a fresh AdamW state; both methods are treated alike. The final models are also scored with
lm-eval (``generate_until`` custom tasks written to a temporary ``include_path``).

python -m benchmarks.continual    # writes benchmarks/results/continual.json and docs/continual.png
"""

from __future__ import annotations

import datetime
import json
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kfp_components.testing.tiny_model import build_tiny_model
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.train import train

NAME = "continual"
ROOT = Path(__file__).resolve().parents[1]
PLOT = ROOT / "docs" / "continual.png"

N_FACTS = 40
STEPS_A = 150
LR_A = 3e-3
STEPS_B = 40
EVAL_EVERY = 10
LR_B = 3e-3
RANK_RATIO = 0.25
MODEL = {"hidden_size": 128, "num_layers": 2, "intermediate_size": 256}

Fact = tuple[str, str]


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
def _train(model: str, data: str, out: Path, steps: int, lr: float, algorithm: str, scheduler: str) -> str:
    """Train ``steps`` full-batch steps from ``model``; return the final HF model folder."""
    config = TrainingConfig(
        model_name_or_path=model,
        data_path=data,
        output_dir=str(out),
        algorithm=algorithm,  # type: ignore[arg-type]
        osft_unfreeze_rank_ratio=RANK_RATIO,
        dtype="float32",
        max_seq_len=128,
        max_tokens_per_gpu=8192,
        effective_batch_size=N_FACTS,
        num_epochs=10_000,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler=scheduler,  # type: ignore[arg-type]
        warmup_steps=0,
        weight_decay=0.0,
        seed=0,
        log_every_steps=1_000_000,
    )
    return train(config).model_path


@torch.no_grad()
def accuracy(model_path: str, facts: list[Fact]) -> float:
    """Share of facts whose every answer token is the argmax after the chat-formatted question."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    correct = 0
    for question, answer in facts:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + answer_ids])
        predicted = model(ids).logits[0, len(prompt_ids) - 1 : -1].argmax(-1)
        correct += int(predicted.tolist() == answer_ids)
    return correct / len(facts)


def _curve(
    start: str, data_b: str, work: Path, algorithm: str, lr: float, task_a: list[Fact], task_b: list[Fact]
) -> dict[str, list[float]]:
    """Train task B in chunks from ``start`` and score both tasks after each; returns the curves."""
    curve: dict[str, list[float]] = {
        "step": [0],
        "a": [accuracy(start, task_a)],
        "b": [accuracy(start, task_b)],
    }
    model = start
    for chunk in range(STEPS_B // EVAL_EVERY):
        model = _train(
            model, data_b, work / f"{algorithm}_{lr}_{chunk}", EVAL_EVERY, lr, algorithm, "constant"
        )
        curve["step"].append((chunk + 1) * EVAL_EVERY)
        curve["a"].append(accuracy(model, task_a))
        curve["b"].append(accuracy(model, task_b))
    curve["final_model"] = model  # type: ignore[assignment]
    return curve


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
            dtype="float32",
            apply_chat_template=True,
            include_path=str(include_path),
            bootstrap_iters=0,
        )
    )
    metrics = result.metrics
    return {name: round(metrics[f"kfp_continual_{name}_exact_match_strip"], 3) for name in ("a", "b")}


# ------------------------------------------------------------------------------------------------- run
def run() -> dict[str, Any]:
    """Run the experiment; returns the accuracy curves, the lm-eval table and the settings."""
    logging.getLogger("kfp_components").setLevel(logging.WARNING)
    started = time.perf_counter()
    task_a, task_b = make_tasks()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = str(build_tiny_model(work / "base", arch="qwen2", seed=0, **MODEL))
        data_a = _write_chat(work / "a.jsonl", task_a)
        data_b = _write_chat(work / "b.jsonl", task_b)
        model_a = _train(base, data_a, work / "stage_a", STEPS_A, LR_A, "sft", "cosine")
        runs: dict[str, dict[str, Any]] = {}
        for label, algorithm, lr in (("full", "sft", LR_B), ("osft", "osft", LR_B)):
            runs[label] = _curve(model_a, data_b, work, algorithm, lr, task_a, task_b)
        include = work / "tasks"
        write_tasks(include, task_a, task_b)
        lm_eval = {"before": lm_eval_scores(model_a, include, work / "eval_before")}
        for label, curve in runs.items():
            lm_eval[label] = lm_eval_scores(curve.pop("final_model"), include, work / f"eval_{label}")
    return {
        "settings": {
            "model": f"qwen2, hidden {MODEL['hidden_size']}, {MODEL['num_layers']} layers",
            "facts_per_task": N_FACTS,
            "steps_a": STEPS_A,
            "lr_a": LR_A,
            "steps_b": STEPS_B,
            "lr_b": LR_B,
            "eval_every": EVAL_EVERY,
            "osft_unfreeze_rank_ratio": RANK_RATIO,
            "batch": N_FACTS,
        },
        "curves": runs,
        "lm_eval": lm_eval,
        "seconds": round(time.perf_counter() - started, 1),
    }


def plot(result: dict[str, Any], path: Path = PLOT) -> None:
    """Plot task A and task B accuracy over task-B steps for both methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"full": "tab:red", "osft": "tab:blue"}
    for label, curve in result["curves"].items():
        ax.plot(curve["step"], curve["a"], "-o", color=styles[label], label=f"{label}: task A (old)")
        ax.plot(curve["step"], curve["b"], "--s", color=styles[label], label=f"{label}: task B (new)")
    ax.set_xlabel("task-B training steps")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Continual learning on a tiny Qwen2: full fine-tuning vs OSFT")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finding(ev: dict[str, dict[str, float]]) -> str:
    """One honest sentence on what the final lm-eval scores show."""
    kept_full, kept_osft = ev["full"]["a"], ev["osft"]["a"]
    new_full, new_osft = ev["full"]["b"], ev["osft"]["b"]
    if kept_osft > kept_full and new_osft >= new_full - 0.1:
        verdict = "OSFT retained more of task A at comparable task-B accuracy"
    elif kept_osft > kept_full:
        verdict = "OSFT retained more of task A, but learned less of task B in the same budget"
    else:
        verdict = "OSFT did not retain task A better than full fine-tuning on this tiny model"
    return (
        f"Finding: {verdict} (A: OSFT {kept_osft:.2f} vs full {kept_full:.2f}; B: OSFT {new_osft:.2f} vs "
        f"full {new_full:.2f}). One seed, {len(ev)} models, a 2-layer model: indicative only."
    )


def render(result: dict[str, Any]) -> str:
    """The Markdown section for docs/performance.md."""
    s, ev, curves = result["settings"], result["lm_eval"], result["curves"]
    full, osft = curves["full"], curves["osft"]
    lines = [
        "## Continual learning: OSFT vs full fine-tuning",
        "",
        f'A tiny {s["model"]} learns task A ({s["facts_per_task"]} synthetic facts, "What is the code of '
        f'<word>?" -> 3 digits) with full SFT ({s["steps_a"]} steps, lr {s["lr_a"]}), then task B '
        f"({s['facts_per_task']} other facts) twice with the same budget: {s['steps_b']} steps, constant lr "
        f"{s['lr_b']}, batch {s['batch']}: full fine-tuning and OSFT (unfreeze rank ratio "
        f"{s['osft_unfreeze_rank_ratio']}). Final scores from lm-eval (greedy generation, exact match):",
        "",
        "| | task A (old) | task B (new) |",
        "| --- | --- | --- |",
        f"| after task A | {ev['before']['a']:.2f} | {ev['before']['b']:.2f} |",
        f"| after task B, full fine-tuning | {ev['full']['a']:.2f} | {ev['full']['b']:.2f} |",
        f"| after task B, OSFT | {ev['osft']['a']:.2f} | {ev['osft']['b']:.2f} |",
        "",
        f"Accuracy every {s['eval_every']} steps (teacher-forced greedy exact match; each chunk continues "
        "from the previous chunk's model with a fresh optimizer state):",
        "",
        "![Task A and task B accuracy over task-B steps, full fine-tuning vs OSFT](continual.png)",
        "",
        "| step | full: A | full: B | OSFT: A | OSFT: B |",
        "| --- | --- | --- | --- | --- |",
    ]
    for i, step in enumerate(full["step"]):
        lines.append(
            f"| {step} | {full['a'][i]:.2f} | {full['b'][i]:.2f} | {osft['a'][i]:.2f} | {osft['b'][i]:.2f} |"
        )
    lines += ["", _finding(ev), "", f"Runtime: {result['seconds']} s."]
    return "\n".join(lines)


def main() -> None:
    from benchmarks.machine import describe_machine

    result = run()
    plot(result)
    record = {"result": result, "machine": describe_machine(), "date": datetime.date.today().isoformat()}
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{NAME}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(render(result))


if __name__ == "__main__":
    main()
