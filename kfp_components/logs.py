"""Logging set-up shared by the components and the command-line entry points.

Every handler this package sets up, or finds on the root logger when it sets up logging, gets
:class:`RedactSecrets`: the last line of defence that takes URI credentials and the values of secret
environment variables out of each record (message, exception and stack) before any handler writes it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

from kfp_components.redaction import redact_text

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactSecrets(logging.Filter):
    """Rewrites a record in place without credentials (see :mod:`kfp_components.redaction`); drops nothing.

    The message is formatted once (``msg % args``) and redacted; a traceback is formatted into the record's
    ``exc_text`` (which formatters reuse) and redacted; so is ``stack_info``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it when a handler formats the record
            return True
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


def add_secret_filter(handlers: Iterable[logging.Handler]) -> list[logging.Handler]:
    """Give each of ``handlers`` a :class:`RedactSecrets` filter unless it has one; return those that got one
    now (so a caller can take it off again with :func:`remove_secret_filter`)."""
    added = []
    for handler in handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
            added.append(handler)
    return added


def remove_secret_filter(handlers: Iterable[logging.Handler]) -> None:
    """Take the :class:`RedactSecrets` filters off ``handlers``."""
    for handler in handlers:
        for found in [f for f in handler.filters if isinstance(f, RedactSecrets)]:
            handler.removeFilter(found)


def configure_logging(level: str | int = "INFO") -> None:
    """Plain, timestamped log lines on stderr: readable in a terminal and in a pod's log. Every handler of
    the root logger redacts secrets (:class:`RedactSecrets`)."""
    root = logging.getLogger()
    if not root.handlers:  # a host that set up logging already (the KFP executor, pytest) keeps its own
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
    add_secret_filter(root.handlers)
    root.setLevel(level if isinstance(level, int) else level.upper())
    for noisy in (
        "botocore",
        "boto3",
        "urllib3",
        "s3transfer",
        "filelock",
        "httpx",
        "httpcore",
        "httpx2",
        "httpcore2",
        "openai",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
