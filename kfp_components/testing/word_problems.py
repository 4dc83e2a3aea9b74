"""Multi-step arithmetic word problems, generated from a seed, with worked solutions ending in ``#### N``.

They are the bundled reasoning data: ``examples/reasoning_problems.jsonl`` (problems to distil, ``prompt`` +
``answer``), ``examples/reasoning_problems_eval.jsonl`` (held-out ones) and the lm-eval task
``kfp_reasoning_arithmetic`` (:mod:`kfp_components.evaluation.tasks`). Each problem takes two or three steps
(add, take away, share, multiply) on small whole numbers; every intermediate result and the answer are whole
and not negative, and the solution states each step, as a teacher's chain of thought would.

:func:`copy_problems` makes a much easier family for tiny models (the answer is a number the problem states,
reached through a zero-change step), so a test can show a student learning from a teacher in a few steps.

python -m kfp_components.testing.word_problems   # rewrite the bundled files
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jia", "Kofi", "Lena"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "shells", "cards", "coins", "stamps", "cookies"]

Problem = tuple[str, str, int]  # question, worked solution (ending "#### N"), answer


def _buy_then_give(rng: random.Random, name: str, item: str) -> Problem:
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    c = rng.randint(1, a + b)
    total = a + b
    question = (
        f"{name} has {a} {item}. {name} buys {b} more, then gives {c} to a friend. "
        f"How many {item} does {name} have now?"
    )
    solution = (
        f"{name} starts with {a} {item} and buys {b} more: {a} + {b} = {total}. "
        f"Giving away {c} leaves {total} - {c} = {total - c}.\n#### {total - c}"
    )
    return question, solution, total - c


def _boxes(rng: random.Random, name: str, item: str) -> Problem:
    boxes, each = rng.randint(2, 9), rng.randint(2, 9)
    eaten = rng.randint(1, boxes * each)
    total = boxes * each
    question = (
        f"{name} has {boxes} boxes with {each} {item} in each box. {name} uses {eaten} of them. "
        f"How many {item} are left?"
    )
    solution = (
        f"There are {boxes} x {each} = {total} {item}. After using {eaten}, {total} - {eaten} = "
        f"{total - eaten} are left.\n#### {total - eaten}"
    )
    return question, solution, total - eaten


def _share(rng: random.Random, name: str, item: str) -> Problem:
    friends, each = rng.randint(2, 6), rng.randint(2, 9)
    extra = rng.randint(1, 12)
    total = friends * each
    question = (
        f"{name} shares {total} {item} equally among {friends} friends, then each friend finds {extra} more. "
        f"How many {item} does each friend have?"
    )
    solution = (
        f"Each friend first gets {total} / {friends} = {each}. With {extra} more, each has {each} + {extra} = "
        f"{each + extra}.\n#### {each + extra}"
    )
    return question, solution, each + extra


def _three_steps(rng: random.Random, name: str, item: str) -> Problem:
    a, b = rng.randint(5, 30), rng.randint(2, 5)
    c = rng.randint(1, a * b)
    d = rng.randint(1, 10)
    question = (
        f"{name} collects {a} {item} a day for {b} days, loses {c}, then finds {d}. "
        f"How many {item} does {name} have?"
    )
    total = a * b
    solution = (
        f"In {b} days {name} collects {a} x {b} = {total}. After losing {c}: {total} - {c} = {total - c}. "
        f"After finding {d}: {total - c} + {d} = {total - c + d}.\n#### {total - c + d}"
    )
    return question, solution, total - c + d


KINDS: tuple[Callable[[random.Random, str, str], Problem], ...] = (
    _buy_then_give,
    _boxes,
    _share,
    _three_steps,
)


def word_problems(count: int, seed: int) -> list[dict[str, str]]:
    """``count`` distinct problems (``prompt``, ``answer``, ``solution``), deterministic in ``seed``."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    while len(rows) < count:
        kind = rng.choice(KINDS)
        question, solution, answer = kind(rng, rng.choice(NAMES), rng.choice(ITEMS))
        if question in seen:
            continue
        seen.add(question)
        rows.append({"prompt": question, "answer": str(answer), "solution": solution})
    return rows


def copy_problems(count: int, seed: int, names: list[str] | None = None) -> list[dict[str, str]]:
    """Easy problems whose answer is the single digit they state (``prompt``, ``answer``, ``solution``)."""
    rng = random.Random(seed)
    names = names or NAMES
    rows = []
    for _ in range(count):
        name, item, n = rng.choice(names), rng.choice(ITEMS), rng.randint(1, 9)
        rows.append(
            {
                "prompt": f"{name} has {n} {item} and gets 0 more. How many {item} now?",
                "answer": str(n),
                "solution": f"{n} + 0 = {n}.\n#### {n}",
            }
        )
    return rows


def _write(rows: list[dict[str, str]], path: Path, keys: tuple[str, ...]) -> None:
    path.write_text("".join(json.dumps({k: r[k] for k in keys}) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    root = Path(__file__).resolve().parents[2]
    problems = word_problems(260, seed=2026)
    _write(problems[:200], root / "examples" / "reasoning_problems.jsonl", ("prompt", "answer"))
    _write(problems[200:], root / "examples" / "reasoning_problems_eval.jsonl", ("prompt", "answer"))
    tasks = root / "kfp_components" / "evaluation" / "tasks"
    taken = {r["prompt"] for r in problems}
    held_out = [r for r in word_problems(200, seed=7) if r["prompt"] not in taken][:100]
    rows = [{"question": r["prompt"], "answer": r["answer"], "solution": r["solution"]} for r in held_out]
    _write(rows, tasks / "reasoning_arithmetic.jsonl", ("question", "answer", "solution"))


if __name__ == "__main__":
    main()
