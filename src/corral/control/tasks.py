"""The tasks of one environment at run time: compact records, their indexes, and the one
place their states change.

How this runs. Plain data on the control plane's event loop; no I/O. Every state
change goes through ``TaskSet.apply``, which takes task *events* (READY, FAIL,
EXITED, ...) and looks the next state up in the task table of ``lifecycle.task``: an
illegal change raises. ``apply`` keeps the counts that decisions need current (tasks
by state, each top-level role's states, collection health, runs not yet at their end
of stream), so that no decision walks every task: a failure among 150,000 tasks is
decided in constant time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from corral.lifecycle import task as tasksm
from corral.lifecycle.failures import Collections
from corral.model.plan import Plan, TaskSpec
from corral.store.sqlite import TaskChange

NO_PID = 0  # in a change: the task has no process any more


@dataclass(slots=True, eq=False)
class RuntimeTask:
    """One task of a running environment: ~100 bytes, plus its shared spec."""

    idx: int
    id: str
    spec: TaskSpec
    node: str
    role: str  # the top-level role it belongs to (its path's first two parts)
    state: str = tasksm.PENDING
    pid: int | None = None
    reason: str | None = None
    eos: bool = False
    member: str | None = None  # the collection member (role path) it belongs to

    @property
    def hook(self) -> bool:
        return self.spec.trigger is not None

    @property
    def direct(self) -> bool:
        return self.spec.control == "direct"


# One change: the task, its event, its pid (None: unchanged, NO_PID: none any more),
# and the reason (None: none, or unchanged when the state does not change).
Change = tuple[RuntimeTask, str, int | None, str | None]


class TaskSet:
    """The tasks of one environment, by index, id, path and node, with their counts."""

    def __init__(self, env_id: str, plan: Plan, nodes: Sequence[str]) -> None:
        self.collections = Collections(plan.collections)
        self.tasks: list[RuntimeTask] = []
        self.by_id: dict[str, RuntimeTask] = {}
        self.by_path: dict[str, RuntimeTask] = {}
        self.by_node: dict[str, list[RuntimeTask]] = {}  # hook tasks left out
        self.counts: dict[str, int] = {}  # tasks by state, hook tasks left out
        # (state, critical) pairs per top-level role, and for the whole environment ("")
        self.pairs: dict[str, dict[tuple[str, bool], int]] = {"": {}}
        self.running_direct = 0  # direct tasks RUNNING
        self.running_no_eos = 0  # ... of which have not reported END_OF_STREAM
        roles: dict[str, str] = {}
        for i, spec in enumerate(plan.tasks):
            role = ".".join(spec.path.split(".", 2)[:2])
            t = RuntimeTask(i, f"{env_id}:{i}", spec, nodes[i], roles.setdefault(role, role))
            self.tasks.append(t)
            self.by_id[t.id] = t
            self.by_path[spec.path] = t
            if t.hook:
                continue
            t.member = self.collections.member_of(spec.collection, spec.path)
            self.by_node.setdefault(t.node, []).append(t)
            self._count(t, t.state, +1)

    # -- changes --------------------------------------------------------------------------

    def apply(
        self, node: str, env_id: str, changes: Iterable[Change]
    ) -> tuple[list[TaskChange], list[dict[str, Any]], list[RuntimeTask]]:
        """Apply task events; return the store rows, the events, and the tasks that
        just failed (went to ERROR or LOST). Raises IllegalTaskTransition on a change
        the task table does not allow (nothing of the batch is applied then)."""
        planned = []
        for t, event, pid, reason in changes:
            new = tasksm.next_state(t.state, event)
            if new == t.state and (pid is None or pid == (t.pid or NO_PID)):
                continue  # news that changes nothing
            planned.append((t, new, pid, reason))
        stored: list[TaskChange] = []
        groups: dict[str, list[str]] = {}
        singles: list[dict[str, Any]] = []
        failed: list[RuntimeTask] = []
        for t, new, pid, reason in planned:
            old = t.state
            if new != old:
                self._move(t, old, new)
                t.reason = reason
                if new in tasksm.FAILED:
                    failed.append(t)
            if pid is not None:
                t.pid = pid or None
            stored.append(TaskChange(t.idx, new, pid, t.reason))
            if new == old:
                continue  # only its process changed: stored, not announced
            if t.reason is not None:
                singles.append(task_event(env_id, t, new, reason=t.reason))
            else:
                groups.setdefault(new, []).append(t.spec.path)
        events: list[dict[str, Any]] = [
            {"kind": "task", "env": env_id, "node": node, "state": s, "count": len(p), "tasks": p}
            for s, p in groups.items()
        ]
        events.extend(singles)
        return stored, events, failed

    def restore(self, t: RuntimeTask, state: str, reason: str | None) -> None:
        """Load a task's state as a previous control process stored it (a take-over):
        not a transition, so the table is not consulted; the counts follow."""
        if state not in tasksm.STATES:
            raise ValueError(f"task {t.spec.path}: unknown stored state {state!r}")
        self._move(t, t.state, state)
        t.reason = reason

    def end_of_stream(self, t: RuntimeTask) -> None:
        if t.eos:
            return
        t.eos = True
        if t.direct and not t.hook and t.state == tasksm.RUNNING:
            self.running_no_eos -= 1

    def all_end_of_stream(self) -> bool:
        """Every direct task that runs has said END_OF_STREAM (and one does run)."""
        return self.running_direct > 0 and self.running_no_eos == 0

    def _move(self, t: RuntimeTask, old: str, new: str) -> None:
        if t.hook:
            t.state = new
            return
        self._count(t, old, -1)
        if old == tasksm.RUNNING or new == tasksm.PENDING:
            t.eos = False  # a new run, or a new process, starts its stream anew
        t.state = new
        self._count(t, new, +1)
        if t.member is not None and (old in tasksm.FAILED) != (new in tasksm.FAILED):
            assert t.spec.collection is not None
            self.collections.changed(
                t.spec.collection, t.member, old in tasksm.FAILED, new in tasksm.FAILED
            )

    def _count(self, t: RuntimeTask, state: str, n: int) -> None:
        self.counts[state] = self.counts.get(state, 0) + n
        if not self.counts[state]:
            del self.counts[state]
        key = (state, t.spec.critical)
        for scope in ("", t.role):
            pairs = self.pairs.setdefault(scope, {})
            pairs[key] = pairs.get(key, 0) + n
            if not pairs[key]:
                del pairs[key]
        if t.direct and state == tasksm.RUNNING:
            self.running_direct += n
            if not t.eos:
                self.running_no_eos += n

    # -- views ----------------------------------------------------------------------------

    def aggregate(self, role: str = "") -> str:
        """The state of a top-level role, or of the whole environment ("")."""
        return tasksm.aggregate(self.pairs.get(role, {}).keys())

    def roles(self) -> list[str]:
        return [r for r in self.pairs if r]


def task_event(env_id: str, t: RuntimeTask, state: str, **extra: Any) -> dict[str, Any]:
    """The event of one task: what, where, which process, how critical."""
    ev: dict[str, Any] = {
        "kind": "task",
        "env": env_id,
        "node": t.node,
        "task": t.spec.path,
        "id": t.id,
        "state": state,
        "pid": t.pid,
        "critical": t.spec.critical,
    }
    ev.update(extra)
    return ev


def by_node(ts: Iterable[RuntimeTask]) -> dict[str, list[RuntimeTask]]:
    out: dict[str, list[RuntimeTask]] = {}
    for t in ts:
        out.setdefault(t.node, []).append(t)
    return out
