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
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kfp_components.typed_config import ConfigError, Options, to_dict

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(kw_only=True)
class StageConfig(Options):
    """Options every stage has.

    Attributes:
        stage_name: The stage's name in the pipeline, set by the pipeline from the `stage_configs` key; leave it out.
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

    stage_name: str = ""
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

    Subclasses set two class attributes, ``stage_name`` (the default name to register under) and
    ``config_class`` (a :class:`StageConfig` dataclass: the stage's options in the YAML), and implement
    :meth:`execute`. They may extend :meth:`validate_config` and :meth:`dry_run`.

    Models and tokenizers are passed as *references* (a local folder or a Hugging Face hub id), never as
    loaded objects: a stage decides how to load them (``AutoModelForCausalLM.from_pretrained(model)``) or
    hands them to a launcher that starts several processes (``torchrun``), and nothing stays in memory
    between stages.
    """

    stage_name: ClassVar[str]
    config_class: ClassVar[type[StageConfig]] = StageConfig

    def __init__(self, config: StageConfig):
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}"
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
        """Check the options without touching models or data; raise :class:`ConfigError` with key paths
        relative to the stage (``beta``, not ``stage_configs.dpo.beta``). The pipeline calls it for every
        stage before the first stage starts. The default runs the config's own ``validate``."""
        self.config.validate()

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
