"""Score a model with lm-evaluation-harness and write flat metrics, the full results and a summary table.

:func:`run_evaluation` checks everything it can before the model loads: the backend, every task name
(an unknown name fails with the closest known names) and every task's data (data that cannot be
downloaded, e.g. a Hub dataset in an air-gapped cluster, fails naming the task). It then calls
``lm_eval.simple_evaluate`` with the task names unchanged, once for the model and, for a forgetting
check, once more for the base model.

The tasks bundled in :mod:`kfp_components.evaluation.tasks` (``kfp_capitals``, ``kfp_arithmetic`` and the
tag ``kfp_smoke``) are always on the include path; ``include_path`` adds a folder of custom task YAMLs.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

from kfp_components.evaluation.errors import (
    EvaluationError,
    ModelNotFoundError,
    TaskDataError,
    UnknownTaskError,
)
from kfp_components.evaluation.metrics import compare, dump_json, flatten_results, to_jsonable
from kfp_components.evaluation.models import ModelSource, locate_model
from kfp_components.evaluation.report import html_summary, markdown_summary, summary_rows
from kfp_components.evaluation.tasks import TASKS_DIR
from kfp_components.typed_config import ConfigError, Options

logger = logging.getLogger(__name__)

_BATCH_SIZE = re.compile(r"^auto(:\d+)?$")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
_GLOB = re.compile(r"[*?\[]")


__all__ = [
    "EvalConfig",
    "EvalResult",
    "EvaluationError",
    "ModelNotFoundError",
    "TaskDataError",
    "UnknownTaskError",
    "run_evaluation",
]


@dataclasses.dataclass
class EvalConfig(Options):
    """What to evaluate and how. Built with :func:`kfp_components.typed_config.from_dict`.

    Attributes:
        model_path: The model to score: a Hugging Face checkpoint folder, ``pvc://claim/path``,
            ``s3://bucket/prefix`` or a Hugging Face id (see :mod:`kfp_components.evaluation.models`).
        tasks: lm-eval task, group or tag names (globs allowed), passed to lm-eval unchanged.
        output_dir: Where results.json, summary.md, summary.html and samples_<task>.jsonl go.
        num_fewshot: Few-shot examples per prompt; None keeps each task's default.
        limit: Examples per task: a count (>= 1) or a fraction (< 1); None evaluates all.
        batch_size: A number, ``auto`` or ``auto:N`` (lm-eval finds the largest that fits, N times).
        gen_kwargs: Generation options for generate_until tasks (``max_gen_toks``, ``temperature``, ...).
        apply_chat_template: Format prompts with the tokenizer's chat template; None decides per model:
            True when the tokenizer has a chat template (instruct models).
        system_instruction: System prompt prepended to every request; empty for none.
        backend: ``hf`` (transformers) or ``vllm`` (needs vllm installed and a CUDA GPU).
        device: ``auto`` (cuda when available, else cpu), ``cpu``, ``cuda`` or ``cuda:N``.
        torch_dtype: Weights dtype for loading: ``auto`` (the checkpoint's), ``bfloat16``, ``float16`` or
            ``float32``.
        include_path: Extra folder of custom task YAMLs; empty for none.
        log_samples: Also write every prompt, response and score to samples_<task>.jsonl.
        base_model_name_or_path: The model before fine-tuning, scored too to measure forgetting; empty to skip.
            A Hugging Face id, a mounted folder, ``pvc://claim/path`` or ``s3://bucket/prefix`` (downloaded
            under ``TMPDIR`` and removed afterwards).
        workspace_pvc: The claim mounted at ``workspace_path``: ``pvc://<workspace_pvc>/...`` is read there.
            Other claims are read under ``$KFP_COMPONENTS_PVC_ROOT/<claim>`` (default ``/mnt/pvc``).
        workspace_path: Where ``workspace_pvc`` is mounted.
        bootstrap_iters: Bootstrap iterations for stderrs of non-mean metrics; 0 skips them.
        seed: Seed of lm-eval's Python, NumPy, torch and few-shot random generators.
    """

    model_path: str
    tasks: list[str]
    output_dir: str = "evaluation"
    num_fewshot: int | None = None
    limit: float | None = None
    batch_size: int | str = "auto"
    gen_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    apply_chat_template: bool | None = None
    system_instruction: str = ""
    backend: Literal["hf", "vllm"] = "hf"
    device: str = "auto"
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    include_path: str = ""
    log_samples: bool = False
    base_model_name_or_path: str = ""
    workspace_pvc: str = ""
    workspace_path: str = "/workspace"
    bootstrap_iters: int = 100000
    seed: int = 1234

    def validate(self) -> None:
        """Check values that their types alone do not; raises :class:`ConfigError`."""
        if not self.model_path:
            raise ConfigError("model_path", "must not be empty")
        for name in ("model_path", "base_model_name_or_path"):
            if any(c in getattr(self, name) for c in ",="):
                raise ConfigError(name, "must not contain ',' or '=' (lm-eval model_args syntax)")
        if not self.tasks or not all(isinstance(t, str) and t.strip() for t in self.tasks):
            raise ConfigError("tasks", "give at least one task name, e.g. [arc_easy, hellaswag]")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError("num_fewshot", f"must be >= 0 or null, got {self.num_fewshot}")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError(
                "limit", f"must be > 0 (a count, or a fraction below 1) or null, got {self.limit}"
            )
        if isinstance(self.batch_size, int):
            if self.batch_size < 1:
                raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        elif not _BATCH_SIZE.match(self.batch_size):
            raise ConfigError("batch_size", f"expected a number, 'auto' or 'auto:N', got {self.batch_size!r}")
        if not _DEVICE.match(self.device):
            raise ConfigError("device", f"expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.bootstrap_iters < 0:
            raise ConfigError("bootstrap_iters", "must be >= 0")


@dataclasses.dataclass
class EvalResult:
    """What :func:`run_evaluation` produced.

    Attributes:
        metrics: Flat KFP-safe metrics: ``<task>_<metric>[_<filter>]``, ``..._stderr``,
            ``chat_template_applied`` (1.0 or 0.0) and, with a base model, ``base_<name>``,
            ``<name>_delta``, ``<name>_retention`` and ``mean_retention``.
        results: lm-eval's results for the model, JSON-safe, without per-sample logs.
        base_results: The same for the base model, or None.
        apply_chat_template: Whether prompts went through the model's chat template.
        base_apply_chat_template: The same for the base model, or None.
        summary_markdown: The Markdown summary (also in summary.md).
        output_dir, results_path, summary_md_path, summary_html_path: The files written.
        sample_paths: The samples_<task>.jsonl files (log_samples only).
    """

    metrics: dict[str, float]
    results: dict[str, Any]
    base_results: dict[str, Any] | None
    apply_chat_template: bool
    base_apply_chat_template: bool | None
    summary_markdown: str
    output_dir: Path
    results_path: Path
    summary_md_path: Path
    summary_html_path: Path
    sample_paths: list[Path] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------------------------- tasks
@functools.lru_cache(maxsize=8)
def task_manager(include_paths: tuple[str, ...], include_defaults: bool = True) -> Any:
    """An lm-eval ``TaskManager`` over ``include_paths`` (and lm-eval's own tasks), cached: indexing
    lm-eval's ~15,000 task names takes several seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths), include_defaults=include_defaults)


def _include_paths(include_path: str) -> tuple[str, ...]:
    paths = [str(TASKS_DIR)]
    if include_path:
        folder = Path(include_path)
        if not folder.is_dir():
            raise ConfigError("include_path", f"{include_path}: no such folder of task YAMLs")
        paths.append(str(folder.resolve()))
    return tuple(paths)


def _known(manager: Any, name: str) -> bool:
    if name in manager.task_index:
        return True
    if _GLOB.search(name):
        return bool(manager.match_tasks([name]))
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def resolve_tasks(tasks: list[str], include_path: str = "") -> Any:
    """The ``TaskManager`` that knows every name in ``tasks``; raises :class:`UnknownTaskError` otherwise.

    When the bundled and ``include_path`` tasks cover every name, lm-eval's own task folder is not
    indexed (saves several seconds); otherwise it is.
    """
    paths = _include_paths(include_path)
    local = task_manager(paths, include_defaults=False)
    if all(_known(local, name) for name in tasks):
        return local
    manager = task_manager(paths, include_defaults=True)
    unknown = [name for name in tasks if not _known(manager, name)]
    if unknown:
        lines = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            hint = f"did you mean: {', '.join(close)}?" if close else "no similar task names"
            lines.append(f"  {name!r}: {hint}")
        where = f" or in {include_path}" if include_path else ""
        raise UnknownTaskError(
            f"unknown lm-eval task(s), not found among lm-eval's tasks{where} "
            f"(bundled: kfp_capitals, kfp_arithmetic, kfp_smoke):\n" + "\n".join(lines)
        )
    return manager


def _is_download_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) says the data could not be fetched: offline, no network, not found."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names = {cls.__name__ for cls in type(exc).__mro__}
        if names & {
            "ConnectionError",
            "OfflineModeIsEnabled",
            "DatasetNotFoundError",
            "HfHubHTTPError",
            "LocalEntryNotFoundError",
            "TimeoutError",
            "HTTPError",
        }:
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def _data_error(task: str, exc: BaseException) -> EvaluationError:
    if _is_download_error(exc):
        return TaskDataError(
            f"task {task!r}: its data could not be downloaded ({type(exc).__name__}: {exc}). Without "
            "internet access, pre-fill the Hugging Face datasets cache (HF_HOME/HF_DATASETS_CACHE) or use a "
            "task whose data is local (include_path)."
        )
    return TaskDataError(f"task {task!r} could not be loaded: {type(exc).__name__}: {exc}")


