"""What a long-lived corral process does to itself at start, for the processes of its
user: it becomes non-dumpable (``prctl(PR_SET_DUMPABLE, 0)``), so that its
``/proc/PID/environ`` (``CORRAL_TOKEN``, credentials) and memory are readable by root
only, not by the tasks it starts, which run as the same user. Tasks are dumpable again
(``execve`` resets it): this is about the server and the node agent only."""

from __future__ import annotations

import logging

PR_SET_DUMPABLE = 4
log = logging.getLogger("corral")


def private_process() -> None:
    """Make this process non-dumpable (Linux); said in the log when it cannot be."""
    import ctypes  # (here: ~40 ms to import, for the long-lived commands only)

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE) failed")
    except (OSError, AttributeError) as e:  # not Linux, or no prctl
        log.warning("could not make this process non-dumpable: %s", e)


__all__ = ["private_process"]
