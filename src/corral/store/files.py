"""Files read from the local filesystem: templates (the expander's ``Sources``) and
tasks' logs.

Reads are bounded (a template larger than ``MAX_TEMPLATE_BYTES`` is refused) and
text must be UTF-8; anything else is reported as a missing or unreadable file by
the expander, never as a crash.
"""

from __future__ import annotations

import errno
import os
import stat

MAX_TEMPLATE_BYTES = 8 * 1024 * 1024


class DiskSources:
    """Reads template files relative to the current directory."""

    def __init__(self) -> None:
        self.problems: dict[str, str] = {}

    def read(self, path: str) -> str | None:
        try:
            if not os.path.isfile(path):
                return None
            if os.path.getsize(path) > MAX_TEMPLATE_BYTES:
                self.problems[path] = f"larger than {MAX_TEMPLATE_BYTES} bytes"
                return None
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            self.problems[path] = str(e)
            return None


# -- tasks' log files --------------------------------------------------------------------------

MAX_LOG_READ = 1 << 20  # bytes of a log read at once (its end, for its last lines)


class NotALog(OSError):
    """A log path that is not a regular file (a task may put anything there)."""


def open_log(path: str) -> int:
    """A task's log file opened to read (a descriptor): a regular file, not reached
    through a symlink at its end, never blocking (a FIFO, a device or a link to
    /etc/shadow are refused with NotALog; a missing file is FileNotFoundError)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotALog(f"{os.path.basename(path)} is a symbolic link, not a log") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotALog(f"{os.path.basename(path)} is not a regular file")
    return fd


def read_log(fd: int, offset: int, most: int = MAX_LOG_READ) -> bytes:
    """At most ``most`` bytes of an open log from ``offset``."""
    return os.pread(fd, most, offset)


def tail_log(path: str, lines: int) -> list[str]:
    """The last ``lines`` lines of a log file, reading at most its last MAX_LOG_READ
    bytes (none: no file yet). NotALog when it is not a regular file."""
    return read_lines(path, None, lines)[0]


def read_lines(
    path: str, after: int | None, lines: int = 0, whole: bool = False
) -> tuple[list[str], int]:
    """A log's lines, and the offset (bytes) after the last one given, to ask from next:
    with ``after`` None its last ``lines`` lines (a last one still being written too);
    else the lines written after ``after`` (at most MAX_LOG_READ bytes of them; a file
    now shorter than ``after`` was cut, and is read from its start), complete ones only
    unless ``whole`` (the log is final). NotALog when it is not a regular file."""
    try:
        fd = open_log(path)
    except FileNotFoundError:
        return [], 0
    try:
        size = os.fstat(fd).st_size
        if after is None:
            data = read_log(fd, max(0, size - MAX_LOG_READ))
            return data.decode("utf-8", "replace").splitlines()[-lines:], size
        if after > size:
            after = 0
        data = read_log(fd, after)
    finally:
        os.close(fd)
    end = data.rfind(b"\n") + 1
    if whole or (end == 0 and len(data) >= MAX_LOG_READ):  # (an endless line: in parts)
        end = len(data)
    return data[:end].decode("utf-8", "replace").splitlines(), after + end
