"""A clean stop on SIGINT or SIGTERM: finish the current step, save a checkpoint, exit.

While :class:`StopOnSignal` is active, the first SIGINT or SIGTERM only asks the loop to stop; the loop
asks :meth:`StopOnSignal.requested` at the end of every step (all ranks together: one all-reduce, so every
rank stops after the same step whichever rank got the signal), saves a checkpoint when checkpointing is on
and raises :class:`TrainingInterrupted`. The handlers that were there before come back at once, so a second
signal acts as it would have without this (Ctrl-C twice stops at once).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads with the training loop, not with the command line
    from kfp_components.trainer.distributed import DistInfo

log = logging.getLogger("kfp_components.trainer")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal; ``exit_code`` is the shell's code for it (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, signal_number: int, message: str):
        self.signal_number = signal_number
        self.exit_code = 128 + signal_number
        super().__init__(message)


class StopOnSignal:
    """Turn SIGINT and SIGTERM into a stop request for the training loop (main thread only; elsewhere it
    does nothing and signals act as before)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._restore()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        self.received = number
        self._restore()  # a second signal acts as it would have without us
        log.warning(
            "%s received: stopping after the current step (send it again to stop at once)",
            signal.Signals(number).name,
        )

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def requested(self, info: DistInfo) -> int | None:
        """The signal number when any rank received a signal, else None; every rank must call it at the same
        point of the loop."""
        received = float(self.received or 0)
        if info.distributed:
            from kfp_components.trainer.distributed import all_reduce_max

            received = all_reduce_max(received, info.device)
        return int(received) or None
