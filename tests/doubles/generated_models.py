"""Strict validation of JSON documents against OpenAPI-generated pydantic models.

The official Python packages of Kubeflow Trainer (``kubeflow-trainer-api``) and Model Registry
(``model-registry``'s ``mr_openapi``) describe their APIs as pydantic models made by OpenAPI Generator. Those
models are lenient in two ways an API server is not: ``from_dict`` silently drops keys a model does not
declare, and a nested error is reported without the path to it. :func:`problems` walks a document along the
models' field annotations instead, so that

* every key a model does not declare is reported as an unknown field, with its full path;
* every type, enum, pattern or required-field error is reported with its full path;
* ``oneOf`` wrappers (``actual_instance`` models, e.g. Kubernetes quantities or Model Registry metadata
  values) are resolved with the wrapper's own ``from_dict``, then the chosen model is walked the same way.

Paths are tuples of keys and list indexes; callers format them as their server does.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Union

from pydantic import BaseModel, ValidationError

Path = tuple[str | int, ...]
Problem = tuple[Path, str]
UNKNOWN_FIELD = "unknown field"


def problems(model: type[BaseModel], document: Any, path: Path = ()) -> list[Problem]:
    """Every problem of ``document`` as an instance of ``model``: ``(path, message)`` pairs, in document order."""
    return _check(model, document, path)


def unknown_fields(found: list[Problem]) -> list[Path]:
    """The paths of the unknown fields among ``found``."""
    return [path for path, message in found if message == UNKNOWN_FIELD]


def is_one_of(model: type[BaseModel]) -> bool:
    """Whether ``model`` is an OpenAPI ``oneOf`` wrapper (its value lives in ``actual_instance``)."""
    return "actual_instance" in model.model_fields and "one_of_schemas" in model.model_fields


def _check(annotation: Any, value: Any, path: Path) -> list[Problem]:
    annotation = _strip(annotation)
    if value is None:
        return []  # required fields are checked by the model that holds them
    origin = typing.get_origin(annotation)
    if origin in (list, typing.List):  # noqa: UP006 (the generated models use typing.List)
        if not isinstance(value, list):
            return [(path, f"Input should be a valid list, got {type(value).__name__}")]
        (item,) = typing.get_args(annotation) or (Any,)
        return [p for index, entry in enumerate(value) for p in _check(item, entry, (*path, index))]
    if origin in (dict, typing.Dict):  # noqa: UP006
        if not isinstance(value, dict):
            return [(path, f"Input should be a valid object, got {type(value).__name__}")]
        _, item = typing.get_args(annotation) or (str, Any)
        return [p for key, entry in value.items() for p in _check(item, entry, (*path, key))]
    if _is_union(annotation):
        members = [m for m in typing.get_args(annotation) if m is not type(None)]
        models = [m for m in members if _holds_model(m)]
        if len(members) == 1:
            return _check(members[0], value, path)
        if models:  # a union with a model in it: the first member that takes the value
            for member in members:
                if not _check(member, value, path):
                    return []
            return [(path, f"Input matches none of {', '.join(_name(m) for m in members)}")]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _check_model(annotation, value, path)
    return []  # a scalar: checked by the model that holds it (see _check_model)


def _check_model(model: type[BaseModel], value: Any, path: Path) -> list[Problem]:
    if is_one_of(model):
        try:
            chosen = model.from_dict(value).actual_instance  # type: ignore[attr-defined]
        except (ValidationError, ValueError, TypeError, AttributeError) as error:
            return [(path, _one_line(error))]
        return _check_model(type(chosen), value, path) if isinstance(chosen, BaseModel) else []
    if not isinstance(value, dict):
        return [(path, f"Input should be a valid object ({model.__name__}), got {type(value).__name__}")]
    fields = {(info.alias or name): info for name, info in model.model_fields.items()}
    found: list[Problem] = []
    scalars: dict[str, Any] = {}
    for key, entry in value.items():
        info = fields.get(key)
        if info is None:
            found.append(((*path, key), UNKNOWN_FIELD))
        elif _holds_model(info.annotation):
            found += _check(info.annotation, entry, (*path, key))
        else:
            scalars[key] = entry
    # The model itself checks its scalar fields and which fields are required, so that its own validators
    # (enums, patterns, lengths) run; fields holding models were walked above and are only required here.
    try:
        model.model_validate(scalars)
    except ValidationError as error:
        for detail in error.errors():
            key = detail["loc"][0] if detail["loc"] else ""
            if detail["type"] == "missing" and key in value:
                continue
            found.append(((*path, *detail["loc"]), detail["msg"]))
    return found


def _strip(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (Union, types.UnionType)


def _holds_model(annotation: Any) -> bool:
    annotation = _strip(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_holds_model(arg) for arg in typing.get_args(annotation) if arg is not Ellipsis)


def _name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
