"""Answer accuracy on held-out reasoning problems: greedy answers, read by the same matcher as the training data.

:func:`answer_accuracy` lets a model answer every ``prompt`` row of a file greedily (the RL engine's prompt
rendering and decoding, :func:`kfp_components.feedback.comparisons.sample_responses`) and counts the answers
that :class:`~kfp_components.feedback.synthesis.TraceFilter` accepts against the row's reference answer:
the same extractor and tolerance (or the same ``module:function`` checker) that decided which teacher traces
were kept, so training data and evaluation agree on what a right answer is. :func:`accuracy_table` renders
the models side by side (teacher, base student, tuned student) as Markdown.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Answers quoted per model in the report.
EXAMPLES = 3


@dataclass
class ReasoningScore:
    """One model's answers to the held-out problems."""

    model: str
    correct: int
    total: int
    no_answer: int  # answers in which the extractor found nothing (0 with a custom checker)
    examples: list[dict[str, str]] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def metrics(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}/accuracy": self.accuracy,
            f"{prefix}/correct": float(self.correct),
            f"{prefix}/problems": float(self.total),
            f"{prefix}/no_answer": float(self.no_answer),
        }


def answer_accuracy(
    model: str,
    problems_path: str | Path,
    matcher: Any,
    *,
    answer_column: str,
    max_new_tokens: int,
    max_seq_len: int,
    limit: int = 0,
    render: Callable[[dict[str, Any]], Any] | None = None,
    device: str = "",
) -> ReasoningScore:
    """Greedy answers of ``model`` to the problems of ``problems_path`` (the first ``limit``; 0: all), checked
    by ``matcher`` (a :class:`TraceFilter`: ``verdict(text, reference)``). ``render`` turns a problem row into
    what the model is asked (a text or messages: the student's turns as it was trained on them); None: the
    row's ``prompt``."""
    import tempfile

    from kfp_components.feedback.comparisons import sample_responses, write_jsonl
    from kfp_components.trainer.rollout import SamplingOptions

    with tempfile.TemporaryDirectory(prefix="kfp-reasoning-") as scratch:
        source = Path(problems_path)
        if render is not None:
            rows = _rows(source)
            for row in rows:
                row["prompt"] = render(row)
            source = Path(scratch) / "problems.jsonl"
            write_jsonl(rows, source)
        responses = sample_responses(
            model,
            source,
            SamplingOptions.greedy(max_new_tokens),
            max_seq_len=max_seq_len,
            limit=limit,
            device=device,
        )
    correct = no_answer = 0
    examples: list[dict[str, str]] = []
    for prompt, columns, texts in zip(responses.prompts, responses.columns, responses.texts, strict=True):
        reference, answer = columns.get(answer_column), texts[0]
        verdict = matcher.verdict(answer, reference)
        right, extracted = verdict.verified, verdict.extracted
        correct += right
        no_answer += extracted is None and not right and matcher.checker is None
        if len(examples) < EXAMPLES:
            examples.append(
                {
                    "prompt": _text(prompt),
                    "answer": answer,
                    "extracted": "" if extracted is None else str(extracted),
                    "reference": str(reference),
                    "correct": "yes" if right else "no",
                }
            )
    return ReasoningScore(
        model=model, correct=correct, total=len(responses.prompts), no_answer=no_answer, examples=examples
    )


def accuracy_table(scores: Mapping[str, ReasoningScore], title: str = "Reasoning: answer accuracy") -> str:
    """Markdown: one row per model (role, accuracy, correct of problems, no answer), then a few answers."""
    lines = [
        f"## {title}",
        "",
        "| model | role | accuracy | correct | no answer |",
        "| --- | --- | --- | --- | --- |",
    ]
    for role, score in scores.items():
        lines.append(
            f"| `{score.model}` | {role} | {score.accuracy:.3f} | {score.correct} / {score.total} | {score.no_answer} |"
        )
    for role, score in scores.items():
        if not score.examples:
            continue
        lines += ["", f"### {role}: first answers", ""]
        for example in score.examples:
            answer = " ".join(example["answer"].split())[:300]
            lines.append(
                f"- {example['prompt'][:160]} -> {answer!r} (extracted {example['extracted'] or 'nothing'}, "
                f"reference {example['reference']}: {'right' if example['correct'] == 'yes' else 'wrong'})"
            )
    return "\n".join(lines) + "\n"


def _rows(path: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence):
        return " ".join(str(m.get("content", "")) for m in prompt if isinstance(m, Mapping))
    return str(prompt)
