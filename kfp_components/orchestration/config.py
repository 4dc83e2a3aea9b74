"""The multi-stage pipeline's YAML: one typed :class:`PipelineConfig` whose ``stage_configs`` are each
stage's own config dataclass.

Loading checks everything that can be checked without a model: YAML syntax (file and line), unknown keys,
types, required options, stage names, and that ``stages`` and ``stage_configs`` agree. Every error is a
:class:`~kfp_components.typed_config.ConfigError` naming the key path, for example
``stage_configs.dpo.beta: expected a float, got 'high'``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kfp_components.stages.base import LOG_LEVELS, StageConfig, config_class_of
from kfp_components.stages.registry import get_stage_class
from kfp_components.typed_config import ConfigError, from_dict, load_config_file, parse_cli_value

TorchDtype = Literal["auto", "bfloat16", "float16", "float32"]


@dataclass(kw_only=True)
class PipelineConfig:
    """A multi-stage fine-tuning pipeline: stages run in order, each from the model the previous one saved.

    Attributes:
        model_name_or_path: Model the first stage starts from: a Hugging Face id or a local folder.
        tokenizer_name_or_path: Tokenizer of the first stage (default: the model's). Later stages use the
            tokenizer saved with the previous stage's model.
        output_dir: Where every stage's outputs, pipeline_state.json, pipeline_training.log and final_model go.
        torch_dtype: Compute precision of every stage that has a `torch_dtype` option and does not set it:
            auto (each stage's own default), bfloat16, float16 (autocast with loss scaling, for GPUs without
            bf16) or float32.
        log_level: Log level of the run (DEBUG, INFO, WARNING, ERROR); a stage's log_level overrides it.
        stages: Names of the stages to run, in order: sft, osft, dpo, a registered custom stage, or any name
            whose entry in `stage_configs` names its type (`type: sft`), so a stage type can run twice.
        stage_configs: Options of each stage listed in `stages`, keyed by its name.
    """

    model_name_or_path: str
    output_dir: str
    stages: list[str]
    stage_configs: dict[str, StageConfig] = field(default_factory=dict)
    tokenizer_name_or_path: str = ""
    torch_dtype: TorchDtype = "auto"
    log_level: str = "INFO"

    def validate(self) -> None:
        """Check the top-level options and the list of stages (each stage's options are checked on their own)."""
        problems = [
            (name, "required option is empty")
            for name in ("model_name_or_path", "output_dir")
            if not getattr(self, name)
        ]
        if self.log_level.upper() not in LOG_LEVELS:
            problems.append(("log_level", f"expected one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}"))
        if not self.stages:
            problems.append(("stages", "list at least one stage, for example [sft]"))
        for i, name in enumerate(self.stages):
            if name in self.stages[:i]:
                problems.append(
                    (
                        f"stages[{i}]",
                        f"stage {name!r} is listed twice; to run a stage type twice, give the second entry its "
                        f"own name and its type (stages: [{name}, {name}_2] with stage_configs.{name}_2.type: "
                        f"{name})",
                    )
                )
        if problems:
            raise ConfigError.of(problems)

    @property
    def tokenizer(self) -> str:
        """The tokenizer reference of the first stage."""
        return self.tokenizer_name_or_path or self.model_name_or_path

    def default_stage_dir(self, name: str) -> str:
        """``<output_dir>/stages/<NN>_<name>``, NN the 1-based position of the stage in ``stages``."""
        return str(Path(self.output_dir) / "stages" / f"{self.stages.index(name) + 1:02d}_{name}")


def load_pipeline_config(
    path: str | Path, overrides: Mapping[str, Any] | Iterable[str] | None = None
) -> PipelineConfig:
    """Read a pipeline YAML file, apply ``overrides`` and build the typed config.

    ``overrides`` maps dotted key paths to values (``{"stage_configs.sft.dataset_name_or_path": "/data/chat.jsonl"}``), or
    is a list of ``KEY=VALUE`` texts whose values are read as YAML scalars (``max_steps=3`` is an int).
    """

    data = load_config_file(path)
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = [parse_override(text) for text in overrides or ()]
    for key, value in items:
        apply_override(data, key, value)
    return pipeline_config_from_dict(data)


def pipeline_config_from_dict(data: Mapping[str, Any]) -> PipelineConfig:
    """Build and check a :class:`PipelineConfig` from plain data (what the YAML holds).

    Each stage's options are read with the ``config_class`` of its type (the entry's ``type``, else its name)
    at the path ``stage_configs.<name>``; the stage's ``stage_name`` and default ``output_dir`` are filled in,
    and ``torch_dtype`` becomes the stage's ``torch_dtype`` unless the stage sets one. Every problem found,
    at the top and in every stage, is reported in one :class:`ConfigError`.
    """
    if not isinstance(data, Mapping):
        raise ConfigError("", "expected a mapping of options at the top level")
    top = dict(data)
    raw_stage_configs = top.pop("stage_configs", None)
    problems: list[tuple[str, str]] = []
    config: PipelineConfig | None = None
    try:
        config = from_dict(PipelineConfig, top)
    except ConfigError as exc:
        problems.extend(exc.problems)
    if raw_stage_configs is None:
        raw_stage_configs = {}
    if not isinstance(raw_stage_configs, Mapping):
        problems.append(("stage_configs", "expected a mapping of stage name to options"))
        raw_stage_configs = {}
    stages = config.stages if config else [s for s in top.get("stages") or [] if isinstance(s, str)]
    for name in raw_stage_configs:
        if name not in stages:
            problems.append(
                (
                    f"stage_configs.{name}",
                    f"stage {name!r} is not listed in stages ({', '.join(stages)}); "
                    "add it to stages or remove its options",
                )
            )
    parsed: dict[str, StageConfig] = {}
    for position, name in enumerate(stages):
        try:
            parsed[name] = _stage_config(name, position, raw_stage_configs, config, top)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems or config is None:
        raise ConfigError.of(problems)
    config.stage_configs = parsed
    return config


def _stage_config(
    name: str, position: int, raw: Mapping[str, Any], config: PipelineConfig | None, top: Mapping[str, Any]
) -> StageConfig:
    """One stage's options, read with its type's config class."""
    path = f"stage_configs.{name}"
    if name not in raw:
        get_stage_class(name, f"stages[{position}]")  # an unknown name says so first
        raise ConfigError(path, f"stage {name!r} is listed in stages but has no options here")
    options = raw[name]
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ConfigError(path, f"expected a mapping of options for stage {name!r}")
    options = dict(options)
    if "stage_name" in options:
        raise ConfigError(f"{path}.stage_name", "set by the pipeline from the stage_configs key; remove it")
    type_key = next((k for k in ("stage_type", "type") if k in options), None)
    stage_type = options[type_key] if type_key else name
    if not isinstance(stage_type, str):
        raise ConfigError(f"{path}.{type_key}", f"expected a stage name, got {stage_type!r}")
    stage_class = get_stage_class(stage_type, f"{path}.{type_key}" if type_key else f"stages[{position}]")
    config_class = config_class_of(stage_class)
    _read_mixtures(options, path)
    options["stage_name"] = name
    if config is not None:
        options.setdefault("output_dir", config.default_stage_dir(name))
        if config.torch_dtype != "auto" and "torch_dtype" in _field_names(config_class):
            options.setdefault("torch_dtype", config.torch_dtype)
    return from_dict(config_class, options, path)


#: The stage options that name a dataset, which a YAML list of sources may give as a mixture.
DATASET_OPTIONS = ("dataset_name_or_path", "eval_dataset_name_or_path")


def _read_mixtures(options: dict[str, Any], path: str) -> None:
    """A dataset option given as a YAML list of sources becomes the mixture string the data stage reads
    (:func:`kfp_components.data.mixture.mixture_from_list`); its problems name the item's key path. The string
    is then checked as one written by hand (the stage's options validate their datasets)."""
    from kfp_components.data.mixture import mixture_from_list

    for key in DATASET_OPTIONS:
        value = options.get(key)
        if not isinstance(value, list):
            continue
        spec, problems = mixture_from_list(value)
        if problems:
            raise ConfigError.of((f"{path}.{key}{where}", message) for where, message in problems)
        options[key] = spec


def parse_override(text: str) -> tuple[str, Any]:
    """``"stage_configs.sft.max_steps=3"`` -> ``("stage_configs.sft.max_steps", 3)``: the value is read as a
    YAML scalar or list (``3`` an int, ``true`` a bool, ``[a, b]`` a list); ``KEY=`` is the empty string."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("", f"override {text!r}: expected KEY=VALUE, e.g. stage_configs.sft.max_steps=3")
    return key, parse_cli_value(value) if value.strip() else ""


def apply_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``key`` ``"a.b.c"``, creating mappings on the way."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(key, "override: empty part in the key path")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(key, f"override: {where} is not a mapping, so it has no key {parts[i + 1]!r}")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}
