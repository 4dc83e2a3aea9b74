"""Nested mappings flattened to dotted keys."""

from __future__ import annotations

from kfp_components.mappings import flatten, flatten_numbers


def test_flatten_to_dotted_keys_and_keep_only_finite_numbers():
    nested = {"loss": 1.5, "data": {"tokens": 10, "name": "x", "ok": True, "bad": float("nan")}, "tags": [1]}
    assert flatten(nested) == {
        "loss": 1.5,
        "data.tokens": 10,
        "data.name": "x",
        "data.ok": True,
        "data.bad": nested["data"]["bad"],
        "tags": [1],
    }
    assert flatten_numbers(nested, "train") == {"train.loss": 1.5, "train.data.tokens": 10}
