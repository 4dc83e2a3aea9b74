"""An exclusive lock on an output folder, so two runs never write into the same one.

``hold_folder_lock(folder)`` takes an OS advisory lock (``fcntl.flock``) on ``<folder>/.lock`` and writes
who holds it (pid, host, since when, what) into the file. The lock belongs to the open file: the OS releases
it when the holder exits, however it exits (``kill -9`` included), so a lock file left behind by a dead
process never blocks anyone; only a live holder does. A second process that asks for a held lock gets
:class:`FolderLockedError` at once, naming the holder.

Within one process the lock is re-entrant: ``fnsft-train`` holds its output folder while it prepares the
data and the training engine takes the same lock again; a pipeline stage trained in the pipeline's own
process may share the pipeline's folder. flock works on local file systems and on NFS (the Linux client maps
it to NFS byte-range locks), which covers a ReadWriteMany volume shared by the nodes of a TrainJob.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kfp_components.typed_config import ConfigError

LOCK_FILE = ".lock"
#: How long to wait for a holder that has just taken the lock to write who it is.
_HOLDER_WAIT_S = 1.0


class FolderLockedError(ConfigError):
    """Another live process holds the folder's lock; ``holder`` says who (empty when it could not be read)."""

    def __init__(self, key: str, folder: Path, holder: dict[str, object]):
        self.folder = folder
        self.holder = holder
        super().__init__(
            key,
            f"{folder} is in use by another run ({describe_holder(holder)}); wait for it "
            "to finish or stop it, or choose another folder",
        )


@dataclass
class _Held:
    fd: int
    count: int


_held: dict[str, _Held] = {}
_guard = threading.Lock()


@contextlib.contextmanager
def hold_folder_lock(folder: str | Path, *, purpose: str, key: str = "output_dir") -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if missing) for the duration of the block.

    ``purpose`` says what holds it (``training``, ``pipeline``) in the lock file and in others' errors;
    ``key`` is the option named in the error. Raises :class:`FolderLockedError` when another process holds
    it, and :class:`ConfigError` when the lock file cannot be created.
    """
    path = acquire_folder_lock(folder, purpose=purpose, key=key)
    try:
        yield path
    finally:
        release_folder_lock(folder)


def acquire_folder_lock(folder: str | Path, *, purpose: str, key: str = "output_dir") -> Path:
    """Take the lock of ``folder`` (see :func:`hold_folder_lock`); pair each call with
    :func:`release_folder_lock`. Returns the lock file's path."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(key, f"{folder}: cannot create the folder: {exc.strerror or exc}") from None
    lock_path = folder / LOCK_FILE
    name = _key(folder)
    with _guard:
        held = _held.get(name)
        if held is not None:
            held.count += 1
            return lock_path
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise ConfigError(
                key, f"{lock_path}: cannot create the lock file: {exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(key, f"{lock_path}: cannot lock: {exc.strerror or exc}") from None
            raise FolderLockedError(key, folder, _read_holder(lock_path)) from None
        _write_holder(fd, purpose)
        _held[name] = _Held(fd, 1)
    return lock_path


def release_folder_lock(folder: str | Path) -> None:
    """Give back one hold of ``folder``'s lock; the last one unlocks it (the file stays: it is harmless)."""
    name = _key(Path(folder))
    with _guard:
        held = _held.get(name)
        if held is None:
            return
        held.count -= 1
        if held.count == 0:
            del _held[name]
            os.close(held.fd)  # closing the last descriptor releases the flock


def describe_holder(holder: dict[str, object]) -> str:
    """``pid 123 on host h, training since 2024-05-01T10:00:00+0000``."""
    if not holder.get("pid"):
        return "a process that has not yet written who it is"
    text = f"pid {holder['pid']} on host {holder.get('host', '?')}"
    if holder.get("purpose"):
        text += f", {holder['purpose']}"
    if holder.get("since"):
        text += f" since {holder['since']}"
    return text


def _key(folder: Path) -> str:
    return str(folder.resolve())


def _write_holder(fd: int, purpose: str) -> None:
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "purpose": purpose,
    }
    data = (json.dumps(record) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _dead_here(record: dict[str, object]) -> bool:
    """The record names a process of this host that no longer exists (a stale record being replaced)."""
    if record.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(str(record["pid"])), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        return False
    return False


def _read_holder(lock_path: Path) -> dict[str, object]:
    """The holder's record; a holder that has just taken the lock may not have written it yet: wait briefly."""
    deadline = time.monotonic() + _HOLDER_WAIT_S
    while True:
        try:
            record = json.loads(lock_path.read_text(encoding="utf-8"))
            if isinstance(record, dict) and record.get("pid") and not _dead_here(record):
                return record
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.05)
