"""Periodic jobs on the control plane: real processes (the local backend), a fake clock.

Cron fires on a fake clock with each overlap policy (skip says why, queue starts the
next run as the running one ends, replace cancels the running one, whose process
ends, and starts a new one); a restart decides the runs missed while down (skip: none
run, and how many were missed is said; run-once: exactly one runs); a schedule in a
time zone fires at its instant; the real timer fires by itself. The scheduler decides
only when ``tick()`` is called (``timer=False``), except in the real-timer test; waits
are for events, polled in bounded loops, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from corral.backends.local import LocalBackend
from corral.control.periodic import PeriodicScheduler
from corral.control.plane import ControlPlane, install_child_watcher
from corral.control.runner import Job
from corral.jobs.spec import PeriodicSpec, load_job
from corral.jobs.units import units_of
from corral.model.inventory import Node
from corral.store.periodicstore import PeriodicStore
from corral.store.sqlite import SqliteStore

PY = sys.executable
LIMIT = float(os.environ.get("CORRAL_TEST_PATIENCE", "120"))  # a hang fails the test only


def at(y: int, mo: int, d: int, h: int, mi: int, s: int = 0) -> float:
    """An instant, given in UTC."""
    return datetime(y, mo, d, h, mi, s, tzinfo=UTC).timestamp()


T0 = at(2025, 3, 3, 10, 0, 10)  # a Monday, 10 seconds past 10:00 UTC
MINUTE = 60.0


class Clock:
    """A fake wall clock: epoch seconds, moved by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = SqliteStore(str(tmp / "corral.db"))
        node = Node("n1", cpu=4.0, memory=100_000, ports=(20000, 20099))
        self.plane = ControlPlane(
            self.store, LocalBackend(), inventory=[node], log_dir=str(tmp / "logs")
        )
        self.runner = self.plane.jobs
        self.clock = Clock(T0)
        self.schedulers: list[PeriodicScheduler] = []

    def scheduler(
        self, *, timer: bool = False, clock: Callable[[], float] | None = None
    ) -> PeriodicScheduler:
        s = PeriodicScheduler(
            self.runner, PeriodicStore(self.store), clock=clock or self.clock, timer=timer
        )
        self.schedulers.append(s)
        return s

    def add(self, sched: PeriodicScheduler, text: str) -> PeriodicSpec:
        path = self.tmp / "periodic.yaml"
        path.write_text(text)
        spec, diags = load_job(str(path), text)
        assert not diags, diags
        assert isinstance(spec, PeriodicSpec) and spec.job is not None
        sched.add(
            spec, text=text, workdir=str(self.tmp), owner="alice", job_units=units_of(spec.job)
        )
        return spec

    def runs(self, name: str) -> list[Job]:
        """The runs of a periodic job, in order."""
        mine = [j for j in self.runner.jobs.values() if j.name.startswith(name + "#")]
        return sorted(mine, key=lambda j: int(j.name.rpartition("#")[2]))

    def events(self, action: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.store.events()
            if e["kind"] == "periodic" and (action is None or e["action"] == action)
        ]

    async def until(self, cond: Callable[[], bool]) -> None:
        """Poll a condition (the test's wait_for bounds it)."""
        while not cond():
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        for s in self.schedulers:
            await s.close()
        await self.plane.close()


def with_rig(fn: Callable[[Rig, Path], Awaitable[None]]) -> Callable[[Path], None]:
    """A test body run on its own event loop with a fresh rig (closed afterwards)."""

    def test(tmp_path: Path) -> None:
        async def main() -> None:
            install_child_watcher()
            r = Rig(tmp_path)
            try:
                await asyncio.wait_for(fn(r, tmp_path), LIMIT)
            finally:
                await r.close()

        asyncio.run(main())

    test.__name__ = fn.__name__
    test.__doc__ = fn.__doc__
    return test


def script(tmp: Path, name: str, body: str) -> str:
    p = tmp / name
    p.write_text(body)
    return str(p)


# A run that notes its number and fire time, then waits for the file 'release'.
GATED = (
    "import os, time\n"
    "n = os.environ['CORRAL_PERIODIC_RUN']\n"
    "open('ran', 'a').write(n + ':' + os.environ['CORRAL_FIRE_TIME'] + ' ')\n"
    "open('pid-' + n, 'w').write(str(os.getpid()))\n"
    "while not os.path.exists('release'): time.sleep(0.01)\n"
)


