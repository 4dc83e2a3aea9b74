"""The built wheel works on its own: every module of the package, pipelines included, imports from it.

The wheel is installed without dependencies into a fresh virtual environment whose only other path entry
is the dev environment's site-packages (for torch, kfp and friends), so the editable install of the
working tree can not leak in; the import check runs from an empty folder so `pipelines/` of the checkout is
not on the path either.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

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


@pytest.mark.slow
def test_wheel_installs_and_every_module_imports(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = dist.glob("kfp_components-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "kfp_components/pipelines/__init__.py" in names
    assert not any(name.startswith(("tests/", "pipelines/")) for name in names)

    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet", str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (site / "dev_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    out = subprocess.run([python, "-c", CHECK], cwd=empty, check=True, capture_output=True, text=True).stdout
    report = json.loads(out.strip().splitlines()[-1])

    assert report["file"].startswith(str(venv)), "kfp_components must come from the wheel, not the checkout"
    assert report["failed"] == {}
    assert "kfp_components.components.dataset" in report["modules"]
    assert "kfp_components.pipelines.compile_all" in report["modules"]
    assert {"chat.jsonl", "preference.jsonl"} <= set(report["samples"])
    expected_pipelines = sorted(
        p.parent.name for p in (ROOT / "pipelines" / "training").glob("*/pipeline.py")
    )
    for name in expected_pipelines:
        assert f"kfp_components.pipelines.training.{name}.pipeline" in report["modules"]
