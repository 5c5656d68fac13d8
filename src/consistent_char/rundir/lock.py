"""The lock that keeps a run directory to one writer: ``.lock``, flocked, holding its pid."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from consistent_char.errors import RunLockedError

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]


class RunLock:
    """Holds a run directory for one writer: ``.lock`` holds the writer's pid.

    The lock is an `fcntl.flock` on that file, which the kernel releases when its process ends,
    however it ends: the lock of a process that was killed is taken over by the next run, and
    two live writers can never both hold it. The file is removed on release.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Takes the lock or raises `RunLockedError` naming the process that holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                self._lock(fd)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise self.locked_error(self.root, holder) from None
            except BaseException:
                os.close(fd)
                raise
            # The previous holder removes the file as it releases it: a lock on a file that is
            # no longer at `path` holds nothing, so try again.
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                os.close(fd)
                continue
            if os.path.samestat(os.fstat(fd), current):
                break
            os.close(fd)
        previous = _read_pid(fd)
        if previous is not None and previous != os.getpid():
            logger.info(
                "taking over the lock of %s from process %s, which ended", self.root, previous
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def holder(self) -> int | str | None:
        """The pid of the live process holding the lock (``"unknown"`` if it wrote none yet),
        or ``None`` when the run is free; takes nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            if fcntl is None:
                pid = _read_pid(fd)
                return pid if pid is not None and _alive(pid) else None
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                return "unknown" if pid is None else pid
            return None
        finally:
            os.close(fd)  # also drops the shared lock taken to test it

    @staticmethod
    def locked_error(root: Path, holder: int | str | None) -> RunLockedError:
        """The error for a run that process `holder` is writing."""
        return RunLockedError(
            f"{root} is being written by another run (process {holder or 'unknown'}); wait for "
            "it to end or stop it: two runs writing one folder would mix their files"
        )

    def release(self) -> None:
        """Removes ``.lock`` and lets the lock go; nothing when it is not held."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(fd)  # closing releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    @staticmethod
    def _lock(fd: int) -> None:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        # Without flock: the pid in the file decides (a dead pid's lock is taken over).
        pid = _read_pid(fd)
        if pid is not None and pid != os.getpid() and _alive(pid):
            raise BlockingIOError


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
