"""The built wheel works on its own, and its base install is light.

* With the dev dependencies: the wheel is installed without dependencies into a fresh virtual environment
  whose only other path entry is the dev environment's site-packages (for torch, kfp and friends), so the
  editable install of the working tree can not leak in; every module of the package, pipelines included,
  imports from it.
* With no extras: the wheel is installed with its dependencies from the package index (through pip,
  honouring ``constraints.txt``) into a fresh virtual environment that has no torch; every component
  imports there and every pipeline compiles to the same YAML as the committed one.
* No module of the wheel imports a test-only package, and no component or pipeline module imports a
  runtime-only package when it is imported (component bodies run in images and may import anything).

The check scripts run from an empty folder so that ``pipelines/`` of the checkout is not on the path.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import sysconfig
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = sorted(p.parent.name for p in (ROOT / "pipelines" / "training").glob("*/pipeline.py"))

# What a component or pipeline module may not import when it is imported: the packages of the extras.
RUNTIME_ONLY = {
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "tokenizers",
    "numpy",
    "tqdm",
    "boto3",
    "botocore",
    "huggingface_hub",
    "pyarrow",
    "kubernetes",
    "model_registry",
    "mr_openapi",
    "lm_eval",
    "datasets",
    "liger_kernel",
}

CHECK = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    from importlib import resources
    import kfp_components
    names = sorted(m.name for m in pkgutil.walk_packages(kfp_components.__path__, "kfp_components.")
                   if not m.name.endswith(".__main__"))  # entry points run when imported
    failed = {}
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # report every module that fails, not only the first
            failed[name] = f"{type(exc).__name__}: {exc}"
    samples = sorted(p.name for p in resources.files("kfp_components.data.samples").iterdir())
    print(json.dumps({"file": kfp_components.__file__, "modules": names, "failed": failed,
                      "samples": samples}))
    """
)

