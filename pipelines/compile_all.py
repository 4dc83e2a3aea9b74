"""Compile every pipeline under ``pipelines/training/`` to the ``pipeline.yaml`` beside its source.

Run as ``make compile`` or ``python -m pipelines.compile_all``. Each pipeline module exposes
``compile_pipeline(output_path=None) -> Path``.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from . import (
    training,  # relative: this package is importable as `pipelines` and as `kfp_components.pipelines`
)


def pipeline_modules() -> list[str]:
    """Dotted names of every ``pipelines.training.<name>.pipeline`` module, sorted."""
    return sorted(
        f"{training.__name__}.{info.name}.pipeline"
        for info in pkgutil.iter_modules(training.__path__)
        if info.ispkg and (Path(training.__path__[0]) / info.name / "pipeline.py").exists()
    )


def main() -> None:
    modules = pipeline_modules()
    if not modules:
        print("compile: no pipelines yet under pipelines/training/")
    for name in modules:
        path = importlib.import_module(name).compile_pipeline()
        print(f"compile: {name} -> {path}")


if __name__ == "__main__":
    main()
