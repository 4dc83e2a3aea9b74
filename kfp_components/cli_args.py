"""Command-line flags generated from a config dataclass, so the flags and the YAML keys cannot drift apart.

Every field becomes ``--<field>`` (and ``--<alias>`` for each of its aliases); its help text comes from the
dataclass docstring's ``Attributes:`` section, with the allowed values of enumerated options. Values are read as YAML scalars (``3``, ``2e-5``, ``true``) and checked by
:func:`kfp_components.typed_config.from_dict`, which names the flag in its error.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from typing import Any, get_origin

from kfp_components.typed_config import (
    aliases_of,
    default_of,
    from_dict,
    literal_choices,
    load_config_file,
    parse_cli_value,
)


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
    """Add ``--<field>`` for every field of ``cls``, required options first; unset flags stay unset so the
    config file wins.

    An enumerated (``Literal``) option shows its allowed values (``--torch_dtype {bfloat16,float16,float32}``)
    and a boolean ``{true,false}``; an option's aliases (``option_aliases``) are accepted as flags and shown
    beside it (``--lr_scheduler ..., --lr_scheduler_type ...``). Values are checked by ``from_dict``, which
    names the flag as it was typed.
    """
    helps = field_help(cls)
    hints = typing.get_type_hints(cls)
    choices = literal_choices(cls)
    aliases_by_name: dict[str, list[str]] = {}
    for alias, name in aliases_of(cls).items():
        aliases_by_name.setdefault(name, []).append(alias)
    group = parser.add_argument_group(f"{cls.__name__} options (override the --config file)")
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]
    # required first; then the class's own options before those of its bases, each in declaration order
    fields.sort(key=lambda f: (not _is_required(f), _declared_in(cls, f.name)))
    for field in fields:
        shown = " (required)" if _is_required(field) else f" (default: {_show(default_of(field))})"
        annotation = hints[field.name]
        if field.name in choices:
            metavar = "{" + ",".join(_show(c) for c in choices[field.name]) + "}"
        elif annotation is bool:
            metavar = "{true,false}"
        else:
            metavar = "VALUE"
        kwargs: dict[str, Any] = {
            "default": argparse.SUPPRESS,
            # argparse %-formats help texts: a literal "%" in a docstring must reach it as "%%"
            "help": (helps.get(field.name, "") + shown).replace("%", "%%"),
            "metavar": metavar,
            "action": _StoreAsTyped,
            "dest": field.name,
        }
        if get_origin(annotation) is list:
            kwargs["nargs"] = "*"
        spellings = [field.name, *aliases_by_name.get(field.name, [])]
        group.add_argument(*(f"--{name}" for name in spellings), **kwargs)


class _StoreAsTyped(argparse.Action):
    """Stores a flag's value under the name it was typed as (an option or one of its aliases), so that
    ``from_dict`` maps aliases and refuses an option given twice under two names."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = dict(getattr(namespace, _GIVEN, None) or {})
        given[(option_string or self.dest).removeprefix("--")] = values
        setattr(namespace, _GIVEN, given)
        setattr(namespace, self.dest, values)


_GIVEN = "_config_flags_as_typed"


def _declared_in(cls: type, name: str) -> int:
    """The position in ``cls.__mro__`` of the class that declares field ``name``."""
    return next(i for i, klass in enumerate(cls.__mro__) if name in inspect.get_annotations(klass))


def _is_required(field: dataclasses.Field) -> bool:
    return default_of(field) is dataclasses.MISSING


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return '""'
    return "null" if value is None else str(value)


def overrides_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The flags that were given, under the names they were typed as, as plain values for ``from_dict``."""
    given = getattr(args, _GIVEN, None) or {}
    return {
        key: [parse_cli_value(v) for v in value] if isinstance(value, list) else parse_cli_value(value)
        for key, value in given.items()
    }


def config_from_args(
    cls: type, args: argparse.Namespace, *, defaults: dict[str, Any] | None = None, **fixed: Any
) -> Any:
    """``cls`` built from ``defaults`` (a command's own defaults), then the ``--config`` YAML file (if
    given), then the flags, then ``fixed`` values.

    A later source replaces an earlier one's value of the same option whichever name (option or alias) each
    uses.
    """
    data = dict(defaults or {})
    aliases = aliases_of(cls)
    file = load_config_file(args.config) if getattr(args, "config", None) else {}
    for overrides in (file, overrides_from_args(args, cls), fixed):
        options = {aliases.get(key, key) for key in overrides}
        data = {key: value for key, value in data.items() if aliases.get(key, key) not in options}
        data.update(overrides)
    return from_dict(cls, data)
