"""Checks that a training run can start, in seconds and before any weight loads.

:func:`preflight_problems` returns every problem it finds as ``(key path, message)``;
:func:`check_training_inputs` raises them as one :class:`~kfp_components.typed_config.ConfigError`.
``train()`` runs the checks first (on rank 0; every rank fails with the same error), the trainer CLIs print
them as ``error: data_path: ...`` with exit code 2, and the multi-stage dry run and the KFP training step
call them before starting anything expensive. What is checked:

* the options validate (every problem of :meth:`TrainingConfig.validate`);
* ``data_path`` and ``eval_data_path`` are files and their first :data:`ROWS_CHECKED` rows are in the format
  the algorithm trains on (``messages`` for sft and osft, ``preference`` for dpo and reward_model; the row checks of
  :mod:`kfp_components.data.formats`);
* ``output_dir`` is not a file;
* with ``check_model``: ``model_name_or_path`` (and a DPO ``ref_model_name_or_path``, a distillation
  ``distill_teacher_path``) resolves: a local reference (absolute, starting with ``.`` or ``~``, or an
  existing path) must be a folder with a ``config.json``; anything else is a Hugging Face Hub id that must
  load with ``AutoConfig.from_pretrained``. The tokenizer must have a chat template. The model is built on the meta device from its config (no
  weights) to check that LoRA's ``lora_target_modules`` and OSFT's ``target_patterns`` name modules of it.
  A distillation teacher must have the student's vocabulary (tokenizer ``get_vocab()`` and ``vocab_size``);
* with ``check_environment``: a ``flash_attention_*`` ``attn_implementation`` needs its package, a GPU and
  a 16-bit ``torch_dtype``; ``flex_attention`` needs a GPU (it has no backward on a CPU);
  ``report_to: [mlflow]`` needs the mlflow client and ``MLFLOW_TRACKING_URI``.
  The KFP step that submits a TrainJob runs on another machine than the training, so it skips these.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from kfp_components.data.formats import MESSAGES, PREFERENCE, PROMPT, TEXT, check_row, detect_row_format
from kfp_components.trainer.config import RL_ALGORITHMS, TrainingConfig
from kfp_components.typed_config import ConfigError

log = logging.getLogger(__name__)

#: Rows read from the start of each data file.
ROWS_CHECKED = 20
#: Problems reported per data file (the rest are counted).
PROBLEMS_SHOWN_PER_FILE = 5
#: The row format each algorithm trains on.
DATA_FORMAT_BY_ALGORITHM = {
    "sft": MESSAGES,
    "osft": MESSAGES,
    "dpo": PREFERENCE,
    "reward_model": PREFERENCE,
    **dict.fromkeys(RL_ALGORITHMS, PROMPT),
}
#: The module each flash attention kernel needs (and the pip package that provides it).
FLASH_ATTENTION_MODULES = {
    "flash_attention_2": ("flash_attn", "flash-attn"),
    "flash_attention_3": ("flash_attn_interface", "flash-attn-3"),
}

Problems = list[tuple[str, str]]


def preflight_problems(
    config: TrainingConfig,
    *,
    check_model: bool = True,
    check_environment: bool = True,
    check_rewards: bool = True,
) -> Problems:
    """Every problem that would stop ``config`` from training, as ``(key path, message)``; empty when none.
    ``check_rewards`` False leaves the online algorithms' reward functions to the process that trains."""
    problems: Problems = []
    try:
        config.validate()
    except ConfigError as exc:
        problems.extend(exc.problems)
    problems += data_problems(config)
    output = Path(config.output_dir).expanduser() if config.output_dir else None
    if output is not None and output.exists() and not output.is_dir():
        problems.append(("output_dir", f"{config.output_dir} is a file; expected a folder (or no such path)"))
    if check_model:
        problems += model_problems(config)
        if (
            check_rewards
            and config.is_online
            and not any(key.startswith(("data_path", "reward_")) for key, _ in problems)
        ):
            problems += reward_problems(config)
    if check_environment:
        problems += environment_problems(config)
    return problems


def check_training_inputs(
    config: TrainingConfig, *, check_model: bool = True, check_environment: bool = True
) -> None:
    """Raise :class:`ConfigError` listing every problem of :func:`preflight_problems`."""
    problems = preflight_problems(config, check_model=check_model, check_environment=check_environment)
    if problems:
        raise ConfigError.of(problems)


# ------------------------------------------------------------------------------------------------- data


