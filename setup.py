"""Package layout that pyproject.toml cannot express on its own.

The compiled pipelines live in the top-level ``pipelines/`` folder, so that
``python -m pipelines.training.osft.pipeline`` works from the repository root, and they ship inside the
wheel as ``kfp_components.pipelines`` so that ``from kfp_components.pipelines.training.osft import
osft_pipeline`` works from an installed wheel. One source tree, two import names; no copies.

``fnsft`` holds the import paths of the FNSFT multi-stage package (``fnsft.stages.base``, ``fnsft.pipeline``)
that users' custom stages are written against; it re-exports the classes of ``kfp_components``.
"""

from setuptools import find_packages, setup

library = find_packages(include=["kfp_components", "kfp_components.*", "fnsft", "fnsft.*"])
pipelines = ["kfp_components." + name for name in find_packages(include=["pipelines", "pipelines.*"])]

setup(
    packages=library + pipelines,
    package_dir={"kfp_components.pipelines": "pipelines"},
    package_data={
        "kfp_components": ["py.typed"],
        "kfp_components.data.samples": ["*.jsonl"],
        "kfp_components.evaluation.tasks": ["*.yaml", "*.jsonl"],
        **{name: ["*.yaml", "*.md"] for name in pipelines},
    },
)
