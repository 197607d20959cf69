"""The control plane: environments, one backend, the store and the event bus together.

How this runs. One ``ControlPlane`` per control process, on one asyncio loop. It owns
the backend's report subscription and routes each list of reports to the
environments they concern (task ids are ``<environment id>:<index>``), in one call
per environment. It is the store's single writer, through one journal (``journal``)
that keeps writes in order and retries them while the store fails.

At start, ``adopt_leftovers`` deals with what a previous control process left: its
processes are ended, its unfinished transitions closed, its environments' tasks
marked LOST (once); then each such environment is either taken over (in ERROR, so
that an operator can RECOVER or destroy it) or, for a one-shot ``corral run``, ended.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from corral.calls import Registry
from corral.control import heap, recipes
from corral.control.environment import Environment
from corral.control.journal import Journal
from corral.control.ledger import (
    Ledger,
    PlacementError,
    demands_of,
    lease_of,
    priority_of,
    strategy_of,
)
from corral.control.tasks import RuntimeTask
from corral.events.bus import EventBus
from corral.lifecycle import environment as envsm
from corral.lifecycle import task as tasksm
from corral.model.inventory import Node
from corral.model.plan import Plan
from corral.planning.placement import NoFit
from corral.planning.preemption import PRIORITY_CLASSES
from corral.ports.backend import BUSY, Backend, Report
from corral.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from corral.control.periodic import PeriodicScheduler
    from corral.control.runner import JobRunner
    from corral.control.services import ServiceSupervisor

log = logging.getLogger("corral.plane")
# judges a placement before the environment exists: the plan and each task's node; raises
# to refuse it (e.g. a detector lock; see ControlService)
Admit = Callable[[Plan, Sequence[str]], None]
# at start, the processes of no environment that agents still run: owner id -> index ->
# (pid, the state it last said)
Live = Mapping[str, Mapping[int, tuple[int, str | None]]]
# takes some of them over: (notes, the task ids it took)
Claim = Callable[[Live], tuple[list[str], Collection[str]]]
RESTARTED = "the control process restarted after a crash"


def new_environment_id() -> str:
    """A short, unique, URL-safe environment id (AliECS-style: 11 characters)."""
    raw = time.time_ns().to_bytes(8, "big")[-3:] + os.urandom(4)
    return base64.b32encode(raw).decode().rstrip("=").lower()[:11]


def install_child_watcher() -> None:
    """On 3.11, reap asyncio subprocesses through pidfd, not a thread per child.

    Call it from inside the running loop (3.12 and later do this by themselves).
    """
    if sys.version_info < (3, 12):  # pragma: no branch
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            watcher = asyncio.PidfdChildWatcher()
            watcher.attach_loop(asyncio.get_running_loop())
            asyncio.get_event_loop_policy().set_child_watcher(watcher)


class ControlPlane:
    def __init__(
        self,
        store: SqliteStore,
        backend: Backend,
        *,
        calls: Registry | None = None,
        bus: EventBus | None = None,
        log_dir: str | None = None,
        clock: Callable[[], float] = time.time,
        inventory: Sequence[Node] | None = None,
        priority_classes: Mapping[str, int] | None = None,
    ) -> None:
        """``inventory``: the nodes to place on (an inventory file); by default the
        backend's own."""
        heap.tune()
        self.store = store
        self.backend = backend
        self.calls = calls if calls is not None else Registry()
        self.bus = bus if bus is not None else EventBus()
        self.journal = Journal(self.bus)
        self.left: dict[str, str] = {}  # environments a previous process left, not run here: why
        self._reconciling: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Future[None]] = set()
        self._destroying: dict[str, asyncio.Future[None]] = {}
        self.log_dir = log_dir
        self.clock = clock
        self.environments: dict[str, Environment] = {}
        self.ledger = Ledger(inventory if inventory is not None else backend.nodes())
        known = {n.name for n in self.ledger.nodes}
        for name in json.loads(store.get_meta("cordoned") or "[]"):
            if name in known:  # cordons set through the API outlive a restart
                self.ledger.cordon(name, True)
        self.priority_classes = dict(priority_classes or PRIORITY_CLASSES)
        # judges where RECOVER moves tasks whose node was lost (the environment, then
        # each moved task's path and new node); raises to refuse (a detector lock)
        self.admit_moves: Callable[[Environment, Sequence[tuple[str, str]]], None] | None = None
        # (the job runner, the periodic scheduler and the service supervisor are made
        # when first used: `corral run` never imports them)
        backend.subscribe(self._on_reports)
        if inventory is None and hasattr(backend, "on_nodes"):  # a cluster's nodes change
            backend.on_nodes = lambda: self.ledger.update_nodes(backend.nodes())

    # -- jobs and services, on the same ledger (made when first used) -----------------------

    @functools.cached_property
    def jobs(self) -> JobRunner:
        """Batch jobs, array jobs and DAGs: units placed on the same ledger."""
        from corral.control.runner import JobRunner
        from corral.store.jobstore import JobStore

        return JobRunner(
            self.backend, self.ledger, self.journal, JobStore(self.store),
            priority_classes=self.priority_classes, clock=self.clock, log_dir=self.log_dir,
        )  # fmt: skip

    @functools.cached_property
    def periodic(self) -> PeriodicScheduler:
        """Batch jobs and DAGs on a cron schedule: one timer for them all."""
        from corral.control.periodic import PeriodicScheduler
        from corral.store.periodicstore import PeriodicStore

        return PeriodicScheduler(self.jobs, PeriodicStore(self.store), clock=self.clock)

    @functools.cached_property
    def services(self) -> ServiceSupervisor:
        from corral.control.services import ServiceSupervisor
        from corral.store.servicestore import ServiceStore

        return ServiceSupervisor(
            self.backend, self.ledger, self.journal, ServiceStore(self.store),
            priority_classes=self.priority_classes, clock=self.clock, log_dir=self.log_dir,
            address_of=self.address_of,
        )  # fmt: skip

    def _made(self, name: str) -> bool:
        """Has ``jobs``, ``periodic`` or ``services`` been made (else: it has nothing)."""
        return name in self.__dict__

    def create(
        self,
        plan: Plan,
        *,
        env_id: str | None = None,
        source: str | None = None,
        timeouts: dict[str, float] | None = None,
        created_by: str | None = None,
        recipe: str | None = None,
        admit: Admit | None = None,
    ) -> Environment:
        """Place the plan's tasks (all or none: PlacementError says why not), then
        create the environment in the store (StoreUnavailable if it refuses).
        ``recipe`` (control.recipes) lets a later control process take it over.
        ``admit(plan, nodes)`` (the node of each task, in plan order) may refuse the
        placement by raising: it runs once the placement is known and before anything
        is stored or launched, with no await in between (no other request can slip in)."""
        env_id = env_id or new_environment_id()
        with heap.building():
            env = self._placed(env_id, plan, source=source, timeouts=timeouts, admit=admit)
            env.created_by = created_by
            env.recipe = recipe
            try:
                env.create()
            except BaseException:
                self.ledger.release(env_id)
                raise
            self.environments[env.id] = env
        return env

    def _placed(
        self,
        env_id: str,
        plan: Plan,
        *,
        source: str | None = None,
        timeouts: dict[str, float] | None = None,
        admit: Admit | None = None,
    ) -> Environment:
        _, priority = priority_of(plan, self.priority_classes)
        lease = lease_of(plan)
        reservation = self.ledger.reserve(
            env_id, plan, seed=env_id, strategy=strategy_of(plan), priority=priority
        )
        if admit is not None:
            try:
                admit(plan, reservation.nodes)
            except BaseException:
                self.ledger.release(env_id)
                raise
        env = Environment(
            env_id,
            plan,
            backend=self.backend,
            store=self.store,
            journal=self.journal,
            calls=self.calls,
            source=source,
            timeouts=timeouts,
            log_dir=self.log_dir,
            clock=self.clock,
            nodes=reservation.nodes,
            ports=reservation.ports,
        )
        env.lease = lease
        env.relocate = self._relocate
        return env

    def address_of(self, node: str) -> str:
        """Where a node's tasks' ports are reached: its ``address`` label, else the
        backend's own host (the local backend: every node is this machine), else its
        name (``localhost``: 127.0.0.1)."""
        for n in self.ledger.nodes:
            if n.name == node:
                label = n.label("address")
                if label:
                    return label
        host = getattr(self.backend, "host", None)
        if isinstance(host, str) and self.backend.name == "local":
            return host
        return "127.0.0.1" if node == "localhost" else node

    def _relocate(self, env: Environment, tasks: list[RuntimeTask]) -> None:
        """Place again the tasks of ``env`` whose node is down (RECOVER relaunches them);
        PlacementError when they fit nowhere (RECOVER then fails, saying why)."""
        lost = [t for t in tasks if self.ledger.is_down(t.node)]
        if not lost:
            return
        _, priority = priority_of(env.plan, self.priority_classes)
        demands = demands_of(env.plan)
        got = self.ledger.reserve_more(
            env.id, [demands[t.idx] for t in lost], seed=env.id, priority=priority
        )
        if self.admit_moves is not None:
            try:
                moves = [(t.spec.path, n) for t, n in zip(lost, got.nodes, strict=True)]
                self.admit_moves(env, moves)
            except BaseException:
                self.ledger.release(got.key)
                raise
        paths = {t.spec.path for t in lost}
        for key in [k for k in env.addresses if k[0] in paths]:
            del env.addresses[key]  # their channels get addresses on the new nodes
        for t, node, ports in zip(lost, got.nodes, got.ports, strict=True):
            env.taskset.move_node(t, node)
            env.ports[t.idx] = ports
        moved = [(t.idx, t.node) for t in lost]
        self.journal.write(lambda: self._set_nodes(env.id, moved))

    async def create_preempting(
        self,
        plan: Plan,
        *,
        dry_run: bool = False,
        env_id: str | None = None,
        actor: str | None = None,
        protected: Collection[str] = (),
        admit: Admit | None = None,
        **kw: Any,
    ) -> tuple[list[str], Environment | None]:
        """Create the environment, evicting lower-priority environments if it takes that.

        Returns the evicted environment ids and the new environment; with ``dry_run``,
        only what would be evicted (nothing changes). Eviction is per environment: its
        run is stopped and its processes ended with their grace period. Environments in
        ``protected`` are never evicted. ``admit`` (as for ``create``) judges the
        placement the eviction makes room for, before anything is evicted, and the
        final placement again.
        """
        env_id = env_id or new_environment_id()
        cls, priority = priority_of(plan, self.priority_classes)
        spared = set(protected)
        if self._made("services"):
            spared |= self.services.protected_keys()  # protected services too
        result = self.ledger.preemption(
            plan, seed=env_id, priority=priority, strategy=strategy_of(plan),
            protected=spared,
        )  # fmt: skip
        if isinstance(result, NoFit):
            raise PlacementError(result)
        if admit is not None:
            admit(plan, result.placement.nodes)
        evict = list(result.evict)
        if dry_run:
            return evict, None
        note = f"preempted by {env_id} ({cls} priority)"
        await self._evict(evict, note, actor or f"preemption for {env_id}", actor)
        return evict, self.create(plan, env_id=env_id, created_by=actor, admit=admit, **kw)

    async def _evict(
        self, victims: Sequence[str], note: str, by: str | None, actor: str | None
    ) -> None:
        """End what holds these ledger keys: environments are destroyed, job units
        queued again (one call for all of them)."""
        jobs, services = self._made("jobs"), self._made("services")
        units = [v for v in victims if jobs and self.jobs.owns(v.partition(":")[0])]
        replicas = [v for v in victims if services and self.services.owns(v.partition(":")[0])]
        if units:
            await self.jobs.evict(units, note)
        if replicas:
            await self.services.evict(replicas, note)
        for victim in victims:
            if victim in units or victim in replicas:
                continue
            self.record({"kind": "environment", "env": victim, "note": note, "actor": actor})
            if victim in self.environments:
                await self.destroy(victim, actor=by)

    def cordon(self, node: str, on: bool = True) -> None:
        """Cordon (or uncordon) a node, and remember it across restarts: stored first
        (StoreUnavailable if the store refuses; then nothing changes), then applied."""
        names = {n.name for n in self.ledger.nodes if n.cordoned}
        if node not in {n.name for n in self.ledger.nodes}:
            raise KeyError(node)
        names = (names | {node}) if on else (names - {node})
        text = json.dumps(sorted(names))
        self.journal.call(lambda: self.store.set_meta("cordoned", text))
        self.ledger.cordon(node, on)

    async def drain(
        self, node: str, *, dry_run: bool = False, actor: str | None = None
    ) -> list[str]:
        """Cordon the node and evict the environments with tasks on it (whole: they are
        gangs). Returns their ids; a dry run changes nothing."""
        victims = self.ledger.holders_on(node)  # KeyError-free: unknown nodes hold nothing
        if node not in {n.name for n in self.ledger.nodes}:
            raise KeyError(node)
        if dry_run:
            return victims
        self.cordon(node, True)
        await self._evict(victims, f"evicted: node {node} is drained", actor, actor)
        return victims

    def record(self, event: dict[str, Any]) -> None:
        """Store an event (through the journal), then announce it."""
        now = self.clock()
        self.journal.write(lambda: self.store.add_events([event], now))

    def destroying(self, env_id: str) -> bool:
        """A destroy (or the end of a left environment) of it is under way."""
        return env_id in self._destroying

    async def _once(self, env_id: str, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` for this environment, or, when it already runs, wait for it."""
        running = self._destroying.get(env_id)
        if running is not None:
            await asyncio.shield(running)
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._destroying[env_id] = done
        try:
            await work()
            done.set_result(None)
        except BaseException as e:
            done.set_exception(e)
            done.exception()  # a waiter re-raises it; nobody else needs to see it
            raise
        finally:
            self._destroying.pop(env_id, None)

    async def destroy(self, env_id: str, *, actor: str | None = None) -> None:
        """Destroy an environment run here; a second call while one runs waits for it."""
        env = self.environments.get(env_id)
        if env is None and env_id not in self._destroying:
            return

        async def work() -> None:
            assert env is not None
            await env.destroy(actor=actor)
            self.environments.pop(env_id, None)
            self.ledger.release(env_id)
            heap.release()

        await self._once(env_id, work)

    async def forget(self, env_id: str, *, actor: str | None = None) -> None:
        """End an environment a previous control process left and this one does not run
        (``left``): its processes are ended wherever they still run, and it is DONE.
        A second call while one runs waits for it."""
        if env_id not in self.left and env_id not in self._destroying:
            return

        async def work() -> None:
            ended = await self.backend.end_leftovers([env_id])
            note = f"destroyed after {RESTARTED}"
            ev = {"kind": "environment", "env": env_id, "state": envsm.DONE, "note": note,
                  "transition": "DESTROY", "ended": ended}  # fmt: skip
            if actor is not None:
                ev["actor"] = actor
            now = self.clock()
            self.journal.write(lambda: self.store.forget(env_id, note, now, [ev]))
            self.left.pop(env_id, None)

        await self._once(env_id, work)

    async def adopt_leftovers(
        self, *, take_over: bool = True, claim: Claim | None = None
    ) -> list[str]:
        """At start: what a previous control process left unfinished.

        Its transitions left STARTED end FAILED. An environment whose tasks still run
        (held by a node agent that outlived that process) is re-attached, with ``take_over``:
        run by this process, in the state its tasks say (see ``_reattach``). For every
        other one, its processes still running are ended, and the tasks it reported
        alive are LOST, the environment in ERROR (once: not again at each restart); then
        with ``take_over`` it is taken over in ERROR if its plan can be expanded again
        (its recipe) and placed: RECOVER relaunches it, destroy ends it. Those that
        cannot be are ``left`` (destroying them ends them); without ``take_over``
        (``corral run``) every one is ended. A process of no unfinished environment
        that an agent still runs is ended, unless ``claim`` (with ``take_over``: the jobs
        and services a previous process ran, see JobService.restore) takes it: it is
        given the processes of no environment, by owner id, and answers with its notes
        and the task ids it runs on. The reports the agents held meanwhile come after
        all that (a unit that ended while no control process watched it is heard), then
        the job runner settles what it took over and did not hear from. Returns a line
        per environment saying what happened.
        """
        # what runs first: the inventory waits for the orders a previous process left
        # under way; until it has answered, its transitions stay recorded as under way
        # (a crash meanwhile leaves them so for the next start)
        running: dict[str, dict[int, tuple[int, str | None]]] = {}
        for tid, pid, state in await self.backend.inventory():
            env_id, _, idx = tid.partition(":")
            if idx.isdigit():
                running.setdefault(env_id, {})[int(idx)] = (pid, state)
        now = self.clock()
        cut = self.store.interrupted()
        if cut:
            text = f"interrupted: {RESTARTED}"
            evs = [{"kind": "transition", "env": t["env"], "transition": t["event"],
                    "src": t["src"], "status": "FAILED", "error": text,
                    "duration": round(now - t["started"], 6)} for t in cut]  # fmt: skip
            ids = [t["id"] for t in cut]
            self.journal.write(lambda: self.store.end_interrupted(ids, text, now, evs))
        cut_of = {t["env"]: t["event"] for t in cut}
        unfinished = self.store.unfinished()
        notes: list[str] = []
        rest = []
        for row in unfinished:
            env_id = row["id"]
            what = f"environment {env_id} ({row['name']}) was {row['state']}"
            live = running.get(env_id)
            if take_over and live:
                with heap.building():
                    why = self._reattach(row, live, cut_of.get(env_id))
                if why is None:
                    env = self.environments[env_id]
                    notes.append(f"{what}: re-attached to its {len(live)} running tasks, "
                                 f"{env.state}")  # fmt: skip
                    del running[env_id]
                    continue
                notes.append(f"{what}: cannot re-attach ({why}): its processes are ended")
            rest.append(row)
        claimed: Collection[str] = ()
        if take_over and claim is not None:
            more, claimed = claim(running)
            notes += more
        strangers = [k for e, tasks in running.items() for i in tasks
                     if (k := f"{e}:{i}") not in claimed]  # fmt: skip
        if strangers:  # an agent runs them for nobody: end them
            await self.backend.stop(self.ledger.nodes[0].name, strangers, 3.0)
            notes.append(f"{len(strangers)} processes of no unfinished environment ended")
        ended = await self.backend.end_leftovers([r["id"] for r in rest]) if rest else 0
        for row in rest:
            env_id = row["id"]
            if row["alive"]:
                self._mark_lost(row)
            what = f"environment {env_id} ({row['name']}) was {row['state']}"
            if not take_over:
                self.left[env_id] = RESTARTED
                await self.forget(env_id)
                notes.append(f"{what}; its control process died: it is ended")
                continue
            with heap.building():
                why = self._take_over(row)
            if why is None:
                notes.append(f"{what}: taken over in ERROR (RECOVER or destroy it)")
            else:
                self.left[env_id] = why
                notes.append(f"{what}: not taken over ({why}); destroying it ends it")
        if ended:
            notes.append(f"{ended} leftover processes ended")
        await self.backend.resume()
        if self._made("jobs"):
            notes += self.jobs.settle()
        return notes

    def _replayed(self, row: dict[str, Any]) -> tuple[Plan, list[dict[str, Any]]] | str:
        """The environment's plan again (from its recipe) and its stored tasks; or why not."""
        if not row.get("recipe"):
            return "it was created without a recipe"
        plan, diags = recipes.replay(row["recipe"])
        if plan is None:
            text = diags if isinstance(diags, str) else "; ".join(str(d) for d in diags[:3])
            return f"its plan does not expand again: {text}"
        stored = self.store.tasks(row["id"])
        if [t.path for t in plan.tasks] != [t["path"] for t in stored]:
            return "its plan expands to other tasks than it had"
        return plan, stored

    def _reattach(
        self, row: dict[str, Any], live: dict[int, tuple[int, str | None]], cut: str | None
    ) -> str | None:
        """Run an environment whose tasks still run, here; or say why it cannot be.

        Each task that runs is adopted with its process, in the state it last confirmed
        (a direct task) or was recorded in (a plain process); one recorded alive whose
        process is gone is LOST. The environment keeps its recorded state and run, unless
        a transition was under way at the crash: then it goes where its tasks agree
        (all STANDBY: DEPLOYED, all CONFIGURED, all RUNNING), else to ERROR. The failure
        rules then apply to what was lost.
        """
        got = self._replayed(row)
        if isinstance(got, str):
            return got
        plan, stored = got
        env_id = row["id"]
        _, priority = priority_of(plan, self.priority_classes)
        ports = [tuple(int(p) for p in (t.get("ports") or "").split(",") if p) for t in stored]
        self.ledger.hold(env_id, plan, [t["node"] for t in stored], ports, priority=priority)
        env = Environment(
            env_id, plan, backend=self.backend, store=self.store, journal=self.journal,
            calls=self.calls, source=row["source"], log_dir=self.log_dir, clock=self.clock,
            nodes=[t["node"] for t in stored], ports=ports,
        )  # fmt: skip
        gone = f"{RESTARTED}: its process ended while no control process watched it"
        confirmed: set[str] = set()
        plain: set[str] = set()  # states of live plain processes (they say none)
        was = {t["idx"]: (t["state"], t["pid"]) for t in stored}
        for t in stored:
            proc = live.get(t["idx"])
            t["pid"] = None
            if proc is not None:
                t["pid"], said = proc
                if t["state"] in (tasksm.ERROR, tasksm.LOST, tasksm.DONE):
                    pass  # failed or ended as recorded: its process is ended at RECOVER
                elif said == tasksm.LAUNCHING:  # no hello yet, and nobody waits for one now
                    t["state"] = tasksm.ERROR
                    t["reason"] = f"{RESTARTED} before it was ready (RECOVER relaunches it)"
                elif said == BUSY:  # an order it has not answered: its state is unknown
                    t["state"] = tasksm.ERROR
                    t["reason"] = f"{RESTARTED} while it carried out an order"
                elif said is not None:
                    t["state"] = said
                    confirmed.add(said)
                else:
                    if t["state"] in (tasksm.PENDING, tasksm.LAUNCHING):
                        t["state"] = tasksm.STANDBY  # a plain process is ready once it runs
                    plain.add(t["state"])
            elif t["state"] in tasksm.ALIVE:
                t["state"], t["reason"] = tasksm.LOST, gone
        state = dict(row)
        if cut is not None:
            after = {tasksm.STANDBY: envsm.DEPLOYED, tasksm.CONFIGURED: envsm.CONFIGURED,
                     tasksm.RUNNING: envsm.RUNNING}  # fmt: skip
            # what the tasks said; when none says anything (plain processes only), the
            # states they were found in
            said_states = confirmed or plain
            agreed = after.get(next(iter(said_states))) if len(said_states) == 1 else None
            if agreed is None:
                state["state"] = envsm.ERROR
                state["error"] = f"{cut} was under way when {RESTARTED}; its tasks disagree"
            else:
                state["state"] = agreed
        env.recipe = row["recipe"]
        env.relocate = self._relocate
        with contextlib.suppress(ValueError):
            env.lease = lease_of(plan)
        env.restore(state, stored)
        self.environments[env_id] = env
        if state["state"] != envsm.RUNNING and row["run_number"] is not None:
            env.close_stored_run(int(row["run_number"]))
        env.record_restored(row["state"], was)
        why = env.judge_restored()
        if why is not None:
            env.fail(why)
        return None

    def _mark_lost(self, row: dict[str, Any]) -> None:
        """Once: the tasks it had alive LOST, the environment ERROR, its run stopped;
        each said by its event (the roles' new states too)."""
        env_id = row["id"]
        reason = f"{RESTARTED}: its tasks are no longer watched"  # (as _take_over says)
        lost = {"kind": "task", "env": env_id, "state": "LOST", "count": len(row["alive"]),
                "tasks": [t["path"] for t in row["alive"]], "reason": reason}  # fmt: skip
        events: list[dict[str, Any]] = [lost]
        if row["run_number"] is not None:
            events.append({"kind": "run", "env": env_id, "status": "STOPPED",
                           "run_number": row["run_number"]})  # fmt: skip
        events.append({"kind": "transition", "env": env_id, "transition": "GO_ERROR",
                       "src": row["state"], "dst": envsm.ERROR, "status": "DONE",
                       "error": reason})  # fmt: skip
        events.append({"kind": "environment", "env": env_id, "state": envsm.ERROR,
                       "error": reason, "transition": "GO_ERROR"})  # fmt: skip
        alive = {t["idx"] for t in row["alive"]}
        roles: dict[str, list[tuple[str, bool]]] = {}
        for t in self.store.tasks(env_id):
            if t["hook"]:
                continue  # hook tasks run at triggers: not part of the roles' states
            role = ".".join(t["path"].split(".", 2)[:2])
            state = "LOST" if t["idx"] in alive else t["state"]
            roles.setdefault(role, []).append((state, bool(t["critical"])))
        events += [{"kind": "role", "env": env_id, "role": r, "state": tasksm.aggregate(s)}
                   for r, s in roles.items()]  # fmt: skip
        now = self.clock()
        self.journal.write(lambda: self.store.mark_lost(env_id, reason, now, events))

    def _take_over(self, row: dict[str, Any]) -> str | None:
        """Run a left environment here, in ERROR; or say why it cannot be."""
        env_id = row["id"]
        got = self._replayed(row)
        if isinstance(got, str):
            return got
        plan, stored = got
        try:
            env = self._placed(env_id, plan, source=row["source"])
        except (PlacementError, ValueError) as e:
            return f"it does not fit any more: {e}"
        # as marked by _mark_lost, whether or not the store has taken that in yet
        alive = {t["idx"] for t in row["alive"]}
        reason = f"{RESTARTED}: its tasks are no longer watched"
        for t in stored:
            if t["idx"] in alive:
                t["state"], t["reason"] = tasksm.LOST, reason
        state = dict(row)
        if alive:
            state["error"] = row["error"] if row["state"] == envsm.ERROR else reason
            state["state"] = envsm.ERROR
        env.restore(state, stored)
        env.recipe = row["recipe"]
        nodes = [(t.idx, t.node) for t in env.tasks]
        self.journal.write(lambda: self._set_nodes(env_id, nodes))
        self.environments[env_id] = env
        return None

    def _set_nodes(self, env_id: str, nodes: list[tuple[int, str]]) -> list[dict[str, Any]]:
        self.store.set_nodes(env_id, nodes)
        return []

    # -- reconcile ------------------------------------------------------------------------

    async def reconcile(self, why: str | None = None) -> int:
        """Compare what runs (the backend's inventory: one batch per node) with what the
        controller believes, and repair it: a task believed alive whose process is gone
        failed (its report was lost), and a process no environment here owns is ended.
        Environments in a transition are left for the next pass. Returns the repairs."""
        inv = await self.backend.inventory()
        running = {tid: pid for tid, pid, _ in inv}
        repaired = 0
        if why is not None:  # (their agent died with them: no report of theirs will come)
            if self._made("jobs"):
                repaired += self.jobs.lost_with_agent(running, why)
            if self._made("services"):
                repaired += self.services.lost_with_agent(running, why)
        for env in list(self.environments.values()):
            if env.transitioning is not None or env.lock.locked():
                continue
            lost = [
                Report(t.id, "lost", why, None, t.pid) if why else
                Report(t.id, "exited", "its process is gone (found by reconcile: a report "
                       "was lost)", None, t.pid)
                for t in env.tasks
                if t.state in tasksm.ALIVE and t.pid is not None and running.get(t.id) != t.pid
            ]  # fmt: skip
            if lost:
                repaired += len(lost)
                env.on_reports(lost)
        strangers = [
            tid for tid in running
            if tid.partition(":")[0] not in self.environments
            and tid.partition(":")[0] not in self._destroying
            and not (self._made("jobs") and self.jobs.owns(tid.partition(":")[0]))
            and not (self._made("services") and self.services.owns(tid.partition(":")[0]))
        ]  # fmt: skip
        if strangers:
            await self.backend.stop(self.ledger.nodes[0].name, strangers, 3.0)
            repaired += len(strangers)
        if repaired:
            log.warning("reconcile repaired %d tasks", repaired)
        return repaired

    def start_reconcile(self, period: float) -> None:
        """Reconcile every ``period`` seconds (level-triggered, whatever reports say)."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(period)
                try:
                    await self.reconcile()
                except Exception:
                    log.exception("reconcile failed; trying again in %g s", period)

        self._reconciling = asyncio.ensure_future(loop())

    def after_reconnect(self, new_agent: bool) -> None:
        """The connection to an agent came back: what it reported may have been lost
        meanwhile, so reconcile, then let it deliver what it held. A new agent means the
        old one died, and its tasks with it."""
        why = "its node agent died, and the task with it" if new_agent else None

        async def repair() -> None:
            try:
                await self.reconcile(why)
                await self.backend.resume()
            except Exception:
                log.exception("reconciling after a reconnect")

        job = asyncio.ensure_future(repair())
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def detach(self) -> None:
        """Stop controlling, leaving the environments to their agents (a restart)."""
        if self._reconciling is not None:
            self._reconciling.cancel()
        detach = getattr(self.backend, "detach", None)
        if detach is not None:
            await detach()
        self.journal.close()

    async def close(self) -> None:
        """Destroy every environment, stop every job, then close the backend."""
        if self._reconciling is not None:
            self._reconciling.cancel()
        try:
            if self._made("periodic"):  # before the runner: its ending runs start nothing
                await self.periodic.close()
            if self._made("jobs"):
                await self.jobs.close()
            if self._made("services"):
                await self.services.close()
        except Exception:
            log.exception("stopping the jobs and services")
        for env_id in list(self.environments):
            try:
                await self.destroy(env_id)
            except Exception:
                log.exception("destroying environment %s", env_id)
        await self.backend.close()
        self.journal.close()
        heap.release()

    def _on_reports(self, reports: Sequence[Report]) -> None:
        per: dict[str, list[Report]] = {}
        for r in reports:
            env_id = r.task_id.partition(":")[0]
            per.setdefault(env_id, []).append(r)
        for env_id, rs in per.items():
            env = self.environments.get(env_id)
            if env is not None:
                env.on_reports(rs)
            elif self._made("jobs") and self.jobs.owns(env_id):
                self.jobs.on_reports(rs)
            elif self._made("services") and self.services.owns(env_id):
                self.services.on_reports(rs)
