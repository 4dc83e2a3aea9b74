"""What the SFT, OSFT and DPO stages share: prepare the stage's dataset, run the training engine, report.

A training stage's config is :class:`TrainingStageConfig` plus option groups of the training engine
(:class:`~kfp_components.trainer.config.OptimOptions`, ``LoRAOptions``, ...; every training stage has
``TrackingOptions``, so each stage of a YAML sets its own ``report_to``). Those groups are the very
dataclasses :class:`~kfp_components.trainer.config.TrainingConfig` is made of, and
:func:`training_options` copies their fields generically, so an option means the same in a stage's YAML as
in ``python -m kfp_components.trainer`` and the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from kfp_components.data import DatasetConfig, DatasetError, PreparedDataset, prepare_dataset
from kfp_components.data.config import OnInvalid, SourceFormat
from kfp_components.mappings import flatten_numbers
from kfp_components.stages.base import STAGE_REFERENCE, BaseStage, StageConfig, StageResult
from kfp_components.trainer.config import ALGORITHMS, Algorithm, TrackingOptions, TrainingConfig
from kfp_components.typed_config import ConfigError, Options

#: The option groups :class:`TrainingConfig` is made of (OptimOptions, OSFTOptions, LoRAOptions, DPOOptions).
TRAINING_OPTION_GROUPS: tuple[type, ...] = tuple(
    klass for klass in TrainingConfig.__mro__[1:] if dataclasses.is_dataclass(klass)
)

#: Files that make up a tokenizer; :func:`model_with_tokenizer` takes them from the tokenizer, not the model.
_TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "chat_template.jinja",
        "chat_template.json",
    }
)


@dataclass(kw_only=True)
class TrainingData(Options):
    """The data a training stage trains on. Each dataset goes through the dataset stage (every row is
    checked) into ``<output_dir>/data/``.

    Attributes:
        dataset_name_or_path: Training data: hf://org/name[:config][@revision], s3://bucket/key,
            https://..., pvc://claim/path or a local file or folder (JSONL, JSON or Parquet); in a pipeline,
            stage:<name> reads the dataset an earlier stage writes (the preference pairs of an rlaif stage).
        dataset_split: Split to train on, of an hf:// dataset (empty: train) or of a folder whose file names
            name their split (empty: every file).
        dataset_subset_size: Train on the first N valid rows only (0: all rows).
        dataset_on_invalid: fail (stop and list the invalid rows) or drop (skip them and count them).
        dataset_source_format: Format of the rows given (training and eval data): auto (detected),
            messages, conversations, sharegpt, alpaca, prompt_completion, text, preference,
            implicit_preference or prompt; converted to the rows the stage trains on.
        dataset_field_map: Rename the data's columns first (training and eval data), e.g.
            {question: prompt, solution: answer}.
        eval_dataset_name_or_path: Optional eval data (same URI forms): its loss is computed at the end of
            every epoch (and every eval_steps) and reported as eval_loss.
        eval_dataset_split: Split of eval_dataset_name_or_path (as dataset_split).
        eval_dataset_subset_size: Evaluate on the first N valid rows of the eval data only (0: all rows).
    """

    dataset_name_or_path: str
    dataset_split: str = ""
    dataset_subset_size: int = 0
    dataset_on_invalid: OnInvalid = "fail"
    dataset_source_format: SourceFormat = "auto"
    dataset_field_map: dict[str, str] | str = ""
    eval_dataset_name_or_path: str = ""
    eval_dataset_split: str = ""
    eval_dataset_subset_size: int = 0

    def validate(self) -> None:
        problems = []
        for prefix in ("", "eval_"):
            uri = getattr(self, f"{prefix}dataset_name_or_path")
            if not prefix and not uri:
                problems.append(("dataset_name_or_path", "required option is empty"))
            if not uri:
                continue
            try:
                DatasetConfig(
                    uri,
                    dataset_split=getattr(self, f"{prefix}dataset_split"),
                    dataset_subset_size=getattr(self, f"{prefix}dataset_subset_size"),
                    dataset_source_format=self.dataset_source_format,
                    dataset_field_map=self.dataset_field_map,
                ).validate()
            except ConfigError as exc:
                problems.extend((f"{prefix}{path}", message) for path, message in exc.problems)
        if problems:
            raise ConfigError.of(problems)

    def dataset_config(self, prefix: Literal["", "eval_"], data_format: str) -> DatasetConfig:
        """The dataset stage's config of the training data (``prefix`` ``""``) or the eval data (``eval_``):
        every valid row, no eval split."""
        return DatasetConfig(
            getattr(self, f"{prefix}dataset_name_or_path"),
            dataset_split=getattr(self, f"{prefix}dataset_split"),
            data_format=data_format,  # type: ignore[arg-type]
            dataset_on_invalid=self.dataset_on_invalid,
            dataset_source_format=self.dataset_source_format,
            dataset_field_map=self.dataset_field_map,
            train_split_ratio=1.0,
            dataset_subset_size=getattr(self, f"{prefix}dataset_subset_size"),
        )


@dataclass(kw_only=True)
class TrainingStageConfig(StageConfig, TrainingData, TrackingOptions):
    """Base of the training stages' configs, with the engine's ``TrackingOptions`` (where the stage's metrics
    are reported); subclasses add the other option groups of the training engine.

    Attributes:
        nproc_per_node: How the stage trains: 0 in the pipeline's own process (one GPU or the CPU); N >= 1
            launches the training engine under `torchrun --standalone --nproc_per_node N` (N GPUs of this
            machine), the command a TrainJob runs, with its output in the pipeline's log.
    """

    fingerprint_ignore: ClassVar[frozenset[str]] = StageConfig.fingerprint_ignore | {
        "nproc_per_node",
        "resume",
        "log_every_steps",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "report_to",  # where the metrics are reported, not what the stage trains
        "run_name",
    }

    nproc_per_node: int = 0

    def validate(self) -> None:
        StageConfig.validate(self)
        TrainingData.validate(self)
        if self.nproc_per_node < 0:
            raise ConfigError("nproc_per_node", f"must not be negative, got {self.nproc_per_node}")
        for group in option_groups(type(self)):
            group.validate(self)  # type: ignore[attr-defined]  # every option group has validate()
        if not getattr(self, "save_final_model", True):
            raise ConfigError(
                "save_final_model",
                "a stage always saves its model (the next stage starts from it); use save_intermediate: "
                "false or cleanup_intermediate to delete it once the pipeline has finished",
            )


def option_groups(config_class: type) -> tuple[type, ...]:
    """The option groups of :class:`TrainingConfig` that ``config_class`` inherits."""
    return tuple(group for group in TRAINING_OPTION_GROUPS if issubclass(config_class, group))


def training_options(config: StageConfig) -> dict[str, Any]:
    """Every field of the engine's option groups that ``config`` inherits, ready for ``TrainingConfig(**)``."""
    return {
        f.name: _copy(getattr(config, f.name))
        for group in option_groups(type(config))
        for f in dataclasses.fields(group)
    }


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


