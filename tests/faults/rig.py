"""A control plane with faults injected at its edges, and the invariants checked after
every step of a fault test.

``FaultyBackend`` and ``FaultyStore`` wrap the real local backend and the real SQLite
store; each can be told to fail its N-th call of a kind (once), so that a test can
fail every call site in turn. ``check`` asserts the invariants over the whole
history: no dead task reported alive (in memory or in the store), no transition left
STARTED, no gap in the events (stored or announced), and, after destroy, no process
left that carries one of the environment's task ids.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from corral.backends.local import LocalBackend
from corral.control.environment import Environment
from corral.control.plane import ControlPlane, install_child_watcher
from corral.store.sqlite import SqliteStore
from tests.control.harness import PATIENCE
from tests.faults.processes import marked, of_environment

ALIVE = ("LAUNCHING", "STANDBY", "CONFIGURED", "RUNNING")


MARK = "(injected)"  # in the text of every injected fault (their types are the real ones)


class _Counter:
    """Counts calls by name; fails the one the test asked for, once."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail_name: str | None = None
        self.fail_at = -1  # the occurrence of fail_name to fail (0-based)
        self.fired: str | None = None

    def arm(self, name: str, at: int) -> None:
        self.fail_name, self.fail_at, self.fired = name, at, None

    def tick(self, name: str) -> bool:
        self.calls.append(name)
        if name != self.fail_name or self.fired is not None:
            return False
        if sum(1 for c in self.calls if c == name) - 1 == self.fail_at:
            self.fired = f"{name}#{self.fail_at}"
            return True
        return False


class FaultyBackend:
    """The local backend, failing one call (by method and occurrence) with OSError."""

    METHODS = ("allocate", "launch", "transition", "stop", "release")

    def __init__(self, inner: LocalBackend) -> None:
        self.inner = inner
        self.name = inner.name
        self.counter = _Counter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _wrap(self, name: str) -> Callable[..., Awaitable[Any]]:
        real = getattr(self.inner, name)

        async def call(*a: Any, **kw: Any) -> Any:
            if self.counter.tick(name):
                raise OSError(5, f"Input/output error {MARK} in {name}")
            return await real(*a, **kw)

        return call

    async def allocate(self, *a: Any, **kw: Any) -> Any:
        return await self._wrap("allocate")(*a, **kw)

    async def launch(self, *a: Any, **kw: Any) -> Any:
        return await self._wrap("launch")(*a, **kw)

    async def transition(self, *a: Any, **kw: Any) -> Any:
        return await self._wrap("transition")(*a, **kw)

    async def stop(self, *a: Any, **kw: Any) -> Any:
        return await self._wrap("stop")(*a, **kw)

    async def release(self, *a: Any, **kw: Any) -> Any:
        return await self._wrap("release")(*a, **kw)


class FaultyStore(SqliteStore):
    """The SQLite store, failing one write (by method and occurrence) as a full disk."""

    # the writes of an environment's life, and those of a restart
    WRITES = (
        "create_environment", "set_environment", "update_tasks", "open_run", "close_run",
        "begin_transition", "end_transition", "add_transition", "add_events",
    )  # fmt: skip
    RESTART_WRITES = ("end_interrupted", "mark_lost", "set_nodes", "forget", "set_meta",
                      "add_token")  # fmt: skip
    # the writes of the service around a template (runtime.Set), and of the config store
    SERVICE_WRITES = ("runtime_set_many", "config_put")

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.counter = _Counter()

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if (
            name in FaultyStore.WRITES
            or name in FaultyStore.RESTART_WRITES
            or (name in FaultyStore.SERVICE_WRITES)
        ):
            counter = super().__getattribute__("counter")

            def write(*a: Any, **kw: Any) -> Any:
                if counter.tick(name):
                    raise sqlite3.OperationalError(f"database or disk is full {MARK}")
                return attr(*a, **kw)

            return write
        return attr


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = FaultyStore(str(tmp / "data" / "corral.db"))
        self.backend = FaultyBackend(LocalBackend(run_dir=str(tmp / "run")))
        self.plane = ControlPlane(
            self.store,
            self.backend,  # type: ignore[arg-type]
            log_dir=str(tmp / "data" / "logs"),
        )
        self.events: list[dict[str, Any]] = []
        self.plane.bus.subscribe(self.events.extend)
        self.first_seq = self.store.last_seq()  # events stored before (a dead process's)

    async def until(self, pred: Callable[[], bool], what: str) -> None:
        t0 = time.monotonic()
        while not pred():
            if time.monotonic() - t0 > PATIENCE:
                raise AssertionError(f"never reached: {what}")
            await asyncio.sleep(0.005)

    # -- invariants ---------------------------------------------------------------------

    def dead_shown_alive(self, env: Environment) -> list[str]:
        """Tasks reported alive (in memory or in the store) whose process is not."""
        out = []
        settled = env.transitioning is None
        for t in env.tasks:
            if t.state in ALIVE and not t.hook:
                if t.pid is None:
                    if settled:
                        out.append(f"{t.spec.path} is {t.state} without a process")
                elif t.pid not in marked(t.id):
                    out.append(f"{t.spec.path} is {t.state}, its process {t.pid} is dead")
        if self.plane.journal.behind == 0:
            for row in self.store.tasks(env.id):
                if row["state"] not in ALIVE:
                    continue
                t = env.tasks[row["idx"]]
                if t.hook:
                    continue
                if row["pid"] is None:
                    if settled:
                        out.append(f"stored: {row['path']} is {row['state']} without a pid")
                elif row["pid"] not in marked(t.id):
                    out.append(f"stored: {row['path']} is {row['state']}, {row['pid']} is dead")
        return out

    def problems(self, env: Environment) -> list[str]:
        out = self.dead_shown_alive(env)
        if env.transitioning is None and self.plane.journal.behind == 0:
            started = [t for t in self.store.transitions(env.id) if t["status"] == "STARTED"]
            out += [f"transition {t['event']} left STARTED" for t in started]
            stored = [e["seq"] for e in self.store.events()]
            if stored != list(range(1, len(stored) + 1)):
                out.append(f"stored events have gaps: {stored}")
            if [e["seq"] for e in self.events] != [q for q in stored if q > self.first_seq]:
                out.append("the announced events differ from the stored ones")
        return out

    async def check(self, env: Environment, when: str) -> None:
        """The invariants hold (reports and retries may take a moment: wait for them)."""
        t0 = time.monotonic()
        while True:
            found = self.problems(env)
            if not found and env.transitioning is None and self.plane.journal.behind == 0:
                return
            if time.monotonic() - t0 > PATIENCE:
                detail = found or ["a transition or the store never settled"]
                raise AssertionError(f"after {when}: " + "; ".join(detail))
            await asyncio.sleep(0.005)

    async def check_destroyed(self, env: Environment) -> None:
        await self.until(lambda: not of_environment(env.id), "no process of the environment")
        assert env.state == "DONE", env.state
        assert not [t for t in env.tasks if t.state in ALIVE], "a destroyed task is alive"
        await self.check(env, "destroy")

    async def close(self) -> None:
        await self.plane.close()
        self.store.close()


def run(tmp: Path, body: Callable[[Rig], Awaitable[None]]) -> None:
    async def main() -> None:
        install_child_watcher()
        rig = Rig(tmp)
        try:
            await body(rig)
        finally:
            await rig.close()

    asyncio.run(main())
