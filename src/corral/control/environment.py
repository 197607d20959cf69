"""The environment controller: runs one environment's life from its plan.

How this runs. One ``Environment`` per environment, on the control plane's event loop.
Transitions are serialized by one asyncio lock and each has a deadline. A transition
is the slot list of ``lifecycle.hooks.schedule``: hook calls start and are awaited at
their slots (one asyncio task per *call*, calls are few), and the TASKS slot carries
out the commands of ``lifecycle.environment.step`` with one coroutine per *node*, each
handing its node's whole batch to the backend. Outcomes are applied per node batch:
one store transaction, then the events go out. Nothing here runs per task in time:
no task, timer or poll per task.

Unsolicited reports (exits, END_OF_STREAM, ERROR, slow) arrive in lists from the
backend through the control plane. A critical failure sends the environment to ERROR
at once when no transition runs; during a transition it fails that transition.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from corral.calls import CallContext, CallError, Registry
from corral.events.bus import EventBus
from corral.lifecycle import environment as envsm
from corral.lifecycle import task as tasksm
from corral.lifecycle.hooks import Slot, schedule
from corral.model.plan import CallSpec, Plan, TaskSpec
from corral.model.vocabulary import Trigger
from corral.ports.backend import Backend, ChannelRequest, Launch, Order, Outcome, Report
from corral.store.sqlite import SqliteStore, TaskChange, TaskRow

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


class TransitionError(Exception):
    """A transition that was refused or failed; str() says why, for a person."""

    def __init__(self, message: str, *, state: str) -> None:
        super().__init__(message)
        self.state = state  # the environment's state afterwards


@dataclass(slots=True, eq=False)
class RuntimeTask:
    """One task of a running environment: ~100 bytes, plus its shared spec."""

    idx: int
    id: str
    spec: TaskSpec
    node: str
    state: str = tasksm.PENDING
    pid: int | None = None
    reason: str | None = None
    eos: bool = False
    member: str | None = None  # the collection member (role path) it belongs to

    @property
    def hook(self) -> bool:
        return self.spec.trigger is not None


@dataclass(frozen=True, slots=True)
class _HookTask:
    """A hook task as ``schedule`` sees it: started at its trigger like a call."""

    task: RuntimeTask
    trigger: Trigger
    await_: Trigger

    @property
    def path(self) -> str:
        return self.task.spec.path

    @property
    def critical(self) -> bool:
        return self.task.spec.critical


Hooked = CallSpec | _HookTask


class Environment:
    """One environment: its plan, its tasks' runtime state, its transitions."""

    def __init__(
        self,
        env_id: str,
        plan: Plan,
        *,
        backend: Backend,
        store: SqliteStore,
        bus: EventBus,
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
        self.bus = bus
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
        self._ending: set[str] = set()  # task ids being ended on purpose
        self._hook_waiters: dict[str, asyncio.Future[int | None]] = {}
        self._auto: asyncio.Task[None] | None = None
        self.variables = dict(plan.variables)
        self.actor: str | None = None  # who asked for the transition under way
        self.version = 0  # bumped by every change of a task's or the environment's state
        self.created_by: str | None = None

        placed = list(nodes) if nodes is not None else [backend.nodes()[0].name] * len(plan.tasks)
        members: dict[str, str] = {}
        for coll in plan.collections:
            for m in coll.members:
                members[m] = coll.path
        self.tasks: list[RuntimeTask] = []
        self.by_id: dict[str, RuntimeTask] = {}
        self.by_path: dict[str, RuntimeTask] = {}
        for i, spec in enumerate(plan.tasks):
            t = RuntimeTask(i, f"{env_id}:{i}", spec, placed[i])
            if members:
                t.member = _member_of(spec.path, members)
            self.tasks.append(t)
            self.by_id[t.id] = t
            self.by_path[spec.path] = t
        self.by_node: dict[str, list[RuntimeTask]] = {}
        for t in self.tasks:
            if not t.hook:
                self.by_node.setdefault(t.node, []).append(t)
        self.hooked: list[Hooked] = list(plan.calls)
        for t in self.tasks:
            if t.hook:
                assert t.spec.trigger is not None
                self.hooked.append(_HookTask(t, t.spec.trigger, t.spec.await_ or t.spec.trigger))
        self.collections = {c.path: c for c in plan.collections}
        self.ports = list(ports) if ports is not None else [()] * len(plan.tasks)
        self.addresses: dict[tuple[str, str], str] = {}
        self._args: dict[str, dict[str, str]] = {}
        self._roles: dict[str, str] = {}

    # -- creation -----------------------------------------------------------------------

    def create(self) -> None:
        rows = [
            TaskRow(t.idx, t.spec.path, t.spec.task_class, t.node, t.state, t.spec.critical)
            for t in self.tasks
        ]
        ev = self._env_event(envsm.STANDBY, note="created")
        ev["tasks"] = len(self.tasks)
        ev["name"] = self.plan.name
        if self.created_by is not None:
            ev["actor"] = self.created_by
        self._publish(
            self.store.create_environment(
                self.id,
                self.plan.name,
                self.source,
                self.variables,
                rows,
                self.clock(),
                [ev],
                created_by=self.created_by,
            )
        )

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
        tid = self.store.begin_transition(self.id, event, src, started, self.actor)
        self.transitioning = event
        self._failure = None
        self._events([self._transition_event(event, src, dst, "STARTED")])
        slots = schedule(self.hooked, event, src, dst)
        running: dict[int, asyncio.Task[tuple[bool, str | None]]] = {}
        error: str | None = None
        tasks_done = False
        try:
            for slot in slots:
                t_slot = self.clock()
                if slot.tasks:
                    error = self._failure
                    if error is None:
                        error = await self._core(event, commands, deadline)
                        tasks_done = True
                else:
                    error = await self._run_slot(slot, event, running)
                if error is None and (tasks_done or slot.tasks):
                    error = self._failure
                self._events([self._step_event(event, slot.label, error, t_slot)])
                if error is not None:
                    break
        except asyncio.CancelledError:
            error = f"{event} was interrupted"
            await self._cancel_calls(running)
            self._finish_failed(tid, event, src, dst, error, tasks_done)
            raise
        await self._cancel_calls(running)
        if error is not None:
            if event == "EXIT":
                await self._terminate(self.tasks)  # EXIT ends the processes, whatever failed
            self._finish_failed(tid, event, src, dst, error, tasks_done)
            raise TransitionError(f"{event} failed: {error}", state=self.state)
        self._set_state(dst, event=event)
        self.store.end_transition(tid, "DONE", dst, None, self.clock())
        ev = self._transition_event(event, src, dst, "DONE")
        ev["duration"] = round(self.clock() - started, 6)
        self._events([ev, *self._role_events()])
        self.transitioning = None
        if dst == envsm.RUNNING and self._all_eos():
            self._spawn_auto("STOP_ACTIVITY", "every task reported END_OF_STREAM")
        return dst

    def _finish_failed(
        self, tid: int, event: str, src: str, dst: str, error: str, tasks_done: bool
    ) -> None:
        self.transitioning = None
        # Before the tasks moved, a failed call leaves the state as it was; after it,
        # or when a critical task failed meanwhile, the environment is in ERROR.
        broken = tasks_done or self._failure is not None
        if broken and self.state != envsm.ERROR and event != "EXIT":
            self._set_state(envsm.ERROR, event=event, error=error)
        elif event == "EXIT":
            self._set_state(envsm.DONE, event=event, error=error)
        self.store.end_transition(tid, "FAILED", self.state, error, self.clock())
        ev = self._transition_event(event, src, dst, "FAILED")
        ev["error"] = error
        self._events([ev, *self._role_events()])

    async def _run_slot(
        self,
        slot: Slot[Hooked],
        event: str,
        running: dict[int, asyncio.Task[tuple[bool, str | None]]],
    ) -> str | None:
        for item in slot.start:
            running[id(item)] = asyncio.ensure_future(self._run_hooked(item, event, slot.label))
        first_error: str | None = None
        for item in slot.wait:
            fut = running.pop(id(item), None)
            if fut is None:
                continue
            ok, why = await fut
            if not ok and item.critical and first_error is None:
                first_error = f"critical call {item.path} failed: {why}"
        return first_error

    async def _cancel_calls(
        self, running: dict[int, asyncio.Task[tuple[bool, str | None]]]
    ) -> None:
        for fut in running.values():
            fut.cancel()
        for fut in running.values():
            with contextlib.suppress(asyncio.CancelledError):
                await fut
        running.clear()

    async def _run_hooked(self, item: Hooked, event: str, label: str) -> tuple[bool, str | None]:
        """Run one call (or hook task) with its timeout; report it; never raise."""
        if isinstance(item, _HookTask):
            return await self._run_hook_task(item, event, label)
        ctx = CallContext(
            environment_id=self.id,
            event=event,
            trigger=str(item.trigger),
            path=item.path,
            func=item.func,
            run_number=self.run_number,
            variables=self.variables,
        )
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        base: dict[str, Any] = {
            "kind": "call",
            "env": self.id,
            "path": item.path,
            "func": item.func,
            "trigger": str(item.trigger),
            "transition": event,
            "critical": item.critical,
        }
        self._events([dict(base, status="STARTED")])
        ok, why, result = True, None, None
        try:
            result = await asyncio.wait_for(self.calls.invoke(item.func, ctx), item.timeout)
        except TimeoutError:
            ok, why = False, f"timed out after {item.timeout:g} s (cancelled)"
        except CallError as e:
            ok, why = False, str(e)
        except Exception as e:  # a plugin bug must not break the controller
            ok, why = False, f"{type(e).__name__}: {e}"
        status = "DONE" if ok else ("TIMEOUT" if "timed out" in str(why) else "FAILED")
        ev = dict(base, status=status)
        ev["duration"] = round(loop.time() - t0, 6)
        if why:
            ev["error"] = why
        if result is not None:
            ev["result"] = result[:2000]
            if item.return_var:
                self.variables[item.return_var] = result
        self._events([ev])
        return ok, why

    async def _run_hook_task(
        self, item: _HookTask, event: str, label: str
    ) -> tuple[bool, str | None]:
        t = item.task
        spec = t.spec
        timeout = spec.timeout or 30.0
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int | None] = loop.create_future()
        self._hook_waiters[t.id] = fut
        ok, why = True, None
        try:
            self._apply(t.node, [(t, tasksm.LAUNCHING, None, None)])
            [out] = await self.backend.launch(t.node, [self._launch_of(t)], timeout, timeout)
            if not out.ok:
                ok, why = False, out.error
            else:
                t.pid = out.pid
                try:
                    code = await asyncio.wait_for(fut, timeout)
                except TimeoutError:
                    ok, why = False, f"did not end within {timeout:g} s (killed)"
                    self._ending.add(t.id)
                    await self.backend.stop(t.node, [t.id], 0.5)
                else:
                    if code != 0:
                        ok, why = False, f"exited with status {code}"
        finally:
            self._hook_waiters.pop(t.id, None)
        self._apply(t.node, [(t, tasksm.DONE if ok else tasksm.ERROR, None, why)])
        return ok, why

    # -- the core's own work -------------------------------------------------------------

    async def _core(
        self, event: str, commands: Sequence[envsm.Command], deadline: float
    ) -> str | None:
        for cmd in commands:
            loop = asyncio.get_running_loop()
            left = max(0.05, deadline - loop.time())
            if isinstance(cmd, envsm.Launch):
                error = await self._launch_all(left)
            elif isinstance(cmd, envsm.Transition):
                error = await self._order_all(cmd.name, left)
            elif isinstance(cmd, envsm.OpenRun):
                self.run_number, evs = self.store.open_run(
                    self.id, self.clock(), [{"kind": "run", "env": self.id, "status": "STARTED"}]
                )
                self.variables["run_number"] = str(self.run_number)
                self._publish(evs)
                error = None
            elif isinstance(cmd, envsm.CloseRun):
                self._close_run()
                error = None
            elif isinstance(cmd, envsm.Terminate):
                await self._terminate(self.tasks)
                error = None
            elif isinstance(cmd, envsm.Recover):
                error = await self._recover(left)
            else:  # pragma: no cover - the table has no other commands
                error = f"unknown command {cmd!r}"
            if error is not None:
                return error
        return None

    def _close_run(self) -> None:
        if self.run_number is None:
            return
        ev = {"kind": "run", "env": self.id, "status": "STOPPED", "run_number": self.run_number}
        self._publish(self.store.close_run(self.id, self.run_number, self.clock(), [ev]))
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
        for b in self.plan.binds:
            t = self.by_path.get(b.task)
            if t is None or (b.task, b.name) in self.addresses:
                continue
            requests.setdefault(t.node, []).append(
                (b.task, b.name, ChannelRequest(t.id, b.name, b.addressing))
            )
        for node, reqs in requests.items():
            addrs = await self.backend.allocate(node, self.id, [r[2] for r in reqs])
            for (path, name, _), addr in zip(reqs, addrs, strict=True):
                self.addresses[(path, name)] = addr
        args: dict[str, dict[str, str]] = {}
        for t in self.tasks:
            a = {"environment_id": self.id, "task_id": t.id, "task_path": t.spec.path}
            a.update(t.spec.properties)
            if self.ports[t.idx]:  # the ports placement gave it from its node's range
                a["ports"] = ",".join(str(p) for p in self.ports[t.idx])
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

    def _launch_of(self, t: RuntimeTask) -> Launch:
        log = None
        if self.log_dir is not None:
            log = f"{self.log_dir}/{self.id}/{t.spec.path}.log"
        env = (
            ("CORRAL_ENVIRONMENT_ID", self.id),
            ("CORRAL_TASK_ID", t.id),
            ("CORRAL_TASK_PATH", t.spec.path),
        )
        control = "hook" if t.hook else ("direct" if t.spec.control == "direct" else "basic")
        health = t.spec.health if control == "basic" else None
        return Launch(t.id, t.spec.path, t.spec.command, control, env, log, health)

    async def _launch_node(self, node: str, ts: list[RuntimeTask], timeout: float) -> str | None:
        self._apply(node, [(t, tasksm.LAUNCHING, None, None) for t in ts])
        slow = min(2.0, timeout / 2)
        outs = await self.backend.launch(node, [self._launch_of(t) for t in ts], timeout, slow)
        return self._outcomes(node, ts, outs, "READY", "launch")

    async def _order_all(self, name: str, timeout: float) -> str | None:
        want = {
            "CONFIGURE": (tasksm.STANDBY,),
            "START": (tasksm.CONFIGURED,),
            "STOP": (tasksm.RUNNING,),
            "RESET": (tasksm.CONFIGURED,),
            "EXIT": (tasksm.STANDBY, tasksm.CONFIGURED),
        }[name]
        ts = [t for t in self.tasks if not t.hook and t.state in want]
        return await self._per_node(lambda node, b: self._order_node(node, b, name, timeout), ts)

    async def _order_node(
        self, node: str, ts: list[RuntimeTask], name: str, timeout: float
    ) -> str | None:
        direct = [t for t in ts if t.spec.control == "direct"]
        basic = [t for t in ts if t.spec.control != "direct"]
        if basic:
            nxt = tasksm.task_step(basic[0].state, name)
            if name == "EXIT":
                for t in basic:
                    self._ending.add(t.id)
                await self.backend.stop(node, [t.id for t in basic], GRACE)
            self._apply(node, [(t, nxt or t.state, None, None) for t in basic if nxt])
        if not direct:
            return None
        if name == "EXIT":
            for t in direct:
                self._ending.add(t.id)
        run = {"environment_id": self.id}
        if name == "START" and self.run_number is not None:
            run["run_number"] = str(self.run_number)
        orders = [
            Order(t.id, name, self._args.get(t.spec.path, run) if name == "CONFIGURE" else run)
            for t in direct
        ]
        slow = min(2.0, timeout / 2)
        outs = await self.backend.transition(node, orders, timeout, slow)
        return self._outcomes(node, direct, outs, name, name)

    def _outcomes(
        self, node: str, ts: list[RuntimeTask], outs: list[Outcome], event: str, what: str
    ) -> str | None:
        """Apply one node's outcomes; return the first critical failure, if any."""
        changes: list[tuple[RuntimeTask, str, int | None, str | None]] = []
        first: str | None = None
        failed: list[RuntimeTask] = []
        for t, out in zip(ts, outs, strict=True):
            if t.state in tasksm.FAILED or t.state == tasksm.DONE:
                if t.state in tasksm.FAILED and t.spec.critical and first is None:
                    first = f"task {t.spec.path} on {node}: {t.reason}"
                continue  # a report got there first
            if out.ok:
                nxt = tasksm.task_step(t.state, event) or t.state
                changes.append((t, nxt, out.pid, None))
            else:
                changes.append((t, tasksm.ERROR, out.pid, out.error))
                failed.append(t)
                if t.spec.critical and first is None:
                    first = f"task {t.spec.path} on {node}: {out.error}"
        self._apply(node, changes)
        for t in failed:
            if not t.spec.critical:
                why = self._collection_check(t)
                if why and first is None:
                    first = why
        return first

    async def _per_node(
        self,
        fn: Callable[[str, list[RuntimeTask]], Any],
        ts: list[RuntimeTask],
    ) -> str | None:
        groups: dict[str, list[RuntimeTask]] = {}
        for t in ts:
            groups.setdefault(t.node, []).append(t)
        if not groups:
            return None
        results = await asyncio.gather(*(fn(node, b) for node, b in groups.items()))
        for r in results:
            if r is not None:
                return str(r)
        return None

    async def _terminate(self, ts: Sequence[RuntimeTask]) -> None:
        """End these tasks' processes (all nodes at once) and mark them DONE."""
        groups: dict[str, list[RuntimeTask]] = {}
        for t in ts:
            if t.pid is not None or t.state in tasksm.ALIVE or t.state in tasksm.FAILED:
                self._ending.add(t.id)
                groups.setdefault(t.node, []).append(t)
        await asyncio.gather(
            *(self.backend.stop(n, [t.id for t in b], GRACE) for n, b in groups.items())
        )
        for node, b in groups.items():
            self._apply(
                node, [(t, tasksm.DONE, None, t.reason) for t in b if t.state != tasksm.DONE]
            )

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
        for node, b in _by_node(broken).items():
            self._apply(node, [(t, tasksm.PENDING, None, None) for t in b])
        for t in broken:
            t.eos = False
            t.reason = None
        for name in ("STOP", "RESET"):
            error = await self._order_all(name, max(0.05, deadline - loop.time()))
            if error is not None:
                return error
        return await self._launch_all(max(0.05, deadline - loop.time()))

    # -- reports from the backend ---------------------------------------------------------

    def on_reports(self, reports: Sequence[Report]) -> None:
        """Exits, END_OF_STREAM, ERROR and slow news, in one list; never raises."""
        changes: dict[str, list[tuple[RuntimeTask, str, int | None, str | None]]] = {}
        events: list[dict[str, Any]] = []
        critical_failure: str | None = None
        noncritical_failed: list[RuntimeTask] = []
        for r in reports:
            t = self.by_id.get(r.task_id)
            if t is None:
                continue
            if r.kind == "exited":
                waiter = self._hook_waiters.get(t.id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(r.code)
                    continue
                t.pid = None
                if t.id in self._ending or t.state == tasksm.DONE:
                    self._ending.discard(t.id)
                    if t.state != tasksm.DONE and t.state not in tasksm.FAILED:
                        changes.setdefault(t.node, []).append((t, tasksm.DONE, None, None))
                    continue
                if t.spec.control != "direct" and r.code == 0:
                    changes.setdefault(t.node, []).append((t, tasksm.DONE, None, "finished"))
                    continue
                why = r.reason or "process ended"
                if t.state in tasksm.FAILED:
                    continue
                if t.state == tasksm.PENDING:
                    continue
                changes.setdefault(t.node, []).append((t, tasksm.ERROR, None, why))
            elif r.kind == "error":
                if t.state in tasksm.FAILED or t.state in (tasksm.DONE, tasksm.PENDING):
                    continue
                why = r.reason
                changes.setdefault(t.node, []).append((t, tasksm.ERROR, None, why))
            elif r.kind == "end_of_stream":
                t.eos = True
                events.append(self._task_event(t, t.state, status="END_OF_STREAM"))
                continue
            elif r.kind == "slow":
                events.append(self._task_event(t, t.state, status="SLOW", reason=r.reason))
                continue
            else:
                continue
            if t.spec.critical:
                if critical_failure is None:
                    critical_failure = f"task {t.spec.path} on {t.node}: {why}"
            else:
                noncritical_failed.append(t)
        if events:
            self._events(events)
        for node, ch in changes.items():
            self._apply(node, ch)
        for t in noncritical_failed:
            why2 = self._collection_check(t)
            if why2 and critical_failure is None:
                critical_failure = why2
        if critical_failure is not None:
            self._fail(critical_failure)
        elif self.state == envsm.RUNNING and self.transitioning is None and self._all_eos():
            self._spawn_auto("STOP_ACTIVITY", "every task reported END_OF_STREAM")

    def _collection_check(self, t: RuntimeTask) -> str | None:
        """A non-critical task failed: does its collection still have nmin members?"""
        if t.member is None:
            return None
        coll = None
        for path, c in self.collections.items():
            if t.member in c.members:
                coll = (path, c)
                break
        if coll is None:
            return None
        path, c = coll
        bad = {x.member for x in self.tasks if x.member in c.members and x.state in tasksm.FAILED}
        healthy = len(c.members) - len(bad)
        if healthy < c.nmin:
            return (
                f"collection {path} has {healthy} of {len(c.members)} members healthy, "
                f"fewer than nmin={c.nmin} (last: task {t.spec.path} on {t.node}: {t.reason})"
            )
        return None

    def _all_eos(self) -> bool:
        direct = [t for t in self.tasks if not t.hook and t.spec.control == "direct"]
        return bool(direct) and all(t.eos for t in direct if t.state == tasksm.RUNNING)

    def _fail(self, why: str) -> None:
        """A critical failure: fail the running transition, or go to ERROR now."""
        if self.transitioning is not None:
            if self._failure is None:
                self._failure = why
            return
        if self.state in (envsm.ERROR, envsm.DONE, envsm.STANDBY):
            return
        # GO_ERROR at once: persisted and announced before anything else happens.
        self.error = why
        now = self.clock()
        tid = self.store.begin_transition(self.id, "GO_ERROR", self.state, now)
        src = self.state
        self._set_state(envsm.ERROR, event="GO_ERROR", error=why)
        self.store.end_transition(tid, "DONE", envsm.ERROR, why, self.clock())
        ev = self._transition_event("GO_ERROR", src, envsm.ERROR, "DONE")
        ev["error"] = why
        self._events([ev, *self._role_events()])
        if any(c.trigger.name == "GO_ERROR" for c in self.plan.calls):
            self._spawn_auto("GO_ERROR", why)

    def _spawn_auto(self, event: str, why: str) -> None:
        if self._auto is not None and not self._auto.done():
            return

        async def run() -> None:
            try:
                if event == "GO_ERROR":
                    # state already ERROR; run the GO_ERROR hooks through the lock
                    async with self.lock:
                        slots = schedule(self.hooked, "GO_ERROR", envsm.ERROR, envsm.ERROR)
                        running: dict[int, asyncio.Task[tuple[bool, str | None]]] = {}
                        for slot in slots:
                            if not slot.tasks:
                                await self._run_slot(slot, event, running)
                        await self._cancel_calls(running)
                else:
                    self._events(
                        [
                            {
                                "kind": "environment",
                                "env": self.id,
                                "state": self.state,
                                "note": f"automatic {event}: {why}",
                            }
                        ]
                    )
                    await self.transition(event)
            except TransitionError:
                pass

        self._auto = asyncio.ensure_future(run())

    # -- destroy --------------------------------------------------------------------------

    async def destroy(self, *, timeout: float = 30.0, actor: str | None = None) -> None:
        """Stop, exit, kill, clean up; the environment ends DONE, whatever its state."""
        if self._auto is not None and not self._auto.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._auto), timeout)
            except (TimeoutError, Exception):
                self._auto.cancel()
        async with self.lock:
            self.actor = actor
            if self.state == envsm.RUNNING:
                with contextlib.suppress(TransitionError):
                    await self._transition("STOP_ACTIVITY", timeout)
            if self.state in (envsm.CONFIGURED, envsm.DEPLOYED, envsm.STANDBY):
                with contextlib.suppress(TransitionError):
                    await self._transition("EXIT", timeout)
            self._close_run()
            await self._terminate(self.tasks)
            never = [t for t in self.tasks if t.state == tasksm.PENDING]
            for node, ts in _by_node(never).items():
                self._apply(node, [(t, tasksm.DONE, None, "never started") for t in ts])
            for node in {t.node for t in self.tasks}:
                await self.backend.release(node, self.id)
            if self.state != envsm.DONE:
                self._set_state(envsm.DONE, event="DESTROY")
            self._events([self._env_event(envsm.DONE, note="destroyed")])
            self.actor = None

    # -- state, store, events ---------------------------------------------------------------

    def _apply(
        self, node: str, changes: Sequence[tuple[RuntimeTask, str, int | None, str | None]]
    ) -> None:
        """One node's task changes: one transaction, then their events."""
        if not changes:
            return
        self.version += 1
        stored = []
        groups: dict[str, list[str]] = {}
        singles: list[dict[str, Any]] = []
        for t, state, pid, reason in changes:
            t.state = state
            if pid is not None:
                t.pid = pid
            t.reason = reason
            stored.append(TaskChange(t.idx, state, pid, reason))
            if reason is not None:
                singles.append(self._task_event(t, state, reason=reason))
            else:
                groups.setdefault(state, []).append(t.spec.path)
        events: list[dict[str, Any]] = [
            {"kind": "task", "env": self.id, "node": node, "state": s, "count": len(p), "tasks": p}
            for s, p in groups.items()
        ]
        events.extend(singles)
        self._publish(self.store.update_tasks(self.id, stored, self.clock(), events))

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
        self._publish(
            self.store.set_environment(self.id, state, self.clock(), error=error, events=[ev])
        )

    def _task_event(self, t: RuntimeTask, state: str, **extra: Any) -> dict[str, Any]:
        """The event of one task: what, where, which process, how critical."""
        ev: dict[str, Any] = {
            "kind": "task",
            "env": self.id,
            "node": t.node,
            "task": t.spec.path,
            "id": t.id,
            "state": state,
            "pid": t.pid,
            "critical": t.spec.critical,
        }
        ev.update(extra)
        return ev

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
        per: dict[str, list[tuple[str, bool]]] = {}
        for t in self.tasks:
            if t.hook:
                continue
            parts = t.spec.path.split(".", 2)
            role = ".".join(parts[:2])
            per.setdefault(role, []).append((t.state, t.spec.critical))
        out = []
        for role, states in per.items():
            s = tasksm.aggregate(states)
            if self._roles.get(role) != s:
                self._roles[role] = s
                out.append({"kind": "role", "env": self.id, "role": role, "state": s})
        return out

    def _events(self, events: Sequence[dict[str, Any]]) -> None:
        if events:
            self._publish(self.store.add_events(events, self.clock()))

    def _publish(self, stored: Sequence[dict[str, Any]]) -> None:
        self.bus.publish(stored)

    # -- views ------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Tasks by state (hook tasks, which run only at their trigger, left out)."""
        out: dict[str, int] = {}
        for t in self.tasks:
            if not t.hook:
                out[t.state] = out.get(t.state, 0) + 1
        return out

    def aggregate(self) -> str:
        return tasksm.aggregate((t.state, t.spec.critical) for t in self.tasks if not t.hook)


def _member_of(path: str, members: dict[str, str]) -> str | None:
    p = path
    while "." in p:
        p = p.rsplit(".", 1)[0]
        if p in members:
            return p
    return None


def _by_node(ts: Sequence[RuntimeTask]) -> dict[str, list[RuntimeTask]]:
    out: dict[str, list[RuntimeTask]] = {}
    for t in ts:
        out.setdefault(t.node, []).append(t)
    return out
