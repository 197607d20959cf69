"""Periodic jobs on the control plane: cron schedules that submit runs to the job runner.

How this runs. One ``PeriodicScheduler`` per control plane, on its event loop, beside
the job runner (``corral.control.runner``). Each periodic job has a ``Periodic`` state
machine (``corral.jobs.cron``, pure: docs/cron.md) that says what to do; the scheduler
does it.

- **One timer.** The next decision time of every periodic job waits in one heap (the
  first fire time after the last one handled); one ``loop.call_at`` handle is armed for
  the earliest, never a task or a timer per job. The clock is a parameter (``clock``,
  epoch seconds, the plane's by default): the delay is ``due - clock()``, capped at
  ``MAX_SLEEP``, and the handle is set at ``loop.time() + delay``. A wake decides
  whatever is due by ``clock()`` then, and arms the timer again; so a wake too early
  (the wall clock and the loop's monotonic clock drift apart) decides nothing, and a
  wall clock set forward is noticed within ``MAX_SLEEP``. ``tick()`` is that wake, to
  call by hand: tests advance a fake clock and call it (``timer=False`` arms no real
  timer at all).
- **Deciding.** At a wake, each due job's ``Periodic.decide(now, running)`` (running:
  its run is on, or being replaced) gives actions: ``Start`` submits the job's units to
  the runner as a job named ``<periodic name>#<run number>`` (owner and priority class
  from the job; ``CORRAL_PERIODIC``, ``CORRAL_PERIODIC_RUN`` and ``CORRAL_FIRE_TIME``
  in its environment); ``Skip`` is an event saying why and how many fire times;
  ``Queue`` is kept by the state machine and started when the run ends; ``Replace``
  cancels the run (``runner.cancel``: its processes are ended) in a task, then starts
  the new run. When a run's job ends (its ``done`` future), ``finished(now)`` says what
  follows (a queued run, or what became due).
- **The store.** After each change the jobs' states (``Periodic.state()``, the run
  counter, the run on) are written with their events, one transaction per wake,
  through the plane's journal (``corral.store.periodicstore``).
- **A restart.** ``restore()`` reads the periodic jobs back and decides at once: fire
  times passed while the controller was down are missed (later than the grace), and
  the job's ``missed`` policy says what happens: ``skip`` runs none and says how many
  were missed, ``run-once`` starts one catch-up run for all of them. Runs that were on
  are the runner's: when the same runner still has one, it is the run on again.

Close the scheduler (``close``) before the runner: then the runs the runner ends on
the way down start nothing new.
"""

from __future__ import annotations

import asyncio
import builtins
import heapq
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from corral.control.journal import StoreUnavailable
from corral.control.runner import JOB_FINAL, Job, JobRunner
from corral.jobs.cron import (
    Action,
    CronError,
    Periodic,
    Queue,
    Replace,
    Schedule,
    Skip,
    Start,
)
from corral.jobs.spec import MAX_FILE_BYTES, BatchSpec, DagSpec, PeriodicSpec, load_job
from corral.jobs.units import Units, units_of
from corral.store.periodicstore import PeriodicRow, PeriodicStore

log = logging.getLogger("corral.periodic")

MAX_SLEEP = 60.0  # the timer wakes at least this often (a wall clock set forward)
EVENT = "periodic"  # the events' kind


@dataclass(eq=False)
class _Entry:
    """A periodic job as the scheduler runs it."""

    spec: PeriodicSpec
    text: str
    workdir: str
    owner: str
    units: Units
    kind: str  # batch | dag: how its runs are submitted
    priority_class: str
    periodic: Periodic
    runs: int = 0  # runs started: the last one's number
    run: Job | None = None  # the run on
    replacing: Job | None = None  # the run being cancelled for a Replace
    pending: Replace | None = None  # what starts once it is
    gen: int = 0  # its entry in the heap (older ones are stale)
    last_job: str | None = None
    last_state: str | None = None
    error: str | None = None  # why the last run could not start

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def running(self) -> bool:
        return self.run is not None or self.replacing is not None


