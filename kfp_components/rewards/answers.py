"""Exact answer match: pull the final answer out of a completion and compare it with the ``answer`` column.

Extraction (:func:`extract_answer`) looks, in this order, for

1. ``#### N``: the GSM8K convention (the number after the last ``####``);
2. ``\\boxed{...}``: the content of the last ``\\boxed{}`` (nested braces allowed), the MATH convention;
3. ``the answer is N`` / ``answer: N`` (any case): what follows the last such phrase;
4. the last number of the text.

The reference answer goes through the same extraction (a GSM8K ``answer`` holds the worked solution ending
in ``#### 72``), and is taken whole when nothing is found (``Paris``). Two answers are equal when both read
as numbers and the numbers are equal (:func:`normalise_number`: thousands commas, a leading ``+``, a unicode
minus, ``$``, ``%`` and trailing zeros ``72.0`` do not matter; ``3/4`` is a fraction), or else when their
texts are equal ignoring case, surrounding spaces, ``$`` signs and a final period.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from kfp_components.rewards.errors import RewardError
from kfp_components.typed_config import ConfigError, Options

_NUMBER = re.compile(r"(?<![\w.])[-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?")
_GSM8K = re.compile(r"####\s*(.+)")
_ANSWER_IS = re.compile(r"\banswer\s*(?:is|:|=)\s*:?\s*", re.IGNORECASE)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}")


def extract_answer(text: str) -> str | None:
    """The final answer of ``text`` as written there (see the module docstring), or ``None``."""
    gsm8k = _GSM8K.findall(text)
    if gsm8k:
        return _first_number_or_text(gsm8k[-1])
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    phrases = list(_ANSWER_IS.finditer(text))
    if phrases:
        rest = text[phrases[-1].end() :]
        return _first_number_or_text(rest.split("\n", 1)[0])
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _first_number_or_text(text: str) -> str | None:
    number = _NUMBER.search(text)
    if number:
        return number.group(0)
    text = text.strip().rstrip(".").strip()
    return text or None


def _last_boxed(text: str) -> str | None:
    starts = list(_BOXED.finditer(text))
    if not starts:
        return None
    start = starts[-1].end()
    depth = 1
    for position in range(start, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[start:position]
    return None  # an unclosed \boxed{ holds no answer


def normalise_number(text: str) -> Fraction | None:
    """``text`` as an exact number, or ``None`` when it is not one: ``1,234`` -> 1234, ``+5`` -> 5,
    ``72.0`` -> 72, ``$18`` -> 18, ``3/4`` -> 3/4, ``-0.50`` -> -1/2."""
    cleaned = _TEXT_WRAPPER.sub(r"\1", text).strip().rstrip(".").strip()
    cleaned = cleaned.replace("\u2212", "-").replace(",", "").replace("$", "").replace(" ", "")
    cleaned = cleaned.removesuffix("%").removeprefix("+")
    if cleaned.startswith("\\frac{") or cleaned.startswith("\\dfrac{"):
        match = re.fullmatch(r"\\d?frac\{(-?\d+)\}\{(\d+)\}", cleaned)
        cleaned = f"{match.group(1)}/{match.group(2)}" if match else cleaned
    if not re.fullmatch(r"-?(\d+(\.\d+)?|\.\d+)(/\d+)?", cleaned):
        return None
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def _normalise_text(text: str) -> str:
    text = _TEXT_WRAPPER.sub(r"\1", text)
    return " ".join(text.replace("$", "").strip().rstrip(".").split()).casefold()


def answers_match(predicted: str | None, reference: Any, *, tolerance: float = 0.0) -> bool:
    """Whether an extracted answer equals the reference answer (see the module docstring). With a
    ``tolerance`` above 0, two numbers also match when ``|a - b| <= tolerance * max(1, |b|)`` (``b`` the
    reference)."""
    if predicted is None:
        return False
    reference_text = str(reference)
    expected = extract_answer(reference_text) or reference_text.strip()
    predicted_number, expected_number = normalise_number(predicted), normalise_number(expected)
    if predicted_number is not None and expected_number is not None:
        if tolerance > 0:
            bound = Fraction(tolerance) * max(Fraction(1), abs(expected_number))
            return abs(predicted_number - expected_number) <= bound
        return predicted_number == expected_number
    return _normalise_text(predicted) == _normalise_text(expected)


def exact_match(
    prompts: Sequence[Any], completions: Sequence[str], answer: Sequence[Any] | None = None, **_: Any
) -> list[float | None]:
    """1.0 where the completion's final answer equals the ``answer`` column, else 0.0; ``None`` (no score)
    where the row has no answer."""
    if answer is None:
        raise RewardError("exact_match", "needs an 'answer' column in the prompt rows")
    return [
        None if expected is None else float(answers_match(extract_answer(text), expected))
        for text, expected in zip(completions, answer, strict=True)
    ]


@dataclass
class ExactMatchOptions(Options):
    """Options of the shipped ``exact_match`` reward.

    Attributes:
        function: ``exact_match``.
        name: Name in metrics (``reward/<name>/mean``); default ``exact_match``.
        answer_column: Column of the prompt rows holding the reference answer.
    """

    function: Literal["exact_match"] = "exact_match"
    name: str = ""
    answer_column: str = "answer"

    def validate(self) -> None:
        if not self.answer_column.strip():
            raise ConfigError("answer_column", "must name a column of the prompt rows")


class ExactMatchReward:
    """:func:`exact_match` against a chosen column."""

    def __init__(self, options: ExactMatchOptions):
        self.answer_column = options.answer_column

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[str], **columns: Any
    ) -> list[float | None]:
        if self.answer_column not in columns:
            have = ", ".join(sorted(columns)) or "none but prompt"
            raise RewardError(
                "exact_match", f"needs a {self.answer_column!r} column in the prompt rows (they have: {have})"
            )
        return exact_match(prompts, completions, answer=columns[self.answer_column])
