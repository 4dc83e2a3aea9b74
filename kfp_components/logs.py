"""Logging set-up shared by the components and the command-line entry points."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str | int = "INFO") -> None:
    """Plain, timestamped log lines on stderr: readable in a terminal and in a pod's log."""
    root = logging.getLogger()
    if not root.handlers:  # a host that set up logging already (the KFP executor, pytest) keeps its own
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "filelock", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
