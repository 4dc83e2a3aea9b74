"""Distilling step by step (Hsieh et al. 2023): each reasoning trace becomes two training targets.

:func:`step_by_step_targets` turns ``messages`` rows whose last turn is a teacher's trace (a
``synthesize_reasoning_data`` output, or traces written before) into the two tasks of the method: the problem
after ``rationale_prefix`` with the trace as its target (loss weight ``rationale_weight``), and, once per
problem, the problem after ``label_prefix`` with the answer alone (``#### <answer>``, weight 1). The rows keep
the ``weight`` column that the engine's SFT loss reads. The cot_distillation stage and the compiled chains'
step both use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kfp_components.typed_config import ConfigError


def step_by_step_targets(
    traces: Path,
    target: Path,
    *,
    rationale_prefix: str,
    label_prefix: str,
    rationale_weight: float,
    answer_column: str = "answer",
) -> int:
    """Write the two targets of every trace of ``traces`` to ``target`` (never half-written); the number of
    rows written. The reference answer is the row's ``answer`` column, else ``answer_column``; a
    :class:`ConfigError` at ``distillation_mode`` when no row has one, at ``label_prefix`` when the two
    prefixes are the same (nothing would tell the tasks apart)."""
    from kfp_components.feedback.comparisons import write_jsonl
    from kfp_components.rewards.answers import extract_answer

    if rationale_prefix == label_prefix:
        raise ConfigError("label_prefix", "must differ from rationale_prefix: they tell the two tasks apart")

    rows: list[dict[str, Any]] = []
    answered: set[str] = set()
    for line in traces.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        messages = row["messages"]
        problem, trace = messages[:-1], messages[-1]["content"]
        reference = row.get("answer", row.get(answer_column))
        key = json.dumps(problem, sort_keys=True)
        answer = None
        if reference is not None and key not in answered:  # one answer target per problem
            answered.add(key)
            answer = extract_answer(str(reference)) or str(reference).strip()
        rows.append(
            {
                "messages": [
                    *with_prefix(problem, rationale_prefix),
                    {"role": "assistant", "content": trace},
                ],
                "weight": rationale_weight,
            }
        )
        if answer is not None:
            rows.append(
                {
                    "messages": [
                        *with_prefix(problem, label_prefix),
                        {"role": "assistant", "content": f"#### {answer}"},
                    ],
                    "weight": 1.0,
                }
            )
    if not answered:
        raise ConfigError(
            "distillation_mode",
            f"step_by_step needs each trace's reference answer: the rows of {traces} have no 'answer' (nor "
            f"{answer_column!r}) column",
        )
    write_jsonl(rows, target)
    return len(rows)


def with_prefix(messages: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """``messages`` with ``prefix`` before the content of the last user turn (copies; the input unchanged)."""
    messages = [dict(m) for m in messages]
    for message in reversed(messages):
        if message.get("role") == "user":
            message["content"] = prefix + str(message.get("content", ""))
            break
    return messages
