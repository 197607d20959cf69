"""One control process per data directory.

A control process (``corral serve``, ``corral run``) holds an exclusive ``flock`` on
``DATA/corral.lock`` for as long as it runs; the file says its pid and command. A second
one on the same directory is refused with that pid, instead of taking the first one's
environments for a dead process's leftovers and ending them. The kernel drops the lock
when its holder dies, however it dies, so a crash never leaves the directory locked.
Readers (``corral events --data``) take no lock.
"""

from __future__ import annotations

import fcntl
import os


class DataDirInUse(Exception):
    """Another control process holds this data directory; str() says which."""


class DataLock:
    def __init__(self, data_dir: str, what: str, *, name: str = "corral.lock") -> None:
        """``name``: the lock file; the node agent of a directory holds its own."""
        self.path = os.path.join(data_dir, name)
        self.role = "control" if name == "corral.lock" else "node agent"
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "?"
            os.close(fd)
            raise DataDirInUse(
                f"the data directory {os.path.dirname(self.path)} is in use by another "
                f"{self.role} process ({holder}); stop it, or use another --data"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {self.what}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self) -> DataLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
