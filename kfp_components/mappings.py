"""Nested mappings flattened to dotted keys, for metrics, custom properties and tables."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": 2}`` -> ``{"a.b": 1, "c": 2}`` (lists and other values are kept as they are)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def flatten_numbers(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of :func:`flatten` (booleans, strings, NaN and infinities left out)."""
    return {
        name: value
        for name, value in flatten(values, prefix).items()
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }
