"""The local training backend: the same training command a TrainJob runs, as a subprocess on this machine.

``kfp.local`` runs and ``make demo`` use it; on a cluster the ``trainjob`` backend runs the same command in
the trainer image under Kubeflow Trainer. The run's options travel as a YAML file written beside its
outputs (``<output_dir>/run.yaml``), so the command line stays short and holds no secret.

The subprocess's output is forwarded line by line to this process's log. A line of the engine's own log
(``12:00:01 INFO kfp_components.trainer: step 3/10 ...``) is logged again under its logger name and level
without its timestamp (the log here adds one), so it reads as if training ran in this process; anything else
(torchrun's messages, a traceback) is forwarded as it is.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import yaml

from kfp_components.trainer.config import TrainingConfig

log = logging.getLogger(__name__)

#: How many of the last output lines a failure message quotes.
TAIL_LINES = 40
#: A line of the engine's log (``kfp_components.logs.FORMAT``): time, level, logger name, message.
_LOG_LINE = re.compile(r"^\d{2}:\d{2}:\d{2} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.]+): (.*)$")


class LocalTrainingError(RuntimeError):
    """The training subprocess failed; the message quotes the last lines it printed."""


def write_run_config(config: TrainingConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(asdict(config), sort_keys=False))
    return path


def torchrun_command(
    config_path: str | Path, *, nproc_per_node: int = 1, python: str = sys.executable
) -> list[str]:
    """``torchrun`` on one node running the training engine with ``--config config_path``."""
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc_per_node}",
        "-m",
        "kfp_components.trainer",
        "--config",
        str(config_path),
    ]


def run_local_training(
    config: TrainingConfig, *, nproc_per_node: int = 1, timeout_s: float | None = None
) -> dict:
    """Train in a subprocess, streaming its output to the log; return the run's ``summary.json``.

    Raises :class:`LocalTrainingError` (with the last output lines) when training fails or times out. A
    SIGTERM to this process (a cancelled pipeline step) stops the subprocess too.
    """
    config.validate()
    output_dir = Path(config.output_dir)
    command = torchrun_command(
        write_run_config(config, output_dir / "run.yaml"), nproc_per_node=nproc_per_node
    )
    log.info("local backend: %s", " ".join(command[1:]))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    previous = signal.getsignal(signal.SIGTERM)

    def stop(signum, frame):  # a cancelled step: take the training processes down with us
        _terminate(process)
        raise LocalTrainingError("training cancelled (SIGTERM)")

    in_main_thread = _in_main_thread()
    if in_main_thread:
        signal.signal(signal.SIGTERM, stop)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            forward_child_line(line)
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _terminate(process)
        raise LocalTrainingError(
            f"training timed out after {timeout_s} s; last lines:\n" + "\n".join(tail)
        ) from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        if process.poll() is None:
            _terminate(process)
    if code != 0:
        raise LocalTrainingError(f"training failed (exit code {code}); last lines:\n" + "\n".join(tail))
    return json.loads((output_dir / "summary.json").read_text())


def forward_child_line(line: str) -> None:
    """Log a line of the training subprocess here, once: with the level and logger name of the subprocess's
    own log line and without its timestamp, or as it is when it is not a log line."""
    match = _LOG_LINE.match(line)
    if match is None:
        log.info("%s", line)
        return
    level, name, message = match.groups()
    logging.getLogger(name).log(logging.getLevelNamesMapping()[level], "%s", message)


def _terminate(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
