"""Writable caches for a pod that runs as an arbitrary non-root user (OpenShift's restricted policy).

The unit tests make a location unwritable for any user, root included, by putting it under a regular file.
The end-to-end test runs the front doors (trainer CLI, ``fnsft-pipeline --dry_run``, the evaluation component
under ``kfp.local``) as a random UID in group 0 with an unwritable HOME, the way OpenShift runs a pod.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kfp_components import environment
from kfp_components.environment import ensure_writable_caches, is_writable_dir
from kfp_components.testing.tiny_model import tiny_model_path

from conftest import SAMPLES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(tmp_path, monkeypatch) -> dict[str, str]:
    """An environment whose HOME cannot be written by anyone (it lies under a file); TMPDIR is tmp_path."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(environment, "_logged", False)
    return {"HOME": str(blocker / "home"), "PATH": os.environ.get("PATH", "")}


def test_unwritable_home_moves_every_cache_under_tmpdir(env, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kfp_components.environment")
    changed = ensure_writable_caches(env)
    base = tmp_path / "tmp" / f"kfp-components-{os.getuid()}"
    assert changed["XDG_CACHE_HOME"] == str(base / "cache")
    assert changed["HF_HOME"] == str(base / "huggingface")
    assert changed["TRITON_CACHE_DIR"] == str(base / "triton")
    assert changed["MPLCONFIGDIR"] == str(base / "matplotlib")
    assert changed["TORCH_HOME"] == str(base / "torch")
    assert changed["KFP_COMPONENTS_CACHE"] == str(base / "kfp_components")
    assert {name: env[name] for name in changed} == changed
    assert all(is_writable_dir(path) for path in changed.values())
    # follow-on caches that default under HF_HOME are left to follow it
    assert "HF_DATASETS_CACHE" not in env and "HF_HUB_CACHE" not in env
    (line,) = [r.getMessage() for r in caplog.records]
    assert "HF_HOME=" in line and "is not writable" in line
    # once per process: a second call finds everything writable and says nothing
    assert ensure_writable_caches(env) == {}
    assert len(caplog.records) == 1


def test_writable_choices_of_the_user_are_kept_and_unwritable_ones_replaced(env, tmp_path):
    mine = tmp_path / "my-hf-home"
    env["HF_HOME"] = str(mine)  # does not exist yet, but can be created: writable
    env["HF_DATASETS_CACHE"] = env["HOME"] + "/datasets"  # set, but under a file
    changed = ensure_writable_caches(env)
    assert env["HF_HOME"] == str(mine) and "HF_HOME" not in changed
    assert changed["HF_DATASETS_CACHE"].endswith(f"kfp-components-{os.getuid()}/huggingface/datasets")


def test_writable_home_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(environment, "_logged", False)
    (tmp_path / "home").mkdir()
    env = {"HOME": str(tmp_path / "home"), "USER": "someone"}
    assert ensure_writable_caches(env) == {}
    assert env == {"HOME": str(tmp_path / "home"), "USER": "someone"}


def test_no_home_and_no_user_name_still_gets_caches(env):
    """A random UID may have neither HOME nor an entry in /etc/passwd."""
    del env["HOME"]
    changed = ensure_writable_caches(env)
    assert {"XDG_CACHE_HOME", "HF_HOME", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH"} <= set(changed)


# ------------------------------------------------------------------------------------------------------
# The front doors as a random UID in group 0 with an unwritable HOME
# ------------------------------------------------------------------------------------------------------
UID = random.randint(100_000, 999_999)


def _setpriv(extra: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={UID}", "--regid=0", "--clear-groups", "--no-new-privs", *extra]


@pytest.fixture(scope="module")
def as_pod_user() -> list[str]:
    """The command prefix that runs a process as the pod's user: a random UID in group 0.

    Only root can switch users; a test run that is not root already is an unprivileged user and runs the
    commands as itself. Where the interpreter lies in a folder other users cannot enter (a Python under
    /root), the process keeps one capability, reading and listing any file (CAP_DAC_READ_SEARCH); it still
    cannot write anywhere its UID and group may not, which is what this test is about.
    """
    if os.getuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv (util-linux) to switch to an unprivileged user")
    # The interpreter must find its own standard library as this user, not a system Python's in its place.
    probe = [
        *_setpriv(["--inh-caps=-all"]),
        sys.executable,
        "-c",
        "import sys, kfp_components; print(sys.base_prefix)",
    ]
    seen = subprocess.run(probe, capture_output=True, text=True, cwd="/")
    if seen.returncode == 0 and seen.stdout.strip() == sys.base_prefix:
        return _setpriv(["--inh-caps=-all", "--bounding-set=-all"])
    return _setpriv(
        [
            "--inh-caps=-all,+dac_read_search",
            "--ambient-caps=+dac_read_search",
            "--bounding-set=-all,+dac_read_search",
        ]
    )


@pytest.fixture
def pod(as_pod_user) -> Iterator[dict[str, Path]]:
    """World-readable model and data, an unwritable HOME, and a TMPDIR and output folder the user owns."""
    top = Path(tempfile.mkdtemp(prefix="kfp-nonroot-"))
    try:
        top.chmod(0o755)
        folders = {name: top / name for name in ("home", "model", "out", "tmp")}
        folders["home"].mkdir(mode=0o555)
        shutil.copytree(tiny_model_path("qwen2", 0), folders["model"])
        for name in ("out", "tmp"):
            folders[name].mkdir(mode=0o770)
            if os.getuid() == 0:
                os.chown(folders[name], UID, 0)
        for path in [folders["model"], *folders["model"].rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield folders
    finally:
        shutil.rmtree(top, ignore_errors=True)


def run_as_pod_user(prefix: list[str], folders: dict[str, Path], command: list[str]) -> str:
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(folders["home"]),
        "TMPDIR": str(folders["tmp"]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
    }
    result = subprocess.run(
        [*prefix, *command], env=env, cwd=folders["out"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{command[:3]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout + result.stderr


EVALUATE = """
from kfp import dsl, local

from kfp_components.components.evaluation import evaluate_model

local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root="{root}")


@dsl.pipeline
def evaluate() -> dsl.Metrics:
    model = dsl.importer(artifact_uri="{model}", artifact_class=dsl.Model, reimport=False)
    return evaluate_model(
        model=model.output,
        tasks=["kfp_capitals", "held_out_capitals"],
        include_path="{tasks}",
        limit=2.0,
        batch_size="2",
        device="cpu",
        torch_dtype="float32",
    ).outputs["metrics"]


print("metrics:", sorted(evaluate().output.metadata))
"""
#: A custom task on local JSONL read with the ``datasets`` library, which caches it (in HF_DATASETS_CACHE).
HELD_OUT_TASK = """
task: held_out_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: What is the capital of {{{{country}}}}?\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.mark.slow
def test_front_doors_run_as_a_random_uid_with_an_unwritable_home(as_pod_user, pod):
    python = sys.executable
    caches = pod["tmp"] / f"kfp-components-{UID if os.getuid() == 0 else os.getuid()}"

    train = pod["out"] / "train"
    log = run_as_pod_user(
        as_pod_user,
        pod,
        [
            python,
            "-m",
            "kfp_components.trainer",
            "--model_name_or_path",
            str(pod["model"]),
            "--data_path",
            str(SAMPLES / "chat.jsonl"),
            "--output_dir",
            str(train),
            "--algorithm",
            "sft",
            "--max_steps",
            "2",
            "--effective_batch_size",
            "4",
            "--max_tokens_per_gpu",
            "512",
            "--max_seq_len",
            "256",
            "--torch_dtype",
            "float32",
        ],
    )
    # the process found HOME unwritable, said so once, and moved the caches under TMPDIR
    assert log.count("caches moved to writable folders") == 1
    assert (
        f"HF_HOME={caches / 'huggingface'} (unset; {pod['home']}/.cache/huggingface is not writable)" in log
    )
    assert (train / "summary.json").is_file()
    assert any(train.rglob("model.safetensors"))

    config = pod["out"] / "pipeline.yaml"
    small = {"max_steps": 2, "effective_batch_size": 4, "max_tokens_per_gpu": 512, "max_seq_len": 256}
    stage = {"dataset_name_or_path": str(SAMPLES / "chat.jsonl"), **small}
    config.write_text(
        json.dumps(
            {
                "model_name_or_path": str(pod["model"]),
                "output_dir": str(pod["out"] / "pipeline"),
                "torch_dtype": "float32",
                "stages": ["sft"],
                "stage_configs": {"sft": stage},
            }
        )
    )
    config.chmod(0o644)
    plan = run_as_pod_user(
        as_pod_user, pod, [str(Path(python).parent / "fnsft-pipeline"), "--config", str(config), "--dry_run"]
    )
    assert "nothing was trained" in plan and not (pod["out"] / "pipeline").exists()

    tasks = pod["out"] / "tasks"
    tasks.mkdir()
    data = ROOT / "kfp_components" / "evaluation" / "tasks" / "capitals.jsonl"
    (tasks / "held_out_capitals.yaml").write_text(HELD_OUT_TASK.format(data=data))
    script = pod["out"] / "evaluate.py"
    root = pod["out"] / "pipeline-root"
    script.write_text(EVALUATE.format(root=root, model=pod["model"], tasks=tasks))
    for path in (tasks, tasks / "held_out_capitals.yaml", script):
        path.chmod(0o755 if path.is_dir() else 0o644)
    printed = run_as_pod_user(as_pod_user, pod, [python, str(script)])
    assert "kfp_capitals_acc" in printed and "held_out_capitals_acc" in printed
    (results,) = root.rglob("results.json")
    assert json.loads(results.read_text())["results"]["kfp_capitals"]
    # the datasets library cached the custom task's data under TMPDIR, not in the unwritable HOME
    assert (caches / "huggingface" / "datasets" / "json").is_dir()
    assert list(pod["home"].iterdir()) == []