def every_minute(tmp: Path, overlap: str, body: str = GATED) -> str:
    s = script(tmp, "run.py", body)
    return f"""
kind: periodic
name: tick
schedule: "* * * * *"
overlap: {overlap}
job:
  kind: batch
  name: tick
  wants: {{cpu: 1}}
  command: {{value: {PY}, arguments: [{s}]}}
"""


def ran(tmp: Path) -> list[str]:
    p = tmp / "ran"
    return p.read_text().split() if p.exists() else []


async def ended(job: Job) -> str:
    """A run's final state, once it has ended."""
    assert job.done is not None
    state: str = await job.done
    return state


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")  # a zombie has ended
    except OSError:
        return True


# -- overlap ---------------------------------------------------------------------------


@with_rig
async def test_overlap_skip_skips_a_fire_while_the_run_is_on(rig: Rig, tmp: Path) -> None:
    sched = rig.scheduler()
    rig.add(sched, every_minute(tmp, "skip"))
    m1 = at(2025, 3, 3, 10, 1)
    assert sched.get("tick")["next_fire"] == m1
    rig.clock.now = m1 - 1
    sched.tick()
    assert rig.runs("tick") == []  # not yet
    rig.clock.now = m1
    sched.tick()
    [run1] = rig.runs("tick")
    assert run1.name == "tick#1" and run1.owner == "alice"
    await rig.until(lambda: run1.state == "RUNNING" and (tmp / "pid-1").exists())
    assert sched.get("tick")["running"] == run1.id

    rig.clock.now = m1 + MINUTE  # the next fire time, the first run still on
    sched.tick()
    assert len(rig.runs("tick")) == 1
    skip = rig.events("skip")[-1]
    assert skip["cause"] == "overlap" and skip["count"] == 1
    assert skip["fire_time"] == m1 + MINUTE and skip["running"] == run1.id
    assert "still on" in skip["reason"] and "overlap is skip" in skip["reason"]

    (tmp / "release").touch()
    assert await ended(run1) == "SUCCEEDED"
    await rig.until(lambda: sched.get("tick")["running"] is None)
    info = sched.get("tick")
    assert info["last_state"] == "SUCCEEDED" and info["last_fire"] == m1 + MINUTE
    assert info["next_fire"] == m1 + 2 * MINUTE
    assert len(rig.runs("tick")) == 1  # the skipped fire time never runs
    assert ran(tmp) == [f"1:{m1:.0f}"]


@with_rig
async def test_overlap_queue_starts_the_next_run_as_the_running_one_ends(
    rig: Rig, tmp: Path
) -> None:
    sched = rig.scheduler()
    rig.add(sched, every_minute(tmp, "queue"))
    m1 = at(2025, 3, 3, 10, 1)
    rig.clock.now = m1
    sched.tick()
    [run1] = rig.runs("tick")
    await rig.until(lambda: run1.state == "RUNNING")

    rig.clock.now = m1 + MINUTE
    sched.tick()
    assert len(rig.runs("tick")) == 1
    queued = rig.events("queue")[-1]
    assert queued["fire_time"] == m1 + MINUTE and queued["position"] == 1
    assert queued["behind"] == run1.id
    assert sched.get("tick")["queued"] == 1
    stored = PeriodicStore(rig.store).get("tick")
    assert stored is not None and stored.state is not None
    assert stored.state["cron"]["queue"] == [m1 + MINUTE]  # a restart would keep it

    (tmp / "release").touch()  # no tick: the end of the run starts the queued one
    assert await ended(run1) == "SUCCEEDED"
    await rig.until(lambda: len(rig.runs("tick")) == 2)
    run2 = rig.runs("tick")[1]
    assert await ended(run2) == "SUCCEEDED"
    start = rig.events("start")[-1]
    assert start["job"] == run2.id and start["from_queue"] is True
    assert start["fire_time"] == m1 + MINUTE
    ended1 = run1.members[0].ended
    started2 = run2.members[0].started
    assert ended1 is not None and started2 is not None and started2 >= ended1
    assert ran(tmp) == [f"1:{m1:.0f}", f"2:{m1 + MINUTE:.0f}"]
    await rig.until(lambda: sched.get("tick")["running"] is None)
    assert sched.get("tick")["queued"] == 0


