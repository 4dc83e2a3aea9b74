"""Run a multi-stage fine-tuning pipeline: stages in order, each from the model the previous one saved.

``Pipeline(config).run()``:

1. plans the run: which stages run and which are reused from ``pipeline_state.json`` (a finished stage is
   reused when its options and its input are unchanged; once a stage runs, every later stage runs too);
2. runs each stage from the previous stage's model (the first from ``model_name_or_path``), recording the
   result in ``pipeline_state.json`` after each stage; a failed stage stops the run with
   :class:`StageFailedError` and leaves the earlier stages' outputs and state in place, so a rerun after the
   fix continues with the failed stage;
3. links the last stage's model to ``<output_dir>/final_model`` and, if asked, deletes intermediate models.

Logs go to the console (see :func:`kfp_components.logs.configure_logging`) and, for the duration of a run,
to ``<output_dir>/pipeline_training.log``. A run holds the exclusive lock of its ``output_dir``
(:mod:`kfp_components.locking`) throughout, so a second run on the same folder fails before it writes.

No credential is written down: ``pipeline_config.json``, ``pipeline_state.json``, the log (every handler of
the root logger gets :class:`~kfp_components.logs.RedactSecrets` while a run lasts), the plan and the errors
show URIs without user info or signed query values (see :mod:`kfp_components.redaction`). The state keeps a
stage's options only as its fingerprint, a digest.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kfp_components.locking import hold_folder_lock
from kfp_components.logs import FORMAT, RedactSecrets, add_secret_filter, remove_secret_filter
from kfp_components.orchestration.config import PipelineConfig, load_pipeline_config
from kfp_components.orchestration.state import PipelineError, PipelineState
from kfp_components.redaction import redact_record, redact_text
from kfp_components.stages import registry
from kfp_components.stages.base import BaseStage, StageResult, config_class_of
from kfp_components.stages.training import TrainingStage
from kfp_components.trainer.stopping import TrainingInterrupted
from kfp_components.typed_config import ConfigError, to_dict

log = logging.getLogger("kfp_components.orchestration")

LOG_FILE = "pipeline_training.log"
FINAL_MODEL_DIR = "final_model"
CONFIG_FILE = "pipeline_config.json"


class StageFailedError(PipelineError):
    """A stage raised; ``__cause__`` is its exception."""

    def __init__(self, stage_name: str, position: int, total: int, cause: BaseException):
        self.stage_name = stage_name
        self.position = position
        self.total = total
        super().__init__(
            f"stage {stage_name!r} ({position} of {total}) failed: {type(cause).__name__}: "
            f"{redact_text(str(cause))}"
        )


class DryRunError(ConfigError):
    """A dry run found problems; ``problems`` lists each as ``(key path, message)``."""

    def __init__(self, problems: list[tuple[str, str]]):
        combined = ConfigError.of(problems)
        message = problems[0][1] if len(problems) == 1 else str(combined)
        super().__init__(combined.path, message, problems=list(problems))


@dataclass
class PlannedStage:
    """What a run will do with one stage."""

    name: str
    position: int
    total: int
    action: Literal["run", "skip"]
    reason: str
    fingerprint: str
    output_dir: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunPlan:
    """The stages of a run and where the first of them starts."""

    stages: list[PlannedStage]
    start_model: str
    start_tokenizer: str
    start_from: str
    previous: StageResult | None
    output_dir: str
    model_info: dict[str, str] = field(default_factory=dict)

    def format(self) -> str:
        """The plan as text, one block per stage, without credentials."""
        lines = [f"Pipeline plan: {len(self.stages)} stage(s); outputs in {self.output_dir}"]
        lines.append(f"  starts from {self.start_from}: {self.start_model}")
        if self.start_tokenizer != self.start_model:
            lines.append(f"  tokenizer: {self.start_tokenizer}")
        for key, value in self.model_info.items():
            lines.append(f"  {key}: {value}")
        previous = None
        for item in self.stages:
            verb = "run" if item.action == "run" else "skip"
            lines.append(f"  {item.position}. {item.name}: {verb} ({item.reason})")
            source = f"the model of stage {previous!r}" if previous else self.start_model
            lines.append(f"       input model: {source}")
            for key, value in item.details.items():
                if key not in ("input_model", "tokenizer", "output_dir"):
                    lines.append(f"       {key}: {value}")
            lines.append(f"       output_dir: {item.output_dir}")
            previous = item.name
        lines.append(f"  final model: {Path(self.output_dir) / FINAL_MODEL_DIR}")
        return redact_text("\n".join(lines))


class Pipeline:
    """A multi-stage fine-tuning pipeline built from a :class:`PipelineConfig`.

    The stages' configs are checked when the pipeline is built (before any model loads); a problem is a
    :class:`ConfigError` naming the key path (``stage_configs.dpo.beta: ...``).
    """

    def __init__(self, config: PipelineConfig):
        self.config = config
        self.stages: dict[str, BaseStage] = _build_stages(config)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Any = None) -> Pipeline:
        """A pipeline from a YAML file; ``overrides`` as in :func:`load_pipeline_config`."""
        return cls(load_pipeline_config(path, overrides))

    @classmethod
    def register_stage(cls, name: str, stage_class: type[BaseStage], *, replace: bool = False) -> None:
        """Make ``stage_class`` available as ``name`` in ``stages:`` (see :func:`registry.register_stage`)."""
        registry.register_stage(name, stage_class, replace=replace)

    @classmethod
    def available_stages(cls) -> list[str]:
        return registry.available_stages()

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)

    # ---------------------------------------------------------------------------------------------------
    # Planning
    # ---------------------------------------------------------------------------------------------------

    def plan(self, stages: list[str] | None = None, state: PipelineState | None = None) -> RunPlan:
        """Decide which of ``stages`` (default: all, in config order) run and which are reused.

        The first stage of the run starts from the nearest earlier enabled stage (in config order) that has
        a finished result whose model still exists, else from ``model_name_or_path``.
        """
        state = state if state is not None else PipelineState.load(self.output_dir)
        selected = self._select(stages)
        start_model, start_tokenizer = self.config.model_name_or_path, self.config.tokenizer
        start_from, previous = "model_name_or_path", None
        upstream = _digest({"model": start_model, "tokenizer": start_tokenizer})
        enabled = [n for n in self.config.stages if self.stages[n].config.enabled]
        earlier = enabled[: enabled.index(selected[0])]
        for name in reversed(earlier):
            entry = state.finished(name)
            if entry and not _model_missing(entry):
                previous = StageResult.from_dict(entry)
                start_model, start_tokenizer = previous.model_path, previous.tokenizer
                start_from, upstream = f"the model of stage {name!r}", entry["fingerprint"]
                break
        if earlier and previous is None:
            log.warning(
                "stage %r comes after %s, which have no finished result: it starts from model_name_or_path",
                selected[0],
                ", ".join(map(repr, earlier)),
            )
        elif previous is not None and previous.stage_name != earlier[-1]:
            log.warning(
                "stage %r starts from the model of stage %r: %r has no finished result",
                selected[0],
                previous.stage_name,
                earlier[-1],
            )

        fingerprints, reusable = [], []
        for name in selected:
            upstream = stage_fingerprint(self.stages[name], upstream)
            fingerprints.append(upstream)
            entry = state.finished(name)
            reusable.append(entry is not None and entry.get("fingerprint") == upstream)
        first_run = reusable.index(False) if False in reusable else len(selected)
        if first_run == len(selected) and selected and _model_missing(state.finished(selected[-1])):
            first_run -= 1  # the run's result was deleted: make it again
        while first_run > 0 and _model_missing(state.finished(selected[first_run - 1])):
            first_run -= 1  # a stage that runs needs the model of the stage before it

        planned = []
        for i, name in enumerate(selected):
            entry = state.finished(name)
            action: Literal["run", "skip"]
            if i < first_run:
                action, reason = "skip", "finished with the same options and input"
            elif i > first_run:
                action, reason = "run", "an earlier stage runs"
            elif reusable[i]:
                action, reason = "run", "its model was deleted and is needed"
            elif entry is not None:
                action, reason = "run", "its options or input changed since it finished"
            else:
                action, reason = "run", "no finished result yet"
            planned.append(
                PlannedStage(
                    name=name,
                    position=i + 1,
                    total=len(selected),
                    action=action,
                    reason=reason,
                    fingerprint=fingerprints[i],
                    output_dir=self.stages[name].config.output_dir,
                )
            )
        return RunPlan(planned, start_model, start_tokenizer, start_from, previous, str(self.output_dir))

    def _select(self, stages: list[str] | None) -> list[str]:
        names = list(self.config.stages) if stages is None else list(stages)
        for name in names:
            if name not in self.config.stages:
                raise ConfigError(
                    "stages", f"{name!r} is not a stage of this pipeline ({', '.join(self.config.stages)})"
                )
        selected = []
        for name in self.config.stages:
            if name not in names:
                continue
            if self.stages[name].config.enabled:
                selected.append(name)
            else:
                log.info("stage %r is disabled (enabled: false); leaving it out", name)
        if not selected:
            raise ConfigError("stages", "every selected stage is disabled (enabled: false)")
        return selected

    # ---------------------------------------------------------------------------------------------------
    # Dry run
    # ---------------------------------------------------------------------------------------------------

    def dry_run(self, stages: list[str] | None = None) -> RunPlan:
        """Check what a run needs without training: the output folder can be written, the starting model's
        config and tokenizer load, and each stage that would run checks its inputs (its datasets exist and
        have the format its algorithm needs; the training engine's preflight on them).

        Returns the plan; raises :class:`DryRunError` listing every problem found. Writes nothing.
        """
        plan = self.plan(stages)
        problems = output_dir_problems(self.output_dir)
        problems += self._model_problems(plan)
        for item in plan.stages:
            if item.action != "run":
                continue
            try:
                item.details = self.stages[item.name].dry_run(plan.start_model, plan.start_tokenizer)
            except ConfigError as exc:
                problems.extend(exc.under(f"stage_configs.{item.name}").problems)
            except (ValueError, OSError) as exc:
                problems.append((f"stage_configs.{item.name}", f"{type(exc).__name__}: {exc}"))
        if problems:
            raise DryRunError(_reported(problems))
        return plan

    def check_inputs(self, plan: RunPlan) -> None:
        """Before the first stage of a run starts: every stage that will run checks its inputs (datasets,
        their format, the engine's preflight), so a chain does not fail at a late stage after hours of
        training. Raises :class:`ConfigError` listing every problem."""
        problems = self._model_problems(plan)
        for item in plan.stages:
            if item.action != "run":
                continue
            try:
                self.stages[item.name].check_inputs(plan.start_model, plan.start_tokenizer)
            except ConfigError as exc:
                problems.extend(exc.under(f"stage_configs.{item.name}").problems)
        if problems:
            raise ConfigError.of(_reported(problems))

    def _model_problems(self, plan: RunPlan) -> list[tuple[str, str]]:
        """The starting model's config and tokenizer load (no weights); training stages need a chat template."""
        problems: list[tuple[str, str]] = []
        if plan.previous is None:
            model_key = "model_name_or_path"
            tokenizer_key = "tokenizer_name_or_path" if self.config.tokenizer_name_or_path else model_key
        else:  # the run starts from an earlier stage's model
            model_key = tokenizer_key = f"stage_configs.{plan.previous.stage_name}"
        needs_chat_template = any(
            isinstance(self.stages[p.name], TrainingStage) for p in plan.stages if p.action == "run"
        )
        plan.model_info.update(
            _check_model(
                plan.start_model,
                plan.start_tokenizer,
                model_key,
                tokenizer_key,
                needs_chat_template,
                problems,
            )
        )
        return problems

    # ---------------------------------------------------------------------------------------------------
    # Run
    # ---------------------------------------------------------------------------------------------------

    def run(
        self,
        stages: list[str] | None = None,
        *,
        dry_run: bool = False,
        save_final_model: bool = True,
        cleanup_intermediate: bool = False,
    ) -> list[StageResult]:
        """Run ``stages`` (default: all; a subset runs in config order) and return their results, reused
        ones included.

        Args:
            stages: Names of the stages to run.
            dry_run: Only check and log the plan (see :meth:`dry_run`); returns an empty list.
            save_final_model: Link (or copy) the last stage's model to ``<output_dir>/final_model``.
            cleanup_intermediate: After a successful run, delete the models of the run's stages but the
                last; stages with ``save_intermediate: false`` are deleted even without it.

        Raises:
            StageFailedError: a stage failed; earlier stages' outputs and state are kept.
            ConfigError: a problem found before the first stage, or another run holds ``output_dir`` (its
                lock, ``<output_dir>/.lock``, is held for the whole run).
        """
        if dry_run:
            for line in self.dry_run(stages).format().splitlines():
                log.info("%s", line)
            return []
        # One run per output folder: a second run fails here, naming the first, before it writes anything.
        with hold_folder_lock(self.output_dir, purpose="pipeline"), self._log_to_file():
            state = PipelineState.load(self.output_dir)
            plan = self.plan(stages, state)
            self.check_inputs(plan)
            (self.output_dir / CONFIG_FILE).write_text(
                json.dumps(redact_record(to_dict(self.config)), indent=2) + "\n"
            )
            log.info(
                "pipeline: %s (%d of %d stages) from %s; outputs in %s",
                " -> ".join(p.name for p in plan.stages),
                len(plan.stages),
                len(self.config.stages),
                plan.start_model,
                self.output_dir,
            )
            model, tokenizer, previous = plan.start_model, plan.start_tokenizer, plan.previous
            results = []
            for item in plan.stages:
                if item.action == "skip":
                    result = state.result(item.name)
                    log.info("skipping stage %r: %s; model %s", item.name, item.reason, result.model_path)
                else:
                    result = self._run_stage(item, model, tokenizer, previous, state)
                results.append(result)
                model, tokenizer, previous = result.model_path, result.tokenizer, result
            if save_final_model:
                self._export_final_model(results[-1])
            self._delete_intermediate_models(results, everything=cleanup_intermediate)
            log.info("pipeline finished: %s", "; ".join(_summary(r) for r in results))
        return results

    def _run_stage(
        self,
        item: PlannedStage,
        model: str,
        tokenizer: str,
        previous: StageResult | None,
        state: PipelineState,
    ) -> StageResult:
        stage = self.stages[item.name]
        attempt = state.entry(item.name) or {}
        # A failed (or killed) attempt with the same options and input keeps its outputs, so it can resume.
        retrying = (
            attempt.get("status") in ("failed", "running") and attempt.get("fingerprint") == item.fingerprint
        )
        if not retrying:
            stage.discard_stale_outputs()
            _delete_previous_model(state.finished(item.name))
        # Results after this stage were built on its old model: they are void once it runs again.
        state.forget(self.config.stages[self.config.stages.index(item.name) :])
        state.start(item.name, item.fingerprint, model, stage.config.output_dir)
        state.save()
        Path(stage.config.output_dir).mkdir(parents=True, exist_ok=True)
        log.info(
            "stage %r (%d of %d): %s; starting from %s",
            item.name,
            item.position,
            item.total,
            item.reason,
            model,
        )
        started = time.monotonic()
        try:
            with _log_level(stage.config.log_level):
                result = stage.execute(model, tokenizer, previous)
            result = _checked_result(result, item.name, model)
        except (KeyboardInterrupt, TrainingInterrupted) as exc:
            # a signal: the stage saved what it could (a training stage, a checkpoint); a rerun resumes it
            state.fail(item.name, str(exc) or "interrupted")
            state.save()
            raise
        except Exception as exc:
            state.fail(item.name, f"{type(exc).__name__}: {exc}")
            state.save()
            log.error("stage %r (%d of %d) failed", item.name, item.position, item.total, exc_info=True)
            raise StageFailedError(item.name, item.position, item.total, exc) from exc
        duration = time.monotonic() - started
        state.finish(item.name, result, duration)
        state.save()
        log.info("stage %r finished in %.1f s: %s", item.name, duration, _summary(result))
        return result

    def _export_final_model(self, result: StageResult) -> None:
        """Hard-link (copy across file systems) the last model to ``<output_dir>/final_model``: no extra
        disk, and it survives the deletion of the stage's folder."""
        source = Path(result.model_path)
        if not source.is_dir():
            log.warning("final_model: %s is not a local folder; nothing to link", result.model_path)
            return
        target = self.output_dir / FINAL_MODEL_DIR
        staging = self.output_dir / f".{FINAL_MODEL_DIR}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging, copy_function=_link_or_copy)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        log.info("final model of stage %r: %s", result.stage_name, target)

    def _delete_intermediate_models(self, results: list[StageResult], *, everything: bool) -> None:
        """Delete the models (and checkpoints) of the run's stages but the last: all of them with
        ``everything``, else those whose stage sets ``save_intermediate: false``. Only what a stage wrote
        under its own output_dir is deleted."""
        keep = {results[-1].model_path, results[-1].tokenizer}
        for result in results[:-1]:
            stage = self.stages[result.stage_name]
            if stage.config.save_intermediate and not everything:
                continue
            for what, path in (
                ("model", result.model_path),
                ("checkpoints", result.artifacts.get("checkpoints")),
            ):
                if not path or path in keep or not Path(path).is_dir():
                    continue
                if _inside(Path(path), Path(stage.config.output_dir)):
                    shutil.rmtree(path)
                    log.info("deleted the intermediate %s of stage %r: %s", what, result.stage_name, path)

    @contextlib.contextmanager
    def _log_to_file(self) -> Iterator[None]:
        """Copy the ``kfp_components`` logs to ``<output_dir>/pipeline_training.log`` while the run lasts;
        that file and every handler of the root logger redact secrets meanwhile (:class:`RedactSecrets`)."""
        logger = logging.getLogger("kfp_components")
        handler = logging.FileHandler(self.output_dir / LOG_FILE, encoding="utf-8")
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        handler.addFilter(RedactSecrets())
        redacting = add_secret_filter(logging.getLogger().handlers)
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(self.config.log_level.upper())
        try:
            yield
        finally:
            logger.setLevel(level)
            logger.removeHandler(handler)
            handler.close()
            remove_secret_filter(redacting)


def stage_fingerprint(stage: BaseStage, upstream: str) -> str:
    """A digest of what a stage's result depends on: its class, its options and its input (``upstream``,
    the fingerprint of the stage before it, or of the pipeline's model and tokenizer)."""
    return _digest(
        {
            "stage": type(stage).__qualname__,
            "options": stage.config.fingerprint_data(),
            "upstream": upstream,
        }
    )


def _build_stages(config: PipelineConfig) -> dict[str, BaseStage]:
    """Instantiate and validate each stage; fill in ``stage_name`` and ``output_dir`` where empty. Every
    problem of every stage is reported in one :class:`ConfigError`."""
    problems = [
        (f"stage_configs.{name}", f"stage {name!r} is not listed in stages")
        for name in config.stage_configs
        if name not in config.stages
    ]
    try:
        config.validate()
    except ConfigError as exc:
        problems.extend(exc.problems)
    stages: dict[str, BaseStage] = {}
    for position, name in enumerate(config.stages):
        path = f"stage_configs.{name}"
        stage_config = config.stage_configs.get(name)
        if stage_config is None:
            problems.append((path, f"stage {name!r} is listed in stages but has no options"))
            continue
        try:
            stage_type = stage_config.stage_type or name
            stage_class = registry.get_stage_class(
                stage_type, f"{path}.stage_type" if stage_config.stage_type else f"stages[{position}]"
            )
            config_class = config_class_of(stage_class)
            if not isinstance(stage_config, config_class):
                raise ConfigError(
                    path,
                    f"expected a {config_class.__name__} for stage {name!r}, got a {type(stage_config).__name__}",
                )
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        stage_config.stage_name = stage_config.stage_name or name
        stage_config.output_dir = stage_config.output_dir or config.default_stage_dir(name)
        stage = stage_class(stage_config)
        link = functools.partial(stage.link_earlier_stages, dict(stages))  # the stages listed before it
        for check in (stage_config.validate, link, stage.validate_config):
            try:
                check()
            except ConfigError as exc:
                problems.extend(exc.under(path).problems)
        stages[name] = stage
    if problems:
        raise ConfigError.of(_reported(problems))
    return stages


def _reported(problems: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``problems`` as they may be shown: without repeats (a config's own checks may run again in its
    stage's checks) and without credentials (a message may quote a model reference or an exception)."""
    return list(dict.fromkeys((path, redact_text(message)) for path, message in problems))


def output_dir_problems(output_dir: Path) -> list[tuple[str, str]]:
    """Whether the run can create and write ``output_dir``: its nearest existing folder must be a folder
    this process can create files in (checked by creating and removing a temporary file there)."""
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [("output_dir", f"{output_dir}: {existing} is a file, not a folder")]
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return [("output_dir", f"{output_dir}: cannot write in {existing}: {exc.strerror or exc}")]
    return []


def _check_model(
    model: str,
    tokenizer: str,
    model_key: str,
    tokenizer_key: str,
    needs_chat_template: bool,
    problems: list[tuple[str, str]],
) -> dict[str, str]:
    """Load the model's config and the tokenizer (no weights) and describe them."""
    from transformers import AutoConfig, AutoTokenizer

    info = {}
    try:
        hf_config = AutoConfig.from_pretrained(model)
        info["model_type"] = f"{hf_config.model_type}, {getattr(hf_config, 'num_hidden_layers', '?')} layers"
    except Exception as exc:  # any loading problem is a finding of the dry run, not a crash
        problems.append((model_key, f"cannot load the model config of {model!r}: {exc}"))
    try:
        loaded = AutoTokenizer.from_pretrained(tokenizer)
        info["chat_template"] = "yes" if loaded.chat_template else "no"
        if needs_chat_template and not loaded.chat_template:
            problems.append(
                (
                    tokenizer_key,
                    f"the tokenizer of {tokenizer!r} has no chat template; training stages need one",
                )
            )
    except Exception as exc:
        problems.append((tokenizer_key, f"cannot load the tokenizer of {tokenizer!r}: {exc}"))
    return info


def _checked_result(result: Any, name: str, model: str) -> StageResult:
    if not isinstance(result, StageResult):
        raise TypeError(f"execute() returned {type(result).__name__}, not a StageResult")
    if not result.model_path:
        raise ValueError("execute() returned a StageResult without model_path")
    result.stage_name = name
    result.input_model = result.input_model or model
    metrics = {}
    for key, value in result.metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            metrics[str(key)] = value
        else:
            log.warning("stage %r: metric %r is not a finite number (%r); not recorded", name, key, value)
    result.metrics = metrics
    result.artifacts = {str(k): str(v) for k, v in result.artifacts.items()}
    return result


@contextlib.contextmanager
def _log_level(level: str) -> Iterator[None]:
    logger = logging.getLogger("kfp_components")
    previous = logger.level
    if level:
        logger.setLevel(level.upper())
    try:
        yield
    finally:
        logger.setLevel(previous)


def _delete_previous_model(entry: dict[str, Any] | None) -> None:
    """Delete the model a stage's earlier run wrote under its output_dir before the stage runs again: it is
    obsolete, and ``final_model`` may hard-link its files, which must not be rewritten in place."""
    if entry and entry.get("output_dir"):
        model = Path(entry.get("model_path", ""))
        if model.is_dir() and _inside(model, Path(entry["output_dir"])):
            shutil.rmtree(model)


def _model_missing(entry: dict[str, Any] | None) -> bool:
    """A finished stage's model was written under its output_dir and is gone (deleted by a cleanup)."""
    if not entry:
        return False
    model, output_dir = Path(entry.get("model_path", "")), Path(entry.get("output_dir", ""))
    return bool(entry.get("output_dir")) and _inside(model, output_dir) and not model.exists()


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _link_or_copy(source: str, target: str) -> str:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _relocate(exc: ConfigError, prefix: str) -> tuple[str, str]:
    """``exc``'s key path under ``prefix`` and its message without the old path."""
    message = str(exc).removeprefix(f"{exc.path}: ") if exc.path else str(exc)
    return (f"{prefix}.{exc.path}" if exc.path else prefix), message


def _summary(result: StageResult) -> str:
    shown = {k: result.metrics[k] for k in ("final_loss", "steps", "eval_loss") if k in result.metrics}
    numbers = ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
    return f"{result.stage_name} -> {result.model_path}" + (f" ({numbers})" if numbers else "")
