"""What a backend's unsolicited report means for a task's state.

A report names a task id and, when there is one, the process it is about. A task id
outlives its processes (RECOVER relaunches a task under the same id), so a report is
first matched to the task's *current* process: news about a process the controller
ended on purpose is expected, news about an earlier process is stale, and only news
about the current one changes the task. Getting this wrong is how a relaunched
task's death was once taken for a requested end, and the task shown DONE while the
environment stayed RUNNING.

Pure decisions on plain values; the controller applies them.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.lifecycle import task as tasksm
from corral.ports.backend import Report

NO_PID = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    """The task event to apply (None: nothing changes), the task's pid afterwards (None:
    unchanged, NO_PID: it has no process any more), and the reason. An event that
    leaves an ended task's state as it is (EXITED on ERROR) still records the pid."""

    event: str | None
    pid: int | None = None
    reason: str | None = None
    expected: bool = False  # the end of a process the controller was ending


IGNORE = Verdict(None)
ENDED = Verdict("EXITED", NO_PID, None, expected=True)  # its current process, as asked
ENDED_BEFORE = Verdict(None, expected=True)  # a process it had before, as asked


def judge(r: Report, *, state: str, pid: int | None, direct: bool, ending: int | None) -> Verdict:
    """The meaning of report ``r`` for a task in ``state`` whose current process is
    ``pid`` (None: not known yet) and whose process ``ending`` is being ended on
    purpose (None: none)."""
    if r.kind == "exited" and r.pid is not None and r.pid == ending:
        if pid == r.pid and state != tasksm.PENDING:
            return ENDED
        return ENDED_BEFORE
    if r.pid is not None and pid is not None and r.pid != pid:
        return IGNORE  # about a process this task had before
    alive = state in tasksm.ALIVE
    if r.kind == "exited":
        if not alive:  # the process of a task that failed or ended is gone now
            ok = pid is not None and state != tasksm.PENDING
            return Verdict("EXITED", NO_PID) if ok else IGNORE
        if not direct and r.code == 0:
            return Verdict("EXITED", NO_PID, "finished")
        return Verdict("FAIL", NO_PID, r.reason or "process ended")
    if r.kind == "lost":
        return Verdict("LOSE", NO_PID, r.reason or "lost") if alive else IGNORE
    if r.kind == "error":  # its process may live on: keep it known, to be ended
        known = r.pid if pid is None else None
        return Verdict("FAIL", known, r.reason or "error") if alive else IGNORE
    return IGNORE
