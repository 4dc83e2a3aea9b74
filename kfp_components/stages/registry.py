"""Which stage names a pipeline can use: the built-in stages and custom ones registered at run time."""

from __future__ import annotations

import difflib
import re

from kfp_components.stages.base import BaseStage, config_class_of
from kfp_components.stages.cot_distillation import CoTDistillationStage
from kfp_components.stages.dpo import DPOStage
from kfp_components.stages.osft import OSFTStage
from kfp_components.stages.reward_model import RewardModelStage
from kfp_components.stages.rl import RLStage
from kfp_components.stages.rlaif import RLAIFStage
from kfp_components.stages.sft import SFTStage
from kfp_components.typed_config import ConfigError

BUILTIN_STAGES: dict[str, type[BaseStage]] = {
    "sft": SFTStage,
    "osft": OSFTStage,
    "dpo": DPOStage,
    "reward_model": RewardModelStage,
    "rl": RLStage,
    "rlaif": RLAIFStage,
    "cot_distillation": CoTDistillationStage,
}

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_registry: dict[str, type[BaseStage]] = dict(BUILTIN_STAGES)


def register_stage(name: str, stage_class: type[BaseStage], *, replace: bool = False) -> None:
    """Make ``stage_class`` available as ``name`` in ``stages:``.

    Registering the same class again under the same name does nothing; another class under a taken name
    needs ``replace=True``. The stage's options dataclass
    is found now (see :func:`~kfp_components.stages.base.config_class_of`), so a stage without one is refused
    here rather than when a pipeline loads.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"stage name {name!r}: use letters, digits, '_' and '-', starting with a letter")
    if not (isinstance(stage_class, type) and issubclass(stage_class, BaseStage)):
        raise TypeError(f"stage {name!r}: {stage_class!r} is not a subclass of BaseStage")
    config_class_of(stage_class)
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
    """The names of the stages a pipeline can run now, sorted (the reserved, unavailable ones left out)."""
    return sorted(_registry)


def get_stage_class(name: str, path: str = "") -> type[BaseStage]:
    """The class registered as ``name``; a :class:`ConfigError` at ``path`` otherwise."""
    if name in _registry:
        return _registry[name]
    close = difflib.get_close_matches(name, available_stages(), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ConfigError(
        path,
        f"no stage named {name!r}; {hint}available stages: {', '.join(available_stages()) or 'none'}. To run a "
        "stage type under another name (sft twice, say), give the entry a type: "
        "stage_configs.<name>.type: sft; custom stages are added with Pipeline.register_stage",
    )
