"""Step metrics as JSONL, a summary JSON, and progress: a bar in a terminal, plain log lines in a pod, and
``status.trainerStatus`` of the TrainJob where the Kubeflow Trainer runtime provides its status endpoint
(:mod:`kfp_components.trainer.status_report`)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kfp_components.trainer.tracking import Trackers

from kfp_components.trainer.status_report import StatusReporter

log = logging.getLogger("kfp_components.trainer")


class MetricsLog:
    """Appends one JSON object per optimizer step, and one per evaluation (``step``, ``epoch``,
    ``eval_loss``), to ``metrics.jsonl`` (main process only).

    A fresh run starts the file empty. A resumed run keeps what its checkpoint knows, the step records up to
    ``resumed_at`` and the evaluations in ``kept_evaluations`` (steps), and drops the rest (what the
    interrupted attempt wrote after its checkpoint, and a last line it left half written), so the file
    stays one clean series.

    Every record also goes to ``trackers`` (:class:`~kfp_components.trainer.tracking.Trackers`: TensorBoard,
    MLflow), which start from the records kept.
    """

    def __init__(
        self,
        path: Path,
        enabled: bool,
        *,
        resumed_at: int | None = None,
        kept_evaluations: Iterable[int] = (),
        trackers: Trackers | None = None,
    ):
        self.path = path
        self.enabled = enabled
        self.trackers = trackers
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resumed_at is None or not path.exists():
            path.write_text("")
            if trackers is not None:
                trackers.start([], resumed=False)
            return
        evaluations = set(kept_evaluations)
        kept, kept_records = [], []
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            try:
                record = json.loads(line) if line.strip() else None
            except ValueError:
                log.warning("%s:%d: not a JSON record (an interrupted write); dropped", path, number)
                continue
            if not isinstance(record, dict):
                continue
            step = record.get("step", 0)
            if ("eval_loss" in record and step in evaluations) or (
                "eval_loss" not in record and step <= resumed_at
            ):
                kept.append(line)
                kept_records.append(record)
        rewritten = path.with_name(path.name + ".partial")  # a kill mid-rewrite keeps the old file whole
        rewritten.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(rewritten, path)
        if trackers is not None:
            trackers.start(kept_records, resumed=True)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(record) + "\n")
            if self.trackers is not None:
                self.trackers.write(record)


def _online_text(record: dict[str, Any]) -> str:
    """Reward, KL and where the step's time went, for an online algorithm's log line."""
    return (
        f" reward {record.get('reward', math.nan):.4f} (std {record.get('reward_std', math.nan):.4f})"
        f" kl {record['kl']:.4f} completion length {record['completion_length_mean']:.1f}"
        f" generation {record['generation_seconds']:.1f} s, training {record['training_seconds']:.1f} s,"
    )


class Progress:
    """A tqdm bar when stderr is a terminal; otherwise a log line every ``every`` steps. When enabled (the
    main process) and the Trainer runtime injected its status endpoint (``KUBEFLOW_TRAINER_SERVER_URL``), the
    progress, ETA and the latest step's metrics also go there (:class:`StatusReporter`), and :meth:`close`
    reports 100 %."""

    def __init__(self, total_steps: int, *, enabled: bool, every: int = 1, initial: int = 0):
        self.total = total_steps
        self.every = max(1, every)
        self.enabled = enabled
        self.started = time.monotonic()
        self.step = initial
        self.bar = None
        self.status = (
            StatusReporter.from_environment(total_steps=total_steps, initial_step=initial)
            if enabled
            else None
        )
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=initial, desc="training", unit="step", dynamic_ncols=True
            )

    def update(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.step = step
        if self.status is not None:
            self.status.step(step, record)
        online = "reward" in record or "reward_none_share" in record  # grpo, rloo, reinforce_pp
        if self.bar is not None:
            self.bar.update(1)
            shown = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}"}
            if online:
                shown = {
                    "reward": f"{record.get('reward', math.nan):.4f}",
                    "kl": f"{record['kl']:.4f}",
                    **shown,
                }
            self.bar.set_postfix(shown)
        elif step % self.every == 0 or step == self.total:
            grad_norm = record["grad_norm"]
            log.info(
                "step %d/%d%s loss %.4f lr %.3g grad_norm %s tokens/s %.0f%s",
                step,
                self.total,
                _online_text(record) if online else "",
                record["loss"],
                record["lr"],
                "inf" if grad_norm is None else f"{grad_norm:.3f}",
                record["tokens_per_second"],
                f" loss_scale {record['loss_scale']:g}" if "loss_scale" in record else "",
            )
        if record.get("step_skipped"):
            log.warning(
                "step %d: fp16 gradients overflowed at loss scale %g; the step was skipped and the scale lowered",
                step,
                record["loss_scale"],
            )

    def close(self) -> None:
        """The run's steps are done."""
        if self.bar is not None:
            self.bar.close()
        if self.status is not None:
            self.status.finish(self.step)


@contextmanager
def no_transformers_progress_bars() -> Iterator[None]:
    """No progress bars from transformers ("Loading weights", "Writing model shards") while loading or saving
    a model: a pod's log keeps each bar's every redraw. The setting before is restored after."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
