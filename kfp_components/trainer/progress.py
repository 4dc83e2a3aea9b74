"""Step metrics as JSONL, a summary JSON, and progress: a bar in a terminal, plain log lines in a pod."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("kfp_components.trainer")


class MetricsLog:
    """Appends one JSON object per optimizer step to ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path, enabled: bool, *, truncate_after_step: int | None = None):
        self.path = path
        self.enabled = enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            if truncate_after_step is not None and path.exists():
                # a resumed run rewrites the steps after its checkpoint, so the file stays one clean series
                kept = [
                    line
                    for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= truncate_after_step
                ]
                path.write_text("".join(line + "\n" for line in kept))
            elif truncate_after_step is None:
                path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(record) + "\n")


class Progress:
    """A tqdm bar when stderr is a terminal; otherwise a log line every ``every`` steps."""

    def __init__(self, total_steps: int, *, enabled: bool, every: int = 1, initial: int = 0):
        self.total = total_steps
        self.every = max(1, every)
        self.enabled = enabled
        self.started = time.monotonic()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=initial, desc="training", unit="step", dynamic_ncols=True
            )

    def update(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        elif step % self.every == 0 or step == self.total:
            log.info(
                "step %d/%d loss %.4f lr %.3g grad_norm %.3f tokens/s %.0f",
                step,
                self.total,
                record["loss"],
                record["lr"],
                record["grad_norm"],
                record["tokens_per_second"],
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
