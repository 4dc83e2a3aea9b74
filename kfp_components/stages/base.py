"""What every stage of a multi-stage pipeline is: a typed config, an ``execute`` step and a result.

A stage takes a model *reference* (a local folder or a Hugging Face id) and produces a new model folder that
the next stage starts from. The pipeline (:mod:`kfp_components.orchestration`) builds each stage's config from
the YAML, validates every stage before any model loads, and hands the stages their input models in order.

To add a technique, subclass :class:`StageConfig` and :class:`BaseStage` and register the stage with
``Pipeline.register_stage("name", MyStage)``; see ``docs/multistage.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from kfp_components.typed_config import ConfigError, Options, to_dict

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: How an option names what an earlier stage of the pipeline writes: ``stage:<name>``.
STAGE_REFERENCE = "stage:"


@dataclass(kw_only=True)
class StageConfig(Options):
    """Options every stage has.

    Attributes:
        stage_name: The stage's name in the pipeline, set by the pipeline from the `stage_configs` key; leave it out.
        stage_type: The registered stage this entry runs (default: the entry's own name), so one stage type
            can run twice: entries `sft_general` and `sft_domain`, each with `type: sft` (alias: type).
        output_dir: Where the stage writes its outputs (default: `<pipeline output_dir>/stages/<NN>_<name>`,
            NN its 1-based position in `stages`).
        enabled: false leaves the stage out of every run: the next stage starts from this stage's input.
        save_intermediate: Keep this stage's model once the pipeline has finished. false deletes it at the end
            of a successful run unless it is the run's last stage (the run option cleanup_intermediate does
            that for every stage).
        log_level: Log level of the `kfp_components` loggers while this stage runs (DEBUG, INFO, WARNING,
            ERROR); empty: the pipeline's.
    """

    #: Options that do not change what a stage produces: changing them does not make a finished stage re-run.
    fingerprint_ignore: ClassVar[frozenset[str]] = frozenset(
        {"stage_name", "enabled", "save_intermediate", "log_level"}
    )

    option_aliases: ClassVar[dict[str, str]] = {"type": "stage_type"}

    stage_name: str = ""
    stage_type: str = ""
    output_dir: str = ""
    enabled: bool = True
    save_intermediate: bool = True
    log_level: str = ""

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad option (paths relative to the stage)."""
        if self.log_level and self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError("log_level", f"expected one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")

    def fingerprint_data(self) -> dict[str, Any]:
        """The options that decide what the stage produces, as plain data (see ``fingerprint_ignore``)."""
        return {k: v for k, v in to_dict(self).items() if k not in self.fingerprint_ignore}


