"""Build typed config dataclasses from plain data (YAML, JSON, CLI flags) with errors that name the key path.

One set of dataclasses describes every option; the component parameters, the stage YAML, the trainer's
``--config`` file and its command-line flags are all read through :func:`from_dict`, so an option has one
name, one type and one meaning everywhere. Errors look like
``stage_configs.dpo.beta: expected a float, got 'high'`` and are raised before any model loads.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")
_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type. ``path`` is the dotted key path."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, checking every key and type; nested dataclasses recurse."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"expected a mapping of options, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = _join(path, str(unknown[0]))
        raise ConfigError(where, f"unknown option; {cls.__name__} accepts: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        key_path = _join(path, name)
        if name in data:
            values[name] = coerce(data[name], hints[name], key_path)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(key_path, "required option is missing")
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as exc:
            if path and not exc.path.startswith(path):
                raise ConfigError(_join(path, exc.path), str(exc).split(": ", 1)[-1]) from None
            raise
    return instance


def to_dict(instance: Any) -> dict[str, Any]:
    """The plain-data form of a config dataclass (paths as strings), suitable for YAML or JSON."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(instance)


def coerce(value: Any, annotation: Any, path: str) -> Any:
    """Check ``value`` against a type annotation, converting only where it is lossless (int -> float)."""
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, path)
            except ConfigError as exc:
                errors.append(exc)
        raise (
            errors[0]
            if len(errors) == 1
            else ConfigError(path, f"got {_describe(value)}, which fits none of {_type_name(annotation)}")
        )
    if origin is Literal:
        choices = get_args(annotation)
        if value not in choices:
            raise ConfigError(path, f"expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(path, f"expected a list, got {_describe(value)}")
        (item,) = get_args(annotation)[:1] or (Any,)
        items = [coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping, got {_describe(value)}")
        _, item = get_args(annotation) or (str, Any)
        return {str(k): coerce(v, item, _join(path, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, path)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected true or false, got {_describe(value)}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected an integer, got {_describe(value)}")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
        raise ConfigError(path, f"expected a float, got {_describe(value)}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, f"expected a string, got {_describe(value)}")
    if annotation is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise ConfigError(path, f"expected a path, got {_describe(value)}")
    raise TypeError(f"{path}: unsupported config type {annotation!r}")


def parse_cli_value(text: str) -> Any:
    """A command-line value as a YAML scalar or list: ``3`` an int, ``true`` a bool, ``[a, b]`` a list.

    Anything else (``a: b``, ``null``) stays the text that was typed; float fields also accept ``1e-5``.
    """
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(value, dict) or value is None and text.strip() else value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file; a syntax error names the file and line."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("", f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError("", f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: expected a mapping of options at the top level")
    return data


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    return f"a {type(value).__name__}"


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))
