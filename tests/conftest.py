"""Shared fixtures. Nothing here reaches the internet: every server runs on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

# No test may reach the Hugging Face Hub; tests that talk to the local Hub server unset these themselves.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`make test` runs one worker per core) each worker computes on one thread, and so do the
# processes it starts: two workers with a thread per core each would fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

SAMPLES = Path(__file__).resolve().parents[1] / "kfp_components" / "data" / "samples"


def pytest_report_header(config: pytest.Config) -> list[str]:
    """What the cluster-facing tests check requests against (reference files, or the official models)."""
    from doubles import reference

    return reference.describe()


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def chat(user: str = "Hi?", assistant: str = "Hello.") -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


@pytest.fixture(autouse=True)
def _signal_handlers_left_as_found():
    """Every test leaves the SIGINT and SIGTERM handlers as it found them: the trainer and the launchers
    install their own while they run and must put the previous ones back."""
    numbers = (signal.SIGINT, signal.SIGTERM)
    before = {number: signal.getsignal(number) for number in numbers}
    yield
    changed = [signal.Signals(n).name for n in numbers if signal.getsignal(n) != before[n]]
    assert not changed, f"the test left the {' and '.join(changed)} handler changed"


@pytest.fixture(scope="session")
def s3():
    from doubles.s3_server import s3_server

    with s3_server() as server:
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The environment of a pod whose S3 secret points at the local S3 server."""
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3.environ().items():
        monkeypatch.setenv(name, value)
    return s3
