"""``<output_dir>/pipeline_state.json``: which stages finished, from what, with what result.

One entry per stage, keyed by its name. ``status`` is ``finished`` (with the stage's result), ``failed``
(with the error) or ``running`` (a run that was killed). A finished entry is reused by a later run when the
stage's fingerprint (its options and its input) is unchanged. The file is rewritten atomically after every
change, so a crash never leaves it half written. What it holds is written without credentials (an error that
quotes a signed URL, say, is kept with ``***`` in their place; see :func:`kfp_components.redaction.redact_record`);
the fingerprint is a digest, never the options themselves.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kfp_components.redaction import redact_record
from kfp_components.stages.base import StageResult

STATE_FILE = "pipeline_state.json"
STATE_VERSION = 1


class PipelineError(RuntimeError):
    """The pipeline could not run (other than a bad config, which is a ``ConfigError``)."""


class PipelineState:
    """The stages' entries of one pipeline output folder."""

    def __init__(self, path: Path, stages: dict[str, dict[str, Any]] | None = None):
        self.path = path
        self.stages: dict[str, dict[str, Any]] = stages or {}

    @classmethod
    def load(cls, output_dir: str | Path) -> PipelineState:
        """The state in ``output_dir``; empty when there is none yet."""
        path = Path(output_dir) / STATE_FILE
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PipelineError(
                f"{path}: cannot read the pipeline state ({exc}); delete it to start over"
            ) from None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise PipelineError(
                f"{path}: not a version {STATE_VERSION} pipeline state; delete it to start over"
            )
        return cls(path, dict(data.get("stages", {})))

    def entry(self, name: str) -> dict[str, Any] | None:
        return self.stages.get(name)

    def finished(self, name: str) -> dict[str, Any] | None:
        """The stage's entry if it finished, else None."""
        entry = self.stages.get(name)
        return entry if entry and entry.get("status") == "finished" else None

    def result(self, name: str) -> StageResult:
        """The result a finished stage recorded."""
        entry = self.finished(name)
        if entry is None:
            raise KeyError(name)
        return StageResult.from_dict(entry)

    def forget(self, names: Iterable[str]) -> None:
        for name in names:
            self.stages.pop(name, None)

    def start(self, name: str, fingerprint: str, input_model: str, output_dir: str) -> None:
        self.stages[name] = {
            "stage_name": name,
            "status": "running",
            "fingerprint": fingerprint,
            "input_model": input_model,
            "output_dir": output_dir,
            "started_at": _now(),
        }

    def finish(self, name: str, result: StageResult, duration_seconds: float) -> None:
        entry = self.stages[name]
        entry.update(dataclasses.asdict(result))
        entry.update(status="finished", finished_at=_now(), duration_seconds=round(duration_seconds, 3))

    def fail(self, name: str, error: str) -> None:
        self.stages[name].update(status="failed", finished_at=_now(), error=error)

    def save(self) -> None:
        """Write the state, without credentials, atomically (a temporary file in the same folder, then a
        rename)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stages = redact_record(self.stages)
        text = json.dumps({"version": STATE_VERSION, "stages": stages}, indent=2, allow_nan=False)
        handle, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(text + "\n")
            os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