def check_task_data(manager: Any, tasks: list[str]) -> None:
    """Load every task (and so its data) once, before the model loads, naming the task that fails."""
    for name in tasks:
        try:
            manager.load([name])
        except Exception as exc:
            raise _data_error(name, exc) from exc


# ----------------------------------------------------------------------------------------------- model
def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when a GPU is visible, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_backend(backend: str) -> None:
    """vllm needs the vllm package and a CUDA GPU; say so clearly instead of failing deep in lm-eval."""
    if backend != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "backend", "vllm is not installed in this image; use backend 'hf' or an image with vllm"
        )
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("backend", "vllm needs a CUDA GPU and none is visible; use backend 'hf' for CPU")


def has_chat_template(model_path: str) -> bool:
    """Whether the model's tokenizer carries a chat template (instruct and chat models do)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{model_path}: cannot load the tokenizer: {exc}") from exc
    return bool(getattr(tokenizer, "chat_template", None))


def _limit(limit: float | None) -> int | float | None:
    if limit is None or limit < 1:
        return limit
    return int(limit)


def evaluate_one(
    config: EvalConfig, model_path: str, manager: Any, apply_chat_template: bool
) -> dict[str, Any]:
    """One ``lm_eval.simple_evaluate`` call for ``model_path``; returns lm-eval's raw results."""
    import lm_eval

    kwargs: dict[str, Any] = {
        "model": config.backend,
        "model_args": f"pretrained={model_path},dtype={config.torch_dtype}",
        "tasks": list(config.tasks),
        "num_fewshot": config.num_fewshot,
        "limit": _limit(config.limit),
        "batch_size": config.batch_size,
        "device": resolve_device(config.device),
        "gen_kwargs": dict(config.gen_kwargs) or None,
        "apply_chat_template": apply_chat_template,
        "fewshot_as_multiturn": apply_chat_template and bool(config.num_fewshot),
        "system_instruction": config.system_instruction or None,
        "log_samples": config.log_samples,
        "bootstrap_iters": config.bootstrap_iters,
        "task_manager": manager,
        "random_seed": config.seed,
        "numpy_random_seed": config.seed,
        "torch_random_seed": config.seed,
        "fewshot_random_seed": config.seed,
    }
    logger.info(
        "evaluating %s on %s (chat template: %s)", model_path, ", ".join(config.tasks), apply_chat_template
    )
    try:
        results = lm_eval.simple_evaluate(**kwargs)
    except Exception as exc:
        if _is_download_error(exc):
            raise _data_error(", ".join(config.tasks), exc) from exc
        raise
    if results is None:  # a non-zero rank of a distributed run
        raise EvaluationError("lm-eval returned no results (not rank 0)")
    return results


