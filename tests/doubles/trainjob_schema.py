"""What a Kubernetes API server serving the TrainJob CRD accepts: one schema per Kubeflow Trainer release.

Two sources, the same questions (which fields are unknown, what else is invalid, which CRD is served):

* :class:`CrdSchema`: the release's CRD file from the reference folder (see :mod:`doubles.reference`):
  its ``openAPIV3Schema`` checked the way a strict API server does (unknown fields, JSON Schema keywords,
  the simple ``x-kubernetes-validations`` rules: ``self.x.matches('re')``, ``size(self.x) <= n`` and
  ``self == '' || self.matches('re')``; transition rules with ``oldSelf`` are skipped on create, other rules
  are not evaluated).
* :class:`ApiModelSchema`: the release's official Python models (``kubeflow-trainer-api``, loaded by
  :mod:`doubles.trainer_api`), walked strictly by :mod:`doubles.generated_models`: unknown fields, types,
  enums and required fields, with full paths. The CRD it serves is reduced to what clients read from it:
  the served version and the names of the ``spec`` fields.

:func:`trainjob_schema` picks the CRD where its file is present, else the models; the CRD is the stricter
check (it has the patterns and CEL rules the models lack).

Both also apply what the API server checks of any object's metadata (:func:`metadata_errors`).
"""

from __future__ import annotations

import functools
import re
import typing
from pathlib import Path
from typing import Any, Protocol

import yaml

from doubles import generated_models, reference
from doubles.trainer_api import trainer_api_model

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
CRD_NAME = "trainjobs.trainer.kubeflow.org"
RELEASES = ("v2.1.0", "v2.3.0")
OBJECT_META_FIELDS = {
    "name",
    "generateName",
    "namespace",
    "labels",
    "annotations",
    "finalizers",
    "ownerReferences",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
}

_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class TrainJobSchema(Protocol):
    """The TrainJob schema of one Kubeflow Trainer release."""

    release: str
    source: str

    def crd(self) -> dict[str, Any]:
        """The CRD document the API server serves for TrainJobs."""
        ...

    def unknown_fields(self, obj: Any) -> list[str]:
        """Paths of the fields of ``obj`` this release does not declare (``spec.labels``, ``a.b[0].c``)."""
        ...

    def errors(self, obj: Any) -> list[tuple[str, str]]:
        """``(field path, message)`` for every other schema violation of ``obj``."""
        ...


class CrdSchema:
    """A TrainJob schema read from the release's CRD file."""

    def __init__(self, crd: dict[str, Any], *, release: str = "", source: str = "a CRD document"):
        self._crd = crd
        self.schema = crd_schema(crd)
        self.release = release
        self.source = source

    def crd(self) -> dict[str, Any]:
        return self._crd

    def unknown_fields(self, obj: Any) -> list[str]:
        return crd_unknown_fields(obj, self.schema)

    def errors(self, obj: Any) -> list[tuple[str, str]]:
        return crd_schema_errors(obj, self.schema)


class ApiModelSchema:
    """A TrainJob schema from the release's ``kubeflow-trainer-api`` models.

    ``model`` names another resource's model, e.g. ``TrainerV1alpha1ClusterTrainingRuntime``.
    """

    def __init__(self, release: str, model: str = "TrainerV1alpha1TrainJob"):
        self.release = release
        self.model = trainer_api_model(release.removeprefix("v"), model)
        self.source = f"kubeflow-trainer-api {release.removeprefix('v')} models"

    def crd(self) -> dict[str, Any]:
        spec_model = _model_of(self.model.model_fields["spec"].annotation)
        spec_fields = {info.alias or name: {} for name, info in spec_model.model_fields.items()}
        schema = {"type": "object", "properties": {"spec": {"type": "object", "properties": spec_fields}}}
        return {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": CRD_NAME, "annotations": {"kfp-components.test/source": self.source}},
            "spec": {
                "group": GROUP,
                "names": {"kind": "TrainJob", "plural": "trainjobs", "singular": "trainjob"},
                "scope": "Namespaced",
                "versions": [
                    {"name": VERSION, "served": True, "storage": True, "schema": {"openAPIV3Schema": schema}}
                ],
            },
        }

    def unknown_fields(self, obj: Any) -> list[str]:
        found = generated_models.problems(self.model, obj)
        return [_json_path(path) for path in generated_models.unknown_fields(found)]

    def errors(self, obj: Any) -> list[tuple[str, str]]:
        found = generated_models.problems(self.model, obj)
        return [
            (_json_path(path), message)
            for path, message in found
            if message != generated_models.UNKNOWN_FIELD
        ]


@functools.cache
def trainjob_schema(release: str) -> TrainJobSchema:
    """The schema of ``release`` (``v2.1.0`` or ``v2.3.0``): its CRD file where present, else its models."""
    path = reference.trainjob_crd_file(release)
    if path is not None:
        return CrdSchema(load_crd(path), release=release, source=str(path))
    return ApiModelSchema(release)


def api_server_errors(obj: Any, schema: TrainJobSchema) -> list[str]:
    """Everything a strict API server serving ``schema`` would refuse in ``obj``: unknown fields, schema
    errors and invalid metadata, as ``"<path>: <message>"`` lines (empty: it would be accepted)."""
    problems = [f'{where}: unknown field "{where}"' for where in schema.unknown_fields(obj)]
    problems += [f"{where}: {message}" for where, message in schema.errors(obj)]
    problems += [f"{where}: {message}" for where, message in metadata_errors(obj.get("metadata") or {})]
    return problems