@with_rig
async def test_overlap_replace_cancels_the_running_run_and_starts_anew(rig: Rig, tmp: Path) -> None:
    sched = rig.scheduler()
    rig.add(sched, every_minute(tmp, "replace"))
    m1 = at(2025, 3, 3, 10, 1)
    rig.clock.now = m1
    sched.tick()
    [run1] = rig.runs("tick")
    await rig.until(lambda: run1.state == "RUNNING" and (tmp / "pid-1").exists())
    pid1 = int((tmp / "pid-1").read_text())

    rig.clock.now = m1 + MINUTE
    sched.tick()
    replace = rig.events("replace")[-1]
    assert replace["job"] == run1.id and replace["fire_time"] == m1 + MINUTE
    assert sched.get("tick")["running"] == run1.id  # until it has ended
    assert await ended(run1) == "CANCELLED"
    why = run1.members[0].reason or ""
    assert why == "cancelled by periodic job tick (overlap: replace)", why
    await rig.until(lambda: len(rig.runs("tick")) == 2)
    run2 = rig.runs("tick")[1]
    assert gone(pid1)  # the replaced run's process has ended before the new one starts
    await rig.until(lambda: run2.state == "RUNNING" and (tmp / "pid-2").exists())
    assert sched.get("tick")["running"] == run2.id
    start = rig.events("start")[-1]
    assert start["job"] == run2.id and start["fire_time"] == m1 + MINUTE
    assert [e["action"] for e in rig.events()][-3:] == ["replace", "end", "start"]
    assert ran(tmp) == [f"1:{m1:.0f}", f"2:{m1 + MINUTE:.0f}"]


@with_rig
async def test_a_restart_keeps_the_queue_and_the_run_still_on(rig: Rig, tmp: Path) -> None:
    """A new scheduler on the same runner and store: the run on is followed again, and
    the fire time queued behind it starts when it ends."""
    first = rig.scheduler()
    rig.add(first, every_minute(tmp, "queue"))
    m1 = at(2025, 3, 3, 10, 1)
    rig.clock.now = m1
    first.tick()
    [run1] = rig.runs("tick")
    await rig.until(lambda: run1.state == "RUNNING")
    rig.clock.now = m1 + MINUTE
    first.tick()
    await first.close()

    rig.clock.now = m1 + MINUTE + 5  # before the next fire time: nothing is due
    again = rig.scheduler()
    assert again.restore() == []
    info = again.get("tick")
    assert info["running"] == run1.id and info["queued"] == 1 and info["runs"] == 1
    (tmp / "release").touch()
    assert await ended(run1) == "SUCCEEDED"
    await rig.until(lambda: len(rig.runs("tick")) == 2)
    run2 = rig.runs("tick")[1]
    assert run2.name == "tick#2"
    assert await ended(run2) == "SUCCEEDED"
    assert ran(tmp) == [f"1:{m1:.0f}", f"2:{m1 + MINUTE:.0f}"]


# -- missed runs after a restart --------------------------------------------------------


def hourly(tmp: Path, missed: str) -> str:
    s = script(tmp, "run.py", (
        "import os\n"
        "open('ran', 'a').write(os.environ['CORRAL_PERIODIC_RUN'] + ':'"
        " + os.environ['CORRAL_FIRE_TIME'] + ' ')\n"
    ))  # fmt: skip
    return f"""
kind: periodic
name: hourly
schedule: "0 * * * *"
missed: {missed}
job:
  kind: batch
  name: hourly
  command: {{value: {PY}, arguments: [{s}]}}
"""


async def _run_once_then_restart(rig: Rig, tmp: Path, missed: str) -> PeriodicScheduler:
    """One run at 11:00, the controller down from then until 16:30 (12:00 to 16:00
    missed: five fire times), then a new scheduler on the same store."""
    first = rig.scheduler()
    rig.add(first, hourly(tmp, missed))
    rig.clock.now = at(2025, 3, 3, 11, 0)
    first.tick()
    [run1] = rig.runs("hourly")
    assert await ended(run1) == "SUCCEEDED"
    await rig.until(lambda: first.get("hourly")["running"] is None)
    await first.close()  # the controller goes down

    rig.clock.now = at(2025, 3, 3, 16, 30)
    again = rig.scheduler()
    assert again.list() == []
    assert again.restore() == []
    return again


@with_rig
async def test_restart_with_missed_skip_runs_none_and_says_how_many(rig: Rig, tmp: Path) -> None:
    sched = await _run_once_then_restart(rig, tmp, "skip")
    assert len(rig.runs("hourly")) == 1  # none of the missed ones
    skip = rig.events("skip")[-1]
    assert skip["cause"] == "missed" and skip["count"] == 5 and skip["count_exact"]
    assert skip["first_fire_time"] == at(2025, 3, 3, 12, 0)
    assert skip["fire_time"] == at(2025, 3, 3, 16, 0)
    assert "5 runs missed" in skip["reason"] and "missed is skip" in skip["reason"]
    [info] = sched.list()
    assert info["name"] == "hourly" and info["runs"] == 1 and info["running"] is None
    assert info["last_fire"] == at(2025, 3, 3, 16, 0)
    assert info["next_fire"] == at(2025, 3, 3, 17, 0)
    assert info["last_state"] == "SUCCEEDED"
    assert ran(tmp) == [f"1:{at(2025, 3, 3, 11, 0):.0f}"]