def _write_samples(samples: dict[str, Any], output_dir: Path, prefix: str) -> list[Path]:
    import json

    paths = []
    for task, rows in samples.items():
        path = output_dir / f"{prefix}samples_{re.sub(r'[^0-9A-Za-z_.-]+', '_', task)}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(to_jsonable(row), ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------- run
def run_evaluation(config: EvalConfig) -> EvalResult:
    """Evaluate ``config.model_path`` (and ``config.base_model_name_or_path``) and write the outputs.

    Raises:
        ConfigError: a bad option, or the vllm backend without vllm or a GPU.
        ModelNotFoundError: a model that is missing or unreadable, naming the option, before any task loads.
        UnknownTaskError: a task name lm-eval does not know (with close matches), before any model loads.
        TaskDataError: a task whose data could not be downloaded, before any model loads.
    """
    config.validate()
    check_backend(config.backend)
    sources = locate_models(config)
    manager = resolve_tasks(config.tasks, config.include_path)
    check_task_data(manager, config.tasks)
    with tempfile.TemporaryDirectory(prefix="kfp-eval-models-") as scratch:
        paths = {name: source.materialise(Path(scratch)) for name, source in sources.items()}
        return _evaluate(config, manager, paths["model_path"], paths.get("base_model_name_or_path"))


