"""One run per profile: ``runs/<profile>/.lock``.

The lock is an exclusive ``flock`` on that file, held for the whole run; the kernel releases it
when the holder ends, however it ends (``kill -9`` included), so a dead holder's lock is simply
taken over and the interrupted run resumes from its stage stamps. The file says who holds it
(PID, host, start time, command line), so a second run refuses with the holder named.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another live run holds the profile's lock; ``holder`` is what its lock file says."""

    def __init__(self, path: Path, holder: dict):
        self.path, self.holder = path, holder
        argv = " ".join(holder.get("argv", [])) or "?"
        super().__init__(f"{path.parent} is in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')} "
                         f"(started {holder.get('started', '?')}: {argv}); wait for it to finish or end it")


class RunLock:
    """``with RunLock(runs_dir): ...`` -- raises :class:`RunLockedError` when held by a live run."""

    def __init__(self, runs_dir: str | Path, argv: list[str] | None = None):
        self.path = Path(runs_dir) / LOCK_NAME
        self.argv = list(sys.argv if argv is None else argv)
        self._fd: int | None = None
        self.took_over: dict | None = None

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(self.path, self._holder()) from None
        previous = self._holder()
        if previous.get("pid") and previous.get("pid") != os.getpid():
            self.took_over = previous  # its holder ended without releasing the file's content
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "argv": self.argv}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
