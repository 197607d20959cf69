"""The simulated backend: nodes and tasks in-process, for tests and for scale.

How this runs. A node's batch is handled by the one coroutine that called the port
method: it sleeps once for the batch's simulated latency, then decides every task's
outcome in a plain loop. Per-task state is one small slotted record in a dict; there
is no asyncio task, thread or timer per task. Faults that fire later (a task dying
while RUNNING, a slow answer) are grouped per batch into one timer, and the reports
of one moment go to the sink in one list.

Faults are injected by role path pattern (``fnmatch``): a task can die, hang (never
answer), answer garbage, answer an error, or answer slowly, at its launch, at a given
transition, or some time after it started RUNNING; ``times`` limits how often a fault
fires for one task so that a RECOVER can then succeed.
"""

from __future__ import annotations

import asyncio
import fnmatch
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from corral.backends import sweep
from corral.backends.status import describe_status
from corral.ports.backend import (
    TASK_TRANSITIONS,
    ChannelRequest,
    Launch,
    NodeInfo,
    Order,
    Outcome,
    Report,
    ReportSink,
)

FROM: dict[str, tuple[str, ...]] = {
    "CONFIGURE": ("STANDBY",),
    "START": ("CONFIGURED",),
    "STOP": ("RUNNING",),
    "RESET": ("CONFIGURED",),
    "EXIT": ("STANDBY", "CONFIGURED"),
}
KINDS = ("die", "hang", "garbage", "error", "slow")
_NO_FAULTS: list[list[object]] = []


@dataclass(frozen=True, slots=True)
class Fault:
    """Make tasks whose path matches ``path`` misbehave ``at`` a moment."""

    path: str
    kind: str  # die | hang | garbage | error | slow
    at: str = "CONFIGURE"  # LAUNCH, a task transition, or RUNNING
    after: float = 0.0  # RUNNING: seconds after START; slow: the answer's delay
    times: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"fault kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.at not in ("LAUNCH", "RUNNING", *FROM):
            raise ValueError(f"fault moment {self.at!r}: LAUNCH, RUNNING or a task transition")


class _Task:
    __slots__ = ("faults", "node", "path", "pid", "state")

    def __init__(self, node: str, path: str, pid: int, faults: list[list[object]]) -> None:
        self.node = node
        self.path = path
        self.pid = pid
        self.state = "STANDBY"
        self.faults = faults  # [fault, remaining] pairs that match this task


