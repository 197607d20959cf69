"""The environment controller: runs one environment's life from its plan.

How this runs. One ``Environment`` per environment, on the control plane's event loop.
Transitions are serialized by one asyncio lock and each has a deadline. A transition
is the slot list of ``lifecycle.hooks.schedule``: hook calls start and are awaited at
their slots (``control.hooks``), and the TASKS slot carries out the commands of
``lifecycle.environment.step`` with one coroutine per *node*, each handing its node's
whole batch to the backend. Outcomes are applied per node batch: one store write
(through the journal), then the events go out. Nothing here runs per task in time: no
task, timer or poll per task, and no decision walks every task (``control.tasks``
keeps the counts decisions need).

Unsolicited reports (exits, END_OF_STREAM, ERROR, node loss, slow) arrive in lists
from the backend through the control plane and are matched to each task's current
process (``control.reports``). A critical failure sends the environment to ERROR at
once when no transition runs; during a transition it fails that transition.

Whatever goes wrong inside a transition (a backend or store error, a bug) fails that
transition and leaves the environment in a state an operator can act on: never a
transition left STARTED, never a process left running unwatched.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from corral.calls import Registry
from corral.control.hooks import Hooks, Running
from corral.control.journal import Journal, StoreUnavailable
from corral.control.reports import judge
from corral.control.tasks import NO_PID, Change, RuntimeTask, TaskSet, by_node, task_event
from corral.lifecycle import environment as envsm
from corral.lifecycle import task as tasksm
from corral.lifecycle.hooks import schedule
from corral.model.plan import HOST_PLACEHOLDER, Command, Plan
from corral.ports.backend import Backend, ChannelRequest, Launch, Order, Outcome, Report
from corral.store.sqlite import SqliteStore, TaskChange, TaskRow

ENDED = tasksm.FAILED | {tasksm.DONE}  # a task with no process to order any more
log = logging.getLogger("corral.environment")

DEFAULT_TIMEOUTS: dict[str, float] = {
    "DEPLOY": 120.0,
    "CONFIGURE": 60.0,
    "START_ACTIVITY": 60.0,
    "STOP_ACTIVITY": 60.0,
    "RESET": 60.0,
    "EXIT": 30.0,
    "GO_ERROR": 30.0,
    "RECOVER": 120.0,
}
GRACE = 3.0  # seconds between SIGTERM and SIGKILL when ending processes

# The task states each task transition is sent to.
ORDER_FROM: dict[str, tuple[str, ...]] = {
    "CONFIGURE": (tasksm.STANDBY,),
    "START": (tasksm.CONFIGURED,),
    "STOP": (tasksm.RUNNING,),
    "RESET": (tasksm.CONFIGURED,),
    "EXIT": (tasksm.STANDBY, tasksm.CONFIGURED),
}


def _waits_for_host(c: Command) -> bool:
    """Whether a command holds a ``task_hostname`` that placement fills in."""
    h = HOST_PLACEHOLDER
    return h in c.value or any(h in a for a in c.arguments) or any(h in v for _, v in c.env)


def _on_host(c: Command, node: str) -> Command:
    """A command whose ``task_hostname`` waited for placement, with its node's name."""
    h = HOST_PLACEHOLDER
    return dataclasses.replace(
        c,
        value=c.value.replace(h, node),
        arguments=tuple(a.replace(h, node) for a in c.arguments),
        env=tuple((k, v.replace(h, node)) for k, v in c.env),
    )


class TransitionError(Exception):
    """A transition that was refused or failed; str() says why, for a person."""

    def __init__(self, message: str, *, state: str) -> None:
        super().__init__(message)
        self.state = state  # the environment's state afterwards


