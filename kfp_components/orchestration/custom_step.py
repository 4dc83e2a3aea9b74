"""A custom stage of a multi-stage YAML as a step of a compiled chain: its own code, run in the step.

A custom stage (a :class:`~kfp_components.stages.base.BaseStage` registered with
``Pipeline.register_stage``, usually from a ``--plugin`` file) runs in a step of its own: the step loads the
stage's code, builds its options from the YAML's entry (checked at compile time the same way), and calls
``validate_config``, ``check_inputs`` and ``execute`` with the model the previous step handed on, as a run of
``fnsft-pipeline`` would. The model the stage returns becomes the step's Model artifact (and, for TrainJob
chains, a copy on the workspace volume where the next TrainJob reads it).

Where the code comes from (:func:`stage_source`, at compile time):

* a ``--plugin`` file, or a module of its own (not part of a package): its source travels in the compiled
  pipeline (``plugin_source``) and is loaded in the step as ``--plugin`` loads it;
* a module of an installed package: imported by name, so the step's image (the chain's ``trainer_image``)
  must have the package;
* a class defined in the script that compiles (``__main__``) cannot be loaded anywhere else: refused, with
  what to do.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from kfp_components.stages.base import BaseStage, StageResult, config_class_of
from kfp_components.typed_config import ConfigError, from_dict

#: The module name ``load_plugin`` gives a ``.py`` file.
PLUGIN_PREFIX = "kfp_components_plugin_"


def stage_source(stage_class: type[BaseStage], key: str) -> dict[str, str]:
    """``{"stage_class": "<module>:<qualname>", "plugin_name": ..., "plugin_source": ...}`` for the step; a
    :class:`ConfigError` at ``key`` when the class cannot be loaded outside this process."""
    module_name, qualname = stage_class.__module__, stage_class.__qualname__
    where = f"{module_name}:{qualname}"
    if module_name == "__main__" or "<locals>" in qualname:
        raise ConfigError(
            key,
            f"the custom stage {qualname} is defined in the script that compiles the chain, so a pipeline step "
            "cannot load it: put it in a .py file registered with --plugin (or in an installed module) and "
            "compile again",
        )
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    plugin = module_name.startswith(PLUGIN_PREFIX) or ("." not in module_name and not _installed(file))
    if not plugin:
        return {"stage_class": where, "plugin_name": "", "plugin_source": ""}
    if not file or not Path(file).is_file():
        raise ConfigError(key, f"the custom stage {where} has no source file to take into the pipeline")
    name = module_name[len(PLUGIN_PREFIX) :] if module_name.startswith(PLUGIN_PREFIX) else module_name
    return {
        "stage_class": where,
        "plugin_name": name,
        "plugin_source": Path(file).read_text(encoding="utf-8"),
    }


def _installed(file: str | None) -> bool:
    return bool(file) and any(part in ("site-packages", "dist-packages") for part in Path(str(file)).parts)


def load_stage_class(stage_class: str, plugin_name: str = "", plugin_source: str = "") -> type[BaseStage]:
    """The class ``<module>:<qualname>``, after loading ``plugin_source`` as the ``--plugin`` file
    ``<plugin_name>.py`` when given."""
    from kfp_components.orchestration.cli import load_plugin

    module_name, _, qualname = stage_class.partition(":")
    if plugin_source:
        folder = Path(tempfile.mkdtemp(prefix="kfp-stage-plugin-"))
        path = folder / f"{plugin_name}.py"
        path.write_text(plugin_source, encoding="utf-8")
        if module_name.startswith(PLUGIN_PREFIX):
            load_plugin(str(path))
        else:  # a module of its own: importable by its name from the folder
            sys.path.insert(0, str(folder))
    found: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        found = getattr(found, part)
    if not (isinstance(found, type) and issubclass(found, BaseStage)):
        raise TypeError(f"{stage_class} is not a stage class")
    return found


def run_custom_stage(
    stage_class: type[BaseStage],
    stage_name: str,
    options: dict[str, Any],
    model: str,
    output: Path,
    *,
    previous_stage: str = "",
    previous_input_model: str = "",
) -> StageResult:
    """Run the stage on ``model`` as the pipeline would and put the model it returns into ``output`` (a
    folder, written fresh). ``previous_stage`` and ``previous_input_model``: the stage before it, for a
    stage that reads ``previous_result`` (WiSE-FT interpolates with the model that stage started from)."""
    config_class = config_class_of(stage_class)
    work = Path(tempfile.mkdtemp(prefix=f"kfp-stage-{stage_name}-"))
    # from_dict validates the options too, its problems under the YAML's key path
    options = {**options, "stage_name": stage_name, "output_dir": str(work)}
    stage = stage_class(from_dict(config_class, options, f"stage_configs.{stage_name}"))
    stage.validate_config()
    stage.check_inputs(model, model)
    previous = (
        StageResult(stage_name=previous_stage, model_path=model, input_model=previous_input_model)
        if previous_stage
        else None
    )
    result = stage.execute(model, model, previous)
    source = Path(result.model_path)
    if not source.is_dir():
        raise ValueError(
            f"the {stage_name} stage returned {result.model_path!r}, not a model folder: a pipeline step hands "
            "on a folder (save the model under the stage's output_dir)"
        )
    if output.exists():
        shutil.rmtree(output)
    shutil.copytree(source, output)
    if result.tokenizer_path and Path(result.tokenizer_path).is_dir():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(result.tokenizer_path).save_pretrained(output)
    return result