class SimBackend:
    """A farm of simulated nodes; see the module doc."""

    name = "sim"

    def __init__(
        self,
        nodes: int | Sequence[str] = 1,
        *,
        launch_latency: float = 0.0,
        transition_latency: float = 0.0,
        per_task_latency: float = 0.0,
        faults: Sequence[Fault] = (),
        labels: Mapping[str, Mapping[str, str]] | None = None,
        node_cpu: float = 128.0,
        node_memory: int = 1_000_000,
        node_gpu: int = 8,
    ) -> None:
        names = [f"sim-{i:03d}" for i in range(nodes)] if isinstance(nodes, int) else list(nodes)
        self._nodes = [
            NodeInfo(
                n, cpu=node_cpu, memory=node_memory, gpu=node_gpu, ports=(20000, 29999),
                labels=tuple(sorted({"rack": f"r{k // 20:02d}", **(labels or {}).get(n, {})}
                                    .items())),
            )
            for k, n in enumerate(names)
        ]  # fmt: skip
        self._known = set(names)
        self.launch_latency = launch_latency
        self.transition_latency = transition_latency
        self.per_task_latency = per_task_latency
        self.faults = list(faults)
        self._tasks: dict[str, _Task] = {}
        self._sink: ReportSink | None = None
        self._pids = itertools.count(10_000)
        self._ports: dict[str, itertools.count[int]] = {}
        self._timers: set[asyncio.TimerHandle] = set()

    # -- the port -----------------------------------------------------------------------

    def nodes(self) -> Sequence[NodeInfo]:
        return list(self._nodes)

    def subscribe(self, sink: ReportSink) -> None:
        self._sink = sink

    async def allocate(
        self, node: str, env_id: str, channels: Sequence[ChannelRequest]
    ) -> list[str]:
        ports = self._ports.setdefault(node, itertools.count(30_000))
        return [
            f"ipc:///sim/{node}/{env_id}/{c.task_id}-{c.name}"
            if c.addressing == "ipc"
            else f"tcp://{node}:{c.port or next(ports)}"
            for c in channels
        ]

    async def launch(
        self, node: str, batch: Sequence[Launch], timeout: float, slow_after: float
    ) -> list[Outcome]:
        """Any node name is accepted unless it was lost: placement decides where."""
        await self._latency(self.launch_latency, len(batch))
        outs: list[Outcome | None] = [None] * len(batch)
        pending: list[tuple[int, str, Fault]] = []
        reports: list[Report] = []
        hooks_done: list[Report] = []
        for i, spec in enumerate(batch):
            if node not in self._known:
                outs[i] = Outcome(spec.task_id, error=f"node {node} is gone")
                continue
            t = _Task(node, spec.path, next(self._pids), self._match(spec.path))
            self._tasks[spec.task_id] = t
            fault = self._fire(t, "LAUNCH")
            if fault is None:
                outs[i] = Outcome(spec.task_id, "STANDBY", pid=t.pid)
                if spec.control == "hook":  # a hook task runs and ends at once
                    del self._tasks[spec.task_id]
                    hooks_done.append(Report(spec.task_id, "exited", _died(0), 0, t.pid))
            else:
                outs[i] = self._faulty(spec.task_id, t, fault, "its launch", reports, pending, i)
        result = await self._settle(outs, pending, reports, timeout, slow_after, "hello")
        if hooks_done:
            asyncio.get_running_loop().call_soon(self._emit, hooks_done)
        return result

    async def transition(
        self, node: str, batch: Sequence[Order], timeout: float, slow_after: float
    ) -> list[Outcome]:
        await self._latency(self.transition_latency, len(batch))
        outs: list[Outcome | None] = [None] * len(batch)
        pending: list[tuple[int, str, Fault]] = []
        reports: list[Report] = []
        started: list[str] = []
        for i, order in enumerate(batch):
            t = self._tasks.get(order.task_id)
            name = order.transition
            if t is None:
                outs[i] = Outcome(order.task_id, error="unknown task")
                continue
            if name not in FROM:
                outs[i] = Outcome(order.task_id, error=f"no transition {name}")
                continue
            if t.state not in FROM[name]:
                outs[i] = Outcome(order.task_id, error=f"{name} failed: not allowed in {t.state}")
                continue
            fault = self._fire(t, name)
            if fault is not None:
                outs[i] = self._faulty(order.task_id, t, fault, name, reports, pending, i)
                continue
            t.state = TASK_TRANSITIONS[name]
            outs[i] = Outcome(order.task_id, t.state)
            if name == "EXIT":
                del self._tasks[order.task_id]
                reports.append(Report(order.task_id, "exited", _died(0), 0, t.pid))
            elif name == "START":
                started.append(order.task_id)
        self._schedule_running_faults(started)
        return await self._settle(outs, pending, reports, timeout, slow_after, None, batch)

    async def stop(self, node: str, task_ids: Sequence[str], grace: float) -> None:
        reports = []
        for tid in task_ids:
            t = self._tasks.pop(tid, None)
            if t is not None:
                reports.append(Report(tid, "exited", _died(-15), -15, t.pid))
        self._emit(reports)

    async def release(self, node: str, env_id: str) -> None:
        return None

    async def resume(self) -> None:
        return None

    async def inventory(self) -> list[tuple[str, int, str | None]]:
        return [(tid, t.pid, t.state) for tid, t in self._tasks.items()]

    async def end_leftovers(self, env_ids: Sequence[str]) -> int:
        """Simulated tasks do not outlive their backend, but a data directory that a
        local backend used before may have left real processes on this machine."""
        if not env_ids:
            return 0
        return await asyncio.to_thread(sweep.end, environments=frozenset(env_ids))

    async def close(self) -> None:
        for h in self._timers:
            h.cancel()
        self._timers.clear()
        await self.stop("", list(self._tasks), 0.0)

    # -- chaos ---------------------------------------------------------------------------

    def kill(self, task_id: str, code: int = -9) -> None:
        """The task's process dies now."""
        t = self._tasks.pop(task_id, None)
        if t is not None:
            self._emit([Report(task_id, "exited", _died(code), code, t.pid)])

    def kill_many(self, task_ids: Sequence[str], code: int = -9) -> None:
        """These tasks' processes die now, reported together (one batch)."""
        reports = []
        for tid in task_ids:
            t = self._tasks.pop(tid, None)
            if t is not None:
                reports.append(Report(tid, "exited", _died(code), code, t.pid))
        self._emit(reports)

    def emit(self, task_id: str, kind: str, reason: str = "") -> None:
        """The task sends news (``end_of_stream``, ``error``)."""
        t = self._tasks.get(task_id)
        if t is not None:
            self._emit([Report(task_id, kind, reason or kind, pid=t.pid)])

    def lose_node(self, node: str) -> None:
        """The node is gone, with every task on it: they are reported lost."""
        self._known.discard(node)
        gone = [(tid, t.pid) for tid, t in self._tasks.items() if t.node == node]
        for tid, _ in gone:
            del self._tasks[tid]
        self._emit([Report(tid, "lost", f"node {node} lost", pid=pid) for tid, pid in gone])

    def pid_of(self, task_id: str) -> int | None:
        t = self._tasks.get(task_id)
        return None if t is None else t.pid

    def task_state(self, task_id: str) -> str | None:
        t = self._tasks.get(task_id)
        return None if t is None else t.state

    # -- internals -------------------------------------------------------------------------

    async def _latency(self, per_batch: float, n: int) -> None:
        delay = per_batch + self.per_task_latency * n
        if delay > 0:
            await asyncio.sleep(delay)

    def _match(self, path: str) -> list[list[object]]:
        if not self.faults:
            return _NO_FAULTS  # shared, never changed (_fire only reads an empty list)
        return [[f, f.times] for f in self.faults if fnmatch.fnmatchcase(path, f.path)]

    @staticmethod
    def _fire(t: _Task, at: str) -> Fault | None:
        for pair in t.faults:
            fault, left = pair
            assert isinstance(fault, Fault) and isinstance(left, int)
            if fault.at == at and left > 0:
                pair[1] = left - 1
                return fault
        return None

    def _faulty(
        self,
        task_id: str,
        t: _Task,
        fault: Fault,
        what: str,
        reports: list[Report],
        pending: list[tuple[int, str, Fault]],
        pos: int,
    ) -> Outcome | None:
        if fault.kind == "die":
            self._tasks.pop(task_id, None)
            reports.append(Report(task_id, "exited", _died(-9), -9, t.pid))
            return Outcome(task_id, error=f"process {_died(-9)} during {what}")
        if fault.kind == "garbage":
            why = "protocol error: a message that is not JSON: 'garbage'"
            reports.append(Report(task_id, "error", why, pid=t.pid))
            return Outcome(task_id, error=why)
        if fault.kind == "error":
            return Outcome(task_id, error=f"{what} failed: simulated error")
        pending.append((pos, task_id, fault))  # hang or slow: decided when the batch settles
        return None

    async def _settle(
        self,
        outs: list[Outcome | None],
        pending: list[tuple[int, str, Fault]],
        reports: list[Report],
        timeout: float,
        slow_after: float,
        hello: str | None,
        batch: Sequence[Order] = (),
    ) -> list[Outcome]:
        """Wait for the slow and hanging tasks of a batch: one sleep, not one per task."""
        self._emit(reports)
        if pending:
            loop = asyncio.get_running_loop()
            start = loop.time()
            latest = max((f.after if f.kind == "slow" else timeout) for _, _, f in pending)
            wait = min(latest, timeout)
            if 0 < slow_after < wait:
                await asyncio.sleep(slow_after)
                slow = [
                    Report(
                        tid,
                        "slow",
                        f"no answer after {slow_after:.1f} s; process is alive",
                        pid=self._tasks[tid].pid if tid in self._tasks else None,
                    )
                    for _, tid, f in pending
                    if f.kind == "hang" or f.after > slow_after
                ]
                self._emit(slow)
            await asyncio.sleep(max(0.0, wait - (loop.time() - start)))
            for pos, tid, f in pending:
                t = self._tasks.get(tid)
                if f.kind == "slow" and f.after <= timeout and t is not None:
                    if batch:
                        t.state = TASK_TRANSITIONS[batch[pos].transition]
                    outs[pos] = Outcome(tid, t.state, pid=t.pid)
                else:
                    what = "no hello" if hello else f"no answer to {batch[pos].transition}"
                    outs[pos] = Outcome(
                        tid,
                        error=f"{what} within {timeout:.1f} s (process is alive)",
                        timed_out=True,
                    )
        return [o if o is not None else Outcome("?", error="lost outcome") for o in outs]

    def _schedule_running_faults(self, started: list[str]) -> None:
        """Faults 'at RUNNING': grouped by delay, one timer per group."""
        if not self.faults or not started:
            return
        groups: dict[float, list[tuple[str, Fault]]] = {}
        for tid in started:
            t = self._tasks[tid]
            fault = self._fire(t, "RUNNING")
            if fault is not None:
                groups.setdefault(fault.after, []).append((tid, fault))
        loop = asyncio.get_running_loop()
        for delay, items in groups.items():
            self._timers.add(loop.call_later(delay, self._running_faults, items))

    def _running_faults(self, items: list[tuple[str, Fault]]) -> None:
        reports = []
        for tid, fault in items:
            if tid not in self._tasks:
                continue
            t = self._tasks[tid]
            if fault.kind == "die":
                del self._tasks[tid]
                reports.append(Report(tid, "exited", _died(-9), -9, t.pid))
            elif fault.kind == "garbage":
                why = "protocol error: a message that is not JSON"
                reports.append(Report(tid, "error", why, pid=t.pid))
            elif fault.kind == "error":
                why = "the task reported an error: simulated"
                reports.append(Report(tid, "error", why, pid=t.pid))
        self._emit(reports)

    def _emit(self, reports: list[Report]) -> None:
        if reports and self._sink is not None:
            self._sink(reports)


def _died(code: int) -> str:
    return f"process {describe_status(code)}"
