"""Finding and ending a task's processes by the marker every one of them carries.

Every task process starts with ``CORRAL_ENVIRONMENT_ID`` and ``CORRAL_TASK_ID`` in its
environment, and its descendants inherit them. Ending a task's process group ends
what stayed in the group; a descendant that left it (``setsid``, a double fork, a
daemon) still carries the marker, and is found here by reading ``/proc/PID/environ``.
The same scan finds what a control process that died left running.

A process is signalled through a pidfd opened *before* its marker is checked, so a pid
that was reused meanwhile is never signalled. What is not found: a process that
cleared its environment and left the session, or one run by another user (when the
control process is not root). Cgroups would catch those; corral does not use them
(they need a delegated, writable cgroup v2 subtree, which containers and shared
login nodes rarely give).

One scan reads every process's environment: about 10-20 µs a process. Callers batch
(one scan per node batch, off the event loop), never one per task.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Collection

TASK_KEY = b"CORRAL_TASK_ID="
ENV_KEY = b"CORRAL_ENVIRONMENT_ID="
AGENT_KEY = b"CORRAL_AGENT="


def _markers(pid: int) -> tuple[str | None, str | None, str | None] | None:
    """(environment id, task id, agent) of a process, or None when it has none or is
    gone."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    if b"CORRAL_" not in data:
        return None
    env_id = task_id = agent = None
    for item in data.split(b"\0"):
        if item.startswith(TASK_KEY):
            task_id = item[len(TASK_KEY) :].decode("utf-8", "replace")
        elif item.startswith(ENV_KEY):
            env_id = item[len(ENV_KEY) :].decode("utf-8", "replace")
        elif item.startswith(AGENT_KEY):
            agent = item[len(AGENT_KEY) :].decode("utf-8", "replace")
    if env_id is None and task_id is None:
        return None
    return env_id, task_id, agent


def _wanted(
    m: tuple[str | None, str | None, str | None] | None,
    tasks: Collection[str],
    environments: Collection[str],
    agents: Collection[str],
) -> bool:
    if m is None:
        return False
    env_id, task_id, agent = m
    return (
        (task_id is not None and task_id in tasks)
        or (env_id is not None and env_id in environments)
        or (agent is not None and agent in agents)
    )


def find(
    *,
    tasks: Collection[str] = (),
    environments: Collection[str] = (),
    agents: Collection[str] = (),
) -> list[int]:
    """Pids of the live processes that carry one of these task, environment or agent
    ids (an agent marks every process it starts with ``CORRAL_AGENT``)."""
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if pid in (me, 1):
            continue
        if _wanted(_markers(pid), tasks, environments, agents):
            out.append(pid)
    return out


def end(
    *,
    tasks: Collection[str] = (),
    environments: Collection[str] = (),
    agents: Collection[str] = (),
) -> int:
    """SIGKILL every process carrying one of these task, environment or agent ids (and
    the process group each one leads); returns how many were signalled."""
    if not tasks and not environments and not agents:
        return 0
    ended = 0
    for pid in find(tasks=tasks, environments=environments, agents=agents):
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue  # gone already
        try:
            # still the process we found, now that we hold it
            if not _wanted(_markers(pid), tasks, environments, agents):
                continue
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                ended += 1
            with contextlib.suppress(OSError):
                if os.getpgid(pid) == pid:
                    os.killpg(pid, signal.SIGKILL)
        finally:
            os.close(fd)
    return ended
