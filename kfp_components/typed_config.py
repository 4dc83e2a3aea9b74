"""Build typed config dataclasses from plain data (YAML, JSON, CLI flags) with errors that name the key path.

One set of dataclasses describes every option; the component parameters, the stage YAML, the trainer's
``--config`` file and its command-line flags are all read through :func:`from_dict`, so an option has one
name, one type and one meaning everywhere. Errors look like
``stage_configs.dpo.beta: expected a float, got 'high'`` and are raised before any model loads; every problem
of a mapping is reported at once, not only the first.

Enumerated options are ``Literal`` types: :func:`from_dict` checks them, and :class:`Options` (the base of
every option group) checks them again when a config is built directly in Python, so an unknown value is an
error naming the key and the allowed values wherever it comes from.

An option may have documented *aliases* (the names other tools use for it, e.g. a stage's
``preference_dataset_path`` for its ``dataset_name_or_path``): a class lists them in ``option_aliases``
(alias -> option name); :func:`from_dict` maps each to exactly one option and refuses both at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")
_FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(ValueError):
    """One or more config values are missing, unknown or wrong.

    ``path`` is the dotted key path of the first problem; ``problems`` lists every problem as
    ``(key path, message)``.
    """

    def __init__(self, path: str, message: str, *, problems: list[tuple[str, str]] | None = None):
        self.path = path
        self.problems = problems or [(path, message)]
        super().__init__(f"{path}: {message}" if path and len(self.problems) == 1 else message)

    @classmethod
    def of(cls, problems: Iterable[tuple[str, str]]) -> ConfigError:
        """One error for several problems: its text lists them all, one per line."""
        problems = list(problems)
        if len(problems) == 1:
            return cls(*problems[0])
        lines = [f"{path}: {message}" if path else message for path, message in problems]
        return cls(problems[0][0], f"{len(problems)} problems:\n  " + "\n  ".join(lines), problems=problems)

    def under(self, prefix: str) -> ConfigError:
        """The same problems with their key paths under ``prefix`` (``beta`` -> ``stage_configs.dpo.beta``)."""
        if not prefix:
            return self
        return ConfigError.of(
            (path if path.startswith(prefix) else _join(prefix, path) if path else prefix, message)
            for path, message in self.problems
        )


class Options:
    """Base of the option dataclasses: enumerated (``Literal``) options are checked when the config is built,
    in Python as from YAML or flags, so an unknown value is never carried to where it is used."""

    #: Other names accepted for an option in YAML, flags and overrides: alias -> option name.
    option_aliases: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        problems = []
        for name, choices in literal_choices(type(self)).items():
            value = getattr(self, name)
            if value not in choices:
                problems.append((name, _choice_message(choices, value)))
        if problems:
            raise ConfigError.of(problems)


def aliases_of(cls: type) -> dict[str, str]:
    """Every alias of ``cls`` and its bases: alias -> option name."""
    merged: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        merged.update(klass.__dict__.get("option_aliases", {}))
    return merged


def literal_choices(cls: type) -> dict[str, tuple[Any, ...]]:
    """The allowed values of each enumerated (``Literal`` or ``Literal | None``) field of dataclass ``cls``."""
    if cls not in _CHOICES:
        _CHOICES[cls] = _literal_choices(cls)
    return _CHOICES[cls]


_CHOICES: dict[type, dict[str, tuple[Any, ...]]] = {}


def _literal_choices(cls: type) -> dict[str, tuple[Any, ...]]:
    hints = typing.get_type_hints(cls)
    choices = {}
    for field in dataclasses.fields(cls):
        annotation = hints[field.name]
        options = get_args(annotation) if get_origin(annotation) in (typing.Union, types.UnionType) else ()
        literal = next((o for o in options if get_origin(o) is Literal), annotation)
        if get_origin(literal) is Literal:
            allowed = get_args(literal)
            choices[field.name] = (*allowed, None) if type(None) in options else allowed
    return choices


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, checking every key and type; nested dataclasses recurse.

    Every problem of ``data`` (unknown keys, wrong types, missing options) is reported in one
    :class:`ConfigError`; the class's own ``validate`` runs once the types are right.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"expected a mapping of options, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    aliases = aliases_of(cls)
    problems: list[tuple[str, str]] = []
    given: dict[str, Any] = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        if name not in fields:
            problems.append((_join(path, str(key)), unknown_option_message(str(key), cls)))
        elif name in given:
            other = next(k for k in data if aliases.get(k, k) == name and k != key)
            problems.append(
                (_join(path, str(key)), f"{key} and {other} are the same option ({name}); set only one")
            )
        else:
            given[name] = (key, value)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        if name in given:
            key, value = given[name]
            try:
                values[name] = coerce(value, hints[name], _join(path, key))
            except ConfigError as exc:
                problems.extend(exc.problems)
        elif default_of(field) is dataclasses.MISSING:
            problems.append((_join(path, name), "required option is missing"))
    if problems:
        raise ConfigError.of(problems)
    try:
        instance = cls(**values)
        validate = getattr(instance, "validate", None)
        if callable(validate):
            validate()
    except ConfigError as exc:
        raise exc.under(path) from None
    return instance


def default_of(field: dataclasses.Field) -> Any:
    """A field's default (a fresh value from its factory), or :data:`dataclasses.MISSING` when it is required."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def unknown_option_message(key: str, cls: type) -> str:
    """``unknown option; did you mean num_train_epochs? (SFTStageConfig accepts: ...)``."""
    names = sorted({f.name for f in dataclasses.fields(cls) if f.init} | set(aliases_of(cls)))
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return f"unknown option; {hint}{cls.__name__} accepts: {', '.join(names)}"


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
            raise ConfigError(path, _choice_message(choices, value))
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
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
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
    return text if isinstance(value, dict) or (value is None and text.strip()) else value


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


def _choice_message(choices: tuple[Any, ...], value: Any) -> str:
    shown = ", ".join("null" if c is None else str(c) for c in choices)
    close = difflib.get_close_matches(str(value), [str(c) for c in choices if c is not None], n=1)
    hint = f" (did you mean {close[0]}?)" if close and close[0] != str(value) else ""
    return f"expected one of {shown}, got {value!r}{hint}"


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
