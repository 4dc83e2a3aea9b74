"""Command-line flags generated from a config dataclass, so the flags and the YAML keys cannot drift apart.

Every field becomes ``--<field>``; its help text comes from the dataclass docstring's ``Attributes:``
section. Values are read as YAML scalars (``3``, ``2e-5``, ``true``) and checked by
:func:`kfp_components.typed_config.from_dict`, which names the flag in its error.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Any, get_origin

from kfp_components.typed_config import from_dict, load_config_file, parse_cli_value


def field_help(cls: type) -> dict[str, str]:
    """Map field names to the text documented for them under ``Attributes:`` in the docstrings of ``cls``
    and its base classes."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        helps.update(_documented_fields(klass.__dict__.get("__doc__") or ""))
    return helps


def _documented_fields(doc: str) -> dict[str, str]:
    if "Attributes:" not in doc:
        return {}
    section = doc.split("Attributes:", 1)[1]
    helps: dict[str, str] = {}
    current: list[str] = []
    for line in section.splitlines():
        match = re.match(r"^\s{4,8}([a-z_][\w, ]*):\s*(.*)$", line)
        if match and not line.startswith(" " * 12):
            current = [name.strip() for name in match.group(1).split(",")]
            for name in current:
                helps[name] = match.group(2).strip()
        elif line.strip() and current:
            for name in current:
                helps[name] += " " + line.strip()
    return helps


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add ``--<field>`` for every field of ``cls``; unset flags stay ``None`` so the config file wins."""
    helps = field_help(cls)
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} options (override the --config file)")
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        default = (
            field.default
            if field.default is not dataclasses.MISSING
            else (field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
        )
        shown = "" if default is None else f" (default: {default})"
        kwargs: dict[str, Any] = {
            "default": None,
            "help": helps.get(field.name, "") + shown,
            "metavar": "VALUE",
        }
        if get_origin(hints[field.name]) is list:
            kwargs["nargs"] = "*"
        group.add_argument(f"--{field.name}", **kwargs)


def overrides_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags that were given, as plain values ready for ``from_dict``."""
    given = {}
    for field in dataclasses.fields(cls):
        value = getattr(args, field.name, None)
        if value is None:
            continue
        given[field.name] = (
            [parse_cli_value(v) for v in value] if isinstance(value, list) else parse_cli_value(value)
        )
    return given


def config_from_args(cls: type, args: argparse.Namespace, **fixed: Any) -> Any:
    """``cls`` built from the ``--config`` YAML file (if given), then the flags, then ``fixed`` values."""
    data = load_config_file(args.config) if getattr(args, "config", None) else {}
    data.update(overrides_from_args(args, cls))
    data.update(fixed)
    return from_dict(cls, data)
