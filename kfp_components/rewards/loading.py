"""Turn the config's ``reward_functions`` and ``reward_weights`` into a :class:`RewardSet`.

Each item of ``reward_functions`` is one of

* a shipped name: ``exact_match``, ``format_regex``, ``overlong_penalty``, ``reward_model``, ``http``,
  ``judge`` (a judge LLM's score, :mod:`.judge`);
* ``module:function``: an importable module and a function in it (``my_pkg.rewards:accuracy``; a dotted
  name after the colon reaches an attribute of an attribute);
* ``path/to/file.py:function``: a Python file, relative to ``base_dir`` (the stage YAML's folder; the
  working directory when there is none) unless absolute;
* a mapping with ``function`` set to one of the above, an optional ``name`` (the function's name in metrics)
  and, for a shipped reward, its options (``{function: format_regex, pattern: "..."}``). Options are checked
  like every other option: unknown keys, wrong types and bad values are errors naming the key path
  (``reward_functions[1].pattern``) and, for enumerated options, the allowed values.

A function's name is the ``name`` given, else the shipped name, else the function's own name; names must
differ. ``reward_weights`` has one weight per function (default: 1.0 each).

Loading problems are reported before anything is scored: a bad option as a
:class:`~kfp_components.typed_config.ConfigError` (every problem at once), a module that cannot be imported,
a missing or non-callable function, or a shipped reward that cannot start (an unset token variable, a reward
model that does not load) as a :class:`RewardError` naming the reference.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_components.redaction import redact_text
from kfp_components.rewards.answers import ExactMatchOptions, ExactMatchReward
from kfp_components.rewards.errors import RewardError
from kfp_components.rewards.http import HttpReward, HttpRewardOptions
from kfp_components.rewards.judge import JudgeRewardOptions
from kfp_components.rewards.reward_model import RewardModelOptions
from kfp_components.rewards.scoring import RewardFunction, RewardSet
from kfp_components.rewards.shaping import (
    FormatRegexOptions,
    FormatRegexReward,
    OverlongPenaltyOptions,
    OverlongPenaltyReward,
)
from kfp_components.secret_refs import secret_env
from kfp_components.typed_config import ConfigError, Options, from_dict

#: A ``reward_functions`` item: a reference, or a mapping with ``function`` and options.
RewardReference = str | dict[str, Any]

#: The shipped rewards: name -> options class.
SHIPPED: dict[str, type[Options]] = {
    "exact_match": ExactMatchOptions,
    "format_regex": FormatRegexOptions,
    "overlong_penalty": OverlongPenaltyOptions,
    "reward_model": RewardModelOptions,
    "http": HttpRewardOptions,
    "judge": JudgeRewardOptions,
}


@dataclass
class UserRewardOptions(Options):
    """A user function given as a mapping.

    Attributes:
        function: ``module:function`` or ``path/to/file.py:function``.
        name: Name in metrics; default: the function's own name.
    """

    function: str
    name: str = ""


def load_reward_set(
    references: Sequence[RewardReference],
    weights: Sequence[float] | None,
    *,
    base_dir: Path | None,
    tokenizer: Any = None,
    device: str = "cpu",
    key: str = "reward_functions",
    weights_key: str = "reward_weights",
) -> RewardSet:
    """The functions of ``references`` with their ``weights`` (see the module docstring).

    ``tokenizer`` is the policy's tokenizer (``overlong_penalty`` counts tokens with it unless it names its
    own), ``device`` the trainer's device (a reward model's unless it names its own); ``key`` and
    ``weights_key`` are the options' names in error messages.
    """
    options = parse_references(references, weights, key=key, weights_key=weights_key)
    names = [reward_name(item) for item in options]
    for i, name in enumerate(names):
        if name in names[:i]:
            first = names.index(name)
            raise ConfigError(
                f"{key}[{i}]",
                f"reward functions {key}[{first}] and {key}[{i}] are both named {name!r}; "
                "give one a distinct name ({function: ..., name: ...})",
            )
    functions = [_build(item, base_dir=base_dir, tokenizer=tokenizer, device=device) for item in options]
    shown = [_shown(item) for item in options]
    final_weights = [1.0] * len(functions) if weights is None else [float(w) for w in weights]
    return RewardSet(names=names, functions=functions, weights=final_weights, references=shown)


def reward_secret_env(references: Sequence[RewardReference]) -> list[dict[str, str]]:
    """The Kubernetes Secrets the reward functions name (``token_secret``), as the TrainJob's ``secret_env``
    entries (``name``: the ``token_env`` variable, ``secret``, ``key``); each variable once."""
    entries: dict[str, dict[str, str]] = {}
    for item in parse_references(references, None) if references else []:
        token_secret = getattr(item, "token_secret", "")
        if token_secret:
            entry = secret_env(item.token_env, token_secret)  # type: ignore[attr-defined]
            entries.setdefault(entry["name"], entry)
    return list(entries.values())


def _shown(options: Options) -> str:
    """How errors name a reward: its reference, with where an endpoint is (credentials redacted)."""
    if isinstance(options, HttpRewardOptions):
        return f"http ({redact_text(options.url)})"
    if isinstance(options, JudgeRewardOptions):
        return f"judge ({options.describe()})"
    return str(options.function)  # type: ignore[attr-defined]


def reward_name(options: Options) -> str:
    """A function's name in metrics: the ``name`` given, else the shipped name, else the attribute named
    after the colon (``my_rewards.py:accuracy`` -> ``accuracy``)."""
    name: str = options.name  # type: ignore[attr-defined]
    function: str = options.function  # type: ignore[attr-defined]
    if name:
        return name
    if function in SHIPPED:
        return function
    return function.rpartition(":")[2].rpartition(".")[2]


def parse_references(
    references: Sequence[RewardReference],
    weights: Sequence[float] | None,
    *,
    key: str = "reward_functions",
    weights_key: str = "reward_weights",
) -> list[Options]:
    """The typed options of every item, without loading anything; every problem in one :class:`ConfigError`."""
    if isinstance(references, str | bytes) or not isinstance(references, Sequence):
        raise ConfigError(key, f"expected a list of reward functions, got {type(references).__name__}")
    problems: list[tuple[str, str]] = []
    if not references:
        problems.append((key, "give at least one reward function"))
    parsed: list[Options] = []
    for i, item in enumerate(references):
        path = f"{key}[{i}]"
        try:
            parsed.append(_parse_one(item, path))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if weights is not None:
        if isinstance(weights, str | bytes) or not isinstance(weights, Sequence):
            problems.append((weights_key, f"expected a list of floats, got {type(weights).__name__}"))
        else:
            if len(weights) != len(references):
                problems.append(
                    (weights_key, f"has {len(weights)} weights for {len(references)} reward functions")
                )
            for i, weight in enumerate(weights):
                if (
                    isinstance(weight, bool)
                    or not isinstance(weight, int | float)
                    or not math.isfinite(weight)
                ):
                    problems.append((f"{weights_key}[{i}]", f"expected a finite float, got {weight!r}"))
    if problems:
        raise ConfigError.of(problems)
    return parsed


def _parse_one(item: Any, path: str) -> Options:
    if isinstance(item, str):
        reference = item.strip()
        if reference in SHIPPED:
            return from_dict(SHIPPED[reference], {"function": reference}, path)
        _check_reference_shape(reference, path)
        return UserRewardOptions(function=reference)
    if not isinstance(item, Mapping):
        raise ConfigError(
            path, f"expected a reference or a mapping with 'function', got {type(item).__name__}"
        )
    function = item.get("function")
    if function is None:
        raise ConfigError(f"{path}.function", "required option is missing")
    if not isinstance(function, str):
        raise ConfigError(f"{path}.function", f"expected a string, got {function!r}")
    if function in SHIPPED:
        options = from_dict(SHIPPED[function], item, path)
    else:
        _check_reference_shape(function, f"{path}.function")
        options = from_dict(UserRewardOptions, item, path)
    name: str = options.name  # type: ignore[attr-defined]
    if "/" in name or name != name.strip():
        raise ConfigError(f"{path}.name", f"a metric name without '/' or surrounding spaces, got {name!r}")
    return options


def _check_reference_shape(reference: str, path: str) -> None:
    target, _, attribute = reference.rpartition(":")
    if target and attribute:
        return
    close = difflib.get_close_matches(reference, list(SHIPPED), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(
        path,
        f"expected one of {', '.join(SHIPPED)}, module:function or path/to/file.py:function, "
        f"got {reference!r}{hint}",
    )


def _build(options: Options, *, base_dir: Path | None, tokenizer: Any, device: str) -> RewardFunction:
    reference = options.function  # type: ignore[attr-defined]
    try:
        if isinstance(options, UserRewardOptions):
            return resolve_function(reference, base_dir=base_dir)
        if isinstance(options, ExactMatchOptions):
            return ExactMatchReward(options)
        if isinstance(options, FormatRegexOptions):
            return FormatRegexReward(options)
        if isinstance(options, OverlongPenaltyOptions):
            if options.unit == "tokens" and options.tokenizer:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(options.tokenizer)
            return OverlongPenaltyReward(options, tokenizer)
        if isinstance(options, RewardModelOptions):
            from kfp_components.rewards.reward_model import RewardModelReward

            return RewardModelReward(options, device=device, policy_tokenizer=tokenizer)
        if isinstance(options, HttpRewardOptions):
            return HttpReward(options)
        if isinstance(options, JudgeRewardOptions):
            from kfp_components.rewards.judge import JudgeReward

            judge = JudgeReward(options, device=device)
            judge.check()  # reachable, the model served: before any completion is generated
            return judge
    except RewardError:
        raise
    except Exception as exc:
        raise RewardError(reference, f"cannot be loaded: {type(exc).__name__}: {exc}") from exc
    raise TypeError(f"no builder for {type(options).__name__}")


def resolve_function(reference: str, *, base_dir: Path | None = None) -> Callable[..., Any]:
    """The callable named by ``module:function`` or ``path/to/file.py:function``; raises :class:`RewardError`."""
    target, _, attribute = reference.rpartition(":")
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _import_file(reference, target, base_dir)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise RewardError(
                reference, f"cannot import module {target}: {type(exc).__name__}: {exc}"
            ) from exc
    value: Any = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            defined = sorted(
                n
                for n, v in vars(module).items()
                if callable(v) and not n.startswith("_") and not isinstance(v, type)
            )
            raise RewardError(
                reference,
                f"{target} has no function {attribute}"
                + (f" (it defines: {', '.join(defined)})" if defined else ""),
            )
        value = getattr(value, part)
    if not callable(value):
        raise RewardError(reference, f"{attribute} is a {type(value).__name__}, not a function")
    return value


def _import_file(reference: str, target: str, base_dir: Path | None) -> Any:
    path = Path(target).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    path = path.resolve()
    if not path.is_file():
        raise RewardError(reference, f"no such file: {path}")
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    module_name = f"kfp_components_reward_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise RewardError(reference, f"{path} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(module_name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise RewardError(reference, f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module
