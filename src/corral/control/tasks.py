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
from corral.store.sqlite import TaskChange, TaskChanges

NO_PID = 0  # in a change: the task has no process any more


@dataclass(slots=True, eq=False)
class RuntimeTask:
    """One task of a running environment: ~100 bytes, plus its shared spec."""

    idx: int
    id: str
    spec: TaskSpec
    node: str
    role: str  # the top-level role it belongs to (its path's first two parts)
    hook: bool  # run at a trigger (spec.trigger is set)
    direct: bool  # speaks the control protocol (spec.control is direct or fairmq)
    critical: bool
    state: str = tasksm.PENDING
    pid: int | None = None
    reason: str | None = None
    eos: bool = False
    member: str | None = None  # the collection member (role path) it belongs to
    since: float = 0.0  # when it entered its state

    def row(self, env_id: str) -> dict[str, Any]:
        """As the store's ``find_tasks`` gives it."""
        return {
            "env": env_id, "idx": self.idx, "path": self.spec.path,
            "class": self.spec.task_class, "node": self.node, "state": self.state,
            "critical": self.critical, "pid": self.pid, "reason": self.reason,
            "since": self.since, "id": self.id,
        }  # fmt: skip


# One change: the task, its event, its pid (None: unchanged, NO_PID: none any more),
# and the reason (None: none, or unchanged when the state does not change).
Change = tuple[RuntimeTask, str, int | None, str | None]


