"""The cot_distillation stage: a teacher writes step-by-step solutions, only verified ones are kept, the student
learns them, and its answers are evaluated before and after.

1. **Synthesis** (unless ``dataset_name_or_path`` names traces written before): the teacher
   (``teacher_model_path``; ``teacher_model_type`` api: an OpenAI-compatible endpoint, local: a Hugging Face
   causal LM; its other options under ``teacher``) answers every problem of ``reasoning_dataset_path``
   (``prompt`` rows with an ``answer`` column) ``num_samples`` times; a trace is kept when its final answer
   matches the reference (``rejection``: the extractor or a ``module:function`` checker, tolerance, length,
   language and near-duplicate filters). The traces are a ``messages`` dataset
   (``<output_dir>/synthetic/traces.jsonl``); an interrupted synthesis continues where it stopped. See
   :mod:`kfp_components.feedback.synthesis`.
2. **Student training**: SFT (full or LoRA) or OSFT (``algorithm``) on the traces with the engine. In
   ``distillation_mode: step_by_step`` (Hsieh et al. 2023) each problem gives two targets: the rationale (the
   trace, after ``rationale_prefix``, its loss weighted ``rationale_weight``) and the answer alone (after
   ``label_prefix``). ``distill_teacher_path`` adds logit distillation: forward KL to a local teacher sharing the
   student's tokenizer, mixed with the SFT loss by ``distill_coef``.
3. **Reasoning evaluation** on held-out problems (``eval_dataset_name_or_path``, ``prompt`` rows with answers):
   greedy answers of the base student (the stage's input model), the tuned student and a local teacher,
   checked by the same matcher as the traces; accuracies in the stage's metrics
   (``reasoning/<role>/accuracy``) and a Markdown table (``<output_dir>/reasoning_eval.md``).

The seed's keys work as written: ``reasoning_dataset_path``, ``teacher_model_path: gpt-4``,
``teacher_model_type: api`` (with the endpoint under ``teacher``: ``base_url``, ``token_env``).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from kfp_components.data import DatasetConfig, DatasetError, PreparedDataset, prepare_dataset
from kfp_components.feedback.step_by_step import with_prefix
from kfp_components.feedback.synthesis import RejectionOptions
from kfp_components.feedback.teacher import TeacherOptions
from kfp_components.stages.base import StageResult
from kfp_components.stages.training import TrainingStage, TrainingStageConfig, _release_memory
from kfp_components.trainer.config import (
    Algorithm,
    DistillationOptions,
    LoRAOptions,
    OptimOptions,
    OSFTOptions,
    TrainingConfig,
)
from kfp_components.typed_config import ConfigError, from_dict, unknown_option_message

#: Teacher options the stage sets from its own keys.
_TEACHER_SET_BY_STAGE = {"model": "teacher_model_path", "backend": "teacher_model_type"}


@dataclass(kw_only=True)
class CoTDistillationStageConfig(
    TrainingStageConfig, OptimOptions, LoRAOptions, OSFTOptions, DistillationOptions
):
    """Options of the cot_distillation stage: the problems and the teacher, which traces are kept, how the
    student trains (the engine's sft or osft options) and the held-out problems of the evaluation.

    Attributes:
        algorithm: How the student learns the traces: sft (full, or LoRA with lora_r) or osft.
        dataset_name_or_path: Traces written before (a messages dataset: a synthesize_reasoning_data output or
            an earlier run's synthetic/traces.jsonl); empty: the stage synthesizes them from
            reasoning_dataset_path.
        reasoning_dataset_path: The problems: prompt rows with the reference answer (column
            rejection.answer_column), same URI forms as dataset_name_or_path.
        teacher_model_path: The teacher: the served model's name (api, e.g. gpt-4) or a folder or hub id
            (local).
        teacher_model_type: api (an OpenAI-compatible endpoint: teacher.base_url, teacher.token_env) or local
            (a Hugging Face causal LM, sampled with the RL engine's rollout code).
        teacher: The teacher's other options (the TeacherOptions table but model and backend, which
            teacher_model_path and teacher_model_type set): the endpoint (base_url, token_env,
            max_concurrency, timeout_seconds, retries, backoff_seconds, max_requests), system_prompt,
            prompt_template, num_samples, temperature, top_p, max_tokens. max_requests is the budget of one
            attempt of the stage.
        rejection: Which traces are kept: answer_column, answer_checker, answer_tolerance, length bounds,
            language, dedup_threshold, max_traces_per_problem (the RejectionOptions table).
        distillation_mode: traces (the student learns each kept trace) or step_by_step (two targets per
            trace: the rationale and the answer, with task prefixes).
        rationale_weight: step_by_step: the loss weight of the rationale targets (the answer's is 1).
        rationale_prefix: step_by_step: put before a problem whose target is the rationale.
        label_prefix: step_by_step: put before a problem whose target is the answer (and at evaluation).
        eval_dataset_name_or_path: Held-out problems (prompt rows with answers) for the answer accuracy of the
            teacher (local), the base student and the tuned student.
        eval_problems: Evaluate on the first N held-out problems (0: all).
        eval_max_new_tokens: Longest greedy answer at evaluation, in tokens (0: teacher.max_tokens).
    """

    algorithm: Literal["sft", "osft"] = "sft"
    dataset_name_or_path: str = ""
    reasoning_dataset_path: str = ""
    teacher_model_path: str = ""
    teacher_model_type: Literal["api", "local"] = "api"
    teacher: dict[str, Any] = field(default_factory=dict)
    rejection: RejectionOptions = field(default_factory=RejectionOptions)
    distillation_mode: Literal["traces", "step_by_step"] = "traces"
    rationale_weight: float = 1.0
    rationale_prefix: str = "[rationale] "
    label_prefix: str = "[label] "
    eval_problems: int = 0
    eval_max_new_tokens: int = 0

    #: Nested mappings typed elsewhere, for the generated docs.
    documented_mappings: ClassVar[dict[str, type]] = {"teacher": TeacherOptions}

    def validate(self) -> None:
        problems: list[tuple[str, str]] = []
        if not self.dataset_name_or_path and not self.reasoning_dataset_path:
            problems.append(
                (
                    "reasoning_dataset_path",
                    "required (the problems to distil) unless dataset_name_or_path names traces",
                )
            )
        if self.reasoning_dataset_path and not self.dataset_name_or_path and not self.teacher_model_path:
            problems.append(
                ("teacher_model_path", "required to synthesize traces from reasoning_dataset_path")
            )
        for key in _TEACHER_SET_BY_STAGE:
            if key in self.teacher:
                problems.append((f"teacher.{key}", f"is set by {_TEACHER_SET_BY_STAGE[key]}"))
        if not self.rationale_weight > 0:
            problems.append(("rationale_weight", f"must be positive, got {self.rationale_weight:g}"))
        if self.distillation_mode == "step_by_step" and self.rationale_prefix == self.label_prefix:
            problems.append(
                ("label_prefix", "must differ from rationale_prefix: they tell the two tasks apart")
            )
        if self.eval_problems < 0 or self.eval_max_new_tokens < 0:
            problems.append(("eval_problems", "eval_problems and eval_max_new_tokens must not be negative"))
        if problems:
            raise ConfigError.of(problems)
        # the training data check of TrainingData needs a dataset; synthesized traces stand in for it
        saved = self.dataset_name_or_path
        self.dataset_name_or_path = saved or "<synthesized traces>"
        try:
            super().validate()
        finally:
            self.dataset_name_or_path = saved
        if self.needs_teacher:
            self.teacher_options()
        else:  # the teacher is not called: its options' names are checked, their values not needed
            unknown = sorted(set(self.teacher) - {f.name for f in dataclasses.fields(TeacherOptions)})
            if unknown:
                raise ConfigError(f"teacher.{unknown[0]}", unknown_option_message(unknown[0], TeacherOptions))

    @property
    def needs_teacher(self) -> bool:
        """Whether the stage calls the teacher (to synthesize, or to evaluate a local teacher)."""
        return bool(self.teacher_model_path) and (
            not self.dataset_name_or_path or self.teacher_model_type == "local"
        )

    def teacher_rendering(self) -> TeacherOptions:
        """The teacher's options as given, unchecked: how a problem is put to the teacher (its template and
        system prompt, which the students' evaluation follows), also when traces were given."""
        return TeacherOptions(**{**self.teacher, "model": self.teacher_model_path})

    def teacher_options(self) -> TeacherOptions:
        """The teacher's options: ``teacher`` with the model and backend of the stage's own keys."""
        backend = "openai" if self.teacher_model_type == "api" else "local"
        return from_dict(
            TeacherOptions, {**self.teacher, "model": self.teacher_model_path, "backend": backend}, "teacher"
        )


class CoTDistillationStage(TrainingStage):
    """Distil a teacher's verified reasoning into the student (see the module docstring)."""

    stage_name: ClassVar[str] = "cot_distillation"
    config_class: ClassVar[type[CoTDistillationStageConfig]] = CoTDistillationStageConfig
    data_format: ClassVar[str] = "messages"

    config: CoTDistillationStageConfig

    def engine_algorithm(self) -> Algorithm:
        return self.config.algorithm

    @property
    def out(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def traces_path(self) -> Path:
        return self.out / "synthetic" / "traces.jsonl"

    def output_dataset(self) -> tuple[Path, str] | None:
        return self.out / "data" / "train.jsonl", "messages"

    # ------------------------------------------------------------------------------------------- data

    def training_config(self, model: str, data_path: str, eval_data_path: str = "") -> TrainingConfig:
        # the held-out data are problems for the answer accuracy, not conversations for an eval loss
        return super().training_config(model, data_path, "")

    def _prepare_all(self, data_dir: Path, final: bool = False) -> dict[str, PreparedDataset]:
        """The problems (``problems``) when the stage synthesizes, the traces (``""``) when given, and the
        held-out problems (``eval_``), each through the dataset stage."""
        config = self.config
        pending = self.pending_datasets()
        if final and pending:
            return super()._prepare_all(data_dir, final=True)  # the error naming the stage that did not run
        wanted: list[tuple[str, str, str, str]] = []  # (key in the result, option, format, file)
        if config.dataset_name_or_path and "" not in pending:
            wanted.append(("", "dataset_name_or_path", "messages", "train.jsonl"))
        else:
            wanted.append(("problems", "reasoning_dataset_path", "prompt", "problems.jsonl"))
        if config.eval_dataset_name_or_path:
            wanted.append(("eval_", "eval_dataset_name_or_path", "prompt", "eval_problems.jsonl"))
        prepared, problems = {}, []
        for key, option, data_format, name in wanted:
            linked = self.linked_datasets.get(key)
            try:
                prepared[key] = self._prepare_file(
                    option, data_format, data_dir / name, str(linked[1]) if linked else ""
                )
            except ConfigError as exc:
                problems.extend(exc.problems)
        if problems:
            raise ConfigError.of(problems)
        for key in ("problems", "eval_"):
            if key in prepared:
                problem = self._answer_problem(
                    prepared[key],
                    "reasoning_dataset_path" if key == "problems" else "eval_dataset_name_or_path",
                )
                if problem:
                    problems.append(problem)
        if problems:
            raise ConfigError.of(problems)
        return prepared

    def _prepare_file(self, option: str, data_format: str, path: Path, uri: str = "") -> PreparedDataset:
        config = self.config
        prefix = "eval_" if option.startswith("eval_") else ""
        dataset = DatasetConfig(
            uri or getattr(config, option),
            dataset_split=getattr(config, f"{prefix}dataset_split"),
            data_format=data_format,  # type: ignore[arg-type]
            dataset_on_invalid=config.dataset_on_invalid,
            train_split_ratio=1.0,
            dataset_subset_size=getattr(config, f"{prefix}dataset_subset_size"),
        )
        with tempfile.TemporaryDirectory(prefix="kfp-stage-data-") as scratch:
            try:
                return prepare_dataset(dataset, path, Path(scratch) / "unused-eval.jsonl")
            except DatasetError as exc:
                raise ConfigError(
                    option, f"the {self.name} stage reads {data_format!r} rows here: {exc}"
                ) from None

    def _answer_problem(self, prepared: PreparedDataset, option: str) -> tuple[str, str] | None:
        """Every problem has its reference answer."""
        column = self.config.rejection.answer_column
        with open(prepared.train_path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                row = json.loads(line)
                value = row.get(column)
                if value is None or (isinstance(value, str) and not value.strip()):
                    return (
                        option,
                        f"problem {number} ({str(row.get('prompt'))[:80]!r}) has no reference answer in column "
                        f"{column!r} (it has: {', '.join(sorted(row))}); set rejection.answer_column",
                    )
        return None

    # ------------------------------------------------------------------------------------------ checks

    def engine_problems(self, model: str, prepared: dict[str, PreparedDataset]) -> list[tuple[str, str]]:
        """The teacher answers (reachable, or loads); with traces given, the engine's preflight on them."""
        from kfp_components.trainer import preflight

        found: list[tuple[str, str]] = []
        if "" in prepared:
            found += super().engine_problems(model, prepared)
        # before any synthesis: the student's LoRA/OSFT targets and the distillation teacher's vocabulary
        config = self.training_config(model, str(prepared[""].train_path) if "" in prepared else "<traces>")
        for problem in preflight.model_problems(config):
            if problem[0] != "model_name_or_path" and problem not in found:
                found.append(problem)
        if self.config.needs_teacher:
            found += self.teacher_problems()
        return found

    def teacher_problems(self) -> list[tuple[str, str]]:
        from kfp_components.feedback.endpoint import FeedbackError
        from kfp_components.feedback.teacher import Teacher

        options = self.config.teacher_options()
        try:
            teacher = Teacher(options)
        except (FeedbackError, OSError, ValueError) as exc:
            return [("teacher_model_path", f"the teacher {options.model} cannot be used: {exc}")]
        try:
            teacher.check()
        except FeedbackError as exc:
            return [("teacher_model_path", str(exc))]
        finally:
            teacher.close()
            _release_memory()
        return []

    def check_inputs(self, model: str, tokenizer: str) -> None:
        self._prepared = self._prepare_all(self.out / "data")
        problems = self.engine_problems(model, self._prepared)
        if problems:
            raise ConfigError.of(problems)

    def dry_run(self, model: str, tokenizer: str) -> dict[str, Any]:
        plan: dict[str, Any] = {
            "input_model": model,
            "tokenizer": tokenizer,
            "output_dir": self.config.output_dir,
            "algorithm": self.config.algorithm,
        }
        with tempfile.TemporaryDirectory(prefix="kfp-dry-run-") as scratch:
            prepared = self._prepare_all(Path(scratch))
            for key, data in prepared.items():
                plan[f"{key or 'traces_'}dataset".replace("problems", "problems_")] = (
                    f"{data.source} ({data.data_format}, {data.metrics['train_rows']} rows)"
                )
            problems = self.engine_problems(model, prepared)
        if problems:
            raise ConfigError.of(problems)
        if self.config.needs_teacher and not self.config.dataset_name_or_path:
            options = self.config.teacher_options()
            plan["teacher"] = (
                f"{options.model} ({self.config.teacher_model_type}), {options.num_samples} samples per problem"
            )
            plan["traces"] = str(self.traces_path)
        plan["distillation_mode"] = self.config.distillation_mode
        plan["final_model"] = str(self.out / "final")
        return plan

    # --------------------------------------------------------------------------------------------- run

    def execute(self, model: str, tokenizer: str, previous_result: StageResult | None) -> StageResult:
        if (
            self.linked_datasets or not self._prepared
        ):  # traces another stage wrote in this run: read them now
            self._prepared = self._prepare_all(self.out / "data", final=True)
        prepared = self._prepared
        metrics: dict[str, float] = {}
        artifacts: dict[str, str] = {}
        if "" not in prepared:
            metrics.update(self.synthesize(str(prepared["problems"].train_path)))
            artifacts["traces"] = str(self.traces_path)
            prepared[""] = self._prepare_file(
                "dataset_name_or_path",
                "messages",
                self.out / "data" / "train.jsonl",
                str(self.training_traces()),
            )
        elif self.config.distillation_mode == "step_by_step":
            self.traces_path.parent.mkdir(parents=True, exist_ok=True)
            prepared[""] = self._prepare_file(
                "dataset_name_or_path",
                "messages",
                self.out / "data" / "train.jsonl",
                str(self.training_traces(prepared[""].train_path)),
            )
        self._prepared = prepared
        linked, self.linked_datasets = self.linked_datasets, {}  # read above; train on what was prepared
        try:
            result = super().execute(model, tokenizer, previous_result)
        finally:
            self.linked_datasets = linked
        result.metrics.update(metrics)
        result.artifacts.update(artifacts)
        if "eval_" in prepared:
            from kfp_components.stages.training import model_with_tokenizer

            base = model_with_tokenizer(model, tokenizer, self.out / "input_model")  # as training started
            report, scores = self.evaluate(base, result.model_path, str(prepared["eval_"].train_path))
            result.metrics.update(scores)
            result.artifacts["reasoning_eval"] = str(report)
        return result

    def synthesize(self, problems_path: str) -> dict[str, float]:
        from kfp_components.feedback.synthesis import synthesize

        options = self.config.teacher_options()
        self.log.info(
            "synthesizing reasoning traces with %s (%s)", options.model, self.config.teacher_model_type
        )
        try:
            summary = synthesize(
                problems_path, self.traces_path, options, self.config.rejection, seed=self.config.seed
            )
        finally:
            _release_memory()  # a local teacher's weights, before the student trains
        return {f"synthesis/{key}": value for key, value in summary.metrics().items()}

    def training_traces(self, traces: Path | None = None) -> Path:
        """The file the student trains on: the traces, or in step_by_step mode the two targets of each."""
        traces = traces or self.traces_path
        if self.config.distillation_mode == "traces":
            return traces
        target = self.traces_path.with_name("step_by_step.jsonl")
        from kfp_components.feedback.step_by_step import step_by_step_targets

        step_by_step_targets(
            traces,
            target,
            rationale_prefix=self.config.rationale_prefix,
            label_prefix=self.config.label_prefix,
            rationale_weight=self.config.rationale_weight,
            answer_column=self.config.rejection.answer_column,
        )
        return target

    def evaluate(self, base: str, tuned: str, problems_path: str) -> tuple[Path, dict[str, float]]:
        """Answer accuracy of the local teacher, the base student and the tuned student."""
        from kfp_components.evaluation.reasoning import accuracy_table, answer_accuracy
        from kfp_components.feedback.synthesis import TraceFilter

        config = self.config
        matcher = TraceFilter(config.rejection)
        max_new = config.eval_max_new_tokens or config.teacher_rendering().max_tokens
        student_prefix = config.label_prefix if config.distillation_mode == "step_by_step" else ""
        common: dict[str, Any] = {
            "answer_column": config.rejection.answer_column,
            "max_new_tokens": max_new,
            "max_seq_len": max(config.max_seq_len, max_new + 64),
            "limit": config.eval_problems,
        }
        from kfp_components.feedback.teacher import conversation, student_turns

        teacher = config.teacher_rendering()

        def student(row: dict[str, Any]) -> Any:
            """What the student was trained on: the teacher's rendering of the problem, without its system
            prompt (step_by_step: after label_prefix)."""
            turns = student_turns(teacher, row)
            return with_prefix(turns, student_prefix)

        scores = {}
        if config.teacher_model_path and config.teacher_model_type == "local":
            scores["teacher"] = answer_accuracy(
                config.teacher_model_path,
                problems_path,
                matcher,
                render=lambda row: conversation(teacher, row),
                **common,
            )
            _release_memory()
        scores["base student"] = answer_accuracy(base, problems_path, matcher, render=student, **common)
        scores["tuned student"] = answer_accuracy(tuned, problems_path, matcher, render=student, **common)
        report = self.out / "reasoning_eval.md"
        report.write_text(accuracy_table(scores), encoding="utf-8")
        metrics: dict[str, float] = {}
        keys = {"teacher": "teacher", "base student": "base", "tuned student": "tuned"}
        for role, score in scores.items():
            metrics.update(score.metrics(f"reasoning/{keys[role]}"))
        self.log.info(
            "answer accuracy on %d held-out problems: %s",
            scores["tuned student"].total,
            ", ".join(f"{role} {score.accuracy:.3f}" for role, score in scores.items()),
        )
        return report, metrics
