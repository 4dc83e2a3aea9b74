"""Compile every pipeline under ``pipelines/training/`` to the ``pipeline.yaml`` beside its source, and the
example multi-stage chains (:data:`CHAINS`) to ``pipelines/chains/``.

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


#: Example multi-stage YAMLs compiled into chain pipelines (repository checkouts only: the examples are not
#: part of the package): source, relative to the repository -> compiled YAML, relative to this folder.
CHAINS = {"examples/multistage/sft_dpo.yaml": "chains/sft_dpo.yaml"}


def compile_chains() -> list[Path]:
    """Compile :data:`CHAINS` (``fnsft-pipeline --config <yaml> --compile <out>`` for each)."""
    from kfp_components.orchestration.kfp_compile import compile_chain

    here = Path(__file__).resolve().parent
    return [compile_chain(here.parent / source, here / target) for source, target in CHAINS.items()]


def main() -> None:
    modules = pipeline_modules()
    if not modules:
        print("compile: no pipelines yet under pipelines/training/")
    for name in modules:
        path = importlib.import_module(name).compile_pipeline()
        print(f"compile: {name} -> {path}")
    for path in compile_chains():
        print(f"compile: chain -> {path}")


if __name__ == "__main__":
    main()