class PeriodicScheduler:
    """Runs periodic jobs: ``add``, ``remove``, ``list``; ``restore`` at start."""

    def __init__(
        self,
        runner: JobRunner,
        store: PeriodicStore,
        *,
        clock: Callable[[], float] | None = None,
        timer: bool = True,
        grace: float = 60.0,
        max_queue: int = 1,
    ) -> None:
        """``clock``: epoch seconds (the runner's clock by default). ``timer``: arm a
        real timer (``loop.call_at``); with False only ``tick()`` decides (tests).
        ``grace`` and ``max_queue``: as ``Periodic`` takes them."""
        self.runner = runner
        self.store = store
        self.clock: Callable[[], float] = clock if clock is not None else runner.clock
        self.timer = timer
        self.grace = grace
        self.max_queue = max_queue
        self._entries: dict[str, _Entry] = {}
        self._heap: builtins.list[tuple[float, int, str]] = []  # (due, gen, name)
        self._gen = 0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- the jobs ------------------------------------------------------------------------

    def add(
        self,
        spec: PeriodicSpec,
        *,
        text: str,
        workdir: str,
        owner: str,
        job_units: Units,
        kind: str | None = None,
        priority_class: str | None = None,
    ) -> dict[str, Any]:
        """Schedule a periodic job: fire times after now are due. ``text``: its file's
        text (read again at a restart), ``workdir``: its file's directory, ``job_units``:
        its job's units. ``kind`` and ``priority_class`` are the inline job's by default
        (a job given by file: pass them; else batch, or dag for several units).

        ValueError (CronError) for a bad schedule, a name already scheduled or an unknown
        priority class; StoreUnavailable when the store refuses (nothing is scheduled).
        """
        if self._closed:
            raise RuntimeError("the periodic scheduler is closed")
        if spec.name in self._entries:
            raise ValueError(f"periodic job {spec.name!r} is already scheduled: remove it first")
        schedule = Schedule.parse(spec.schedule, spec.timezone)
        kind = kind or (spec.job.kind if spec.job is not None else _kind_of(job_units))
        pclass = priority_class or (
            spec.job.placement.priority_class if spec.job is not None else "batch"
        )
        if pclass not in self.runner.priority_classes:
            known = ", ".join(self.runner.priority_classes)
            raise ValueError(f"priority_class {pclass!r} is not one of {known}")
        now = self.clock()
        periodic = Periodic(
            schedule, spec.overlap, spec.missed, max_queue=self.max_queue, grace=self.grace,
            since=now,
        )  # fmt: skip
        e = _Entry(spec, text, workdir, owner, job_units, kind, pclass, periodic)
        nxt = _next_fire(e)
        ev = self._event(e, "add", schedule=schedule.source, timezone=schedule.tz,
                         overlap=spec.overlap, missed=spec.missed, next_fire=nxt,
                         next_at=_at(nxt, schedule))  # fmt: skip
        state = _state(e)
        journal = self.runner.journal
        stored = journal.call(
            lambda: self.store.put(e.name, text, workdir, owner, state, [ev], now)
        )
        journal.publish(stored)
        self._entries[e.name] = e
        self._bind()
        self._plan(e)
        self._arm()
        return self._info(e)

    def remove(self, name: str) -> dict[str, Any]:
        """Stop scheduling a periodic job (KeyError when unknown). A run on goes on: it is
        a job of the runner (cancel it there). StoreUnavailable: nothing changes."""
        e = self._entries[name]
        now = self.clock()
        run = e.run or e.replacing
        ev = self._event(e, "remove", running=None if run is None else run.id)
        journal = self.runner.journal
        journal.publish(journal.call(lambda: self.store.delete(name, [ev], now)))
        del self._entries[name]
        info = self._info(e)
        self._arm()
        return info

    def list(self) -> builtins.list[dict[str, Any]]:
        """Every periodic job: name, schedule, time zone, next and last fire time, the run
        on, how many runs are queued, and its last run."""
        return [self._info(e) for _, e in sorted(self._entries.items())]

    def get(self, name: str) -> dict[str, Any]:
        return self._info(self._entries[name])

    def _info(self, e: _Entry) -> dict[str, Any]:
        p = e.periodic
        nxt = _next_fire(e)
        run = e.run or e.replacing
        return {
            "name": e.name, "schedule": p.schedule.source, "timezone": p.schedule.tz,
            "overlap": p.overlap, "missed": p.missed, "next_fire": nxt,
            "next_at": _at(nxt, p.schedule), "last_fire": p.last_fire,
            "running": None if run is None else run.id, "queued": len(p.queued),
            "runs": e.runs, "last_job": e.last_job, "last_state": e.last_state,
            "owner": e.owner, "priority_class": e.priority_class, "error": e.error,
        }  # fmt: skip

    # -- restart -------------------------------------------------------------------------

    def restore(self) -> builtins.list[str]:
        """Read the periodic jobs back from the store and decide at once what is due
        (the runs missed while the controller was down). Call it on the running loop,
        before ``add``. Returns a note for each job that could not be read back (it
        stays in the store; ``add`` it again to replace it)."""
        self._bind()
        notes: builtins.list[str] = []
        events: builtins.list[dict[str, Any]] = []
        restored: builtins.list[_Entry] = []
        for row in self.store.all():
            if row.name in self._entries:
                continue
            try:
                e, run_id = self._load(row)
            except (ValueError, OSError) as exc:
                note = f"periodic job {row.name!r} not restored: {exc}"
                log.warning("%s", note)
                notes.append(note)
                continue
            self._entries[e.name] = e
            restored.append(e)
            job = self.runner.jobs.get(run_id) if isinstance(run_id, str) else None
            if job is not None and job.state not in JOB_FINAL:
                self._follow(e, job)  # the same runner still runs it
            elif isinstance(run_id, str):  # the runner that ran it is gone: it is over
                e.last_job, e.last_state = run_id, job.state if job is not None else None
                why = None if job is not None else "the control process stopped while it ran"
                events.append(self._event(e, "end", job=run_id, state=e.last_state, reason=why))
            self._plan(e)
        self._write(restored, events, self.clock())
        self.tick()
        return notes

    def _load(self, row: PeriodicRow) -> tuple[_Entry, object]:
        """The job of a stored row, and the id of the run that was on."""
        spec, diags = load_job(f"<periodic {row.name}>", row.spec_text)
        if not isinstance(spec, PeriodicSpec):
            why = "; ".join(str(d) for d in diags) or "not a periodic job"
            raise ValueError(f"its stored file does not read back: {why}")
        job = spec.job if spec.job is not None else _job_file(row.workdir, spec.job_file)
        units = units_of(job)
        state = row.state or {}
        kind = state.get("kind")
        pclass = state.get("priority_class")
        schedule = Schedule.parse(spec.schedule, spec.timezone)
        cron = state.get("cron")
        try:
            if not isinstance(cron, Mapping):
                raise CronError("no state stored")
            periodic = Periodic(schedule, spec.overlap, spec.missed, max_queue=self.max_queue,
                                grace=self.grace, state=cron)  # fmt: skip
        except CronError as exc:  # a state not read back: fire times after now are due
            log.warning("periodic job %s: state not read back (%s); starting afresh", row.name, exc)
            periodic = Periodic(schedule, spec.overlap, spec.missed, max_queue=self.max_queue,
                                grace=self.grace, since=self.clock())  # fmt: skip
        e = _Entry(
            spec, row.spec_text, row.workdir, row.owner or "", units,
            kind if isinstance(kind, str) else job.kind,
            pclass if isinstance(pclass, str) else job.placement.priority_class, periodic,
        )  # fmt: skip
        runs = state.get("runs")
        e.runs = runs if isinstance(runs, int) and not isinstance(runs, bool) else 0
        for k in ("last_job", "last_state"):
            v = state.get(k)
            setattr(e, k, v if isinstance(v, str) else None)
        return e, state.get("run")

    # -- the timer -----------------------------------------------------------------------

    def tick(self) -> None:
        """Decide now, by ``clock()``, for every periodic job that is due, and arm the
        timer for the next. The timer calls it; so may a test, after moving its clock."""
        if self._closed:
            return
        self._bind()
        now = self.clock()
        due: dict[str, _Entry] = {}
        while self._heap and self._heap[0][0] <= now:
            _, gen, name = heapq.heappop(self._heap)
            e = self._entries.get(name)
            if e is not None and e.gen == gen:
                due[name] = e
        events: builtins.list[dict[str, Any]] = []
        for e in due.values():
            try:
                self._act(e, e.periodic.decide(now, e.running), events)
            except Exception:  # a bug for one job: the others still run
                log.exception("periodic job %s: deciding at %s", e.name, now)
            self._plan(e)
        self._write(due.values(), events, now)
        self._arm()

    def _wake(self) -> None:
        self._timer = None
        try:
            self.tick()
        finally:
            self._arm()  # whatever happened, the timer runs on

    def _plan(self, e: _Entry) -> None:
        """(Re)place the job in the heap at its next decision time."""
        self._gen += 1
        e.gen = self._gen
        p = e.periodic
        if p.last_fire is None or (p.queued and not e.running):
            due: float | None = -math.inf  # decide at the next wake
        else:
            due = _next_fire(e)
        if due is not None:
            heapq.heappush(self._heap, (due, e.gen, e.name))
        if len(self._heap) > 2 * len(self._entries) + 64:  # drop the stale entries
            live = {n: x.gen for n, x in self._entries.items()}
            self._heap = [h for h in self._heap if live.get(h[2]) == h[1]]
            heapq.heapify(self._heap)

    def _arm(self) -> None:
        heap = self._heap
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = self._loop
        if not self.timer or self._closed or not heap or loop is None or loop.is_closed():
            return
        delay = min(max(heap[0][0] - self.clock(), 0.0), MAX_SLEEP)
        self._timer = loop.call_at(loop.time() + delay, self._wake)

    def _live(self, item: tuple[float, int, str]) -> bool:
        e = self._entries.get(item[2])
        return e is not None and e.gen == item[1]

    def _bind(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # -- acting --------------------------------------------------------------------------

    def _act(
        self, e: _Entry, actions: Sequence[Action], events: builtins.list[dict[str, Any]]
    ) -> None:
        for a in actions:
            if isinstance(a, Start):
                self._start(e, a.fire_time, a.covers, a.catch_up, a.from_queue, events)
            elif isinstance(a, Skip):
                run = e.run or e.replacing
                events.append(self._event(
                    e, "skip", cause=a.cause, reason=a.reason, count=a.count,
                    count_exact=a.count_exact, fire_time=a.fire_time,
                    at=_at(a.fire_time, e.periodic.schedule),
                    first_fire_time=a.first_fire_time if a.first_fire_time is not None
                    else a.fire_time, running=None if run is None else run.id,
                ))  # fmt: skip
            elif isinstance(a, Queue):
                run = e.run or e.replacing
                events.append(self._event(
                    e, "queue", fire_time=a.fire_time, at=_at(a.fire_time, e.periodic.schedule),
                    position=a.position, behind=None if run is None else run.id,
                ))  # fmt: skip
            else:
                self._replace(e, a, events)

    def _start(
        self,
        e: _Entry,
        fire: float,
        covers: int,
        catch_up: bool,
        from_queue: bool,
        events: builtins.list[dict[str, Any]],
    ) -> None:
        n = e.runs + 1
        at = _at(fire, e.periodic.schedule)
        stamp = f"{fire:.0f}" if fire.is_integer() else repr(fire)
        env = (
            ("CORRAL_PERIODIC", e.name), ("CORRAL_PERIODIC_RUN", str(n)),
            ("CORRAL_FIRE_TIME", stamp),
        )  # fmt: skip
        try:
            job = self.runner.submit(
                e.units, name=f"{e.name}#{n}", kind=e.kind, text=e.text, workdir=e.workdir,
                owner=e.owner, priority_class=e.priority_class, source=f"periodic:{e.name}",
                env=env,
            )  # fmt: skip
        except (ValueError, StoreUnavailable) as exc:
            e.error = f"the run for {at} could not start: {exc}"
            log.warning("periodic job %s: %s", e.name, e.error)
            events.append(self._event(e, "error", fire_time=fire, at=at, reason=e.error))
            return
        e.runs = n
        e.error = None
        e.last_job = job.id
        events.append(self._event(
            e, "start", job=job.id, run=n, fire_time=fire, at=at, covers=covers,
            catch_up=catch_up, from_queue=from_queue,
        ))  # fmt: skip
        self._follow(e, job)

    def _follow(self, e: _Entry, job: Job) -> None:
        e.run = job
        assert job.done is not None
        job.done.add_done_callback(partial(self._ended, e, job))

    def _ended(self, e: _Entry, job: Job, _done: asyncio.Future[str]) -> None:
        """A run's job ended: what follows (``finished``), unless it was replaced."""
        if self._closed or self._entries.get(e.name) is not e or e.run is not job:
            return
        e.run = None
        e.last_state = job.state
        now = self.clock()
        events = [self._event(e, "end", job=job.id, state=e.last_state, reason=job.reason)]
        try:
            self._act(e, e.periodic.finished(now), events)
        except Exception:
            log.exception("periodic job %s: after its run %s ended", e.name, job.id)
        self._plan(e)
        self._write([e], events, now)
        self._arm()

    def _replace(self, e: _Entry, a: Replace, events: builtins.list[dict[str, Any]]) -> None:
        at = _at(a.fire_time, e.periodic.schedule)
        if e.replacing is not None:  # a cancel is under way: the newest run starts after it
            e.pending = a
            events.append(self._event(e, "replace", job=e.replacing.id, fire_time=a.fire_time,
                                      at=at, note="after the cancel under way"))  # fmt: skip
            return
        old = e.run
        if old is None:  # pragma: no cover - decide replaces only a run that is on
            self._start(e, a.fire_time, a.covers, a.catch_up, False, events)
            return
        e.run, e.replacing, e.pending = None, old, a
        events.append(self._event(
            e, "replace", job=old.id, fire_time=a.fire_time, at=at,
            reason="the previous run is still on and overlap is replace",
        ))  # fmt: skip
        task = asyncio.ensure_future(self._cancel_then_start(e, old))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _cancel_then_start(self, e: _Entry, old: Job) -> None:
        try:
            await self.runner.cancel(old.id, actor=f"periodic job {e.name} (overlap: replace)")
        except Exception:
            log.exception("periodic job %s: cancelling %s", e.name, old.id)
        if self._closed or self._entries.get(e.name) is not e:
            return
        a, e.replacing, e.pending = e.pending, None, None
        e.last_state = old.state
        now = self.clock()
        events = [self._event(e, "end", job=old.id, state=old.state, reason=old.reason)]
        if a is not None:
            self._start(e, a.fire_time, a.covers, a.catch_up, False, events)
        self._plan(e)
        self._write([e], events, now)
        self._arm()

    # -- the store -----------------------------------------------------------------------

    def _event(self, e: _Entry, action: str, **fields: Any) -> dict[str, Any]:
        return {"kind": EVENT, "periodic": e.name, "action": action, **fields}

    def _write(
        self, entries: Iterable[_Entry], events: Sequence[dict[str, Any]], now: float
    ) -> None:
        """Store these jobs' states and the events, in one transaction (through the
        journal: a failing store delays it, in order)."""
        states = {e.name: _state(e) for e in entries if self._entries.get(e.name) is e}
        if not states and not events:
            return
        evs = builtins.list(events)
        self.runner.journal.write(lambda: self.store.save(states, evs, now))

    # -- closing -------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop deciding: the timer and replacements under way end; runs on are the
        runner's (close this before it)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = builtins.list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def _state(e: _Entry) -> dict[str, Any]:
    run = e.run or e.replacing
    return {
        "cron": e.periodic.state(), "runs": e.runs, "run": None if run is None else run.id,
        "kind": e.kind, "priority_class": e.priority_class, "last_job": e.last_job,
        "last_state": e.last_state,
    }  # fmt: skip


def _next_fire(e: _Entry) -> float | None:
    p = e.periodic
    if p.last_fire is None:
        return None
    return next(iter(p.schedule.fires_after(p.last_fire)), None)


def _at(t: float | None, schedule: Schedule) -> str | None:
    """An instant as the schedule's zone reads it (ISO 8601 with its offset)."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, schedule.zone).isoformat()


def _kind_of(units: Units) -> str:
    return "batch" if units.array is not None or len(units.specs) == 1 else "dag"


def _job_file(workdir: str, name: str | None) -> BatchSpec | DagSpec:
    """The job a periodic job names by file, read again (relative to its directory)."""
    if name is None:
        raise ValueError("it names no job")
    path = os.path.join(workdir, name)
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    spec, diags = load_job(path, data)
    if not isinstance(spec, BatchSpec | DagSpec):
        why = "; ".join(str(d) for d in diags) or "not a batch or dag job"
        raise ValueError(f"its job {path}: {why}")
    return spec
