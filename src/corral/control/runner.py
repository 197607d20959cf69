"""The job runner: batch jobs, array jobs and DAGs on the control plane's nodes.

How this runs. One ``JobRunner`` per control plane, on its event loop, beside the
environments. A job is a list of units (``corral.jobs.units``), one process each, run
to completion as basic tasks of the plane's backend (task ids ``<job id>:<index>``:
the plane routes their reports here).

- **The queue.** A unit that may start (a DAG step once the steps it needs
  succeeded) waits in the queue of its priority class and owner. One dispatch pass
  runs at most once per loop iteration, whatever woke it (a submission, an exit, a
  retry due): per priority level, highest first, it takes the owners' queued units
  in fairness order (the owner with the fewest units running goes next; FIFO within
  an owner) and places them on the plane's ledger in one call (``reserve_each``: each
  unit on its own, as the same placement as environments sees it). A level whose
  units do not all fit stops the pass: lower levels never overtake it. What waits
  says why (``waiting: 12 cpus needed, 4 free on n1``).
- **Launching.** The placed units of a pass go to the backend in one launch call
  per node. A unit that ends is given back to the ledger in the same report batch.
- **Retries.** A unit that fails (an exit code not in its success codes, a launch
  that failed, its deadline) is retried after its backoff (doubling, capped) while
  it has tries left: every retry due waits in one heap, with one timer.
- **Preemption.** An environment of a higher priority class that needs the room
  evicts units (the plane asks ``evict``): their processes are ended, and they are
  queued again at the front of their owner's queue; an eviction is not a try.
- **DAG failures.** ``stop``: after a step fails for good, no new step starts; the
  ones running finish. ``continue``: the steps that need the failed one (directly
  or not) are BLOCKED, the others run. Either way the job ends FAILED, and
  ``resume`` runs it again from where it stopped: the steps that succeeded are not
  run again.
- **After a restart.** A control process killed -9 leaves its units to the node
  agents. The next one takes its unfinished jobs over: a unit whose process still
  runs is re-attached (RUNNING, its resources booked where it runs); one recorded
  running whose process is gone may have ended meanwhile: the agents hold its exit
  report and give it at resume, and only one still unheard then is queued again (not
  a try). What had succeeded is not run again.
- **The store.** Changes are gathered and written once per loop iteration, in one
  transaction through the plane's journal, with their events (a job's state, and
  units counted by state, never an event per unit).
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import logging
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from corral.control import secretfiles
from corral.control.coalesce import Coalescing
from corral.control.journal import Journal
from corral.control.launching import launch_batch
from corral.control.ledger import Ledger
from corral.jobs.units import Units, blocked_by
from corral.planning.placement import Demand
from corral.ports.backend import FENCED, Backend, Launch, Report
from corral.store.jobstore import JobStore, UnitRow

log = logging.getLogger("corral.runner")

# unit states
QUEUED = "QUEUED"  # waiting for room (or for the steps it needs: then ``deps`` > 0)
STARTING = "STARTING"  # placed; its launch is under way
RUNNING = "RUNNING"
RETRYING = "RETRYING"  # failed; tried again after its backoff
ENDING = "ENDING"  # being stopped: cancelled
FAILING = "FAILING"  # being stopped: it failed while its process runs (a health check)
EVICTING = "EVICTING"  # being stopped, to be queued again (preemption)
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
BLOCKED = "BLOCKED"  # a DAG step that needs one that failed
FINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, BLOCKED})
ALIVE = frozenset({STARTING, RUNNING, ENDING, FAILING, EVICTING})  # a process may run
KEPT = frozenset({FAILED, BLOCKED, CANCELLED, RETRYING})  # as stored, after a restart
# job states
JOB_QUEUED, JOB_RUNNING = "QUEUED", "RUNNING"
JOB_FINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

LAUNCH_TIMEOUT = 30.0
GRACE = 3.0
MAX_PASS = 5000  # units offered to placement per priority level and pass
LARGE = 50_000  # units of a job whose units submit_large makes in a worker thread


class Attached(NamedTuple):
    """A unit taken over after a restart: where it ran, and whether its process was
    found running (``heard``; else its exit may be held by the agent)."""

    pid: int | None
    node: str
    attempt: int
    started: float | None
    heard: bool
    was: str = RUNNING  # its stored state (ENDING: its job was being cancelled...)
    reason: str | None = None


def new_job_id() -> str:
    """A short unique job id: ``j`` and 10 base-32 characters."""
    import base64

    raw = time.time_ns().to_bytes(8, "big")[-3:] + os.urandom(4)
    return "j" + base64.b32encode(raw).decode().rstrip("=").lower()[:10]


class Unit:
    __slots__ = ("attempt", "code", "deps", "early", "ended", "idx", "job", "node", "pid",
                 "reason", "started", "state")  # fmt: skip

    def __init__(self, job: Job, idx: int, deps: int) -> None:
        self.job = job
        self.idx = idx
        self.state = QUEUED
        self.deps = deps  # steps it still waits for
        self.attempt = 0  # tries started
        self.node: str | None = None
        self.pid: int | None = None
        self.code: int | None = None
        self.reason: str | None = None
        self.started: float | None = None
        self.ended: float | None = None
        self.early: Report | None = None  # its exit, seen before its launch's answer

    @property
    def key(self) -> str:
        return f"{self.job.id}:{self.idx}"

    def row(self) -> UnitRow:
        return UnitRow(self.idx, self.state, self.attempt, self.node, self.pid, self.code,
                       self.reason, self.started, self.ended)  # fmt: skip


@dataclass(eq=False)
class Job:
    id: str
    name: str
    kind: str  # batch | dag | makeflow
    owner: str
    priority_class: str
    priority: int
    units: Units
    workdir: str
    text: str
    source: str | None = None
    env: tuple[tuple[str, str], ...] = ()  # added to every unit's environment
    state: str = JOB_QUEUED
    reason: str | None = None
    created: float = 0.0
    members: list[Unit] = field(default_factory=list)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    users: list[list[int]] = field(default_factory=list)
    done: asyncio.Future[str] | None = None
    stopping: bool = False  # a DAG with failure: stop, after a failure: no new step

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "kind": self.kind, "owner": self.owner,
            "priority_class": self.priority_class, "state": self.state, "reason": self.reason,
            "units": self.units.count, "counts": dict(self.counts), "source": self.source,
            "created": self.created,
        }  # fmt: skip


def _members(job: Job, done: set[int]) -> list[Unit]:
    """The job's units: those in ``done`` SUCCEEDED, the others QUEUED, each with the
    number of steps it waits for."""
    units = job.units
    if units.array is not None:
        members = [Unit(job, i, 0) for i in range(units.count)]
    else:
        members = [Unit(job, i, sum(1 for d in units.spec(i).needs if d not in done))
                   for i in range(units.count)]  # fmt: skip
    for i in done:
        members[i].state = SUCCEEDED
    return members


class JobRunner(Coalescing):
    def __init__(
        self,
        backend: Backend,
        ledger: Ledger,
        journal: Journal,
        store: JobStore,
        *,
        priority_classes: Mapping[str, int],
        clock: Callable[[], float] = time.time,
        log_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.ledger = ledger
        self.journal = journal
        self.store = store
        self.priority_classes = dict(priority_classes)
        self.clock = clock
        self.log_dir = log_dir
        self.jobs: dict[str, Job] = {}
        # priority -> owner -> queued units (FIFO)
        self._queue: dict[int, dict[str, collections.deque[Unit]]] = {}
        self._running: collections.Counter[str] = collections.Counter()  # by owner
        self._last: dict[str, int] = {}  # by owner: when one of its units last started
        self._starts = 0
        self._retries: list[tuple[float, int, Unit, int]] = []  # (due, n, unit, attempt)
        self._retry_n = 0
        self._retry_timer: asyncio.TimerHandle | None = None
        self._kicked = False
        self._launches: set[asyncio.Task[None]] = set()
        self._unheard: list[Unit] = []  # taken over, not found running (see settle)
        # gathered writes: units and jobs changed since the last flush, and events
        self._dirty_units: dict[tuple[str, int], Unit] = {}
        self._dirty_jobs: dict[str, Job] = {}
        ledger.on_free.append(self._room)
        # the jobs' secrets (docs/secrets.md): ``secrets.reveal`` is set by a server
        # that keeps some; each running unit that declares some has its directory
        self.secrets = secretfiles.Giver()

    # -- submitting -----------------------------------------------------------------

    def owns(self, prefix: str) -> bool:
        return prefix in self.jobs

    def submit(
        self,
        units: Units,
        *,
        name: str,
        kind: str,
        text: str,
        workdir: str,
        owner: str = "",
        priority_class: str = "batch",
        source: str | None = None,
        job_id: str | None = None,
        env: Sequence[tuple[str, str]] = (),
        done: Collection[int] = (),
        restored: bool = False,
        attached: Mapping[int, Attached] | None = None,
        kept: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> Job:
        """Queue a job's units (those in ``done`` count as succeeded: a resumed job).
        Stored before anything starts (StoreUnavailable: nothing is queued); a job
        ``restored`` after a restart is in the store already (same id), with the
        units ``attached`` that ran at the crash and those ``kept`` as they were stored
        (failed, blocked, cancelled, waiting for a retry: their rows), see the module
        doc."""
        job = self._new(units, name, kind, text, workdir, owner, priority_class, source,
                        job_id, env)  # fmt: skip
        job.members = _members(job, set(done))
        if kept:
            self._keep(job, kept)
        return self._start(job, done, restored, attached or {})

    def _keep(self, job: Job, kept: Mapping[int, Mapping[str, Any]]) -> None:
        """Units as the previous control process left them: failed, blocked or
        cancelled for good, or waiting for a retry (tried again now, its tries counted)."""
        for i, row in kept.items():
            u = job.members[i]
            u.state, u.attempt, u.reason = row["state"], row["attempt"], row["reason"]
            u.node, u.pid, u.code = row["node"], row["pid"], row["code"]
            u.started, u.ended = row["started"], row["ended"]
            if u.state == FAILED and job.kind != "batch" and job.units.failure == "stop":
                job.stopping = True

    async def submit_large(
        self,
        units: Units,
        *,
        name: str,
        kind: str,
        text: str,
        workdir: str,
        owner: str = "",
        priority_class: str = "batch",
        source: str | None = None,
    ) -> Job:
        """``submit`` of a new job, whose units, when there are many, are made in a
        worker thread (a 1,000,000-instance array takes a second: the loop goes on)."""
        job = self._new(units, name, kind, text, workdir, owner, priority_class, source,
                        None, ())  # fmt: skip
        if units.count >= LARGE:
            job.members = await asyncio.to_thread(_members, job, set())
        else:
            job.members = _members(job, set())
        return self._start(job, (), False, {})

    def _new(
        self, units: Units, name: str, kind: str, text: str, workdir: str, owner: str,
        priority_class: str, source: str | None, job_id: str | None,
        env: Sequence[tuple[str, str]],
    ) -> Job:  # fmt: skip
        if priority_class not in self.priority_classes:
            known = ", ".join(self.priority_classes)
            raise ValueError(f"priority_class {priority_class!r} is not one of {known}")
        self._loop = asyncio.get_running_loop()
        job = Job(
            job_id or new_job_id(), name, kind, owner or "anonymous", priority_class,
            self.priority_classes[priority_class], units, workdir, text, source, tuple(env),
            created=self.clock(),
        )  # fmt: skip
        job.done = self._loop.create_future()
        return job

    def _start(
        self, job: Job, done: Collection[int], restored: bool, attached: Mapping[int, Attached]
    ) -> Job:
        """Store the job (a restored one is stored already), then queue what may start."""
        row = {**job.summary(), "workdir": job.workdir, "text": job.text, "state": JOB_QUEUED}
        ev = {"kind": "job", "job": job.id, "name": job.name, "state": JOB_QUEUED,
              "units": job.units.count, "owner": job.owner}  # fmt: skip
        now = self.clock()
        if restored:
            ev["note"] = (f"taken over after a restart: {len(done)} units had succeeded, "
                          f"{len(attached)} ran")  # fmt: skip
            self.journal.write(lambda: self.store.write([], [], [ev], now))
        else:
            events = self.journal.call(lambda: self.store.create(row, [ev], now))
            self.journal.publish(events)
        self.jobs[job.id] = job
        self._admit(job, set(done), attached, full=restored)
        return job

    def _admit(
        self, job: Job, done: set[int], attached: Mapping[int, Attached], full: bool = False
    ) -> None:
        """Queue what may start of ``job.members`` (made by ``_members``; ``full``: some
        may be in other states, a job taken over after a restart)."""
        units = job.units
        job.users = units.dependents()
        for i in done:  # stored as such: a later resume reads it from this job
            self._dirty_units[(job.id, i)] = job.members[i]
        if attached:
            self._attach(job, attached)
        if done or attached or full:
            job.counts = collections.Counter(u.state for u in job.members)
            ready = [u for u in job.members if u.state == QUEUED and u.deps == 0]
            for u in job.members:
                if u.state == RETRYING:  # (its backoff passed while no server ran)
                    self._retry_later(u, 0.0)
        else:
            job.counts = collections.Counter({QUEUED: units.count})
            ready = job.members if units.array is not None else [
                u for u in job.members if u.deps == 0]  # fmt: skip
        self._enqueue_job(job, ready)
        self._check_end(job)
        self._kick()

    def _attach(self, job: Job, attached: Mapping[int, Attached]) -> None:
        """Units that ran at a crash, RUNNING again where they ran (their resources
        booked there: no placement)."""
        booked = []
        failing: list[Unit] = []
        evicting: list[str] = []
        cancelling = False
        for i, a in attached.items():
            u = job.members[i]
            u.state, u.pid, u.node, u.attempt, u.started = RUNNING, a.pid, a.node, a.attempt, \
                a.started  # fmt: skip
            self._running[job.owner] += 1
            if not a.heard:
                self._unheard.append(u)
            booked.append((u.key, a.node, self._demand(u), ()))
            if a.was == ENDING:  # its job was being cancelled: it is, again
                cancelling = True
            elif a.was == FAILING:  # it failed (a health check): it is stopped again
                u.reason = a.reason
                failing.append(u)
            elif a.was == EVICTING:  # preempted: queued again once its process ended
                evicting.append(u.key)
        self.ledger.hold_each(booked, priority=job.priority)
        job.state = JOB_RUNNING
        self._dirty_jobs[job.id] = job
        # (what was under way at the crash goes on once the job is admitted)
        loop = self._bind()
        if cancelling:
            job.stopping = True
            self._later(self.cancel(job.id, actor="a cancel under way at a restart"))
        else:
            if failing:
                loop.call_soon(self._stop_units, failing, FAILING)
            if evicting:
                self._later(self.evict(evicting, "preempted (under way at a restart)"))

    def _later(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._launches.add(task)
        task.add_done_callback(self._launches.discard)

    def lost_with_agent(self, running: Mapping[str, int], why: str) -> int:
        """A node agent died, and the units it ran with it (``running``: what the agents
        run now): those not running any more are queued again, not as a try."""
        lost = [u for j in self.jobs.values() if j.state not in JOB_FINAL for u in j.members
                if u.state == RUNNING and u.pid is not None
                and running.get(u.key) != u.pid]  # fmt: skip
        if lost:
            self._requeue(lost, f"{why}: queued again")
        return len(lost)

    def _requeue(self, units: Sequence[Unit], why: str) -> None:
        """Units whose processes are gone through no fault of theirs: queued again at
        the back, not counted as a try."""
        self._release(units)
        for u in units:
            u.attempt -= 1
            u.pid = u.node = None
            self._set(u, QUEUED, reason=why)
        self._enqueue(units)

    def settle(self) -> list[str]:
        """After the agents gave the reports they held (at start): a unit taken over
        whose process was gone and whose exit nobody held ended unseen (its node or
        agent was lost too): it is queued again, not counted as a try. A line per job."""
        unheard, self._unheard = self._unheard, []
        lost = [u for u in unheard if u.state == RUNNING]
        failed = [u for u in unheard if u.state == FAILING]
        for u in failed:  # it was failing: it failed (its exit is not known)
            self._failed(u, u.reason or "failed", None)
        self._release(failed)
        if not lost:
            return []
        why = "its process ended while no control process watched it, unheard: queued again"
        self._requeue(lost, why)
        per = collections.Counter(u.job.id for u in lost)
        return [f"job {j}: {n} units {why}" for j, n in per.items()]

    def _enqueue_job(self, job: Job, units: Sequence[Unit]) -> None:
        """Queue units of one job at the back of its owner's queue (one call)."""
        if units:
            q = self._queue.setdefault(job.priority, {}).setdefault(job.owner, collections.deque())
            q.extend(units)

    def _enqueue(self, units: Sequence[Unit], front: bool = False) -> None:
        for u in units:
            q = self._queue.setdefault(u.job.priority, {}).setdefault(
                u.job.owner, collections.deque()
            )
            if front:
                q.appendleft(u)
            else:
                q.append(u)

    # -- the dispatch pass ------------------------------------------------------------

    def _room(self) -> None:
        """Room may have freed up elsewhere (an environment ended): place what waits."""
        if self._queue and self._loop is not None:
            self._kick()

    def _kick(self) -> None:
        if not self._kicked:
            self._kicked = True
            self._bind().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._kicked = False
        placed: dict[str, list[Unit]] = {}
        # what could fit at all: a pass offers no more cpus than the nodes have free
        free = sum(max(0.0, n.cpu - self.ledger.usage[n.name].cpu if n.name in
                       self.ledger.usage else n.cpu)
                   for n in self.ledger.nodes if n.schedulable)  # fmt: skip
        for priority in sorted(self._queue, reverse=True):
            owners = self._queue[priority]
            offered = self._offer(owners, free)
            free -= sum(self._demand_cpu(u) for u in offered)
            if not offered:
                continue
            items = [(u.key, self._demand(u)) for u in offered]
            got = self.ledger.reserve_each(items, seed=str(priority), priority=priority)
            blocked = False
            for u, held in zip(offered, got, strict=True):
                if isinstance(held, str):
                    blocked = True
                    self._wait(u, f"waiting: {held}")
                    continue
                u.node = held.nodes[0]
                placed.setdefault(u.node, []).append(u)
            # what was offered but not placed goes back to the front, in order
            back: dict[str, list[Unit]] = {}
            for u in offered:
                if u.node is None:
                    back.setdefault(u.job.owner, []).append(u)
            for owner, us in back.items():
                owners.setdefault(owner, collections.deque()).extendleft(reversed(us))
            for owner in [o for o, q in owners.items() if not q]:
                del owners[owner]
            if not owners:
                del self._queue[priority]
            if blocked:
                break  # a lower level never overtakes what waits here
        for node, units in placed.items():
            for u in units:
                self._set(u, STARTING, reason=None)
                u.attempt += 1
                u.started = self.clock()
                self._running[u.job.owner] += 1
                self._starts += 1
                self._last[u.job.owner] = self._starts
                if u.job.state == JOB_QUEUED:
                    self._job_state(u.job, JOB_RUNNING, None)
            task = asyncio.ensure_future(self._launch(node, units))
            self._launches.add(task)
            task.add_done_callback(self._launches.discard)

    def _demand_cpu(self, u: Unit) -> float:
        return u.job.units.spec(u.idx).wants.cpu

    def _offer(self, owners: dict[str, collections.deque[Unit]], free: float) -> list[Unit]:
        """Up to MAX_PASS queued units of one level, in fairness order (the owner with
        the fewest units running first, then the one whose unit started longest ago),
        no more cpus than ``free`` (and at least one: a unit that waits says why)."""
        heap = []
        for owner, q in owners.items():
            while q and (q[0].state != QUEUED or q[0].job.stopping):  # cancelled, stopped
                q.popleft()
            if q:
                turn = self._last.get(owner, 0)
                heap.append((self._running[owner], turn, q[0].job.created, q[0].idx, owner))
        heapq.heapify(heap)
        out: list[Unit] = []
        room = free + 1e-9
        while heap and len(out) < MAX_PASS and (room > 0 or not out):
            n, _, _, _, owner = heapq.heappop(heap)
            q = owners[owner]
            u = q.popleft()
            u.node = None
            out.append(u)
            room -= self._demand_cpu(u)
            while q and (q[0].state != QUEUED or q[0].job.stopping):
                q.popleft()
            if q:
                self._starts += 1  # (as if it started: the next owner's turn)
                heapq.heappush(heap, (n + 1, self._starts, q[0].job.created, q[0].idx, owner))
        return out

    def _demand(self, u: Unit) -> Demand:
        s = u.job.units.spec(u.idx)
        return Demand(u.key, s.wants, s.constraints)

    def _wait(self, u: Unit, why: str) -> None:
        job = u.job
        if job.reason != why:
            job.reason = why
            self._dirty_jobs[job.id] = job
            self._schedule_flush()

    # -- launching --------------------------------------------------------------------

    def _launch_of(self, u: Unit) -> Launch:
        job = u.job
        spec = job.units.spec(u.idx)
        logs = None if self.log_dir is None else f"{self.log_dir}/{job.id}/{u.idx}.log"
        env = (
            ("CORRAL_ENVIRONMENT_ID", job.id), ("CORRAL_TASK_ID", u.key),
            ("CORRAL_JOB_ID", job.id), ("CORRAL_JOB_INDEX", str(u.idx)),
            ("CORRAL_ATTEMPT", str(u.attempt)), *job.env,
        )  # fmt: skip
        command = job.units.command(u.idx, job.workdir)
        if spec.secrets:
            env = (*env, *self.secrets.env(u.key, spec.secrets))
        return Launch(u.key, job.units.name(u.idx), command, "basic", env, logs,
                      timeout=spec.deadline)  # fmt: skip

    def _forget_secrets(self, units: Sequence[Unit]) -> None:
        for u in units:
            self.secrets.forget(u.key)

    async def _launch(self, node: str, units: list[Unit]) -> None:
        outs = await launch_batch(
            self.backend, node, units, lambda x: x.key, self._launch_of, LAUNCH_TIMEOUT
        )
        ended: list[Unit] = []
        for u, out in zip(units, outs, strict=True):
            if u.state != STARTING:  # cancelled or evicted meanwhile: ended by them
                continue
            if out.error is not None:
                u.pid = out.pid
                self._failed(u, f"cannot start: {out.error}", None)
                ended.append(u)
                continue
            u.pid = out.pid
            self._set(u, RUNNING)
            early, u.early = u.early, None
            fits = early is not None and (early.pid is None or early.pid == u.pid)
            if fits and early is not None and self._on_report(u, early):
                ended.append(u)
        self._release(ended)

    # -- reports ----------------------------------------------------------------------

    def on_reports(self, reports: Sequence[Report]) -> None:
        """News of the units' processes (the plane routes them here by job id)."""
        ended: list[Unit] = []
        for r in reports:
            job_id, _, idx = r.task_id.partition(":")
            job = self.jobs.get(job_id)
            if job is None or not idx.isdigit() or int(idx) >= len(job.members):
                continue
            u = job.members[int(idx)]
            if u.state == STARTING:
                if r.kind != "slow":
                    u.early = r
                continue
            if r.pid is not None and u.pid is not None and r.pid != u.pid:
                continue  # news of an earlier try
            if u.state in (RUNNING, ENDING, FAILING) and self._on_report(u, r):
                ended.append(u)
        self._release(ended)

    def _on_report(self, u: Unit, r: Report) -> bool:
        """Apply one report; True when the unit's process is over."""
        if r.kind == "slow":
            return False
        if u.state in (ENDING, FAILING):
            if r.kind not in ("exited", "lost"):
                return False
            if u.state == FAILING:
                self._failed(u, u.reason or "failed", r.code)
            else:
                self._ended(u)
            return True
        if r.kind == "exited" and r.reason is not None and f": {FENCED}" in r.reason:
            # its node agent ended it, hearing from no control process for its lease
            # (the server was down): not its failure, nor a try
            u.attempt -= 1
            u.pid = u.node = None
            self._set(u, QUEUED, reason=f"{r.reason}; queued again")
            self._enqueue([u], front=True)
            return True
        if r.kind == "exited":
            code = r.code
            u.code = code
            if code is not None and code in u.job.units.spec(u.idx).success:
                self._succeeded(u)
            else:
                self._failed(u, r.reason or f"exit code {code}", code)
            return True
        if r.kind == "lost":
            self._failed(u, r.reason or "its node is lost", None)
            return True
        if r.kind in ("error", "end_of_stream"):
            self._stop_units([u], FAILING)
            u.reason = r.reason or r.kind
            return False
        return False

    def _release(self, units: Sequence[Unit]) -> None:
        if not units:
            return
        if self.secrets:
            self._forget_secrets(units)
        self.ledger.release_each([u.key for u in units])
        for u in units:
            self._running[u.job.owner] -= 1
            if self._running[u.job.owner] <= 0:
                del self._running[u.job.owner]
        self._kick()

    def _succeeded(self, u: Unit) -> None:
        u.ended = self.clock()
        self._set(u, SUCCEEDED, reason=None)
        job = u.job
        ready = []
        for d in job.users[u.idx] if job.users else ():
            w = job.members[d]
            w.deps -= 1
            if w.deps == 0 and w.state == QUEUED and not job.stopping:
                ready.append(w)
        self._enqueue(ready)
        self._check_end(job)

    def _failed(self, u: Unit, why: str, code: int | None) -> None:
        u.ended = self.clock()
        u.code = code
        spec = u.job.units.spec(u.idx)
        tries_left = spec.retries.count - (u.attempt - 1)
        if tries_left > 0 and not u.job.stopping:
            r = spec.retries
            delay = min(r.backoff * (2.0 ** (u.attempt - 1)), r.max_backoff)
            self._set(u, RETRYING, reason=f"{why}; try {u.attempt + 1} in {delay:g} s")
            self._retry_later(u, delay)
            return
        self._set(u, FAILED, reason=why)
        job = u.job
        if job.kind != "batch":
            if job.units.failure == "stop":
                job.stopping = True
            else:
                for b in blocked_by(job.units, {u.idx}):
                    w = job.members[b]
                    if w.state == QUEUED:
                        self._set(w, BLOCKED, reason=f"needs {job.units.name(u.idx)}, which failed")
        self._check_end(job)

    def _ended(self, u: Unit) -> None:
        """A unit stopped by the runner: cancelled, or queued again (evicted)."""
        u.ended = self.clock()
        self._set(u, CANCELLED)
        self._check_end(u.job)

    # -- retries ----------------------------------------------------------------------

    def _retry_later(self, u: Unit, delay: float) -> None:
        loop = self._bind()
        self._retry_n += 1
        heapq.heappush(self._retries, (loop.time() + delay, self._retry_n, u, u.attempt))
        if self._retry_timer is None or self._retries[0][2] is u:
            self._arm_retries(loop)

    def _arm_retries(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        if self._retries:
            self._retry_timer = loop.call_at(self._retries[0][0], self._on_retries)

    def _on_retries(self) -> None:
        loop = self._bind()
        self._retry_timer = None
        now = loop.time()
        due: list[Unit] = []
        while self._retries and self._retries[0][0] <= now:
            _, _, u, attempt = heapq.heappop(self._retries)
            if u.state == RETRYING and u.attempt == attempt:
                self._set(u, QUEUED)
                due.append(u)
        self._enqueue(due, front=True)
        self._arm_retries(loop)
        if due:
            self._kick()

    # -- stopping ---------------------------------------------------------------------

    def _stop_units(self, units: Sequence[Unit], state: str) -> None:
        """End these units' processes (one stop per node); their exits end them."""
        per: dict[str, list[str]] = {}
        for u in units:
            self._set(u, state)
            if u.node is not None:
                per.setdefault(u.node, []).append(u.key)
        for node, keys in per.items():
            task = asyncio.ensure_future(self.backend.stop(node, keys, GRACE))
            self._launches.add(task)
            task.add_done_callback(self._launches.discard)

    async def cancel(self, job_id: str, *, actor: str | None = None) -> Job:
        """Stop a job: nothing more starts, its running units are ended (KeyError)."""
        job = self.jobs[job_id]
        if job.state in JOB_FINAL:
            return job
        job.stopping = True
        why = f"cancelled by {actor}" if actor else "cancelled"
        live = []
        never = 0  # queued units that never started: no row to write (a missing row is
        for u in job.members:  # a queued unit, and the job's row says CANCELLED)
            if u.state == QUEUED and u.attempt == 0:
                u.state, u.reason = CANCELLED, why
                never += 1
            elif u.state in (QUEUED, RETRYING):
                self._set(u, CANCELLED, reason=why)
            elif u.state in (STARTING, RUNNING):
                live.append(u)
        if never:
            c = job.counts
            c[QUEUED] -= never
            if c[QUEUED] <= 0:
                del c[QUEUED]
            c[CANCELLED] += never
            self._dirty_jobs[job.id] = job
            self._schedule_flush()
        if live:
            per: dict[str, list[str]] = {}
            for u in live:
                self._set(u, ENDING, reason=why)
                if u.node is not None:
                    per.setdefault(u.node, []).append(u.key)
            await asyncio.gather(*(self.backend.stop(n, ks, GRACE) for n, ks in per.items()))
            mine = [u for u in live if u.state == ENDING]  # the others' exits ended them
            for u in mine:
                self._ended(u)
            self._release(mine)
        self._check_end(job, cancelled=why)
        return job

    async def evict(self, keys: Collection[str], why: str) -> int:
        """Preemption: end these units' processes and queue them again at the front
        (not counted as a try); their resources are free when this returns."""
        units = []
        for key in keys:
            job_id, _, idx = key.partition(":")
            job = self.jobs.get(job_id)
            if job is not None and idx.isdigit() and int(idx) < len(job.members):
                u = job.members[int(idx)]
                if u.state in (STARTING, RUNNING):
                    units.append(u)
        per: dict[str, list[str]] = {}
        for u in units:
            self._set(u, EVICTING, reason=why)  # its exit is not news: it is queued again
            if u.node is not None:
                per.setdefault(u.node, []).append(u.key)
        await asyncio.gather(*(self.backend.stop(n, ks, GRACE) for n, ks in per.items()))
        self._release(units)
        for u in units:
            u.attempt -= 1  # an eviction is not a try
            u.pid = u.node = None
            self._set(u, QUEUED, reason=why)
        self._enqueue(units, front=True)
        for job in {u.job for u in units}:
            self._event({"kind": "job", "job": job.id, "note": why, "requeued": sum(
                1 for u in units if u.job is job)})  # fmt: skip
        return len(units)

    def holders(self) -> set[str]:
        """Ledger keys of units running now (what preemption may take)."""
        return {u.key for j in self.jobs.values() for u in j.members
                if u.state in (STARTING, RUNNING)}  # fmt: skip

    async def close(self) -> None:
        """End every running unit (the control process stops)."""
        for job in list(self.jobs.values()):
            if job.state not in JOB_FINAL:
                await self.cancel(job.id, actor="the control process stopping")
        for t in list(self._launches):
            t.cancel()
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        self._flush()

    # -- states, ends and the store ------------------------------------------------------

    def _set(self, u: Unit, state: str, *, reason: str | bool | None = False) -> None:
        if u.state != state:
            c = u.job.counts
            c[u.state] -= 1
            if c[u.state] <= 0:
                del c[u.state]
            c[state] += 1
            u.state = state
        if reason is not False:
            u.reason = reason if isinstance(reason, str) else None
        self._dirty_units[(u.job.id, u.idx)] = u
        self._dirty_jobs[u.job.id] = u.job
        self._schedule_flush()

    def _job_state(self, job: Job, state: str, reason: str | None) -> None:
        job.state = state
        job.reason = reason
        self._dirty_jobs[job.id] = job
        ev: dict[str, Any] = {"kind": "job", "job": job.id, "name": job.name, "state": state}
        if reason:
            ev["reason"] = reason
        ev["counts"] = dict(job.counts)
        self._event(ev)

    def _check_end(self, job: Job, cancelled: str | None = None) -> None:
        if job.state in JOB_FINAL:
            return
        c = job.counts
        live = c[QUEUED] + c[STARTING] + c[RUNNING] + c[RETRYING] + c[ENDING] + c[FAILING] \
            + c[EVICTING]  # fmt: skip
        if job.stopping and cancelled is None and c[FAILED]:
            # failure: stop: what waits (or waits for a retry) will not start
            live = c[STARTING] + c[RUNNING] + c[ENDING] + c[FAILING] + c[EVICTING]
            if not live:
                for u in job.members:
                    if u.state == QUEUED:
                        self._set(u, BLOCKED, reason="not started: a step failed "
                                  "(failure: stop)")  # fmt: skip
                    elif u.state == RETRYING:
                        self._set(u, FAILED, reason=f"{u.reason} (not tried again: a step "
                                  "failed, failure: stop)")  # fmt: skip
        if live:
            return
        if cancelled is not None or c[CANCELLED]:
            said = next((u.reason for u in job.members if u.state == CANCELLED and u.reason), None)
            state, why = CANCELLED, cancelled or said or "cancelled"
        elif c[FAILED]:
            state = FAILED
            first = next(u for u in job.members if u.state == FAILED)
            why = f"{c[FAILED]} of {job.units.count} failed; {job.units.name(first.idx)}: " \
                  f"{first.reason}"  # fmt: skip
        else:
            state, why = SUCCEEDED, None
        self._job_state(job, state, why)
        if job.done is not None and not job.done.done():
            job.done.set_result(state)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not (self._dirty_units or self._dirty_jobs or self._events):
            return
        units = [(j, u.row()) for (j, _), u in self._dirty_units.items()]
        jobs = [(j.id, j.state, j.reason, dict(j.counts)) for j in self._dirty_jobs.values()]
        # a count per state for the units that changed, per job (never one per unit)
        per: dict[str, collections.Counter[str]] = {}
        for u in self._dirty_units.values():
            per.setdefault(u.job.id, collections.Counter())[u.state] += 1
        events = list(self._events)
        events += [{"kind": "units", "job": j, "changed": dict(c)} for j, c in per.items()]
        self._dirty_units, self._dirty_jobs, self._events = {}, {}, []
        now = self.clock()
        self.journal.write(lambda: self.store.write(jobs, units, events, now))

    # -- resuming -----------------------------------------------------------------------

    def resume(self, job_id: str) -> Job:
        """Run a failed or cancelled job again: what succeeded is not run again."""
        job = self.jobs[job_id]
        if job.state not in (FAILED, CANCELLED):
            raise ValueError(f"job {job_id} is {job.state}: only a failed or cancelled job resumes")
        done = {u.idx for u in job.members if u.state == SUCCEEDED}
        again = [u.idx for u in job.members if u.state != SUCCEEDED]
        self.journal.call(lambda: self.store.reset_units(job.id, again))
        job.stopping = False
        job.done = self._bind().create_future()
        self._job_state(job, JOB_QUEUED, f"resumed: {len(done)} units already succeeded")
        job.members = _members(job, done)
        self._admit(job, done, {})
        return job