class Environment:
    """One environment: its plan, its tasks' runtime state, its transitions."""

    def __init__(
        self,
        env_id: str,
        plan: Plan,
        *,
        backend: Backend,
        store: SqliteStore,
        journal: Journal,
        calls: Registry,
        source: str | None = None,
        timeouts: dict[str, float] | None = None,
        log_dir: str | None = None,
        clock: Callable[[], float] = time.time,
        nodes: Sequence[str] | None = None,
        ports: Sequence[tuple[int, ...]] | None = None,
    ) -> None:
        """``nodes`` says where each task of the plan runs (the ledger's placement);
        without it every task runs on the backend's first node."""
        self.id = env_id
        self.plan = plan
        self.backend = backend
        self.store = store
        self.journal = journal
        self.calls = calls
        self.source = source
        self.timeouts = dict(DEFAULT_TIMEOUTS, **(timeouts or {}))
        self.log_dir = log_dir
        self.clock = clock
        self.state = envsm.STANDBY
        self.run_number: int | None = None
        self.error: str | None = None
        self.lock = asyncio.Lock()
        self.transitioning: str | None = None
        self._failure: str | None = None  # a critical failure seen during a transition
        self._ending: dict[str, int] = {}  # task id -> the pid being ended on purpose
        self._auto: asyncio.Task[None] | None = None
        self.variables = dict(plan.variables)
        self.actor: str | None = None  # who asked for the transition under way
        self.version = 0  # bumped by every change of a task's or the environment's state
        self.created_by: str | None = None
        self.recipe: str | None = None  # how to expand the plan again (JSON), for restarts
        self.lease: float | None = None  # how long agents keep its tasks without us
        # RECOVER asks it to place again the tasks whose node was lost (the control plane)
        self.relocate: Callable[[Environment, list[RuntimeTask]], None] | None = None
        placed = list(nodes) if nodes is not None else [backend.nodes()[0].name] * len(plan.tasks)
        self.taskset = TaskSet(env_id, plan, placed, self.clock())
        self.tasks = self.taskset.tasks
        self.by_id = self.taskset.by_id
        self.by_path = self.taskset.by_path
        self.by_node = self.taskset.by_node
        self.hooks = Hooks(self)
        self.ports: list[tuple[int, ...]] = (
            list(ports) if ports is not None else [()] * len(plan.tasks)
        )
        self.addresses: dict[tuple[str, str], str] = {}
        self._args: dict[str, dict[str, str]] = {}
        self._roles: dict[str, str] = {}

    # -- creation -----------------------------------------------------------------------

    def create(self) -> None:
        """Store the new environment (raises StoreUnavailable if the store refuses)."""
        rows = [
            TaskRow(t.idx, t.spec.path, t.spec.task_class, t.node, t.state, t.critical, t.hook,
                    ",".join(map(str, self.ports[t.idx])) or None)
            for t in self.tasks
        ]  # fmt: skip
        ev = self._env_event(envsm.STANDBY, note="created")
        ev["tasks"] = len(self.tasks)
        ev["name"] = self.plan.name
        if self.created_by is not None:
            ev["actor"] = self.created_by
        stored = self.journal.call(
            lambda: self.store.create_environment(
                self.id,
                self.plan.name,
                self.source,
                self.variables,
                rows,
                self.clock(),
                [ev],
                created_by=self.created_by,
                recipe=self.recipe,
            )
        )
        self.journal.publish(stored)

    def restore(self, row: dict[str, Any], tasks: Sequence[dict[str, Any]]) -> None:
        """Take over an environment a previous control process left: its state, its run
        and its tasks' states and processes (``pid``: None when it has none)."""
        if row["state"] not in envsm.STATES:
            raise ValueError(f"environment {self.id}: unknown stored state {row['state']!r}")
        self.state = row["state"]
        self.error = row.get("error")
        self.created_by = row.get("created_by")
        if self.state == envsm.RUNNING and row.get("run_number") is not None:
            self.run_number = int(row["run_number"])
            self.variables["run_number"] = str(self.run_number)
        self.taskset.restore_all(
            (t, r["state"], r.get("reason")) for t, r in zip(self.tasks, tasks, strict=True)
        )
        for t, r in zip(self.tasks, tasks, strict=True):
            t.pid = r.get("pid")
        self._role_events()  # remember the roles' states: only changes are announced
        self.version += 1

    def record_restored(self, was: str, stored: dict[int, tuple[str, int | None]]) -> None:
        """After a re-attach: store and announce what differs from the stored record
        (tasks found gone, states the tasks confirmed, the environment's state)."""
        changes: list[TaskChange] = []
        events: list[dict[str, Any]] = []
        for t in self.tasks:
            old_state, old_pid = stored[t.idx]
            if (t.state, t.pid) == (old_state, old_pid):
                continue
            changes.append(TaskChange(t.idx, t.state, t.pid or 0, t.reason))
            if t.state != old_state:
                events.append(self._task_event(t, t.state, reason=t.reason or "re-attached"))
        if changes:
            now = self.clock()
            self.journal.write(lambda: self.store.update_tasks(self.id, changes, now, events))
        if self.state != was:
            self._set_state(self.state, event="RE-ATTACH", error=self.error)
        if changes or self.state != was:
            self._roles = {}
            self.announce(self._role_events())
        self.version += 1

    def close_stored_run(self, number: int) -> None:
        """A run the store has open, which a re-attached environment no longer runs."""
        self.run_number = number
        self._close_run()

    def fail(self, why: str) -> None:
        """A failure found outside a report (a re-attach): the rules of ``_fail``."""
        self._fail(why)

    def judge_restored(self) -> str | None:
        """After a take-over: do the tasks found failed fail the environment? Why."""
        failed = [t for t in self.tasks if t.state in tasksm.FAILED and not t.hook]
        return self._verdict(failed)

    # -- transitions ----------------------------------------------------------------------

    async def transition(
        self, event: str, *, timeout: float | None = None, actor: str | None = None
    ) -> str:
        """Run one transition; return the new state or raise TransitionError.

        ``actor`` names who asked (a token's name); it is kept in the transition's
        record and events. Automatic transitions have none.
        """
        async with self.lock:
            self.actor = actor
            try:
                return await self._transition(event, timeout)
            finally:
                self.actor = None

    async def _transition(self, event: str, timeout: float | None) -> str:
        src = self.state
        try:
            dst, commands = envsm.step(src, event)
        except envsm.InvalidTransition as e:
            raise TransitionError(str(e), state=src) from None
        loop = asyncio.get_running_loop()
        limit = timeout if timeout is not None else self.timeouts.get(event, 60.0)
        deadline = loop.time() + limit
        started = self.clock()
        try:
            tid = self.journal.call(
                lambda: self.store.begin_transition(self.id, event, src, started, self.actor)
            )
        except StoreUnavailable as e:
            raise TransitionError(f"{event} refused: {e}", state=src) from None
        self.transitioning = event
        self._failure = None
        self.announce([self._transition_event(event, src, dst, "STARTED")])
        running: Running = {}
        error: str | None = None
        moved = False  # the tasks' part has begun: a failure now leaves them changed
        if event in envsm.OPENS_RUN:
            try:
                self._open_run()  # before the first step: the before_ calls read it
            except StoreUnavailable as e:
                error = f"no run could be opened: {e}"
        try:
            for slot in () if error else schedule(self.hooks.items, event, src, dst):
                t_slot = self.clock()
                if slot.tasks:
                    error = self._failure
                    if error is None:
                        moved = True
                        error = await self._core(event, commands, deadline)
                else:
                    error = await self.hooks.run_slot(slot, event, running)
                if error is None and moved:
                    error = self._failure
                self.announce([self._step_event(event, slot.label, error, t_slot)])
                if error is not None:
                    break
        except asyncio.CancelledError:
            await self._abandon(running, tid, event, src, dst, f"{event} was interrupted", moved)
            raise
        except Exception as e:  # a backend, store or controller fault: fail, never wedge
            log.exception("environment %s: %s failed on an unexpected error", self.id, event)
            error = f"{event} failed on an unexpected error: {type(e).__name__}: {e}"
            await self._abandon(running, tid, event, src, dst, error, moved)
            raise TransitionError(error, state=self.state) from None
        await self.hooks.cancel(running)
        if error is not None:
            if event == "EXIT":  # EXIT ends the processes, whatever failed
                with contextlib.suppress(Exception):
                    await self._terminate(self.tasks)
            self._finish_failed(tid, event, src, dst, error, moved, started)
            raise TransitionError(f"{event} failed: {error}", state=self.state)
        if event in envsm.CLOSES_RUN:
            self._close_run()  # after the last step: the after_ calls read it
        self._set_state(dst, event=event)
        now = self.clock()
        ev = self._transition_event(event, src, dst, "DONE")
        ev["duration"] = round(now - started, 6)
        evs = [ev, *self._role_events()]
        self.journal.write(lambda: self.store.end_transition(tid, "DONE", dst, None, now, evs))
        self.transitioning = None
        if dst == envsm.RUNNING and self.taskset.all_end_of_stream():
            self._spawn_auto("STOP_ACTIVITY", "every task reported END_OF_STREAM")
        return dst

    async def _abandon(
        self, running: Running, tid: int, event: str, src: str, dst: str, error: str, moved: bool
    ) -> None:
        """A transition ends abnormally: its calls and hook tasks end with it, and it is
        recorded FAILED (in ERROR when the tasks had begun to change)."""
        try:
            await self.hooks.cancel(running)
        except Exception:  # pragma: no cover - hooks.cancel only awaits our own tasks
            log.exception("environment %s: cancelling the calls of %s", self.id, event)
        # a launch cut short leaves tasks nobody watches: end them, say they failed
        launching = [t for t in self.tasks if t.state == tasksm.LAUNCHING and not t.hook]
        for node, ts in by_node(launching).items():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._fail_batch(node, ts, error))
        self._finish_failed(tid, event, src, dst, error, moved, None)

    def _finish_failed(
        self,
        tid: int,
        event: str,
        src: str,
        dst: str,
        error: str,
        moved: bool,
        started: float | None,
    ) -> None:
        self.transitioning = None
        # Before the tasks moved, a failed call leaves the state as it was; after it,
        # or when a critical task failed meanwhile, the environment is in ERROR.
        broken = moved or self._failure is not None
        if event in envsm.OPENS_RUN and not broken:
            self._close_run()  # no task started: the environment stays CONFIGURED, no run
        if event == "EXIT":
            self._set_state(envsm.DONE, event=event, error=error)
        elif broken and self.state != envsm.ERROR:
            self._set_state(envsm.ERROR, event=event, error=error)
        now = self.clock()
        state = self.state
        ev = self._transition_event(event, src, dst, "FAILED")
        ev["error"] = error
        if started is not None:
            ev["duration"] = round(now - started, 6)
        evs = [ev, *self._role_events()]
        self.journal.write(lambda: self.store.end_transition(tid, "FAILED", state, error, now, evs))

    # -- the core's own work -------------------------------------------------------------

    async def _core(
        self, event: str, commands: Sequence[envsm.Command], deadline: float
    ) -> str | None:
        loop = asyncio.get_running_loop()
        for cmd in commands:
            left = max(0.05, deadline - loop.time())
            error: str | None = None
            if isinstance(cmd, envsm.Launch):
                error = await self._launch_all(left)
            elif isinstance(cmd, envsm.Transition):
                error = await self._order_all(cmd.name, left)
            elif isinstance(cmd, envsm.CloseRun):
                self._close_run()
            elif isinstance(cmd, envsm.Terminate):
                await self._terminate(self.tasks)
            elif isinstance(cmd, envsm.Recover):
                error = await self._recover(left)
            else:  # pragma: no cover - the table has no other commands
                error = f"unknown command {cmd!r}"
            if error is not None:
                return error
        return None

    def _open_run(self) -> None:
        evs = [{"kind": "run", "env": self.id, "status": "STARTED"}]
        now = self.clock()
        self.run_number, stored = self.journal.call(lambda: self.store.open_run(self.id, now, evs))
        self.variables["run_number"] = str(self.run_number)
        self.journal.publish(stored)

    def _close_run(self) -> None:
        if self.run_number is None:
            return
        number = self.run_number
        ev = {"kind": "run", "env": self.id, "status": "STOPPED", "run_number": number}
        now = self.clock()
        self.journal.write(lambda: self.store.close_run(self.id, number, now, [ev]))
        self.run_number = None
        self.variables.pop("run_number", None)

    async def _launch_all(self, timeout: float) -> str | None:
        await self._allocate()
        return await self._per_node(
            lambda node, ts: self._launch_node(node, ts, timeout),
            [t for t in self.tasks if not t.hook and t.state == tasksm.PENDING],
        )

    async def _allocate(self) -> None:
        """Concrete addresses for every bind, then the CONFIGURE arguments of each task."""
        requests: dict[str, list[tuple[str, str, ChannelRequest]]] = {}
        taken: dict[str, int] = {}  # a task's tcp binds take its first ports, in order
        for b in self.plan.binds:
            t = self.by_path.get(b.task)
            if t is None:
                continue
            port = 0
            if b.addressing == "tcp" and self.ports[t.idx]:
                k = taken.get(b.task, 0)
                taken[b.task] = k + 1
                port = self.ports[t.idx][k] if k < len(self.ports[t.idx]) else 0
            if (b.task, b.name) in self.addresses:
                continue
            requests.setdefault(t.node, []).append(
                (b.task, b.name, ChannelRequest(t.id, b.name, b.addressing, port))
            )
        for node, reqs in requests.items():
            addrs = await self.backend.allocate(node, self.id, [r[2] for r in reqs])
            for (path, name, _), addr in zip(reqs, addrs, strict=True):
                self.addresses[(path, name)] = addr
        args: dict[str, dict[str, str]] = {}
        for t in self.tasks:
            a = {"environment_id": self.id, "task_id": t.id, "task_path": t.spec.path}
            a.update(t.spec.properties)
            own = self.ports[t.idx][taken.get(t.spec.path, 0) :]
            if own:  # the ports placement gave it from its node's range (beyond its binds)
                a["ports"] = ",".join(str(p) for p in own)
            args[t.spec.path] = a
        for b in self.plan.binds:
            a = args[b.task]
            pre = f"chans.{b.name}."
            a[pre + "address"] = self.addresses[(b.task, b.name)]
            a[pre + "method"] = "bind"
            a[pre + "type"] = b.type
            a[pre + "transport"] = b.transport
        for c in self.plan.connects:
            a = args[c.task]
            pre = f"chans.{c.name}."
            if c.bind_task is not None and c.bind_name is not None:
                address = self.addresses.get((c.bind_task, c.bind_name), "")
            else:
                address = c.address or ""
            a[pre + "address"] = address
            a[pre + "method"] = "connect"
            a[pre + "type"] = c.type
            a[pre + "transport"] = c.transport
        self._args = args

    def launch_of(self, t: RuntimeTask) -> Launch:
        return self.launches([t])[0]

    def launches(self, ts: Sequence[RuntimeTask]) -> list[Launch]:
        """What the backend needs to start these tasks' processes (one batch)."""
        logs = None if self.log_dir is None else f"{self.log_dir}/{self.id}/"
        env_var = ("CORRAL_ENVIRONMENT_ID", self.id)
        lease = self.lease
        out = []
        waits_for_host: dict[int, bool] = {}  # by command: the tasks of a class share one
        for t in ts:
            spec = t.spec
            path = spec.path
            control = "hook" if t.hook else (spec.control if t.direct else "basic")
            command = spec.command
            waits = waits_for_host.get(id(command))
            if waits is None:
                waits = waits_for_host[id(command)] = _waits_for_host(command)
            if waits:
                command = _on_host(command, t.node)
            out.append(
                Launch(
                    t.id, path, command, control,
                    (env_var, ("CORRAL_TASK_ID", t.id), ("CORRAL_TASK_PATH", path)),
                    None if logs is None else f"{logs}{path}.log",
                    spec.health if control == "basic" else None,
                    lease,
                    spec.timeout if control == "basic" else None,
                )
            )  # fmt: skip
        return out

    async def _launch_node(self, node: str, ts: list[RuntimeTask], timeout: float) -> str | None:
        self.apply(node, [(t, "LAUNCH", None, None) for t in ts])  # PENDING: no pid
        slow = min(2.0, timeout / 2)
        outs = await self.backend.launch(node, self.launches(ts), timeout, slow)
        return self._outcomes(node, ts, outs, "READY")

    async def _order_all(self, name: str, timeout: float) -> str | None:
        want = ORDER_FROM[name]
        ts = [t for t in self.tasks if not t.hook and t.state in want]
        return await self._per_node(lambda node, b: self._order_node(node, b, name, timeout), ts)

    async def _order_node(
        self, node: str, ts: list[RuntimeTask], name: str, timeout: float
    ) -> str | None:
        direct = [t for t in ts if t.direct]
        basic = [t for t in ts if not t.direct]
        if basic:  # a plain process follows the environment's states as it runs
            if name == "EXIT":
                await self.end_processes(basic, grace=GRACE)
            self.apply(node, [(t, name, None, None) for t in basic if t.state in ORDER_FROM[name]])
        if not direct:
            return None
        if name == "EXIT":
            self._expect_end(direct)
        run = {"environment_id": self.id}
        if name == "START" and self.run_number is not None:
            run["run_number"] = str(self.run_number)
        if name == "CONFIGURE":
            args = self._args
            orders = [Order(t.id, name, args.get(t.spec.path, run)) for t in direct]
        else:
            orders = [Order(t.id, name, run) for t in direct]
        slow = min(2.0, timeout / 2)
        outs = await self.backend.transition(node, orders, timeout, slow)
        return self._outcomes(node, direct, outs, name)

    def _outcomes(
        self, node: str, ts: list[RuntimeTask], outs: list[Outcome], event: str
    ) -> str | None:
        """Apply one node's outcomes; return the first failure that fails the environment."""
        changes: list[Change] = []
        first: str | None = None
        ending = self._ending
        for t, out in zip(ts, outs, strict=True):
            pid = out.pid
            if t.state in ENDED:
                if t.state in tasksm.FAILED and t.spec.critical and first is None:
                    first = f"task {t.spec.path} on {node}: {t.reason}"
                if pid is not None and t.pid is None:
                    changes.append((t, "FAIL", pid, None))  # its process: to be ended
                continue  # a report got there first
            if ending and pid is not None and ending.get(t.id) == pid:
                del ending[t.id]  # a new process that got an old one's pid
            if out.error is None:
                changes.append((t, event, pid, None))
            else:
                changes.append((t, "FAIL", pid, out.error))
        failed = self.apply(node, changes)
        why = self._verdict(failed)
        return first or why

    async def _per_node(
        self,
        fn: Callable[[str, list[RuntimeTask]], Any],
        ts: list[RuntimeTask],
    ) -> str | None:
        """Run ``fn`` for each node's batch at once; the first failure, if any. A batch
        whose backend call raised fails its tasks (their processes ended), so that no
        task is left in a state nobody watches."""

        async def guarded(node: str, b: list[RuntimeTask]) -> Any:
            try:
                return await fn(node, b)
            except Exception as e:
                if isinstance(e, ConnectionError):  # a node or agent gone: said, not a bug
                    log.warning("environment %s: node %s: %s", self.id, node, e)
                else:
                    log.exception("environment %s: the backend failed on node %s", self.id, node)
                why = f"the backend failed on node {node}: {type(e).__name__}: {e}"
                await self._fail_batch(node, b, why)
                return why

        groups = by_node(ts)
        if not groups:
            return None
        results = await asyncio.gather(*(guarded(node, b) for node, b in groups.items()))
        for r in results:
            if r is not None:
                return str(r)
        return None

    async def _fail_batch(self, node: str, ts: Sequence[RuntimeTask], why: str) -> None:
        """These tasks' state is unknown after a fault: end whatever process they have
        and report them failed (never alive on a guess)."""
        live = [t for t in ts if t.state in tasksm.ALIVE]
        if not live:
            return
        # failed first: their exits, when they come, are then the end of failed tasks
        self.apply(node, [(t, "FAIL", None, why) for t in live])
        try:
            await self.end_processes(live, grace=0.5)
        except Exception:
            log.exception("environment %s: ending processes on node %s", self.id, node)

    def _expect_end(self, ts: Sequence[RuntimeTask]) -> None:
        """These tasks' current processes are being ended on purpose: their exits are
        not failures (and will not be mistaken for a later process's)."""
        for t in ts:
            if t.pid is not None:
                self._ending[t.id] = t.pid

    async def end_processes(self, ts: Sequence[RuntimeTask], *, grace: float = GRACE) -> None:
        """End these tasks' processes, all nodes at once, and wait until they are gone."""
        self._expect_end(ts)
        groups = by_node(ts)
        await asyncio.gather(
            *(self.backend.stop(n, [t.id for t in b], grace) for n, b in groups.items())
        )

    async def _terminate(self, ts: Sequence[RuntimeTask]) -> None:
        """End these tasks' processes (all nodes at once); those alive end DONE, those
        that failed keep their state and reason. Tasks that ended already are asked
        for too: a descendant of theirs that escaped their group may live on."""
        launched = [t for t in ts if t.state != tasksm.PENDING]
        if not launched:
            return
        await self.end_processes(launched)
        live = [t for t in launched if t.pid is not None or t.state in tasksm.ALIVE]
        for node, b in by_node(live).items():
            self.apply(node, [(t, "EXITED", NO_PID, None) for t in b])

    async def _recover(self, timeout: float) -> str | None:
        """RECOVER: relaunch failed tasks; bring the others back to STANDBY."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        broken = [
            t
            for t in self.tasks
            if not t.hook and (t.state in tasksm.FAILED or t.state == tasksm.DONE)
        ]
        await self._terminate(broken)
        for node, b in by_node(broken).items():
            self.apply(node, [(t, "RELAUNCH", NO_PID, None) for t in b])
        if self.relocate is not None:  # those whose node is lost go elsewhere
            self.relocate(self, broken)
        for name in ("STOP", "RESET"):
            error = await self._order_all(name, max(0.05, deadline - loop.time()))
            if error is not None:
                return error
        return await self._launch_all(max(0.05, deadline - loop.time()))

    # -- reports from the backend ---------------------------------------------------------

    def on_reports(self, reports: Sequence[Report]) -> None:
        """Exits, END_OF_STREAM, ERROR, node loss and slow news, in one list; never
        raises (a fault here is logged, and the environment failed, not ignored)."""
        try:
            self._on_reports(reports)
        except Exception as e:
            log.exception("environment %s: reports could not be applied", self.id)
            self._fail(f"the controller could not apply task reports: {type(e).__name__}: {e}")

    def _on_reports(self, reports: Sequence[Report]) -> None:
        changes: dict[str, list[Change]] = {}
        seen: set[str] = set()  # tasks already changed in this list
        events: list[dict[str, Any]] = []
        for r in reports:
            t = self.by_id.get(r.task_id)
            if t is None:
                continue
            if r.kind == "end_of_stream":
                # of this run: the task runs, or its START answer is on its way (said
                # just before this); one said between runs is nobody's and is dropped
                this_run = t.state == tasksm.RUNNING or self.transitioning == "START_ACTIVITY"
                if this_run and (r.pid is None or t.pid is None or r.pid == t.pid):
                    self.taskset.end_of_stream(t)
                    events.append(self._task_event(t, t.state, status="END_OF_STREAM"))
                continue
            if r.kind == "slow":
                events.append(self._task_event(t, t.state, status="SLOW", reason=r.reason))
                continue
            ending = self._ending.get(t.id)
            hook_run = r.kind == "exited" and t.hook and r.pid != ending
            if hook_run and self.hooks.exited(t.id, r.code):
                continue  # a hook task's run ended: the run says what it means
            v = judge(r, state=t.state, pid=t.pid, direct=t.direct, ending=ending)
            if v.expected:
                self._ending.pop(t.id, None)
            if v.event is None or t.id in seen:
                continue
            seen.add(t.id)
            changes.setdefault(t.node, []).append((t, v.event, v.pid, v.reason))
        if events:
            self.announce(events)
        failed: list[RuntimeTask] = []
        for node, ch in changes.items():
            failed.extend(self.apply(node, ch))
        why = self._verdict(failed)
        if why is not None:
            self._fail(why)
        elif (
            self.state == envsm.RUNNING
            and self.transitioning is None
            and self.taskset.all_end_of_stream()
        ):
            self._spawn_auto("STOP_ACTIVITY", "every task reported END_OF_STREAM")

    def _verdict(self, failed: Sequence[RuntimeTask]) -> str | None:
        """Do these newly failed tasks fail the environment? Why, or None. O(failures)."""
        for t in failed:
            if t.spec.critical and not t.hook:
                return f"task {t.spec.path} on {t.node}: {t.reason}"
        colls = self.taskset.collections
        for t in failed:
            if t.member is not None and t.spec.collection is not None:
                why = colls.verdict(
                    t.spec.collection, f"task {t.spec.path} on {t.node}: {t.reason}"
                )
                if why is not None:
                    return why
        return None

    def _fail(self, why: str) -> None:
        """A critical failure: fail the running transition, or go to ERROR now."""
        if self.transitioning is not None:
            if self._failure is None:
                self._failure = why
            return
        if self.state in (envsm.ERROR, envsm.DONE, envsm.STANDBY):
            return
        # GO_ERROR at once: announced after it is stored (the journal keeps the order).
        self.error = why
        now = self.clock()
        src = self.state
        self.journal.write(lambda: self._go_error_rows(src, why, now))
        self._set_state(envsm.ERROR, event="GO_ERROR", error=why)
        ev = self._transition_event("GO_ERROR", src, envsm.ERROR, "DONE")
        ev["error"] = why
        self.announce([ev, *self._role_events()])
        if any(item.trigger.name == "GO_ERROR" for item in self.hooks.items):
            self._spawn_auto("GO_ERROR", why)

    def _go_error_rows(self, src: str, why: str, now: float) -> list[dict[str, Any]]:
        self.store.add_transition(self.id, "GO_ERROR", src, envsm.ERROR, why, now)
        return []

    def _spawn_auto(self, event: str, why: str) -> None:
        if self._auto is not None and not self._auto.done():
            return

        async def run() -> None:
            try:
                if event == "GO_ERROR":
                    # state already ERROR; run the GO_ERROR hooks through the lock
                    async with self.lock:
                        running: Running = {}
                        try:
                            slots = schedule(self.hooks.items, "GO_ERROR", envsm.ERROR, envsm.ERROR)
                            for slot in slots:
                                if not slot.tasks:
                                    await self.hooks.run_slot(slot, event, running)
                        finally:
                            await self.hooks.cancel(running)
                else:
                    note = f"automatic {event}: {why}"
                    self.announce([self._env_event(self.state, note=note)])
                    await self.transition(event)
            except TransitionError:
                pass
            except Exception:
                log.exception("environment %s: automatic %s", self.id, event)

        self._auto = asyncio.ensure_future(run())

    # -- destroy --------------------------------------------------------------------------

    async def destroy(self, *, timeout: float = 30.0, actor: str | None = None) -> None:
        """Stop, exit, kill, clean up; the environment ends DONE, whatever its state.

        Calls and hook tasks with a DESTROY trigger run around the teardown (the
        teardown is the core's work of a DESTROY "transition"); their failures are
        reported, and never keep the environment from ending."""
        if self._auto is not None and not self._auto.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._auto), timeout)
            except (TimeoutError, Exception):
                self._auto.cancel()
        async with self.lock:
            self.actor = actor
            running: Running = {}
            torn_down = False
            try:
                # only DESTROY's own moments: leave_/enter_ fire in the STOP and EXIT within
                for slot in schedule(self.hooks.items, "DESTROY", "", ""):
                    if slot.tasks:
                        torn_down = True
                        await self._teardown(timeout)
                    else:
                        await self.hooks.run_slot(slot, "DESTROY", running)
            finally:
                with contextlib.suppress(Exception):
                    await self.hooks.cancel(running)
                if not torn_down:
                    await self._teardown(timeout)
                self.announce([self._env_event(envsm.DONE, note="destroyed")])
                self.actor = None

    async def _teardown(self, timeout: float) -> None:
        try:
            if self.state == envsm.RUNNING:
                with contextlib.suppress(TransitionError):
                    await self._transition("STOP_ACTIVITY", timeout)
            if self.state in (envsm.CONFIGURED, envsm.DEPLOYED, envsm.STANDBY):
                with contextlib.suppress(TransitionError):
                    await self._transition("EXIT", timeout)
        finally:
            # whatever failed above, nothing of this environment is left running
            self._close_run()
            await self._terminate(self.tasks)
            never = [t for t in self.tasks if t.state == tasksm.PENDING]
            for node, ts in by_node(never).items():
                self.apply(node, [(t, "EXITED", None, "never started") for t in ts])
            for node in {t.node for t in self.tasks}:
                with contextlib.suppress(Exception):
                    await self.backend.release(node, self.id)
            if self.state != envsm.DONE:
                self._set_state(envsm.DONE, event="DESTROY")

    # -- state, store, events ---------------------------------------------------------------

    def apply(self, node: str, changes: Sequence[Change]) -> list[RuntimeTask]:
        """One node's task changes: one store write, then their events. Returns the
        tasks that just failed."""
        if not changes:
            return []
        now = self.clock()
        stored, events, failed = self.taskset.apply(node, self.id, changes, now)
        if not stored:
            return failed
        self.version += 1
        env_id = self.id
        self.journal.write(lambda: self.store.update_tasks(env_id, stored, now, events))
        return failed

    def _set_state(self, state: str, *, event: str, error: str | None = None) -> None:
        self.version += 1
        self.state = state
        if error is not None:
            self.error = error
        elif state != envsm.ERROR:
            self.error = None
        ev = self._env_event(state, transition=event)
        if error is not None:
            ev["error"] = error
        now = self.clock()
        env_id = self.id
        self.journal.write(
            lambda: self.store.set_environment(env_id, state, now, error=error, events=[ev])
        )

    def announce(self, events: Sequence[dict[str, Any]]) -> None:
        """Store these events, then announce them."""
        if events:
            now = self.clock()
            evs = list(events)
            self.journal.write(lambda: self.store.add_events(evs, now))

    def _task_event(self, t: RuntimeTask, state: str, **extra: Any) -> dict[str, Any]:
        return task_event(self.id, t, state, **extra)

    def _env_event(self, state: str, **extra: Any) -> dict[str, Any]:
        ev: dict[str, Any] = {"kind": "environment", "env": self.id, "state": state}
        if self.run_number is not None:
            ev["run_number"] = self.run_number
        if self.actor is not None:
            ev["actor"] = self.actor
        ev.update(extra)
        return ev

    def _step_event(
        self, event: str, step: str, error: str | None, started: float
    ) -> dict[str, Any]:
        """One step (moment) of a transition: its calls, or the core's work (TASKS)."""
        ev: dict[str, Any] = {
            "kind": "transition",
            "env": self.id,
            "transition": event,
            "step": step,
            "status": "DONE" if error is None else "FAILED",
            "duration": round(self.clock() - started, 6),
        }
        if error is not None:
            ev["error"] = error
        return ev

    def _transition_event(self, event: str, src: str, dst: str, status: str) -> dict[str, Any]:
        ev: dict[str, Any] = {
            "kind": "transition",
            "env": self.id,
            "transition": event,
            "src": src,
            "dst": dst,
            "status": status,
        }
        if self.actor is not None:
            ev["actor"] = self.actor
        return ev

    def _role_events(self) -> list[dict[str, Any]]:
        """Aggregated states of the top-level roles that changed."""
        out = []
        for role in self.taskset.roles():
            s = self.taskset.aggregate(role)
            if self._roles.get(role) != s:
                self._roles[role] = s
                out.append({"kind": "role", "env": self.id, "role": role, "state": s})
        return out

    # -- views ------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Tasks by state (hook tasks, which run only at their trigger, left out)."""
        return dict(self.taskset.counts)

    def aggregate(self) -> str:
        return self.taskset.aggregate()
