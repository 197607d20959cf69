"""What runs on this machine, by the markers corral puts in every task's environment."""

from __future__ import annotations

import os


def _environ(pid: str) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return fh.read().split(b"\0")
    except OSError:
        return None


def _zombie(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def with_marker(key: str, value: str) -> list[int]:
    """Live processes whose environment says ``key=value`` (zombies left out)."""
    needle = f"{key}={value}".encode()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        env = _environ(d)
        if env is not None and needle in env and not _zombie(d):
            out.append(int(d))
    return out


def marked(task_id: str) -> list[int]:
    """Live processes of one task (its own and every descendant that kept the marker)."""
    return with_marker("CORRAL_TASK_ID", task_id)


def of_environment(env_id: str) -> list[int]:
    """Live processes of any task of an environment."""
    return with_marker("CORRAL_ENVIRONMENT_ID", env_id)
