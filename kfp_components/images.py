"""The container images the components run in: set here and nowhere else.

Every component runs in an image that already holds this package, so nothing is pip-installed when a
pipeline runs (air-gapped clusters are common). Override the names at compile time with environment
variables, e.g. ``KFP_COMPONENTS_RUNTIME_IMAGE=registry.example.com/kfp-components:0.1.0 make compile``.

* runtime image (``containers/runtime.Containerfile``): slim CPU image for download, the training launcher
  step and registry (extras ``data,launch,registry``).
* trainer image (``containers/trainer.Containerfile``): CUDA PyTorch plus this package with the ``train``,
  ``eval`` and ``gpu`` extras, for the training workers and evaluation.
"""

from __future__ import annotations

import os

from kfp_components import __version__

DEFAULT_REGISTRY = "quay.io/kfp-components"

RUNTIME_IMAGE = os.environ.get("KFP_COMPONENTS_RUNTIME_IMAGE", f"{DEFAULT_REGISTRY}/runtime:{__version__}")
TRAINER_IMAGE = os.environ.get("KFP_COMPONENTS_TRAINER_IMAGE", f"{DEFAULT_REGISTRY}/trainer:{__version__}")