def data_format_of(algorithm: str) -> str:
    """The row format ``algorithm`` trains on."""
    if algorithm not in DATA_FORMAT_BY_ALGORITHM:
        raise ConfigError(
            "algorithm", f"expected one of {', '.join(DATA_FORMAT_BY_ALGORITHM)}, got {algorithm!r}"
        )
    return DATA_FORMAT_BY_ALGORITHM[algorithm]


def data_problems(config: TrainingConfig) -> Problems:
    """Problems of ``data_path`` and ``eval_data_path``: missing, not a file, or first rows unusable."""
    try:
        data_format = data_format_of(config.algorithm)
    except ConfigError as exc:
        return exc.problems
    if data_format == MESSAGES and config.data_format == TEXT:
        data_format = TEXT
    problems: Problems = []
    for key in ("data_path", "eval_data_path"):
        path = getattr(config, key)
        if path:  # an empty data_path is reported by validate()
            problems += [
                (key, message) for message in data_file_problems(path, data_format, config.algorithm)
            ]
    return problems


def data_file_problems(path: str, data_format: str, algorithm: str) -> list[str]:
    """What is wrong with the JSONL file ``path`` for ``algorithm``, judged on its first rows."""
    file = Path(path)
    if not file.exists():
        return [f"no such file: {path}"]
    if not file.is_file():
        return [f"{path} is a folder; expected a JSONL file of {data_format!r} rows"]
    problems: list[str] = []
    rows = 0
    try:
        with file.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                rows += 1
                row, problem = _parse_row(raw)
                found = None if problem else detect_row_format(row)
                if found is not None and found != data_format:  # the whole file, most likely: say it once
                    return [
                        f"{path}:{number}: a {found!r} row; algorithm {algorithm} trains on {data_format!r} rows"
                    ]
                row_problems = [problem] if problem else check_row(row, data_format)
                problems += [f"{path}:{number}: {p}" for p in row_problems]
                if rows >= ROWS_CHECKED:
                    break
    except OSError as exc:
        return [f"{path}: cannot be read: {exc.strerror or exc}"]
    if not rows:
        return [f"{path} has no rows"]
    if len(problems) > PROBLEMS_SHOWN_PER_FILE:
        hidden = len(problems) - PROBLEMS_SHOWN_PER_FILE
        problems = [
            *problems[:PROBLEMS_SHOWN_PER_FILE],
            f"{path}: {hidden} more problem(s) in the first rows",
        ]
    return problems


def _parse_row(raw: bytes) -> tuple[Any, str | None]:
    try:
        return json.loads(raw.decode("utf-8")), None
    except UnicodeDecodeError:
        return None, "not valid UTF-8"
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON: {exc.msg} (column {exc.colno})"


# ------------------------------------------------------------------------------------------------ model


def is_local_reference(reference: str) -> bool:
    """A model reference is a local path when it is absolute, starts with ``.`` or ``~``, or exists;
    anything else is a Hugging Face Hub id."""
    return reference.startswith((".", "~")) or Path(reference).is_absolute() or Path(reference).exists()


def model_source(reference: str) -> str:
    """What to hand to ``from_pretrained``: a local path with ``~`` expanded, or the Hub id unchanged."""
    return str(Path(reference).expanduser()) if is_local_reference(reference) else reference


def model_problems(config: TrainingConfig) -> Problems:
    """Problems of the model references, the tokenizer and the LoRA or OSFT targets; loads no weights."""
    problems: Problems = []
    references = [("model_name_or_path", config.model_name_or_path)]
    if config.algorithm == "dpo" and config.ref_model_name_or_path:
        references.append(("ref_model_name_or_path", config.ref_model_name_or_path))
    hf_configs = {}
    for key, reference in references:
        if not reference:
            continue  # reported by validate()
        hf_config, problem = load_model_config(reference)
        if problem:
            problems.append((key, problem))
        else:
            hf_configs[key] = hf_config
    if config.distill_teacher_path:
        teacher_config, problem = load_model_config(config.distill_teacher_path)
        if problem:
            problems.append(("distill_teacher_path", problem))
        else:
            hf_configs["distill_teacher_path"] = teacher_config
    if "model_name_or_path" not in hf_configs:
        return problems
    problems += tokenizer_problems(config.model_name_or_path)
    problems += target_problems(config, hf_configs["model_name_or_path"])
    if "distill_teacher_path" in hf_configs:
        problems += teacher_vocabulary_problems(
            config, hf_configs["model_name_or_path"], hf_configs["distill_teacher_path"]
        )
    return problems


