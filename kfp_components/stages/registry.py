"""Which stage names a pipeline can use: the built-in stages, custom ones registered at run time, and names
reserved for techniques that are planned but not available yet."""

from __future__ import annotations

import dataclasses
import re

from kfp_components.stages.base import BaseStage, StageConfig
from kfp_components.stages.dpo import DPOStage
from kfp_components.stages.osft import OSFTStage
from kfp_components.stages.sft import SFTStage
from kfp_components.typed_config import ConfigError

#: Names kept for techniques that are planned: naming one is an error that says so, not an unknown name.
RESERVED_STAGES: dict[str, str] = {
    "rl": "reinforcement learning with reward functions",
    "rlaif": "reinforcement learning from AI feedback",
    "cot_distillation": "chain-of-thought distillation from a teacher model",
}
BUILTIN_STAGES: dict[str, type[BaseStage]] = {"sft": SFTStage, "osft": OSFTStage, "dpo": DPOStage}

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_registry: dict[str, type[BaseStage]] = dict(BUILTIN_STAGES)


def register_stage(name: str, stage_class: type[BaseStage], *, replace: bool = False) -> None:
    """Make ``stage_class`` available as ``name`` in ``stages:``.

    Registering the same class again under the same name does nothing; another class under a taken name
    needs ``replace=True``. Reserved names (:data:`RESERVED_STAGES`) cannot be taken.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"stage name {name!r}: use letters, digits, '_' and '-', starting with a letter")
    if name in RESERVED_STAGES:
        raise ValueError(f"stage name {name!r} is reserved for {RESERVED_STAGES[name]}")
    if not (isinstance(stage_class, type) and issubclass(stage_class, BaseStage)):
        raise TypeError(f"stage {name!r}: {stage_class!r} is not a subclass of BaseStage")
    config_class = stage_class.config_class
    if not (dataclasses.is_dataclass(config_class) and issubclass(config_class, StageConfig)):
        raise TypeError(f"stage {name!r}: config_class {config_class!r} is not a StageConfig dataclass")
    current = _registry.get(name)
    if current is not None and current is not stage_class and not replace:
        raise ValueError(
            f"stage name {name!r} is taken by {current.__module__}.{current.__qualname__}; "
            "pass replace=True to replace it"
        )
    _registry[name] = stage_class


def unregister_stage(name: str) -> None:
    """Forget a registered stage (built-in stages included); unknown names are ignored."""
    _registry.pop(name, None)


def available_stages() -> list[str]:
    """The names a pipeline can use now, sorted."""
    return sorted(_registry)


def get_stage_class(name: str, path: str = "") -> type[BaseStage]:
    """The class registered as ``name``; a :class:`ConfigError` at ``path`` otherwise."""
    if name in _registry:
        return _registry[name]
    available = ", ".join(available_stages()) or "none"
    if name in RESERVED_STAGES:
        raise ConfigError(
            path,
            f"stage {name!r} ({RESERVED_STAGES[name]}) is not available yet; available stages: {available}",
        )
    raise ConfigError(
        path,
        f"no stage named {name!r}; available stages: {available} "
        "(custom stages are added with Pipeline.register_stage)",
    )