@dataclass
class StageResult:
    """What a stage produced.

    Attributes:
        stage_name: The stage's name in the pipeline.
        model_path: The Hugging Face checkpoint (folder or hub id) the next stage starts from. A stage that
            does not change the model (an evaluation, say) returns its input model.
        metrics: Numbers worth comparing across runs (final loss, steps, tokens per second, ...).
        artifacts: Paths of what the stage wrote: metrics.jsonl, summary.json, prepared data, ...
        tokenizer_path: The tokenizer the next stage uses (empty: the one saved with `model_path`).
        input_model: The model reference the stage started from.
    """

    stage_name: str
    model_path: str
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    tokenizer_path: str = ""
    input_model: str = ""

    @property
    def tokenizer(self) -> str:
        """The tokenizer reference the next stage starts from."""
        return self.tokenizer_path or self.model_path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageResult:
        """Rebuild a result from its :func:`dataclasses.asdict` form (as kept in ``pipeline_state.json``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class BaseStage(ABC):
    """One step of a multi-stage pipeline.

    Subclasses implement :meth:`execute` and say which options they take: a ``config_class`` attribute (a
    :class:`StageConfig` dataclass), or a config dataclass named after the stage class with ``Config``
    appended, in the same module (``MyStage`` -> ``MyStageConfig``). ``stage_name`` (a class attribute or a
    property) is the name to register under when none is given. They may extend :meth:`validate_config`,
    :meth:`check_inputs` and :meth:`dry_run`.

    Models and tokenizers are passed as *references* (a local folder or a Hugging Face hub id), never as
    loaded objects: a stage decides how to load them (``AutoModelForCausalLM.from_pretrained(model)``) or
    hands them to a launcher that starts several processes (``torchrun``), and nothing stays in memory
    between stages.
    """

    stage_name: ClassVar[str]
    config_class: ClassVar[type[StageConfig]] = StageConfig

    def __init__(self, config: StageConfig):
        config_class = config_class_of(type(self))
        if not isinstance(config, config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config

    @property
    def name(self) -> str:
        """The stage's name in this pipeline (its config's ``stage_name``), else the class default."""
        return self.config.stage_name or self.stage_name

    @property
    def log(self) -> logging.Logger:
        """The stage's logger: ``kfp_components.stages.<name>``, so it goes to ``pipeline_training.log``."""
        return logging.getLogger(f"kfp_components.stages.{self.name}")

    def validate_config(self) -> None:
        """Checks of the options beyond the config's own ``validate`` (which the pipeline always runs first),
        without touching models or data; raise :class:`ConfigError` with key paths relative to the stage
        (``beta``, not ``stage_configs.dpo.beta``). The pipeline calls it for every stage before the first
        stage starts. The default checks nothing more."""
        return None

    def link_earlier_stages(self, earlier: Mapping[str, BaseStage]) -> None:
        """Resolve options that name an earlier stage's output (the rl stage's ``reward_model_path:
        stage:<name>``); ``earlier`` holds the stages listed before this one, by name. The pipeline calls it
        once, when it builds the stages, before :meth:`validate_config`; raise :class:`ConfigError` for a
        reference to a stage that is not there. The default has nothing to resolve."""
        return None

    def output_dataset(self) -> tuple[Path, str] | None:
        """The dataset this stage writes for later stages (its path once the stage has run, and its row
        format), which their ``dataset_name_or_path: stage:<name>`` reads; None (the default): none."""
        return None

    def check_inputs(self, model: str, tokenizer: str) -> None:
        """Check what :meth:`execute` will read (datasets, their format) before the pipeline's first stage
        starts, so a chain does not fail at its third stage after hours of training; raise
        :class:`ConfigError` naming the option. ``model`` may be a stand-in with the same architecture when
        an earlier stage has not run yet. The default checks nothing."""
        return None

    @abstractmethod
    def execute(self, model: str, tokenizer: str, previous_result: StageResult | None) -> StageResult:
        """Run the stage and return what it produced.

        Args:
            model: Reference (folder or hub id) of the model to start from: the previous stage's
                ``model_path``, or the pipeline's ``model_name_or_path`` for the first stage.
            tokenizer: Reference of the tokenizer that goes with it.
            previous_result: The previous stage's result, or None for the first stage of the pipeline.

        Write everything under ``self.config.output_dir``. Raise on failure: the pipeline stops, reports the
        stage and keeps earlier stages' outputs.
        """

    def discard_stale_outputs(self) -> None:
        """Remove what an earlier attempt of this stage, with other options or another input model, left in
        ``output_dir`` that :meth:`execute` could pick up by mistake. The pipeline calls it before it runs a
        stage, except when it retries a failed attempt with the same options and input (so a stage that
        resumes from its own checkpoints can continue). The default removes nothing."""
        return None

    def dry_run(self, model: str, tokenizer: str) -> dict[str, Any]:
        """Describe what :meth:`execute` would read and write, checking what can be checked cheaply (its
        datasets exist and have the right format); raise :class:`ConfigError` (or a ``ValueError``) naming
        the option at fault. ``model`` may not exist yet when an earlier stage has not run. Trains nothing."""
        return {"input_model": model, "tokenizer": tokenizer, "output_dir": self.config.output_dir}


def config_class_of(stage_class: type[BaseStage]) -> type[StageConfig]:
    """The options dataclass of ``stage_class``: walking from the class up to :class:`BaseStage`, the first
    ``config_class`` a class sets, or a ``<ClassName>Config`` dataclass in that class's module. A
    :class:`TypeError` says how to declare it when there is neither."""
    for klass in stage_class.__mro__:
        if klass is BaseStage or not issubclass(klass, BaseStage):
            break
        declared = klass.__dict__.get("config_class")
        if declared is None:
            declared = getattr(sys.modules.get(klass.__module__), f"{klass.__name__}Config", None)
        if declared is None:
            continue
        if not (isinstance(declared, type) and dataclasses.is_dataclass(declared)):
            raise TypeError(f"{klass.__name__}: the options {declared!r} are not a dataclass")
        if not issubclass(declared, StageConfig):
            raise TypeError(f"{klass.__name__}: the options {declared.__name__} are not a StageConfig")
        return declared
    raise TypeError(
        f"{stage_class.__name__}: no options dataclass; set config_class = <a StageConfig dataclass> on the "
        f"class, or name it {stage_class.__name__}Config in the same module"
    )