def teacher_vocabulary_problems(config: TrainingConfig, student_config: Any, teacher_config: Any) -> Problems:
    """The distillation teacher must have the student's vocabulary: the same token to id mapping
    (``get_vocab()``) and the same logits width (``vocab_size``), read from the tokenizers and configs."""
    from transformers import AutoTokenizer

    key, teacher = "distill_teacher_path", config.distill_teacher_path
    problems: Problems = []
    student_width = student_config.get_text_config().vocab_size
    teacher_width = teacher_config.get_text_config().vocab_size
    if student_width != teacher_width:
        problems.append(
            (
                key,
                f"the teacher {teacher} has {teacher_width} logits per token, the student "
                f"{config.model_name_or_path} {student_width}: distillation needs the student's vocabulary",
            )
        )
    try:
        teacher_vocab = AutoTokenizer.from_pretrained(model_source(teacher)).get_vocab()
        student_vocab = AutoTokenizer.from_pretrained(model_source(config.model_name_or_path)).get_vocab()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [*problems, (key, f"the tokenizer of {teacher} does not load: {_first_line(exc)}")]
    if teacher_vocab != student_vocab:
        difference = _vocabulary_difference(student_vocab, teacher_vocab)
        problems.append((key, f"the teacher's tokenizer differs from the student's: {difference}"))
    return problems


def _vocabulary_difference(student: dict[str, int], teacher: dict[str, int], shown: int = 3) -> str:
    """What differs between two token -> id mappings, briefly."""
    parts = [f"{len(teacher)} tokens in the teacher's vocabulary, {len(student)} in the student's"]
    only_teacher = sorted(teacher.keys() - student.keys(), key=teacher.__getitem__)
    only_student = sorted(student.keys() - teacher.keys(), key=student.__getitem__)
    moved = sorted(
        (t for t in teacher.keys() & student.keys() if teacher[t] != student[t]), key=teacher.__getitem__
    )
    for count, what, tokens in (
        (len(only_teacher), "only in the teacher's", only_teacher),
        (len(only_student), "only in the student's", only_student),
        (len(moved), "with other ids", moved),
    ):
        if count:
            parts.append(f"{count} {what} (e.g. {', '.join(map(repr, tokens[:shown]))})")
    return "; ".join(parts)


def load_model_config(reference: str) -> tuple[Any, str | None]:
    """``(config, None)`` when ``reference`` resolves to a model config, else ``(None, the problem)``."""
    from transformers import AutoConfig

    if is_local_reference(reference):
        folder = Path(reference).expanduser()
        if not folder.exists():
            return None, f"no such folder: {reference} (a local path: absolute, or starting with . or ~)"
        if not folder.is_dir():
            return None, f"{reference} is a file; expected a model folder (with config.json)"
        if not (folder / "config.json").is_file():
            return None, f"{reference} has no config.json, so it is not a Hugging Face model folder"
    try:
        return AutoConfig.from_pretrained(model_source(reference)), None
    except (OSError, ValueError, KeyError) as exc:
        reason = _first_line(exc)
        if is_local_reference(reference):
            return None, f"{reference}: its config.json cannot be read: {reason}"
        return None, (
            f"{reference!r} is not a local folder (a local path is absolute or starts with . or ~) and does "
            f"not load as a Hugging Face Hub model id: {reason}"
        )


def tokenizer_problems(reference: str) -> Problems:
    """The tokenizer of ``reference`` must load and have a chat template."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_source(reference))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [("model_name_or_path", f"the tokenizer of {reference} does not load: {_first_line(exc)}")]
    if getattr(tokenizer, "chat_template", None) is None:
        return [
            (
                "model_name_or_path",
                f"the tokenizer of {reference} has no chat template, so chat data cannot be rendered "
                "(add one: chat_template.jinja in the model folder)",
            )
        ]
    return []


def target_problems(config: TrainingConfig, hf_config: Any) -> Problems:
    """LoRA's ``lora_target_modules`` and OSFT's ``target_patterns`` against the model built on the meta
    device from ``hf_config`` (no weights are read or allocated)."""
    applies_lora = bool(config.lora_r) and not config.uses_osft
    if not (applies_lora or config.uses_osft):
        return []
    try:
        model = meta_model(hf_config)
    except Exception as exc:  # any model class may fail on its own terms
        return [("model_name_or_path", f"cannot build the model from its config: {_first_line(exc)}")]
    if config.uses_osft:
        return osft_target_problems(model, config.target_patterns)
    return lora_target_problems(model, config.lora_target_modules)


def meta_model(hf_config: Any) -> Any:
    """The causal LM of ``hf_config`` with every tensor on the meta device: its structure, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def lora_target_problems(model: Any, targets: list[str]) -> Problems:
    """Each LoRA target must name modules of ``model`` the way peft matches them (the full name, or its
    last components); ``all-linear`` stands alone."""
    if targets == ["all-linear"]:
        return []
    names = [name for name, _ in model.named_modules() if name]
    problems: Problems = []
    for i, target in enumerate(targets):
        if target == "all-linear":
            problems.append((f"lora_target_modules[{i}]", "all-linear stands alone: use [all-linear]"))
        elif not any(name == target or name.endswith("." + target) for name in names):
            problems.append(
                (
                    f"lora_target_modules[{i}]",
                    f"{target!r} matches no module of {type(model).__name__}; its linear layers are "
                    f"{', '.join(_linear_leaf_names(model))}",
                )
            )
    return problems