BASE_CHECK = textwrap.dedent(
    """
    import importlib, importlib.util, json, pkgutil, sys
    from pathlib import Path
    import kfp, kfp_components, kfp_components.components
    from kfp_components.pipelines import compile_all
    report = {"file": kfp_components.__file__, "kfp": kfp.__version__, "torch": True}
    try:
        import torch
    except ImportError as error:
        report["torch"] = f"{type(error).__name__}: {error}"
    components = sorted(m.name for m in pkgutil.iter_modules(kfp_components.components.__path__,
                                                             "kfp_components.components."))
    for name in components:
        importlib.import_module(name)
    out = Path(sys.argv[1])
    compiled = {}
    for name in compile_all.pipeline_modules():
        short = name.split(".")[-2]
        compiled[short] = str(importlib.import_module(name).compile_pipeline(out / f"{short}.yaml"))
    report.update(components=components, compiled=compiled, loaded=sorted({m.split(".")[0] for m in sys.modules}))
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
    )
    (built,) = dist.glob("kfp_components-*.whl")
    return built


def fresh_venv(path: Path) -> Path:
    """A virtual environment without pip (the dev environment's pip installs into it); its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    return path / "bin" / "python"


def site_packages(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(subprocess.check_output([python, "-c", code], text=True).strip())


def pip_install(python: Path, *args: str) -> None:
    command = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", *args]
    subprocess.run(command, check=True, capture_output=True, text=True)


def run_json(python: Path, script: str, cwd: Path, *args: str) -> dict:
    out = subprocess.run([python, "-c", script, *args], cwd=cwd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_wheel_installs_and_every_module_imports(wheel, tmp_path):
    names = zipfile.ZipFile(wheel).namelist()
    assert "kfp_components/pipelines/__init__.py" in names
    assert not any(name.startswith(("tests/", "pipelines/")) for name in names)

    python = fresh_venv(tmp_path / "fresh")
    pip_install(python, "--no-deps", str(wheel))
    (site_packages(python) / "dev_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    report = run_json(python, CHECK, empty)

    assert report["file"].startswith(str(tmp_path / "fresh")), "kfp_components must come from the wheel"
    assert report["failed"] == {}
    assert "kfp_components.components.dataset" in report["modules"]
    assert "kfp_components.pipelines.compile_all" in report["modules"]
    assert {"chat.jsonl", "preference.jsonl"} <= set(report["samples"])
    for name in PIPELINES:
        assert f"kfp_components.pipelines.training.{name}.pipeline" in report["modules"]


@pytest.mark.slow
def test_base_install_composes_and_compiles_without_the_extras(wheel, tmp_path, monkeypatch):
    """``pip install kfp-components``: no torch, yet every component imports and every pipeline compiles."""
    for variable in ("KFP_COMPONENTS_RUNTIME_IMAGE", "KFP_COMPONENTS_TRAINER_IMAGE", "PYTHONPATH"):
        monkeypatch.delenv(variable, raising=False)
    python = fresh_venv(tmp_path / "base")
    started = time.monotonic()
    pip_install(python, "-c", str(ROOT / "constraints.txt"), str(wheel))
    seconds = time.monotonic() - started
    installed = {
        d.metadata["Name"].lower()
        for d in importlib.metadata.distributions(path=[str(site_packages(python))])
    }
    assert "torch" not in installed and "transformers" not in installed, sorted(installed)
    assert {"kfp", "kfp-kubernetes", "pyyaml", "kfp-components"} <= installed

    empty = tmp_path / "elsewhere"
    empty.mkdir()
    out = tmp_path / "compiled"
    out.mkdir()
    report = run_json(python, BASE_CHECK, empty, str(out))

    assert report["file"].startswith(str(tmp_path / "base")), "kfp_components must come from the wheel"
    assert report["kfp"] == "2.17.0", "constraints.txt pins kfp"
    assert str(report["torch"]).startswith("ModuleNotFoundError"), report["torch"]
    expected = {p.stem for p in (ROOT / "kfp_components" / "components").glob("*.py")} - {"__init__"}
    assert {name.rsplit(".", 1)[1] for name in report["components"]} == expected
    assert set(report["compiled"]) == set(PIPELINES)
    for name in PIPELINES:
        committed = ROOT / "pipelines" / "training" / name / "pipeline.yaml"
        assert (out / f"{name}.yaml").read_text() == committed.read_text(), name
    loaded = set(report["loaded"]) & RUNTIME_ONLY
    assert loaded <= {"kubernetes"}, f"loaded while composing and compiling: {sorted(loaded)}"  # kfp needs it
    print(f"base install: {seconds:.0f} s")


def test_the_package_imports_no_test_only_package():
    """No module of ``kfp_components`` (nor the pipelines it ships) imports a package of the dev extra."""
    forbidden = dev_only_modules()
    assert {"moto", "jsonschema", "openapi_schema_validator", "pytest", "kubeflow_trainer_api"} <= forbidden
    offenders = {
        str(path.relative_to(ROOT)): sorted(imports & forbidden)
        for path in shipped_sources()
        if (imports := imported_packages(path, module_level_only=False)) & forbidden
    }
    assert offenders == {}


def test_components_and_pipelines_import_no_runtime_package_when_imported():
    """Composing needs the base install only: following every module-level import of the component and
    pipeline modules (through ``kfp_components``) reaches no package of the extras."""
    roots = [*(ROOT / "kfp_components" / "components").glob("*.py"), *(ROOT / "pipelines").rglob("*.py")]
    reached: dict[str, set[str]] = {}
    for path in roots:
        for module, packages in module_level_closure(path).items():
            if packages & RUNTIME_ONLY:
                reached[module] = packages & RUNTIME_ONLY
    assert reached == {}


# ------------------------------------------------------------------------------------------- helpers


def dev_only_modules() -> set[str]:
    """Top-level module names of the dev extra's distributions (and the Trainer API models of the tests)."""
    requirements = importlib.metadata.requires("kfp-components") or []
    dev = {
        re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        for requirement in requirements
        if re.search(r"""extra\s*==\s*["']dev["']""", requirement)
    }
    runtime = {
        re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        for requirement in requirements
        if not re.search(r"""extra\s*==\s*["']dev["']""", requirement)
    }
    modules = {"kubeflow_trainer_api"}
    for module, distributions in importlib.metadata.packages_distributions().items():
        names = {d.lower().replace("_", "-") for d in distributions}
        if names & dev and not names & runtime:
            modules.add(module)
    return modules


def shipped_sources() -> list[Path]:
    return sorted([*(ROOT / "kfp_components").rglob("*.py"), *(ROOT / "pipelines").rglob("*.py")])


def imported_packages(path: Path, *, module_level_only: bool) -> set[str]:
    """Top-level names of the absolute imports in a source file (only those run on import, if asked)."""
    return {name.split(".")[0] for name in imported_modules(path, module_level_only=module_level_only)}


def imported_modules(path: Path, *, module_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if module_level_only and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.update(_absolute(path, child))
            visit(child)

    visit(tree)
    return found


def _absolute(path: Path, node: ast.ImportFrom) -> set[str]:
    """``from x import a, b`` as the modules it may load: ``x``, ``x.a``, ``x.b`` (relative ones resolved)."""
    if node.level:
        package = _module_name(path).split(".")
        package = package[: len(package) - node.level + (1 if path.name == "__init__.py" else 0)]
        base = ".".join([*package, *([node.module] if node.module else [])])
    else:
        base = node.module or ""
    return {base} | {f"{base}.{alias.name}" for alias in node.names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _source_of(module: str) -> Path | None:
    """The file of a first-party module (``pipelines.*`` is also shipped as ``kfp_components.pipelines.*``)."""
    parts = module.split(".")
    if parts[:2] == ["kfp_components", "pipelines"]:
        parts = parts[1:]
    if parts[0] not in ("kfp_components", "pipelines"):
        return None
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_level_closure(path: Path) -> dict[str, set[str]]:
    """For each first-party module imported (at module level, transitively) from ``path``: the third-party
    top-level packages it imports at module level."""
    seen: dict[str, set[str]] = {}
    todo = [path]
    while todo:
        current = todo.pop()
        name = _module_name(current)
        if name in seen:
            continue
        modules = imported_modules(current, module_level_only=True)
        # importing a.b.c runs a/__init__.py and a/b/__init__.py first
        parents = {".".join(m.split(".")[:i]) for m in modules for i in range(1, m.count(".") + 1)}
        seen[name] = set()
        for module in modules | parents:
            source = _source_of(module)
            if source is not None:
                todo.append(source)
            elif module.split(".")[0] not in ("kfp_components", "pipelines"):
                seen[name].add(module.split(".")[0])
    return seen
