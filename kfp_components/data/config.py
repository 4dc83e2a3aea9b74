"""The dataset stage's options: one typed config shared by the component, the CLIs and the stage YAML."""

from __future__ import annotations

from dataclasses import dataclass

from kfp_components.data.errors import DatasetError
from kfp_components.data.formats import FORMATS
from kfp_components.data.uris import parse_dataset_uri

ON_INVALID = ("fail", "drop")
SUBSET_MODES = ("first", "sample")


@dataclass
class DatasetConfig:
    """Where the data is, what it should look like, and how to cut it.

    Attributes:
        data_uri: hf://org/name[:config][@revision], s3://bucket/key-or-prefix, http(s)://..., pvc://claim/path
            or a local path. One file or a folder of JSONL, JSON-array or Parquet shards.
        split: Which split of an hf:// dataset to read (train, validation, test, ...).
        data_format: auto (detect from the rows), messages, preference or prompt.
        on_invalid: fail (stop and list the problems) or drop (skip invalid rows and count them).
        train_split_ratio: Share of rows for training, in (0, 1]; the rest is the eval split. 1.0: no eval split.
        seed: Seed of the shuffle behind the split and of a sampled subset.
        subset_size: Keep only this many valid rows (0: keep all).
        subset_mode: first (the first N valid rows) or sample (a seeded random sample of N).
    """

    data_uri: str
    split: str = "train"
    data_format: str = "auto"
    on_invalid: str = "fail"
    train_split_ratio: float = 0.9
    seed: int = 42
    subset_size: int = 0
    subset_mode: str = "first"

    def validate(self) -> None:
        """Raise :class:`DatasetError` naming the first bad option. Cheap: call it before any download."""
        parse_dataset_uri(self.data_uri)
        if self.data_format not in ("auto", *FORMATS):
            raise DatasetError(f"data_format: {self.data_format!r} is not one of auto, {', '.join(FORMATS)}")
        if self.on_invalid not in ON_INVALID:
            raise DatasetError(f"on_invalid: {self.on_invalid!r} is not one of {', '.join(ON_INVALID)}")
        if isinstance(self.train_split_ratio, bool) or not isinstance(self.train_split_ratio, int | float):
            raise DatasetError(f"train_split_ratio: expected a number, got {self.train_split_ratio!r}")
        if not 0 < self.train_split_ratio <= 1:
            raise DatasetError(
                f"train_split_ratio: {self.train_split_ratio} is not in (0, 1] (1.0 keeps every row for training)"
            )
        if isinstance(self.subset_size, bool) or not isinstance(self.subset_size, int):
            raise DatasetError(f"subset_size: expected a whole number, got {self.subset_size!r}")
        if self.subset_size < 0:
            raise DatasetError(f"subset_size: {self.subset_size} is negative (0 keeps every row)")
        if self.subset_mode not in SUBSET_MODES:
            raise DatasetError(f"subset_mode: {self.subset_mode!r} is not one of {', '.join(SUBSET_MODES)}")
        if not self.split or not isinstance(self.split, str):
            raise DatasetError("split: empty; name a split such as 'train'")