@with_rig
async def test_restart_with_missed_run_once_runs_exactly_one(rig: Rig, tmp: Path) -> None:
    sched = await _run_once_then_restart(rig, tmp, "run-once")
    runs = rig.runs("hourly")
    assert len(runs) == 2
    run2 = runs[1]
    assert run2.name == "hourly#2"  # the run counter outlives the restart
    start = rig.events("start")[-1]
    assert start["job"] == run2.id and start["covers"] == 5 and start["catch_up"] is True
    assert start["fire_time"] == at(2025, 3, 3, 16, 0)
    assert await ended(run2) == "SUCCEEDED"
    await rig.until(lambda: sched.get("hourly")["running"] is None)
    sched.tick()  # deciding again at the same time starts nothing more
    assert len(rig.runs("hourly")) == 2
    assert ran(tmp) == [f"1:{at(2025, 3, 3, 11, 0):.0f}", f"2:{at(2025, 3, 3, 16, 0):.0f}"]


# -- time zones and the real timer -------------------------------------------------------


@with_rig
async def test_a_schedule_in_a_time_zone_fires_at_its_instant(rig: Rig, tmp: Path) -> None:
    s = script(tmp, "run.py", (
        "import os\nopen('fired', 'w').write(os.environ['CORRAL_FIRE_TIME'])\n"
    ))  # fmt: skip
    text = f"""
kind: periodic
name: nightly
schedule: "30 2 * * *"
timezone: Europe/Zurich
job:
  kind: batch
  name: build
  command: {{value: {PY}, arguments: [{s}]}}
"""
    rig.clock.now = at(2025, 7, 1, 0, 0)  # 02:00 in Zurich (summer time, UTC+2)
    sched = rig.scheduler()
    rig.add(sched, text)
    fire = at(2025, 7, 1, 0, 30)  # 02:30 in Zurich
    info = sched.get("nightly")
    assert info["timezone"] == "Europe/Zurich"
    assert info["next_fire"] == fire and info["next_at"] == "2025-07-01T02:30:00+02:00"
    rig.clock.now = fire - 1
    sched.tick()
    assert rig.runs("nightly") == []
    rig.clock.now = fire
    sched.tick()
    [run] = rig.runs("nightly")
    assert run.name == "nightly#1"
    assert await ended(run) == "SUCCEEDED"
    assert (tmp / "fired").read_text() == f"{fire:.0f}"
    assert rig.events("start")[-1]["at"] == "2025-07-01T02:30:00+02:00"
    assert sched.get("nightly")["next_fire"] == at(2025, 7, 2, 0, 30)
    # in winter (UTC+1) 02:30 in Zurich is 01:30 UTC
    rig.clock.now = at(2025, 12, 1, 0, 0)
    sched.remove("nightly")
    rig.add(sched, text)
    assert sched.get("nightly")["next_fire"] == at(2025, 12, 1, 1, 30)


@with_rig
async def test_the_real_timer_fires_by_itself(rig: Rig, tmp: Path) -> None:
    """No tick(): a clock running in real time, 0.3 s before a fire time."""
    base = at(2025, 3, 3, 10, 0, 59) + 0.7
    t0 = time.monotonic()
    sched = rig.scheduler(timer=True, clock=lambda: base + (time.monotonic() - t0))
    (tmp / "release").touch()
    rig.add(sched, every_minute(tmp, "skip"))
    await rig.until(lambda: len(rig.runs("tick")) == 1)
    [run] = rig.runs("tick")
    assert await ended(run) == "SUCCEEDED"
    assert rig.events("start")[-1]["fire_time"] == at(2025, 3, 3, 10, 1)


@with_rig
async def test_remove_stops_the_schedule_and_the_store_forgets_it(rig: Rig, tmp: Path) -> None:
    sched = rig.scheduler()
    rig.add(sched, every_minute(tmp, "skip"))
    [info] = sched.list()
    assert info["schedule"] == "* * * * *" and info["runs"] == 0 and info["queued"] == 0
    sched.remove("tick")
    assert sched.list() == []
    assert PeriodicStore(rig.store).all() == []
    rig.clock.now = T0 + 10 * MINUTE
    sched.tick()
    assert rig.runs("tick") == []
    assert [e["action"] for e in rig.events()] == ["add", "remove"]
