"""The option tables of ``docs/multistage.md``, generated from the config dataclasses so they cannot drift.

python -m kfp_components.orchestration.options_doc                              # print the tables
python -m kfp_components.orchestration.options_doc --write docs/multistage.md   # refresh the docs
python -m kfp_components.orchestration.options_doc --check docs/multistage.md   # exit 1 if stale
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from kfp_components.cli_args import field_help
from kfp_components.orchestration.config import PipelineConfig
from kfp_components.stages.base import StageConfig
from kfp_components.stages.registry import BUILTIN_STAGES
from kfp_components.stages.training import (
    TRAINING_OPTION_GROUPS,
    TrainingData,
    TrainingStageConfig,
    option_groups,
)
from kfp_components.typed_config import aliases_of, default_of

BEGIN = "<!-- BEGIN GENERATED OPTIONS: python -m kfp_components.orchestration.options_doc --write docs/multistage.md -->"
END = "<!-- END GENERATED OPTIONS -->"


def options_markdown() -> str:
    """Every option of the pipeline YAML as Markdown tables."""
    parts = [
        "### Top level\n",
        _table(PipelineConfig),
        "### Every stage (`stage_configs.<name>`)\n",
        _table(StageConfig),
        f"### Every training stage ({', '.join(_training_stages())}): data and launch\n",
        _table(TrainingData, TrainingStageConfig),
        "### Training options by stage\n",
        "| stage | option groups (tables below) | data format |\n| --- | --- | --- |",
    ]
    for name, stage in BUILTIN_STAGES.items():
        groups = ", ".join(f"`{g.__name__}`" for g in option_groups(stage.config_class))
        parts.append(f"| `{name}` | {groups} | `{getattr(stage, 'data_format', '')}` |")
    parts.append("")
    for group in TRAINING_OPTION_GROUPS:
        users = [n for n, s in BUILTIN_STAGES.items() if issubclass(s.config_class, group)]
        if not users:
            continue
        summary = (group.__doc__ or "").strip().splitlines()[0]
        parts.append(f"#### `{group.__name__}`: {summary} (stages: {', '.join(users)})\n")
        parts.append(_table(group))
    nested: dict[type, list[str]] = {}
    for name, stage in BUILTIN_STAGES.items():
        own = _table(stage.config_class)
        if own.count("\n") > 2:
            parts.append(f"#### Options of the `{name}` stage only\n")
            parts.append(own)
        for annotation in typing.get_type_hints(stage.config_class).values():
            for options_class in _nested_options(annotation):
                nested.setdefault(options_class, []).append(name)
        for options_class in getattr(stage.config_class, "documented_mappings", {}).values():
            nested.setdefault(options_class, []).append(name)
    for options_class, users in nested.items():
        summary = (options_class.__doc__ or "").strip().splitlines()[0]
        parts.append(
            f"#### `{options_class.__name__}`: {summary} (stages: {', '.join(dict.fromkeys(users))})\n"
        )
        parts.append(_table(options_class, inherited_too=True))
    parts.append("### Aliases\n")
    parts.append(
        "Other names accepted for an option (the names of the modular fine-tuning guide and of Hugging Face "
        "`TrainingArguments`); each maps to exactly one option, and giving both is an error.\n"
    )
    parts.append("| alias | option | where |\n| --- | --- | --- |")
    where: dict[tuple[str, str], list[str]] = {}
    for name, stage in BUILTIN_STAGES.items():
        for alias, option in aliases_of(stage.config_class).items():
            where.setdefault((alias, option), []).append(name)
    for (alias, option), names in sorted(where.items()):
        shown = "every stage" if len(names) == len(BUILTIN_STAGES) else ", ".join(names)
        parts.append(f"| `{alias}` | `{option}` | {shown} |")
    return "\n".join(parts).rstrip() + "\n"


def _nested_options(annotation: Any) -> list[type]:
    """The option dataclasses an option's type holds (``JudgeOptions`` of ``JudgeOptions | None``)."""
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return [annotation]
    if get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in get_args(annotation) if isinstance(a, type) and dataclasses.is_dataclass(a)]
    return []


def _training_stages() -> list[str]:
    return [n for n, s in BUILTIN_STAGES.items() if issubclass(s.config_class, TrainingStageConfig)]


def _table(*classes: type, inherited_too: bool = False) -> str:
    """One row per field that each of ``classes`` declares itself (every field with ``inherited_too``)."""
    rows = ["| option | type | default | description |", "| --- | --- | --- | --- |"]
    for cls in classes:
        helps = field_help(cls)
        hints = typing.get_type_hints(cls)
        inherited = (
            set()
            if inherited_too
            else {
                f.name
                for base in cls.__mro__[1:]
                if dataclasses.is_dataclass(base)
                for f in dataclasses.fields(base)
            }
        )
        for f in dataclasses.fields(cls):
            if f.name not in inherited:
                text = (helps.get(f.name) or f.metadata.get("help", "")).replace("|", "\\|")
                rows.append(f"| `{f.name}` | {_type_text(hints[f.name])} | {_default_text(f)} | {text} |")
    return "\n".join(rows) + "\n"


def _type_text(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{choice}`" for choice in get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a) for a in get_args(annotation) if a is not type(None))
    if origin is list:
        return f"list of {_type_text(get_args(annotation)[0])}"
    if origin is dict:
        return "mapping of name to options"
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return f"mapping: `{annotation.__name__}` (table below)"
    return {str: "string", int: "integer", float: "float", bool: "bool"}.get(annotation, str(annotation))


def _default_text(f: dataclasses.Field) -> str:
    value = default_of(f)
    if value is dataclasses.MISSING:
        return "required"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return f"`[{', '.join(map(str, value))}]`"
    if isinstance(value, dict):
        return "`{}`"
    if isinstance(value, str) and "\n" in value:  # a template: its start, on one line
        start = value.replace("\n", " ").replace("|", "\\|")
        return f"`{start[:48].rstrip()}...`"
    return '`""`' if value == "" else f"`{value}`"


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between the BEGIN and END markers replaced by ``block``."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"the markers {BEGIN!r} and {END!r} are missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kfp_components.orchestration.options_doc")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", metavar="FILE", help="replace the generated block in FILE")
    action.add_argument("--check", metavar="FILE", help="exit 1 when the generated block in FILE is stale")
    args = parser.parse_args(argv)
    block = options_markdown()
    if not (args.write or args.check):
        print(block)
        return 0
    path = Path(args.write or args.check)
    text = path.read_text(encoding="utf-8")
    updated = replace_block(text, block)
    if args.check:
        if updated != text:
            print(f"{path}: the option tables are stale; run python -m {__spec__.name} --write {path}")
            return 1
        return 0
    path.write_text(updated, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
