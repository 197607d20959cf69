"""How a process ended, said the same way by every backend."""

from __future__ import annotations

import signal


def describe_status(code: int) -> str:
    """'exited with status 3' or 'killed by signal 9 (SIGKILL)' (code < 0: a signal)."""
    if code >= 0:
        return f"exited with status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "unknown"
    return f"killed by signal {-code} ({name})"
