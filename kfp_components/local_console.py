"""A readable console for ``kfp.local`` runs: the full log goes to a file, the terminal gets the progress.

``kfp.local`` prints every task's executor input, output JSON and library chatter to ``sys.stdout``
(hundreds of lines for one pipeline). :func:`condensed_console` writes all of it to a log file and shows
only the stages (``[2/5] train-model``), the training steps (``step 3/15  loss 6.5520``), a few result lines
and, when a task fails, the end of the log with the log's path.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Executing task '([\w-]+)'")
_FINISHED = re.compile(r"Task '([\w-]+)' finished with status (\w+)")
#: A trainer step line: under the trainer's logger name, or as the KFP executor's log handler prints it
#: (the local backend re-logs the training process's lines, so the host's format applies).
_STEP = re.compile(r"(?:kfp_components\.trainer: |INFO\]: )step (\d+)/(\d+) loss (\S+)")
#: Our own log messages worth a line on the console, by the text they start with (after the logger's name).
_RESULTS = re.compile(
    r"INFO\]: (?:\S+ INFO kfp_components[\w.]*: )?("
    r"dataset: \w+ format, .*|training \w+: \d+ steps.*|done: \d+ steps.*|evaluating .*|"
    r"Model Registry address is empty.*|registered .*)$"
)


class CondensedConsole(io.TextIOBase):
    """A text stream that logs every line to ``log`` and shows progress lines on ``terminal``."""

    def __init__(self, log: TextIO, terminal: TextIO, total_tasks: int, tail_lines: int = 40) -> None:
        self.log = log
        self.terminal = terminal
        self.total_tasks = total_tasks
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self.started: dict[str, float] = {}
        self.failed: list[str] = []
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.log.write(text)
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._line(_ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()

    def _show(self, text: str) -> None:
        self.terminal.write(text + "\n")
        self.terminal.flush()

    def _line(self, line: str) -> None:
        self.tail.append(line)
        if match := _STARTED.search(line):
            name = match.group(1)
            self.started[name] = time.monotonic()
            self._show(f"[{len(self.started)}/{self.total_tasks}] {name}")
        elif match := _FINISHED.search(line):
            name, status = match.groups()
            seconds = time.monotonic() - self.started.get(name, time.monotonic())
            self._show(f"      {name}: {status.lower()} in {seconds:.0f} s")
            if status != "SUCCESS":
                self.failed.append(name)
                self._show("      last lines of its log:")
                for previous in self.tail:
                    self._show(f"        {previous.strip()}")
        elif match := _STEP.search(line):
            step, total, loss = match.groups()
            self._show(f"      step {int(step):>{len(total)}}/{total}  loss {loss}")
        elif match := _RESULTS.search(line):
            self._show(f"      {match.group(1)}")


@contextlib.contextmanager
def condensed_console(
    log_path: Path, total_tasks: int, terminal: TextIO | None = None
) -> Iterator[CondensedConsole]:
    """Send ``sys.stdout`` and ``sys.stderr`` to ``log_path``; show the progress on the real stdout."""
    terminal = terminal or sys.stdout
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w", encoding="utf-8") as log:
        console = CondensedConsole(log, terminal, total_tasks)
        # Log handlers set up before the run hold the real stderr: point them at the log file too.
        handlers = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
        streams = [h.stream for h in handlers]
        for handler in handlers:
            handler.setStream(console)
        try:
            with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
                yield console
        finally:
            for handler, stream in zip(handlers, streams, strict=True):
                handler.setStream(stream)
            console.write("\n")
