"""The OSFT pipeline as its specification (../shared/seeds/osft-pipeline.md) describes it: parameter names and
defaults, the Kubernetes secrets and their keys, and the usage lines. The expected values are written out
here, so the test runs in any clone; where the specification is at hand, they are checked against it too."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT.parent / "shared" / "seeds" / "osft-pipeline.md"
COMPILED = ROOT / "pipelines" / "training" / "osft" / "pipeline.yaml"

#: The Key Parameters table: name -> default (None: required).
PARAMETERS = {
    "phase_01_dataset_man_data_uri": None,
    "phase_02_train_man_train_model": "Qwen/Qwen2.5-1.5B-Instruct",
    "phase_02_train_man_train_batch": 128,
    "phase_02_train_man_train_epochs": 1,
    "phase_02_train_man_train_unfreeze": 0.25,
    "phase_02_train_man_train_tokens": 64000,
    "phase_02_train_man_train_workers": 1,
    "phase_02_train_man_train_gpu": 1,
    "phase_02_train_opt_use_liger": True,
    "phase_03_eval_man_eval_tasks": ["arc_easy"],
    "phase_04_registry_man_address": "",
}
#: The Required Kubernetes Secrets table: secret -> keys.
SECRETS = {
    "kubernetes-credentials": {"server_url", "auth_token"},
    "minio-secret": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
    "hf-token": {"HF_TOKEN"},
}


def compiled() -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all(COMPILED.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.mark.skipif(not SEED.exists(), reason="the specification is not at hand (../shared/seeds)")
def test_the_expectations_here_are_the_specifications():
    text = SEED.read_text()
    rows = re.findall(r"^\| `(phase_\w+)` \| (.+?) \|", text, re.M)
    seed_defaults = {
        name: None if default == "-" else yaml.safe_load(default.strip("`")) for name, default in rows
    }
    assert seed_defaults == PARAMETERS
    secrets_table = text[text.index("## Required Kubernetes Secrets") :]
    secrets = re.findall(r"^\| `([\w-]+)`(?: \(optional\))? \| (.+?) \|", secrets_table, re.M)
    assert {name: set(re.findall(r"`(\w+)`", keys)) for name, keys in secrets} == SECRETS
    assert "from kfp_components.pipelines.training.osft import osft_pipeline" in text
    assert "python -m pipelines.training.osft.pipeline" in text
    assert 'kfp pipeline upload -p "OSFT Training" pipelines/training/osft/pipeline.yaml' in text


def test_parameter_names_and_defaults():
    spec, _ = compiled()
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    for name, default in PARAMETERS.items():
        assert name in parameters, name
        if default is None:
            assert "defaultValue" not in parameters[name] and not parameters[name].get("isOptional")
        else:
            assert parameters[name]["defaultValue"] == default, name


def test_secrets_and_their_keys():
    _, executors = compiled()
    mounted: dict[str, set[str]] = {}
    for executor in executors.values():
        for secret in executor.get("secretAsEnv", []):
            mounted.setdefault(secret["secretName"], set()).update(k["secretKey"] for k in secret["keyToEnv"])
            if secret["secretName"] != "model-registry-token":
                assert secret["optional"], f"{secret['secretName']} must not be required to start a run"
    for name, keys in SECRETS.items():
        assert keys <= mounted[name], name


def test_usage_lines(tmp_path):
    """The import and compile of the Usage section from an empty folder, as a user of the installed package
    runs it, and the `python -m` line from the repository root; the YAML is what `kfp pipeline upload` reads."""
    script = (
        "from kfp_components.pipelines.training.osft import osft_pipeline\n"
        "from kfp import compiler\n"
        'compiler.Compiler().compile(osft_pipeline, "osft_pipeline.yaml")\n'
    )
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True, capture_output=True)
    written = yaml.safe_load_all((tmp_path / "osft_pipeline.yaml").read_text())
    assert next(written)["pipelineInfo"]["name"] == "osft-fine-tuning"
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.training.osft.pipeline"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0 and Path(result.stdout.strip()) == COMPILED
