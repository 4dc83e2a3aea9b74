"""Rewards on the shape of a completion: a format (regular expression) and a soft overlong penalty.

* ``format_regex``: 1.0 where the completion matches ``pattern``, else 0.0. ``match: fullmatch`` (default)
  needs the whole completion to match, ``search`` any part of it. ``.`` matches newlines (``dotall``), so
  ``<think>.*</think>\\s*<answer>.*</answer>`` spans lines.
* ``overlong_penalty``: the soft overlong punishment of DAPO (Yu et al., 2025). With ``L = max_length`` and
  ``B = buffer``, a completion of length ``n`` gets 0 when ``n <= L - B``, ``(L - B - n) / B`` when
  ``L - B < n <= L`` (linear from 0 to -1) and -1 when ``n > L``. Length counts tokens (``unit: tokens``, with the tokenizer
  named in ``tokenizer`` or else the policy's) or characters (``unit: characters``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kfp_components.typed_config import ConfigError, Options


@dataclass
class FormatRegexOptions(Options):
    """Options of the shipped ``format_regex`` reward.

    Attributes:
        function: ``format_regex``.
        pattern: Python regular expression the completion must match.
        name: Name in metrics; default ``format_regex``.
        match: ``fullmatch`` (the whole completion) or ``search`` (anywhere in it).
        dotall: ``.`` matches newlines too.
        ignore_case: Match without regard to case.
    """

    pattern: str
    function: Literal["format_regex"] = "format_regex"
    name: str = ""
    match: Literal["fullmatch", "search"] = "fullmatch"
    dotall: bool = True
    ignore_case: bool = False

    def validate(self) -> None:
        try:
            self.compiled()
        except re.error as exc:
            raise ConfigError("pattern", f"not a valid regular expression: {exc}") from None

    def compiled(self) -> re.Pattern[str]:
        flags = (re.DOTALL if self.dotall else 0) | (re.IGNORECASE if self.ignore_case else 0)
        return re.compile(self.pattern, flags)


class FormatRegexReward:
    """1.0 where a completion matches the pattern, else 0.0."""

    def __init__(self, options: FormatRegexOptions):
        self.pattern = options.compiled()
        self.method = self.pattern.fullmatch if options.match == "fullmatch" else self.pattern.search

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str], **_: Any) -> list[float | None]:
        return [1.0 if self.method(text) else 0.0 for text in completions]


def overlong_penalty(lengths: Sequence[int], *, max_length: int, buffer: int) -> list[float]:
    """DAPO's soft overlong penalty of each length (see the module docstring)."""
    start = max_length - buffer
    penalties = []
    for n in lengths:
        if n <= start:
            penalties.append(0.0)
        elif n > max_length:
            penalties.append(-1.0)
        else:
            penalties.append((start - n) / buffer)
    return penalties


@dataclass
class OverlongPenaltyOptions(Options):
    """Options of the shipped ``overlong_penalty`` reward.

    Attributes:
        function: ``overlong_penalty``.
        max_length: Length at which the penalty reaches -1 (usually ``max_new_tokens``).
        buffer: Width of the linear zone before ``max_length``; 0: no penalty up to ``max_length``, -1
            beyond it.
        name: Name in metrics; default ``overlong_penalty``.
        unit: ``tokens`` or ``characters``.
        tokenizer: Tokenizer folder or name counting tokens; empty: the policy's tokenizer.
    """

    max_length: int
    buffer: int
    function: Literal["overlong_penalty"] = "overlong_penalty"
    name: str = ""
    unit: Literal["tokens", "characters"] = "tokens"
    tokenizer: str = ""

    def validate(self) -> None:
        if self.max_length < 1:
            raise ConfigError("max_length", f"must be at least 1, got {self.max_length}")
        if not 0 <= self.buffer <= self.max_length:
            raise ConfigError("buffer", f"must be in [0, max_length={self.max_length}], got {self.buffer}")
        if self.tokenizer and self.unit != "tokens":
            raise ConfigError("tokenizer", "counts tokens; it applies to unit: tokens only")


class OverlongPenaltyReward:
    """:func:`overlong_penalty` of each completion's length in tokens or characters."""

    def __init__(self, options: OverlongPenaltyOptions, tokenizer: Any = None):
        self.max_length = options.max_length
        self.buffer = options.buffer
        self.count: Callable[[Sequence[str]], list[int]]
        if options.unit == "characters":
            self.count = lambda texts: [len(text) for text in texts]
        else:
            if tokenizer is None:
                raise ValueError("unit: tokens needs a tokenizer (set tokenizer, or unit: characters)")
            self.count = lambda texts: [
                len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]
            ]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str], **_: Any) -> list[float | None]:
        return list(overlong_penalty(self.count(completions), max_length=self.max_length, buffer=self.buffer))