class TaskSet:
    """The tasks of one environment, by index, id, path and node, with their counts."""

    def __init__(self, env_id: str, plan: Plan, nodes: Sequence[str], now: float = 0.0) -> None:
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
        start: dict[tuple[str, str, bool], int] = {}
        members: dict[tuple[str | None, str], str | None] = {}  # by collection and parent
        collections = self.collections
        tasks = self.tasks
        by_id = self.by_id
        by_path = self.by_path
        by_node = self.by_node
        for i, spec in enumerate(plan.tasks):
            path = spec.path
            k = path.find(".", path.find(".") + 1)
            role = path if k < 0 else path[:k]
            role = roles.setdefault(role, role)
            t = RuntimeTask(
                i, f"{env_id}:{i}", spec, nodes[i], role, spec.trigger is not None,
                spec.control in ("direct", "fairmq"), spec.critical, since=now,
            )  # fmt: skip
            tasks.append(t)
            by_id[t.id] = t
            by_path[path] = t
            if t.hook:
                continue
            if spec.collection is not None:
                if collections.holds(spec.collection, path):
                    t.member = path
                else:  # the same member for every task under one parent
                    key = (spec.collection, path.rpartition(".")[0])
                    if key not in members:
                        members[key] = collections.member_of(*key)
                    t.member = members[key]
            node = by_node.get(t.node)
            if node is None:
                node = by_node[t.node] = []
            node.append(t)
            first = (role, t.state, t.critical)
            start[first] = start.get(first, 0) + 1
        self._add(start)

    # -- changes --------------------------------------------------------------------------

    def apply(
        self, node: str, env_id: str, changes: Iterable[Change], now: float = 0.0
    ) -> tuple[TaskChanges, list[dict[str, Any]], list[RuntimeTask]]:
        """Apply task events; return the store's changes, the events, and the tasks
        that just failed (went to ERROR or LOST). Raises IllegalTaskTransition on a
        change the task table does not allow (nothing of the batch is applied then)."""
        planned = []
        steps: dict[tuple[str, str], str] = {}  # (state, event) -> next: a batch has few
        for c in changes:
            t, event, pid, _ = c
            old = t.state
            new = steps.get((old, event))
            if new is None:
                new = steps[(old, event)] = tasksm.next_state(old, event)
            if new == old and (pid is None or pid == (t.pid or NO_PID)):
                continue  # news that changes nothing
            planned.append((c, new))
        stored = TaskChanges()
        plain = stored.plain
        detailed = stored.detailed
        groups: dict[str, list[str]] = {}
        singles: list[dict[str, Any]] = []
        failed: list[RuntimeTask] = []
        moves: dict[tuple[str, bool, str, str], int] = {}  # (role, critical, old, new) -> n
        failing = tasksm.FAILED
        for (t, _, pid, reason), new in planned:
            old = t.state
            if pid is not None:
                t.pid = pid or None
            if new == old:  # only its process changed: stored, not announced
                detailed.append(TaskChange(t.idx, new, pid, t.reason))
                continue
            if t.hook:
                t.state = new
            else:
                move = (t.role, t.critical, old, new)
                moves[move] = moves.get(move, 0) + 1
                if (  # what _move does beyond the state: counts of RUNNING, new
                    # streams, collection health
                    old == tasksm.RUNNING
                    or new == tasksm.RUNNING
                    or new == tasksm.PENDING
                    or (t.member is not None and (old in failing or new in failing))
                ):
                    self._move(t, old, new)
                else:
                    t.state = new
            t.reason = reason
            t.since = now
            if new in failing:
                failed.append(t)
            if pid is None and reason is None:
                group = plain.get(new)
                if group is None:
                    group = plain[new] = []
                group.append(t.idx)
            else:
                detailed.append(TaskChange(t.idx, new, pid, reason))
            if reason is not None:
                singles.append(task_event(env_id, t, new, reason=reason))
            else:
                paths = groups.get(new)
                if paths is None:
                    paths = groups[new] = []
                paths.append(t.spec.path)
        delta: dict[tuple[str, str, bool], int] = {}  # (role, state, critical) -> count
        for (role, critical, old, new), n in moves.items():
            for k, d in (((role, old, critical), -n), ((role, new, critical), n)):
                delta[k] = delta.get(k, 0) + d
        self._add(delta)
        events: list[dict[str, Any]] = [
            {"kind": "task", "env": env_id, "node": node, "state": s, "count": len(p), "tasks": p}
            for s, p in groups.items()
        ]
        events.extend(singles)
        return stored, events, failed

    def restore(self, t: RuntimeTask, state: str, reason: str | None) -> None:
        """Load a task's state as a previous control process stored it (a take-over):
        not a transition, so the table is not consulted; the counts follow."""
        self.restore_all([(t, state, reason)])

    def restore_all(self, loaded: Iterable[tuple[RuntimeTask, str, str | None]]) -> None:
        """``restore`` for many tasks, counted once."""
        delta: dict[tuple[str, str, bool], int] = {}
        for t, state, reason in loaded:
            if state not in tasksm.STATES:
                raise ValueError(f"task {t.spec.path}: unknown stored state {state!r}")
            if t.hook:
                t.state = state
            elif state != t.state:
                for k, d in (((t.role, t.state, t.critical), -1), ((t.role, state, t.critical), 1)):
                    delta[k] = delta.get(k, 0) + d
                self._move(t, t.state, state)
            t.reason = reason
        self._add(delta)

    def move_node(self, t: RuntimeTask, node: str) -> None:
        """The task runs on another node from now on (placed again by RECOVER)."""
        if not t.hook:
            self.by_node[t.node].remove(t)
            self.by_node.setdefault(node, []).append(t)
        t.node = node

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
        """A task that is not a hook task changes state (the caller counts it by role)."""
        if t.direct:
            if old == tasksm.RUNNING:
                self.running_direct -= 1
                if not t.eos:
                    self.running_no_eos -= 1
            if new == tasksm.RUNNING:
                self.running_direct += 1
                if not t.eos:
                    self.running_no_eos += 1
        if old == tasksm.RUNNING or new == tasksm.PENDING:
            t.eos = False  # a new run, or a new process, starts its stream anew
        t.state = new
        if t.member is not None and (old in tasksm.FAILED) != (new in tasksm.FAILED):
            assert t.spec.collection is not None
            self.collections.changed(
                t.spec.collection, t.member, old in tasksm.FAILED, new in tasksm.FAILED
            )

    def _add(self, delta: dict[tuple[str, str, bool], int]) -> None:
        """Apply counted changes: tasks by state, (state, critical) pairs by role."""
        counts = self.counts
        whole = self.pairs[""]
        for (role, state, critical), n in delta.items():
            if not n:
                continue
            counts[state] = counts.get(state, 0) + n
            if not counts[state]:
                del counts[state]
            key = (state, critical)
            for pairs in (whole, self.pairs.setdefault(role, {})):
                pairs[key] = pairs.get(key, 0) + n
                if not pairs[key]:
                    del pairs[key]

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