def prune_unknown_fields(obj: Any, unknown: list[str], path: str = "") -> Any:
    """``obj`` without the fields at the ``unknown`` paths (what a non-strict API server stores)."""
    if not unknown:
        return obj
    dropped = set(unknown)

    def prune(value: Any, where: str) -> Any:
        if isinstance(value, dict):
            return {
                k: prune(v, f"{where}.{k}" if where else k)
                for k, v in value.items()
                if (f"{where}.{k}" if where else k) not in dropped
            }
        if isinstance(value, list):
            return [prune(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value

    return prune(obj, path)


def _model_of(annotation: Any) -> Any:
    while typing.get_origin(annotation) is not None:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


# ------------------------------------------------------------------------------------------ CRD files


def load_crd(path: str | Path) -> dict[str, Any]:
    """A CRD from its YAML file (with libyaml when there is one: CRDs are large)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=loader)


def crd_schema(crd: dict[str, Any], version: str = VERSION) -> dict[str, Any]:
    """The ``openAPIV3Schema`` of one served version of a CRD."""
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            return served["schema"]["openAPIV3Schema"]
    raise KeyError(f"{crd['metadata']['name']} does not serve {version}")


def crd_unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths of fields the schema does not declare, as a strict API server reports them.

    A node's fields are checked where it lists ``properties`` and neither preserves unknown fields nor has
    ``additionalProperties``; the root ``metadata`` (an ObjectMeta) is checked against ObjectMeta's fields.
    """
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(obj, dict):
        properties = schema.get("properties")
        additional = schema.get("additionalProperties")
        if path == "metadata" and not properties:
            return [f"metadata.{k}" for k in obj if k not in OBJECT_META_FIELDS]
        if properties is not None and not additional:
            for key, value in obj.items():
                where = f"{path}.{key}" if path else key
                if key not in properties:
                    found.append(where)
                else:
                    found += crd_unknown_fields(value, properties[key], where)
        elif isinstance(additional, dict):
            for key, value in obj.items():
                found += crd_unknown_fields(value, additional, f"{path}.{key}" if path else key)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(obj):
            found += crd_unknown_fields(item, schema["items"], f"{path}[{index}]")
    return found


def crd_schema_errors(obj: Any, schema: dict[str, Any]) -> list[tuple[str, str]]:
    """``(field path, message)`` for every schema violation: JSON Schema keywords (types, required, enum,
    patterns, lengths, bounds) and the simple ``x-kubernetes-validations`` rules (see the module docstring)."""
    import jsonschema

    errors = [
        (_json_path(error.absolute_path), error.message)
        for error in jsonschema.Draft4Validator(schema).iter_errors(obj)
    ]
    return sorted(errors) + _cel_errors(obj, schema, "")


def metadata_errors(metadata: dict[str, Any]) -> list[tuple[str, str]]:
    """What the API server checks of any object's metadata: the name, label keys and values."""
    errors: list[tuple[str, str]] = []
    name = metadata.get("name", "")
    if not name:
        errors.append(("metadata.name", "Required value: name or generateName is required"))
    elif len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        errors.append(("metadata.name", f"Invalid value: {name!r}: must be a lowercase RFC 1123 subdomain"))
    for key, value in (metadata.get("labels") or {}).items():
        prefix, _, label = key.rpartition("/")
        if (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix))) or not (
            _LABEL_NAME.match(label) and len(label) <= 63
        ):
            errors.append(("metadata.labels", f"Invalid value: {key!r}: not a valid label key"))
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            errors.append(("metadata.labels", f"Invalid value: {value!r}: not a valid label value"))
    return errors


_CEL_MATCHES = re.compile(r"^self((?:\.\w+)*)\.matches\('(.*)'\)$")
_CEL_SIZE = re.compile(r"^size\(self((?:\.\w+)*)\)\s*<=\s*(\d+)$")
_CEL_EMPTY_OR_MATCHES = re.compile(r"^self\s*==\s*''\s*\|\|\s*self\.matches\('(.*)'\)$")


def _cel_errors(obj: Any, schema: dict[str, Any], path: str) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    for rule in schema.get("x-kubernetes-validations") or []:
        if not _cel_rule_holds(rule.get("rule", ""), obj):
            errors.append((path or "<root>", rule.get("message") or f"failed rule: {rule.get('rule')}"))
    if isinstance(obj, dict):
        for key, value in obj.items():
            child = (schema.get("properties") or {}).get(key)
            if child is None and isinstance(schema.get("additionalProperties"), dict):
                child = schema["additionalProperties"]
            if child is not None:
                errors += _cel_errors(value, child, f"{path}.{key}" if path else key)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(obj):
            errors += _cel_errors(item, schema["items"], f"{path}[{index}]")
    return errors


def _cel_rule_holds(rule: str, value: Any) -> bool:
    """Evaluate the rule forms this server knows; others (and transition rules) count as holding."""
    rule = rule.strip()
    if "oldSelf" in rule:
        return True
    if match := _CEL_MATCHES.match(rule):
        target = _select(value, match.group(1))
        return not isinstance(target, str) or re.search(_cel_regex(match.group(2)), target) is not None
    if match := _CEL_SIZE.match(rule):
        target = _select(value, match.group(1))
        return target is None or len(target) <= int(match.group(2))
    if match := _CEL_EMPTY_OR_MATCHES.match(rule):
        return value == "" or re.search(_cel_regex(match.group(1)), str(value)) is not None
    return True


def _cel_regex(literal: str) -> str:
    return literal.replace("\\\\", "\\")


def _select(value: Any, dotted: str) -> Any:
    for part in filter(None, dotted.split(".")):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _json_path(parts: Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<root>"
