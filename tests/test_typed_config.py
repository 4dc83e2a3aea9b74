"""Typed configs from plain data: every error names the key path."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest

from kfp_components.typed_config import ConfigError, Options, coerce, from_dict, parse_cli_value, to_dict


@dataclass
class Inner:
    beta: float = 0.1
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"


@dataclass
class Outer:
    name: str
    steps: int = 1
    ratio: float | None = None
    tags: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    per_stage: dict[str, Inner] = field(default_factory=dict)

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError("steps", f"must be at least 1, got {self.steps}")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "name: required option is missing"),
        (
            {"name": "x", "stpes": 1},
            "stpes: unknown option; did you mean steps? Outer accepts: inner, name, per_stage, ratio, steps, tags",
        ),
        ({"name": 3}, "name: expected a string, got 3"),
        ({"name": "x", "steps": 1.5}, "steps: expected an integer, got 1.5"),
        ({"name": "x", "steps": True}, "steps: expected an integer, got true"),
        ({"name": "x", "tags": "a"}, "tags: expected a list, got 'a'"),
        ({"name": "x", "tags": ["a", 2]}, "tags[1]: expected a string, got 2"),
        ({"name": "x", "inner": {"beta": "high"}}, "inner.beta: expected a float, got 'high'"),
        ({"name": "x", "inner": {"loss": "l2"}}, "inner.loss: expected one of sigmoid, ipo, hinge, got 'l2'"),
        ({"name": "x", "per_stage": {"dpo": {"bta": 1}}}, "per_stage.dpo.bta: unknown option"),
        ({"name": "x", "steps": 0}, "steps: must be at least 1, got 0"),
        ({"name": "x", "inner": 5}, "inner: expected a mapping of options, got 5"),
    ],
)
def test_errors_name_the_key_path(data, message):
    with pytest.raises(ConfigError) as raised:
        from_dict(Outer, data)
    assert str(raised.value).startswith(message)


def test_nested_validate_errors_get_the_parent_path():
    with pytest.raises(ConfigError, match=r"^stages\.sft\.steps: must be at least 1"):
        from_dict(Outer, {"name": "x", "steps": 0}, path="stages.sft")


def test_values_are_converted_only_where_lossless():
    config = from_dict(Outer, {"name": "x", "ratio": 1, "inner": {"beta": "1e-5"}})
    assert config.ratio == 1.0 and isinstance(config.ratio, float) and config.inner.beta == 1e-5
    assert from_dict(Outer, {"name": "x", "ratio": None}).ratio is None
    assert coerce(3, int, "k") == 3


def test_round_trip_and_cli_values():
    config = from_dict(Outer, {"name": "x", "tags": ["a"], "per_stage": {"dpo": {"beta": 0.2}}})
    assert from_dict(Outer, to_dict(config)) == config
    assert parse_cli_value("3") == 3 and parse_cli_value("true") is True and parse_cli_value("2e-5") == "2e-5"
    assert (
        parse_cli_value("[a, b]") == ["a", "b"] and parse_cli_value("text: with colon") == "text: with colon"
    )


@dataclass(kw_only=True)
class Aliased(Options):
    option_aliases: ClassVar[dict[str, str]] = {"num_epochs_alias": "epochs", "kind_alias": "kind"}

    epochs: int = 1
    kind: Literal["a", "b"] = "a"
    maybe: Literal["x", "y"] | None = None


def test_every_problem_of_a_mapping_is_reported_at_once():
    with pytest.raises(ConfigError) as raised:
        from_dict(Outer, {"stpes": 1, "tags": "a", "inner": {"beta": "high", "loss": "l2"}})
    assert [path for path, _ in raised.value.problems] == [
        "stpes",
        "name",
        "tags",
        "inner.beta",
        "inner.loss",
    ]
    assert str(raised.value).startswith("5 problems:\n  stpes: unknown option")


def test_aliases_map_to_exactly_one_option():
    assert from_dict(Aliased, {"num_epochs_alias": 3}).epochs == 3
    with pytest.raises(
        ConfigError, match=r"^num_epochs_alias: num_epochs_alias and epochs are the same option"
    ):
        from_dict(Aliased, {"epochs": 2, "num_epochs_alias": 3})
    with pytest.raises(ConfigError, match=r"kind_alias: expected one of a, b, got 'c'"):
        from_dict(Aliased, {"kind_alias": "c"})


def test_enumerated_options_are_checked_when_built_in_python_too():
    with pytest.raises(ConfigError, match=r"^kind: expected one of a, b, got 'c'"):
        Aliased(kind="c")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^maybe: expected one of x, y, null, got 'z'"):
        Aliased(maybe="z")  # type: ignore[arg-type]
    assert Aliased(maybe=None).maybe is None


def test_a_near_miss_is_named():
    with pytest.raises(ConfigError, match=r"expected one of a, b, got 'bb' \(did you mean b\?\)"):
        from_dict(Aliased, {"kind": "bb"})
