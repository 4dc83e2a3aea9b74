"""The official Kubeflow Trainer API models (``kubeflow-trainer-api``) of one release, loaded in isolation.

Releases 2.1.0 (``spec.podTemplateOverrides``) and 2.3.0 (``spec.runtimePatches``) are both needed, and both
are the module ``kubeflow_trainer_api``. ``make setup`` therefore installs each into its own folder,
``.venv/trainer-api/<version>`` (``pip install --no-deps --target``), and :func:`trainer_api_models` imports
one release at a time: with no ``kubeflow_trainer_api`` module loaded, its folder first on ``sys.path``; it
then checks the release number, makes sure every model is fully built, and removes the modules and the
path again. The model classes keep working afterwards (they hold their own references), and the next
release can be loaded the same way.

``KFP_COMPONENTS_TRAINER_API_DIR`` names another folder holding the ``<version>`` folders.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import threading
import types
from pathlib import Path

from pydantic import BaseModel

ENV_TRAINER_API_DIR = "KFP_COMPONENTS_TRAINER_API_DIR"
PACKAGE = "kubeflow_trainer_api"
_LOCK = threading.Lock()


def trainer_api_dir() -> Path:
    """The folder that holds one ``<version>`` folder per installed release."""
    configured = os.environ.get(ENV_TRAINER_API_DIR)
    return Path(configured) if configured else Path(sys.prefix) / "trainer-api"


@functools.cache
def trainer_api_models(version: str) -> types.ModuleType:
    """The ``kubeflow_trainer_api.models`` module of release ``version`` (e.g. ``"2.3.0"``)."""
    folder = trainer_api_dir() / version
    if not (folder / PACKAGE / "__init__.py").is_file():
        raise FileNotFoundError(
            f"kubeflow-trainer-api {version} is not installed in {folder}: run `make setup` (it runs "
            f"`pip install --no-deps --target {folder} kubeflow-trainer-api=={version}`)"
        )
    with _LOCK:
        saved = {name: sys.modules.pop(name) for name in list(sys.modules) if _is_package_module(name)}
        sys.path.insert(0, str(folder))
        try:
            models = importlib.import_module(f"{PACKAGE}.models")
            found = sys.modules[PACKAGE].__version__
            if found != version:
                raise RuntimeError(f"{folder} holds kubeflow-trainer-api {found}, not {version}")
            for value in vars(models).values():
                if isinstance(value, type) and issubclass(value, BaseModel):
                    value.model_rebuild(
                        raise_errors=True
                    )  # resolve every reference while this release is loaded
        finally:
            sys.path.remove(str(folder))
            for name in [name for name in sys.modules if _is_package_module(name)]:
                del sys.modules[name]
            sys.modules.update(saved)
    return models


def trainer_api_model(version: str, name: str) -> type[BaseModel]:
    """One model class of release ``version``, e.g. ``trainer_api_model("2.3.0", "TrainerV1alpha1TrainJob")``."""
    return getattr(trainer_api_models(version), name)


def _is_package_module(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")
