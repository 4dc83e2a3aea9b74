"""Where the reference specifications are: the Kubeflow Trainer CRDs and the Model Registry OpenAPI spec.

They are unmodified upstream files kept in ``shared/reference`` beside the project root, never copied into
the project. ``KFP_COMPONENTS_REFERENCE_DIR`` names another folder; an empty folder runs the suite the way
a plain clone does. Where a file is absent the test doubles check requests against the official Python
models instead (``kubeflow-trainer-api``, ``model-registry``'s ``mr_openapi``), so no test depends on the
folder: it only makes some checks stricter.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_REFERENCE_DIR = "KFP_COMPONENTS_REFERENCE_DIR"
DEFAULT_REFERENCE_DIR = Path(__file__).resolve().parents[3] / "shared" / "reference"


def reference_dir() -> Path:
    """The reference folder: ``$KFP_COMPONENTS_REFERENCE_DIR`` (which must exist) or ``../shared/reference``."""
    configured = os.environ.get(ENV_REFERENCE_DIR)
    if not configured:
        return DEFAULT_REFERENCE_DIR
    path = Path(configured)
    if not path.is_dir():
        raise FileNotFoundError(f"{ENV_REFERENCE_DIR}={configured} is not a folder")
    return path


def _file(*parts: str) -> Path | None:
    path = reference_dir().joinpath(*parts)
    return path if path.is_file() else None


def trainjob_crd_file(release: str) -> Path | None:
    """The TrainJob CRD of a Kubeflow Trainer release (``v2.1.0``, ``v2.3.0``), or None when absent."""
    return _file("kubeflow-trainer", release, "trainer.kubeflow.org_trainjobs.yaml")


def torch_runtime_file(release: str) -> Path | None:
    """The ``torch-distributed`` ClusterTrainingRuntime of a Kubeflow Trainer release, or None when absent."""
    return _file("kubeflow-trainer", release, "torch_distributed.yaml")


def registry_spec_file() -> Path | None:
    """The Model Registry OpenAPI spec, or None when absent."""
    return _file("model-registry", "model-registry.openapi.yaml")


def describe(releases: tuple[str, ...] = ("v2.1.0", "v2.3.0")) -> list[str]:
    """What the cluster-facing tests validate against, one line per API (for the test report header)."""
    crds = {release: trainjob_crd_file(release) for release in releases}
    trainer = ", ".join(
        f"{release}: {path}"
        if path
        else f"{release}: kubeflow-trainer-api {release.removeprefix('v')} models"
        for release, path in crds.items()
    )
    spec = registry_spec_file()
    registry = str(spec) if spec else "model-registry's mr_openapi models"
    return [f"TrainJob schemas: {trainer}", f"Model Registry API: {registry}"]
