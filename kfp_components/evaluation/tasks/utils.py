"""Loaders for the bundled tasks' local JSONL data (lm-eval ``custom_dataset`` functions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

_HERE = Path(__file__).resolve().parent


def _load(name: str) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (_HERE / name).read_text(encoding="utf-8").splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def capitals(**_: Any) -> datasets.DatasetDict:
    """The capitals task: ``country``, ``choices`` and the index ``answer`` of the right choice."""
    return _load("capitals.jsonl")


def arithmetic(**_: Any) -> datasets.DatasetDict:
    """The arithmetic task: ``question`` and the text ``answer``."""
    return _load("arithmetic.jsonl")


def reasoning_arithmetic(**_: Any) -> datasets.DatasetDict:
    """The reasoning task: multi-step word problems, ``question``, the number ``answer`` and the worked
    ``solution`` (kfp_components.testing.word_problems)."""
    return _load("reasoning_arithmetic.jsonl")
