"""The dataset stage's options: one typed config shared by the component, the CLIs and the stage YAML.

The names are those of the multi-stage YAML (``dataset_name_or_path``, ``dataset_split``, ...), so a hint such
as ``set dataset_on_invalid: drop`` means the same option in a stage, a component argument and a flag.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal, get_args

from kfp_components.data.convert import KNOWN_COLUMNS, WRITTEN_AS
from kfp_components.data.errors import DatasetError
from kfp_components.data.mixture import parse_sources
from kfp_components.data.uris import parse_dataset_uri
from kfp_components.typed_config import ConfigError, Options

DataFormat = Literal["auto", "messages", "preference", "prompt", "text"]
SourceFormat = Literal[
    "auto",
    "messages",
    "conversations",
    "sharegpt",
    "alpaca",
    "prompt_completion",
    "text",
    "preference",
    "implicit_preference",
    "prompt",
]
OnInvalid = Literal["fail", "drop"]
SubsetMode = Literal["first", "sample"]
ON_INVALID: tuple[str, ...] = get_args(OnInvalid)
SUBSET_MODES: tuple[str, ...] = get_args(SubsetMode)


@dataclass
class DatasetConfig(Options):
    """Where the data is, what it should look like, and how to cut it.

    Attributes:
        dataset_name_or_path: hf://org/name[:config][@revision], s3://bucket/key-or-prefix, http(s)://...,
            pvc://claim/path or a local path. One file, a folder of JSONL, JSON-array or Parquet shards, or a
            Hugging Face save_to_disk folder. Several sources mix: "uri_a:0.7,uri_b:0.3" (weights) or
            "uri_a:5000,uri_b:1000" (rows), each validated on its own, sampled and shuffled with seed.
        dataset_split: Which split to read: of an hf:// dataset, or of a folder whose file names follow the
            Hub's split conventions (train.jsonl, data/test-00000.parquet, ...). Empty: the train split of an
            hf:// dataset, every file of a folder. A single file has no splits.
        data_format: The format written (what the trainer reads): auto (that of the source format),
            messages, preference, prompt or text.
        dataset_source_format: The format of the rows given: auto (detect from the first row), messages,
            conversations (role/content), sharegpt (from/value), alpaca, prompt_completion, text,
            preference, implicit_preference (chosen/rejected sharing the prompt) or prompt.
        dataset_field_map: Rename the file's columns to ours before anything else, e.g.
            {question: prompt, solution: answer} (or the text "question:prompt,solution:answer").
        dataset_on_invalid: fail (stop and list the problems) or drop (skip invalid rows and count them).
        train_split_ratio: Share of rows for training, in (0, 1]; the rest is the eval split. 1.0: no eval split.
        seed: Seed of the shuffle behind the split and of a sampled subset.
        dataset_subset_size: Keep only this many valid rows (0: keep all).
        dataset_subset_mode: first (the first N valid rows) or sample (a seeded random sample of N).
        dataset_download_timeout_seconds: Give up an http(s):// download that has not finished after this
            long, retries included (0: no limit).
        dataset_stall_timeout_seconds: Give up an http(s):// download attempt when less than 1 KiB arrives
            in this long (a stalled or trickling server); the attempt is retried like a dropped connection.
    """

    dataset_name_or_path: str
    dataset_split: str = ""
    data_format: DataFormat = "auto"
    dataset_source_format: SourceFormat = "auto"
    dataset_field_map: dict[str, str] | str = ""
    dataset_on_invalid: OnInvalid = "fail"
    train_split_ratio: float = 0.9
    seed: int = 42
    dataset_subset_size: int = 0
    dataset_subset_mode: SubsetMode = "first"
    dataset_download_timeout_seconds: float = 3600.0
    dataset_stall_timeout_seconds: float = 60.0

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the bad options. Cheap: call it before any download."""
        problems = []
        try:
            for entry in parse_sources(self.dataset_name_or_path):
                parse_dataset_uri(entry.uri)
        except DatasetError as exc:
            problems.append(
                ("dataset_name_or_path", str(exc).removeprefix("dataset_name_or_path ").removeprefix(": "))
            )
        source = self.dataset_source_format
        if source != "auto" and self.data_format != "auto" and WRITTEN_AS[source] != self.data_format:
            problems.append(
                (
                    "dataset_source_format",
                    f"{source} rows are written as {WRITTEN_AS[source]}, not as data_format "
                    f"{self.data_format}",
                )
            )
        try:
            self.field_map()
        except ValueError as exc:
            problems.append(("dataset_field_map", str(exc)))
        if isinstance(self.train_split_ratio, bool) or not isinstance(self.train_split_ratio, int | float):
            problems.append(("train_split_ratio", f"expected a number, got {self.train_split_ratio!r}"))
        elif not 0 < self.train_split_ratio <= 1:
            problems.append(
                (
                    "train_split_ratio",
                    f"{self.train_split_ratio} is not in (0, 1] (1.0 keeps every row for training)",
                )
            )
        if isinstance(self.dataset_subset_size, bool) or not isinstance(self.dataset_subset_size, int):
            problems.append(
                ("dataset_subset_size", f"expected a whole number, got {self.dataset_subset_size!r}")
            )
        elif self.dataset_subset_size < 0:
            problems.append(
                ("dataset_subset_size", f"{self.dataset_subset_size} is negative (0 keeps every row)")
            )
        timeout, stall = self.dataset_download_timeout_seconds, self.dataset_stall_timeout_seconds
        if not _is_seconds(timeout):
            problems.append(
                ("dataset_download_timeout_seconds", f"expected a number of seconds, got {timeout!r}")
            )
        elif timeout < 0:
            problems.append(("dataset_download_timeout_seconds", f"{timeout} is negative (0: no limit)"))
        if not _is_seconds(stall):
            problems.append(("dataset_stall_timeout_seconds", f"expected a number of seconds, got {stall!r}"))
        elif stall <= 0:
            problems.append(("dataset_stall_timeout_seconds", f"{stall} is not more than 0"))
        if not isinstance(self.dataset_split, str) or self.dataset_split != self.dataset_split.strip():
            problems.append(
                ("dataset_split", f"expected a split name such as 'train', got {self.dataset_split!r}")
            )
        if problems:
            raise ConfigError.of(problems)

    def field_map(self) -> dict[str, str]:
        """``dataset_field_map`` as a mapping (the file's column -> ours); ValueError when it is not one."""
        value = self.dataset_field_map
        if isinstance(value, str):
            value = _parse_field_map(value)
        unknown = sorted({target for target in value.values() if target not in KNOWN_COLUMNS})
        if unknown:
            raise ValueError(
                f"{', '.join(map(repr, unknown))} is not a column of any format; map to one of "
                f"{', '.join(KNOWN_COLUMNS)}"
            )
        return dict(value)


def _parse_field_map(text: str) -> dict[str, str]:
    """``"question:prompt,solution:answer"`` or a JSON object, as a mapping; empty text: no mapping."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a JSON object") from None
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ValueError("expected a mapping of column names to column names")
        return {str(k): v for k, v in value.items()}
    mapping = {}
    for pair in text.split(","):
        column, sep, target = (part.strip() for part in pair.partition(":"))
        if not sep or not column or not target:
            raise ValueError(
                f"{pair.strip()!r} is not 'column:target' (e.g. question:prompt,solution:answer)"
            )
        mapping[column] = target
    return mapping


def _is_seconds(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