def osft_target_problems(model: Any, patterns: list[str]) -> Problems:
    """Each OSFT pattern must match a weight of ``model``; without patterns, the defaults for its
    ``model_type`` must."""
    from kfp_components.trainer import osft

    if not patterns:
        try:
            osft.find_osft_targets(model)
        except ValueError as exc:
            return [("target_patterns", str(exc))]
        return []
    problems: Problems = []
    for i, pattern in enumerate(patterns):
        try:
            osft.find_osft_targets(model, [pattern])
        except ValueError as exc:  # also an invalid regex, which validate() reports too
            if "not a valid regex" not in str(exc):
                problems.append((f"target_patterns[{i}]", str(exc)))
    return problems


def _linear_leaf_names(model: Any) -> list[str]:
    from torch import nn

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


# ---------------------------------------------------------------------------------------------- machine


def environment_problems(config: TrainingConfig) -> Problems:
    """What this machine lacks for the run: flash attention's package and a GPU; the MLflow client and
    ``MLFLOW_TRACKING_URI`` when ``report_to`` has mlflow."""
    import torch

    from kfp_components.trainer.tracking import tracking_problems

    problems: Problems = tracking_problems(config)
    if config.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        problems.append(
            (
                "attn_implementation",
                "flex_attention has no backward on a CPU (torch: FlexAttention does not support backward on "
                "CPU); use auto (sdpa_per_sample there) or sdpa_per_sample",
            )
        )
    if config.attn_implementation not in FLASH_ATTENTION_MODULES:
        return problems
    module, package = FLASH_ATTENTION_MODULES[config.attn_implementation]
    if importlib.util.find_spec(module) is None:
        problems.append(
            (
                "attn_implementation",
                f"{config.attn_implementation} needs the {package} package (pip install {package})",
            )
        )
    if not torch.cuda.is_available():
        problems.append(("attn_implementation", f"{config.attn_implementation} needs a CUDA GPU; use auto"))
    elif config.torch_dtype == "float32":
        problems.append(
            (
                "attn_implementation",
                f"{config.attn_implementation} has no float32 kernel: set torch_dtype bfloat16 or float16, or use "
                "auto",
            )
        )
    return problems


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------------------------------------- rewards


def reward_problems(config: TrainingConfig) -> Problems:
    """The online algorithms' reward functions load (imported, reward models and endpoints found) and score
    the first prompt row of ``data_path`` with a stand-in completion. The reward model of
    ``reward_model_path`` is checked first from its config (a single score), and its tokenizer compared with
    the policy's (a difference is logged: completions are re-tokenised)."""
    from kfp_components.rewards import RewardError, check_reward_set, load_reward_set
    from kfp_components.rewards.reward_model import reward_model_problems

    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_source(config.model_name_or_path))
    except Exception:  # reported by model_problems; a reward that needs the tokenizer says so below
        tokenizer = None
    if config.reward_model_path:
        if config.reward_model_path.startswith("stage:"):
            return [
                (
                    "reward_model_path",
                    f"{config.reward_model_path} names a pipeline stage; the training "
                    "engine needs the reward model's folder or hub id",
                )
            ]
        found = reward_model_problems(model_source(config.reward_model_path))
        if found:
            return [("reward_model_path", problem) for problem in found]
    try:
        reward_set = load_reward_set(
            config.all_reward_functions,
            config.reward_weights or None,
            base_dir=None,
            tokenizer=tokenizer,
            device="cpu",
        )
    except (RewardError, ConfigError) as exc:
        return exc.problems if isinstance(exc, ConfigError) else [("reward_functions", str(exc))]
    with open(config.data_path, "rb") as lines:
        first = next((row for raw in lines if (row := _parse_row(raw)[0]) is not None), None)
    if not isinstance(first, dict):
        return []  # an empty or unreadable file is data_path's problem
    return [("reward_functions", problem) for problem in check_reward_set(reward_set, first)]