def locate_models(config: EvalConfig) -> dict[str, ModelSource]:
    """The model (and base model) of ``config``, checked; :class:`ModelNotFoundError` names the option."""
    options = {"model_path": config.model_path}
    if config.base_model_name_or_path:
        options["base_model_name_or_path"] = config.base_model_name_or_path
    return {
        name: locate_model(
            value, name, workspace_pvc=config.workspace_pvc, workspace_path=config.workspace_path
        )
        for name, value in options.items()
    }


def _evaluate(config: EvalConfig, manager: Any, model_path: str, base_model_path: str | None) -> EvalResult:
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    def chat_choice(path: str) -> bool:
        if config.apply_chat_template is not None:
            return config.apply_chat_template
        choice = has_chat_template(path)
        logger.info("%s: chat template %s", path, "found: applying it" if choice else "absent: plain prompts")
        return choice

    apply_chat = chat_choice(model_path)
    raw = evaluate_one(config, model_path, manager, apply_chat)
    sample_paths = _write_samples(raw.pop("samples", None) or {}, output_dir, "")
    results = to_jsonable(raw)
    metrics = flatten_results(results)
    metrics["chat_template_applied"] = float(apply_chat)

    base_results = base_chat = None
    if base_model_path:
        base_chat = chat_choice(base_model_path)
        base_raw = evaluate_one(config, base_model_path, manager, base_chat)
        sample_paths += _write_samples(base_raw.pop("samples", None) or {}, output_dir, "base_")
        base_results = to_jsonable(base_raw)
        metrics.update(compare(results, base_results))

    settings = {
        "model": config.model_path,
        "base model": config.base_model_name_or_path or None,
        "tasks": ", ".join(config.tasks),
        "backend": config.backend,
        "chat template applied": apply_chat
        if base_chat is None or base_chat == apply_chat
        else f"{apply_chat} (base: {base_chat})",
        "chat template choice": "automatic" if config.apply_chat_template is None else "configured",
        "num_fewshot": "task default" if config.num_fewshot is None else config.num_fewshot,
        "limit": config.limit,
    }
    rows = summary_rows(results, base_results)
    mean_retention = metrics.get("mean_retention")
    markdown = markdown_summary(rows, settings, mean_retention)
    summary_md_path = output_dir / "summary.md"
    summary_md_path.write_text(markdown, encoding="utf-8")
    summary_html_path = output_dir / "summary.html"
    summary_html_path.write_text(html_summary(rows, settings, mean_retention), encoding="utf-8")

    results_path = output_dir / "results.json"
    dump_json(
        {
            **results,
            "evaluation": {
                "config": dataclasses.asdict(config),
                "apply_chat_template": apply_chat,
                "chat_template_choice": settings["chat template choice"],
                "base_apply_chat_template": base_chat,
                "metrics": metrics,
            },
            "base_results": base_results,
        },
        results_path,
    )
    return EvalResult(
        metrics=metrics,
        results=results,
        base_results=base_results,
        apply_chat_template=apply_chat,
        base_apply_chat_template=base_chat,
        summary_markdown=markdown,
        output_dir=output_dir,
        results_path=results_path,
        summary_md_path=summary_md_path,
        summary_html_path=summary_html_path,
        sample_paths=sample_paths,
    )
