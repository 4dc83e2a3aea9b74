"""The dataset stage: fetch from hf://, s3://, http(s)://, pvc:// or a path; detect; validate; split."""

from kfp_components.data.config import DatasetConfig
from kfp_components.data.errors import DatasetError
from kfp_components.data.prepare import DatasetValidationError, PreparedDataset, prepare_dataset
from kfp_components.data.uris import DatasetURI, parse_dataset_uri, redact_uri

__all__ = [
    "DatasetConfig",
    "DatasetError",
    "DatasetURI",
    "DatasetValidationError",
    "PreparedDataset",
    "parse_dataset_uri",
    "prepare_dataset",
    "redact_uri",
]