class TrainingStage(BaseStage):
    """Prepare the stage's dataset, then train with the engine from the input model: in this process, or
    under torchrun with ``nproc_per_node`` processes.

    Outputs in ``output_dir``: ``data/train.jsonl`` (and ``data/eval.jsonl``), and what the engine writes:
    ``metrics.jsonl``, ``summary.json``, ``training_config.json``, ``checkpoints/`` and ``final/``, the
    Hugging Face checkpoint the next stage starts from.
    """

    config_class: ClassVar[type[TrainingStageConfig]] = TrainingStageConfig
    #: The engine's ``algorithm``.
    algorithm: ClassVar[Algorithm]
    #: The row format the dataset must have (``messages`` or ``preference``).
    data_format: ClassVar[str]

    config: TrainingStageConfig

    def __init__(self, config: StageConfig):
        super().__init__(config)
        #: datasets prepared by :meth:`check_inputs` for the coming :meth:`execute`
        self._prepared: dict[str, PreparedDataset] = {}
        #: per prefix ("" or "eval_"), (stage name, dataset path) of a ``stage:<name>`` dataset reference
        self.linked_datasets: dict[str, tuple[str, Path]] = {}

    def link_earlier_stages(self, earlier: Mapping[str, BaseStage]) -> None:
        """Resolve ``dataset_name_or_path`` (and the eval data's) given as ``stage:<name>``: the dataset that
        earlier stage writes, which must be in the format this stage trains on."""
        for prefix in ("", "eval_"):
            key = f"{prefix}dataset_name_or_path"
            reference = getattr(self.config, key)
            if not reference.startswith(STAGE_REFERENCE):
                continue
            name = reference[len(STAGE_REFERENCE) :]
            stage = earlier.get(name)
            produced = stage.output_dataset() if stage is not None else None
            if stage is None or produced is None:
                writers = [n for n, s in earlier.items() if s.output_dataset() is not None]
                what = "is not a stage listed before this one" if stage is None else "writes no dataset"
                found = (
                    f"stages before it that write one: {', '.join(writers)}"
                    if writers
                    else "no stage before it writes one"
                )
                raise ConfigError(key, f"{reference}: {name!r} {what} ({found})")
            path, data_format = produced
            if data_format != self.data_format:
                raise ConfigError(
                    key,
                    f"{reference}: stage {name!r} writes {data_format!r} rows; the {self.name} stage trains on "
                    f"{self.data_format!r} rows",
                )
            self.linked_datasets[prefix] = (name, path)

    def pending_datasets(self) -> dict[str, str]:
        """The ``stage:<name>`` datasets not written yet (prefix -> the stage that writes them)."""
        return {
            prefix: name for prefix, (name, path) in self.linked_datasets.items() if not Path(path).is_file()
        }

    def engine_algorithm(self) -> Algorithm:
        """The engine's ``algorithm`` for this stage (the class's, unless the stage's options choose it)."""
        return self.algorithm

    def validate_config(self) -> None:
        """The engine's checks across option groups (through a :class:`TrainingConfig` with placeholder
        paths), so every rule of the engine applies here too."""
        if self.engine_algorithm() not in ALGORITHMS:
            raise TypeError(
                f"{type(self).__name__}.algorithm {self.engine_algorithm()!r} is not one of {ALGORITHMS}"
            )
        config = self.training_config(
            "<model>", "<data>", "<eval data>" if self.config.eval_dataset_name_or_path else ""
        )
        config.output_dir = config.output_dir or "<output_dir>"  # set by the pipeline
        config.validate()

    def check_inputs(self, model: str, tokenizer: str) -> None:
        """Prepare the stage's datasets now (every row checked, the format its algorithm needs) into
        ``<output_dir>/data/``, where :meth:`execute` then trains on them, and run the engine's preflight
        on them (``model`` stands in for the input model: LoRA and OSFT targets, flash attention)."""
        self._prepared = self._prepare_all(Path(self.config.output_dir) / "data")
        if self.pending_datasets():
            return  # checked when the stage that writes them has run: the stage prepares its data again
        problems = self.engine_problems(model, self._prepared)
        if problems:
            raise ConfigError.of(problems)

    def engine_problems(self, model: str, prepared: dict[str, PreparedDataset]) -> list[tuple[str, str]]:
        """The training engine's preflight (:mod:`kfp_components.trainer.preflight`) on the prepared data,
        with its key paths in the stage's terms. The model reference and its tokenizer are checked by the
        pipeline, once, under the key that names them."""
        from kfp_components.trainer import preflight

        config = self.training_config(
            model,
            str(prepared[""].train_path),
            str(prepared["eval_"].train_path) if "eval_" in prepared else "",
        )
        found = preflight.preflight_problems(config, check_model=False)
        if config.is_online and not found:
            found += self.reward_problems(config)
        hf_config, problem = preflight.load_model_config(model)
        if problem is None:
            found += preflight.target_problems(config, hf_config)
        keys = {"data_path": "dataset_name_or_path", "eval_data_path": "eval_dataset_name_or_path"}
        return [(keys.get(key, key), message) for key, message in found if key != "model_name_or_path"]

    def reward_problems(self, config: TrainingConfig) -> list[tuple[str, str]]:
        """An online algorithm's rewards: loaded, and called on the first prompt row (see
        :func:`kfp_components.trainer.preflight.reward_problems`)."""
        from kfp_components.trainer import preflight

        return preflight.reward_problems(config)

    def _prepare_all(self, data_dir: Path, final: bool = False) -> dict[str, PreparedDataset]:
        """The training data and, when set, the eval data, prepared into ``data_dir``; a :class:`ConfigError`
        lists the problems of both. ``final``: the stage is about to train, so a ``stage:<name>`` dataset
        that is still missing is an error (its stage did not run), not data that comes later."""
        prepared, problems = {}, []
        pending = self.pending_datasets()
        if final and pending:
            raise ConfigError.of(
                (
                    f"{prefix}dataset_name_or_path",
                    f"stage {name!r} has not written {self.linked_datasets[prefix][1]}: run it first (with "
                    "--stages, include it)",
                )
                for prefix, name in pending.items()
            )
        for prefix, name in (("", "train.jsonl"), ("eval_", "eval.jsonl")):
            if not getattr(self.config, f"{prefix}dataset_name_or_path") or prefix in pending:
                continue
            try:
                prepared[prefix] = self.prepare(prefix, data_dir / name)  # type: ignore[arg-type]
            except ConfigError as exc:
                problems.extend(exc.problems)
        if problems:
            raise ConfigError.of(problems)
        return prepared

    def training_config(self, model: str, data_path: str, eval_data_path: str = "") -> TrainingConfig:
        """The engine's config for this stage: its option groups, the algorithm and the paths."""
        return TrainingConfig(
            model_name_or_path=model,
            data_path=data_path,
            eval_data_path=eval_data_path,
            output_dir=self.config.output_dir,
            algorithm=self.engine_algorithm(),
            **training_options(self.config),
        )

    def execute(self, model: str, tokenizer: str, previous_result: StageResult | None) -> StageResult:
        from kfp_components.trainer.checkpoint import CHECKPOINTS
        from kfp_components.trainer.train import FINAL_MODEL_DIR, train

        out = Path(self.config.output_dir)
        stale = set(self.linked_datasets) & set(self._prepared)  # written again by a stage that ran since
        prepared = (
            self._prepared
            if "" in self._prepared and not stale
            else self._prepare_all(out / "data", final=True)
        )
        self._prepared = {}  # prepared for this run only: a later run prepares its data again
        train_data, eval_data = prepared[""], prepared.get("eval_")
        # A final/ folder always belongs to the latest successful attempt, and files that final_model links
        # to are never rewritten in place.
        shutil.rmtree(out / FINAL_MODEL_DIR, ignore_errors=True)
        start = model_with_tokenizer(model, tokenizer, out / "input_model")
        config = self.training_config(
            start, str(train_data.train_path), str(eval_data.train_path) if eval_data else ""
        )
        self.log.info(
            "training %s from %s on %s (%d rows)",
            self.engine_algorithm(),
            model,
            train_data.source,
            train_data.metrics["train_rows"],
        )
        if self.config.nproc_per_node:
            from kfp_components.launch.local import run_local_training

            run_local_training(config, nproc_per_node=self.config.nproc_per_node)
        else:
            try:
                train(config)
            finally:
                _release_memory()
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        metrics = flatten_numbers(summary)
        metrics.update(flatten_numbers(train_data.metrics, "dataset"))
        if eval_data:
            metrics.update(flatten_numbers(eval_data.metrics, "eval_dataset"))
        artifacts = {
            "summary": str(out / "summary.json"),
            "metrics": str(out / "metrics.jsonl"),
            "training_config": str(out / "training_config.json"),
            "train_data": str(train_data.train_path),
        }
        if eval_data:
            artifacts["eval_data"] = str(eval_data.train_path)
        if (out / "run.yaml").is_file():  # written by the torchrun launcher
            artifacts["run_config"] = str(out / "run.yaml")
        if (out / CHECKPOINTS).is_dir():
            artifacts["checkpoints"] = str(out / CHECKPOINTS)
        return StageResult(
            stage_name=self.name,
            model_path=str(out / FINAL_MODEL_DIR),
            metrics=metrics,
            artifacts=artifacts,
            input_model=model,
        )

    def discard_stale_outputs(self) -> None:
        """Delete resumable checkpoints of an earlier attempt, so ``resume: true`` never continues a run of
        other options or another input model."""
        from kfp_components.trainer.checkpoint import CHECKPOINTS

        checkpoints = Path(self.config.output_dir) / CHECKPOINTS
        if checkpoints.is_dir():
            self.log.info("removing the checkpoints of an earlier attempt: %s", checkpoints)
            shutil.rmtree(checkpoints)

    def dry_run(self, model: str, tokenizer: str) -> dict[str, Any]:
        """Check every dataset of the stage (fetched and validated into a temporary folder) and run the
        engine's preflight on them."""
        plan = super().dry_run(model, tokenizer)
        plan["algorithm"] = self.engine_algorithm()
        processes = self.config.nproc_per_node
        plan["launch"] = f"torchrun, {processes} process(es)" if processes else "in the pipeline's process"
        pending = self.pending_datasets()
        with tempfile.TemporaryDirectory(prefix="kfp-dry-run-") as scratch:
            prepared = self._prepare_all(Path(scratch))
            for prefix, data in prepared.items():
                plan[f"{prefix}dataset"] = (
                    f"{data.source} ({data.data_format}, {data.metrics['train_rows']} rows)"
                )
            for prefix, name in pending.items():
                plan[f"{prefix}dataset"] = (
                    f"{self.linked_datasets[prefix][1]} (written by stage {name!r} first)"
                )
            problems = [] if pending else self.engine_problems(model, prepared)
        if problems:
            raise ConfigError.of(problems)
        plan["final_model"] = str(Path(self.config.output_dir) / "final")
        return plan

    def prepare(self, prefix: Literal["", "eval_"], train_path: Path) -> PreparedDataset:
        """Run the dataset stage on the stage's training data (``prefix`` ``""``) or eval data (``eval_``)
        into ``train_path`` (every valid row; no eval split). A :class:`ConfigError` names the option when
        the data is missing, invalid or in another format than the stage trains on."""
        data_format = self.data_format
        if data_format == "messages" and getattr(self.config, "data_format", "messages") == "text":
            data_format = "text"  # continued pre-training (the engine's data_format)
        dataset = self.config.dataset_config(prefix, data_format)
        if prefix in self.linked_datasets:
            dataset = dataclasses.replace(dataset, dataset_name_or_path=str(self.linked_datasets[prefix][1]))
        key = f"{prefix}dataset_name_or_path"
        with tempfile.TemporaryDirectory(prefix="kfp-stage-data-") as scratch:
            try:
                return prepare_dataset(dataset, train_path, Path(scratch) / "unused-eval.jsonl")
            except DatasetError as exc:
                raise ConfigError(
                    key, f"the {self.name} stage trains on {data_format!r} rows: {exc}"
                ) from None


def model_with_tokenizer(model: str, tokenizer: str, folder: Path) -> str:
    """A model reference whose tokenizer is ``tokenizer``: ``model`` itself when they are the same,
    otherwise ``folder`` holding links to the model's files beside a copy of the tokenizer.

    The training engine reads the tokenizer saved with the model; this is how a pipeline's
    ``tokenizer_name_or_path`` (a base model with the chat template of its instruct sibling, say) reaches it.
    A hub id is resolved through the local Hugging Face cache (downloading what is missing).
    """
    if not tokenizer or tokenizer == model:
        return model
    from transformers import AutoTokenizer

    source = Path(model)
    if not source.is_dir():
        from huggingface_hub import snapshot_download

        source = Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.py", "*.txt"]))
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)
    for item in source.iterdir():
        if item.name not in _TOKENIZER_FILES and not (folder / item.name).exists():
            (folder / item.name).symlink_to(item.resolve())
    return str(folder)


def _release_memory() -> None:
    """Give back what the engine held before the next stage loads its model."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
